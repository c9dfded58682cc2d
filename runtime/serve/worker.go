package serve

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/engine"
)

// Generator runs requests with continuous batching: the engine.
type Generator interface {
	Submit(ctx context.Context, r engine.Request) (<-chan engine.Event, error)
	SetThreshold(tau float64)
	Threshold() float64
}

// Tokenizer turns requests into token ids and tokens back into text.
type Tokenizer interface {
	Encode(text string) []int
	// ChatPrompt renders messages with the model's chat template, ready for the assistant's turn.
	ChatPrompt(msgs []Message) (string, error)
	// NewTextDecoder returns a streaming decoder: Add returns the text that token completes
	// (possibly empty while a multi-byte character is split across tokens).
	NewTextDecoder() TextDecoder
	// Decode returns the text of ids (an echoed token-id prompt).
	Decode(ids []int) string
	// TokenBytes returns the bytes of one token (for log-probabilities: a token may hold part
	// of a UTF-8 character).
	TokenBytes(id int) []byte
}

// TextDecoder turns a token stream into text incrementally. Not safe for concurrent use.
type TextDecoder interface {
	Add(id int) string
	Flush() string // bytes still held at the end of the stream
}

// WorkerOptions configure a Worker. Ref, ContextLength and MaxSteps are required.
type WorkerOptions struct {
	Ref           bus.Ref
	Name          string // unique per worker process (pod name); defaults to the host name
	Capacity      int    // requests generated at once; 0 = 8
	ContextLength int    // prompt + generated tokens allowed
	MaxSteps      int    // loop steps a token may run: the model's R, or fewer to cap it (spec.loop.maxSteps)
	VocabSize     int    // token ids in prompts must be below it; 0 = unchecked
	StopTokens    []int  // ids that end every request (eos)
	// DefaultMaxTokens applies when a job leaves MaxTokens 0 (chat without max_tokens): the rest of
	// the context, capped at this. 0 = 256.
	DefaultMaxTokens int
	StatsInterval    time.Duration // stats snapshot period; 0 = 5s
	Heartbeat        time.Duration // InProgress period; 0 = a third of the consumer's AckWait
	Metrics          *Metrics      // nil: no Prometheus metrics
	Logger           *slog.Logger
	// ThresholdFile, when set, is read at start for the operator's thresholds (a bus.Control:
	// {"exitThreshold": x} or with tiers).
	ThresholdFile string
	// Drain is how long requests in flight may run on after Run's context ends (a rolling
	// update's SIGTERM); those still running then are handed back (Nak) for immediate
	// redelivery. 0 abandons them at once without a word, as a crash would: JetStream
	// redelivers them after AckWait.
	Drain time.Duration
}

// Worker consumes a LoopModel's work queue and generates. Create it with NewWorker and call Run
// once. When Run's context ends the worker stops taking requests; those in flight get
// WorkerOptions.Drain to finish.
//
// It only binds to the queue the operator created (bus.BindQueue), publishes a request's chunks
// only to the reply subject under a gateway's inbox the request names (bus.ParseReply), and
// recovers a panic of one request into an error for that request alone.
type Worker struct {
	nc    *nats.Conn
	js    jetstream.JetStream
	gen   Generator
	tok   Tokenizer
	opt   WorkerOptions
	log   *slog.Logger
	stats *statsWindow
	met   *modelMetrics
	live  *liveness
	ready atomic.Bool // bound to the queue and taking requests
	tauMu sync.Mutex  // serialises threshold changes (control messages, registry watch)

	mu        sync.Mutex
	cancels   map[string]context.CancelFunc // request id -> stop its generation (client gone)
	gone      map[string]time.Time          // cancelled before this worker took them -> when
	histories map[string]*chunkHistory      // request id -> chunks published, for resends
}

