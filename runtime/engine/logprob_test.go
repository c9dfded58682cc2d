package engine_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/loopserve/loopserve/runtime/engine"
)

// logSoftmax is the float64 log-softmax of one row of logits.
func logSoftmax(logits []float32) []float64 {
	mx := math.Inf(-1)
	for _, v := range logits {
		mx = math.Max(mx, float64(v))
	}
	var s float64
	for _, v := range logits {
		s += math.Exp(float64(v) - mx)
	}
	lse := mx + math.Log(s)
	out := make([]float64, len(logits))
	for i, v := range logits {
		out[i] = float64(v) - lse
	}
	return out
}

// goldenExitStep is the 0-based exit step of position i under a golden mode, from the golden
// exit distribution exitPDF [R, S].
func goldenExitStep(mode string, exitPDF []float32, R, S, i int) int {
	tau := map[string]float64{"q0.5": 0.5, "q0.9": 0.9}[mode]
	switch mode {
	case "full":
		return R - 1
	case "step0":
		return 0
	}
	var cum float64
	for t := 0; t < R; t++ {
		cum += float64(exitPDF[t*S+i])
		if cum >= tau {
			return t
		}
	}
	return R - 1
}

// submitEvents runs r through a running engine and returns its events.
func submitEvents(t *testing.T, e *engine.Engine, reqs []engine.Request) [][]engine.Event {
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
	chans := make([]<-chan engine.Event, len(reqs))
	for i, r := range reqs {
		ch, err := e.Submit(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		chans[i] = ch
	}
	out := make([][]engine.Event, len(reqs))
	for i, ch := range chans {
		for ev := range ch {
			if ev.Err != nil {
				t.Fatalf("request %d: %v", i, ev.Err)
			}
			out[i] = append(out[i], ev)
		}
	}
	return out
}

// checkScore compares a token's Logprob and Top with the log-softmax want of the logits that
// scored it.
func checkScore(t *testing.T, what string, tok engine.Token, want []float64, top int, tol float64) {
	t.Helper()
	if d := math.Abs(float64(tok.Logprob) - want[tok.ID]); d > tol {
		t.Errorf("%s: logprob of %d is %g, want %g (diff %.3g)", what, tok.ID, tok.Logprob, want[tok.ID], d)
	}
	if len(tok.Top) != top {
		t.Fatalf("%s: %d top logprobs, want %d", what, len(tok.Top), top)
	}
	order := make([]int, len(want))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		switch {
		case want[a] > want[b]:
			return -1
		case want[a] < want[b]:
			return 1
		}
		return 0
	})
	for k, lp := range tok.Top {
		if d := math.Abs(float64(lp.Logprob) - want[lp.ID]); d > tol {
			t.Errorf("%s: top %d: logprob of %d is %g, want %g", what, k, lp.ID, lp.Logprob, want[lp.ID])
		}
		// The k-th best value must match (ids may swap only within the tolerance).
		if d := math.Abs(float64(lp.Logprob) - want[order[k]]); d > tol {
			t.Errorf("%s: top %d is %d at %g, want %d at %g", what, k, lp.ID, lp.Logprob, order[k], want[order[k]])
		}
		if k > 0 && lp.Logprob > tok.Top[k-1].Logprob {
			t.Errorf("%s: top logprobs not in descending order: %+v", what, tok.Top)
		}
	}
}

