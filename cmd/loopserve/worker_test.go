package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/engine"
)

func startTestNATS(t *testing.T, port int) *server.Server {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: t.TempDir(), NoSigs: true, NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats not ready")
	}
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return s
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func probe(url string) (int, string) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func await(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 30s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestWorkerWaitsForQueueBeforeLoading: a worker started before its LoopModel's queue exists is
// alive (/healthz) but not ready, and says it waits for the queue rather than loading weights;
// once the operator's queue appears it loads the model and becomes ready. Several NATS URLs are
// accepted, the first of them down.
func TestWorkerWaitsForQueueBeforeLoading(t *testing.T) {
	s := startTestNATS(t, -1)
	r := bus.Ref{Namespace: "default", Name: "ouro-tiny-arith"}
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- runWorker(ctx, slog.New(slog.DiscardHandler), workerConfig{ref: r, capacity: 2,
			nats:     natsFlags{url: fmt.Sprintf("nats://127.0.0.1:%d, %s", freePort(t), s.ClientURL())},
			modelDir: filepath.Join("..", "..", "testdata", "models", "ouro-tiny-arith"),
			engine:   engine.Options{Mode: engine.Fast, MaxBatch: 2, Threshold: 0.7}, metricsListen: metrics})
	}()
	await(t, "/healthz answers", func() bool { code, _ := probe("http://" + metrics + "/healthz"); return code == http.StatusOK })
	code, body := probe("http://" + metrics + "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "waiting for the work queue") {
		t.Errorf("/readyz before the queue exists = %d %q, want 503 waiting for the work queue", code, body)
	}
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	if _, err := bus.EnsureQueue(ctx, js, r, bus.QueueOptions{}); err != nil {
		t.Fatal(err)
	}
	await(t, "/readyz ready", func() bool { code, _ := probe("http://" + metrics + "/readyz"); return code == http.StatusOK })
	cancel()
	if err := <-done; err != nil {
		t.Errorf("worker stopped with %v", err)
	}
}
