// Package chaos runs the whole serving path on a JetStream cluster of three embedded NATS
// servers (R3 work queue and registry, fsync on every write), the real gateway and real workers
// on a model, under steady load from streaming clients, and injects faults: the stream's leader
// killed and later restarted, workers killed mid-generation. It checks every answer a client got
// against the answer the same request gave before any fault and counts accepted, completed,
// failed-cleanly, lost and duplicated requests. The serving tests run a short scripted plan;
// `loopserve bench chaos` runs random faults for minutes.
package chaos

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/serve"
	"github.com/loopserve/loopserve/runtime/serve/loadtest"
)

// Fault is one injected failure.
type Fault string

const (
	// KillStreamLeader kills the NATS node leading the work-queue stream.
	KillStreamLeader Fault = "kill-stream-leader"
	// KillNode kills a random running NATS node (never a second one: quorum stays).
	KillNode Fault = "kill-node"
	// KillGatewayNode kills the NATS node the gateway is connected to: its streams in flight
	// lose chunks and their final chunks find no gateway until it reconnects elsewhere.
	KillGatewayNode Fault = "kill-gateway-node"
	// RestartNodes restarts every killed NATS node with its store, and waits until the stream's
	// replicas are current again.
	RestartNodes Fault = "restart-nodes"
	// KillWorker kills a worker that is generating (no drain, connection dropped, requests left
	// un-acked) and starts a fresh one in its place.
	KillWorker Fault = "kill-worker"
)

// Options describe a run. ModelDir and Dir are required.
type Options struct {
	ModelDir       string
	Dir            string        // NATS stores go below it
	Clients        int           // concurrent streaming clients; 0 = 16
	Workers        int           // 0 = 2
	Capacity       int           // requests per worker at once; 0 = 4
	MaxTokens      int           // per request; 0 = 12
	Prompts        int           // distinct prompts cycled by the clients; 0 = 8
	AckWait        time.Duration // redelivery after a worker died; 0 = 2s
	RequestTimeout time.Duration // the gateway's; 0 = 30s
	// Plan is the faults to inject in order, each after Settle completions since the last one.
	// Empty: random faults every 3-10 s until Duration.
	Plan     []Fault
	Settle   int           // completions awaited before and after each fault; 0 = 2 × Clients
	Duration time.Duration // random plan only
	Seed     uint64        // random plan only
	// Logf receives progress lines; nil: none.
	Logf func(format string, args ...any)
}

// Report is what the clients saw.
type Report struct {
	Requests      int            `json:"requests"`            // answered, in any way
	Accepted      int            `json:"accepted"`            // queued by the gateway
	Completed     int            `json:"completed"`           // full output, equal to the reference
	FailedCleanly int            `json:"failed_cleanly"`      // a clean error: refused before queueing (429/503 with Retry-After), or an error answer after
	Refused       int            `json:"refused"`             // of FailedCleanly: not queued
	FailedBy      map[string]int `json:"failed_by,omitempty"` // FailedCleanly by HTTP status and OpenAI error code
	Lost          int            `json:"lost"`                // accepted but no answer: timeout, broken stream
	Duplicated    int            `json:"duplicated"`          // more tokens than the request produces
	Corrupted     int            `json:"corrupted"`           // different output
	Faults        []FaultRecord  `json:"faults"`
	Elapsed       time.Duration  `json:"elapsed_ns"`
	Problems      []string       `json:"problems,omitempty"` // the first few lost/duplicated/corrupted answers, for the log
}

// FaultRecord is one injected fault: what, on which target, when (since the load started), and
// how long until Settle requests had completed after it.
type FaultRecord struct {
	Fault     Fault         `json:"fault"`
	Target    string        `json:"target"`
	At        time.Duration `json:"at_ns"`
	Recovered time.Duration `json:"recovered_ns"`
}

