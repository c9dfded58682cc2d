package controllers

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/internal/natstest"
)

// TestDeletionAfterSecretGone deletes the credentials Secret before the LoopModel, as a
// namespace deletion may: the cleanup still reaches NATS with the credentials the operator last
// used and removes the stream, and the LoopModel goes. Without any credentials known (the
// Secret never existed), the LoopModel goes at once with a Warning event.
func TestDeletionAfterSecretGone(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	url, creds := natstest.Secured(t)
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "nats-user"}, Data: map[string][]byte{"nats.creds": creds}}
	if err := k8s.Create(ctx, secret); err != nil {
		t.Fatal(err)
	}
	lm := newLoopModel(ns, "kept", url)
	lm.Spec.NATS.CredentialsSecret = &v1alpha1.SecretKey{Name: "nats-user"}
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(url, nats.UserJWTAndSeed(mustCredsParts(t, creds)))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	r := bus.Ref{Namespace: ns, Name: "kept"}
	await(t, waitLong, "stream created", func() error { _, err := js.Stream(ctx, r.Stream()); return err })

	if err := k8s.Delete(ctx, secret); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Delete(ctx, getLoopModel(t, ns, "kept")); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "LoopModel deleted", gone(&v1alpha1.LoopModel{}, ns, "kept"))
	if _, err := js.Stream(ctx, r.Stream()); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Errorf("stream after the deletion: %v, want it deleted", err)
	}
	await(t, waitLong, "QueueDeleted event", hasEvent(ns, "kept", EventQueueDeleted))

	never := newLoopModel(ns, "never", url)
	never.Spec.NATS.CredentialsSecret = &v1alpha1.SecretKey{Name: "absent"}
	if err := k8s.Create(ctx, never); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "missing Secret reported", conditionIs(ns, "never", CondDegraded, metav1.ConditionTrue, ReasonInvalidSpec))
	if err := k8s.Delete(ctx, getLoopModel(t, ns, "never")); err != nil {
		t.Fatal(err)
	}
	await(t, 5*time.Second, "deleted without waiting", gone(&v1alpha1.LoopModel{}, ns, "never"))
	await(t, waitLong, "abandoned cleanup reported", hasEvent(ns, "never", EventCleanupAbandoned))
}

// TestDeletionNeverBlockedByNATS: a LoopModel deleted while its NATS stays down waits for the
// cleanup (and says so) for the finalizer timeout only, then goes with a Warning event.
func TestDeletionNeverBlockedByNATS(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	if err := k8s.Create(ctx, newLoopModel(ns, "stranded", srv.url())); err != nil {
		t.Fatal(err)
	}
	_, js := srv.js()
	await(t, waitLong, "stream created", func() error { _, err := js.Stream(ctx, bus.Ref{Namespace: ns, Name: "stranded"}.Stream()); return err })
	srv.stop()
	if err := k8s.Delete(ctx, getLoopModel(t, ns, "stranded")); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "deletion held", func() error {
		lm := getLoopModel(t, ns, "stranded")
		c := meta.FindStatusCondition(lm.Status.Conditions, CondDegraded)
		if c == nil || !strings.Contains(c.Message, "deletion waits for NATS cleanup (at most") {
			return fmt.Errorf("Degraded %+v", c)
		}
		return nil
	})
	await(t, finalizerTimeout+waitLong, "released after the timeout", gone(&v1alpha1.LoopModel{}, ns, "stranded"))
	await(t, waitLong, "abandoned cleanup reported", hasEvent(ns, "stranded", EventCleanupAbandoned))
}

// TestForeignFinalizerKept: the operator adds and removes only its own finalizer; another
// controller's stays, and holds the object.
func TestForeignFinalizerKept(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	lm := newLoopModel(ns, "shared", srv.url())
	lm.Finalizers = []string{"example.com/audit"}
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "both finalizers", func() error {
		if f := getLoopModel(t, ns, "shared").Finalizers; !slices.Contains(f, Finalizer) || !slices.Contains(f, "example.com/audit") {
			return fmt.Errorf("finalizers %v", f)
		}
		return nil
	})
	if err := k8s.Delete(ctx, getLoopModel(t, ns, "shared")); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "own finalizer removed", func() error {
		if f := getLoopModel(t, ns, "shared").Finalizers; !slices.Equal(f, []string{"example.com/audit"}) {
			return fmt.Errorf("finalizers %v", f)
		}
		return nil
	})
	updateLoopModel(t, ns, "shared", func(lm *v1alpha1.LoopModel) { lm.Finalizers = nil })
	await(t, waitLong, "deleted", gone(&v1alpha1.LoopModel{}, ns, "shared"))
}
