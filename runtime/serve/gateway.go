package serve

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	rnd "math/rand/v2"
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
	RetryAfter     time.Duration       // advised on 503; 0 = 1s
	PublishRetry   time.Duration       // how long a request's publish is retried while JetStream elects a leader; 0 = 5s
	Heartbeat      time.Duration       // liveness key rewrite period, well below the bucket's TTL; 0 = bus.GatewayHeartbeat
	ID             string              // the gateway's id: its reply inbox and liveness key; "" = random
	Metrics        *Metrics            // nil: no gateway metrics
	Gatherer       prometheus.Gatherer // served at /metrics; nil: no /metrics
	Logger         *slog.Logger
}

// Gateway is the OpenAI-compatible HTTP front: it routes requests to LoopModels found in the
// loopserve_models KV registry (followed live) through their JetStream work queues, and streams
// the workers' chunks back. Create it with NewGateway, call Run (registry watcher, reply inbox,
// liveness heartbeat, advisories), and serve it as an http.Handler. Safe for concurrent use.
//
// It only binds to what the operator created (the registry and liveness buckets, the streams):
// it never creates or changes streams or buckets.
type Gateway struct {
	nc  *nats.Conn
	js  jetstream.JetStream
	opt GatewayOptions
	log *slog.Logger
	mux *http.ServeMux
	id  string

	tokens atomic.Pointer[[]string] // accepted bearer tokens; empty = no authentication

	mu     sync.RWMutex
	models map[string]bus.ModelEntry // by ID "<ns>/<name>"
	loaded atomic.Bool               // the registry's current entries are in
	beat   atomic.Int64              // unix nanoseconds of the last liveness write
	fresh  atomic.Int64              // how old the last write may be: the bucket's TTL less a heartbeat
	ready  chan struct{}             // closed once loaded and beat are first true
	once   sync.Once

	wmu      sync.Mutex
	waiters  map[string]*waiter // request id -> the HTTP handler waiting for its chunks
	bySeq    map[seqKey]string  // stream sequence -> request id, for max-deliveries advisories
	stopping bool               // Run is ending: no more background work

	adm *admission
	bg  sync.WaitGroup // background work started on behalf of requests
}

type seqKey struct {
	stream string
	seq    uint64
}

// NewGateway prepares a gateway; Run starts it.
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
	if o.PublishRetry <= 0 {
		o.PublishRetry = 5 * time.Second
	}
	if o.Heartbeat <= 0 {
		o.Heartbeat = bus.GatewayHeartbeat
	}
	if o.PublishRetry > bus.DefaultDedupe/2 {
		return nil, fmt.Errorf("gateway options: PublishRetry %s must stay well inside the %s dedupe window", o.PublishRetry, bus.DefaultDedupe)
	}
	if o.ID == "" {
		o.ID = newID("gw")
	}
	if !bus.ValidGatewayID(o.ID) {
		return nil, fmt.Errorf("gateway options: ID %q must be letters, digits, '-' or '_'", o.ID)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("opening JetStream: %w", err)
	}
	g := &Gateway{nc: nc, js: js, opt: o, log: o.Logger.With("gateway", o.ID), id: o.ID, models: make(map[string]bus.ModelEntry),
		ready: make(chan struct{}), waiters: make(map[string]*waiter), bySeq: make(map[seqKey]string)}
	g.adm = newAdmission(js, &g.bg)
	g.fresh.Store(int64(bus.GatewayTTL - o.Heartbeat))
	g.SetTokens(o.Tokens)
	g.mux = http.NewServeMux()
	g.mux.HandleFunc("POST /v1/completions", g.auth(func(w http.ResponseWriter, r *http.Request) { g.complete(w, r, false) }))
	g.mux.HandleFunc("POST /v1/chat/completions", g.auth(func(w http.ResponseWriter, r *http.Request) { g.complete(w, r, true) }))
	g.mux.HandleFunc("GET /v1/models", g.auth(g.listModels))
	g.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	g.mux.HandleFunc("GET /readyz", g.readyz)
	if o.Gatherer != nil {
		g.mux.Handle("GET /metrics", promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{}))
	}
	g.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		// The catch-all hides ServeMux's own 405, so answer it here for the routes above.
		allow := map[string]string{"/v1/completions": http.MethodPost, "/v1/chat/completions": http.MethodPost,
			"/v1/models": http.MethodGet, "/healthz": http.MethodGet, "/readyz": http.MethodGet, "/metrics": http.MethodGet}[r.URL.Path]
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

