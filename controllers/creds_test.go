package controllers

import (
	"context"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/internal/natstest"
)

// TestNATSCredentialsSecret: with spec.nats.credentialsSecret the operator authenticates with
// the Secret's .creds file and mounts it into the workers; without it, or with a broken
// Secret, the LoopModel is Degraded with a reason that says so.
func TestNATSCredentialsSecret(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	url, creds := natstest.Secured(t)

	// No credentials: the server refuses the operator.
	if err := k8s.Create(ctx, newLoopModel(ns, "anonymous", url)); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "anonymous refused", conditionIs(ns, "anonymous", CondDegraded, metav1.ConditionTrue, ReasonNATSError))

	// A Secret that does not exist yet, then one with garbage, then the right one.
	lm := newLoopModel(ns, "authed", url)
	lm.Spec.NATS.CredentialsSecret = &v1alpha1.SecretKey{Name: "nats-user"}
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "missing Secret reported", conditionIs(ns, "authed", CondDegraded, metav1.ConditionTrue, ReasonInvalidSpec))
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "nats-user"}, Data: map[string][]byte{"nats.creds": []byte("not a creds file")}}
	if err := k8s.Create(ctx, secret); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "bad creds reported", func() error {
		if err := conditionIs(ns, "authed", CondDegraded, metav1.ConditionTrue, ReasonInvalidSpec)(); err != nil {
			return err
		}
		for _, c := range getLoopModel(t, ns, "authed").Status.Conditions {
			if c.Type == CondDegraded && c.Message == `Secret `+ns+`/nats-user of spec.nats.credentialsSecret not found` {
				return fmt.Errorf("still the missing-Secret message")
			}
		}
		return nil
	})
	secret.Data["nats.creds"] = creds
	if err := k8s.Update(ctx, secret); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "authenticated: no longer Degraded", conditionIs(ns, "authed", CondDegraded, metav1.ConditionFalse, ReasonAsExpected))

	nc, err := nats.Connect(url, nats.UserJWTAndSeed(mustCredsParts(t, creds)))
	if err != nil {
		t.Fatalf("connecting with the user's creds: %v", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Stream(ctx, bus.Ref{Namespace: ns, Name: "authed"}.Stream()); err != nil {
		t.Errorf("stream created with the Secret's credentials: %v", err)
	}
	dep := getDeployment(t, ns, "authed-worker")
	var mounted bool
	for _, v := range dep.Spec.Template.Spec.Volumes {
		mounted = mounted || (v.Secret != nil && v.Secret.SecretName == "nats-user")
	}
	if !mounted {
		t.Errorf("worker pods do not mount the credentials Secret: %+v", dep.Spec.Template.Spec.Volumes)
	}
}

func mustCredsParts(t *testing.T, creds []byte) (string, string) {
	t.Helper()
	j, err := nkeys.ParseDecoratedJWT(creds)
	if err != nil {
		t.Fatal(err)
	}
	kp, err := nkeys.ParseDecoratedNKey(creds)
	if err != nil {
		t.Fatal(err)
	}
	seed, err := kp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	return j, string(seed)
}