// TestLogprobsMatchGolden: in Exact mode, each prompt token's log-probability (and the first
// generated token's) is the log-softmax of the golden step logits at the scoring position's
// exit step, with that step as its depth, under every golden exit mode.
func TestLogprobsMatchGolden(t *testing.T) {
	const top, tol = 5, 2e-3 // logits match the goldens within 1e-3
	for _, name := range goldenModels {
		m, g := loadGolden(t, name)
		R, V := m.Config.TotalUTSteps, m.Config.VocabSize
		e := newEngine(t, m, engine.Options{MaxBatch: 8, PrefillChunk: 5})
		var reqs []engine.Request
		type want struct {
			k    int
			mode string
		}
		var wants []want
		for k := range g.json.Prompts {
			for _, mode := range goldenModes {
				reqs = append(reqs, engine.Request{ID: fmt.Sprint(k, mode), Prompt: g.ids(t, k), MaxTokens: 2, IgnoreEOS: true,
					Exit: goldenExit(mode, R), Logprobs: true, TopLogprobs: top, PromptLogprobs: true})
				wants = append(wants, want{k, mode})
			}
		}
		for i, evs := range submitEvents(t, e, reqs) {
			k, mode := wants[i].k, wants[i].mode
			ids := g.ids(t, k)
			S := len(ids)
			logits, pdf := g.f32(t, k, "step_logits"), g.f32(t, k, "exit_pdf")
			scored := func(pos int) (int, []float64) {
				st := goldenExitStep(mode, pdf, R, S, pos)
				return st, logSoftmax(logits[(st*S+pos)*V : (st*S+pos+1)*V])
			}
			if len(evs) != 3 || !evs[2].Done {
				t.Fatalf("%s %s: %d events, want 2 tokens and Done", name, reqs[i].ID, len(evs))
			}
			prompt := evs[0].Prompt
			if len(prompt) != S {
				t.Fatalf("%s %s: %d prompt tokens, want %d", name, reqs[i].ID, len(prompt), S)
			}
			if diff := cmp.Diff(prompt[0], engine.Token{ID: ids[0]}); diff != "" {
				t.Errorf("%s %s: first prompt token (-got +want):\n%s", name, reqs[i].ID, diff)
			}
			for pos := 1; pos < S; pos++ {
				tok := prompt[pos]
				st, lp := scored(pos - 1)
				if tok.ID != ids[pos] || tok.Depth != st+1 {
					t.Errorf("%s %s: prompt token %d is %d at depth %d, want %d at depth %d", name, reqs[i].ID, pos, tok.ID, tok.Depth, ids[pos], st+1)
				}
				checkScore(t, fmt.Sprintf("%s %s prompt %d", name, reqs[i].ID, pos), tok, lp, top, tol)
			}
			first := evs[0].Token
			st, lp := scored(S - 1)
			if first.Depth != st+1 || first.ID != g.json.Prompts[k].Generate[mode].IDs[0] {
				t.Errorf("%s %s: first token %d at depth %d", name, reqs[i].ID, first.ID, first.Depth)
			}
			checkScore(t, fmt.Sprintf("%s %s first token", name, reqs[i].ID), first, lp, top, tol)
			if evs[1].Prompt != nil {
				t.Errorf("%s %s: prompt logprobs sent again on the second token", name, reqs[i].ID)
			}
		}
	}
}

// TestLogprobsOfDecodedTokens: every generated token's log-probability (sampled at a high
// temperature, so not the argmax) is the log-softmax of the raw full-depth logits of the exact
// trace of the text before it, whatever the temperature.
func TestLogprobsOfDecodedTokens(t *testing.T) {
	m, g := loadGolden(t, "ouro-tiny-arith")
	R, V := m.Config.TotalUTSteps, m.Config.VocabSize
	e := newEngine(t, m, engine.Options{})
	prompt := g.ids(t, 2)
	var toks []engine.Token
	_, err := e.Generate(context.Background(), engine.Request{ID: "d", Prompt: prompt, MaxTokens: 8, IgnoreEOS: true,
		Exit: engine.Exit{ForceDepth: R}, Sampling: engine.Sampling{Temperature: 1.5, Seed: 5}, Logprobs: true, TopLogprobs: 3},
		func(tok engine.Token) bool { toks = append(toks, tok); return true })
	if err != nil {
		t.Fatal(err)
	}
	seq := slices.Clone(prompt)
	for _, tok := range toks {
		seq = append(seq, tok.ID)
	}
	tr, err := engine.Forward(context.Background(), m, cpuBackend(), seq[:len(seq)-1])
	if err != nil {
		t.Fatal(err)
	}
	S := tr.Len
	for j, tok := range toks {
		pos := len(prompt) - 1 + j
		want := logSoftmax(tr.StepLogits[((R-1)*S+pos)*V : ((R-1)*S+pos+1)*V])
		checkScore(t, fmt.Sprintf("token %d", j), tok, want, 3, 1e-4)
	}
}