// NewWorker checks the options and prepares a worker; it starts nothing.
func NewWorker(nc *nats.Conn, gen Generator, tok Tokenizer, o WorkerOptions) (*Worker, error) {
	if err := o.Ref.Validate(); err != nil {
		return nil, err
	}
	if o.ContextLength <= 0 || o.MaxSteps <= 0 {
		return nil, fmt.Errorf("worker options: ContextLength %d and MaxSteps %d must be positive", o.ContextLength, o.MaxSteps)
	}
	if o.Capacity <= 0 {
		o.Capacity = 8
	}
	if o.DefaultMaxTokens <= 0 {
		o.DefaultMaxTokens = 256
	}
	if o.StatsInterval <= 0 {
		o.StatsInterval = 5 * time.Second
	}
	if o.Name == "" {
		o.Name, _ = os.Hostname()
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("opening JetStream: %w", err)
	}
	w := &Worker{nc: nc, js: js, gen: gen, tok: tok, opt: o, log: o.Logger.With("loopmodel", o.Ref.String(), "worker", o.Name),
		cancels: make(map[string]context.CancelFunc), gone: make(map[string]time.Time), live: newLiveness(js)}
	w.stats = newStatsWindow(o.Ref, o.Name, o.MaxSteps, o.Capacity, bus.Thresholds{ExitThreshold: gen.Threshold()})
	if o.Metrics != nil {
		w.met = o.Metrics.model(o.Ref.String(), o.MaxSteps)
	}
	if o.ThresholdFile != "" {
		b, err := os.ReadFile(o.ThresholdFile)
		if err != nil {
			return nil, fmt.Errorf("reading threshold file: %w", err)
		}
		c, err := bus.DecodeControl(b)
		if err != nil {
			return nil, fmt.Errorf("threshold file %s: %w", o.ThresholdFile, err)
		}
		w.setThresholds(c.Thresholds)
	}
	return w, nil
}

// setThresholds applies the thresholds in force (validated by the caller); it reports whether
// they changed. The control message and the registry entry both deliver them, so the same
// values usually arrive twice. The engine's own threshold is the default tier's.
func (w *Worker) setThresholds(th bus.Thresholds) bool {
	w.tauMu.Lock()
	defer w.tauMu.Unlock()
	if th.ExitThreshold == w.gen.Threshold() && th.Equal(w.stats.thresholds()) {
		return false
	}
	w.gen.SetThreshold(th.ExitThreshold)
	// A window holds one threshold per tier only: publish what was seen under the old ones.
	w.publishStats(w.stats.rotate(time.Now(), th))
	if w.met != nil {
		w.met.threshold.Set(th.ExitThreshold)
	}
	return true
}

// jobThreshold is the exit threshold a job runs under, its tier, and the threshold to record
// its tokens under in that tier's depth histograms (0 when its request overrode its depth: its
// tokens do not show the threshold in force). A request's own exit_threshold wins; otherwise
// the threshold the gateway stamped at acceptance, so a redelivery after a change regenerates
// the same tokens; a job without a stamp runs under its tier's threshold in force when it
// starts. A job of a tier this worker has not heard of yet (the gateway saw newer tiers) runs
// under its stamp and counts in the default tier's load only.
func (w *Worker) jobThreshold(job Job) (run float64, tier string, record float64) {
	th := w.stats.thresholds()
	tier, inForce, err := th.Threshold(job.Tier)
	if err != nil {
		tier, inForce = th.DefaultTier, 0
	}
	run = cmp.Or(job.ExitThreshold, job.Threshold, inForce, w.gen.Threshold())
	if err != nil || job.ExitThreshold != 0 || job.MaxDepth != 0 || !job.Deadline.IsZero() {
		return run, tier, 0
	}
	return run, tier, run
}

// followRegistry applies the thresholds of the LoopModel's registry entry whenever they change,
// so a worker that missed a control message (it was reconnecting, or started between two)
// converges on the threshold in force. The registry may not exist yet (the operator creates
// it): it retries, backing off, until ctx ends.
func (w *Worker) followRegistry(ctx context.Context) {
	pause := 100 * time.Millisecond
	for {
		err := w.watchRegistry(ctx)
		if ctx.Err() != nil {
			return
		}
		w.log.Debug("following the registry entry", "err", err)
		sleepCtx(ctx, pause)
		pause = min(2*pause, 5*time.Second)
	}
}

// watchRegistry applies the thresholds each version of the LoopModel's entry carries until ctx
// ends or the watch fails.
func (w *Worker) watchRegistry(ctx context.Context) error {
	kv, err := bus.OpenRegistry(ctx, w.js)
	if err != nil {
		return err
	}
	watch, err := kv.Watch(ctx, w.opt.Ref.Key())
	if err != nil {
		return fmt.Errorf("watching registry entry %s: %w", w.opt.Ref, err)
	}
	defer func() { _ = watch.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-watch.Updates():
			if !ok {
				return fmt.Errorf("watching registry entry %s: updates ended", w.opt.Ref)
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue // nil marks the end of the initial values
			}
			m, err := bus.DecodeModel(e.Value())
			if err == nil {
				err = m.Thresholds.Validate()
			}
			if err != nil {
				w.log.Warn("ignoring registry entry without valid exit thresholds", "err", err)
				continue
			}
			if w.setThresholds(m.Thresholds) {
				w.log.Info("exit threshold applied", "threshold", m.ExitThreshold, "tiers", m.Tiers, "from", "registry")
			}
		}
	}
}

