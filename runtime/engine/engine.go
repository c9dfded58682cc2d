// Package engine runs LoopLM (looped language model) inference: the exact and fast (early
// exit) forward passes, per-step KV caches with the full and last policies, continuous
// batching with depth compaction, sampling and self-speculative decoding.
//
// One loop step runs every decoder layer (sandwich norms, RoPE, GQA, SwiGLU) and the final
// norm; the normed state feeds the next step, the exit gate and the LM head. A token's exit
// step is the first whose cumulative exit probability reaches the threshold (or the forced or
// capped depth); its token is chosen from that step's logits.
//
// The batching loop (Run) runs one loop step per iteration over every running request, each
// at its own step: all loop steps share the layer weights, so one pass over them serves a
// token at step 0 beside another at step 3. A request has one row in flight while decoding (a
// chunk of prompt rows while prefilling); a row that exits leaves the batch at once (depth
// compaction) and its request's next token enters at step 0 in the next iteration, so early
// exits save compute and wall time at any batch size. Requests join and leave between their
// tokens. Kernels compute every row independently of the others, so a request's tokens do not
// depend on what it is batched with: the same request (and seed, or id when the seed is 0)
// gives the same tokens.
package engine

import (
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/loopserve/loopserve/runtime/model"
)

// Mode chooses whether skipped loop steps are computed.
type Mode int

const (
	// Exact computes every loop step for every token and selects the exit step's output: the
	// reference semantics (and the goldens'). It saves no compute.
	Exact Mode = iota
	// Fast stops a token at its exit step: skipped steps are never computed.
	Fast
)

// String returns "exact" or "fast".
func (m Mode) String() string {
	if m == Fast {
		return "fast"
	}
	return "exact"
}

// ParseMode parses "exact" or "fast".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "exact", "":
		return Exact, nil
	case "fast":
		return Fast, nil
	}
	return 0, fmt.Errorf("mode %q (want exact or fast): %w", s, ErrInvalidOptions)
}

// Options configure an Engine.
type Options struct {
	Backend       Backend  // required (e.g. cpu.New(0))
	Mode          Mode     // Exact or Fast
	KVPolicy      KVPolicy // KVFull or KVLast
	MaxBatch      int      // sequences in the running batch; 0 means 8
	Threshold     float64  // initial exit threshold τ; 0 takes config early_exit_threshold (1 if unset)
	ProbeFraction float64  // fraction of decode tokens that run all R steps and report Token.Agree, in [0, 1]
	MaxContext    int      // positions per sequence; 0 takes max_position_embeddings (2048 if unset)
	PrefillChunk  int      // prompt tokens prefilled per iteration under KVFull; 0 means 256
	// MaxKVBytes bounds the memory of all KV caches together: a generating request that
	// would pass it finishes with "length", a prompt that cannot fit fails with ErrKVFull.
	// 0 means 16 GiB; negative means no bound.
	MaxKVBytes int64
	// KVBF16 stores keys and values as bfloat16: half the KV memory and attention traffic, at
	// a small accuracy cost (the goldens' exact semantics hold with float32 only).
	KVBF16 bool
	// Decode turns token ids into text; needed for Request.StopStrings.
	Decode func([]int) string
}

// Counters are monotonic totals since New. LoopSteps counts (token, loop step) pairs executed
// for generated tokens, so LoopSteps/Tokens is the mean executed depth; prefill is counted apart.
type Counters struct {
	Requests         uint64 // admitted
	Finished         uint64 // ended, for any reason
	Tokens           uint64 // generated tokens
	LoopSteps        uint64 // decode (token, step) pairs executed, drafts and verification included
	ChosenDepth      uint64 // sum of generated tokens' Depth
	DecodeTokens     uint64 // generated tokens that came from a decode row (not prefill, not speculative)
	DecodeDepth      uint64 // their summed Depth: equals their LoopSteps in Fast mode without probes
	PrefillTokens    uint64
	PrefillLoopSteps uint64
	Probes           uint64
	Iterations       uint64 // batch iterations (one loop step for every row in flight)
	BatchRows        uint64 // rows in flight summed over iterations
	DraftTokens      uint64 // speculative drafts proposed
	AcceptedDrafts   uint64 // speculative drafts accepted
}

