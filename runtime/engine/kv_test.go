package engine_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/loopserve/loopserve/runtime/engine"
)

// TestKVMemoryRatio: during the same generation, the KVFull caches hold R× the bytes of KVLast.
func TestKVMemoryRatio(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	R := m.Config.TotalUTSteps
	held := map[engine.KVPolicy]int64{}
	for _, p := range []engine.KVPolicy{engine.KVFull, engine.KVLast} {
		e := newEngine(t, m, engine.Options{Mode: engine.Fast, KVPolicy: p, Threshold: 0.5})
		n := 0
		_, err := e.Generate(context.Background(), engine.Request{Prompt: []int{1, 2, 3, 4, 5}, MaxTokens: 20, IgnoreEOS: true}, func(engine.Token) bool {
			if n++; n == 19 {
				held[p] = e.KVBytes()
			}
			return true
		})
		if err != nil {
			t.Fatal(err)
		}
		if b := e.KVBytes(); b != 0 {
			t.Errorf("%v: %d bytes still counted after the last token", p, b)
		}
	}
	if held[engine.KVFull] != int64(R)*held[engine.KVLast] || held[engine.KVLast] == 0 {
		t.Errorf("KV bytes full %d, last %d: want ratio %d:1", held[engine.KVFull], held[engine.KVLast], R)
	}
	t.Logf("KV bytes after 18 decode steps: full %d, last %d", held[engine.KVFull], held[engine.KVLast])
}

// TestPreemptionRecomputesSameTokens runs more requests than the KV budget can hold at their
// full length: the newest are preempted as the oldest grow, their caches freed and later
// recomputed, and every request still yields exactly the tokens and depths it yields alone
// (adaptive depth, probes, sampling and speculation included), under both KV policies.
func TestPreemptionRecomputesSameTokens(t *testing.T) {
	m, g := loadGolden(t, "ouro-tiny-arith")
	c := m.Config
	for _, kv := range []engine.KVPolicy{engine.KVFull, engine.KVLast} {
		t.Run(kv.String(), func(t *testing.T) {
			slots := 1
			if kv == engine.KVFull {
				slots = c.TotalUTSteps
			}
			block := int64(16*slots*c.NumHiddenLayers*2*c.KVDim()) * 4
			opts := engine.Options{Mode: engine.Fast, KVPolicy: kv, MaxBatch: 4, Threshold: 0.5, ProbeFraction: 0.3, PrefillChunk: 8}
			var reqs []engine.Request
			for i := range 4 {
				r := engine.Request{ID: fmt.Sprint("pre-", i), Prompt: g.ids(t, i), MaxTokens: 40, IgnoreEOS: true}
				switch i {
				case 1:
					r.Sampling = engine.Sampling{Temperature: 0.8, Seed: 3}
				case 2:
					r.Speculative = engine.Speculative{Draft: 3, DraftDepth: 1}
				}
				reqs = append(reqs, r)
			}
			var want []result
			for _, r := range reqs {
				want = append(want, runBatched(t, newEngine(t, m, opts), []engine.Request{r})[0])
			}
			tight := opts
			tight.MaxKVBytes = 9 * block // room for two requests at full length, not four
			e := newEngine(t, m, tight)
			got := runBatched(t, e, reqs)
			for i := range reqs {
				if diff := cmp.Diff(got[i], want[i], cmp.AllowUnexported(result{})); diff != "" {
					t.Errorf("request %d (-preempted +alone):\n%s", i, diff)
				}
			}
			st := e.Stats()
			if st.Preemptions == 0 || st.ReplayedTokens == 0 {
				t.Errorf("stats %+v: no preemption happened", st)
			}
			t.Logf("%d preemptions, %d generated tokens recomputed", st.Preemptions, st.ReplayedTokens)
		})
	}
}