// ID is the gateway's id: its replies arrive under bus.GatewayInbox(ID), and its liveness key
// in bus.GatewaysBucket has this name.
func (g *Gateway) ID() string { return g.id }

// SetTokens replaces the accepted bearer tokens (a rotated Secret) for the requests that follow;
// an empty list turns authentication off. Safe for concurrent use with ServeHTTP.
func (g *Gateway) SetTokens(tokens []string) {
	t := slices.Clone(tokens)
	g.tokens.Store(&t)
}

// ServeHTTP serves /v1/completions, /v1/chat/completions, /v1/models, /healthz, /readyz and /metrics.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) { g.mux.ServeHTTP(w, r) }

// Ready is closed once the registry's entries present at start are loaded (or the registry was
// found not to exist yet) and the gateway's liveness key is written.
func (g *Gateway) Ready() <-chan struct{} { return g.ready }

func (g *Gateway) markReady() {
	if g.loaded.Load() && g.beat.Load() != 0 {
		g.once.Do(func() { close(g.ready) })
	}
}

// notReady says why the gateway should not be sent requests now, or "" when it can take them:
// the registry must be loaded, the liveness key fresh (workers cancel the requests of a gateway
// without one) and, for the readiness probe only, NATS connected. A request arriving while NATS
// reconnects is not refused: its publish is retried for PublishRetry.
func (g *Gateway) notReady() string {
	if why := g.cannotServe(); why != "" {
		return why
	}
	if !g.nc.IsConnected() {
		return "NATS is " + g.nc.Status().String()
	}
	return ""
}

// cannotServe says why the gateway cannot take a request now, or "".
func (g *Gateway) cannotServe() string {
	if !g.loaded.Load() {
		return "the model registry is not loaded yet"
	}
	if beat := g.beat.Load(); beat == 0 || time.Since(time.Unix(0, beat)) > time.Duration(g.fresh.Load()) {
		return "the gateway's liveness key in " + bus.GatewaysBucket + " is not fresh (does the bucket exist?)"
	}
	return ""
}

func (g *Gateway) readyz(w http.ResponseWriter, _ *http.Request) {
	if why := g.notReady(); why != "" {
		http.Error(w, why, http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte("ok\n"))
}

// Run follows the registry, receives replies and max-deliveries advisories, and keeps the
// gateway's liveness key fresh until ctx ends; then it deletes the key and returns once all its
// goroutines have. After a reconnection (a NATS restart loses the watcher's consumer) it
// watches the registry again from scratch, so entries changed meanwhile are seen.
func (g *Gateway) Run(ctx context.Context) error {
	inbox, err := g.nc.Subscribe(bus.GatewayInbox(g.id)+".*", g.dispatch)
	if err != nil {
		return fmt.Errorf("subscribing to %s: %w", bus.GatewayInbox(g.id), err)
	}
	// Chunks over the limit are dropped and resent on the final chunk's answer.
	if err := inbox.SetPendingLimits(-1, 256<<20); err != nil {
		_ = inbox.Unsubscribe()
		return err
	}
	adv, err := g.nc.Subscribe(bus.MaxDeliveriesSubject, g.maxDeliveries)
	if err != nil {
		_ = inbox.Unsubscribe()
		return fmt.Errorf("subscribing to %s: %w", bus.MaxDeliveriesSubject, err)
	}
	g.adm.run(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { g.heartbeat(ctx) })
	defer func() {
		_ = adv.Unsubscribe()
		_ = inbox.Unsubscribe()
		wg.Wait()
		g.adm.stop()
		// Requests still waiting can get no more chunks: tell their clients now.
		g.wmu.Lock()
		g.stopping = true
		for _, w := range g.waiters {
			w.fail(&apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "gateway_stopping",
				Message: "the gateway is stopping; send the request again"})
		}
		g.wmu.Unlock()
		g.bg.Wait()
	}()

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

// heartbeat writes the liveness key every Heartbeat and deletes it when ctx ends.
func (g *Gateway) heartbeat(ctx context.Context) {
	var kv jetstream.KeyValue
	failing := false
	body, _ := json.Marshal(map[string]any{"inbox": bus.GatewayInbox(g.id), "started": time.Now().UTC()})
	beat := func() {
		bctx, cancel := context.WithTimeout(ctx, g.opt.Heartbeat)
		defer cancel()
		var err error
		if kv == nil {
			if kv, err = bus.OpenGateways(bctx, g.js); err == nil {
				g.learnTTL(bctx, kv)
			}
		}
		if err == nil {
			_, err = kv.Put(bctx, g.id, body)
		}
		switch {
		case err == nil:
			g.beat.Store(time.Now().UnixNano())
			g.markReady()
			if failing {
				g.log.Info("liveness key written again")
			}
			failing = false
		case ctx.Err() == nil && !failing:
			g.log.Warn("writing the liveness key", "bucket", bus.GatewaysBucket, "err", err)
			failing = true
		}
	}
	beat()
	t := time.NewTicker(g.opt.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if kv != nil {
				dctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				_ = kv.Delete(dctx, g.id) // workers stop generating for this gateway at once
				cancel()
			}
			return
		case <-t.C:
			beat()
		}
	}
}

