package engine_test

import (
	"context"
	"errors"
	"testing"

	"github.com/loopserve/loopserve/runtime/engine"
)

// FuzzRequest feeds arbitrary request fields to Generate: every outcome is tokens within the
// vocabulary and limits, ErrInvalidRequest or ErrKVFull; never a panic.
func FuzzRequest(f *testing.F) {
	m := loadModel(f, "ouro-tiny-random")
	V, R := m.Config.VocabSize, m.Config.TotalUTSteps
	engines := map[bool]*engine.Engine{}
	for _, fast := range []bool{false, true} {
		// The fast engine also stores bf16 keys and values under a budget of 40 positions.
		opts := engine.Options{Backend: cpuBackend(), Mode: engine.Exact, KVPolicy: engine.KVFull, ProbeFraction: 0.5, MaxContext: 64,
			PrefillChunk: 5, Decode: func(ids []int) string { return string(rune('a' + len(ids)%26)) }}
		if fast {
			c := m.Config
			opts.Mode, opts.KVPolicy, opts.KVBF16 = engine.Fast, engine.KVLast, true
			opts.MaxKVBytes = 40 * int64(c.NumHiddenLayers) * 2 * int64(c.KVDim()) * 2
		}
		e, err := engine.New(m, opts)
		if err != nil {
			f.Fatal(err)
		}
		engines[fast] = e
	}
	f.Add([]byte{1, 2, 3}, 4, 0.0, 0, 0.0, uint64(0), 0.5, 0, 0, 0, 0, false, "x")
	f.Add([]byte{}, 1, 1.0, 5, 0.9, uint64(3), 0.0, 2, 0, 2, 1, true, "")
	f.Add([]byte{255, 0}, 3, -1.0, -1, 2.0, uint64(1), 1.5, 9, 9, 40, 9, true, "")
	f.Fuzz(func(t *testing.T, prompt []byte, maxTokens int, temp float64, topK int, topP float64, seed uint64,
		tau float64, maxDepth, force, draft, draftDepth int, fast bool, stop string) {
		ids := make([]int, len(prompt))
		for i, b := range prompt {
			ids[i] = int(b) * 5 // some ids past the vocabulary of 1024
		}
		r := engine.Request{ID: "f", Prompt: ids, MaxTokens: min(maxTokens, 8), IgnoreEOS: seed%2 == 0,
			Sampling:    engine.Sampling{Temperature: temp, TopK: topK, TopP: topP, Seed: seed},
			Exit:        engine.Exit{Threshold: tau, MaxDepth: maxDepth, ForceDepth: force},
			Speculative: engine.Speculative{Draft: draft, DraftDepth: draftDepth}}
		if stop != "" {
			r.StopStrings = []string{stop}
		}
		n := 0
		_, err := engines[fast].Generate(context.Background(), r, func(tok engine.Token) bool {
			n++
			if tok.ID < 0 || tok.ID >= V || tok.Depth < 1 || tok.Depth > R {
				t.Fatalf("token %+v", tok)
			}
			return true
		})
		if err != nil && !errors.Is(err, engine.ErrInvalidRequest) && !errors.Is(err, engine.ErrKVFull) {
			t.Fatalf("error %v is neither ErrInvalidRequest nor ErrKVFull", err)
		}
		if err == nil && (n == 0 || n > r.MaxTokens) {
			t.Fatalf("%d tokens for max %d", n, r.MaxTokens)
		}
	})
}