// answer is one client's view of one request.
type answer struct {
	status int
	code   string // OpenAI error code, if any
	retry  string // Retry-After
	text   string
	depths []int
	finish string
	usage  int  // completion tokens
	done   bool // [DONE] seen
	sseErr string
	err    error
}

func (a answer) same(b answer) bool {
	return a.text == b.text && slices.Equal(a.depths, b.depths) && a.finish == b.finish && a.usage == b.usage
}

var ref = bus.Ref{Namespace: "default", Name: "chaos"}

// Run starts the deployment, takes reference answers, runs the load with the plan's faults and
// returns the counts. It returns an error when the deployment cannot be set up, or a fault's
// recovery (Settle completions) does not come within a minute.
func Run(ctx context.Context, o Options) (*Report, error) {
	o = withDefaults(o)
	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	h, err := start(ctx, o)
	if err != nil {
		return nil, err
	}
	defer h.close()
	logf("cluster %s up; gateway and %d workers running", h.cluster.ClientURL(), len(h.workers))

	refs := make([]answer, o.Prompts)
	for i := range refs {
		a := h.request(ctx, i, o)
		if a.status != http.StatusOK || !a.done || a.err != nil || a.sseErr != "" {
			return nil, fmt.Errorf("reference answer %d: status %d %v %s", i, a.status, a.err, a.sseErr)
		}
		refs[i] = a
	}
	logf("reference answers taken for %d prompts", len(refs))

	rep := &Report{}
	var (
		mu        sync.Mutex
		completed atomic.Int64
	)
	record := func(i int, a answer) {
		mu.Lock()
		defer mu.Unlock()
		classify(rep, refs[i%len(refs)], a, i)
		if rep.Completed > int(completed.Load()) {
			completed.Store(int64(rep.Completed))
		}
	}
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	began := time.Now()
	var clients sync.WaitGroup
	for c := range o.Clients {
		clients.Go(func() {
			for k := 0; loadCtx.Err() == nil; k++ {
				i := (c + k*o.Clients) % o.Prompts
				a := h.request(context.WithoutCancel(loadCtx), i, o) // a request once sent runs to its end
				record(i, a)
				if a.status == http.StatusTooManyRequests || a.status == http.StatusServiceUnavailable {
					sleepCtx(loadCtx, 200*time.Millisecond) // a client backing off as Retry-After asks
				}
			}
		})
	}

	settle := func(what string) (time.Duration, error) {
		from, t0 := completed.Load(), time.Now()
		deadline := time.Now().Add(time.Minute)
		for completed.Load() < from+int64(o.Settle) {
			if time.Now().After(deadline) || ctx.Err() != nil {
				return 0, fmt.Errorf("%s: %d of %d requests completed within a minute", what, completed.Load()-from, o.Settle)
			}
			time.Sleep(10 * time.Millisecond)
		}
		return time.Since(t0), nil
	}
	inject := func(f Fault) error {
		at := time.Since(began)
		target, err := h.inject(ctx, f, o)
		if err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		rec, err := settle(string(f) + " " + target)
		if err != nil {
			return err
		}
		rep.Faults = append(rep.Faults, FaultRecord{Fault: f, Target: target, At: at, Recovered: rec})
		logf("%6.1fs %-18s %-10s %d requests completed within %s after it", at.Seconds(), f, target, o.Settle, rec.Round(time.Millisecond))
		return nil
	}
	run := func() error {
		if _, err := settle("warm-up"); err != nil {
			return err
		}
		if len(o.Plan) > 0 {
			for _, f := range o.Plan {
				if err := inject(f); err != nil {
					return err
				}
			}
			return nil
		}
		rng := rand.New(rand.NewPCG(o.Seed, 0x9e3779b97f4a7c15))
		for time.Since(began) < o.Duration {
			sleepCtx(ctx, time.Duration(3000+rng.IntN(7000))*time.Millisecond)
			var f Fault
			switch p := rng.IntN(100); {
			case h.downNodes() > 0:
				f = RestartNodes
			case p < 35:
				f = KillStreamLeader
			case p < 50:
				f = KillGatewayNode
			case p < 70:
				f = KillNode
			default:
				f = KillWorker
			}
			if err := inject(f); err != nil {
				return err
			}
		}
		if h.downNodes() > 0 {
			return inject(RestartNodes)
		}
		return nil
	}
	runErr := run()
	stopLoad()
	clients.Wait()
	rep.Elapsed = time.Since(began)
	logf("load stopped after %s", rep.Elapsed.Round(time.Millisecond))
	return rep, runErr
}

