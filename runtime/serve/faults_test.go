package serve

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/engine"
)

// poisonGenerator is a fake only in one respect: the prompt poisonPrompt makes Submit panic,
// as a bug triggered by one request would; every other request runs on the real engine.
type poisonGenerator struct{ Generator }

var poisonPrompt = []int{7, 7, 7, 7, 7}

func (p poisonGenerator) Submit(ctx context.Context, r engine.Request) (<-chan engine.Event, error) {
	if slices.Equal(r.Prompt, poisonPrompt) {
		panic("index out of range [7] with length 7")
	}
	return p.Generator.Submit(ctx, r)
}

func counter(t testing.TB, c *cluster, name string) float64 {
	t.Helper()
	mfs, err := c.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return n
}

func streamMsgs(t testing.TB, c *cluster) uint64 {
	t.Helper()
	js, _ := jetstream.New(c.connect("check"))
	s, err := js.Stream(context.Background(), c.ref.Stream())
	if err != nil {
		t.Fatal(err)
	}
	return s.CachedInfo().State.Msgs
}

// TestPoisonRequestRecovered: a request that makes its worker panic gets a 500 with a clear
// message, is not redelivered, and the worker keeps serving the requests after it.
func TestPoisonRequestRecovered(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startWorker("w1", poisonGenerator{newGenerator(t)}, WorkerOptions{})
	ctx := context.Background()
	for _, stream := range []bool{false, true} {
		got, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": poisonPrompt, "max_tokens": 4, "stream": stream})
		if err != nil {
			t.Fatal(err)
		}
		if got.Status != http.StatusInternalServerError || !strings.Contains(got.Error, "the worker failed on this request") {
			t.Errorf("stream=%v: poison request: %d %q, want 500 naming the failure", stream, got.Status, got.Error)
		}
	}
	ok, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 4})
	if err != nil || ok.Status != http.StatusOK || len(ok.Depths) == 0 {
		t.Fatalf("request after the poison: %v %+v", err, ok)
	}
	if n := counter(t, c, "loopserve_worker_panics_total"); n != 2 {
		t.Errorf("panics counted = %v, want 2", n)
	}
	awaitCond(t, func() bool { return streamMsgs(t, c) == 0 })
}

// TestMaxDeliveriesAnswered: a request that kills every worker taking it (here a consumer that
// takes it and dies without a word, twice) stops at MaxDeliver, and the gateway answers its
// client with a 500 instead of waiting for the request timeout.
func TestMaxDeliveriesAnswered(t *testing.T) {
	c := newCluster(t, clusterOptions{queue: bus.QueueOptions{AckWait: 300 * time.Millisecond, MaxDeliver: 2}})
	js, _ := jetstream.New(c.connect("dying-worker"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cons, err := bus.BindQueue(ctx, js, c.ref)
	if err != nil {
		t.Fatal(err)
	}
	var taken sync.WaitGroup
	taken.Go(func() {
		for ctx.Err() == nil {
			batch, err := cons.Fetch(1, jetstream.FetchMaxWait(500*time.Millisecond))
			if err != nil {
				continue
			}
			for range batch.Messages() { // taken, never acked: the worker died
			}
		}
	})
	start := time.Now()
	got, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 4, "stream": true})
	cancel()
	taken.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != http.StatusInternalServerError || !strings.Contains(got.Error, "delivered to workers 2 times") {
		t.Errorf("poison request: %d %q, want 500 after 2 deliveries", got.Status, got.Error)
	}
	t.Logf("answered %s after the request was sent (request timeout 90s)", time.Since(start).Round(time.Millisecond))
	awaitCond(t, func() bool { return streamMsgs(t, c) == 0 }) // it does not hold a queue slot
}

