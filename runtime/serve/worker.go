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
	"strings"
	"sync"
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
	// ThresholdFile, when set, is read at start for the operator's threshold ({"exitThreshold": x}).
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
type Worker struct {
	nc    *nats.Conn
	js    jetstream.JetStream
	gen   Generator
	tok   Tokenizer
	opt   WorkerOptions
	log   *slog.Logger
	stats *statsWindow
	met   *modelMetrics

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
		cancels: make(map[string]context.CancelFunc), gone: make(map[string]time.Time)}
	w.stats = newStatsWindow(o.Ref, o.Name, o.MaxSteps, o.Capacity, gen.Threshold())
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
		w.setThreshold(c.ExitThreshold)
	}
	return w, nil
}

func (w *Worker) setThreshold(tau float64) {
	w.gen.SetThreshold(tau)
	// A window holds one threshold only: publish what was seen under the old one.
	if snap, ok := w.stats.rotate(time.Now(), tau); ok {
		w.publishStats(snap)
	}
	if w.met != nil {
		w.met.threshold.Set(tau)
	}
}

// Run consumes until ctx ends, lets requests in flight drain (see WorkerOptions.Drain), and
// returns once all its goroutines have.
func (w *Worker) Run(ctx context.Context) error {
	cons, err := w.js.Consumer(ctx, w.opt.Ref.Stream(), bus.ConsumerName)
	if err != nil {
		return fmt.Errorf("opening consumer %s/%s: %w", w.opt.Ref.Stream(), bus.ConsumerName, err)
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
		w.setThreshold(c.ExitThreshold)
		w.log.Info("exit threshold applied", "threshold", c.ExitThreshold)
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
	reply := msg.Headers().Get(HeaderReply)
	job, err := decodeJob(msg.Data())
	if err != nil {
		w.log.Warn("dropping malformed request", "err", err)
		if reply != "" {
			w.finish(ctx, reply, Chunk{Done: true, Error: &ChunkError{Status: http.StatusBadRequest, Type: "invalid_request_error", Message: err.Error()}})
		}
		_ = msg.Term()
		return
	}
	log := w.log.With("request", job.ID)
	if meta, err := msg.Metadata(); err == nil && meta.NumDelivered == 1 {
		w.observeQueueWait(time.Since(meta.Timestamp))
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

	// Keep the message ours while generating: AckWait restarts at each heartbeat.
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
	final := w.generate(jctx, job, reply)
	w.stats.end()
	switch {
	case ctx.Err() != nil: // the worker is stopping
		if w.opt.Drain > 0 {
			_ = msg.Nak() // hand it back now rather than after AckWait
		}
		return
	case jctx.Err() != nil:
		_ = msg.Term() // the client went away
		return
	}
	if final.Error == nil {
		w.stats.request()
	}
	if final.Error != nil && final.Error.Status >= 500 {
		log.Warn("request failed", "err", final.Error.Message)
	}
	if reply != "" && !w.finish(ctx, reply, final) {
		if w.opt.Drain > 0 {
			_ = msg.Nak()
		}
		return
	}
	actx, acancel := context.WithTimeout(ctx, 5*time.Second)
	defer acancel()
	if err := msg.DoubleAck(actx); err != nil && ctx.Err() == nil {
		log.Warn("acking request", "err", err)
	}
}

// generate runs the engine for a job, publishing token chunks (kept in the worker's history for
// resends), and returns the final chunk, not yet sent.
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
	case maxTokens <= 0:
		maxTokens = min(room, w.opt.DefaultMaxTokens)
	case maxTokens > room:
		return bad("context_length_exceeded", "max_tokens", "this model's maximum context length is %d tokens, the prompt has %d and max_tokens asks for %d",
			w.opt.ContextLength, len(prompt), maxTokens)
	}
	if job.MaxDepth > w.opt.MaxSteps {
		return bad("", "max_depth", "max_depth %d exceeds the model's %d loop steps", job.MaxDepth, w.opt.MaxSteps)
	}
	// A request without max_depth runs at most MaxSteps, which may be below the model's R.
	req := engine.Request{
		ID:         job.ID,
		Prompt:     prompt,
		MaxTokens:  maxTokens,
		Sampling:   engine.Sampling{Temperature: job.Temperature, TopK: job.TopK, TopP: job.TopP, Seed: job.SeedFor()},
		Exit:       engine.Exit{Threshold: job.ExitThreshold, MaxDepth: cmp.Or(job.MaxDepth, w.opt.MaxSteps)},
		StopTokens: w.opt.StopTokens,
		Deadline:   job.Deadline,
	}
	start := time.Now()
	// A stop string ends the engine's work without ending the request.
	ectx, ecancel := context.WithCancel(ctx)
	defer ecancel()
	events, err := w.gen.Submit(ectx, req)
	if err != nil {
		return Chunk{ID: job.ID, Done: true, Error: submitError(err)}
	}
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
					return Chunk{ID: job.ID, Done: true}
				}
				return Chunk{ID: job.ID, Done: true, Error: engineError(ev.Err)}
			}
			finish = ev.Finish
			break
		}
		now := time.Now()
		if n == 0 {
			w.observeTTFT(now.Sub(start))
			if w.met != nil {
				w.met.batch.Inc()
				defer w.met.batch.Dec()
			}
		} else {
			w.observeITL(now.Sub(last))
		}
		last = now
		w.observeToken(ev.Token)
		text := ""
		if !isStop(ev.Token.ID, w.opt.StopTokens) {
			text = dec.Add(ev.Token.ID)
		}
		text, hit := stops.add(text)
		c := Chunk{ID: job.ID, Index: n, Text: text, Tokens: []int{ev.Token.ID}, Depths: []int{ev.Token.Depth}}
		n++
		w.send(reply, c)
		if hit {
			finish, ended = "stop", true
			ecancel()
		}
	}
	if ctx.Err() != nil && !ended {
		return Chunk{ID: job.ID, Done: true}
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
	return Chunk{ID: job.ID, Index: n, Text: tail, Done: true, Finish: finish,
		Usage: &Usage{PromptTokens: len(prompt), CompletionTokens: n, TotalTokens: len(prompt) + n}}
}

