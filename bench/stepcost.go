package bench

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// StepCost measures one batch iteration's wall time (one loop step for every row) at full
// depth with 1 and 8 rows decoding, and returns it as base + perRow·rows seconds. backend
// makes a fresh backend for each engine it starts.
func StepCost(ctx context.Context, m *model.Model, backend func() engine.Backend) (base, perRow float64, err error) {
	t1, err := iterationTime(ctx, m, backend(), 1)
	if err != nil {
		return 0, 0, err
	}
	t8, err := iterationTime(ctx, m, backend(), 8)
	if err != nil {
		return 0, 0, err
	}
	perRow = max((t8-t1)/7, 1e-7)
	return max(t1-perRow, 1e-6), perRow, nil
}

// iterationTime is the mean wall time of one iteration with rows sequences decoding 200 tokens
// each at full depth.
func iterationTime(ctx context.Context, m *model.Model, b engine.Backend, rows int) (float64, error) {
	e, err := engine.New(m, engine.Options{Backend: b, Mode: engine.Fast, Threshold: 1, MaxBatch: rows})
	if err != nil {
		return 0, fmt.Errorf("measuring the step cost: %w", err)
	}
	defer e.Close()
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = e.Run(ctx) }()
	defer func() { cancel(); wg.Wait() }()
	var chans []<-chan engine.Event
	for i := range rows {
		ch, err := e.Submit(ctx, engine.Request{ID: fmt.Sprint("cost", i), Prompt: []int{1, 2, 3}, MaxTokens: 200, IgnoreEOS: true})
		if err != nil {
			return 0, fmt.Errorf("measuring the step cost: %w", err)
		}
		chans = append(chans, ch)
	}
	start, s0 := time.Now(), e.Stats()
	for _, ch := range chans {
		for ev := range ch {
			if ev.Err != nil {
				return 0, fmt.Errorf("measuring the step cost: %w", ev.Err)
			}
			if ev.Done {
				break
			}
		}
	}
	its := float64(e.Stats().Iterations - s0.Iterations)
	if its == 0 {
		return 0, fmt.Errorf("measuring the step cost: no iterations ran")
	}
	return time.Since(start).Seconds() / its, nil
}
