package bench

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// RuntimeOptions size an engine benchmark. Zero fields take the defaults in brackets.
type RuntimeOptions struct {
	PrefillLen   int    // prompt tokens timed for prefill [128]
	PromptLen    int    // prompt tokens of each decoding sequence [16]
	DecodeTokens int    // tokens generated per sequence, the first (from prefill) untimed [32]
	Batch        int    // sequences decoding together for the batched figure [8]
	Repeats      int    // best of this many runs of each measurement [1]
	Seed         uint64 // prompt seed [1]
	// Threshold τ > 0 adds adaptive-depth decode figures: the same prompts decoded again with
	// per-token early exit at Exit.Threshold τ (the engine runs in Fast mode, so a token that
	// exits at step d costs d loop steps). 0 measures full depth only.
	Threshold float64
	// Probe, when set, adds the paired bandwidth fractions: after the batch-1 decode the same
	// prompt is decoded again by PairedDecode, streaming a token's weight bytes through Probe
	// after each token.
	Probe *Probe
}

func (o *RuntimeOptions) defaults() {
	if o.PrefillLen <= 0 {
		o.PrefillLen = 128
	}
	if o.PromptLen <= 0 {
		o.PromptLen = 16
	}
	if o.DecodeTokens <= 0 {
		o.DecodeTokens = 32
	}
	if o.Batch <= 0 {
		o.Batch = 8
	}
	if o.Repeats <= 0 {
		o.Repeats = 1
	}
	if o.Seed == 0 {
		o.Seed = 1
	}
}

// Prompts are the prompts of o for a model with vocab entries; the peer gets the same ones.
func (o RuntimeOptions) Prompts(vocab int) (prefill []int, decode [][]int) {
	o.defaults()
	return Prompts(vocab, o.PrefillLen, o.PromptLen, o.Batch, o.Seed)
}

// RuntimeResult holds the engine's rates. Every token of the plain figures runs all R loop
// steps (full depth), as the peer's do. The adaptive figures (zero unless
// RuntimeOptions.Threshold > 0) are a different computation: tokens exit early, so they cost
// fewer loop steps and may differ from the full-depth tokens.
type RuntimeResult struct {
	PrefillTokens    int     `json:"prefill_tokens"`
	PrefillTokS      float64 `json:"prefill_tok_s"`
	DecodeTokens     int     `json:"decode_tokens"` // timed tokens per sequence
	DecodeTokSB1     float64 `json:"decode_tok_s_b1"`
	Batch            int     `json:"batch"`
	DecodeTokSBN     float64 `json:"decode_tok_s_bn"`
	LoopStepsPerTok  float64 `json:"loop_steps_per_token"` // mean depth of the batch-1 tokens
	WeightBytesPerTk int64   `json:"weight_bytes_per_token"`

	DecodeTokSB1Adaptive float64 `json:"decode_tok_s_b1_adaptive"`
	DecodeTokSBNAdaptive float64 `json:"decode_tok_s_bn_adaptive"`
	// MeanDepthAdaptive is the loop steps executed per decoded token of the adaptive batch-1
	// run, from the engine's counters (the first token, from prefill, left out).
	MeanDepthAdaptive float64 `json:"mean_depth_adaptive"`

	// PairedFractions are PairedDecode's per-token bandwidth fractions (RuntimeOptions.Probe
	// set), every repeat's.
	PairedFractions []float64 `json:"bandwidth_fractions_paired_b1,omitempty"`
}

// WeightBytesPerToken is the weight bytes a full-depth decode step of one token reads: every
// layer matrix once per loop step, the LM head once, one embedding row. Norm vectors, the exit
// gate and the KV cache are left out (a few hundred KB at short contexts).
func WeightBytesPerToken(m *model.Model) int64 {
	size := func(w *model.Matrix) int64 {
		if w.BF16 != nil {
			return int64(len(w.BF16)) * 2
		}
		return int64(len(w.F32)) * 4
	}
	var layer int64
	for i := range m.Layers {
		L := &m.Layers[i]
		for _, w := range []*model.Matrix{&L.Q, &L.K, &L.V, &L.O, &L.Gate, &L.Up, &L.Down} {
			layer += size(w)
		}
	}
	return int64(m.Config.TotalUTSteps)*layer + size(&m.LMHead) + size(&m.Embed)/int64(max(m.Embed.Rows, 1))
}

