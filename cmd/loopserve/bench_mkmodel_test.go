package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/loopserve/loopserve/runtime/model"
)

// TestBenchMkmodel: the subcommand writes a loadable checkpoint of the layout, the same bytes
// for the same seed, and keeps an existing one without --force.
func TestBenchMkmodel(t *testing.T) {
	layout := filepath.Join("..", "..", "testdata", "models", "ouro-tiny-random")
	run := func(out string, args ...string) string {
		cmd := newBenchMkmodelCmd()
		var stderr bytes.Buffer
		cmd.SetErr(&stderr)
		cmd.SetArgs(append([]string{"--layout", layout, "--out", out, "--seed", "3"}, args...))
		if err := cmd.ExecuteContext(context.Background()); err != nil {
			t.Fatal(err)
		}
		return stderr.String()
	}
	a, b := t.TempDir(), t.TempDir()
	run(a)
	run(b)
	m, err := model.Load(a)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.Config.HiddenSize != 64 || len(m.Layers) != 2 {
		t.Errorf("loaded hidden %d, %d layers; want the layout's 64 and 2", m.Config.HiddenSize, len(m.Layers))
	}
	wa, _ := os.ReadFile(filepath.Join(a, "model.safetensors"))
	wb, _ := os.ReadFile(filepath.Join(b, "model.safetensors"))
	if len(wa) == 0 || !bytes.Equal(wa, wb) {
		t.Errorf("two runs with seed 3 wrote %d and %d bytes, not the same", len(wa), len(wb))
	}
	if msg := run(a); !bytes.Contains([]byte(msg), []byte("exists (use --force")) {
		t.Errorf("second run over an existing model: %q", msg)
	}
	cmd := newBenchMkmodelCmd()
	cmd.SetErr(&bytes.Buffer{})
	cmd.SetArgs([]string{"--out", a})
	if err := cmd.Execute(); err == nil {
		t.Error("no --layout accepted")
	}
}
