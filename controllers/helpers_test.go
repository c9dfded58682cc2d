package controllers

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

var nsCounter atomic.Int64

// newNamespace creates a fresh namespace for one test (envtest never deletes namespaces, so
// they are left behind; names are unique per run).
func newNamespace(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("t%d-%d", time.Now().UnixNano()%1e6, nsCounter.Add(1))
	if err := k8s.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		t.Fatalf("creating namespace %s: %v", name, err)
	}
	return name
}

// natsServer is an embedded NATS server with JetStream that can be stopped and started again
// on the same port and store, as a real server restart would.
type natsServer struct {
	t    *testing.T
	dir  string
	port int
	srv  *server.Server
}

func startNATS(t *testing.T) *natsServer {
	t.Helper()
	n := &natsServer{t: t, dir: t.TempDir(), port: -1}
	n.start()
	t.Cleanup(n.stop)
	return n
}

func (n *natsServer) start() {
	n.t.Helper()
	s, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: n.port, JetStream: true, StoreDir: n.dir, NoLog: true, NoSigs: true,
	})
	if err != nil {
		n.t.Fatalf("creating NATS server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		n.t.Fatal("NATS server not ready after 10s")
	}
	n.srv = s
	n.port = s.Addr().(*net.TCPAddr).Port
}

func (n *natsServer) stop() {
	if n.srv != nil {
		n.srv.Shutdown()
		n.srv.WaitForShutdown()
		n.srv = nil
	}
}

func (n *natsServer) url() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.port) }

// js opens a client of the test's own (not the operator's) on the server.
func (n *natsServer) js() (*nats.Conn, jetstream.JetStream) {
	n.t.Helper()
	nc, err := nats.Connect(n.url())
	if err != nil {
		n.t.Fatalf("connecting to NATS: %v", err)
	}
	n.t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		n.t.Fatalf("opening JetStream: %v", err)
	}
	return nc, js
}

// registryEntryOf reads a LoopModel's registry entry.
func (n *natsServer) registryEntryOf(ctx context.Context, r bus.Ref) (bus.ModelEntry, error) {
	_, js := n.js()
	kv, err := js.KeyValue(ctx, bus.RegistryBucket)
	if err != nil {
		return bus.ModelEntry{}, err
	}
	v, err := kv.Get(ctx, r.Key())
	if err != nil {
		return bus.ModelEntry{}, err
	}
	return bus.DecodeModel(v.Value())
}

// await polls check until it returns nil, failing the test with its last error after timeout.
func await(t *testing.T, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v: %v", what, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// newLoopModel is a minimal valid LoopModel: a hostPath model served through the given NATS.
func newLoopModel(ns, name, natsURL string) *v1alpha1.LoopModel {
	return &v1alpha1.LoopModel{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1alpha1.LoopModelSpec{
			Model: v1alpha1.ModelSpec{
				Source: v1alpha1.ModelSource{HostPath: &v1alpha1.HostPathSource{Path: "/var/lib/models"}},
				Path:   "ouro-tiny-arith",
			},
			NATS: v1alpha1.NATSSpec{URL: natsURL},
		},
	}
}

func getLoopModel(t *testing.T, ns, name string) *v1alpha1.LoopModel {
	t.Helper()
	var lm v1alpha1.LoopModel
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &lm); err != nil {
		t.Fatalf("reading LoopModel %s/%s: %v", ns, name, err)
	}
	return &lm
}

// conditionIs checks one condition of a LoopModel's current status.
func conditionIs(ns, name, typ string, status metav1.ConditionStatus, reason string) func() error {
	return func() error {
		var lm v1alpha1.LoopModel
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &lm); err != nil {
			return err
		}
		c := meta.FindStatusCondition(lm.Status.Conditions, typ)
		if c == nil {
			return fmt.Errorf("no %s condition in %v", typ, lm.Status.Conditions)
		}
		if c.Status != status || c.Reason != reason {
			return fmt.Errorf("%s = %s/%s (%q), want %s/%s", typ, c.Status, c.Reason, c.Message, status, reason)
		}
		return nil
	}
}

// markDeploymentReady plays the Deployment controller (envtest runs none): every desired pod
// is updated, ready and available for the current generation.
func markDeploymentReady(t *testing.T, ns, name string) {
	t.Helper()
	setReadyWorkers(t, ns, name, -1)
}

// setReadyWorkers plays the Deployment controller with ready of the desired pods ready and
// available (all of them when ready < 0), every desired pod updated for the current generation.
func setReadyWorkers(t *testing.T, ns, name string, ready int32) {
	t.Helper()
	ctx := context.Background()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var dep appsv1.Deployment
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &dep); err != nil {
			return err
		}
		n := ptr.Deref(dep.Spec.Replicas, 1)
		r := ready
		if r < 0 {
			r = n
		}
		dep.Status = appsv1.DeploymentStatus{
			ObservedGeneration: dep.Generation,
			Replicas:           n, UpdatedReplicas: n, ReadyReplicas: r, AvailableReplicas: r,
		}
		return k8s.Status().Update(ctx, &dep)
	})
	if err != nil {
		t.Fatalf("setting ready workers of Deployment %s: %v", name, err)
	}
}

func getDeployment(t *testing.T, ns, name string) *appsv1.Deployment {
	t.Helper()
	var dep appsv1.Deployment
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &dep); err != nil {
		t.Fatalf("reading Deployment %s: %v", name, err)
	}
	return &dep
}

// exists reports nil once obj can be read.
func exists(obj client.Object, ns, name string) func() error {
	return func() error { return k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, obj) }
}

// hasEvent reports nil once an events.k8s.io Event with the reason regards the named object.
func hasEvent(ns, name, reason string) func() error {
	return func() error {
		var evs eventsv1.EventList
		if err := k8s.List(context.Background(), &evs, client.InNamespace(ns)); err != nil {
			return err
		}
		var seen []string
		for _, e := range evs.Items {
			if e.Regarding.Name == name && e.Reason == reason {
				return nil
			}
			seen = append(seen, e.Reason)
		}
		return fmt.Errorf("no %s event for %s among %v", reason, name, seen)
	}
}

// gone reports nil once obj no longer exists.
func gone(obj client.Object, ns, name string) func() error {
	return func() error {
		err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, obj)
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return err
		}
		return errors.New("still exists")
	}
}

// runManager starts mgr until the test ends; then it stops it, waits for it, reports its error
// as the test's (named by what), and closes its NATS pool.
func runManager(t *testing.T, what string, mgr ctrl.Manager, pool *NATSPool) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s: %v", what, err)
		}
		pool.Close()
	})
}