func withDefaults(o Options) Options {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&o.Clients, 16)
	def(&o.Workers, 2)
	def(&o.Capacity, 4)
	def(&o.MaxTokens, 12)
	def(&o.Prompts, 8)
	def(&o.Settle, 2*o.Clients)
	if o.AckWait <= 0 {
		o.AckWait = 2 * time.Second
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 30 * time.Second
	}
	return o
}

// classify counts one answer against the reference answer of its prompt.
func classify(rep *Report, want, got answer, i int) {
	rep.Requests++
	problem := func(kind string) {
		if len(rep.Problems) < 8 {
			rep.Problems = append(rep.Problems, fmt.Sprintf("%s: prompt %d: status %d code %q err %v sse %q text %q (want %q) depths %v (want %v) done %v",
				kind, i, got.status, got.code, got.err, got.sseErr, got.text, want.text, got.depths, want.depths, got.done))
		}
	}
	failed := func() {
		rep.FailedCleanly++
		if rep.FailedBy == nil {
			rep.FailedBy = make(map[string]int)
		}
		rep.FailedBy[fmt.Sprintf("%d %s", got.status, got.code)]++
	}
	switch {
	case got.err == nil && got.status != http.StatusOK && preQueue(got.code) && got.retry != "":
		failed()
		rep.Refused++
		return
	case got.err == nil && got.status != http.StatusOK && got.status != http.StatusGatewayTimeout:
		rep.Accepted++
		failed() // an error answer the client can act on
		return
	}
	rep.Accepted++
	switch {
	case got.err != nil || got.status != http.StatusOK || !got.done:
		rep.Lost++
		problem("lost")
	case got.sseErr != "" && !strings.Contains(got.sseErr, "no complete answer"):
		failed()
	case got.sseErr != "":
		rep.Lost++ // the gateway timed out waiting
		problem("lost")
	case got.same(want):
		rep.Completed++
	case len(got.depths) > len(want.depths) || len(got.text) > len(want.text):
		rep.Duplicated++
		problem("duplicated")
	default:
		rep.Corrupted++
		problem("corrupted")
	}
}

// preQueue reports the error codes the gateway answers before it queues a request.
func preQueue(code string) bool {
	switch code {
	case "queue_unavailable", "queue_full", "overloaded", "model_not_ready":
		return true
	}
	return false
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// harness is the running deployment.
type harness struct {
	cluster *serve.NATSCluster
	admin   *nats.Conn
	js      jetstream.JetStream
	gen     []*serve.Loaded
	genStop []func()
	gateway *serve.Gateway
	gwConn  *nats.Conn
	gwStop  func()
	http    *http.Server
	served  chan struct{} // closed when Serve returned
	url     string
	client  *http.Client

	mu       sync.Mutex
	workers  []*workerProc
	capacity int
	spawned  int
	killed   []int // nodes down
	rng      *rand.Rand
}

type workerProc struct {
	name string
	nc   *nats.Conn
	reg  *prometheus.Registry
	stop context.CancelFunc
	done chan struct{}
	slot int // engine index
}

func connect(url, name string) (*nats.Conn, error) {
	return nats.Connect(url, nats.Name(name), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond),
		nats.ReconnectJitter(100*time.Millisecond, 100*time.Millisecond),
		nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {})) // killed nodes break pipes; the counts tell what matters
}

