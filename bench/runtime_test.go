package bench

import (
	"path/filepath"
	"testing"

	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/model"
)

func TestRuntimeTinyModel(t *testing.T) {
	m, err := model.Load(filepath.Join(testdata, "models", "ouro-tiny-random"))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	res, err := Runtime(t.Context(), m, cpu.New(0), RuntimeOptions{PrefillLen: 16, PromptLen: 4, DecodeTokens: 12, Batch: 3})
	if err != nil {
		t.Fatal(err)
	}
	if res.PrefillTokens != 16 || res.DecodeTokens != 11 || res.Batch != 3 {
		t.Errorf("counts = %+v, want 16 prefill tokens, 11 timed decode tokens, batch 3", res)
	}
	if res.PrefillTokS <= 0 || res.DecodeTokSB1 <= 0 || res.DecodeTokSBN <= 0 {
		t.Errorf("rates = %+v, want positive", res)
	}
	if res.LoopStepsPerTok != 4 {
		t.Errorf("loop steps per token = %v, want 4 (full depth)", res.LoopStepsPerTok)
	}
	// 2 layers × (q 64×64 + k, v 32×64 + o 64×64 + gate, up 160×64 + down 64×160) bf16, 4 steps,
	// plus the LM head 1024×64 and one embedding row.
	layer := int64(64*64+2*32*64+64*64+3*160*64) * 2
	if want := 4*2*layer + 1024*64*2 + 64*2; res.WeightBytesPerTk != want {
		t.Errorf("weight bytes per token = %d, want %d", res.WeightBytesPerTk, want)
	}
}
