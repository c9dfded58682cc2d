// Package controllers reconciles LoopModels into worker Deployments, metrics Services,
// threshold ConfigMaps, JetStream work queues and registry entries, and reports their state.
package controllers

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/events"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

// LoopModelReconciler reconciles LoopModels. Fill it in and call SetupWithManager, which runs
// its full reconcile (Reconcile) and its stats path (reconcileStats) as two controllers: each
// runs one request at a time per object, but the two may run at once for one object, so what
// they share (the stats book, the tuners, the NATS pool) is safe for concurrent use.
type LoopModelReconciler struct {
	Client    client.Client        // cached client of the manager
	APIReader client.Reader        // uncached reads of objects the operator does not watch (pods, PVCs, Secrets)
	Events    events.EventRecorder // events.k8s.io recorder
	NATS      *NATSPool

	NATSURL      string // NATS URL for LoopModels that set none
	WorkerImage  string // worker image for LoopModels that set none
	NATSReplicas int    // JetStream replicas for LoopModels that set none (1 when zero)

	PollInterval time.Duration // recheck period while workers roll out (10s when zero)
	Resync       time.Duration // recheck period once Ready, to repair NATS state (5m when zero)
	NATSTimeout  time.Duration // bound on one reconcile's NATS calls (5s when zero)
	RetryBase    time.Duration // first retry delay after an error (1s when zero)
	RetryMax     time.Duration // longest retry delay after repeated errors, e.g. NATS down (2m when zero)

	// StatsWindow is how far back status.observed looks at the workers' stats (1m when zero);
	// StatsInterval is the least time between two wake-ups of the stats path by arriving stats
	// (15s when zero).
	StatsWindow, StatsInterval time.Duration

	// FinalizerTimeout is how long a deleted LoopModel waits for NATS to be reachable for its
	// cleanup before it is released anyway, with a Warning event (2m when zero): a NATS outage
	// never blocks a namespace's deletion for good.
	FinalizerTimeout time.Duration

	stats  *statsBook // set up by SetupWithManager
	tuners tuners     // the tuning loop's state per LoopModel
	creds  sync.Map   // bus.Ref -> []byte: the NATS credentials last used, for cleanup after the Secret is gone
}

// +kubebuilder:rbac:groups=loopserve.io,resources=loopmodels,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=loopserve.io,resources=loopmodels/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=loopserve.io,resources=loopmodels/finalizers,verbs=update
// +kubebuilder:rbac:groups=apps,resources=deployments,verbs=get;list;watch;create;update;patch
// +kubebuilder:rbac:groups="",resources=services;configmaps,verbs=get;list;watch;create;update;patch
// +kubebuilder:rbac:groups="",resources=pods,verbs=list
// +kubebuilder:rbac:groups="",resources=persistentvolumeclaims;secrets,verbs=get
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch

// Reconcile brings one LoopModel's objects and NATS state to its spec and writes its status once.
func (r *LoopModelReconciler) Reconcile(ctx context.Context, req ctrl.Request) (_ ctrl.Result, retErr error) {
	var lm v1alpha1.LoopModel
	if err := r.Client.Get(ctx, req.NamespacedName, &lm); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !lm.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, r.finalize(ctx, &lm)
	}
	if !controllerutil.ContainsFinalizer(&lm, Finalizer) {
		// The optimistic lock keeps the patch from replacing a finalizer list changed meanwhile.
		patch := client.MergeFromWithOptions(lm.DeepCopy(), client.MergeFromWithOptimisticLock{})
		controllerutil.AddFinalizer(&lm, Finalizer)
		if err := r.Client.Patch(ctx, &lm, patch); err != nil {
			return ctrl.Result{}, fmt.Errorf("adding finalizer: %w", err)
		}
	}

	before := lm.DeepCopy()
	defer func() {
		retErr = errors.Join(retErr, r.patchStatus(ctx, before, &lm))
	}()

	r.refresh(&lm, time.Now())
	p, err := r.plan(ctx, &lm)
	if err == nil {
		err = r.apply(ctx, &lm, p)
	}
	var se *specError
	if errors.As(err, &se) {
		r.reportSpecError(&lm, se)
		return ctrl.Result{RequeueAfter: r.resync()}, nil
	}
	if err != nil {
		return ctrl.Result{}, err
	}

	ro, err := r.observe(ctx, p.deployment)
	if err != nil {
		return ctrl.Result{}, err
	}
	natsErr := r.syncNATS(ctx, &lm, p, ro.routable())
	r.setStatus(&lm, p, ro, natsErr)
	switch {
	case natsErr != nil:
		// The rate limiter backs off while NATS stays down; status already says why.
		return ctrl.Result{}, natsErr
	case !ro.complete():
		return ctrl.Result{RequeueAfter: r.pollInterval()}, nil
	default:
		// Decisions and status.observed are the stats path's to keep fresh (reconcileStats).
		return ctrl.Result{RequeueAfter: r.resync()}, nil
	}
}

