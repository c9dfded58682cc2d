package serve

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/tokenizer"
)

// modelDir is the shipped default model, from this package's directory.
var modelDir = filepath.Join("..", "..", "testdata", "models", "ouro-tiny-arith")

var testRef = bus.Ref{Namespace: "default", Name: "ouro-tiny-arith"}

func loadTokenizer(t testing.TB) Tokenizer {
	t.Helper()
	tok, err := tokenizer.LoadDir(modelDir)
	if err != nil {
		t.Fatal(err)
	}
	return FromTokenizer(tok)
}

// cluster is a test deployment: one NATS server, the queue and registry entry, any number of
// workers and one gateway behind httptest.
type cluster struct {
	t        testing.TB
	storeDir string
	port     int
	srv      *server.Server
	ref      bus.Ref
	tok      Tokenizer
	gw       *httptest.Server
	gateway  *Gateway
	reg      *prometheus.Registry
	metrics  *Metrics
	wg       sync.WaitGroup
	workers  map[string]*Worker

	maxPayload  int32
	gatewayConn *nats.Conn
	stopGateway func() // ends the gateway's Run (it deletes its liveness key) and waits for it
}

type clusterOptions struct {
	queue   bus.QueueOptions
	tokens  []string
	ctxLen  int
	maxBody int64

	maxPayload int32          // the NATS server's max_payload; 0 = its default
	gateway    GatewayOptions // Tokens, MaxBodyBytes, Metrics and Gatherer are set from the fields above
	gatewayTTL time.Duration  // the liveness bucket's TTL; 0 = bus.GatewayTTL
}

func newCluster(t testing.TB, o clusterOptions) *cluster {
	t.Helper()
	c := &cluster{t: t, storeDir: t.TempDir(), ref: testRef, tok: loadTokenizer(t), maxPayload: o.maxPayload}
	c.startServer()
	t.Cleanup(func() {
		c.wg.Wait()
		c.srv.Shutdown()
		c.srv.WaitForShutdown()
	})
	nc := c.connect("setup")
	js, _ := jetstream.New(nc)
	ctx := context.Background()
	if o.queue.AckWait == 0 {
		o.queue.AckWait = 2 * time.Second
	}
	if _, err := bus.EnsureQueue(ctx, js, c.ref, o.queue); err != nil {
		t.Fatal(err)
	}
	kv, err := bus.EnsureRegistry(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	if o.gatewayTTL > 0 {
		if _, err := bus.EnsureGateways(ctx, js, 1, o.gatewayTTL); err != nil {
			t.Fatal(err)
		}
	}
	if o.ctxLen == 0 {
		o.ctxLen = 2048
	}
	if err := bus.PutModel(ctx, kv, bus.ModelEntry{Namespace: c.ref.Namespace, Name: c.ref.Name, ContextLength: o.ctxLen,
		Thresholds: bus.Thresholds{ExitThreshold: 0.9}, MaxSteps: 4, Ready: true}); err != nil {
		t.Fatal(err)
	}
	c.reg = prometheus.NewRegistry()
	c.metrics, err = NewMetrics(c.reg)
	if err != nil {
		t.Fatal(err)
	}
	gopt := o.gateway
	gopt.Tokens, gopt.MaxBodyBytes, gopt.Metrics, gopt.Gatherer = o.tokens, o.maxBody, c.metrics, c.reg
	if gopt.RequestTimeout == 0 {
		gopt.RequestTimeout = 90 * time.Second
	}
	c.gatewayConn = c.connect("gateway")
	g, err := NewGateway(c.gatewayConn, gopt)
	if err != nil {
		t.Fatal(err)
	}
	c.gateway = g
	gctx, cancel := context.WithCancel(context.Background())
	gdone := make(chan struct{})
	c.wg.Go(func() { defer close(gdone); _ = g.Run(gctx) })
	c.stopGateway = func() { cancel(); <-gdone }
	t.Cleanup(cancel)
	<-g.Ready()
	c.awaitModel(c.ref.String(), true)
	c.gw = httptest.NewServer(g)
	t.Cleanup(c.gw.Close)
	return c
}

func (c *cluster) startServer() {
	c.t.Helper()
	port := c.port
	if port == 0 {
		port = server.RANDOM_PORT
	}
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: c.storeDir,
		SyncAlways: true, NoSigs: true, NoLog: true, MaxPayload: c.maxPayload})
	if err != nil {
		c.t.Fatal(err)
	}
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		c.t.Fatal("nats not ready")
	}
	c.srv = s
	if c.port == 0 {
		c.port = s.Addr().(*net.TCPAddr).Port
	}
}