// Ready reports whether the worker takes requests: bound to its queue, connected to NATS and
// not stopping. It is the worker's readiness probe.
func (w *Worker) Ready() bool { return w.ready.Load() && w.nc.IsConnected() }

// AwaitQueue binds to the LoopModel's consumer, waiting (with a log line now and then) while it
// does not exist yet or NATS cannot be reached, until ctx ends. Run calls it; a worker process
// calls it before loading weights, so that a missing queue never makes it load the model in a
// crash loop.
func AwaitQueue(ctx context.Context, js jetstream.JetStream, r bus.Ref, log *slog.Logger) (jetstream.Consumer, error) {
	pause := 100 * time.Millisecond
	var logged time.Time
	for {
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		c, err := bus.BindQueue(actx, js, r)
		cancel()
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if time.Since(logged) > 30*time.Second {
			log.Info("waiting for the work queue (the operator creates it)", "stream", r.Stream(), "err", err)
			logged = time.Now()
		}
		sleepCtx(ctx, pause)
		pause = min(2*pause, 5*time.Second)
	}
}

// Run consumes until ctx ends, lets requests in flight drain (see WorkerOptions.Drain), and
// returns once all its goroutines have.
func (w *Worker) Run(ctx context.Context) error {
	cons, err := AwaitQueue(ctx, w.js, w.opt.Ref, w.log)
	if err != nil {
		return nil // stopped before the queue appeared
	}
	heartbeat := w.opt.Heartbeat
	if heartbeat <= 0 {
		heartbeat = max(cons.CachedInfo().Config.AckWait/3, 100*time.Millisecond)
	}
	if w.met != nil {
		w.met.threshold.Set(w.gen.Threshold())
	}

	ctl, err := w.nc.Subscribe(w.opt.Ref.ControlSubject(), func(m *nats.Msg) {
		c, err := bus.DecodeControl(m.Data)
		if err != nil {
			w.log.Warn("ignoring control message", "err", err)
			return
		}
		if w.setThresholds(c.Thresholds) {
			w.log.Info("exit threshold applied", "threshold", c.ExitThreshold, "tiers", c.Tiers, "from", "control")
		}
	})
	if err != nil {
		return fmt.Errorf("subscribing to %s: %w", w.opt.Ref.ControlSubject(), err)
	}
	defer ctl.Unsubscribe()
	cancel, err := w.nc.Subscribe(w.opt.Ref.CancelSubject(), func(m *nats.Msg) {
		id := string(m.Data)
		w.mu.Lock()
		stop := w.cancels[id]
		if stop == nil {
			// Still queued (or on another worker): remember it so that it is dropped when taken.
			now := time.Now()
			w.gone[id] = now
			if len(w.gone) > 1024 {
				for k, t := range w.gone {
					if now.Sub(t) > 5*time.Minute {
						delete(w.gone, k)
					}
				}
			}
		}
		w.mu.Unlock()
		if stop != nil {
			stop()
		}
	})
	if err != nil {
		return fmt.Errorf("subscribing to %s: %w", w.opt.Ref.CancelSubject(), err)
	}
	defer cancel.Unsubscribe()

	// Requests run under hard, which ends Drain after ctx (at once without a drain).
	hard, hardCancel := context.WithCancel(context.WithoutCancel(ctx))
	defer hardCancel()
	var wg, jobs sync.WaitGroup
	wg.Go(func() { w.statsLoop(ctx) })
	wg.Go(func() { w.followRegistry(ctx) })
	defer wg.Wait()
	defer func() {
		drained := make(chan struct{})
		go func() { jobs.Wait(); close(drained) }()
		if w.opt.Drain > 0 {
			t := time.NewTimer(w.opt.Drain)
			select {
			case <-drained:
			case <-t.C:
			}
			t.Stop()
		}
		hardCancel()
		<-drained
	}()

	w.ready.Store(true)
	slots := make(chan struct{}, w.opt.Capacity)
	for ctx.Err() == nil {
		// Fetch only as many requests as there are free slots, so other workers get the rest.
		free := 0
		select {
		case slots <- struct{}{}:
			free = 1
		case <-ctx.Done():
			continue
		}
	fill:
		for free < w.opt.Capacity {
			select {
			case slots <- struct{}{}:
				free++
			default:
				break fill
			}
		}
		fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
		batch, err := cons.Fetch(free, jetstream.FetchContext(fctx))
		if err != nil {
			fcancel()
			for range free {
				<-slots
			}
			if ctx.Err() == nil {
				w.log.Warn("fetching requests", "err", err)
				sleepCtx(ctx, 500*time.Millisecond)
			}
			continue
		}
		got := 0
		for msg := range batch.Messages() {
			got++
			jobs.Go(func() {
				defer func() { <-slots }()
				w.handle(hard, msg, heartbeat)
			})
		}
		fcancel()
		for range free - got {
			<-slots
		}
		if err := batch.Error(); err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) &&
			!errors.Is(err, nats.ErrTimeout) && ctx.Err() == nil {
			w.log.Warn("fetching requests", "err", err)
			sleepCtx(ctx, 500*time.Millisecond)
		}
	}
	w.ready.Store(false) // draining: take no more
	return nil
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// handle runs one request to its end. When ctx ends first (the worker stopping, after any
// drain) the request is left un-acked, or handed back with Nak when the worker drains.
func (w *Worker) handle(ctx context.Context, msg jetstream.Msg, heartbeat time.Duration) {
	taken := time.Now()
	reply := msg.Headers().Get(HeaderReply)
	gateway, request, err := bus.ParseReply(reply)
	if err != nil {
		// Publishing there could reach JetStream's API or another model's subjects.
		w.log.Warn("refusing a request whose reply subject is outside the gateway inbox", "err", err)
		if w.met != nil {
			w.met.refusedReplies.Inc()
		}
		_ = msg.Term()
		return
	}
	job, err := decodeJob(msg.Data())
	if err != nil {
		w.log.Warn("dropping malformed request", "request", request, "err", err)
		w.finish(ctx, reply, gateway, Chunk{ID: request, Done: true, Error: &ChunkError{Status: http.StatusBadRequest, Type: "invalid_request_error", Message: err.Error()}})
		_ = msg.Term()
		return
	}
	if job.ID != request {
		// Its chunks would land in another request's stream, or be dropped there.
		w.log.Warn("refusing a request whose id does not match its reply subject", "request", job.ID, "reply", reply)
		if w.met != nil {
			w.met.refusedReplies.Inc()
		}
		_ = msg.Term()
		return
	}
	log := w.log.With("request", job.ID)
	if !job.Expires.IsZero() && taken.After(job.Expires) {
		// Its gateway stopped waiting: generating it would only delay the requests behind it.
		log.Info("dropping a request that expired in the queue", "expired", job.Expires)
		if w.met != nil {
			w.met.expired.Inc()
		}
		w.publish(reply, Chunk{ID: job.ID, Done: true, Error: &ChunkError{Status: http.StatusGatewayTimeout, Type: "server_error", Code: "timeout",
			Message: "the request expired in the queue before a worker took it"}})
		_ = msg.Term()
		return
	}
	meta, _ := msg.Metadata()
	if meta != nil && meta.NumDelivered == 1 {
		w.observeQueueWait(job.Tier, time.Since(meta.Timestamp))
	}

	jctx, stop := context.WithCancel(ctx)
	defer stop()
	w.mu.Lock()
	_, gone := w.gone[job.ID]
	delete(w.gone, job.ID)
	if !gone {
		w.cancels[job.ID] = stop
	}
	w.mu.Unlock()
	if gone {
		log.Debug("dropping a request its client abandoned")
		_ = msg.Term()
		return
	}
	defer func() {
		w.mu.Lock()
		delete(w.cancels, job.ID)
		delete(w.histories, job.ID)
		w.mu.Unlock()
	}()

	// Keep the message ours while generating (AckWait restarts at each heartbeat), and stop
	// generating for nobody once the gateway is known dead.
	hbDone := make(chan struct{})
	var hb sync.WaitGroup
	hb.Go(func() {
		t := time.NewTicker(heartbeat)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				if err := msg.InProgress(); err != nil {
					log.Debug("heartbeat", "err", err)
				}
				if w.live.check(jctx, gateway) == gatewayDead {
					log.Info("the request's gateway is gone: stopping", "gateway", gateway)
					stop()
				}
			case <-hbDone:
				return
			}
		}
	})
	defer hb.Wait()
	defer close(hbDone)

	w.stats.begin()
	if w.met != nil {
		w.met.inflight.Inc()
		defer w.met.inflight.Dec()
	}
	final := w.generateSafely(jctx, job, reply)
	final.Elapsed = time.Since(taken).Seconds()
	w.stats.end()
	switch {
	case ctx.Err() != nil: // the worker is stopping
		if w.opt.Drain > 0 {
			_ = msg.Nak() // hand it back now rather than after AckWait
		}
		return
	case jctx.Err() != nil:
		_ = msg.Term() // the client or its gateway went away
		return
	}
	if final.Error == nil {
		w.stats.request(job.Tier)
	}
	if final.Error != nil && final.Error.Status >= 500 {
		log.Warn("request failed", "err", final.Error.Message)
	}
	switch w.finish(ctx, reply, gateway, final) {
	case stopping:
		if w.opt.Drain > 0 {
			_ = msg.Nak()
		}
		return
	case handBack:
		log.Warn("the gateway stayed unreachable: handing the request back", "gateway", gateway)
		_ = msg.NakWithDelay(time.Second)
		return
	}
	for attempt := range 3 {
		actx, acancel := context.WithTimeout(ctx, 5*time.Second)
		err := msg.DoubleAck(actx)
		acancel()
		if err == nil || ctx.Err() != nil {
			return
		}
		// A failover may eat the ack; a redelivery would find the gateway answering Gone.
		log.Debug("acking request", "attempt", attempt, "err", err)
	}
	log.Warn("the request was answered but its ack was not confirmed: a redelivery will be dropped by its gateway")
}

