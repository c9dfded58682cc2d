package controllers

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go/jetstream"
	coordinationv1 "k8s.io/api/coordination/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/serve"
)

// TestOperatorCreatesRegistryAtStart: an operator started while its default NATS is down is
// healthy and ready at once, without holding the leader Lease (the suite's operator holds it);
// once NATS is up it creates the registry and gateway-liveness buckets with no LoopModel, and a
// gateway on that fresh NATS becomes ready and answers 404 for a model that does not exist.
func TestOperatorCreatesRegistryAtStart(t *testing.T) {
	ctx := context.Background()
	await(t, waitLong, "the suite's operator holding the leader Lease", func() error {
		var lease coordinationv1.Lease
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: operatorNamespace, Name: leaseName}, &lease); err != nil {
			return err
		}
		if lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity == "" {
			return errors.New("the lease has no holder")
		}
		return nil
	})
	srv := startNATS(t)
	srv.stop() // down when the operator starts; started again below on the same port

	probe, err := freeAddr()
	if err != nil {
		t.Fatal(err)
	}
	mgr, pool, err := NewManager(cfg, ManagerOptions{
		NATSURL: srv.url(), WorkerImage: testImage, MetricsAddr: "0", ProbeAddr: probe, SkipNameValidation: true,
		LeaderElection: true, LeaderElectionID: leaseName, LeaderElectionNamespace: operatorNamespace,
		NATSTimeout: time.Second, RetryBase: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond,
		NATSReconnectWait: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	runManager(t, "manager", mgr, pool)
	for _, path := range []string{"/healthz", "/readyz"} {
		await(t, waitLong, "operator "+path+" while NATS is down", func() error { return httpOK("http://" + probe + path) })
	}

	srv.start()
	nc, js := srv.js()
	// The gateway starts alongside the operator, as in a fresh install: maybe before the buckets exist.
	g, err := serve.NewGateway(nc, serve.GatewayOptions{})
	if err != nil {
		t.Fatal(err)
	}
	gctx, gstop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = g.Run(gctx) })
	defer func() { gstop(); wg.Wait() }()
	await(t, waitLong, "registry buckets created", func() error {
		for _, b := range []string{bus.RegistryBucket, bus.GatewaysBucket} {
			if _, err := js.KeyValue(ctx, b); err != nil {
				return fmt.Errorf("bucket %s: %w", b, err)
			}
		}
		return nil
	})
	kv, err := js.KeyValue(ctx, bus.GatewaysBucket)
	if err != nil {
		t.Fatal(err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(st.TTL(), bus.GatewayTTL); diff != "" {
		t.Errorf("liveness bucket TTL (-got +want):\n%s", diff)
	}
	reg, err := js.KeyValue(ctx, bus.RegistryBucket)
	if err != nil {
		t.Fatal(err)
	}
	if keys, err := reg.Keys(ctx); !errors.Is(err, jetstream.ErrNoKeysFound) {
		t.Errorf("registry of a NATS without LoopModels: keys %v, err %v; want none", keys, err)
	}
	if leader := mgr.Elected(); isClosed(leader) {
		t.Error("the test's operator was elected; the buckets must not need the Lease")
	}

	select {
	case <-g.Ready():
	case <-time.After(waitLong):
		t.Fatal("gateway on a fresh NATS not ready")
	}
	gw := httptest.NewServer(g)
	defer gw.Close()
	if err := httpOK(gw.URL + "/readyz"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(gw.URL+"/v1/completions", "application/json", strings.NewReader(`{"model":"default/none","prompt":"1+1=","max_tokens":1}`))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "model_not_found") {
		t.Errorf("completion for a missing model: %d %s; want 404 model_not_found", resp.StatusCode, body)
	}
}

func httpOK(url string) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %d %s", url, resp.StatusCode, b)
	}
	return nil
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
