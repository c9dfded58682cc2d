package controllers

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv1 "k8s.io/api/autoscaling/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/loopserve/loopserve/api/v1alpha1"
)

func TestReplicasInForce(t *testing.T) {
	decided := &metav1.Time{Time: time.Unix(1e9, 0)}
	tests := []struct {
		name     string
		mode     v1alpha1.TuningMode
		spec     int32
		last     *metav1.Time
		rec      *v1alpha1.Recommendation
		expected int32
	}{
		{"off follows the spec", v1alpha1.TuningOff, 2, decided, &v1alpha1.Recommendation{Replicas: 4}, 2},
		{"advisory follows the spec", v1alpha1.TuningAdvisory, 2, decided, &v1alpha1.Recommendation{Replicas: 4}, 2},
		{"auto before a decision", v1alpha1.TuningAuto, 2, nil, nil, 2},
		{"auto follows the decision", v1alpha1.TuningAuto, 2, decided, &v1alpha1.Recommendation{Replicas: 4}, 4},
		{"auto within maxReplicas", v1alpha1.TuningAuto, 2, decided, &v1alpha1.Recommendation{Replicas: 9}, 5},
		{"auto within minReplicas", v1alpha1.TuningAuto, 2, decided, &v1alpha1.Recommendation{Replicas: 1}, 2},
		{"auto without replicas decided", v1alpha1.TuningAuto, 3, decided, &v1alpha1.Recommendation{}, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lm := defaulted()
			lm.Spec.Tuning.Mode = tt.mode
			lm.Spec.Scaling = v1alpha1.ScalingSpec{Replicas: ptr.To(tt.spec), MinReplicas: 2, MaxReplicas: 5}
			lm.Status.LastTuneTime, lm.Status.Recommendation = tt.last, tt.rec
			if got := replicasInForce(lm); got != tt.expected {
				t.Errorf("replicasInForce = %d, want %d", got, tt.expected)
			}
			if got := *mustDeployment(t, lm).Spec.Replicas; got != tt.expected {
				t.Errorf("Deployment replicas = %d, want %d", got, tt.expected)
			}
		})
	}
}

// scaledLoopModel tunes replicas only: 1 to 3 workers of 1000 loop steps/s each, a 3s
// scaleDownDelay, τ fixed at the spec's 0.9 (no floor below it, no SLO).
func scaledLoopModel(ns, name, url string, mode v1alpha1.TuningMode) *v1alpha1.LoopModel {
	lm := newLoopModel(ns, name, url)
	lm.Spec.Scaling = v1alpha1.ScalingSpec{MinReplicas: 1, MaxReplicas: 3, TargetLoopStepsPerReplica: ptr.To[int64](1000),
		ScaleDownDelay: &metav1.Duration{Duration: 3 * time.Second}}
	lm.Spec.Tuning = v1alpha1.TuningSpec{Mode: mode, Interval: &metav1.Duration{Duration: 500 * time.Millisecond}}
	return lm
}

// scalingLoad is feed's load for scaledLoopModel: heavy, each of the two simulated workers
// reports 100 tokens at depth 3 every 100ms (about 6000 loop steps/s in all, more than
// maxReplicas 3 workers of 1000 carry: three wanted, even if half the reports were late);
// light, 5 tokens (about 300: one worker).
func scalingLoad(heavy *atomic.Bool) func(float64) (int64, int, float64) {
	return func(float64) (int64, int, float64) {
		if heavy.Load() {
			return 100, 2, 0.005
		}
		return 5, 1, 0.002
	}
}

// deploymentReplicas reports nil once the named Deployment asks for want replicas.
func deploymentReplicas(ns, name string, want int32) func() error {
	return func() error {
		var d appsv1.Deployment
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &d); err != nil {
			return err
		}
		if n := ptr.Deref(d.Spec.Replicas, 0); n != want {
			return fmt.Errorf("Deployment %s runs %d replicas, want %d", name, n, want)
		}
		return nil
	}
}

// TestAutoOwnsReplicas: in auto mode the loop raises the worker Deployment's replicas when the
// loop-step demand exceeds one worker's target (to maxReplicas, with a ScaledUp event and the
// wanted-replicas metric), and lowers them once the demand has stayed low for scaleDownDelay
// (ScaledDown, never sooner), τ staying at the spec's.
func TestAutoOwnsReplicas(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	if err := k8s.Create(ctx, scaledLoopModel(ns, "auto", srv.url(), v1alpha1.TuningAuto)); err != nil {
		t.Fatal(err)
	}
	markReadyWhenCreated(t, ns, "auto-worker")
	var heavy atomic.Bool
	heavy.Store(true)
	stop := feed(t, srv, ns, "auto", scalingLoad(&heavy))
	defer stop()

	await(t, waitLong, "scaled up to maxReplicas", deploymentReplicas(ns, "auto-worker", 3))
	await(t, waitLong, "ScaledUp event", hasEvent(ns, "auto", EventScaledUp))
	if got := testutil.ToFloat64(wantedReplicas.WithLabelValues(ns, "auto")); got != 3 {
		t.Errorf("loopserve_operator_wanted_replicas = %v, want 3", got)
	}
	setReadyWorkers(t, ns, "auto-worker", -1)
	await(t, waitLong, "Ready with three workers", conditionIs(ns, "auto", CondReady, metav1.ConditionTrue, ReasonAvailable))
	lm := getLoopModel(t, ns, "auto")
	if lm.Status.ExitThreshold != 0.9 || lm.Status.Recommendation == nil || lm.Status.Recommendation.Replicas != 3 {
		t.Errorf("status after the scale-up: exitThreshold %v, recommendation %+v", lm.Status.ExitThreshold, lm.Status.Recommendation)
	}
	if ptr.Deref(lm.Spec.Scaling.Replicas, 0) != 1 {
		t.Errorf("spec.scaling.replicas = %v: the loop writes status, never the spec", ptr.Deref(lm.Spec.Scaling.Replicas, 0))
	}

	heavy.Store(false)
	lightSince := time.Now()
	await(t, waitLong, "scaled down to one worker", deploymentReplicas(ns, "auto-worker", 1))
	var evs eventsv1.EventList
	if err := k8s.List(ctx, &evs, client.InNamespace(ns)); err != nil {
		t.Fatal(err)
	}
	downs := 0
	for _, e := range evs.Items {
		if e.Regarding.Name != "auto" || e.Reason != EventScaledDown {
			continue
		}
		downs++
		if at := e.EventTime.Time; at.Sub(lightSince) < 3*time.Second {
			t.Errorf("ScaledDown at %v, %v after the load fell: before scaleDownDelay 3s (%s)", at, at.Sub(lightSince), e.Note)
		}
	}
	if downs == 0 {
		t.Error("no ScaledDown event")
	}
}