// publishJob queues a job directly, as a gateway (or an intruder) would, with the given reply.
func publishJob(t testing.TB, c *cluster, job Job, reply string) {
	t.Helper()
	js, _ := jetstream.New(c.connect("publisher"))
	b, _ := json.Marshal(job)
	msg := &nats.Msg{Subject: c.ref.RequestSubject(), Data: b, Header: nats.Header{}}
	if reply != "" {
		msg.Header.Set(HeaderReply, reply)
	}
	if _, err := js.PublishMsg(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
}

// TestReplySubjectOutsideInboxRefused: a job whose reply subject is not under a gateway inbox
// (here JetStream's API, to delete the stream), or is missing, or names another request, is
// refused and counted; the worker publishes nothing there and generates nothing.
func TestReplySubjectOutsideInboxRefused(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startWorker("w1", newGenerator(t), WorkerOptions{})
	watch := c.connect("watch")
	var mu sync.Mutex
	var seen []string
	sub, err := watch.Subscribe(">", func(m *nats.Msg) {
		if strings.HasPrefix(m.Subject, "$JS.API.STREAM.DELETE") {
			mu.Lock()
			seen = append(seen, m.Subject)
			mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	publishJob(t, c, Job{ID: "cmpl-evil", Prompt: arithPrompt, MaxTokens: 4}, "$JS.API.STREAM.DELETE."+c.ref.Stream())
	publishJob(t, c, Job{ID: "cmpl-noreply", Prompt: arithPrompt, MaxTokens: 4}, "")
	publishJob(t, c, Job{ID: "cmpl-mine", Prompt: arithPrompt, MaxTokens: 4}, bus.ReplySubject("gw-1", "cmpl-someone-else"))
	awaitCond(t, func() bool { return counter(t, c, "loopserve_worker_refused_replies_total") == 3 })
	awaitCond(t, func() bool { return streamMsgs(t, c) == 0 })
	if n := tokensGenerated(t, c); n != 0 {
		t.Errorf("generated %v tokens for refused requests", n)
	}
	if err := watch.Flush(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if d := cmp.Diff(seen, []string(nil)); d != "" {
		t.Errorf("messages on forbidden subjects (-got +want):\n%s", d)
	}
	if _, err := jetstream.New(watch); err != nil {
		t.Fatal(err)
	}
	streamMsgs(t, c) // the stream still exists
}

// TestExpiredJobDropped: a job taken after its gateway's timeout passed is not generated; the
// worker says so on the reply subject and counts it.
func TestExpiredJobDropped(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startWorker("w1", newGenerator(t), WorkerOptions{})
	nc := c.connect("gateway-2")
	reply := bus.ReplySubject("gw-test", "cmpl-old")
	sub, err := nc.SubscribeSync(reply)
	if err != nil {
		t.Fatal(err)
	}
	publishJob(t, c, Job{ID: "cmpl-old", Prompt: arithPrompt, MaxTokens: 4, Expires: time.Now().Add(-time.Second)}, reply)
	m, err := sub.NextMsg(20 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var ch Chunk
	if err := json.Unmarshal(m.Data, &ch); err != nil || !ch.Done || ch.Error == nil || ch.Error.Status != http.StatusGatewayTimeout {
		t.Errorf("answer to an expired job: %s (%v), want a 504 error chunk", m.Data, err)
	}
	if n := counter(t, c, "loopserve_worker_expired_requests_total"); n != 1 {
		t.Errorf("expired requests counted = %v, want 1", n)
	}
	if n := tokensGenerated(t, c); n != 0 {
		t.Errorf("generated %v tokens for an expired job", n)
	}
}

// TestGatewayGoneStopsGeneration: when the gateway waiting for a stream dies, the worker stops
// generating for nobody and drops the request: at once when the gateway stopped cleanly (it
// deletes its liveness key), and within the liveness TTL when it crashed.
func TestGatewayGoneStopsGeneration(t *testing.T) {
	for _, crash := range []bool{false, true} {
		name := "stopped"
		if crash {
			name = "crashed"
		}
		t.Run(name, func(t *testing.T) {
			c := newCluster(t, clusterOptions{queue: bus.QueueOptions{AckWait: 900 * time.Millisecond},
				gateway: GatewayOptions{Heartbeat: 200 * time.Millisecond}, gatewayTTL: 1500 * time.Millisecond})
			c.startWorker("w1", slowGenerator{newGenerator(t), 20 * time.Millisecond}, WorkerOptions{})
			w := c.workers["w1"]
			client, leave := context.WithCancel(context.Background())
			defer leave() // a crashed gateway never answers
			go func() {
				_, _ = post(client, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt,
					"max_tokens": 1000, "stream": true, "exit_threshold": 1}) // 1000 tokens take 20s here
			}()
			awaitCond(t, func() bool { return tokensGenerated(t, c) > 0 })
			if crash {
				c.gatewayConn.Close() // no goodbye: the key expires
			} else {
				c.stopGateway()
			}
			awaitCond(t, func() bool {
				w.mu.Lock()
				defer w.mu.Unlock()
				return len(w.cancels) == 0
			})
			awaitCond(t, func() bool { return streamMsgs(t, c) == 0 })
			if n := tokensGenerated(t, c); n >= 1000 {
				t.Errorf("generated %v tokens: the request ran to its end", n)
			}
		})
	}
}

// TestGatewayReadiness: /readyz is false until the registry is loaded and the liveness key
// written, and while NATS is disconnected; /healthz stays true.
func TestGatewayReadiness(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	status := func(path string) int {
		resp, err := http.Get(c.gw.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := status("/readyz"); got != http.StatusOK {
		t.Fatalf("/readyz of a running gateway = %d", got)
	}
	c.srv.Shutdown()
	c.srv.WaitForShutdown()
	awaitCond(t, func() bool { return status("/readyz") == http.StatusServiceUnavailable })
	if got := status("/healthz"); got != http.StatusOK {
		t.Errorf("/healthz while NATS is down = %d", got)
	}
	c.startServer()
	awaitCond(t, func() bool { return status("/readyz") == http.StatusOK })

	// A gateway on a NATS the operator never set up serves no model and is not ready: it has no
	// liveness bucket to write to.
	bare, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoSigs: true, NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	bare.Start()
	defer bare.Shutdown()
	if !bare.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats not ready")
	}
	nc, err := nats.Connect(bare.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	g, err := NewGateway(nc, GatewayOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = g.Run(ctx) }()
	defer func() { cancel(); <-done }()
	awaitCond(t, func() bool { return g.loaded.Load() })
	if why := g.notReady(); !strings.Contains(why, bus.GatewaysBucket) {
		t.Errorf("gateway without a liveness bucket: notReady = %q", why)
	}
	js, _ := jetstream.New(nc)
	if _, err := js.KeyValue(ctx, bus.RegistryBucket); !errors.Is(err, jetstream.ErrBucketNotFound) {
		t.Errorf("the gateway created the registry: %v", err)
	}
	if _, err := bus.EnsureRegistry(ctx, js, 1); err != nil {
		t.Fatal(err)
	}
	awaitCond(t, func() bool { return g.notReady() == "" })
}

// TestRequestOverMaxPayload: a body the gateway accepts but that NATS could not carry once
// encoded is a 413, not a 503.
func TestRequestOverMaxPayload(t *testing.T) {
	c := newCluster(t, clusterOptions{maxPayload: 4096})
	got, err := post(context.Background(), c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith",
		"prompt": strings.Repeat("a = 1 ; ", 600), "max_tokens": 4})
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != http.StatusRequestEntityTooLarge || !strings.Contains(got.Error, "4096 bytes") {
		t.Errorf("got %d %q, want 413 naming the 4096-byte limit", got.Status, got.Error)
	}
}

// TestOverloadAnswers429: with the queue's estimated wait (queue depth × the service time the
// workers report) beyond the request timeout, the gateway answers 429 with a Retry-After
// before the queue is full.
func TestOverloadAnswers429(t *testing.T) {
	c := newCluster(t, clusterOptions{gateway: GatewayOptions{RequestTimeout: 3 * time.Second}})
	c.startWorker("w1", slowGenerator{newGenerator(t), 100 * time.Millisecond}, WorkerOptions{Capacity: 1})
	body := map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 10, "exit_threshold": 1}
	ctx := context.Background()
	if r, err := post(ctx, c.gw.URL, "/v1/completions", body); err != nil || r.Status != http.StatusOK { // ~1s of service
		t.Fatalf("first request: %v %+v", err, r)
	}
	// Six requests of a second each ahead of one worker: about 6s of wait against a 3s timeout.
	load, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stop()
	for range 6 {
		wg.Go(func() { _, _ = post(load, c.gw.URL, "/v1/completions", body) })
	}
	js, _ := jetstream.New(c.connect("check"))
	awaitCond(t, func() bool {
		cons, err := bus.BindQueue(ctx, js, c.ref)
		return err == nil && cons.CachedInfo().NumPending >= 4
	})
	var got result
	awaitCond(t, func() bool { // the queue state the gateway judges on is refreshed every second
		pctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		r, err := post(pctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x", "max_tokens": 1, "stream": true})
		got = r
		return err == nil && r.Status == http.StatusTooManyRequests
	})
	if got.Status != http.StatusTooManyRequests || got.RetryAfter == "" || got.RetryAfter == "0" || !strings.Contains(got.Error, "estimated") {
		t.Errorf("overloaded queue: %d %q Retry-After %q, want 429 with the estimate", got.Status, got.Error, got.RetryAfter)
	}
	if n := streamMsgs(t, c); n >= bus.DefaultMaxQueued {
		t.Errorf("the queue was full (%d): the 429 came from its limit, not the estimate", n)
	}
}

// TestStoreFailureIs503: a publish JetStream refuses for lack of storage is a 503 (retry
// elsewhere or later), not a 429 (the queue is full).
func TestStoreFailureIs503(t *testing.T) {
	for _, tc := range []struct {
		err       error
		full, try bool
	}{
		{apiErr(server.NewJSStreamStoreFailedError(errors.New("maximum messages exceeded"))), true, false},
		{apiErr(server.NewJSStreamStoreFailedError(errors.New("maximum bytes exceeded"))), true, false},
		{apiErr(server.NewJSStreamStoreFailedError(errors.New("write /data/jetstream/msgs/1.blk: no space left on device"))), false, false},
		{apiErr(server.NewJSClusterNotAvailError()), false, true},
		{apiErr(server.NewJSStreamTooManyRequestsError()), false, true},
		{apiErr(server.NewJSStreamMessageExceedsMaximumError()), false, false},
		{jetstream.ErrNoStreamResponse, false, true},
		{context.DeadlineExceeded, false, true},
	} {
		if full, try := queueFull(tc.err), retryable(tc.err); full != tc.full || try != tc.try {
			t.Errorf("%v: queue full %v, retryable %v; want %v, %v", tc.err, full, try, tc.full, tc.try)
		}
	}
}

// apiErr is the error a publish returns when the server answers with e.
func apiErr(e *server.ApiError) error {
	return &jetstream.APIError{Code: e.Code, ErrorCode: jetstream.ErrorCode(e.ErrCode), Description: e.Description}
}

// TestBearerCaseInsensitive: the Authorization scheme matches in any case (RFC 9110).
func TestBearerCaseInsensitive(t *testing.T) {
	c := newCluster(t, clusterOptions{tokens: []string{"s3cret"}})
	for _, tc := range []struct {
		header string
		want   int
	}{
		{"Bearer s3cret", 200}, {"bearer s3cret", 200}, {"BEARER  s3cret", 200}, {" Bearer s3cret ", 200},
		{"Basic s3cret", 401}, {"Bearer", 401}, {"Bearers3cret", 401}, {"Bearer S3CRET", 401},
	} {
		req, _ := http.NewRequest(http.MethodGet, c.gw.URL+"/v1/models", nil)
		req.Header.Set("Authorization", tc.header)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("Authorization %q: %d, want %d", tc.header, resp.StatusCode, tc.want)
		}
	}
}

// TestPublishRetriedThroughOutage: a request sent while NATS is down is not refused at once:
// the gateway retries its publish (with the same Nats-Msg-Id) until the server is back, and the
// request is stored once and answered in full.
func TestPublishRetriedThroughOutage(t *testing.T) {
	c := newCluster(t, clusterOptions{gateway: GatewayOptions{PublishRetry: 20 * time.Second}})
	c.startWorker("w1", newGenerator(t), WorkerOptions{})
	ctx := context.Background()
	body := map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 6, "stream": true}
	want, err := post(ctx, c.gw.URL, "/v1/completions", body)
	if err != nil || want.Status != http.StatusOK {
		t.Fatalf("before the outage: %v %+v", err, want)
	}
	c.srv.Shutdown()
	c.srv.WaitForShutdown()
	done := make(chan result, 1)
	go func() {
		r, err := post(ctx, c.gw.URL, "/v1/completions", body)
		if err != nil {
			r.Error = err.Error()
		}
		done <- r
	}()
	awaitCond(t, func() bool { return counter(t, c, "loopserve_gateway_publish_retries_total") > 1 })
	c.startServer()
	got := <-done
	if d := cmp.Diff(got, want, cmpIgnoreChunks); d != "" {
		t.Errorf("request sent during the outage (-got +want):\n%s", d)
	}
	js, _ := jetstream.New(c.connect("check"))
	s, err := js.Stream(ctx, c.ref.Stream())
	if err != nil {
		t.Fatal(err)
	}
	if seq := s.CachedInfo().State.LastSeq; seq != 2 {
		t.Errorf("the stream stored %d requests, want 2: the retried publish was queued more than once", seq)
	}
}
