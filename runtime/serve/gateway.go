package serve

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/loopserve/loopserve/bus"
)

// GatewayOptions configure a Gateway. The zero value works: no auth, 1 MiB bodies.
type GatewayOptions struct {
	MaxBodyBytes   int64               // request body limit; 0 = 1 MiB
	Tokens         []string            // bearer tokens accepted on /v1/ (SetTokens replaces them); empty = no authentication
	RequestTimeout time.Duration       // whole request, queueing included; 0 = 10 minutes
	RetryAfter     time.Duration       // advised on 429 and 503; 0 = 1s
	Metrics        *Metrics            // nil: no gateway metrics
	Gatherer       prometheus.Gatherer // served at /metrics; nil: no /metrics
	Logger         *slog.Logger
}

// Gateway is the OpenAI-compatible HTTP front: it routes requests to LoopModels found in the
// loopserve_models KV registry (followed live) through their JetStream work queues, and streams
// the workers' chunks back. Create it with NewGateway, call Run for the registry watcher, and
// serve it as an http.Handler. Safe for concurrent use.
type Gateway struct {
	nc  *nats.Conn
	js  jetstream.JetStream
	opt GatewayOptions
	log *slog.Logger
	mux *http.ServeMux

	tokens atomic.Pointer[[]string] // accepted bearer tokens; empty = no authentication

	mu     sync.RWMutex
	models map[string]bus.ModelEntry // by ID "<ns>/<name>"
	ready  chan struct{}             // closed once the registry's current entries are loaded
	once   sync.Once
}

// NewGateway prepares a gateway; Run starts following the registry.
func NewGateway(nc *nats.Conn, o GatewayOptions) (*Gateway, error) {
	if o.MaxBodyBytes <= 0 {
		o.MaxBodyBytes = 1 << 20
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 10 * time.Minute
	}
	if o.RetryAfter <= 0 {
		o.RetryAfter = time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("opening JetStream: %w", err)
	}
	g := &Gateway{nc: nc, js: js, opt: o, log: o.Logger, models: make(map[string]bus.ModelEntry), ready: make(chan struct{})}
	g.SetTokens(o.Tokens)
	g.mux = http.NewServeMux()
	g.mux.HandleFunc("POST /v1/completions", g.auth(func(w http.ResponseWriter, r *http.Request) { g.complete(w, r, false) }))
	g.mux.HandleFunc("POST /v1/chat/completions", g.auth(func(w http.ResponseWriter, r *http.Request) { g.complete(w, r, true) }))
	g.mux.HandleFunc("GET /v1/models", g.auth(g.listModels))
	g.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	if o.Gatherer != nil {
		g.mux.Handle("GET /metrics", promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{}))
	}
	g.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		// The catch-all hides ServeMux's own 405, so answer it here for the routes above.
		allow := map[string]string{"/v1/completions": http.MethodPost, "/v1/chat/completions": http.MethodPost,
			"/v1/models": http.MethodGet, "/healthz": http.MethodGet, "/metrics": http.MethodGet}[r.URL.Path]
		if allow != "" && (r.URL.Path != "/metrics" || o.Gatherer != nil) {
			w.Header().Set("Allow", allow)
			(&apiError{Status: http.StatusMethodNotAllowed, Type: "invalid_request_error",
				Message: fmt.Sprintf("%s %s: method not allowed (use %s)", r.Method, r.URL.Path, allow)}).write(w)
			return
		}
		(&apiError{Status: http.StatusNotFound, Type: "invalid_request_error", Message: fmt.Sprintf("no route %s %s", r.Method, r.URL.Path)}).write(w)
	})
	return g, nil
}

// SetTokens replaces the accepted bearer tokens (a rotated Secret) for the requests that follow;
// an empty list turns authentication off. Safe for concurrent use with ServeHTTP.
func (g *Gateway) SetTokens(tokens []string) {
	t := slices.Clone(tokens)
	g.tokens.Store(&t)
}

// ServeHTTP serves /v1/completions, /v1/chat/completions, /v1/models, /healthz and /metrics.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) { g.mux.ServeHTTP(w, r) }

// Ready is closed once the registry's entries present at start are loaded.
func (g *Gateway) Ready() <-chan struct{} { return g.ready }

// Run follows the registry until ctx ends. After a reconnection (a NATS restart loses the
// watcher's consumer) it watches again from scratch, so entries changed meanwhile are seen.
func (g *Gateway) Run(ctx context.Context) error {
	status := g.nc.StatusChanged(nats.CONNECTED)
	defer g.nc.RemoveStatusListener(status)
	for {
		err := g.follow(ctx, status)
		if ctx.Err() != nil {
			return nil
		}
		if !errors.Is(err, errReconnected) {
			g.log.Warn("following the model registry", "err", err)
			sleepCtx(ctx, 500*time.Millisecond)
		}
	}
}