// learnTTL sets how fresh the liveness key must be from the bucket's TTL.
func (g *Gateway) learnTTL(ctx context.Context, kv jetstream.KeyValue) {
	st, err := kv.Status(ctx)
	if err != nil || st.TTL() <= 0 {
		return
	}
	if st.TTL() < 2*g.opt.Heartbeat {
		g.log.Warn("the liveness bucket forgets keys faster than twice the heartbeat: workers may take this gateway for dead",
			"ttl", st.TTL(), "heartbeat", g.opt.Heartbeat)
	}
	g.fresh.Store(int64(st.TTL() - g.opt.Heartbeat))
}

var errReconnected = errors.New("reconnected to NATS")

// follow watches the registry until ctx ends (nil), the connection is re-established
// (errReconnected) or the watch fails. The map is replaced once the current values are in. A
// registry that does not exist yet counts as empty, and is looked for again every second.
func (g *Gateway) follow(ctx context.Context, status <-chan nats.Status) error {
	kv, err := bus.OpenRegistry(ctx, g.js)
	if errors.Is(err, bus.ErrRegistryNotFound) {
		g.mu.Lock()
		g.models = make(map[string]bus.ModelEntry)
		g.mu.Unlock()
		if !g.loaded.Swap(true) {
			g.log.Info("no model registry yet: serving no models until the operator creates it", "bucket", bus.RegistryBucket)
		}
		g.markReady()
		select {
		case <-ctx.Done():
			return nil
		case <-status:
			return errReconnected
		case <-time.After(time.Second):
			return errReconnected // look again, quietly
		}
	}
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
					g.loaded.Store(true)
					g.markReady()
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

// bearer returns the token of an Authorization header; the scheme is case-insensitive (RFC 9110).
func bearer(h string) (string, bool) {
	scheme, tok, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	return strings.TrimSpace(tok), true
}

func (g *Gateway) auth(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		tokens := *g.tokens.Load()
		if len(tokens) == 0 {
			h(w, r)
			return
		}
		tok, ok := bearer(r.Header.Get("Authorization"))
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
		o := modelObject{ID: m.ID(), Object: "model", Created: m.Updated.Unix(), OwnedBy: m.Namespace,
			ContextLength: m.ContextLength, ExitThreshold: m.ExitThreshold, MaxSteps: m.MaxSteps, Ready: m.Ready, DefaultTier: m.DefaultTier}
		for _, name := range m.TierNames() {
			o.Tiers = append(o.Tiers, tierObject{Name: name, ExitThreshold: m.Tiers[name]})
		}
		out.Data = append(out.Data, o)
	}
	g.mu.RUnlock()
	slices.SortFunc(out.Data, func(a, b modelObject) int { return strings.Compare(a.ID, b.ID) })
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

func newID(prefix string) string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	if strings.HasSuffix(prefix, "-") {
		return prefix + hex.EncodeToString(b[:])
	}
	return prefix + "-" + hex.EncodeToString(b[:])
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

// Error codes of answers given before a request was queued: a client may retry them as they are.
const (
	codeNotReady    = "model_not_ready"
	codeUnavailable = "queue_unavailable"
	codeQueueFull   = "queue_full"
	codeOverloaded  = "overloaded"
)

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

	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.opt.MaxBodyBytes))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			(&apiError{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error",
				Message: fmt.Sprintf("request body exceeds %d bytes", tooBig.Limit)}).write(w)
			return
		}
		badRequest("", "reading the request body: %v", err).write(w)
		return
	}
	req, aerr := decodeRequest(body, chat)
	if aerr != nil {
		aerr.write(w)
		return
	}
	if h := r.Header.Get(HeaderTier); req.Tier == nil && h != "" {
		req.Tier = &h // the body's "tier" wins over the header
	}
	if req.Model == "" {
		badRequest("model", "model is required").write(w)
		return
	}
	if why := g.cannotServe(); why != "" {
		w.Header().Set("Retry-After", g.retryAfter(0))
		(&apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: codeUnavailable, Message: "the gateway is not ready: " + why}).write(w)
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
		w.Header().Set("Retry-After", g.retryAfter(0))
		(&apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: codeNotReady,
			Message: fmt.Sprintf("the model %q is not ready", entry.ID())}).write(w)
		return
	}
	ref := entry.Ref()
	if ok, wait := g.adm.check(ref, g.opt.RequestTimeout); !ok {
		w.Header().Set("Retry-After", g.retryAfter(wait))
		(&apiError{Status: http.StatusTooManyRequests, Type: "rate_limit_error", Code: codeOverloaded,
			Message: fmt.Sprintf("the queue of %q is estimated to take longer than the request timeout of %s; retry in %s",
				entry.ID(), g.opt.RequestTimeout, wait.Round(time.Second))}).write(w)
		return
	}

	ctx, cancel := context.WithTimeout(r.Context(), g.opt.RequestTimeout)
	defer cancel()
	job.Expires = received.Add(g.opt.RequestTimeout)
	msg := &nats.Msg{Subject: ref.RequestSubject(), Header: nats.Header{}}
	msg.Data, _ = json.Marshal(job)
	msg.Header.Set(HeaderReply, bus.ReplySubject(g.id, id))
	msg.Header.Set(jetstream.MsgIDHeader, id)
	if size, limit := msgSize(msg), g.nc.MaxPayload(); int64(size) > limit {
		(&apiError{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error",
			Message: fmt.Sprintf("the request encodes to %d bytes, over the %d bytes NATS accepts per message", size, limit)}).write(w)
		return
	}

	wt := g.register(id)
	defer g.unregister(id)
	ack, err := g.publish(ctx, msg, gm)
	if err != nil {
		g.refuse(w, entry, id, err)
		return
	}
	g.track(id, ack)

	out := &responder{w: w, id: id, object: object, model: entry.ID(), chat: chat, created: received.Unix(), stream: req.Stream,
		includeUsage: req.StreamOptions != nil && req.StreamOptions.IncludeUsage, choices: make([]choiceState, job.Choices()),
		logprobs: job.Logprobs}
	err = g.collect(ctx, wt, id, out, func() {
		if gm != nil {
			gm.ttft.Observe(time.Since(received).Seconds())
		}
	}, func(seconds float64) { g.adm.observe(ref, seconds) })
	if err != nil {
		// Tell the worker to stop generating for nobody.
		_ = g.nc.Publish(ref.CancelSubject(), []byte(id))
		if r.Context().Err() != nil {
			return // the client left
		}
		out.fail(&apiError{Status: http.StatusGatewayTimeout, Type: "server_error", Code: "timeout",
			Message: fmt.Sprintf("no complete answer within %s", g.opt.RequestTimeout)})
	}
}