// SetupWithManager registers two controllers sharing the stats book and the tuners: the full
// reconcile ("loopmodel"), woken by the LoopModels' changes it acts on (actsOn) and by the
// objects they own, and the stats path ("loopmodel-stats"), woken by the workers' stats.
func (r *LoopModelReconciler) SetupWithManager(mgr ctrl.Manager) error {
	statsEvents := make(chan event.GenericEvent, 64)
	r.stats = newStatsBook(r.statsWindow(), cmp.Or(r.StatsInterval, 15*time.Second), statsEvents)
	err := ctrl.NewControllerManagedBy(mgr).
		For(&v1alpha1.LoopModel{}, builder.WithPredicates(predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
			old, okOld := e.ObjectOld.(*v1alpha1.LoopModel)
			cur, okCur := e.ObjectNew.(*v1alpha1.LoopModel)
			return !okOld || !okCur || actsOn(old, cur)
		}})).
		Owns(&appsv1.Deployment{}).
		Owns(&corev1.Service{}).
		Owns(&corev1.ConfigMap{}).
		WithOptions(controller.Options{RateLimiter: r.rateLimiter()}).
		Named("loopmodel").
		Complete(r)
	if err != nil {
		return err
	}
	return ctrl.NewControllerManagedBy(mgr).
		WatchesRawSource(source.Channel(statsEvents, &handler.EnqueueRequestForObject{})).
		WithOptions(controller.Options{RateLimiter: r.rateLimiter()}).
		Named("loopmodel-stats").
		Complete(reconcile.Func(r.reconcileStats))
}

// rateLimiter spaces the retries of one LoopModel after errors: RetryBase doubling up to RetryMax.
func (r *LoopModelReconciler) rateLimiter() workqueue.TypedRateLimiter[reconcile.Request] {
	return workqueue.NewTypedItemExponentialFailureRateLimiter[reconcile.Request](r.retryBase(), cmp.Or(r.RetryMax, 2*time.Minute))
}

// CacheOptions limit the manager's cache of Deployments, Services and ConfigMaps to the ones
// the operator manages, so it does not hold every object of the cluster in memory, and every
// cached kind to namespaces when some are given (the operator then lists and watches only
// there, and Roles in them suffice).
func CacheOptions(namespaces ...string) cache.Options {
	managed := cache.ByObject{Label: labels.SelectorFromSet(labels.Set{labelManagedBy: managedBy})}
	o := cache.Options{ByObject: map[client.Object]cache.ByObject{
		&appsv1.Deployment{}: managed,
		&corev1.Service{}:    managed,
		&corev1.ConfigMap{}:  managed,
	}}
	if len(namespaces) > 0 {
		o.DefaultNamespaces = make(map[string]cache.Config, len(namespaces))
		for _, ns := range namespaces {
			o.DefaultNamespaces[ns] = cache.Config{}
		}
	}
	return o
}

// plan is what one reconcile wants to exist, computed before any write.
type plan struct {
	resolved   defaults       // effective NATS URL and image
	creds      []byte         // NATS .creds content, if the spec names a Secret
	tau        float64        // exit threshold in force (the default tier's)
	thresholds bus.Thresholds // exit thresholds in force per tier
	configMap  *corev1.ConfigMap
	service    *corev1.Service
	deployment *appsv1.Deployment
}

// specError is a problem only a change of the spec (or of an object it names) can fix: it is
// reported in status and retried slowly, never returned as a reconcile error.
type specError struct {
	reason string
	msg    string
}

func (e *specError) Error() string { return e.msg }