// generateSafely is generate with a panic turned into this request's error: one bad request
// never takes the worker down (JetStream's MaxDeliver covers the panics that cannot be caught).
func (w *Worker) generateSafely(ctx context.Context, job Job, reply string) (final Chunk) {
	defer func() {
		if p := recover(); p != nil {
			final = w.panicked(job, p)
		}
	}()
	return w.generate(ctx, job, reply)
}

func (w *Worker) panicked(job Job, p any) Chunk {
	w.log.Error("request panicked", "request", job.ID, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
	if w.met != nil {
		w.met.panics.Inc()
	}
	return Chunk{ID: job.ID, Done: true, Error: &ChunkError{Status: http.StatusInternalServerError, Type: "server_error", Code: "worker_failed",
		Message: fmt.Sprintf("the worker failed on this request (%v); it is not retried", p)}}
}

// generate runs the engine for a job, one engine request per choice side by side, publishing
// token chunks (kept in the worker's history for resends), and returns the final chunk, not yet sent.
func (w *Worker) generate(ctx context.Context, job Job, reply string) Chunk {
	bad := func(code, param, format string, a ...any) Chunk {
		return Chunk{ID: job.ID, Done: true, Error: &ChunkError{Status: http.StatusBadRequest, Type: "invalid_request_error",
			Code: code, Param: param, Message: fmt.Sprintf(format, a...)}}
	}
	var prompt []int
	switch {
	case len(job.Messages) > 0:
		text, err := w.tok.ChatPrompt(job.Messages)
		if err != nil {
			return bad("", "messages", "applying the chat template: %v", err)
		}
		prompt = w.tok.Encode(text)
	case len(job.PromptIDs) > 0:
		for _, id := range job.PromptIDs {
			if id < 0 || (w.opt.VocabSize > 0 && id >= w.opt.VocabSize) {
				return bad("", "prompt", "token id %d outside the vocabulary of %d", id, w.opt.VocabSize)
			}
		}
		prompt = job.PromptIDs
	default:
		prompt = w.tok.Encode(job.Prompt)
	}
	if len(prompt) == 0 {
		return bad("", "prompt", "the prompt is empty")
	}
	room := w.opt.ContextLength - len(prompt)
	if room <= 0 {
		return bad("context_length_exceeded", "prompt", "this model's maximum context length is %d tokens, the prompt has %d", w.opt.ContextLength, len(prompt))
	}
	maxTokens := job.MaxTokens
	switch {
	case job.PromptOnly:
		maxTokens = 1 // the prompt's scores come with the first token, which is dropped
	case maxTokens <= 0:
		maxTokens = min(room, w.opt.DefaultMaxTokens)
	case maxTokens > room:
		return bad("context_length_exceeded", "max_tokens", "this model's maximum context length is %d tokens, the prompt has %d and max_tokens asks for %d",
			w.opt.ContextLength, len(prompt), maxTokens)
	}
	if job.MaxDepth > w.opt.MaxSteps {
		return bad("", "max_depth", "max_depth %d exceeds the model's %d loop steps", job.MaxDepth, w.opt.MaxSteps)
	}
	if job.TopLogprobs < 0 || job.TopLogprobs > maxTopLogprobs {
		return bad("", "top_logprobs", "top_logprobs %d outside 0..%d", job.TopLogprobs, maxTopLogprobs)
	}
	tau, tier, record := w.jobThreshold(job)
	start := time.Now()
	// A stop string ends the engine's work for its choice without ending the request.
	ectx, ecancel := context.WithCancel(ctx)
	defer ecancel()
	n := job.Choices()
	streams := make([]<-chan engine.Event, n)
	cancels := make([]context.CancelFunc, n)
	for i := range n {
		// A request without max_depth runs at most MaxSteps, which may be below the model's R.
		req := engine.Request{
			ID:         job.ID,
			Prompt:     prompt,
			MaxTokens:  maxTokens,
			Sampling:   engine.Sampling{Temperature: job.Temperature, TopK: job.TopK, TopP: job.TopP, Seed: job.SeedFor(i)},
			Exit:       engine.Exit{Threshold: tau, MaxDepth: cmp.Or(job.MaxDepth, w.opt.MaxSteps)},
			StopTokens: w.opt.StopTokens,
			Deadline:   job.Deadline,
		}
		if n > 1 {
			req.ID = fmt.Sprintf("%s/%d", job.ID, i)
		}
		scoring(&req, job)
		cctx, cancel := context.WithCancel(ectx)
		events, err := w.gen.Submit(cctx, req)
		if err != nil {
			cancel()
			ecancel()
			for _, s := range streams[:i] {
				for range s { // let the engine close them
				}
			}
			return Chunk{ID: job.ID, Done: true, Error: submitError(err)}
		}
		streams[i], cancels[i] = events, cancel
	}
	echo := ""
	if job.Echo {
		echo = job.Prompt
		if echo == "" {
			echo = w.tok.Decode(prompt)
		}
	}
	ends := make([]End, n)
	errs := make([]*ChunkError, n)
	var first sync.Once
	var batched atomic.Bool
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			defer cancels[i]()
			defer func() {
				if p := recover(); p != nil {
					errs[i] = w.panicked(job, p).Error
					ecancel()
					for range streams[i] { // let the engine close it
					}
				}
			}()
			ends[i], errs[i] = w.runChoice(ctx, job, tier, record, i, streams[i], cancels[i], reply, echo, func(now time.Time) {
				first.Do(func() {
					w.observeTTFT(tier, now.Sub(start))
					if w.met != nil {
						w.met.batch.Inc()
						batched.Store(true)
					}
				})
			})
		})
	}
	wg.Wait()
	if batched.Load() {
		w.met.batch.Dec()
	}
	for _, e := range errs {
		if e != nil {
			return Chunk{ID: job.ID, Done: true, Error: e}
		}
	}
	if ctx.Err() != nil {
		return Chunk{ID: job.ID, Done: true}
	}
	total := 0
	for _, e := range ends {
		total += e.Tokens
	}
	if job.PromptOnly {
		total = 0 // the one chunk of each choice holds the prompt, no token
	}
	return Chunk{ID: job.ID, Done: true, Ends: ends,
		Usage: &Usage{PromptTokens: len(prompt), CompletionTokens: total, TotalTokens: len(prompt) + total}}
}

