package controllers

import (
	"context"
	"maps"
	"slices"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/loopserve/loopserve/api/v1alpha1"
)

// reconcileStats is the stats path. It runs when a LoopModel's workers reported (at most once
// per StatsInterval), and again while a decision is due or status.observed has to age out. It
// recomputes what the stats decide (refresh: the tuning decision, status.observed, SLOMet) and
// writes it with one status patch, guarded by the resourceVersion it read because the full
// reconcile writes status too. It applies nothing, reads nothing uncached and does not touch
// NATS. When a decision changes what the full reconcile acts on (the τ or the replicas in force,
// in auto mode), that status change is what wakes the full reconcile (actsOn).
func (r *LoopModelReconciler) reconcileStats(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var lm v1alpha1.LoopModel
	if err := r.Client.Get(ctx, req.NamespacedName, &lm); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !lm.DeletionTimestamp.IsZero() || !controllerutil.ContainsFinalizer(&lm, Finalizer) {
		return ctrl.Result{}, nil // being taken in hand or released: the full reconcile's
	}
	before := lm.DeepCopy()
	r.refresh(&lm, time.Now())
	err := r.patchStatus(ctx, before, &lm, client.MergeFromWithOptimisticLock{})
	if apierrors.IsConflict(err) {
		// The cached copy was behind a write of the full reconcile: read it again soon. The
		// decision is kept by the tuner and written then.
		return ctrl.Result{RequeueAfter: r.retryBase()}, nil
	}
	if err != nil {
		return ctrl.Result{}, err
	}
	return ctrl.Result{RequeueAfter: r.statsRecheck(&lm)}, nil
}

// statsRecheck is how long the stats path waits, without new stats, before it looks again: the
// next decision in a tuning mode, the window after which status.observed ages out, or zero
// (never) when neither is due.
func (r *LoopModelReconciler) statsRecheck(lm *v1alpha1.LoopModel) time.Duration {
	switch {
	case tuningMode(lm) != v1alpha1.TuningOff:
		return tuningInterval(lm)
	case lm.Status.Observed != nil:
		return r.statsWindow()
	default:
		return 0
	}
}

// actsOn tells whether a LoopModel update changes something the full reconcile acts on: the
// spec (generation), annotations, finalizers, deletion, or the τ per tier or replicas in force that the
// tuning loop writes in status. The stats path's other status writes (observed, the
// recommendation in advisory mode, SLOMet) and the full reconcile's own status writes do not
// wake it.
func actsOn(old, cur *v1alpha1.LoopModel) bool {
	return old.Generation != cur.Generation ||
		!maps.Equal(old.Annotations, cur.Annotations) ||
		!slices.Equal(old.Finalizers, cur.Finalizers) ||
		!old.DeletionTimestamp.Equal(cur.DeletionTimestamp) ||
		!thresholdsInForce(old).Equal(thresholdsInForce(cur)) ||
		replicasInForce(old) != replicasInForce(cur)
}