func (r *LoopModelReconciler) plan(ctx context.Context, lm *v1alpha1.LoopModel) (*plan, error) {
	d := defaults{NATSURL: r.NATSURL, Image: r.WorkerImage}
	if err := checkTiers(lm); err != nil {
		return nil, &specError{ReasonInvalidSpec, err.Error()}
	}
	th := thresholdsInForce(lm)
	p := &plan{resolved: d.resolved(lm), tau: th.ExitThreshold, thresholds: th}
	if p.resolved.Image == "" {
		return nil, &specError{ReasonInvalidSpec, "spec.runtime.image is empty and the operator has no default --worker-image"}
	}
	if p.resolved.NATSURL == "" {
		return nil, &specError{ReasonInvalidSpec, "spec.nats.url is empty and the operator has no default --nats-url"}
	}
	if pvc := lm.Spec.Model.Source.PVC; pvc != nil {
		var claim corev1.PersistentVolumeClaim
		err := r.APIReader.Get(ctx, client.ObjectKey{Namespace: lm.Namespace, Name: pvc.ClaimName}, &claim)
		if apierrors.IsNotFound(err) {
			return nil, &specError{ReasonModelInvalid, fmt.Sprintf("PersistentVolumeClaim %s/%s of spec.model.source.pvc not found", lm.Namespace, pvc.ClaimName)}
		}
		if err != nil {
			return nil, fmt.Errorf("reading PersistentVolumeClaim %s: %w", pvc.ClaimName, err)
		}
	}
	creds, err := r.credentials(ctx, lm)
	if err != nil {
		return nil, err
	}
	p.creds = creds
	r.creds.Store(ref(lm), creds)

	if p.configMap, err = desiredConfigMap(lm, p.thresholds); err != nil {
		return nil, err
	}
	p.service = desiredService(lm)
	if p.deployment, err = desiredDeployment(lm, d); err != nil {
		return nil, err
	}
	for _, obj := range []client.Object{p.configMap, p.service, p.deployment} {
		if err := controllerutil.SetControllerReference(lm, obj, r.Client.Scheme()); err != nil {
			return nil, fmt.Errorf("setting owner of %s: %w", obj.GetName(), err)
		}
	}
	return p, nil
}

// credentials reads the NATS .creds file named by spec.nats.credentialsSecret.
func (r *LoopModelReconciler) credentials(ctx context.Context, lm *v1alpha1.LoopModel) ([]byte, error) {
	cs := lm.Spec.NATS.CredentialsSecret
	if cs == nil {
		return nil, nil
	}
	key := cmp.Or(cs.Key, "nats.creds")
	var s corev1.Secret
	err := r.APIReader.Get(ctx, client.ObjectKey{Namespace: lm.Namespace, Name: cs.Name}, &s)
	if apierrors.IsNotFound(err) {
		return nil, &specError{ReasonInvalidSpec, fmt.Sprintf("Secret %s/%s of spec.nats.credentialsSecret not found", lm.Namespace, cs.Name)}
	}
	if err != nil {
		return nil, fmt.Errorf("reading Secret %s: %w", cs.Name, err)
	}
	b, ok := s.Data[key]
	if !ok || len(b) == 0 {
		return nil, &specError{ReasonInvalidSpec, fmt.Sprintf("Secret %s/%s has no key %q", lm.Namespace, cs.Name, key)}
	}
	if _, err := credsOption(b); err != nil {
		return nil, &specError{ReasonInvalidSpec, fmt.Sprintf("Secret %s/%s key %q: %v", lm.Namespace, cs.Name, key, err)}
	}
	return b, nil
}

// apply writes the planned objects with server-side apply, in the order the pods need them.
func (r *LoopModelReconciler) apply(ctx context.Context, lm *v1alpha1.LoopModel, p *plan) error {
	for _, obj := range []client.Object{p.configMap, p.service, p.deployment} {
		if err := r.applyObject(ctx, lm, obj); err != nil {
			return err
		}
	}
	return nil
}

// applyObject server-side-applies obj as the operator's field manager, leaves the server's
// answer (status included) in obj, and records an event when it created or changed something.
func (r *LoopModelReconciler) applyObject(ctx context.Context, lm *v1alpha1.LoopModel, obj client.Object) error {
	kind := obj.GetObjectKind().GroupVersionKind().Kind
	existing, ok := obj.DeepCopyObject().(client.Object)
	if !ok {
		return fmt.Errorf("copying %s %s: not a client.Object", kind, obj.GetName())
	}
	err := r.Client.Get(ctx, client.ObjectKeyFromObject(obj), existing)
	created := apierrors.IsNotFound(err)
	if err != nil && !created {
		return fmt.Errorf("reading %s %s: %w", kind, obj.GetName(), err)
	}

	u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return fmt.Errorf("encoding %s %s: %w", kind, obj.GetName(), err)
	}
	// Typed objects carry empty status and creation time; applying them would claim those fields.
	delete(u, "status")
	unstructured.RemoveNestedField(u, "metadata", "creationTimestamp")
	unstructured.RemoveNestedField(u, "spec", "template", "metadata", "creationTimestamp")
	ac := &unstructured.Unstructured{Object: u}
	err = r.Client.Apply(ctx, client.ApplyConfigurationFromUnstructured(ac), client.FieldOwner(fieldOwner), client.ForceOwnership)
	if apierrors.IsInvalid(err) || apierrors.IsBadRequest(err) {
		return &specError{ReasonInvalidSpec, fmt.Sprintf("%s %s rejected: %v", kind, obj.GetName(), err)}
	}
	if err != nil {
		return fmt.Errorf("applying %s %s: %w", kind, obj.GetName(), err)
	}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(ac.Object, obj); err != nil {
		return fmt.Errorf("decoding %s %s: %w", kind, obj.GetName(), err)
	}
	switch {
	case created:
		r.Events.Eventf(lm, obj, corev1.EventTypeNormal, EventCreated, "Apply", "created %s %s", kind, obj.GetName())
	case changed(existing, obj):
		r.Events.Eventf(lm, obj, corev1.EventTypeNormal, EventUpdated, "Apply", "updated %s %s", kind, obj.GetName())
	}
	return nil
}

