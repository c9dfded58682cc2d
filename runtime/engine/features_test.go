package engine_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/loopserve/loopserve/runtime/engine"
)

// arithPrompt is the head of a golden prompt of the trained tiny model, short to keep tests fast.
func arithPrompt(t testing.TB) []int {
	_, g := loadGolden(t, "ouro-tiny-arith")
	return g.ids(t, 1)[:14]
}

func TestFastEqualsExactAtFullDepth(t *testing.T) {
	m := loadModel(t, "ouro-tiny-arith")
	prompt := arithPrompt(t)
	R := m.Config.TotalUTSteps
	for _, kv := range []engine.KVPolicy{engine.KVFull, engine.KVLast} {
		for _, ex := range []engine.Exit{{Threshold: 1}, {ForceDepth: R}} {
			t.Run(fmt.Sprintf("%v/%+v", kv, ex), func(t *testing.T) {
				req := engine.Request{Prompt: prompt, MaxTokens: 10, IgnoreEOS: true, Exit: ex}
				wantIDs, wantDepths := generate(t, newEngine(t, m, engine.Options{Mode: engine.Exact, KVPolicy: kv}), req)
				fast := newEngine(t, m, engine.Options{Mode: engine.Fast, KVPolicy: kv})
				ids, depths := generate(t, fast, req)
				if diff := cmp.Diff(ids, wantIDs); diff != "" {
					t.Errorf("ids (-fast +exact):\n%s", diff)
				}
				if diff := cmp.Diff(depths, wantDepths); diff != "" {
					t.Errorf("depths (-fast +exact):\n%s", diff)
				}
				st := fast.Stats()
				if st.LoopSteps != uint64(R)*st.DecodeTokens {
					t.Errorf("loop steps %d for %d decode tokens, want %d each", st.LoopSteps, st.DecodeTokens, R)
				}
			})
		}
	}
}

// TestDepthCompactionSavesSteps runs 8 requests in one batch in Fast mode with a low threshold:
// the loop steps executed per decode token must equal the mean chosen depth, below R.
func TestDepthCompactionSavesSteps(t *testing.T) {
	m, g := loadGolden(t, "ouro-tiny-arith")
	R := m.Config.TotalUTSteps
	for _, kv := range []engine.KVPolicy{engine.KVFull, engine.KVLast} {
		e := newEngine(t, m, engine.Options{Mode: engine.Fast, KVPolicy: kv, MaxBatch: 8, Threshold: 0.5})
		var reqs []engine.Request
		for i := 0; i < 8; i++ {
			p := g.ids(t, i%len(g.json.Prompts))
			reqs = append(reqs, engine.Request{ID: fmt.Sprint(i), Prompt: p[max(0, len(p)-6-i):], MaxTokens: 8, IgnoreEOS: true})
		}
		res := runBatched(t, e, reqs)
		var depthSum, n int
		for _, r := range res {
			for _, d := range r.depths[1:] { // the first token comes from the prefill
				depthSum += d
				n++
			}
		}
		st := e.Stats()
		if st.DecodeTokens != uint64(n) || st.LoopSteps != uint64(depthSum) || st.DecodeDepth != uint64(depthSum) {
			t.Errorf("%v: stats %+v; want %d decode tokens costing %d loop steps", kv, st, n, depthSum)
		}
		mean := float64(st.LoopSteps) / float64(st.DecodeTokens)
		if mean >= float64(R) || mean < 1 {
			t.Errorf("%v: %.2f loop steps per token, want fewer than %d", kv, mean, R)
		}
		if st.BatchRows/st.Iterations < 2 {
			t.Errorf("%v: %d rows over %d iterations: requests were not batched", kv, st.BatchRows, st.Iterations)
		}
		t.Logf("%v: %d decode tokens, %.3f loop steps per token (R=%d), mean batch rows %.1f", kv, n, mean, R, float64(st.BatchRows)/float64(st.Iterations))
	}
}