// Engine runs requests against one model. Submit, SetThreshold, Threshold, Stats and Config
// are safe for concurrent use; Run must be called once.
type Engine struct {
	m        *model.Model
	opts     Options
	steps    int
	ctxLen   int
	eos      int
	kvBudget *kvBudget
	tau      atomic.Uint64 // float64 bits
	stepNano atomic.Int64  // EWMA of one loop step's wall time, for deadlines

	mu      sync.Mutex
	queue   []*sequence
	state   int // 0 new, 1 running, 2 closed
	nRun    int // sequences in Run's batch, for Occupancy
	stats   Counters
	wake    chan struct{}
	stopped chan struct{}
	fwd     sync.WaitGroup // event forwarders
}

// New validates opts and returns an engine for m; call Run to start serving.
func New(m *model.Model, opts Options) (*Engine, error) {
	if m == nil || opts.Backend == nil {
		return nil, fmt.Errorf("model and backend are required: %w", ErrInvalidOptions)
	}
	c := m.Config
	if opts.MaxBatch == 0 {
		opts.MaxBatch = 8
	}
	if opts.PrefillChunk <= 0 {
		opts.PrefillChunk = 256
	}
	switch {
	case opts.MaxBatch < 0:
		return nil, fmt.Errorf("max batch %d: %w", opts.MaxBatch, ErrInvalidOptions)
	case opts.Mode != Exact && opts.Mode != Fast:
		return nil, fmt.Errorf("mode %d: %w", opts.Mode, ErrInvalidOptions)
	case opts.KVPolicy != KVFull && opts.KVPolicy != KVLast:
		return nil, fmt.Errorf("kv policy %d: %w", opts.KVPolicy, ErrInvalidOptions)
	case opts.ProbeFraction < 0 || opts.ProbeFraction > 1 || math.IsNaN(opts.ProbeFraction):
		return nil, fmt.Errorf("probe fraction %g not in [0, 1]: %w", opts.ProbeFraction, ErrInvalidOptions)
	case opts.Threshold < 0 || opts.Threshold > 1 || math.IsNaN(opts.Threshold):
		return nil, fmt.Errorf("threshold %g not in [0, 1]: %w", opts.Threshold, ErrInvalidOptions)
	case opts.MaxContext < 0:
		return nil, fmt.Errorf("max context %d: %w", opts.MaxContext, ErrInvalidOptions)
	}
	e := &Engine{m: m, opts: opts, steps: c.TotalUTSteps, ctxLen: opts.MaxContext, eos: c.EOS(),
		wake: make(chan struct{}, 1), stopped: make(chan struct{})}
	switch {
	case opts.MaxKVBytes == 0:
		e.kvBudget = &kvBudget{limit: 16 << 30}
	case opts.MaxKVBytes > 0:
		e.kvBudget = &kvBudget{limit: opts.MaxKVBytes}
	default:
		e.kvBudget = &kvBudget{limit: math.MaxInt64}
	}
	if e.ctxLen == 0 {
		e.ctxLen = c.MaxPositionEmbeddings
	}
	if e.ctxLen == 0 {
		e.ctxLen = 2048
	}
	tau := opts.Threshold
	if tau == 0 {
		tau = c.EarlyExitThreshold
	}
	if tau <= 0 || tau > 1 {
		tau = 1
	}
	e.SetThreshold(tau)
	return e, nil
}

// Config is the model's configuration.
func (e *Engine) Config() model.Config { return e.m.Config }

// Occupancy reports the requests in Run's batch and those queued for it (gauges).
func (e *Engine) Occupancy() (running, queued int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.nRun, len(e.queue)
}

// KVBytes is the memory the KV caches of running requests hold now (a gauge).
func (e *Engine) KVBytes() int64 { return e.kvBudget.used.Load() }

// ContextLen is the positions a sequence may use: prompt plus generated tokens.
func (e *Engine) ContextLen() int { return e.ctxLen }

// SetThreshold sets τ for requests whose Exit.Threshold is 0; values are clamped to (0, 1].
func (e *Engine) SetThreshold(tau float64) {
	if math.IsNaN(tau) || tau > 1 {
		tau = 1
	}
	tau = math.Max(tau, 1e-6)
	e.tau.Store(math.Float64bits(tau))
}