// changed tells whether an apply changed the object: by generation where the kind keeps one
// (a Deployment's status churns its resourceVersion), else by resourceVersion.
func changed(before, after client.Object) bool {
	if before.GetGeneration() > 0 && after.GetGeneration() > 0 {
		return before.GetGeneration() != after.GetGeneration()
	}
	return before.GetResourceVersion() != after.GetResourceVersion()
}

// observe summarises the rollout of the applied Deployment, looking at its pods only while it
// is incomplete (crash loops and image pull failures do not show in Deployment status).
func (r *LoopModelReconciler) observe(ctx context.Context, dep *appsv1.Deployment) (rollout, error) {
	ro := summarize(dep, nil)
	if ro.complete() {
		return ro, nil
	}
	var pods corev1.PodList
	if err := r.APIReader.List(ctx, &pods, client.InNamespace(dep.Namespace), client.MatchingLabels(dep.Spec.Selector.MatchLabels)); err != nil {
		return rollout{}, fmt.Errorf("listing worker pods of %s: %w", dep.Name, err)
	}
	return summarize(dep, pods.Items), nil
}

// patchStatus writes the status once per reconcile, and only when it changed.
func (r *LoopModelReconciler) patchStatus(ctx context.Context, before, lm *v1alpha1.LoopModel, opts ...client.MergeFromOption) error {
	if equality.Semantic.DeepEqual(before.Status, lm.Status) {
		return nil
	}
	if err := r.Client.Status().Patch(ctx, lm, client.MergeFromWithOptions(before, opts...)); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("patching status of %s/%s: %w", lm.Namespace, lm.Name, err)
	}
	return nil
}

// finalize deletes the LoopModel's stream and registry entry, then releases the object. While
// NATS is unreachable the deletion waits (status says why) for FinalizerTimeout, then goes on
// with a Warning event; it skips the cleanup at once when the skip annotation is set, and
// cleans up best effort when the credentials Secret is gone (a namespace being deleted removes
// it first): with the credentials last used, else not at all, with a Warning event.
func (r *LoopModelReconciler) finalize(ctx context.Context, lm *v1alpha1.LoopModel) error {
	if !controllerutil.ContainsFinalizer(lm, Finalizer) {
		return nil
	}
	err := r.cleanupNATS(ctx, lm)
	waited := time.Since(lm.DeletionTimestamp.Time)
	switch {
	case err == nil:
	case errors.Is(err, errCredentialsGone) || waited >= r.finalizerTimeout():
		r.Events.Eventf(lm, nil, corev1.EventTypeWarning, EventCleanupAbandoned, "Cleanup",
			"left stream %s and registry entry %s on NATS after %s: %v", ref(lm).Stream(), ref(lm).Key(), waited.Round(time.Second), err)
	default:
		before := lm.DeepCopy()
		r.setCondition(lm, degraded(lm, ReasonNATSUnreachable, fmt.Sprintf("deletion waits for NATS cleanup (at most %s more): %v",
			(r.finalizerTimeout()-waited).Round(time.Second), err)))
		return errors.Join(err, r.patchStatus(ctx, before, lm))
	}
	if r.stats != nil {
		r.stats.forget(ref(lm))
		r.tuners.forget(ref(lm))
		forgetMetrics(lm)
	}
	r.creds.Delete(ref(lm))
	patch := client.MergeFromWithOptions(lm.DeepCopy(), client.MergeFromWithOptimisticLock{})
	controllerutil.RemoveFinalizer(lm, Finalizer)
	if err := r.Client.Patch(ctx, lm, patch); err != nil {
		return client.IgnoreNotFound(fmt.Errorf("removing finalizer: %w", err))
	}
	return nil
}

func (r *LoopModelReconciler) finalizerTimeout() time.Duration {
	return cmp.Or(r.FinalizerTimeout, 2*time.Minute)
}

func (r *LoopModelReconciler) pollInterval() time.Duration {
	return cmp.Or(r.PollInterval, 10*time.Second)
}
func (r *LoopModelReconciler) resync() time.Duration    { return cmp.Or(r.Resync, 5*time.Minute) }
func (r *LoopModelReconciler) retryBase() time.Duration { return cmp.Or(r.RetryBase, time.Second) }

func (r *LoopModelReconciler) statsWindow() time.Duration { return cmp.Or(r.StatsWindow, time.Minute) }
func (r *LoopModelReconciler) natsTimeout() time.Duration {
	return cmp.Or(r.NATSTimeout, 5*time.Second)
}