// TestBatchingIsDeterministic samples with temperature in Fast mode with probes: a request's
// output alone equals its output among seven others.
func TestBatchingIsDeterministic(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	opts := engine.Options{Mode: engine.Fast, KVPolicy: engine.KVLast, MaxBatch: 8, Threshold: 0.7, ProbeFraction: 0.3}
	var reqs []engine.Request
	for i := 0; i < 8; i++ {
		reqs = append(reqs, engine.Request{ID: fmt.Sprint("req-", i), Prompt: []int{1, 50 + i, 60, 70 + 3*i, 80}, MaxTokens: 6 + i,
			IgnoreEOS: true, Sampling: engine.Sampling{Temperature: 0.8, TopK: 50, TopP: 0.95}})
	}
	batched := runBatched(t, newEngine(t, m, opts), reqs)
	for i, r := range reqs {
		if i%3 != 0 {
			continue // a sample keeps the test fast
		}
		alone := runBatched(t, newEngine(t, m, opts), []engine.Request{r})
		if diff := cmp.Diff(batched[i], alone[0], cmp.AllowUnexported(result{})); diff != "" {
			t.Errorf("request %d (-batched +alone):\n%s", i, diff)
		}
	}
}

// TestProbesDoNotChangeOutput: probes run every step and report agreement, but the tokens and
// depths are those of the same request without probes.
func TestProbesDoNotChangeOutput(t *testing.T) {
	m := loadModel(t, "ouro-tiny-arith")
	R := m.Config.TotalUTSteps
	req := engine.Request{ID: "p", Prompt: arithPrompt(t), MaxTokens: 10, IgnoreEOS: true, Exit: engine.Exit{Threshold: 0.6}}
	for _, cfg := range []struct {
		kv   engine.KVPolicy
		half bool
	}{{engine.KVFull, false}, {engine.KVLast, false}, {engine.KVLast, true}, {engine.KVFull, true}} {
		kv := cfg.kv
		wantIDs, wantDepths := generate(t, newEngine(t, m, engine.Options{Mode: engine.Fast, KVPolicy: kv, KVBF16: cfg.half}), req)
		e := newEngine(t, m, engine.Options{Mode: engine.Fast, KVPolicy: kv, ProbeFraction: 1, KVBF16: cfg.half})
		var ids, depths, probes int
		var gotIDs, gotDepths []int
		_, err := e.Generate(context.Background(), req, func(tok engine.Token) bool {
			gotIDs = append(gotIDs, tok.ID)
			gotDepths = append(gotDepths, tok.Depth)
			if tok.Probe {
				probes++
				if len(tok.Agree) != R || len(tok.Cum) != R || !tok.Agree[R-1] {
					t.Errorf("probe token: agree %v cum %v", tok.Agree, tok.Cum)
				}
			}
			ids++
			depths += tok.Depth
			return true
		})
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(gotIDs, wantIDs); diff != "" {
			t.Errorf("%v ids (-probed +plain):\n%s", kv, diff)
		}
		if diff := cmp.Diff(gotDepths, wantDepths); diff != "" {
			t.Errorf("%v depths (-probed +plain):\n%s", kv, diff)
		}
		if probes != ids-1 {
			t.Errorf("%v: %d probes among %d tokens, want every decode token", kv, probes, ids)
		}
		if st := e.Stats(); st.LoopSteps != uint64(R)*st.DecodeTokens {
			t.Errorf("%v: probes ran %d loop steps for %d tokens", kv, st.LoopSteps, st.DecodeTokens)
		}
	}
}

func TestSpeculativeEqualsFullDepthGreedy(t *testing.T) {
	for _, name := range goldenModels {
		m, g := loadGolden(t, name)
		R := m.Config.TotalUTSteps
		for k := range g.json.Prompts {
			want := g.json.Prompts[k].Generate["full"].IDs
			modes := []engine.Mode{engine.Fast}
			if k == 0 {
				modes = append(modes, engine.Exact)
			}
			for _, mode := range modes {
				e := newEngine(t, m, engine.Options{Mode: mode})
				ids, depths := generate(t, e, engine.Request{Prompt: g.ids(t, k), MaxTokens: len(want), IgnoreEOS: true,
					Speculative: engine.Speculative{Draft: 4, DraftDepth: 1}})
				if diff := cmp.Diff(ids, want); diff != "" {
					t.Errorf("%s p%d %v (-speculative +greedy):\n%s", name, k, mode, diff)
				}
				for _, d := range depths {
					if d != R {
						t.Errorf("%s p%d: depth %d, want %d", name, k, d, R)
					}
				}
				st := e.Stats()
				if st.DraftTokens == 0 {
					t.Errorf("%s p%d: no drafts", name, k)
				}
				if name == "ouro-tiny-arith" && k == 0 && mode == engine.Fast {
					t.Logf("%s p%d: %d drafts, %d accepted", name, k, st.DraftTokens, st.AcceptedDrafts)
				}
			}
		}
	}
}