// msgSize is the size NATS counts against max_payload: the payload plus the encoded headers.
func msgSize(m *nats.Msg) int {
	n := len(m.Data)
	if len(m.Header) > 0 {
		n += len("NATS/1.0\r\n\r\n")
		for k, vs := range m.Header {
			for _, v := range vs {
				n += len(k) + len(": \r\n") + len(v)
			}
		}
	}
	return n
}

// publish queues a request, retrying for up to PublishRetry while JetStream cannot take it
// (a stream leader being elected, a reconnection): always with the same Nats-Msg-Id, so a
// publish that was stored but whose answer was lost is not queued twice.
func (g *Gateway) publish(ctx context.Context, msg *nats.Msg, gm *gatewayMetrics) (*jetstream.PubAck, error) {
	deadline := time.Now().Add(g.opt.PublishRetry)
	pause := 50 * time.Millisecond
	for {
		attempt := time.Now().Add(2 * time.Second)
		if attempt.After(deadline) {
			attempt = deadline
		}
		actx, cancel := context.WithDeadline(ctx, attempt)
		ack, err := g.js.PublishMsg(actx, msg)
		cancel()
		if err == nil {
			return ack, nil
		}
		if ctx.Err() != nil || !retryable(err) || time.Now().Add(pause).After(deadline) {
			return nil, err
		}
		g.log.Debug("retrying a publish", "err", err)
		if gm != nil {
			gm.retries.Inc()
		}
		sleepCtx(ctx, pause/2+rnd.N(pause))
		pause = min(2*pause, 500*time.Millisecond)
	}
}

