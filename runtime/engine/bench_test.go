package engine_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/loopserve/loopserve/bench"
	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// benchModels are the tiny models, plus the folder named by LOOPSERVE_BENCH_MODEL (e.g. the
// 1.4B-shaped model from `go run ./hack/mkmodel`) when set.
func benchModels(b *testing.B) []benchModel {
	b.Helper()
	var ms []benchModel
	for _, name := range goldenModels {
		ms = append(ms, benchModel{name, loadModel(b, name)})
	}
	if dir := os.Getenv("LOOPSERVE_BENCH_MODEL"); dir != "" {
		m, err := model.Load(dir)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { m.Close() })
		ms = append(ms, benchModel{filepath.Base(dir), m})
	}
	return ms
}

type benchModel struct {
	name string
	m    *model.Model
}

// runEngine starts e's batching loop and stops it when the benchmark ends.
func runEngine(b *testing.B, e *engine.Engine) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := e.Run(ctx); err != nil {
			b.Error(err)
		}
	})
	b.Cleanup(func() {
		cancel()
		wg.Wait()
	})
}

// BenchmarkDecode reports full-depth greedy decode tokens/s at batch 1 and 8 (16-token prompts,
// 16 tokens per sequence, the first untimed).
func BenchmarkDecode(b *testing.B) {
	for _, bm := range benchModels(b) {
		name, m := bm.name, bm.m
		for _, batch := range []int{1, 8} {
			b.Run(fmt.Sprintf("%s/b%d", name, batch), func(b *testing.B) {
				e, err := engine.New(m, engine.Options{Backend: cpu.New(0), Mode: engine.Fast, MaxBatch: batch})
				if err != nil {
					b.Fatal(err)
				}
				runEngine(b, e)
				_, prompts := bench.Prompts(m.Config.VocabSize, 1, 16, batch, 1)
				const tokens = 16
				var sum float64
				for b.Loop() {
					rate, err := bench.DecodeRate(b.Context(), e, prompts, tokens)
					if err != nil {
						b.Fatal(err)
					}
					sum += rate
				}
				b.ReportMetric(sum/float64(b.N), "tok/s")
				b.ReportMetric(0, "ns/op") // one op is a whole generation; tok/s is the figure
			})
		}
	}
}

// BenchmarkPrefill reports prompt tokens/s for a 128-token prompt at full depth.
func BenchmarkPrefill(b *testing.B) {
	for _, bm := range benchModels(b) {
		name, m := bm.name, bm.m
		b.Run(name, func(b *testing.B) {
			e, err := engine.New(m, engine.Options{Backend: cpu.New(0), Mode: engine.Fast})
			if err != nil {
				b.Fatal(err)
			}
			prompt, _ := bench.Prompts(m.Config.VocabSize, 128, 1, 1, 1)
			var sum float64
			for b.Loop() {
				rate, err := bench.PrefillRate(b.Context(), e, prompt)
				if err != nil {
					b.Fatal(err)
				}
				sum += rate
			}
			b.ReportMetric(sum/float64(b.N), "tok/s")
			b.ReportMetric(0, "ns/op")
		})
	}
}