var errReconnected = errors.New("reconnected to NATS")

// follow watches the registry until ctx ends (nil), the connection is re-established
// (errReconnected) or the watch fails. The map is replaced once the current values are in.
func (g *Gateway) follow(ctx context.Context, status <-chan nats.Status) error {
	kv, err := bus.Registry(ctx, g.js)
	if err != nil {
		return err
	}
	watcher, err := kv.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watching %s: %w", bus.RegistryBucket, err)
	}
	defer func() { _ = watcher.Stop() }()
	fresh := make(map[string]bus.ModelEntry)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-status:
			return errReconnected
		case e, ok := <-watcher.Updates():
			if !ok {
				return fmt.Errorf("watching %s: updates ended", bus.RegistryBucket)
			}
			if e == nil { // the current values are all in
				if fresh != nil {
					g.mu.Lock()
					g.models, fresh = fresh, nil
					g.mu.Unlock()
					g.once.Do(func() { close(g.ready) })
				}
				continue
			}
			if fresh != nil {
				g.apply(fresh, e)
				continue
			}
			g.mu.Lock()
			g.apply(g.models, e)
			g.mu.Unlock()
		}
	}
}

func (g *Gateway) apply(models map[string]bus.ModelEntry, e jetstream.KeyValueEntry) {
	ns, name, _ := strings.Cut(e.Key(), ".")
	id := bus.Ref{Namespace: ns, Name: name}.String()
	if e.Operation() != jetstream.KeyValuePut {
		delete(models, id)
		return
	}
	m, err := bus.DecodeModel(e.Value())
	if err != nil {
		g.log.Warn("ignoring registry entry", "key", e.Key(), "err", err)
		return
	}
	models[m.ID()] = m
}

// lookup finds a model by "<ns>/<name>", or by bare name when only one namespace has it.
func (g *Gateway) lookup(id string) (bus.ModelEntry, bool) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	if m, ok := g.models[id]; ok {
		return m, true
	}
	var found []bus.ModelEntry
	for _, m := range g.models {
		if m.Name == id {
			found = append(found, m)
		}
	}
	if len(found) == 1 {
		return found[0], true
	}
	return bus.ModelEntry{}, false
}