// Threshold is the τ in force.
func (e *Engine) Threshold() float64 { return math.Float64frombits(e.tau.Load()) }

// Stats returns a snapshot of the counters.
func (e *Engine) Stats() Counters {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.stats
}

func (e *Engine) count(f func(*Counters)) {
	e.mu.Lock()
	f(&e.stats)
	e.mu.Unlock()
}

// validate checks a request against the model and options.
func (e *Engine) validate(r *Request) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%s: %w", fmt.Sprintf(format, a...), ErrInvalidRequest)
	}
	R := e.steps
	switch {
	case len(r.Prompt) == 0:
		return bad("empty prompt")
	case len(r.Prompt) >= e.ctxLen:
		return bad("prompt of %d tokens does not fit the context of %d", len(r.Prompt), e.ctxLen)
	case r.MaxTokens <= 0:
		return bad("max tokens %d must be positive", r.MaxTokens)
	case r.Sampling.Temperature < 0 || math.IsNaN(r.Sampling.Temperature) || math.IsInf(r.Sampling.Temperature, 0):
		return bad("temperature %g", r.Sampling.Temperature)
	case r.Sampling.TopK < 0:
		return bad("top_k %d", r.Sampling.TopK)
	case r.Sampling.TopP < 0 || r.Sampling.TopP > 1 || math.IsNaN(r.Sampling.TopP):
		return bad("top_p %g not in [0, 1]", r.Sampling.TopP)
	case r.Exit.Threshold < 0 || r.Exit.Threshold > 1 || math.IsNaN(r.Exit.Threshold):
		return bad("exit threshold %g not in [0, 1]", r.Exit.Threshold)
	case r.Exit.MaxDepth < 0 || r.Exit.MaxDepth > R:
		return bad("max depth %d not in 0..%d", r.Exit.MaxDepth, R)
	case r.Exit.ForceDepth < 0 || r.Exit.ForceDepth > R:
		return bad("forced depth %d not in 0..%d", r.Exit.ForceDepth, R)
	case len(r.StopStrings) > 0 && e.opts.Decode == nil:
		return bad("stop strings need a decoder")
	case r.Speculative.Draft < 0 || r.Speculative.Draft > 32:
		return bad("speculative draft length %d not in 0..32", r.Speculative.Draft)
	case r.Speculative.DraftDepth < 0 || r.Speculative.DraftDepth > R:
		return bad("speculative draft depth %d not in 0..%d", r.Speculative.DraftDepth, R)
	case r.Speculative.Draft > 0 && r.Sampling.Temperature != 0:
		return bad("speculative decoding needs greedy sampling")
	case r.TopLogprobs < 0 || r.TopLogprobs > MaxTopLogprobs:
		return bad("top logprobs %d not in 0..%d", r.TopLogprobs, MaxTopLogprobs)
	case r.TopLogprobs > 0 && !r.Logprobs:
		return bad("top logprobs %d need logprobs", r.TopLogprobs)
	}
	for _, s := range r.StopStrings {
		if s == "" {
			return bad("empty stop string")
		}
	}
	for _, id := range r.Prompt {
		if id < 0 || id >= e.m.Config.VocabSize {
			return bad("token id %d outside vocabulary of %d", id, e.m.Config.VocabSize)
		}
	}
	return nil
}

// Submit queues r and returns its events: tokens, then one Done event, then the channel is
// closed. Cancelling ctx removes the request at the next iteration, within a loop step (its
// Done carries ctx's error). A request refused up front returns an error wrapping
// ErrInvalidRequest.
func (e *Engine) Submit(ctx context.Context, r Request) (<-chan Event, error) {
	if err := e.validate(&r); err != nil {
		return nil, err
	}
	s := e.newSequence(ctx, r)
	e.mu.Lock()
	if e.state == 2 {
		e.mu.Unlock()
		return nil, ErrClosed
	}
	e.queue = append(e.queue, s)
	e.fwd.Add(1)
	e.mu.Unlock()
	ch := make(chan Event)
	go func() {
		defer e.fwd.Done()
		s.out.forward(ctx, e.stopped, ch)
	}()
	e.signal()
	return ch, nil
}