// runChoice streams one choice's events as chunks until it ends; a stop string stops its
// engine request (stop) and the rest of its events are drained. It returns how the choice
// ended, or its error. firstToken runs at each token's arrival before anything else.
func (w *Worker) runChoice(ctx context.Context, job Job, tier string, record float64, choice int, events <-chan engine.Event, stop context.CancelFunc,
	reply, echo string, firstToken func(time.Time)) (End, *ChunkError) {
	dec := w.tok.NewTextDecoder()
	stops := newStopper(job.Stop)
	var (
		n      int
		last   time.Time
		finish string
		ended  bool
	)
	for ev := range events {
		if ended {
			continue // drain after a stop string so the engine is never blocked
		}
		if ev.Done {
			if ev.Err != nil {
				if ctx.Err() != nil {
					return End{}, nil
				}
				return End{}, engineError(ev.Err)
			}
			finish = ev.Finish
			break
		}
		now := time.Now()
		firstToken(now)
		if n > 0 {
			w.observeITL(tier, now.Sub(last))
		}
		last = now
		w.observeToken(ev.Token, tier, record)
		if job.PromptOnly {
			c := Chunk{ID: job.ID, Choice: choice, Echo: &Echo{Text: echo}}
			if job.Logprobs {
				for _, p := range ev.Prompt {
					c.Echo.Logprobs = append(c.Echo.Logprobs, w.logprob(p, false))
				}
			}
			w.send(reply, c)
			n, finish, ended = 1, "length", true
			stop()
			continue
		}
		text := ""
		if !isStop(ev.Token.ID, w.opt.StopTokens) {
			text = dec.Add(ev.Token.ID)
		}
		text, hit := stops.add(text)
		c := Chunk{ID: job.ID, Choice: choice, Index: n, Text: text, Tokens: []int{ev.Token.ID}, Depths: []int{ev.Token.Depth}}
		if job.Logprobs {
			c.Logprobs = []Logprob{w.logprob(ev.Token, true)}
		}
		if n == 0 && job.Echo {
			c.Echo = &Echo{Text: echo}
			if job.Logprobs {
				for _, p := range ev.Prompt {
					c.Echo.Logprobs = append(c.Echo.Logprobs, w.logprob(p, false))
				}
			}
		}
		n++
		w.send(reply, c)
		if hit {
			finish, ended = "stop", true
			stop()
		}
	}
	if ctx.Err() != nil && !ended {
		return End{}, nil
	}
	if finish == "" {
		finish = "length"
	}
	// Bytes the decoder held and text held back as a possible stop-string prefix belong to the
	// output after all.
	tail := ""
	if !ended {
		var hit bool
		if tail, hit = stops.add(dec.Flush()); hit {
			finish = "stop"
		} else {
			tail += stops.flush()
		}
	}
	return End{Tokens: n, Finish: finish, Text: tail}, nil
}