func start(ctx context.Context, o Options) (_ *harness, err error) {
	h := &harness{rng: rand.New(rand.NewPCG(o.Seed, 1)), capacity: o.Capacity}
	defer func() {
		if err != nil {
			h.close()
		}
	}()
	if h.cluster, err = serve.StartNATSCluster(serve.NATSClusterOptions{Dir: o.Dir}); err != nil {
		return nil, err
	}
	if h.admin, err = connect(h.cluster.ClientURL(), "chaos-admin"); err != nil {
		return nil, err
	}
	h.js, _ = jetstream.New(h.admin)
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	q := bus.QueueOptions{Replicas: 3, AckWait: o.AckWait, MaxAckPending: o.Workers * o.Capacity}
	if _, err := bus.EnsureQueue(sctx, h.js, ref, q); err != nil {
		return nil, err
	}
	kv, err := bus.EnsureRegistry(sctx, h.js, 3)
	if err != nil {
		return nil, err
	}
	for i := range o.Workers {
		l, err := serve.Load(o.ModelDir, engine.Options{Mode: engine.Fast, Threshold: 0.7, MaxBatch: o.Capacity})
		if err != nil {
			return nil, err
		}
		ectx, stop := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); _ = l.Run(ectx) }()
		h.gen = append(h.gen, l)
		h.genStop = append(h.genStop, func() { stop(); <-done; _ = l.Close() })
		if err := h.spawn(i); err != nil {
			return nil, err
		}
	}
	w0 := h.gen[0].Worker
	if err := bus.PutModel(sctx, kv, bus.ModelEntry{Namespace: ref.Namespace, Name: ref.Name, ContextLength: w0.ContextLength,
		Thresholds: bus.Thresholds{ExitThreshold: 0.7}, MaxSteps: w0.MaxSteps, Ready: true, Updated: time.Now().UTC()}); err != nil {
		return nil, err
	}
	gnc, err := connect(h.cluster.ClientURL(), "chaos-gateway")
	if err != nil {
		return nil, err
	}
	if h.gateway, err = serve.NewGateway(gnc, serve.GatewayOptions{RequestTimeout: o.RequestTimeout}); err != nil {
		gnc.Close()
		return nil, err
	}
	gctx, gcancel := context.WithCancel(context.Background())
	gdone := make(chan struct{})
	go func() { defer close(gdone); _ = h.gateway.Run(gctx) }()
	h.gwConn = gnc
	h.gwStop = func() { gcancel(); <-gdone; gnc.Close() }
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	h.url = "http://" + ln.Addr().String()
	h.http = &http.Server{Handler: h.gateway, ReadHeaderTimeout: 10 * time.Second}
	h.served = make(chan struct{})
	go func() { defer close(h.served); _ = h.http.Serve(ln) }()
	h.client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: o.Clients + 4}, Timeout: o.RequestTimeout + 30*time.Second}
	rctx, rcancel := context.WithTimeout(ctx, time.Minute)
	defer rcancel()
	select {
	case <-h.gateway.Ready():
	case <-rctx.Done():
		why := ""
		if resp, err := h.client.Get(h.url + "/readyz"); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			why = strings.TrimSpace(string(b))
		}
		return nil, fmt.Errorf("gateway not ready within a minute: %s", why)
	}
	return h, nil
}

// spawn starts a worker on engine slot.
func (h *harness) spawn(slot int) error {
	h.mu.Lock()
	h.spawned++
	name := fmt.Sprintf("w%d", h.spawned)
	h.mu.Unlock()
	nc, err := connect(h.cluster.ClientURL(), "chaos-"+name)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	m, err := serve.NewMetrics(reg)
	if err != nil {
		nc.Close()
		return err
	}
	l := h.gen[slot]
	wo := l.Worker
	wo.Ref, wo.Name, wo.Capacity, wo.Metrics = ref, name, h.capacity, m
	w, err := serve.NewWorker(nc, l.Engine, l.Tok, wo)
	if err != nil {
		nc.Close()
		return err
	}
	ctx, stop := context.WithCancel(context.Background())
	p := &workerProc{name: name, nc: nc, reg: reg, stop: stop, done: make(chan struct{}), slot: slot}
	go func() { defer close(p.done); _ = w.Run(ctx) }()
	h.mu.Lock()
	h.workers = append(h.workers, p)
	h.mu.Unlock()
	return nil
}