func (g *Gateway) auth(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		tokens := *g.tokens.Load()
		if len(tokens) == 0 {
			h(w, r)
			return
		}
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		valid := 0
		for _, t := range tokens {
			valid |= subtle.ConstantTimeCompare([]byte(tok), []byte(t))
		}
		if !ok || valid == 0 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="loopserve"`)
			(&apiError{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_api_key",
				Message: "missing or invalid bearer token"}).write(w)
			return
		}
		h(w, r)
	}
}

func (g *Gateway) listModels(w http.ResponseWriter, _ *http.Request) {
	g.mu.RLock()
	out := modelList{Object: "list", Data: []modelObject{}}
	for _, m := range g.models {
		out.Data = append(out.Data, modelObject{ID: m.ID(), Object: "model", Created: m.Updated.Unix(), OwnedBy: m.Namespace,
			ContextLength: m.ContextLength, ExitThreshold: m.ExitThreshold, MaxSteps: m.MaxSteps, Ready: m.Ready})
	}
	g.mu.RUnlock()
	slices.SortFunc(out.Data, func(a, b modelObject) int { return strings.Compare(a.ID, b.ID) })
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

func newID(prefix string) string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// statusWriter remembers the status for the request counter.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (s *statusWriter) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (g *Gateway) complete(rw http.ResponseWriter, r *http.Request, chat bool) {
	received := time.Now()
	w := &statusWriter{ResponseWriter: rw}
	var gm *gatewayMetrics
	defer func() {
		if gm == nil && g.opt.Metrics != nil {
			gm = g.opt.Metrics.gateway("")
		}
		if gm != nil {
			gm.count(w.status)
		}
	}()

	r.Body = http.MaxBytesReader(w, r.Body, g.opt.MaxBodyBytes)
	var req openAIRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			(&apiError{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error",
				Message: fmt.Sprintf("request body exceeds %d bytes", tooBig.Limit)}).write(w)
			return
		}
		badRequest("", "invalid JSON body: %v", err).write(w)
		return
	}
	if req.Model == "" {
		badRequest("model", "model is required").write(w)
		return
	}
	entry, ok := g.lookup(req.Model)
	if !ok {
		(&apiError{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "model_not_found", Param: "model",
			Message: fmt.Sprintf("the model %q does not exist", req.Model)}).write(w)
		return
	}
	if g.opt.Metrics != nil {
		gm = g.opt.Metrics.gateway(entry.ID())
		gm.inflight.Inc()
		defer gm.inflight.Dec()
	}
	prefix, object := "cmpl-", "text_completion"
	if chat {
		prefix, object = "chatcmpl-", "chat.completion"
	}
	id := newID(prefix)
	job, aerr := req.toJob(id, entry, chat, received)
	if aerr != nil {
		aerr.write(w)
		return
	}
	if !entry.Ready {
		w.Header().Set("Retry-After", g.retryAfter())
		(&apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "model_not_ready",
			Message: fmt.Sprintf("the model %q is not ready", entry.ID())}).write(w)
		return
	}

	ctx, cancel := context.WithTimeout(r.Context(), g.opt.RequestTimeout)
	defer cancel()
	// A plain inbox, not one under the connection's request mux: once unsubscribed, a worker's
	// final-chunk request gets "no responders" at once instead of timing out.
	inbox := g.nc.NewInbox()
	sub, err := g.nc.SubscribeSync(inbox)
	if err != nil {
		g.unavailable(w, fmt.Errorf("subscribing to the reply subject: %w", err))
		return
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := sub.SetPendingLimits(-1, 64<<20); err != nil {
		g.unavailable(w, err)
		return
	}
	body, _ := json.Marshal(job)
	msg := &nats.Msg{Subject: entry.Ref().RequestSubject(), Data: body, Header: nats.Header{}}
	msg.Header.Set(HeaderReply, inbox)
	pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = g.js.PublishMsg(pctx, msg, jetstream.WithMsgID(id))
	pcancel()
	if err != nil {
		if queueFull(err) {
			w.Header().Set("Retry-After", g.retryAfter())
			(&apiError{Status: http.StatusTooManyRequests, Type: "rate_limit_error", Code: "queue_full",
				Message: fmt.Sprintf("the queue of %q is full; retry later", entry.ID())}).write(w)
			return
		}
		// A publish that timed out may still have been stored: make sure no worker runs it.
		_ = g.nc.Publish(entry.Ref().CancelSubject(), []byte(id))
		g.unavailable(w, fmt.Errorf("queueing the request: %w", err))
		return
	}

	out := &responder{w: w, id: id, object: object, model: entry.ID(), chat: chat, created: received.Unix(), stream: req.Stream,
		includeUsage: req.StreamOptions != nil && req.StreamOptions.IncludeUsage}
	err = g.collect(ctx, sub, id, out, func() {
		if gm != nil {
			gm.ttft.Observe(time.Since(received).Seconds())
		}
	})
	if err != nil {
		// Tell the worker to stop generating for nobody.
		_ = g.nc.Publish(entry.Ref().CancelSubject(), []byte(id))
		if r.Context().Err() != nil {
			return // the client left
		}
		out.fail(&apiError{Status: http.StatusGatewayTimeout, Type: "server_error", Code: "timeout",
			Message: fmt.Sprintf("no complete answer within %s", g.opt.RequestTimeout)})
	}
}

func (g *Gateway) retryAfter() string {
	return strconv.Itoa(int(max(1, g.opt.RetryAfter.Round(time.Second)/time.Second)))
}

func (g *Gateway) unavailable(w http.ResponseWriter, err error) {
	g.log.Warn("request not queued", "err", err)
	w.Header().Set("Retry-After", g.retryAfter())
	(&apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Message: err.Error()}).write(w)
}

// queueFull reports a JetStream publish refused because the work-queue stream is at its limit.
func queueFull(err error) bool {
	var ae *jetstream.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode == 10077 || strings.Contains(ae.Description, "maximum messages") || strings.Contains(ae.Description, "maximum bytes")
	}
	return strings.Contains(err.Error(), "maximum messages exceeded")
}

// collect reads a request's chunks in index order, dropping duplicates (a redelivered request
// repeats them) and holding early ones, and hands them to out until the final chunk.
func (g *Gateway) collect(ctx context.Context, sub *nats.Subscription, id string, out *responder, first func()) error {
	next := 0
	ahead := make(map[int]Chunk)
	gotFirst := false
	for {
		m, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			return err
		}
		var c Chunk
		if err := json.Unmarshal(m.Data, &c); err != nil || (c.ID != id && c.ID != "") {
			continue
		}
		if c.Done {
			complete := c.Error != nil || next >= c.Index
			if m.Reply != "" {
				b, _ := json.Marshal(finalReply{Next: next})
				_ = m.Respond(b)
			}
			if !complete {
				continue // the worker resends what is missing, then the final chunk again
			}
			if !gotFirst {
				first()
			}
			if c.Error != nil {
				out.fail(&apiError{Status: c.Error.Status, Type: c.Error.Type, Code: c.Error.Code, Param: c.Error.Param, Message: c.Error.Message})
				return nil
			}
			out.finish(c)
			return nil
		}
		switch {
		case c.Index < next:
			continue
		case c.Index > next:
			if len(ahead) < 1<<16 {
				ahead[c.Index] = c
			}
			continue
		}
		for {
			if !gotFirst {
				gotFirst = true
				first()
			}
			out.token(c)
			next++
			var ok bool
			if c, ok = ahead[next]; !ok {
				break
			}
			delete(ahead, next)
		}
	}
}

// responder writes one request's answer, streamed (SSE) or whole.
type responder struct {
	w            http.ResponseWriter
	id, object   string
	model        string
	chat         bool
	created      int64
	stream       bool
	includeUsage bool

	started  bool // SSE headers sent
	roleSent bool
	text     strings.Builder
	depths   []int
	tokens   int
}

func (o *responder) token(c Chunk) {
	o.tokens += len(c.Tokens)
	o.depths = append(o.depths, c.Depths...)
	if !o.stream {
		o.text.WriteString(c.Text)
		return
	}
	o.event(c.Text, c.Depths, nil, nil)
}

func (o *responder) begin() {
	if o.started {
		return
	}
	o.started = true
	h := o.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	o.w.WriteHeader(http.StatusOK)
}

func (o *responder) event(text string, depths []int, finish *string, usage *Usage) {
	o.begin()
	if depths == nil {
		depths = []int{}
	}
	resp := openAIResponse{ID: o.id, Object: o.object, Created: o.created, Model: o.model}
	if o.chat {
		resp.Object = "chat.completion.chunk"
		d := &chatDelta{Content: text}
		if !o.sentRole() {
			d.Role = "assistant"
		}
		resp.Choices = []any{chatChoice{Delta: d, FinishReason: finish, LoopDepths: depths}}
	} else {
		resp.Choices = []any{completionChoice{Text: text, FinishReason: finish, LoopDepths: depths}}
	}
	if usage != nil {
		resp.Choices = []any{}
		resp.Usage = usage
	}
	o.write(resp)
}

// sentRole is true after the first chat chunk: OpenAI sends the role once.
func (o *responder) sentRole() bool {
	sent := o.roleSent
	o.roleSent = true
	return sent
}

func (o *responder) write(v any) {
	b, _ := json.Marshal(v)
	_, _ = fmt.Fprintf(o.w, "data: %s\n\n", b)
	_ = http.NewResponseController(o.w).Flush()
}

func (o *responder) finish(c Chunk) {
	finish := c.Finish
	usage := c.Usage
	if usage == nil {
		usage = &Usage{CompletionTokens: o.tokens, TotalTokens: o.tokens}
	}
	if o.stream {
		o.event(c.Text, nil, &finish, nil)
		if o.includeUsage {
			o.event("", nil, nil, usage)
		}
		_, _ = fmt.Fprint(o.w, "data: [DONE]\n\n")
		_ = http.NewResponseController(o.w).Flush()
		return
	}
	o.text.WriteString(c.Text)
	depths := o.depths
	if depths == nil {
		depths = []int{}
	}
	resp := openAIResponse{ID: o.id, Object: o.object, Created: o.created, Model: o.model, Usage: usage}
	if o.chat {
		resp.Choices = []any{chatChoice{Message: &Message{Role: "assistant", Content: o.text.String()}, FinishReason: &finish, LoopDepths: depths}}
	} else {
		resp.Choices = []any{completionChoice{Text: o.text.String(), FinishReason: &finish, LoopDepths: depths}}
	}
	o.w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(o.w).Encode(resp)
}

// fail answers with an OpenAI error: as the status and body when nothing was sent yet, else as
// a final SSE event.
func (o *responder) fail(e *apiError) {
	if !o.started {
		e.write(o.w)
		return
	}
	o.write(map[string]any{"error": map[string]any{"message": e.Message, "type": e.Type, "code": e.Code}})
	_, _ = fmt.Fprint(o.w, "data: [DONE]\n\n")
	_ = http.NewResponseController(o.w).Flush()
}