// Runtime measures prefill and full-depth greedy decode of m with an engine on be, and with
// o.Threshold > 0 also adaptive-depth decode. It runs the engine's batching loop itself and
// stops it before returning.
func Runtime(ctx context.Context, m *model.Model, be engine.Backend, o RuntimeOptions) (RuntimeResult, error) {
	o.defaults()
	if o.DecodeTokens < 2 {
		return RuntimeResult{}, fmt.Errorf("decode tokens %d: at least 2 are needed to time one", o.DecodeTokens)
	}
	if o.Threshold < 0 || o.Threshold > 1 || math.IsNaN(o.Threshold) {
		return RuntimeResult{}, fmt.Errorf("exit threshold %g: not in [0, 1]", o.Threshold)
	}
	e, err := engine.New(m, engine.Options{Backend: be, Mode: engine.Fast, MaxBatch: o.Batch,
		MaxContext: max(o.PrefillLen, o.PromptLen+o.DecodeTokens) + 1})
	if err != nil {
		return RuntimeResult{}, err
	}
	defer e.Close()
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var runErr error
	wg.Go(func() { runErr = e.Run(runCtx) })
	defer func() {
		stop()
		wg.Wait()
	}()

	prefill, prompts := o.Prompts(m.Config.VocabSize)
	res := RuntimeResult{PrefillTokens: o.PrefillLen, DecodeTokens: o.DecodeTokens - 1, Batch: o.Batch,
		WeightBytesPerTk: WeightBytesPerToken(m)}

	// Warm-up: grows the engine's scratch buffers and faults the weights in; the batch, decoded
	// at depth 1, leaves Run's stream the KV blocks of the batched figures mapped (spare), as
	// a serving engine's are after its first requests.
	if _, err := PrefillRate(ctx, e, prefill[:min(8, len(prefill))]); err != nil {
		return RuntimeResult{}, fmt.Errorf("warm-up: %w", err)
	}
	if _, err := DecodeRateExit(ctx, e, prompts, o.DecodeTokens, engine.Exit{ForceDepth: 1}); err != nil {
		return RuntimeResult{}, fmt.Errorf("warm-up: %w", err)
	}
	for range o.Repeats {
		rate, err := PrefillRate(ctx, e, prefill)
		if err != nil {
			return RuntimeResult{}, err
		}
		res.PrefillTokS = max(res.PrefillTokS, rate)

		before := e.Stats()
		if rate, err = DecodeRate(ctx, e, prompts[:1], o.DecodeTokens); err != nil {
			return RuntimeResult{}, err
		}
		res.DecodeTokSB1 = max(res.DecodeTokSB1, rate)
		after := e.Stats()
		if dt := after.Tokens - before.Tokens; dt > 0 {
			res.LoopStepsPerTok = float64(after.ChosenDepth-before.ChosenDepth) / float64(dt)
		}
		if o.Probe != nil {
			f, err := PairedDecode(ctx, e, prompts[0], o.DecodeTokens, res.WeightBytesPerTk, o.Probe)
			if err != nil {
				return RuntimeResult{}, err
			}
			res.PairedFractions = append(res.PairedFractions, f...)
		}

		if rate, err = DecodeRate(ctx, e, prompts, o.DecodeTokens); err != nil {
			return RuntimeResult{}, err
		}
		res.DecodeTokSBN = max(res.DecodeTokSBN, rate)

		if o.Threshold > 0 {
			exit := engine.Exit{Threshold: o.Threshold}
			before := e.Stats()
			if rate, err = DecodeRateExit(ctx, e, prompts[:1], o.DecodeTokens, exit); err != nil {
				return RuntimeResult{}, fmt.Errorf("adaptive: %w", err)
			}
			res.DecodeTokSB1Adaptive = max(res.DecodeTokSB1Adaptive, rate)
			after := e.Stats()
			if dt := after.DecodeTokens - before.DecodeTokens; dt > 0 {
				res.MeanDepthAdaptive = float64(after.LoopSteps-before.LoopSteps) / float64(dt)
			}
			if rate, err = DecodeRateExit(ctx, e, prompts, o.DecodeTokens, exit); err != nil {
				return RuntimeResult{}, fmt.Errorf("adaptive: %w", err)
			}
			res.DecodeTokSBNAdaptive = max(res.DecodeTokSBNAdaptive, rate)
		}
	}
	stop()
	wg.Wait()
	if runErr != nil {
		return RuntimeResult{}, fmt.Errorf("engine run: %w", runErr)
	}
	return res, nil
}

