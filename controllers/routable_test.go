package controllers

import (
	"context"
	"fmt"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/loopserve/loopserve/bus"
)

// TestRoutableWhileScalingUp: with one of three workers ready the model is not Ready (not all
// desired workers are), yet its registry entry stays routable, so a scale-up is no outage;
// with none ready it is not routable.
func TestRoutableWhileScalingUp(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	lm := newLoopModel(ns, "scale", srv.url())
	lm.Spec.Scaling.Replicas = ptr.To[int32](3)
	lm.Spec.Scaling.MaxReplicas = 3
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatal(err)
	}
	r := bus.Ref{Namespace: ns, Name: "scale"}
	entryReady := func(want bool) func() error {
		return func() error {
			e, err := srv.registryEntryOf(ctx, r)
			if err != nil || e.Ready != want {
				return fmt.Errorf("entry %+v, %v; want ready %v", e, err, want)
			}
			return nil
		}
	}
	await(t, waitLong, "Deployment", func() error {
		var dep appsv1.Deployment
		return k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "scale-worker"}, &dep)
	})
	await(t, waitLong, "not routable without ready workers", entryReady(false))

	setReadyWorkers(t, ns, "scale-worker", 1)
	await(t, waitLong, "routable with one of three ready", entryReady(true))
	await(t, waitLong, "not Ready with one of three", conditionIs(ns, "scale", CondReady, metav1.ConditionFalse, ReasonPodsNotReady))

	setReadyWorkers(t, ns, "scale-worker", 3)
	await(t, waitLong, "Ready with all three", conditionIs(ns, "scale", CondReady, metav1.ConditionTrue, ReasonAvailable))
	await(t, waitLong, "still routable", entryReady(true))

	setReadyWorkers(t, ns, "scale-worker", 0)
	await(t, waitLong, "not routable with none ready", entryReady(false))
}