// retryable reports a publish error that a failover or a reconnection explains.
func retryable(err error) bool {
	if ae, ok := errors.AsType[*jetstream.APIError](err); ok {
		return (ae.Code == http.StatusServiceUnavailable && ae.ErrorCode != jetstream.ErrorCode(10077)) ||
			ae.Code == http.StatusTooManyRequests
	}
	return errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, nats.ErrDisconnected)
}

// queueFull reports a publish refused because the work-queue stream is at its limits. Other
// store failures (JetStream's error 10077 covers both) are not: they are 503s.
func queueFull(err error) bool {
	ae, ok := errors.AsType[*jetstream.APIError](err)
	if !ok || ae.ErrorCode != jetstream.ErrorCode(10077) {
		return false
	}
	d := ae.Description
	return strings.Contains(d, "maximum messages exceeded") || strings.Contains(d, "maximum bytes exceeded") ||
		strings.Contains(d, "maximum messages per subject exceeded")
}

// refuse answers a request that could not be queued: 429 when the queue is full, 503 otherwise.
// A publish that timed out may still have been stored: the cancel makes sure no worker runs it.
func (g *Gateway) refuse(w http.ResponseWriter, entry bus.ModelEntry, id string, err error) {
	if queueFull(err) {
		w.Header().Set("Retry-After", g.retryAfter(0))
		(&apiError{Status: http.StatusTooManyRequests, Type: "rate_limit_error", Code: codeQueueFull,
			Message: fmt.Sprintf("the queue of %q is full; retry later", entry.ID())}).write(w)
		return
	}
	_ = g.nc.Publish(entry.Ref().CancelSubject(), []byte(id))
	g.log.Warn("request not queued", "loopmodel", entry.ID(), "err", err)
	w.Header().Set("Retry-After", g.retryAfter(0))
	(&apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: codeUnavailable,
		Message: fmt.Sprintf("queueing the request: %v", err)}).write(w)
}

// retryAfter is the Retry-After value in whole seconds: at least wait, at least the configured one.
func (g *Gateway) retryAfter(wait time.Duration) string {
	d := max(wait, g.opt.RetryAfter)
	return strconv.FormatInt(max(1, int64(math.Ceil(d.Seconds()))), 10)
}

// waiter is one request's mailbox: the inbox subscription pushes its messages, the handler
// takes them. Messages over the bound are dropped; the worker resends what the final chunk's
// answer reports missing.
type waiter struct {
	mu     sync.Mutex
	queue  []*nats.Msg
	size   int
	failed *apiError
	signal chan struct{} // one pending wake-up
	seq    seqKey        // where the request is stored, once published (guarded by the gateway's wmu)
}

const waiterMaxBytes = 64 << 20

func (w *waiter) push(m *nats.Msg) {
	w.mu.Lock()
	if w.size+len(m.Data) <= waiterMaxBytes {
		w.queue = append(w.queue, m)
		w.size += len(m.Data)
	}
	w.mu.Unlock()
	w.wake()
}

func (w *waiter) fail(e *apiError) {
	w.mu.Lock()
	w.failed = e
	w.mu.Unlock()
	w.wake()
}

func (w *waiter) wake() {
	select {
	case w.signal <- struct{}{}:
	default:
	}
}

