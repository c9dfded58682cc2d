package serve

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/serve/loadtest"
)

// BenchmarkServeBatch8 drives a one-machine deployment with 8 streaming clients (batch 8) per
// exit threshold and reports requests/s, time to first token, and the engine's loop steps
// executed per decode token next to their mean exit depth: in fast mode without probes the two
// are equal, and below R, because early exits skip real work at any batch size.
//
//	go test -run - -bench ServeBatch8 ./runtime/serve
func BenchmarkServeBatch8(b *testing.B) {
	for _, tau := range []float64{0.7, 0.3} {
		b.Run("tau="+strconv.FormatFloat(tau, 'f', 1, 64), func(b *testing.B) {
			l, err := Load(modelDir, engine.Options{Mode: engine.Fast, Threshold: tau, MaxBatch: 8})
			if err != nil {
				b.Fatal(err)
			}
			ectx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { defer close(done); _ = l.Run(ectx) }()
			defer func() { cancel(); <-done; _ = l.Close() }()
			wo := l.Worker
			wo.Capacity = 8
			local, err := StartLocal(context.Background(), LocalOptions{Ref: testRef, DataDir: b.TempDir(), Gen: l.Engine, Tok: l.Tok, Worker: wo})
			if err != nil {
				b.Fatal(err)
			}
			defer local.Close()
			before := l.Engine.Stats()
			b.ResetTimer()
			res, err := loadtest.Run(context.Background(), loadtest.Options{URL: local.URL(), Model: testRef.String(), Clients: 8,
				Requests: max(b.N, 8), MaxTokens: 32})
			b.StopTimer()
			if err != nil || res.Errors > 0 {
				b.Fatalf("%v; %d failed, first: %v", err, res.Errors, res.FirstErr)
			}
			after := l.Engine.Stats()
			tok := float64(after.DecodeTokens - before.DecodeTokens)
			b.ReportMetric(res.RequestsPerSecond(), "req/s")
			b.ReportMetric(float64(loadtest.Quantile(res.TTFT, 0.5))/float64(time.Millisecond), "ttft-p50-ms")
			b.ReportMetric(float64(after.LoopSteps-before.LoopSteps)/tok, "loop-steps/token")
			b.ReportMetric(float64(after.DecodeDepth-before.DecodeDepth)/tok, "mean-depth")
		})
	}
}
