package bench

import (
	"math"
	"path/filepath"
	"slices"
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

func TestPairedDecode(t *testing.T) {
	m, err := model.Load(filepath.Join(testdata, "models", "ouro-tiny-random"))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	probe, err := NewProbe(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	res, err := Runtime(t.Context(), m, cpu.New(0), RuntimeOptions{PrefillLen: 8, PromptLen: 4, DecodeTokens: 12, Batch: 3, Repeats: 2, Probe: probe})
	if err != nil {
		t.Fatal(err)
	}
	// Every repeat pairs its 11 tokens after the first.
	if len(res.PairedFractions) != 22 {
		t.Fatalf("paired fractions = %v, want 22 (2 repeats × 11 tokens)", res.PairedFractions)
	}
	for _, f := range res.PairedFractions {
		if !(f > 0) || math.IsInf(f, 0) {
			t.Errorf("paired fraction %v, want positive and finite", f)
		}
	}
	if _, err := PairedDecode(t.Context(), nil, nil, 1, 1, probe); err == nil {
		t.Error("PairedDecode(1 token) returned no error")
	}
	res, err = Runtime(t.Context(), m, cpu.New(0), RuntimeOptions{PrefillLen: 8, PromptLen: 4, DecodeTokens: 12, Batch: 3})
	if err != nil {
		t.Fatal(err)
	}
	if res.PairedFractions != nil {
		t.Errorf("paired fractions without a probe = %v, want none", res.PairedFractions)
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		xs   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{3}, 3},
		{[]float64{3, 1}, 2},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		in := slices.Clone(c.xs)
		if got := Median(c.xs); got != c.want {
			t.Errorf("Median(%v) = %v, want %v", c.xs, got, c.want)
		}
		if !slices.Equal(c.xs, in) {
			t.Errorf("Median changed its input to %v", c.xs)
		}
	}
}