func isStop(id int, stops []int) bool {
	for _, s := range stops {
		if id == s {
			return true
		}
	}
	return false
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

func (w *Worker) send(reply string, c Chunk) {
	if reply == "" {
		return
	}
	w.mu.Lock()
	w.history(c.ID).add(c)
	w.mu.Unlock()
	b, _ := json.Marshal(c)
	if err := w.nc.Publish(reply, b); err != nil {
		w.log.Debug("publishing chunk", "request", c.ID, "err", err)
	}
}

// finish sends the final chunk as a request and resends whatever the gateway reports missing.
// It returns false only when the worker is stopping (the message must then stay un-acked).
func (w *Worker) finish(ctx context.Context, reply string, final Chunk) bool {
	b, _ := json.Marshal(final)
	deadline := time.Now().Add(30 * time.Second)
	var silentSince time.Time
	for attempt := 0; ; attempt++ {
		if ctx.Err() != nil {
			return false
		}
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := w.nc.RequestWithContext(rctx, reply, b)
		cancel()
		switch {
		case errors.Is(err, nats.ErrNoResponders):
			// The gateway has it all and left, or its client is gone; or, right after a NATS
			// restart, its subscription is not back yet. Only a lasting silence means gone.
			if silentSince.IsZero() {
				silentSince = time.Now()
			}
			if time.Since(silentSince) > noResponderGrace {
				return true
			}
			sleepCtx(ctx, 200*time.Millisecond)
			continue
		case err != nil:
			if ctx.Err() != nil {
				return false
			}
			if time.Now().After(deadline) {
				w.log.Warn("gateway never confirmed the final chunk", "request", final.ID, "err", err)
				return true
			}
			sleepCtx(ctx, time.Duration(min(attempt+1, 5))*100*time.Millisecond)
			continue
		}
		var fr finalReply
		if err := json.Unmarshal(resp.Data, &fr); err != nil || fr.Next >= final.Index || final.Error != nil {
			return true
		}
		w.mu.Lock()
		missing := w.history(final.ID).from(fr.Next)
		w.mu.Unlock()
		for _, c := range missing {
			cb, _ := json.Marshal(c)
			_ = w.nc.Publish(reply, cb)
		}
	}
}

// noResponderGrace is how long a final chunk may find no gateway listening before the worker
// concludes that the gateway is gone (rather than reconnecting) and acks the request.
const noResponderGrace = 3 * time.Second

// chunkHistory holds one request's published chunks in index order.
type chunkHistory struct{ chunks []Chunk }

func (h *chunkHistory) add(c Chunk) {
	if c.Index < len(h.chunks) { // the same request running twice here (a redelivery)
		h.chunks[c.Index] = c
		return
	}
	h.chunks = append(h.chunks, c)
}

func (h *chunkHistory) from(i int) []Chunk {
	if i < 0 || i >= len(h.chunks) {
		return nil
	}
	return append([]Chunk(nil), h.chunks[i:]...)
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