// next returns the next message, or the failure an advisory reported, or ctx's error.
func (w *waiter) next(ctx context.Context) (*nats.Msg, *apiError, error) {
	for {
		w.mu.Lock()
		if len(w.queue) > 0 {
			m := w.queue[0]
			w.queue[0] = nil
			w.queue = w.queue[1:]
			w.size -= len(m.Data)
			w.mu.Unlock()
			return m, nil, nil
		}
		failed := w.failed
		w.mu.Unlock()
		if failed != nil {
			return nil, failed, nil
		}
		select {
		case <-w.signal:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
	}
}

func (g *Gateway) register(id string) *waiter {
	w := &waiter{signal: make(chan struct{}, 1)}
	g.wmu.Lock()
	g.waiters[id] = w
	g.wmu.Unlock()
	return w
}

func (g *Gateway) track(id string, ack *jetstream.PubAck) {
	k := seqKey{ack.Stream, ack.Sequence}
	g.wmu.Lock()
	g.bySeq[k] = id
	if w := g.waiters[id]; w != nil {
		w.seq = k
	}
	g.wmu.Unlock()
}

func (g *Gateway) unregister(id string) {
	g.wmu.Lock()
	if w := g.waiters[id]; w != nil {
		delete(g.bySeq, w.seq)
	}
	delete(g.waiters, id)
	g.wmu.Unlock()
}

// dispatch hands a message on the gateway's inbox to the request it is for. A final chunk for a
// request nobody waits for (finished, timed out, client gone) is answered Gone, so its worker
// acks it at once.
func (g *Gateway) dispatch(m *nats.Msg) {
	id := m.Subject[strings.LastIndexByte(m.Subject, '.')+1:]
	g.wmu.Lock()
	w := g.waiters[id]
	g.wmu.Unlock()
	if w != nil {
		w.push(m)
		return
	}
	if m.Reply != "" {
		b, _ := json.Marshal(finalReply{Gone: true})
		_ = m.Respond(b)
	}
}

// maxDeliveries turns JetStream's advisory that a request reached MaxDeliver into an error for
// its client: its workers died on it every time (a poison request).
func (g *Gateway) maxDeliveries(m *nats.Msg) {
	a, err := bus.DecodeMaxDeliveries(m.Data)
	if err != nil {
		g.log.Warn("ignoring an advisory", "subject", m.Subject, "err", err)
		return
	}
	g.wmu.Lock()
	defer g.wmu.Unlock()
	id := g.bySeq[seqKey{a.Stream, a.StreamSeq}]
	w := g.waiters[id]
	if w == nil || g.stopping {
		return
	}
	g.log.Warn("request delivered to workers its maximum number of times", "request", id, "stream", a.Stream, "deliveries", a.Deliveries)
	// JetStream keeps it in the work queue, holding a slot until MaxAge: remove it.
	g.bg.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := g.js.Stream(ctx, a.Stream)
		if err == nil {
			err = s.DeleteMsg(ctx, a.StreamSeq)
		}
		if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			g.log.Warn("removing a request that reached MaxDeliver from its queue", "stream", a.Stream, "seq", a.StreamSeq, "err", err)
		}
	})
	w.fail(&apiError{Status: http.StatusInternalServerError, Type: "server_error", Code: "worker_failed",
		Message: fmt.Sprintf("the request was delivered to workers %d times and none finished it (each attempt ended with the worker failing); "+
			"it is not retried again", a.Deliveries)})
}

