package engine_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
)

// TestBF16Numerics measures the CPU backend's bf16 numerics (bfloat16 activations, VDPBF16PS)
// against the goldens — the evidence that it is not the serving default: the serving default
// must keep all 24 greedy continuations and step logits within 2e-2 — and checks that it keeps
// the engine's guarantees: batched requests give the tokens they give alone.
func TestBF16Numerics(t *testing.T) {
	be, err := cpu.NewWith(cpu.Options{Numerics: cpu.BF16})
	if err != nil {
		t.Skipf("bf16 numerics: %v", err)
	}
	defer be.Close()
	same, total := 0, 0
	for _, name := range goldenModels {
		m, g := loadGolden(t, name)
		var worst float64
		for k := range g.json.Prompts {
			tr, err := engine.Forward(context.Background(), m, be, g.ids(t, k))
			if err != nil {
				t.Fatal(err)
			}
			worst = max(worst, maxAbsDiff(t, tr.StepLogits, g.f32(t, k, "step_logits")))
		}
		var reqs []engine.Request
		var wants []goldenRun
		for k, p := range g.json.Prompts {
			for _, mode := range goldenModes {
				reqs = append(reqs, engine.Request{ID: fmt.Sprint(k, mode), Prompt: g.ids(t, k), MaxTokens: 12, IgnoreEOS: true,
					Exit: goldenExit(mode, m.Config.TotalUTSteps)})
				wants = append(wants, p.Generate[mode])
			}
		}
		batched := runBatched(t, newEngine(t, m, engine.Options{Backend: be, MaxBatch: 5, PrefillChunk: 7}), reqs)
		for i, r := range reqs {
			if cmp.Equal(batched[i].ids, wants[i].IDs) && cmp.Equal(batched[i].depths, wants[i].Depths) {
				same++
			}
			total++
			if i%3 == 0 {
				alone := runBatched(t, newEngine(t, m, engine.Options{Backend: be}), []engine.Request{r})[0]
				if diff := cmp.Diff(batched[i], alone, cmp.AllowUnexported(result{})); diff != "" {
					t.Errorf("%s %s (-batched +alone):\n%s", name, r.ID, diff)
				}
			}
		}
		t.Logf("%s: bf16 step logits within %.3g of the goldens", name, worst)
		if worst > 5 {
			t.Errorf("%s: bf16 step logits %.3g from the goldens: more than its known drift", name, worst)
		}
	}
	t.Logf("bf16: %d of %d golden continuations", same, total)
	if same < total*2/3 {
		t.Errorf("bf16: %d of %d golden continuations, fewer than its known accuracy", same, total)
	}
}
