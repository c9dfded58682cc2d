package controllers

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
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

// TestForeignStreamKept: a stream that already has the LoopModel's name but serves other
// subjects (made by hand, or by another system) is never taken over or deleted: the LoopModel is
// refused (Degraded, NATSError), and distinct LoopModels never share a stream name.
func TestForeignStreamKept(t *testing.T) {
	ctx := context.Background()
	srv := startNATS(t)
	ns := newNamespace(t)
	ref := bus.Ref{Namespace: ns, Name: "x-m"}
	if a, b := (bus.Ref{Namespace: ns + "-x", Name: "m"}).Stream(), ref.Stream(); a == b {
		t.Fatalf("LoopModels %s-x/m and %s/x-m share stream %s", ns, ns, a)
	}
	_, js := srv.js()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: ref.Stream(), Subjects: []string{"foreign.subject"}}); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(ctx, newLoopModel(ns, "x-m", srv.url())); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "LoopModel refused", conditionIs(ns, "x-m", CondDegraded, metav1.ConditionTrue, ReasonNATSError))
	assertForeign := func(when string) {
		t.Helper()
		st, err := js.Stream(ctx, ref.Stream())
		if err != nil {
			t.Fatalf("foreign stream %s: %v", when, err)
		}
		if diff := cmp.Diff(st.CachedInfo().Config.Subjects, []string{"foreign.subject"}); diff != "" {
			t.Errorf("foreign stream's subjects %s (-got +want):\n%s", when, diff)
		}
	}
	assertForeign("while refused")

	if err := k8s.Delete(ctx, getLoopModel(t, ns, "x-m")); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "refused LoopModel deleted", gone(&v1alpha1.LoopModel{}, ns, "x-m"))
	assertForeign("after deleting the LoopModel")
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