// collect reads a request's chunks in index order per choice, dropping duplicates (a
// redelivered request repeats them) and holding early ones, and hands them to out until the
// final chunk. first runs at the first token (or the end); served gets the worker's service time.
func (g *Gateway) collect(ctx context.Context, wt *waiter, id string, out *responder, first func(), served func(float64)) error {
	choices := len(out.choices)
	next := make([]int, choices)
	ahead := make([]map[int]Chunk, choices)
	gotFirst := false
	for {
		m, failed, err := wt.next(ctx)
		if err != nil {
			return err
		}
		if failed != nil {
			out.fail(failed)
			return nil
		}
		var c Chunk
		if err := json.Unmarshal(m.Data, &c); err != nil || c.ID != id || c.Choice < 0 || c.Choice >= choices {
			continue
		}
		if c.Done {
			complete := c.Error != nil || (len(c.Ends) == choices && slices.IndexFunc(c.Ends, func(e End) bool { return e.Tokens < 0 }) < 0)
			for i := 0; complete && c.Error == nil && i < choices; i++ {
				complete = next[i] >= c.Ends[i].Tokens
			}
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
			served(c.Elapsed) // the service time of answers only: refusals take none
			out.finish(c)
			return nil
		}
		ch := c.Choice
		switch {
		case c.Index < next[ch]:
			continue
		case c.Index > next[ch]:
			if ahead[ch] == nil {
				ahead[ch] = make(map[int]Chunk)
			}
			if len(ahead[ch]) < 1<<16 {
				ahead[ch][c.Index] = c
			}
			continue
		}
		for {
			if !gotFirst {
				gotFirst = true
				first()
			}
			out.token(c)
			next[ch]++
			var ok bool
			if c, ok = ahead[ch][next[ch]]; !ok {
				break
			}
			delete(ahead[ch], next[ch])
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
	logprobs     bool
	choices      []choiceState

	started bool // SSE headers sent
}

// choiceState accumulates one choice.
type choiceState struct {
	roleSent bool
	text     strings.Builder
	runes    int // runes of text so far (echo included): the next token's text_offset
	depths   []int
	lp       logprobsOut
}

// logprobsOut accumulates log-probabilities in both APIs' shapes.
type logprobsOut struct {
	completion completionLogprobs
	chat       []chatTokenLogprob
}

func (l *logprobsOut) add(chat bool, lp Logprob, offset int) {
	if chat {
		l.chat = append(l.chat, chatLogprob(lp))
		return
	}
	c := &l.completion
	c.Tokens = append(c.Tokens, lp.Token)
	c.TextOffset = append(c.TextOffset, offset)
	if lp.None {
		c.TokenLogprobs = append(c.TokenLogprobs, nil)
		c.TopLogprobs = append(c.TopLogprobs, nil)
		c.LoopDepths = append(c.LoopDepths, nil)
		return
	}
	v, d := lp.Logprob, lp.Depth
	c.TokenLogprobs = append(c.TokenLogprobs, &v)
	top := make(map[string]float32, len(lp.Top)+1)
	for _, t := range lp.Top {
		if _, dup := top[t.Token]; !dup { // two ids may share a text: keep the likelier
			top[t.Token] = t.Logprob
		}
	}
	if _, in := top[lp.Token]; !in { // the chosen token is always reported, as OpenAI does
		top[lp.Token] = lp.Logprob
	}
	c.TopLogprobs = append(c.TopLogprobs, top)
	c.LoopDepths = append(c.LoopDepths, &d)
}

func chatLogprob(lp Logprob) chatTokenLogprob {
	out := chatTokenLogprob{Token: lp.Token, Logprob: lp.Logprob, Bytes: byteList(lp.Bytes), LoopDepth: lp.Depth, TopLogprobs: []chatTopLogprob{}}
	for _, t := range lp.Top {
		out.TopLogprobs = append(out.TopLogprobs, chatTopLogprob{Token: t.Token, Logprob: t.Logprob, Bytes: byteList(t.Bytes)})
	}
	return out
}

func byteList(b []byte) []int {
	out := make([]int, len(b))
	for i, x := range b {
		out[i] = int(x)
	}
	return out
}

func runeCount(s string) int { return len([]rune(s)) }

// token takes one chunk of a choice (its echo first, when it carries one).
func (o *responder) token(c Chunk) {
	st := &o.choices[c.Choice]
	var lp logprobsOut
	text := c.Text
	if c.Echo != nil {
		offset := st.runes
		for _, p := range c.Echo.Logprobs {
			lp.add(o.chat, p, offset)
			offset += runeCount(p.Token)
		}
		text = c.Echo.Text + c.Text
		st.runes += runeCount(c.Echo.Text)
	}
	for _, p := range c.Logprobs {
		lp.add(o.chat, p, st.runes)
	}
	st.runes += runeCount(c.Text)
	st.depths = append(st.depths, c.Depths...)
	if !o.stream {
		st.text.WriteString(text)
		st.lp.completion.append(lp.completion)
		st.lp.chat = append(st.lp.chat, lp.chat...)
		return
	}
	o.event(c.Choice, text, c.Depths, &lp, nil)
}

func (c *completionLogprobs) append(x completionLogprobs) {
	c.Tokens = append(c.Tokens, x.Tokens...)
	c.TokenLogprobs = append(c.TokenLogprobs, x.TokenLogprobs...)
	c.TopLogprobs = append(c.TopLogprobs, x.TopLogprobs...)
	c.TextOffset = append(c.TextOffset, x.TextOffset...)
	c.LoopDepths = append(c.LoopDepths, x.LoopDepths...)
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

// logprobsField is a choice's logprobs value: null unless the request asked for them.
func (o *responder) logprobsField(lp *logprobsOut) any {
	if !o.logprobs || lp == nil {
		return nil
	}
	if o.chat {
		content := lp.chat
		if content == nil {
			content = []chatTokenLogprob{}
		}
		return &chatLogprobs{Content: content}
	}
	c := lp.completion
	if c.Tokens == nil {
		c = completionLogprobs{Tokens: []string{}, TokenLogprobs: []*float32{}, TopLogprobs: []map[string]float32{}, TextOffset: []int{}, LoopDepths: []*int{}}
	}
	return &c
}

func (o *responder) event(choice int, text string, depths []int, lp *logprobsOut, finish *string) {
	o.begin()
	if depths == nil {
		depths = []int{}
	}
	resp := openAIResponse{ID: o.id, Object: o.object, Created: o.created, Model: o.model}
	if o.chat {
		resp.Object = "chat.completion.chunk"
		d := &chatDelta{Content: text}
		if st := &o.choices[choice]; !st.roleSent {
			d.Role, st.roleSent = "assistant", true
		}
		resp.Choices = []any{chatChoice{Index: choice, Delta: d, Logprobs: o.logprobsField(lp), FinishReason: finish, LoopDepths: depths}}
	} else {
		resp.Choices = []any{completionChoice{Index: choice, Text: text, Logprobs: o.logprobsField(lp), FinishReason: finish, LoopDepths: depths}}
	}
	o.write(resp)
}

func (o *responder) write(v any) {
	var buf bytes.Buffer
	buf.WriteString("data: ")
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // special tokens such as <|im_end|> stay as they are
	_ = enc.Encode(v)        // ends with one "\n"
	buf.WriteString("\n")
	_, _ = o.w.Write(buf.Bytes())
	_ = http.NewResponseController(o.w).Flush()
}

func (o *responder) finish(c Chunk) {
	usage := c.Usage
	if usage == nil {
		usage = &Usage{}
	}
	if o.stream {
		for i, e := range c.Ends {
			finish := e.Finish
			o.event(i, e.Text, nil, nil, &finish)
		}
		if o.includeUsage {
			o.write(openAIResponse{ID: o.id, Object: o.streamObject(), Created: o.created, Model: o.model, Choices: []any{}, Usage: usage})
		}
		_, _ = fmt.Fprint(o.w, "data: [DONE]\n\n")
		_ = http.NewResponseController(o.w).Flush()
		return
	}
	resp := openAIResponse{ID: o.id, Object: o.object, Created: o.created, Model: o.model, Usage: usage}
	for i, e := range c.Ends {
		st := &o.choices[i]
		st.text.WriteString(e.Text)
		finish := e.Finish
		depths := st.depths
		if depths == nil {
			depths = []int{}
		}
		if o.chat {
			resp.Choices = append(resp.Choices, chatChoice{Index: i, Message: &Message{Role: "assistant", Content: st.text.String()},
				Logprobs: o.logprobsField(&st.lp), FinishReason: &finish, LoopDepths: depths})
		} else {
			resp.Choices = append(resp.Choices, completionChoice{Index: i, Text: st.text.String(), Logprobs: o.logprobsField(&st.lp),
				FinishReason: &finish, LoopDepths: depths})
		}
	}
	o.w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(o.w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(resp)
}

func (o *responder) streamObject() string {
	if o.chat {
		return "chat.completion.chunk"
	}
	return o.object
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

// Response bodies.

type completionChoice struct {
	Text         string  `json:"text"`
	Index        int     `json:"index"`
	Logprobs     any     `json:"logprobs"` // *completionLogprobs or null
	FinishReason *string `json:"finish_reason"`
	LoopDepths   []int   `json:"loop_depths"`
}

// completionLogprobs is the legacy completions shape, plus the loop depth of each token.
type completionLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []*float32           `json:"token_logprobs"`
	TopLogprobs   []map[string]float32 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
	LoopDepths    []*int               `json:"loop_depths"` // loopserve: the loop step whose logits scored each token
}

type chatDelta struct {
	Role    string `json:"role,omitempty"`
	Content string `json:"content,omitempty"`
}

type chatChoice struct {
	Index        int        `json:"index"`
	Message      *Message   `json:"message,omitempty"`
	Delta        *chatDelta `json:"delta,omitempty"`
	Logprobs     any        `json:"logprobs"` // *chatLogprobs or null
	FinishReason *string    `json:"finish_reason"`
	LoopDepths   []int      `json:"loop_depths"`
}

type chatLogprobs struct {
	Content []chatTokenLogprob `json:"content"`
	Refusal []chatTokenLogprob `json:"refusal"`
}

type chatTokenLogprob struct {
	Token       string           `json:"token"`
	Logprob     float32          `json:"logprob"`
	Bytes       []int            `json:"bytes"`
	TopLogprobs []chatTopLogprob `json:"top_logprobs"`
	LoopDepth   int              `json:"loop_depth"` // loopserve: the loop step whose logits scored the token
}

type chatTopLogprob struct {
	Token   string  `json:"token"`
	Logprob float32 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

type openAIResponse struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []any  `json:"choices"`
	Usage   *Usage `json:"usage,omitempty"`
}

type modelList struct {
	Object string        `json:"object"`
	Data   []modelObject `json:"data"`
}

type modelObject struct {
	ID            string       `json:"id"`
	Object        string       `json:"object"`
	Created       int64        `json:"created"`
	OwnedBy       string       `json:"owned_by"`
	ContextLength int          `json:"context_length"`
	ExitThreshold float64      `json:"exit_threshold"` // the default tier's
	MaxSteps      int          `json:"max_steps"`
	Ready         bool         `json:"ready"`
	DefaultTier   string       `json:"default_tier,omitempty"`
	Tiers         []tierObject `json:"tiers,omitempty"` // τ in force per quality tier, by name
}

type tierObject struct {
	Name          string  `json:"name"`
	ExitThreshold float64 `json:"exit_threshold"`
}
