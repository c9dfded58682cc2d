package serve

import (
	"context"
	"errors"
	"fmt"
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

	"github.com/loopserve/loopserve/bus"
)

// permissionsConf is the chart's example NATS configuration, one user per role.
var permissionsConf = filepath.Join("..", "..", "charts", "loopserve", "examples", "nats-server.conf")

// violations collects the permission errors NATS reports to a connection.
type violations struct {
	mu   sync.Mutex
	errs []string
}

func (v *violations) handler(role string) nats.Option {
	return nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		if errors.Is(err, nats.ErrPermissionViolation) || strings.Contains(err.Error(), "Permissions Violation") {
			v.mu.Lock()
			v.errs = append(v.errs, role+": "+err.Error())
			v.mu.Unlock()
		}
	})
}

func (v *violations) list() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]string(nil), v.errs...)
}

// TestNATSPermissions runs the serving path under exactly the permissions of the chart's
// example: the operator's NATS calls set the model up, then the gateway and a worker serve
// whole, streamed, multi-choice and abandoned requests and publish stats, without one
// permission violation. Each role is refused what it must not do.
func TestNATSPermissions(t *testing.T) {
	for _, role := range []string{"OPERATOR", "GATEWAY", "WORKER"} {
		t.Setenv("LOOPSERVE_"+role+"_PASSWORD", "pw-"+strings.ToLower(role))
	}
	opts, err := server.ProcessConfigFile(permissionsConf)
	if err != nil {
		t.Fatalf("the example does not parse: %v", err)
	}
	if !opts.SyncAlways {
		t.Error("the example does not set sync_interval: always")
	}
	opts.Host, opts.Port, opts.StoreDir, opts.NoLog, opts.NoSigs = "127.0.0.1", -1, t.TempDir(), true, true
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	defer func() { s.Shutdown(); s.WaitForShutdown() }()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats not ready")
	}
	var v violations
	as := func(role string) *nats.Conn {
		t.Helper()
		url := fmt.Sprintf("nats://%s:pw-%s@%s", role, role, strings.TrimPrefix(s.ClientURL(), "nats://"))
		nc, err := nats.Connect(url, v.handler(role), nats.MaxReconnects(-1))
		if err != nil {
			t.Fatalf("connecting as %s: %v", role, err)
		}
		t.Cleanup(nc.Close)
		return nc
	}
	ctx := context.Background()

	// The operator's side: what syncNATS and publishThreshold do.
	op := as("operator")
	ojs, _ := jetstream.New(op)
	if _, err := bus.EnsureQueue(ctx, ojs, testRef, bus.QueueOptions{AckWait: 2 * time.Second}); err != nil {
		t.Fatal(err)
	}
	kv, err := bus.EnsureRegistry(ctx, ojs, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := bus.PutModel(ctx, kv, bus.ModelEntry{Namespace: testRef.Namespace, Name: testRef.Name, ContextLength: 2048, MaxSteps: 4, Ready: true}); err != nil {
		t.Fatal(err)
	}
	stats, err := op.SubscribeSync(testRef.StatsSubject())
	if err != nil {
		t.Fatal(err)
	}
	if err := op.Publish(testRef.ControlSubject(), []byte(`{"exitThreshold": 0.7}`)); err != nil {
		t.Fatal(err)
	}

	gen := newGenerator(t)
	wnc := as("worker")
	w, err := NewWorker(wnc, gen, loadTokenizer(t), WorkerOptions{Ref: testRef, Name: "w1", ContextLength: 2048, MaxSteps: 4,
		StopTokens: []int{2, 0}, StatsInterval: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	g, err := NewGateway(as("gateway"), GatewayOptions{RequestTimeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = w.Run(rctx) })
	wg.Go(func() { _ = g.Run(rctx) })
	defer func() { stop(); wg.Wait() }()
	<-g.Ready()
	srv := httptest.NewServer(g)
	defer srv.Close()
	awaitCond(t, func() bool { _, ok := g.lookup(testRef.String()); return ok && w.Ready() })

	for _, body := range []map[string]any{
		{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 6},
		{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 6, "stream": true, "n": 2, "temperature": 1},
		{"model": "ouro-tiny-arith", "messages": []map[string]string{{"role": "user", "content": arithPrompt}}, "max_tokens": 4, "stream": true},
	} {
		got, err := post(ctx, srv.URL, map[bool]string{true: "/v1/chat/completions", false: "/v1/completions"}[body["messages"] != nil], body)
		if err != nil || got.Status != http.StatusOK || len(got.Depths) == 0 {
			t.Errorf("%v: %v %+v", body, err, got)
		}
	}
	// A client that leaves: the gateway cancels, the worker stops.
	cctx, leave := context.WithCancel(ctx)
	go func() {
		_, _ = post(cctx, srv.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 1500, "stream": true, "exit_threshold": 1})
	}()
	awaitCond(t, func() bool { w.mu.Lock(); defer w.mu.Unlock(); return len(w.cancels) > 0 })
	leave()
	awaitCond(t, func() bool { w.mu.Lock(); defer w.mu.Unlock(); return len(w.cancels) == 0 })
	if _, err := stats.NextMsg(10 * time.Second); err != nil {
		t.Errorf("the operator received no stats: %v", err)
	}
	if got := g.adm.models[testRef.String()]; got == nil || got.stateAt.IsZero() {
		t.Error("the gateway never read its queue's depth")
	}
	// A request that kills its workers: the gateway answers 500 and removes it from the queue.
	poison := bus.Ref{Namespace: "default", Name: "poison"}
	if _, err := bus.EnsureQueue(ctx, ojs, poison, bus.QueueOptions{AckWait: 200 * time.Millisecond, MaxDeliver: 2}); err != nil {
		t.Fatal(err)
	}
	if err := bus.PutModel(ctx, kv, bus.ModelEntry{Namespace: poison.Namespace, Name: poison.Name, ContextLength: 2048, MaxSteps: 4, Ready: true}); err != nil {
		t.Fatal(err)
	}
	awaitCond(t, func() bool { _, ok := g.lookup(poison.String()); return ok })
	dying, err := bus.BindQueue(ctx, bind(wnc), poison)
	if err != nil {
		t.Fatal(err)
	}
	dctx, dstop := context.WithCancel(ctx)
	var dwg sync.WaitGroup
	dwg.Go(func() {
		for dctx.Err() == nil {
			if batch, err := dying.Fetch(1, jetstream.FetchMaxWait(300*time.Millisecond)); err == nil {
				for range batch.Messages() { // taken, never acked
				}
			}
		}
	})
	got, err := post(ctx, srv.URL, "/v1/completions", map[string]any{"model": poison.String(), "prompt": "x", "max_tokens": 1})
	dstop()
	dwg.Wait()
	if err != nil || got.Status != http.StatusInternalServerError {
		t.Errorf("poison request: %v %+v, want 500", err, got)
	}
	awaitCond(t, func() bool {
		st, err := ojs.Stream(ctx, poison.Stream())
		return err == nil && st.CachedInfo().State.Msgs == 0
	})

	if got := v.list(); len(got) > 0 {
		t.Errorf("permission violations while serving: %q", got)
	}

	// What each role must not do.
	gjs, _ := jetstream.New(as("gateway"))
	wjs := bind(wnc)
	for _, tc := range []struct {
		name    string
		do      func(context.Context) error
		subject string // the refused subject NATS reports
	}{
		{"gateway creates a stream", func(ctx context.Context) error {
			_, err := gjs.CreateStream(ctx, jetstream.StreamConfig{Name: "X", Subjects: []string{"x"}})
			return err
		}, "$JS.API.STREAM.CREATE.X"},
		{"gateway raises the registry's replicas", func(ctx context.Context) error { _, err := bus.EnsureRegistry(ctx, gjs, 3); return err },
			"$JS.API.STREAM.UPDATE.KV_loopserve_models"},
		{"worker creates its queue", func(ctx context.Context) error {
			_, err := bus.EnsureQueue(ctx, wjs, testRef, bus.QueueOptions{})
			return err
		}, "$JS.API.STREAM.UPDATE." + testRef.Stream()}, // CreateOrUpdate on an existing stream
		{"worker deletes the stream", func(ctx context.Context) error { return wjs.DeleteStream(ctx, testRef.Stream()) },
			"$JS.API.STREAM.DELETE." + testRef.Stream()},
		{"worker queues a request", func(ctx context.Context) error {
			_, err := wjs.Publish(ctx, testRef.RequestSubject(), []byte("{}"))
			return err
		}, testRef.RequestSubject()},
	} {
		before := len(v.list())
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		err := tc.do(cctx)
		cancel()
		if err == nil {
			t.Errorf("%s: allowed", tc.name)
		}
		awaitCond(t, func() bool { return len(v.list()) > before })
		if got := v.list()[before]; !strings.Contains(got, tc.subject) {
			t.Errorf("%s: violation %q, want one for %s", tc.name, got, tc.subject)
		}
	}
	if _, err := gjs.Stream(ctx, testRef.Stream()); err != nil {
		t.Errorf("the stream is gone after the refused calls: %v", err)
	}
}

func bind(nc *nats.Conn) jetstream.JetStream {
	js, _ := jetstream.New(nc)
	return js
}
