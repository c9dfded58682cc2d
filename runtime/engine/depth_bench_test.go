package engine_test

import (
	"fmt"
	"testing"

	"github.com/loopserve/loopserve/runtime/engine"
)

// BenchmarkDepthCompaction decodes 8 sequences at once on the trained tiny model in Exact mode
// and in Fast mode at τ=0.5: the Fast run's time per token should shrink with its loop steps
// per token (reported next to the mean exit depth of the decoded tokens: in Fast mode the two
// are equal, in Exact mode steps/token is R), since exited tokens leave the batch.
func BenchmarkDepthCompaction(b *testing.B) {
	m, g := loadGolden(b, "ouro-tiny-arith")
	for _, mode := range []engine.Mode{engine.Exact, engine.Fast} {
		b.Run(mode.String(), func(b *testing.B) {
			var steps, toks, depthSum uint64
			for b.Loop() {
				e := newEngine(b, m, engine.Options{Mode: mode, MaxBatch: 8, Threshold: 0.5})
				var reqs []engine.Request
				for i := 0; i < 8; i++ {
					p := g.ids(b, i%len(g.json.Prompts))
					reqs = append(reqs, engine.Request{ID: fmt.Sprint(i), Prompt: p[max(0, len(p)-8):], MaxTokens: 32, IgnoreEOS: true})
				}
				for _, r := range runBatched(b, e, reqs) {
					for _, d := range r.depths[1:] { // the first token comes from the prefill
						depthSum += uint64(d)
					}
				}
				st := e.Stats()
				steps += st.LoopSteps
				toks += st.DecodeTokens
			}
			b.ReportMetric(float64(steps)/float64(toks), "steps/token")
			b.ReportMetric(float64(depthSum)/float64(toks), "depth/token")
			b.ReportMetric(float64(toks)/b.Elapsed().Seconds(), "tok/s")
		})
	}
}
