package controllers

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/loopserve/loopserve/api/v1alpha1"
)

// TestNamespaceScopedOperator runs an operator with --watch-namespaces under nothing but the
// Roles the chart renders for that mode: its caches sync, it reconciles a LoopModel in the
// watched namespace all the way (Deployment, NATS, status), and it can neither see LoopModels
// nor read Secrets anywhere else.
func TestNamespaceScopedOperator(t *testing.T) {
	ctx := context.Background()
	release, watched, other := newNamespace(t), newNamespace(t), newNamespace(t)
	for _, obj := range renderChart(t, release, map[string]any{"operator": map[string]any{"watchNamespaces": []any{watched}}}) {
		switch obj.GetKind() {
		case "ClusterRole", "ClusterRoleBinding":
			t.Fatalf("namespace-scoped mode renders a %s", obj.GetKind())
		case "ServiceAccount", "Role", "RoleBinding":
			if err := k8s.Create(ctx, obj); err != nil {
				t.Fatalf("applying %s %s: %v", obj.GetKind(), obj.GetName(), err)
			}
		}
	}
	asScoped := rest.CopyConfig(cfg)
	asScoped.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + release + ":ls-operator",
		Groups: []string{"system:serviceaccounts", "system:authenticated"}}
	mgr, pool, err := NewManager(asScoped, ManagerOptions{WatchNamespaces: []string{watched}, WorkerImage: testImage,
		MetricsAddr: "0", ProbeAddr: "0", SkipNameValidation: true, PollInterval: 500 * time.Millisecond, Resync: time.Second,
		NATSTimeout: 2 * time.Second, RetryBase: 50 * time.Millisecond, RetryMax: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	runManager(t, "scoped manager", mgr, pool)
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if !mgr.GetCache().WaitForCacheSync(sctx) {
		t.Fatal("the scoped operator's caches never synced with the Roles alone")
	}

	srv := startNATS(t)
	for _, ns := range []string{watched, other} {
		if err := k8s.Create(ctx, newLoopModel(ns, "scoped", srv.url())); err != nil {
			t.Fatal(err)
		}
	}
	r := &LoopModelReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Events: mgr.GetEventRecorder("scoped-test"),
		NATS: pool, WorkerImage: testImage}
	await(t, waitLong, "reconciled in the watched namespace", func() error {
		_, err := r.Reconcile(ctx, ctrl.Request{NamespacedName: types.NamespacedName{Namespace: watched, Name: "scoped"}})
		return err
	})
	if got := getLoopModel(t, watched, "scoped"); got.Status.NATSURL == "" || got.Status.Selector == "" {
		t.Errorf("status after the scoped reconcile: %+v", got.Status)
	}
	var lms v1alpha1.LoopModelList
	if err := mgr.GetCache().List(ctx, &lms); err != nil {
		t.Fatal(err)
	}
	for _, lm := range lms.Items {
		if lm.Namespace != watched {
			t.Errorf("the scoped operator caches LoopModel %s/%s", lm.Namespace, lm.Name)
		}
	}
	if _, err := r.Reconcile(ctx, ctrl.Request{NamespacedName: types.NamespacedName{Namespace: other, Name: "scoped"}}); err == nil {
		t.Error("the scoped operator's client read a LoopModel outside its namespaces")
	} else {
		t.Logf("outside the watched namespaces: %v", err)
	}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: other, Name: "elsewhere"}, StringData: map[string]string{"k": "v"}}
	if err := k8s.Create(ctx, secret); err != nil {
		t.Fatal(err)
	}
	scoped, err := client.New(asScoped, client.Options{Scheme: k8s.Scheme()})
	if err != nil {
		t.Fatal(err)
	}
	if err := scoped.Get(ctx, client.ObjectKeyFromObject(secret), &corev1.Secret{}); !apierrors.IsForbidden(err) {
		t.Errorf("reading a Secret outside the watched namespaces: %v, want Forbidden", err)
	}
}