func isStop(id int, stops []int) bool {
	return slices.Contains(stops, id)
}

func submitError(err error) *ChunkError {
	if errors.Is(err, engine.ErrInvalidRequest) {
		return &ChunkError{Status: http.StatusBadRequest, Type: "invalid_request_error", Message: err.Error()}
	}
	return &ChunkError{Status: http.StatusServiceUnavailable, Type: "server_error", Message: fmt.Sprintf("submitting to the engine: %v", err)}
}

func engineError(err error) *ChunkError {
	if errors.Is(err, engine.ErrInvalidRequest) {
		return &ChunkError{Status: http.StatusBadRequest, Type: "invalid_request_error", Message: err.Error()}
	}
	return &ChunkError{Status: http.StatusInternalServerError, Type: "server_error", Message: err.Error()}
}

// send publishes a token chunk and keeps it for resends.
func (w *Worker) send(reply string, c Chunk) {
	w.mu.Lock()
	w.history(c.ID).add(c)
	w.mu.Unlock()
	w.publish(reply, c)
}

func (w *Worker) publish(reply string, c Chunk) {
	b, _ := json.Marshal(c)
	if err := w.nc.Publish(reply, b); err != nil {
		w.log.Debug("publishing chunk", "request", c.ID, "err", err)
	}
}