// TestSpeculativeBatched runs speculative requests through the batching loop beside plain
// ones: each still equals full-depth greedy decoding.
func TestSpeculativeBatched(t *testing.T) {
	m, g := loadGolden(t, "ouro-tiny-arith")
	e := newEngine(t, m, engine.Options{Mode: engine.Fast, MaxBatch: 8, Threshold: 0.5})
	var reqs []engine.Request
	prompts := g.json.Prompts[:2] // two keep the test fast; the sequential test covers the rest
	for k := range prompts {
		reqs = append(reqs,
			engine.Request{ID: fmt.Sprint("s", k), Prompt: g.ids(t, k), MaxTokens: 12, IgnoreEOS: true, Speculative: engine.Speculative{Draft: 3, DraftDepth: 2}},
			engine.Request{ID: fmt.Sprint("p", k), Prompt: g.ids(t, k), MaxTokens: 5, IgnoreEOS: true})
	}
	res := runBatched(t, e, reqs)
	for k := range prompts {
		if diff := cmp.Diff(res[2*k].ids, g.json.Prompts[k].Generate["full"].IDs); diff != "" {
			t.Errorf("p%d (-speculative +greedy):\n%s", k, diff)
		}
	}
	if st := e.Stats(); st.DraftTokens == 0 || st.AcceptedDrafts == 0 {
		t.Errorf("stats %+v: no drafts accepted", st)
	}
}

func TestSamplingSeeds(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	e := newEngine(t, m, engine.Options{})
	prompt := []int{1, 100, 200, 300}
	greedy, _ := generate(t, e, engine.Request{Prompt: prompt, MaxTokens: 12, IgnoreEOS: true})
	gen := func(s engine.Sampling, id string) []int {
		ids, _ := generate(t, e, engine.Request{ID: id, Prompt: prompt, MaxTokens: 12, IgnoreEOS: true, Sampling: s})
		return ids
	}
	hot := engine.Sampling{Temperature: 1.5, Seed: 7}
	if diff := cmp.Diff(gen(hot, ""), gen(hot, "")); diff != "" {
		t.Errorf("same seed, different output:\n%s", diff)
	}
	if cmp.Equal(gen(hot, ""), gen(engine.Sampling{Temperature: 1.5, Seed: 8}, "")) {
		t.Error("seeds 7 and 8 gave the same 12 tokens at temperature 1.5")
	}
	if diff := cmp.Diff(gen(engine.Sampling{Temperature: 1.5}, "a"), gen(engine.Sampling{Temperature: 1.5}, "a")); diff != "" {
		t.Errorf("same id, different output:\n%s", diff)
	}
	for _, s := range []engine.Sampling{{Temperature: 2, TopK: 1, Seed: 3}, {Temperature: 2, TopP: 1e-6, Seed: 3}, {Temperature: 1e-4, Seed: 3}} {
		if diff := cmp.Diff(gen(s, ""), greedy); diff != "" {
			t.Errorf("%+v should be greedy (-got +want):\n%s", s, diff)
		}
	}
	// Top-k 3 only ever picks among each step's 3 best: check against the exact trace.
	ids := gen(engine.Sampling{Temperature: 5, TopK: 3, Seed: 11}, "")
	seq := append([]int(nil), prompt...)
	for _, id := range ids {
		tr, err := engine.Forward(context.Background(), m, cpuBackend(), seq)
		if err != nil {
			t.Fatal(err)
		}
		V, S := tr.Vocab, tr.Len
		logits := tr.StepLogits[(tr.Steps-1)*S*V+(S-1)*V : (tr.Steps-1)*S*V+S*V]
		higher := 0
		for _, v := range logits {
			if v > logits[id] {
				higher++
			}
		}
		if higher >= 3 {
			t.Errorf("top-k 3 picked token %d with %d better tokens", id, higher)
		}
		seq = append(seq, id)
	}
}

