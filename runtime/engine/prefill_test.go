package engine_test

import (
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/loopserve/loopserve/runtime/engine"
)

// TestPrefillFillsEveryStep: the prefill runs every loop step with each step's own keys and
// values whatever the KV policy and exit mode (DESIGN §5), so the first generated token and its
// depth equal the golden's in every golden mode, also when a small chunk size splits the prompt.
func TestPrefillFillsEveryStep(t *testing.T) {
	n := 0
	for _, name := range goldenModels {
		m, g := loadGolden(t, name)
		R := m.Config.TotalUTSteps
		for _, kv := range []engine.KVPolicy{engine.KVFull, engine.KVLast} {
			for _, mode := range []engine.Mode{engine.Exact, engine.Fast} {
				e := newEngine(t, m, engine.Options{Mode: mode, KVPolicy: kv, MaxBatch: 8, PrefillChunk: 5})
				var reqs []engine.Request
				var want [][2]int
				for k, p := range g.json.Prompts {
					for _, gm := range goldenModes {
						reqs = append(reqs, engine.Request{ID: fmt.Sprint(k, gm), Prompt: g.ids(t, k), MaxTokens: 1, IgnoreEOS: true,
							Exit: goldenExit(gm, R)})
						want = append(want, [2]int{p.Generate[gm].IDs[0], p.Generate[gm].Depths[0]})
					}
				}
				for i, r := range runBatched(t, e, reqs) {
					if len(r.ids) != 1 {
						t.Errorf("%s %v %v %s: %d tokens, want 1", name, kv, mode, reqs[i].ID, len(r.ids))
						continue
					}
					if diff := cmp.Diff([2]int{r.ids[0], r.depths[0]}, want[i]); diff != "" {
						t.Errorf("%s %v %v %s: first token and depth (-got +want):\n%s", name, kv, mode, reqs[i].ID, diff)
					}
					n++
				}
			}
		}
	}
	if n != 4*24 {
		t.Errorf("checked %d first tokens, want %d", n, 4*24)
	}
}