// delivery is how a final chunk's delivery ended.
type delivery int

const (
	delivered delivery = iota // the gateway holds every chunk, or no longer waits (ack)
	handBack                  // the gateway is alive but stayed unreachable (nak: redeliver later)
	stopping                  // the worker is stopping (leave it un-acked, or nak when draining)
)

// handBackAfter is how long a final chunk may go unanswered while its gateway is not known dead
// before the worker hands the request back for redelivery.
const handBackAfter = bus.GatewayTTL + 5*time.Second

// finish sends the final chunk as a request and resends whatever the gateway reports missing.
// Silence (no responders, timeouts) means the gateway is reconnecting or gone: only its expired
// liveness key tells gone, which ends the delivery; otherwise the worker keeps trying for
// handBackAfter, then hands the request back.
func (w *Worker) finish(ctx context.Context, reply, gateway string, final Chunk) delivery {
	b, _ := json.Marshal(final)
	var silentSince time.Time
	for attempt := 0; ; attempt++ {
		if ctx.Err() != nil {
			return stopping
		}
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := w.nc.RequestWithContext(rctx, reply, b)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return stopping
			}
			if silentSince.IsZero() {
				silentSince = time.Now()
			}
			switch w.live.check(ctx, gateway) {
			case gatewayDead:
				return delivered // nobody is left to deliver to
			default:
				if time.Since(silentSince) > handBackAfter {
					return handBack
				}
			}
			sleepCtx(ctx, time.Duration(min(attempt+1, 5))*100*time.Millisecond)
			continue
		}
		silentSince = time.Time{}
		var fr finalReply
		if err := json.Unmarshal(resp.Data, &fr); err != nil || fr.Gone || final.Error != nil || len(final.Ends) == 0 {
			return delivered
		}
		w.mu.Lock()
		missing := w.history(final.ID).missing(fr.Next, final.Ends)
		w.mu.Unlock()
		if missing == nil {
			return delivered
		}
		for _, c := range missing {
			w.publish(reply, c)
		}
	}
}