func TestStops(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	decode := func(ids []int) string {
		var b strings.Builder
		for _, id := range ids {
			fmt.Fprintf(&b, "<%d>", id)
		}
		return b.String()
	}
	e := newEngine(t, m, engine.Options{Decode: decode})
	prompt := []int{1, 100, 200, 300}
	all, _ := generate(t, e, engine.Request{Prompt: prompt, MaxTokens: 12, IgnoreEOS: true})
	run := func(r engine.Request) ([]int, string) {
		var ids []int
		finish, err := e.Generate(context.Background(), r, func(tok engine.Token) bool { ids = append(ids, tok.ID); return true })
		if err != nil {
			t.Fatal(err)
		}
		return ids, finish
	}
	for _, tc := range []struct {
		name   string
		req    engine.Request
		want   []int
		finish string
	}{
		{"max tokens", engine.Request{Prompt: prompt, MaxTokens: 3, IgnoreEOS: true}, all[:3], "length"},
		{"stop token", engine.Request{Prompt: prompt, MaxTokens: 12, IgnoreEOS: true, StopTokens: []int{all[4]}}, all[:firstIndex(all, all[4])+1], "stop"},
		{"stop string", engine.Request{Prompt: prompt, MaxTokens: 12, IgnoreEOS: true, StopStrings: []string{decode(all[2:4])}}, all[:4], "stop"},
		{"context", engine.Request{Prompt: append(make([]int, 506), prompt...), MaxTokens: 12, IgnoreEOS: true}, nil, "length"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ids, finish := run(tc.req)
			if tc.want != nil {
				if diff := cmp.Diff(ids, tc.want); diff != "" {
					t.Errorf("ids (-got +want):\n%s", diff)
				}
			} else if len(ids) != 512-len(tc.req.Prompt)+1 {
				t.Errorf("%d tokens before the context of 512 ended", len(ids))
			}
			if finish != tc.finish {
				t.Errorf("finish %q, want %q", finish, tc.finish)
			}
		})
	}
}

func firstIndex(s []int, v int) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

func TestInvalidRequests(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	e := newEngine(t, m, engine.Options{})
	ok := engine.Request{Prompt: []int{1, 2}, MaxTokens: 2}
	for _, tc := range []struct {
		name string
		edit func(*engine.Request)
	}{
		{"empty prompt", func(r *engine.Request) { r.Prompt = nil }},
		{"prompt longer than context", func(r *engine.Request) { r.Prompt = make([]int, 600) }},
		{"max tokens", func(r *engine.Request) { r.MaxTokens = 0 }},
		{"token id", func(r *engine.Request) { r.Prompt = []int{1, 5000} }},
		{"temperature", func(r *engine.Request) { r.Sampling.Temperature = -1 }},
		{"top p", func(r *engine.Request) { r.Sampling.TopP = 2 }},
		{"threshold", func(r *engine.Request) { r.Exit.Threshold = 1.5 }},
		{"depth", func(r *engine.Request) { r.Exit.ForceDepth = 9 }},
		{"stop strings without decoder", func(r *engine.Request) { r.StopStrings = []string{"x"} }},
		{"speculative sampling", func(r *engine.Request) { r.Speculative.Draft = 2; r.Sampling.Temperature = 1 }},
	} {
		r := ok
		tc.edit(&r)
		if _, err := e.Submit(context.Background(), r); !errors.Is(err, engine.ErrInvalidRequest) {
			t.Errorf("%s: Submit error %v, want ErrInvalidRequest", tc.name, err)
		}
		if _, err := e.Generate(context.Background(), r, func(engine.Token) bool { return true }); !errors.Is(err, engine.ErrInvalidRequest) {
			t.Errorf("%s: Generate error %v, want ErrInvalidRequest", tc.name, err)
		}
	}
}