// TestLogprobsBatchInvariant: a request's log-probabilities are bit for bit the same alone,
// batched with others, prefilled in other chunk sizes, and on a second (redelivered) run.
func TestLogprobsBatchInvariant(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	for _, kv := range []engine.KVPolicy{engine.KVFull, engine.KVLast} {
		opts := engine.Options{Mode: engine.Fast, KVPolicy: kv, MaxBatch: 6, Threshold: 0.6, PrefillChunk: 4}
		var reqs []engine.Request
		for i := 0; i < 6; i++ {
			reqs = append(reqs, engine.Request{ID: fmt.Sprint("lp-", i), Prompt: []int{1, 40 + i, 77, 90 + 2*i, 13, 200, 9, 31 + i},
				MaxTokens: 5 + i, IgnoreEOS: true, Sampling: engine.Sampling{Temperature: 0.9, TopP: 0.9},
				Logprobs: true, TopLogprobs: engine.MaxTopLogprobs, PromptLogprobs: i%2 == 0})
		}
		batched := submitEvents(t, newEngine(t, m, opts), reqs)
		for i, r := range reqs {
			if i%2 != 0 {
				continue
			}
			alone := opts
			alone.PrefillChunk = 256 - 10*i
			for run := 0; run < 2; run++ {
				got := submitEvents(t, newEngine(t, m, alone), []engine.Request{r})[0]
				if diff := cmp.Diff(got, batched[i]); diff != "" {
					t.Errorf("%v request %d run %d (-alone +batched):\n%s", kv, i, run, diff)
				}
			}
			if len(batched[i][0].Prompt) != len(r.Prompt) || len(batched[i][0].Token.Top) != engine.MaxTopLogprobs {
				t.Errorf("%v request %d: %d prompt scores, %d top logprobs", kv, i, len(batched[i][0].Prompt), len(batched[i][0].Token.Top))
			}
		}
	}
}

// TestLogprobsValidated: out-of-range or inconsistent options are refused with
// ErrInvalidRequest, and nothing is reported without Logprobs.
func TestLogprobsValidated(t *testing.T) {
	m := loadModel(t, "ouro-tiny-random")
	e := newEngine(t, m, engine.Options{})
	base := engine.Request{Prompt: []int{1, 2, 3}, MaxTokens: 2}
	for _, c := range []struct {
		name string
		edit func(*engine.Request)
	}{
		{"top 21", func(r *engine.Request) { r.Logprobs, r.TopLogprobs = true, engine.MaxTopLogprobs + 1 }},
		{"top -1", func(r *engine.Request) { r.Logprobs, r.TopLogprobs = true, -1 }},
		{"top without logprobs", func(r *engine.Request) { r.TopLogprobs = 2 }},
	} {
		r := base
		c.edit(&r)
		if _, err := e.Submit(context.Background(), r); !errors.Is(err, engine.ErrInvalidRequest) {
			t.Errorf("%s: Submit error %v, want ErrInvalidRequest", c.name, err)
		}
		if _, err := e.Generate(context.Background(), r, func(engine.Token) bool { return true }); !errors.Is(err, engine.ErrInvalidRequest) {
			t.Errorf("%s: Generate error %v, want ErrInvalidRequest", c.name, err)
		}
	}
	r := base
	r.PromptLogprobs = true
	if _, err := e.Generate(context.Background(), r, func(engine.Token) bool { return true }); !errors.Is(err, engine.ErrInvalidRequest) {
		t.Errorf("Generate with prompt logprobs: %v, want ErrInvalidRequest", err)
	}
	_, err := e.Generate(context.Background(), base, func(tok engine.Token) bool {
		if tok.Logprob != 0 || tok.Top != nil {
			t.Errorf("token without Logprobs reports %g %v", tok.Logprob, tok.Top)
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
}
