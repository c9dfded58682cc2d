package serve

import (
	"context"
	"errors"
	"testing"

	"github.com/loopserve/loopserve/runtime/engine"
)

// testThreshold gives the tiny model a mean depth near 3 of 4 (its eval.json: q0.70).
const testThreshold = 0.7

// newGenerator loads the shipped default model into a real engine (Fast mode: early exits skip
// their remaining loop steps) and runs its batching loop until the test ends.
func newGenerator(t testing.TB) Generator {
	t.Helper()
	l, err := Load(modelDir, engine.Options{Mode: engine.Fast, Threshold: testThreshold, MaxBatch: 8, ProbeFraction: 0.05})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("engine: %v", err)
		}
		if err := l.Close(); err != nil {
			t.Error(err)
		}
	})
	return l.Engine
}