func TestCancelAndStop(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	e := newEngine(t, m, engine.Options{MaxBatch: 2, MaxContext: 1 << 16}) // long enough never to finish by itself
	runCtx, stopRun := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- e.Run(runCtx) }()
	// A cancelled request leaves at a token boundary.
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := e.Submit(ctx, engine.Request{Prompt: []int{1, 5, 6}, MaxTokens: 1 << 20, IgnoreEOS: true})
	if err != nil {
		t.Fatal(err)
	}
	<-ch // one token arrived: it is running
	cancel()
	for range ch {
	}
	waitFor(t, func() bool { st := e.Stats(); return st.Finished == 1 })
	// A long request still running when Run ends gets Done with ErrStopped.
	ch2, err := e.Submit(context.Background(), engine.Request{Prompt: []int{1, 5, 6}, MaxTokens: 1 << 20, IgnoreEOS: true})
	if err != nil {
		t.Fatal(err)
	}
	<-ch2
	stopRun()
	var last engine.Event
	for ev := range ch2 {
		last = ev
	}
	if !last.Done || !errors.Is(last.Err, engine.ErrStopped) {
		t.Errorf("last event %+v, want Done with ErrStopped", last)
	}
	if err := <-ran; err != nil {
		t.Fatal(err)
	}
	if _, err := e.Submit(context.Background(), engine.Request{Prompt: []int{1}, MaxTokens: 1}); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Submit after Run: %v, want ErrClosed", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestDeadlineLowersDepth(t *testing.T) {
	m := loadModel(t, "ouro-tiny-arith")
	e := newEngine(t, m, engine.Options{Mode: engine.Fast})
	_, depths := generate(t, e, engine.Request{Prompt: arithPrompt(t), MaxTokens: 6, IgnoreEOS: true,
		Exit: engine.Exit{Threshold: 1}, Deadline: time.Now().Add(-time.Second)})
	if diff := cmp.Diff(depths, []int{1, 1, 1, 1, 1, 1}); diff != "" {
		t.Errorf("depths past the deadline (-got +want):\n%s", diff)
	}
	_, depths = generate(t, e, engine.Request{Prompt: arithPrompt(t), MaxTokens: 3, IgnoreEOS: true,
		Exit: engine.Exit{Threshold: 1}, Deadline: time.Now().Add(time.Hour)})
	if diff := cmp.Diff(depths, []int{4, 4, 4}); diff != "" {
		t.Errorf("depths with time to spare (-got +want):\n%s", diff)
	}
}

func TestThreshold(t *testing.T) {
	m := loadModel(t, "ouro-tiny-arith")
	e := newEngine(t, m, engine.Options{Mode: engine.Fast})
	if got := e.Threshold(); got != 1 {
		t.Errorf("default threshold %g, want the config's 1", got)
	}
	_, deep := generate(t, e, engine.Request{Prompt: arithPrompt(t), MaxTokens: 6, IgnoreEOS: true})
	e.SetThreshold(0.3)
	_, shallow := generate(t, e, engine.Request{Prompt: arithPrompt(t), MaxTokens: 6, IgnoreEOS: true})
	if sum(shallow) >= sum(deep) {
		t.Errorf("depths at τ=0.3 %v not below τ=1 %v", shallow, deep)
	}
}

func sum(xs []int) int {
	s := 0
	for _, x := range xs {
		s += x
	}
	return s
}

// TestKVBudget: a prompt the KV budget cannot hold fails with ErrKVFull; a generation that
// outgrows it alone fails with ErrKVFull too (never a silent "length"). The budget holds 48
// positions: three 16-position blocks.
func TestKVBudget(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	c := m.Config
	perPos := int64(c.TotalUTSteps*c.NumHiddenLayers) * 2 * int64(c.KVDim()) * 4
	e := newEngine(t, m, engine.Options{MaxKVBytes: 48 * perPos})
	_, err := e.Generate(context.Background(), engine.Request{Prompt: make([]int, 50), MaxTokens: 2}, func(engine.Token) bool { return true })
	if !errors.Is(err, engine.ErrKVFull) {
		t.Errorf("50-token prompt in a 48-position budget: %v, want ErrKVFull", err)
	}
	var n int
	finish, err := e.Generate(context.Background(), engine.Request{Prompt: make([]int, 30), MaxTokens: 100, IgnoreEOS: true},
		func(engine.Token) bool { n++; return true })
	if !errors.Is(err, engine.ErrKVFull) || finish != "" || n != 19 {
		t.Errorf("30-token prompt: %d tokens, finish %q, err %v; want 19 tokens (positions 30..47 and one more), then ErrKVFull", n, finish, err)
	}
	if b := e.KVBytes(); b != 0 {
		t.Errorf("%d KV bytes held after the failed generation", b)
	}
}

// TestKVBudgetQueues: through Run, a prompt that fits the budget only once another request
// finishes waits for it instead of failing.
func TestKVBudgetQueues(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	c := m.Config
	perPos := int64(c.TotalUTSteps*c.NumHiddenLayers) * 2 * int64(c.KVDim()) * 4
	e := newEngine(t, m, engine.Options{MaxKVBytes: 40 * perPos})
	res := runBatched(t, e, []engine.Request{
		{ID: "a", Prompt: make([]int, 25), MaxTokens: 5, IgnoreEOS: true},
		{ID: "b", Prompt: make([]int, 25), MaxTokens: 5, IgnoreEOS: true},
	})
	for i, r := range res {
		if len(r.ids) != 5 || r.finish != "length" {
			t.Errorf("request %d: %d tokens, finish %q", i, len(r.ids), r.finish)
		}
	}
}