// TestAdvisoryLeavesReplicas: in advisory mode the loop recommends the workers the demand
// needs but the Deployment keeps spec.scaling.replicas, which /scale writes.
func TestAdvisoryLeavesReplicas(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	if err := k8s.Create(ctx, scaledLoopModel(ns, "adv", srv.url(), v1alpha1.TuningAdvisory)); err != nil {
		t.Fatal(err)
	}
	markReadyWhenCreated(t, ns, "adv-worker")
	var heavy atomic.Bool
	heavy.Store(true)
	stop := feed(t, srv, ns, "adv", scalingLoad(&heavy))
	defer stop()
	await(t, waitLong, "three workers recommended", func() error {
		if rec := getLoopModel(t, ns, "adv").Status.Recommendation; rec == nil || rec.Replicas != 3 {
			return fmt.Errorf("recommendation %+v", rec)
		}
		return nil
	})
	if err := deploymentReplicas(ns, "adv-worker", 1)(); err != nil {
		t.Errorf("advisory mode changed the Deployment: %v", err)
	}
	scaleTo(t, ns, "adv", 2)
	await(t, waitLong, "/scale drives the Deployment", deploymentReplicas(ns, "adv-worker", 2))
}

// TestScaleRefusedInAuto: while auto owns the replicas, writes of spec.scaling.replicas (through
// /scale or the spec) are refused by the API server with a message that says why; changing the
// mode in the same write is allowed, and in off mode /scale drives the Deployment again. Other
// spec edits stay allowed in auto mode.
func TestScaleRefusedInAuto(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	if err := k8s.Create(ctx, scaledLoopModel(ns, "owned", srv.url(), v1alpha1.TuningAuto)); err != nil {
		t.Fatal(err)
	}
	markReadyWhenCreated(t, ns, "owned-worker")

	err := writeScale(ns, "owned", 2)
	if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "the tuning loop owns the worker count") {
		t.Fatalf("scaling through /scale in auto mode: %v, want Invalid saying the tuning loop owns the count", err)
	}
	t.Logf("/scale in auto mode: %v", err)
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		lm := getLoopModel(t, ns, "owned")
		lm.Spec.Scaling.Replicas = ptr.To[int32](3)
		return k8s.Update(ctx, lm)
	})
	if !apierrors.IsInvalid(err) {
		t.Errorf("editing spec.scaling.replicas in auto mode: %v, want Invalid", err)
	}
	updateLoopModel(t, ns, "owned", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.ExitThreshold = 0.8 })
	if n := ptr.Deref(getLoopModel(t, ns, "owned").Spec.Scaling.Replicas, 0); n != 1 {
		t.Errorf("spec.scaling.replicas = %d after refused writes, want 1", n)
	}
	if err := deploymentReplicas(ns, "owned-worker", 1)(); err != nil {
		t.Error(err)
	}

	updateLoopModel(t, ns, "owned", func(lm *v1alpha1.LoopModel) {
		lm.Spec.Tuning.Mode = v1alpha1.TuningOff
		lm.Spec.Scaling.Replicas = ptr.To[int32](2)
	})
	await(t, waitLong, "off mode: the spec's replicas", deploymentReplicas(ns, "owned-worker", 2))
	scaleTo(t, ns, "owned", 3)
	await(t, waitLong, "off mode: /scale drives the Deployment", deploymentReplicas(ns, "owned-worker", 3))
}

// scaleTo writes n replicas through the LoopModel's /scale subresource, as kubectl scale or an
// HPA does.
func scaleTo(t *testing.T, ns, name string, n int32) {
	t.Helper()
	if err := writeScale(ns, name, n); err != nil {
		t.Fatalf("scaling %s to %d: %v", name, n, err)
	}
}

// writeScale reads the LoopModel's /scale and writes n replicas back, again when a status write
// came in between (a Scale carries the LoopModel's resourceVersion).
func writeScale(ns, name string, n int32) error {
	ctx := context.Background()
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var lm v1alpha1.LoopModel
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &lm); err != nil {
			return err
		}
		var scale autoscalingv1.Scale
		if err := k8s.SubResource("scale").Get(ctx, &lm, &scale); err != nil {
			return fmt.Errorf("reading /scale: %w", err)
		}
		scale.Spec.Replicas = n
		return k8s.SubResource("scale").Update(ctx, &lm, client.WithSubResourceBody(&scale))
	})
}
