package bench

import (
	"context"
	"os"
	"path/filepath"
	"runtime/pprof"
	"testing"

	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

func TestZZProf(t *testing.T) {
	if os.Getenv("ZZ") == "" {
		t.Skip()
	}
	home, _ := os.UserHomeDir()
	m, err := model.Load(filepath.Join(home, ".cache/loopserve/models/ouro-1.4b-random"))
	if err != nil {
		t.Fatal(err)
	}
	be, err := cpu.NewWith(cpu.Options{Numerics: cpu.BF16})
	if err != nil {
		t.Fatal(err)
	}
	e, err := engine.New(m, engine.Options{Backend: be, Mode: engine.Fast, MaxBatch: 8, MaxContext: 128})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.Run(ctx)
	_, prompts := Prompts(m.Config.VocabSize, 16, 16, 8, 1)
	DecodeRate(ctx, e, prompts, 3)
	f, _ := os.Create("/tmp/b8.prof")
	pprof.StartCPUProfile(f)
	r, err := DecodeRate(ctx, e, prompts, 12)
	pprof.StopCPUProfile()
	t.Logf("profiled b8 %.2f tok/s %v", r, err)
}
