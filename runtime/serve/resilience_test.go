package serve

import (
	"context"
	"net/http"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/serve/loadtest"
)

// TestNATSRestartMidLoad restarts the NATS server (same store, same port) while accepted
// requests are queued and generating; every one of them must still complete, correctly. Requests
// sent while it is down may be refused, but never accepted and lost.
func TestNATSRestartMidLoad(t *testing.T) {
	c := newCluster(t, clusterOptions{queue: bus.QueueOptions{AckWait: 2 * time.Second, MaxAckPending: 4}})
	gen := newGenerator(t)
	ctx := context.Background()
	const n = 8
	body := func(i int) map[string]any {
		return map[string]any{"model": "ouro-tiny-arith", "prompt": loadtest.ArithPrompt(i), "max_tokens": 16, "stream": i%2 == 0}
	}
	// Reference outputs (greedy, so the same whatever the seed) before any trouble.
	stopRef := c.startWorker("ref", gen, WorkerOptions{Capacity: 4})
	want := make([]result, n)
	for i := range n {
		r, err := post(ctx, c.gw.URL, "/v1/completions", body(i))
		if err != nil || r.Status != 200 {
			t.Fatalf("reference %d: %v %+v", i, err, r)
		}
		want[i] = r
	}
	stopRef()

	// The worker generates slowly enough that the restart lands mid-generation.
	c.startWorker("w1", slowGenerator{gen, 15 * time.Millisecond}, WorkerOptions{Capacity: 4})
	got := make([]result, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { got[i], errs[i] = post(ctx, c.gw.URL, "/v1/completions", body(i)) })
	}
	js, _ := jetstream.New(c.connect("check"))
	awaitCond(t, func() bool { // all accepted, and some generating
		s, err := js.Stream(ctx, c.ref.Stream())
		return err == nil && s.CachedInfo().State.LastSeq >= 2*n && tokensGenerated(t, c) > 0
	})
	c.srv.Shutdown()
	c.srv.WaitForShutdown()
	// Requests sent during the outage are either refused (not accepted: 503) or served in full.
	const during = 4
	late := make([]result, during)
	lateErrs := make([]error, during)
	for i := range during {
		wg.Go(func() { late[i], lateErrs[i] = post(ctx, c.gw.URL, "/v1/completions", body(i)) })
	}
	time.Sleep(300 * time.Millisecond) // clients notice the outage
	c.startServer()
	wg.Wait()
	for i := range during {
		switch {
		case lateErrs[i] != nil:
			t.Errorf("request %d sent during the outage: %v", i, lateErrs[i])
		case late[i].Status == http.StatusServiceUnavailable:
			t.Logf("request %d sent during the outage was refused: %s", i, late[i].Error)
		default:
			if d := cmp.Diff(late[i], want[i], cmpIgnoreChunks); d != "" {
				t.Errorf("request %d sent during the outage (-got +want):\n%s", i, d)
			}
		}
	}
	// The gateway still follows the registry.
	kv, err := bus.EnsureRegistry(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := bus.PutModel(ctx, kv, bus.ModelEntry{Namespace: "default", Name: "after-restart", ContextLength: 64, MaxSteps: 4, Ready: true}); err != nil {
		t.Fatal(err)
	}
	c.awaitModel("default/after-restart", true)
	for i := range n {
		if errs[i] != nil {
			t.Errorf("request %d: %v", i, errs[i])
			continue
		}
		if d := cmp.Diff(got[i], want[i], cmpIgnoreChunks); d != "" {
			t.Errorf("request %d after a NATS restart (-got +want):\n%s", i, d)
		}
	}
}

// TestManyStreamingClientsAgainstUp runs 200 concurrent streaming clients against a one-machine
// deployment (what `loopserve up` runs) and checks that all complete, that memory stays bounded
// and that no goroutine outlives the load.
func TestManyStreamingClientsAgainstUp(t *testing.T) {
	l, err := Load(modelDir, engine.Options{Mode: engine.Fast, Threshold: 0.3, MaxBatch: 32})
	if err != nil {
		t.Fatal(err)
	}
	ectx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = l.Run(ectx) }()
	defer func() { cancel(); <-done; _ = l.Close() }()
	wo := l.Worker
	wo.Capacity = 32
	local, err := StartLocal(context.Background(), LocalOptions{Ref: testRef, DataDir: t.TempDir(), Gen: l.Engine, Tok: l.Tok, Worker: wo})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := local.Close(); err != nil {
			t.Error(err)
		}
	}()
	runtime.GC()
	goroutines := runtime.NumGoroutine()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	const clients = 200
	ctx, stop := context.WithTimeout(context.Background(), 3*time.Minute)
	defer stop()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	res, err := loadtest.Run(ctx, loadtest.Options{URL: local.URL(), Model: testRef.String(), Clients: clients, Requests: clients, MaxTokens: 2,
		ExitThreshold: 0.3, Prompts: []string{"a = 1 ; ? a =", "b = 2 ; ? b ="}, Client: client})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests != clients || res.Errors != 0 {
		t.Fatalf("%d of %d requests completed, %d failed; first error: %v", res.Requests, clients, res.Errors, res.FirstErr)
	}
	if res.Tokens < clients {
		t.Errorf("received %d tokens for %d requests", res.Tokens, clients)
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	const bound = 64 << 20
	if grew := int64(after.HeapInuse) - int64(before.HeapInuse); grew > bound {
		t.Errorf("heap in use grew by %d MiB under load, want < %d MiB", grew>>20, bound>>20)
	}
	t.Logf("%d clients: %.1f req/s, TTFT p50 %s p95 %s, heap %d -> %d MiB", clients, res.RequestsPerSecond(),
		loadtest.Quantile(res.TTFT, 0.5), loadtest.Quantile(res.TTFT, 0.95), before.HeapInuse>>20, after.HeapInuse>>20)
	client.CloseIdleConnections()
	awaitCond(t, func() bool { return runtime.NumGoroutine() <= goroutines+10 })
}
