package engine_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// goldenExit maps the goldens' modes to exit controls.
func goldenExit(mode string, R int) engine.Exit {
	switch mode {
	case "full":
		return engine.Exit{ForceDepth: R}
	case "step0":
		return engine.Exit{ForceDepth: 1}
	case "q0.5":
		return engine.Exit{Threshold: 0.5}
	case "q0.9":
		return engine.Exit{Threshold: 0.9}
	}
	panic("unknown golden mode " + mode)
}

var goldenModes = []string{"full", "step0", "q0.5", "q0.9"}

// newEngine makes an engine with opts, on a CPU backend that poisons the KV blocks it reuses
// unless opts names another: every test through it checks that no step reads a position its
// request never wrote (that would turn its logits into NaN).
func newEngine(t testing.TB, m *model.Model, opts engine.Options) *engine.Engine {
	t.Helper()
	if opts.Backend == nil {
		be, err := cpu.NewWith(cpu.Options{PoisonKV: true})
		if err != nil {
			t.Fatal(err)
		}
		opts.Backend = be
	}
	e, err := engine.New(m, opts)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func generate(t testing.TB, e *engine.Engine, r engine.Request) (ids, depths []int) {
	t.Helper()
	_, err := e.Generate(context.Background(), r, func(tok engine.Token) bool {
		ids = append(ids, tok.ID)
		depths = append(depths, tok.Depth)
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	return ids, depths
}

// TestGreedyMatchesGolden checks golden continuations in Exact mode one request at a time
// (the small model's 8; TestBatchedMatchesGolden checks all 24 through the batching loop).
func TestGreedyMatchesGolden(t *testing.T) {
	n := 0
	for _, name := range goldenModels[:1] {
		m, g := loadGolden(t, name)
		e := newEngine(t, m, engine.Options{})
		for k, p := range g.json.Prompts {
			for _, mode := range goldenModes {
				want := p.Generate[mode]
				ids, depths := generate(t, e, engine.Request{Prompt: g.ids(t, k), MaxTokens: len(want.IDs), IgnoreEOS: true,
					Exit: goldenExit(mode, m.Config.TotalUTSteps)})
				if diff := cmp.Diff(ids, want.IDs); diff != "" {
					t.Errorf("%s p%d %s ids (-got +want):\n%s", name, k, mode, diff)
				}
				if diff := cmp.Diff(depths, want.Depths); diff != "" {
					t.Errorf("%s p%d %s depths (-got +want):\n%s", name, k, mode, diff)
				}
				n++
			}
		}
	}
	if n != 8 {
		t.Errorf("checked %d continuations, want 8", n)
	}
}

type result struct {
	ids, depths []int
	finish      string
}

// runBatched submits every request at once to a running engine and collects the results.
func runBatched(t testing.TB, e *engine.Engine, reqs []engine.Request) []result {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	out := make([]result, len(reqs))
	var wg sync.WaitGroup
	for i, r := range reqs {
		ch, err := e.Submit(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ev := range ch {
				if ev.Err != nil {
					t.Errorf("request %d: %v", i, ev.Err)
				}
				if ev.Done {
					out[i].finish = ev.Finish
					continue
				}
				out[i].ids = append(out[i].ids, ev.Token.ID)
				out[i].depths = append(out[i].depths, ev.Token.Depth)
			}
		}()
	}
	wg.Wait()
	return out
}

// TestBatchedMatchesGolden runs the same 24 continuations as concurrent requests through the
// batching loop: batching must not change any token.
func TestBatchedMatchesGolden(t *testing.T) {
	n := 0
	defer func() {
		if n != 24 {
			t.Errorf("checked %d continuations, want 24", n)
		}
	}()
	for _, name := range goldenModels {
		m, g := loadGolden(t, name)
		for _, kv := range []engine.KVPolicy{engine.KVFull} {
			// Small prefill chunks: chunking must not change any token either.
			e := newEngine(t, m, engine.Options{MaxBatch: 5, KVPolicy: kv, PrefillChunk: 7})
			var reqs []engine.Request
			var wants []goldenRun
			for k, p := range g.json.Prompts {
				for _, mode := range goldenModes {
					reqs = append(reqs, engine.Request{ID: fmt.Sprint(k, mode), Prompt: g.ids(t, k), MaxTokens: 12, IgnoreEOS: true,
						Exit: goldenExit(mode, m.Config.TotalUTSteps)})
					wants = append(wants, p.Generate[mode])
				}
			}
			res := runBatched(t, e, reqs)
			for i, r := range res {
				if diff := cmp.Diff(r.ids, wants[i].IDs); diff != "" {
					t.Errorf("%s %s ids (-got +want):\n%s", name, reqs[i].ID, diff)
				}
				if diff := cmp.Diff(r.depths, wants[i].Depths); diff != "" {
					t.Errorf("%s %s depths (-got +want):\n%s", name, reqs[i].ID, diff)
				}
				n++
				if r.finish != "length" {
					t.Errorf("%s %s finish %q, want length", name, reqs[i].ID, r.finish)
				}
			}
		}
	}
}