// chunkHistory holds one request's published chunks in index order, per choice.
type chunkHistory struct{ chunks [][]Chunk }

func (h *chunkHistory) add(c Chunk) {
	for len(h.chunks) <= c.Choice {
		h.chunks = append(h.chunks, nil)
	}
	ch := h.chunks[c.Choice]
	if c.Index < len(ch) { // the same request running twice here (a redelivery)
		ch[c.Index] = c
		return
	}
	h.chunks[c.Choice] = append(ch, c)
}

// missing returns the chunks from next[i] on of each choice, or nil when the gateway holds
// every chunk of ends.
func (h *chunkHistory) missing(next []int, ends []End) []Chunk {
	var out []Chunk
	complete := len(next) == len(ends)
	for i, e := range ends {
		from := 0
		if i < len(next) {
			from = next[i]
		}
		if from >= e.Tokens {
			continue
		}
		complete = false
		if i < len(h.chunks) && from >= 0 && from < len(h.chunks[i]) {
			out = append(out, h.chunks[i][from:]...)
		}
	}
	if complete {
		return nil
	}
	if out == nil {
		out = []Chunk{} // nothing to resend, yet incomplete: ask again
	}
	return out
}

// history returns the request's chunk history; w.mu must be held.
func (w *Worker) history(id string) *chunkHistory {
	if w.histories == nil {
		w.histories = make(map[string]*chunkHistory)
	}
	h := w.histories[id]
	if h == nil {
		h = &chunkHistory{}
		w.histories[id] = h
	}
	return h
}

// gatewayState is what the worker knows of a gateway's liveness.
type gatewayState int

const (
	gatewayUnknown gatewayState = iota // the liveness bucket cannot be read right now
	gatewayAlive                       // its key is fresh
	gatewayDead                        // its key expired or was deleted: it stopped or crashed
)

// liveness reads gateways' keys in bus.GatewaysBucket, caching each answer for a second.
// Safe for concurrent use.
type liveness struct {
	js    jetstream.JetStream
	mu    sync.Mutex
	kv    jetstream.KeyValue
	cache map[string]livenessEntry
}

type livenessEntry struct {
	state gatewayState
	at    time.Time
}

func newLiveness(js jetstream.JetStream) *liveness {
	return &liveness{js: js, cache: make(map[string]livenessEntry)}
}

func (l *liveness) check(ctx context.Context, gateway string) gatewayState {
	l.mu.Lock()
	if e, ok := l.cache[gateway]; ok && time.Since(e.at) < time.Second {
		l.mu.Unlock()
		return e.state
	}
	kv := l.kv
	l.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if kv == nil {
		var err error
		if kv, err = bus.OpenGateways(ctx, l.js); err != nil {
			return gatewayUnknown
		}
	}
	state := gatewayUnknown
	switch _, err := kv.Get(ctx, gateway); {
	case err == nil:
		state = gatewayAlive
	case errors.Is(err, jetstream.ErrKeyNotFound):
		state = gatewayDead
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.kv = kv
	if state != gatewayUnknown {
		now := time.Now()
		l.cache[gateway] = livenessEntry{state, now}
		if len(l.cache) > 1024 {
			for k, e := range l.cache {
				if now.Sub(e.at) > time.Minute {
					delete(l.cache, k)
				}
			}
		}
	}
	return state
}

// stopper finds stop strings in streamed text, holding back a tail that could start one.
type stopper struct {
	stops   []string
	pending string
}

func newStopper(stops []string) *stopper {
	var s []string
	for _, x := range stops {
		if x != "" {
			s = append(s, x)
		}
	}
	return &stopper{stops: s}
}

// add appends text and returns what can be emitted now, and whether a stop string was hit (the
// emitted text then ends just before it).
func (s *stopper) add(text string) (string, bool) {
	if len(s.stops) == 0 {
		return text, false
	}
	buf := s.pending + text
	cut := -1
	for _, x := range s.stops {
		if i := strings.Index(buf, x); i >= 0 && (cut < 0 || i < cut) {
			cut = i
		}
	}
	if cut >= 0 {
		s.pending = ""
		return buf[:cut], true
	}
	hold := 0
	for _, x := range s.stops {
		for k := min(len(x)-1, len(buf)); k > hold; k-- {
			if strings.HasSuffix(buf, x[:k]) {
				hold = k
				break
			}
		}
	}
	s.pending = buf[len(buf)-hold:]
	return buf[:len(buf)-hold], false
}

func (s *stopper) flush() string {
	p := s.pending
	s.pending = ""
	return p
}