// PairedDecode decodes prompt at batch 1 and full depth, tokens tokens, and after each one
// (the engine paused in Generate's callback, which runs on this goroutine) streams as many
// bytes through probe as a token reads of weights, bytesPerToken. It returns, for each token
// after the first (which also ran the prompt), the weight bytes it read per second over the
// mean bandwidth of the probe passes just before and just after it: the bandwidth fraction of
// decode measured within a fraction of a second of each token. The best decode rate of a run
// over its best bandwidth pass compares moments seconds apart, on a host whose bandwidth swings
// by half within seconds (see the README's runtime figures).
func PairedDecode(ctx context.Context, e *engine.Engine, prompt []int, tokens int, bytesPerToken int64, probe *Probe) ([]float64, error) {
	if tokens < 2 || bytesPerToken <= 0 {
		return nil, fmt.Errorf("paired decode: %d tokens of %d bytes: want at least 2 of a positive size", tokens, bytesPerToken)
	}
	var fractions []float64
	var last time.Time
	var before float64 // the probe's bytes/s after the previous token
	n := 0
	_, err := e.Generate(ctx, request("paired-b1", prompt, tokens, fullDepth(e)), func(engine.Token) bool {
		took := time.Since(last)
		read, d := probe.Stream(bytesPerToken)
		after := float64(read) / d.Seconds()
		if n > 0 {
			fractions = append(fractions, float64(bytesPerToken)/took.Seconds()/((before+after)/2))
		}
		before = after
		n++
		last = time.Now()
		return true
	})
	if err != nil {
		return nil, fmt.Errorf("paired decode: %w", err)
	}
	if n != tokens {
		return nil, fmt.Errorf("paired decode: %d tokens, want %d", n, tokens)
	}
	return fractions, nil
}

// Median is the middle value of xs (the mean of the two middle ones for an even count), or 0
// for none. xs is not changed.
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(xs))
	if h := len(s) / 2; len(s)%2 == 0 {
		return (s[h-1] + s[h]) / 2
	}
	return s[len(s)/2]
}

// errNoOverlap reports a batched run in which the sequences never all decoded at once.
var errNoOverlap = errors.New("no interval where every sequence was decoding")

// request is a greedy request that ignores eos, so it yields exactly n tokens, each as deep as
// exit lets it run.
func request(id string, prompt []int, n int, exit engine.Exit) engine.Request {
	return engine.Request{ID: id, Prompt: prompt, MaxTokens: n, IgnoreEOS: true, Exit: exit}
}

// fullDepth runs every token through all of e's loop steps, as the peer does.
func fullDepth(e *engine.Engine) engine.Exit {
	return engine.Exit{ForceDepth: e.Config().TotalUTSteps}
}

// PrefillRate returns prompt tokens per second to the first token of prompt (every loop step
// for every position, then the LM head of the last), run with e.Generate.
func PrefillRate(ctx context.Context, e *engine.Engine, prompt []int) (float64, error) {
	start := time.Now()
	if _, err := e.Generate(ctx, request("prefill", prompt, 1, fullDepth(e)), func(engine.Token) bool { return true }); err != nil {
		return 0, fmt.Errorf("prefill: %w", err)
	}
	return float64(len(prompt)) / time.Since(start).Seconds(), nil
}

// DecodeRate returns full-depth greedy decode tokens per second over prompts decoded together,
// tokens per sequence, the first of each (from prefill) untimed. One prompt runs with
// e.Generate; several are submitted at once, so e.Run must be running with MaxBatch ≥
// len(prompts).
func DecodeRate(ctx context.Context, e *engine.Engine, prompts [][]int, tokens int) (float64, error) {
	return DecodeRateExit(ctx, e, prompts, tokens, fullDepth(e))
}

