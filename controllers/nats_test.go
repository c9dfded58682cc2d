package controllers

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

// TestNATSPool: one shared connection per URL; a server outage is reported at once as
// ErrNATSUnreachable while the connection reconnects; idle connections are closed.
func TestNATSPool(t *testing.T) {
	ctx := context.Background()
	a, b := startNATS(t), startNATS(t)
	p := &NATSPool{ReconnectWait: 50 * time.Millisecond, IdleClose: 200 * time.Millisecond}
	defer p.Close()

	c1, err := p.Conn(ctx, a.url(), nil)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := p.Conn(ctx, a.url(), nil)
	if err != nil || c2 != c1 {
		t.Fatalf("second Conn = %p, %v; want the shared %p", c2, err, c1)
	}

	a.stop()
	await(t, waitLong, "outage reported", func() error {
		_, err := p.Conn(ctx, a.url(), nil)
		if !errors.Is(err, ErrNATSUnreachable) {
			return errors.New("no ErrNATSUnreachable yet")
		}
		return nil
	})
	a.start()
	await(t, waitLong, "reconnected", func() error {
		c, err := p.Conn(ctx, a.url(), nil)
		if err != nil {
			return err
		}
		if c != c1 {
			t.Errorf("after the outage got a new connection; want the same one reconnected")
		}
		return nil
	})

	// Only b is used from now on: a's connection is closed once idle.
	time.Sleep(250 * time.Millisecond) // let a's connection age past IdleClose
	if _, err := p.Conn(ctx, b.url(), nil); err != nil {
		t.Fatal(err)
	}
	if s := c1.Status(); s != nats.CLOSED {
		t.Errorf("idle connection status = %v, want CLOSED", s)
	}

	if _, err := p.Conn(ctx, "nats://127.0.0.1:1", nil); !errors.Is(err, ErrNATSUnreachable) {
		t.Errorf("dialling a closed port: err = %v, want ErrNATSUnreachable", err)
	}
	if _, err := p.Conn(ctx, b.url(), []byte("garbage")); !errors.Is(err, ErrInvalidCredentials) {
		t.Errorf("garbage credentials: err = %v, want ErrInvalidCredentials", err)
	}
}

// TestStreamNameCollision: "x-y/m" and "x/y-m" fold to the same stream name; the second
// LoopModel is refused (Degraded, NATSError) instead of taking over the first one's queue.
func TestStreamNameCollision(t *testing.T) {
	ctx := context.Background()
	srv := startNATS(t)
	base := newNamespace(t) // unique prefix for this run
	nsA, nsB := base+"-x", base
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: nsA}}); err != nil {
		t.Fatal(err)
	}
	first := newLoopModel(nsA, "m", srv.url())    // stream LOOPSERVE_<BASE>_X_M
	second := newLoopModel(nsB, "x-m", srv.url()) // stream LOOPSERVE_<BASE>_X_M too
	refA, refB := bus.Ref{Namespace: nsA, Name: "m"}, bus.Ref{Namespace: nsB, Name: "x-m"}
	if refA.Stream() != refB.Stream() {
		t.Skip("stream names no longer collide: this guard is moot")
	}
	if err := k8s.Create(ctx, first); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "first queue", conditionIs(nsA, "m", CondDegraded, metav1.ConditionFalse, ReasonAsExpected))
	if err := k8s.Create(ctx, second); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "second refused", conditionIs(nsB, "x-m", CondDegraded, metav1.ConditionTrue, ReasonNATSError))
	_, js := srv.js()
	st, err := js.Stream(ctx, refA.Stream())
	if err != nil {
		t.Fatal(err)
	}
	if subj := st.CachedInfo().Config.Subjects; len(subj) != 1 || subj[0] != refA.RequestSubject() {
		t.Errorf("first LoopModel's stream now serves %v", subj)
	}

	// Deleting the refused LoopModel leaves the first one's stream alone.
	if err := k8s.Delete(ctx, getLoopModel(t, nsB, "x-m")); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "refused LoopModel deleted", gone(&v1alpha1.LoopModel{}, nsB, "x-m"))
	if _, err := js.Stream(ctx, refA.Stream()); err != nil {
		t.Errorf("first LoopModel's stream after deleting the second: %v", err)
	}
}

// TestNATSURLChangeMovesQueue: pointing a LoopModel at another NATS server creates its queue
// and registry entry there and deletes them from the old server.
func TestNATSURLChangeMovesQueue(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	oldSrv, newSrv := startNATS(t), startNATS(t)
	if err := k8s.Create(ctx, newLoopModel(ns, "mover", oldSrv.url())); err != nil {
		t.Fatal(err)
	}
	r := bus.Ref{Namespace: ns, Name: "mover"}
	await(t, waitLong, "status names the old server", func() error {
		if u := getLoopModel(t, ns, "mover").Status.NATSURL; u != oldSrv.url() {
			return fmt.Errorf("status.natsURL = %q", u)
		}
		return nil
	})
	updateLoopModel(t, ns, "mover", func(lm *v1alpha1.LoopModel) { lm.Spec.NATS.URL = newSrv.url() })
	await(t, waitLong, "status names the new server", func() error {
		if u := getLoopModel(t, ns, "mover").Status.NATSURL; u != newSrv.url() {
			return fmt.Errorf("status.natsURL = %q", u)
		}
		return nil
	})
	_, newJS := newSrv.js()
	if _, err := newJS.Stream(ctx, r.Stream()); err != nil {
		t.Errorf("stream on the new server: %v", err)
	}
	if _, err := newSrv.registryEntryOf(ctx, r); err != nil {
		t.Errorf("registry entry on the new server: %v", err)
	}
	_, oldJS := oldSrv.js()
	if _, err := oldJS.Stream(ctx, r.Stream()); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Errorf("stream on the old server: err = %v, want ErrStreamNotFound", err)
	}
	if _, err := oldSrv.registryEntryOf(ctx, r); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("registry entry on the old server: err = %v, want ErrKeyNotFound", err)
	}
}
