package serve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/loopserve/loopserve/bus"
)

// LocalOptions configure a one-machine deployment: embedded NATS, one worker, the gateway.
type LocalOptions struct {
	Ref      bus.Ref
	DataDir  string // JetStream store; "" = a temporary directory removed by Close
	NATSPort int    // 0 = any free port (NATS listens on 127.0.0.1 only)
	Listen   string // gateway address; "" = 127.0.0.1:0
	Gen      Generator
	Tok      Tokenizer
	Worker   WorkerOptions    // Ref is taken from above
	Queue    bus.QueueOptions // MaxAckPending defaults to the worker's capacity
	Gateway  GatewayOptions   // Metrics and Gatherer default to a fresh registry
	Tuning   LocalTuning      // the tuning loop; zero: none
}

// Local is a running one-machine deployment; stop it with Close. Created by StartLocal.
type Local struct {
	Server   *server.Server
	Registry *prometheus.Registry

	url     string
	nc      *nats.Conn
	http    *http.Server
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	tempDir string
	tuner   *localTuner
	errMu   sync.Mutex
	err     error
}

// StartLocal starts NATS, creates the LoopModel's queue and registry entry, and starts the
// worker and the gateway. It returns once the gateway lists the model.
func StartLocal(ctx context.Context, o LocalOptions) (l *Local, err error) {
	if err := o.Ref.Validate(); err != nil {
		return nil, err
	}
	l = &Local{}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	dir := o.DataDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "loopserve-nats-"); err != nil {
			return nil, fmt.Errorf("creating NATS data directory: %w", err)
		}
		l.tempDir = dir
	}
	if l.Server, err = StartNATS(NATSOptions{Port: o.NATSPort, StoreDir: dir}); err != nil {
		return nil, err
	}
	if l.nc, err = nats.Connect(l.Server.ClientURL(), nats.Name("loopserve-up"), nats.MaxReconnects(-1)); err != nil {
		return nil, fmt.Errorf("connecting to NATS: %w", err)
	}
	js, err := jetstream.New(l.nc)
	if err != nil {
		return nil, fmt.Errorf("opening JetStream: %w", err)
	}
	wo := o.Worker
	wo.Ref = o.Ref
	if wo.Capacity <= 0 {
		wo.Capacity = 8
	}
	q := o.Queue
	if q.MaxAckPending <= 0 {
		q.MaxAckPending = wo.Capacity
	}
	if _, err := bus.EnsureQueue(ctx, js, o.Ref, q); err != nil {
		return nil, err
	}
	kv, err := bus.EnsureRegistry(ctx, js, q.Replicas)
	if err != nil {
		return nil, err
	}
	th, err := o.Tuning.thresholds(o.Gen.Threshold())
	if err != nil {
		return nil, err
	}
	entry := bus.ModelEntry{Namespace: o.Ref.Namespace, Name: o.Ref.Name, ContextLength: wo.ContextLength,
		Thresholds: th, MaxSteps: wo.MaxSteps, Ready: true, Updated: time.Now().UTC()}
	if err := bus.PutModel(ctx, kv, entry); err != nil {
		return nil, err
	}

	l.Registry = prometheus.NewRegistry()
	gopt := o.Gateway
	if gopt.Metrics == nil || wo.Metrics == nil {
		m, err := NewMetrics(l.Registry)
		if err != nil {
			return nil, err
		}
		if gopt.Metrics == nil {
			gopt.Metrics = m
		}
		if wo.Metrics == nil {
			wo.Metrics = m
		}
		if gopt.Gatherer == nil {
			gopt.Gatherer = l.Registry
		}
	}
	w, err := NewWorker(l.nc, o.Gen, o.Tok, wo)
	if err != nil {
		return nil, err
	}
	if o.Tuning.enabled() {
		if l.tuner, err = newLocalTuner(l.nc, kv, entry, o.Tuning, w.opt.StatsInterval); err != nil {
			return nil, err
		}
	}
	g, err := NewGateway(l.nc, gopt)
	if err != nil {
		return nil, err
	}
	listen := o.Listen
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", listen, err)
	}
	l.url = "http://" + ln.Addr().String()
	l.http = &http.Server{Handler: g, ReadHeaderTimeout: 10 * time.Second}

	rctx, cancel := context.WithCancel(context.Background())
	l.cancel = cancel
	l.wg.Go(func() { l.setErr(w.Run(rctx)) })
	l.wg.Go(func() { l.setErr(g.Run(rctx)) })
	if l.tuner != nil {
		l.wg.Go(func() { l.setErr(l.tuner.Run(rctx)) })
	}
	l.wg.Go(func() {
		if err := l.http.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			l.setErr(fmt.Errorf("serving HTTP: %w", err))
		}
	})
	select {
	case <-g.Ready():
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	// The watcher may deliver our own entry just after the initial marker.
	for {
		if _, ok := g.lookup(o.Ref.String()); ok {
			return l, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (l *Local) setErr(err error) {
	if err == nil {
		return
	}
	l.errMu.Lock()
	defer l.errMu.Unlock()
	if l.err == nil {
		l.err = err
	}
}

// URL is the gateway's base URL, e.g. http://127.0.0.1:8080.
func (l *Local) URL() string { return l.url }

// Conn is the deployment's own NATS connection.
func (l *Local) Conn() *nats.Conn { return l.nc }

// Close stops the gateway, the worker and NATS, and removes a temporary data directory. It
// returns the first error any of them failed with.
func (l *Local) Close() error {
	if l.http != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if l.http.Shutdown(ctx) != nil {
			_ = l.http.Close() // streams still open after the grace period
		}
		cancel()
	}
	if l.cancel != nil {
		l.cancel()
	}
	l.wg.Wait()
	if l.nc != nil {
		l.nc.Close()
	}
	if l.Server != nil {
		l.Server.Shutdown()
		l.Server.WaitForShutdown()
	}
	if l.tempDir != "" {
		_ = os.RemoveAll(l.tempDir)
	}
	l.errMu.Lock()
	defer l.errMu.Unlock()
	return l.err
}