// DecodeRateExit is DecodeRate with each token's depth set by exit instead of full depth: with
// a Threshold on an engine in Fast mode, tokens exit early and cost fewer loop steps.
func DecodeRateExit(ctx context.Context, e *engine.Engine, prompts [][]int, tokens int, exit engine.Exit) (float64, error) {
	if tokens < 2 || len(prompts) == 0 {
		return 0, fmt.Errorf("decode: %d prompts, %d tokens: want at least 1 and 2", len(prompts), tokens)
	}
	if len(prompts) > 1 {
		// The engine admits requests at token boundaries; on a busy machine this goroutine can
		// be descheduled between Submits long enough for the first sequences to finish before
		// the last starts. Such a run has no all-decoding interval: run again. On a tiny model
		// (a sequence in a millisecond, its tokens timed as its events reach this process) the
		// runs may never overlap: the best whole-run rate stands in then.
		var best float64
		for range 20 {
			rate, err := batchRate(ctx, e, prompts, tokens, exit)
			if !errors.Is(err, errNoOverlap) {
				return rate, err
			}
			best = max(best, rate)
		}
		return best, nil
	}
	var first time.Time
	n := 0
	if _, err := e.Generate(ctx, request("decode-b1", prompts[0], tokens, exit), func(engine.Token) bool {
		if n == 0 {
			first = time.Now()
		}
		n++
		return true
	}); err != nil {
		return 0, fmt.Errorf("decode at batch 1: %w", err)
	}
	if n != tokens {
		return 0, fmt.Errorf("decode at batch 1: %d tokens, want %d", n, tokens)
	}
	return float64(n-1) / time.Since(first).Seconds(), nil
}

// batchRate submits the prompts at once to the running engine and returns the tokens
// per second generated while all of them were decoding: from the last sequence's first token
// (its prefill done) to the first sequence's last token.
func batchRate(ctx context.Context, e *engine.Engine, prompts [][]int, tokens int, exit engine.Exit) (float64, error) {
	batch := len(prompts)
	times := make([][]time.Time, batch) // [batch][tokens] arrival times
	errs := make([]error, batch)
	chans := make([]<-chan engine.Event, batch)
	for i := range chans {
		ch, err := e.Submit(ctx, request(fmt.Sprintf("decode-b%d-%d", batch, i), prompts[i], tokens, exit))
		if err != nil {
			return 0, fmt.Errorf("decode at batch %d: %w", batch, err)
		}
		chans[i] = ch
	}
	var wg sync.WaitGroup
	for i, ch := range chans {
		wg.Go(func() {
			for ev := range ch {
				switch {
				case ev.Err != nil:
					errs[i] = ev.Err
				case !ev.Done:
					times[i] = append(times[i], time.Now())
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return 0, fmt.Errorf("decode at batch %d: %w", batch, err)
	}
	var from, to time.Time
	last := 0 // the sequence whose first token came last
	for i, ts := range times {
		if len(ts) != tokens {
			return 0, fmt.Errorf("decode at batch %d: sequence %d yielded %d tokens, want %d", batch, i, len(ts), tokens)
		}
		if ts[0].After(from) {
			from, last = ts[0], i
		}
		if to.IsZero() || ts[len(ts)-1].Before(to) {
			to = ts[len(ts)-1]
		}
	}
	// Tokens of one iteration arrive microseconds apart, iterations milliseconds apart: shift
	// the window by half an iteration so it holds whole iterations (from, to].
	gaps := make([]time.Duration, 0, tokens)
	for j := 1; j < len(times[last]); j++ {
		gaps = append(gaps, times[last][j].Sub(times[last][j-1]))
	}
	slices.Sort(gaps)
	half := gaps[len(gaps)/2] / 2
	counted := 0
	for _, ts := range times {
		for _, t := range ts {
			if t.After(from.Add(half)) && !t.After(to.Add(half)) {
				counted++
			}
		}
	}
	if counted == 0 || !to.After(from) {
		// The rate over the whole run instead: every token after each sequence's first, from
		// the earliest first token to the latest last one.
		var start, end time.Time
		for _, ts := range times {
			if start.IsZero() || ts[0].Before(start) {
				start = ts[0]
			}
			if ts[len(ts)-1].After(end) {
				end = ts[len(ts)-1]
			}
		}
		span := 0.0
		if end.After(start) {
			span = float64(batch*(tokens-1)) / end.Sub(start).Seconds()
		}
		return span, fmt.Errorf("decode at batch %d: %w", batch, errNoOverlap)
	}
	return float64(counted) / to.Sub(from).Seconds(), nil
}