func (c *cluster) connect(name string) *nats.Conn {
	c.t.Helper()
	nc, err := nats.Connect(fmt.Sprintf("nats://127.0.0.1:%d", c.port), nats.Name(name), nats.MaxReconnects(-1),
		nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(nc.Close)
	return nc
}

// setThreshold changes the threshold in force in the registry entry, as the operator does,
// and waits until the gateway stamps it into new jobs.
func (c *cluster) setThreshold(tau float64) {
	c.t.Helper()
	c.setThresholds(bus.Thresholds{ExitThreshold: tau})
}

// setThresholds changes the thresholds in force (per tier) in the registry entry, as the
// operator does, and waits until the gateway stamps them into new jobs.
func (c *cluster) setThresholds(th bus.Thresholds) {
	c.t.Helper()
	ctx := context.Background()
	js, _ := jetstream.New(c.connect("registry"))
	kv, err := bus.OpenRegistry(ctx, js)
	if err != nil {
		c.t.Fatal(err)
	}
	e, err := kv.Get(ctx, c.ref.Key())
	if err != nil {
		c.t.Fatal(err)
	}
	m, err := bus.DecodeModel(e.Value())
	if err != nil {
		c.t.Fatal(err)
	}
	m.Thresholds = th
	if err := bus.PutModel(ctx, kv, m); err != nil {
		c.t.Fatal(err)
	}
	awaitCond(c.t, func() bool { m, ok := c.gateway.lookup(c.ref.String()); return ok && m.Thresholds.Equal(th) })
}

func (c *cluster) awaitModel(id string, present bool) {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := c.gateway.lookup(id); ok == present {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("model %s present=%v never observed", id, present)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startWorker runs a worker until the returned stop is called (or the test ends); stop returns
// once the worker has exited, leaving its in-flight requests un-acked as a crash would.
func (c *cluster) startWorker(name string, gen Generator, o WorkerOptions) (stop func()) {
	c.t.Helper()
	o.Ref = c.ref
	o.Name = name
	if o.ContextLength == 0 {
		o.ContextLength = 2048
	}
	if o.MaxSteps == 0 {
		o.MaxSteps = 4
	}
	o.StopTokens = []int{2, 0}
	o.VocabSize = 1024
	o.StatsInterval = 200 * time.Millisecond
	if o.Metrics == nil {
		o.Metrics = c.metrics
	}
	w, err := NewWorker(c.connect(name), gen, c.tok, o)
	if err != nil {
		c.t.Fatal(err)
	}
	if c.workers == nil {
		c.workers = make(map[string]*Worker)
	}
	c.workers[name] = w
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	c.wg.Go(func() {
		defer close(done)
		if err := w.Run(ctx); err != nil {
			c.t.Errorf("worker %s: %v", name, err)
		}
	})
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			<-done
		})
	}
	c.t.Cleanup(stop)
	return stop
}

// result is what a client saw.
type result struct {
	Status     int
	Text       string
	Depths     []int
	Finish     string
	Usage      Usage
	Error      string
	Chunks     int
	RetryAfter string
}

// post sends a request; streaming answers are parsed from SSE.
func post(ctx context.Context, base, path string, body any, header ...string) (result, error) {
	var b []byte
	switch v := body.(type) {
	case string:
		b = []byte(v)
	default:
		b, _ = json.Marshal(v)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path, bytes.NewReader(b))
	if err != nil {
		return result{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return result{}, err
	}
	defer resp.Body.Close()
	r := result{Status: resp.StatusCode, RetryAfter: resp.Header.Get("Retry-After")}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error struct{ Message, Type string }
		}
		raw, _ := io.ReadAll(resp.Body)
		_ = json.Unmarshal(raw, &e)
		r.Error = e.Error.Type + ": " + e.Error.Message
		return r, nil
	}
	type choice struct {
		Text    string
		Message *Message
		Delta   *chatDelta
		Finish  *string `json:"finish_reason"`
		Depths  []int   `json:"loop_depths"`
	}
	type body_ struct {
		Choices []choice
		Usage   *Usage
		Error   *struct{ Message string }
	}
	apply := func(x body_) {
		if x.Error != nil {
			r.Error = x.Error.Message
		}
		if x.Usage != nil {
			r.Usage = *x.Usage
		}
		for _, ch := range x.Choices {
			r.Text += ch.Text
			if ch.Message != nil {
				r.Text += ch.Message.Content
			}
			if ch.Delta != nil {
				r.Text += ch.Delta.Content
			}
			r.Depths = append(r.Depths, ch.Depths...)
			if ch.Finish != nil {
				r.Finish = *ch.Finish
			}
		}
	}
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		var x body_
		if err := json.NewDecoder(resp.Body).Decode(&x); err != nil {
			return r, err
		}
		apply(x)
		return r, nil
	}
	sc := bufio.NewScanner(resp.Body)
	done := false
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if line == "[DONE]" {
			done = true
			break
		}
		var x body_
		if err := json.Unmarshal([]byte(line), &x); err != nil {
			return r, fmt.Errorf("bad SSE data %q: %w", line, err)
		}
		r.Chunks++
		apply(x)
	}
	if !done && r.Error == "" {
		return r, fmt.Errorf("stream ended without [DONE]: %v", sc.Err())
	}
	return r, nil
}