// kill crashes a worker: its connection drops and its requests stay un-acked.
func (p *workerProc) kill() {
	p.nc.Close()
	p.stop()
	<-p.done
}

func (p *workerProc) inflight() float64 {
	mfs, _ := p.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "loopserve_inflight_requests" {
			return sum(mf.GetMetric())
		}
	}
	return 0
}

func sum(ms []*dto.Metric) float64 {
	var n float64
	for _, m := range ms {
		n += m.GetGauge().GetValue()
	}
	return n
}

func (h *harness) downNodes() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.killed)
}

// inject applies one fault and returns its target.
func (h *harness) inject(ctx context.Context, f Fault, o Options) (string, error) {
	switch f {
	case KillStreamLeader, KillNode, KillGatewayNode:
		if h.downNodes() > 0 {
			return "", errors.New("a node is already down: killing another would lose the quorum")
		}
		i := -1
		switch f {
		case KillStreamLeader:
			leader, err := h.streamLeader(ctx, "")
			if err != nil {
				return "", err
			}
			i = h.cluster.Node(leader)
		case KillGatewayNode:
			i = h.cluster.Node(h.gwConn.ConnectedServerName())
		default:
			h.mu.Lock()
			i = h.rng.IntN(h.cluster.Nodes())
			h.mu.Unlock()
		}
		if i < 0 {
			return "", errors.New("leader not among the nodes")
		}
		h.cluster.Kill(i)
		h.mu.Lock()
		h.killed = append(h.killed, i)
		h.mu.Unlock()
		name := fmt.Sprintf("n%d", i)
		if _, err := h.streamLeader(ctx, name); err != nil { // a new leader is elected
			return name, err
		}
		return name, nil
	case RestartNodes:
		h.mu.Lock()
		down := h.killed
		h.killed = nil
		h.mu.Unlock()
		var names []string
		for _, i := range down {
			if err := h.cluster.Restart(i); err != nil {
				return "", err
			}
			names = append(names, fmt.Sprintf("n%d", i))
		}
		return strings.Join(names, ","), h.awaitCurrent(ctx)
	case KillWorker:
		deadline := time.Now().Add(30 * time.Second)
		for {
			h.mu.Lock()
			var victim *workerProc
			for _, p := range h.workers {
				if p.inflight() > 0 {
					victim = p
					break
				}
			}
			if victim != nil {
				h.workers = slices.DeleteFunc(h.workers, func(p *workerProc) bool { return p == victim })
			}
			h.mu.Unlock()
			if victim != nil {
				victim.kill()
				return victim.name, h.spawn(victim.slot)
			}
			if time.Now().After(deadline) {
				return "", errors.New("no worker had requests in flight within 30s")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return "", fmt.Errorf("unknown fault %q", f)
}

// streamLeader waits for the work-queue stream to have a leader other than not, and names it.
func (h *harness) streamLeader(ctx context.Context, not string) (string, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		ictx, cancel := context.WithTimeout(ctx, time.Second)
		s, err := h.js.Stream(ictx, ref.Stream())
		cancel()
		if err == nil {
			if c := s.CachedInfo().Cluster; c != nil && c.Leader != "" && c.Leader != not {
				return c.Leader, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no stream leader (other than %q) within 30s: %v", not, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// awaitCurrent waits until the stream has a leader and every replica is current.
func (h *harness) awaitCurrent(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		ictx, cancel := context.WithTimeout(ctx, time.Second)
		s, err := h.js.Stream(ictx, ref.Stream())
		cancel()
		if err == nil {
			c := s.CachedInfo().Cluster
			ok := c != nil && c.Leader != "" && len(c.Replicas) == h.cluster.Nodes()-1
			for _, r := range c.Replicas {
				ok = ok && r.Current && !r.Offline
			}
			if ok {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return errors.New("stream replicas not current within 30s of the restart")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// request sends prompt i as a streaming completion and reads the whole answer.
func (h *harness) request(ctx context.Context, i int, o Options) answer {
	body, _ := json.Marshal(map[string]any{"model": ref.String(), "prompt": loadtest.ArithPrompt(i), "max_tokens": o.MaxTokens,
		"temperature": 0.8, "seed": i + 1, "stream": true, "stream_options": map[string]bool{"include_usage": true}})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.url+"/v1/completions", bytes.NewReader(body))
	if err != nil {
		return answer{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := h.client.Do(req)
	if err != nil {
		return answer{err: err}
	}
	defer resp.Body.Close()
	a := answer{status: resp.StatusCode, retry: resp.Header.Get("Retry-After")}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error struct {
				Code    string `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		}
		b, _ := io.ReadAll(resp.Body)
		_ = json.Unmarshal(b, &e)
		a.code, a.sseErr = e.Error.Code, e.Error.Message
		return a
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 8<<20)
	var text strings.Builder
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if line == "[DONE]" {
			a.done = true
			break
		}
		var ev struct {
			Choices []struct {
				Text   string  `json:"text"`
				Finish *string `json:"finish_reason"`
				Depths []int   `json:"loop_depths"`
			} `json:"choices"`
			Usage *struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
			Error *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			a.err = fmt.Errorf("bad event %q: %w", line, err)
			return a
		}
		if ev.Error != nil {
			a.sseErr = ev.Error.Message
		}
		if ev.Usage != nil {
			a.usage = ev.Usage.CompletionTokens
		}
		for _, c := range ev.Choices {
			text.WriteString(c.Text)
			a.depths = append(a.depths, c.Depths...)
			if c.Finish != nil {
				a.finish = *c.Finish
			}
		}
	}
	if err := sc.Err(); err != nil && a.err == nil {
		a.err = err
	}
	a.text = text.String()
	return a
}

func (h *harness) close() {
	if h.http != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if h.http.Shutdown(sctx) != nil {
			_ = h.http.Close()
		}
		cancel()
		<-h.served
	}
	if h.gwStop != nil {
		h.gwStop()
	}
	h.mu.Lock()
	workers := h.workers
	h.workers = nil
	h.mu.Unlock()
	for _, p := range workers {
		p.stop()
		<-p.done
		p.nc.Close()
	}
	for _, stop := range h.genStop {
		stop()
	}
	if h.admin != nil {
		h.admin.Close()
	}
	if h.cluster != nil {
		h.cluster.Close()
	}
}

// Print writes the counts and the faults as a table.
func (r *Report) Print(w io.Writer) {
	fmt.Fprintf(w, "requests %d: accepted %d, completed %d, failed cleanly %d (refused before queueing %d), lost %d, duplicated %d, corrupted %d, in %s\n",
		r.Requests, r.Accepted, r.Completed, r.FailedCleanly, r.Refused, r.Lost, r.Duplicated, r.Corrupted, r.Elapsed.Round(time.Millisecond))
	for _, k := range slices.Sorted(maps.Keys(r.FailedBy)) {
		fmt.Fprintf(w, "  failed cleanly: %d × %s\n", r.FailedBy[k], k)
	}
	for _, f := range r.Faults {
		fmt.Fprintf(w, "  %7.1fs  %-18s %-8s recovered (settle) in %s\n", f.At.Seconds(), f.Fault, f.Target, f.Recovered.Round(time.Millisecond))
	}
	for _, p := range r.Problems {
		fmt.Fprintln(w, "  problem:", p)
	}
}