// TestSubmitCancelStress submits requests from many goroutines, cancelling some mid-way, with
// consumers that stop reading: every channel closes, and every admitted request finishes.
func TestSubmitCancelStress(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	e := newEngine(t, m, engine.Options{Mode: engine.Fast, MaxBatch: 4, Threshold: 0.6, ProbeFraction: 0.2})
	runCtx, stop := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- e.Run(runCtx) }()
	var wg sync.WaitGroup
	for i := 0; i < 24; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			ch, err := e.Submit(ctx, engine.Request{ID: fmt.Sprint(i), Prompt: []int{1, 10 + i, 20}, MaxTokens: 5 + i%7, IgnoreEOS: true,
				Sampling: engine.Sampling{Temperature: 0.9}})
			if err != nil {
				t.Error(err)
				return
			}
			n := 0
			for ev := range ch {
				n++
				if ev.Done {
					if ev.Err == nil && ev.Finish != "length" {
						t.Errorf("request %d: finish %q", i, ev.Finish)
					}
					continue
				}
				if i%3 == 0 && n == 2 {
					cancel() // leave early; the channel still closes
				}
			}
		}()
	}
	wg.Wait()
	waitFor(t, func() bool { st := e.Stats(); return st.Requests == 24 && st.Finished == 24 })
	if b := e.KVBytes(); b != 0 {
		t.Errorf("%d KV bytes still held after every request finished", b)
	}
	waitFor(t, func() bool { r, q := e.Occupancy(); return r == 0 && q == 0 })
	stop()
	if err := <-ran; err != nil {
		t.Fatal(err)
	}
}

// TestGenerateCancelReleasesKV: a Generate cut short by its context frees its cache.
func TestGenerateCancelReleasesKV(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	e := newEngine(t, m, engine.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	n := 0
	_, err := e.Generate(ctx, engine.Request{Prompt: []int{1, 2, 3}, MaxTokens: 50, IgnoreEOS: true}, func(engine.Token) bool {
		if n++; n == 3 {
			cancel()
		}
		return true
	})
	if !errors.Is(err, context.Canceled) || n != 3 {
		t.Errorf("%d tokens, error %v; want 3 and context.Canceled", n, err)
	}
	if b := e.KVBytes(); b != 0 {
		t.Errorf("%d KV bytes held after Generate returned", b)
	}
}

// TestKVBF16 stores keys and values as bfloat16: half the cache memory, and greedy output
// close to the goldens (rounded keys and values may flip a near tie, not the bulk).
func TestKVBF16(t *testing.T) {
	m, g := loadGolden(t, "ouro-tiny-arith")
	R := m.Config.TotalUTSteps
	same, total := 0, 0
	for k, p := range g.json.Prompts {
		want := p.Generate["full"].IDs
		e := newEngine(t, m, engine.Options{KVBF16: true})
		ids, _ := generate(t, e, engine.Request{Prompt: g.ids(t, k), MaxTokens: len(want), IgnoreEOS: true, Exit: engine.Exit{ForceDepth: R}})
		for i := range want {
			if ids[i] == want[i] {
				same++
			}
			total++
		}
	}
	if same < total*9/10 {
		t.Errorf("bf16 KV: %d of %d golden tokens, want at least 90%%", same, total)
	}
	t.Logf("bf16 KV: %d of %d golden full-depth tokens", same, total)
	bytes := map[bool]int64{}
	for _, half := range []bool{false, true} {
		e := newEngine(t, m, engine.Options{KVBF16: half, Mode: engine.Fast, KVPolicy: engine.KVLast})
		var held int64
		_, err := e.Generate(context.Background(), engine.Request{Prompt: g.ids(t, 0), MaxTokens: 3, IgnoreEOS: true}, func(engine.Token) bool {
			held = e.KVBytes()
			return true
		})
		if err != nil {
			t.Fatal(err)
		}
		bytes[half] = held
	}
	if bytes[false] != 2*bytes[true] || bytes[true] == 0 {
		t.Errorf("KV bytes f32 %d, bf16 %d: want 2:1", bytes[false], bytes[true])
	}
}