func (e *Engine) signal() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// Run is the batching loop: it admits queued requests (up to MaxBatch running), advances every
// running request by one loop step per iteration, and returns when ctx ends, finishing the
// requests still running with ErrStopped. A cancelled request leaves within one loop step.
func (e *Engine) Run(ctx context.Context) error {
	e.mu.Lock()
	if e.state != 0 {
		e.mu.Unlock()
		return fmt.Errorf("run called twice: %w", ErrInvalidOptions)
	}
	e.state = 1
	e.mu.Unlock()
	b := newBatcher(e)
	var running []*sequence
	defer func() {
		e.mu.Lock()
		e.state = 2
		queued := e.queue
		e.queue = nil
		e.nRun = 0
		e.mu.Unlock()
		for _, s := range append(running, queued...) {
			s.finish("", ErrStopped)
		}
		close(e.stopped)
		e.fwd.Wait()
	}()
	for {
		if ctx.Err() != nil {
			return nil
		}
		e.mu.Lock()
		for len(running) < e.opts.MaxBatch && len(e.queue) > 0 {
			running = append(running, e.queue[0])
			e.queue = e.queue[1:]
			e.stats.Requests++
		}
		e.mu.Unlock()
		// Cancelled requests leave at the boundary.
		live := running[:0]
		for _, s := range running {
			if err := s.ctx.Err(); err != nil {
				s.finish("", err)
				e.count(func(c *Counters) { c.Finished++ })
				continue
			}
			live = append(live, s)
		}
		clear(running[len(live):])
		running = live
		e.mu.Lock()
		e.nRun = len(running)
		e.mu.Unlock()
		if len(running) == 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-e.wake:
			}
			continue
		}
		if b.iterate(running) == 0 {
			// Everyone left is waiting for KV memory that a Generate call holds.
			select {
			case <-ctx.Done():
				return nil
			case <-e.wake:
			case <-time.After(time.Millisecond):
			}
		}
		live = running[:0]
		for _, s := range running {
			if s.done {
				e.count(func(c *Counters) { c.Finished++ })
				continue
			}
			live = append(live, s)
		}
		clear(running[len(live):])
		running = live
	}
}

// Generate runs one request synchronously on the calling goroutine (its own scratch, so it may
// run beside Run), calling fn for each token; fn returning false stops generation. It returns
// the finish reason ("stop", "length", or "cancelled" when fn stopped it), or an error: one
// wrapping ErrInvalidRequest (also for Request.PromptLogprobs, which only Submit delivers),
// ErrKVFull, or ctx's.
func (e *Engine) Generate(ctx context.Context, r Request, fn func(Token) bool) (string, error) {
	if err := e.validate(&r); err != nil {
		return "", err
	}
	if r.PromptLogprobs {
		// fn receives tokens only: Event.Prompt has no way out of Generate.
		return "", fmt.Errorf("prompt logprobs are delivered on Submit's events, not Generate's tokens: %w", ErrInvalidRequest)
	}
	s := e.newSequence(ctx, r)
	s.direct = fn
	b := newBatcher(e)
	e.count(func(c *Counters) { c.Requests++ })
	defer e.count(func(c *Counters) { c.Finished++ })
	one := []*sequence{s}
	for !s.done {
		if err := ctx.Err(); err != nil {
			s.finish("", err) // releases the cache
			return "", err
		}
		b.iterate(one)
	}
	return s.finishReason, s.err
}

// observeStep folds one loop step's wall time into the estimate used for deadlines.
func (e *Engine) observeStep(d time.Duration) {
	old := e.stepNano.Load()
	if old == 0 {
		e.stepNano.Store(int64(d))
		return
	}
	e.stepNano.Store(old + (int64(d)-old)/8)
}

// deadlineDepth is the deepest a request can afford per remaining token to finish by its
// deadline (R when it has none or the engine has no timing yet).
func (e *Engine) deadlineDepth(s *sequence) int {
	if s.req.Deadline.IsZero() {
		return e.steps
	}
	step := time.Duration(e.stepNano.Load())
	left := time.Until(s.req.Deadline)
	if left <= 0 {
		return 1
	}
	if step <= 0 {
		return e.steps
	}
	tokens := max(s.req.MaxTokens-s.generated, 1)
	d := int(left / (step * time.Duration(tokens)))
	return min(max(d, 1), e.steps)
}
