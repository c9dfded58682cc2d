package controllers

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

func TestActsOn(t *testing.T) {
	tuned := func(mode v1alpha1.TuningMode, tau float64, replicas int32) *v1alpha1.LoopModel {
		lm := defaulted()
		lm.Spec.Tuning.Mode = mode
		lm.Spec.Loop.MinExitThreshold = ptr.To(0.5)
		lm.Spec.Scaling.MaxReplicas = 4
		lm.Status.LastTuneTime = &metav1.Time{Time: time.Unix(1e9, 0)}
		lm.Status.ExitThreshold = tau
		lm.Status.Recommendation = &v1alpha1.Recommendation{ExitThreshold: tau, Replicas: replicas}
		return lm
	}
	tests := []struct {
		name string
		edit func(old, cur *v1alpha1.LoopModel)
		want bool
	}{
		{"nothing", func(_, _ *v1alpha1.LoopModel) {}, false},
		{"observed and SLOMet", func(_, cur *v1alpha1.LoopModel) {
			cur.Status.Observed = &v1alpha1.ObservedStats{ObservedFigures: v1alpha1.ObservedFigures{MeanDepth: 2}}
			cur.Status.Conditions = []metav1.Condition{{Type: CondSLOMet, Status: metav1.ConditionTrue}}
			cur.Status.Recommendation.Reasons = []string{"Held: τ 0.90 held"}
			cur.Status.LastTuneTime = &metav1.Time{Time: time.Unix(2e9, 0)}
		}, false},
		{"spec", func(_, cur *v1alpha1.LoopModel) { cur.Generation++ }, true},
		{"annotation", func(_, cur *v1alpha1.LoopModel) {
			cur.Annotations = map[string]string{AnnotationSkipNATSCleanup: "true"}
		}, true},
		{"finalizer", func(_, cur *v1alpha1.LoopModel) { cur.Finalizers = []string{Finalizer} }, true},
		{"deletion", func(_, cur *v1alpha1.LoopModel) { cur.DeletionTimestamp = &metav1.Time{Time: time.Unix(3e9, 0)} }, true},
		{"auto τ", func(_, cur *v1alpha1.LoopModel) { cur.Status.ExitThreshold = 0.8 }, true},
		{"auto replicas", func(_, cur *v1alpha1.LoopModel) { cur.Status.Recommendation.Replicas = 3 }, true},
		{"auto replicas beyond maxReplicas both times", func(old, cur *v1alpha1.LoopModel) {
			old.Status.Recommendation.Replicas, cur.Status.Recommendation.Replicas = 5, 6
		}, false},
		{"advisory recommendation", func(old, cur *v1alpha1.LoopModel) {
			old.Spec.Tuning.Mode, cur.Spec.Tuning.Mode = v1alpha1.TuningAdvisory, v1alpha1.TuningAdvisory
			cur.Status.Recommendation = &v1alpha1.Recommendation{ExitThreshold: 0.6, Replicas: 4}
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			old, cur := tuned(v1alpha1.TuningAuto, 0.9, 1), tuned(v1alpha1.TuningAuto, 0.9, 1)
			tt.edit(old, cur)
			if got := actsOn(old, cur); got != tt.want {
				t.Errorf("actsOn = %v, want %v", got, tt.want)
			}
		})
	}
}

// calls counts what an operator asked of the API server, by verb ("apply", "status patch",
// "reader get", ...).
type calls struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *calls) add(verb string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n[verb]++
}

func (c *calls) snapshot() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.n)
}

// countingClient is a manager's real client that counts every call made through it; each call
// still reaches the cache or the API server.
type countingClient struct {
	client.Client
	c *calls
}

func (cc countingClient) Get(ctx context.Context, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	cc.c.add("get")
	return cc.Client.Get(ctx, key, obj, opts...)
}

func (cc countingClient) List(ctx context.Context, list client.ObjectList, opts ...client.ListOption) error {
	cc.c.add("list")
	return cc.Client.List(ctx, list, opts...)
}

func (cc countingClient) Apply(ctx context.Context, obj runtime.ApplyConfiguration, opts ...client.ApplyOption) error {
	cc.c.add("apply")
	return cc.Client.Apply(ctx, obj, opts...)
}

func (cc countingClient) Create(ctx context.Context, obj client.Object, opts ...client.CreateOption) error {
	cc.c.add("create")
	return cc.Client.Create(ctx, obj, opts...)
}

func (cc countingClient) Delete(ctx context.Context, obj client.Object, opts ...client.DeleteOption) error {
	cc.c.add("delete")
	return cc.Client.Delete(ctx, obj, opts...)
}

func (cc countingClient) Update(ctx context.Context, obj client.Object, opts ...client.UpdateOption) error {
	cc.c.add("update")
	return cc.Client.Update(ctx, obj, opts...)
}

func (cc countingClient) Patch(ctx context.Context, obj client.Object, patch client.Patch, opts ...client.PatchOption) error {
	cc.c.add("patch")
	return cc.Client.Patch(ctx, obj, patch, opts...)
}

func (cc countingClient) DeleteAllOf(ctx context.Context, obj client.Object, opts ...client.DeleteAllOfOption) error {
	cc.c.add("deleteallof")
	return cc.Client.DeleteAllOf(ctx, obj, opts...)
}

func (cc countingClient) Status() client.SubResourceWriter {
	return countingWriter{cc.Client.Status(), cc.c, "status"}
}

func (cc countingClient) SubResource(sub string) client.SubResourceClient {
	w := cc.Client.SubResource(sub)
	return struct {
		client.SubResourceReader
		client.SubResourceWriter
	}{w, countingWriter{w, cc.c, sub}}
}

type countingWriter struct {
	client.SubResourceWriter
	c   *calls
	sub string
}

func (w countingWriter) Create(ctx context.Context, obj, sub client.Object, opts ...client.SubResourceCreateOption) error {
	w.c.add(w.sub + " create")
	return w.SubResourceWriter.Create(ctx, obj, sub, opts...)
}

func (w countingWriter) Update(ctx context.Context, obj client.Object, opts ...client.SubResourceUpdateOption) error {
	w.c.add(w.sub + " update")
	return w.SubResourceWriter.Update(ctx, obj, opts...)
}

func (w countingWriter) Patch(ctx context.Context, obj client.Object, patch client.Patch, opts ...client.SubResourcePatchOption) error {
	w.c.add(w.sub + " patch")
	return w.SubResourceWriter.Patch(ctx, obj, patch, opts...)
}

func (w countingWriter) Apply(ctx context.Context, obj runtime.ApplyConfiguration, opts ...client.SubResourceApplyOption) error {
	w.c.add(w.sub + " apply")
	return w.SubResourceWriter.Apply(ctx, obj, opts...)
}

// countingReader is the manager's uncached reader, counting reads.
type countingReader struct {
	client.Reader
	c *calls
}

func (cr countingReader) Get(ctx context.Context, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	cr.c.add("reader get")
	return cr.Reader.Get(ctx, key, obj, opts...)
}

func (cr countingReader) List(ctx context.Context, list client.ObjectList, opts ...client.ListOption) error {
	cr.c.add("reader list")
	return cr.Reader.List(ctx, list, opts...)
}

// startCountedOperator runs a second operator limited to namespace ns whose clients count their
// calls, with hour-long poll and resync periods so that only events wake its full reconcile.
// (The suite's operator keeps reconciling ns too; the counts are this one's alone.)
func startCountedOperator(t *testing.T, ns string) *calls {
	t.Helper()
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 k8s.Scheme(),
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache:                  CacheOptions(ns),
		Controller:             config.Controller{SkipNameValidation: ptr.To(true)},
	})
	if err != nil {
		t.Fatal(err)
	}
	c := &calls{n: map[string]int{}}
	pool := &NATSPool{ReconnectWait: 100 * time.Millisecond}
	r := &LoopModelReconciler{
		Client:    countingClient{mgr.GetClient(), c},
		APIReader: countingReader{mgr.GetAPIReader(), c},
		Events:    mgr.GetEventRecorder("counted-operator"),
		NATS:      pool, WorkerImage: testImage,
		PollInterval: time.Hour, Resync: time.Hour, NATSTimeout: 2 * time.Second,
		RetryBase: 50 * time.Millisecond, RetryMax: 500 * time.Millisecond,
		StatsWindow: time.Minute, StatsInterval: 100 * time.Millisecond, FinalizerTimeout: finalizerTimeout,
	}
	if err := r.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	runManager(t, "counted operator", mgr, pool)
	return c
}

// TestStatsPathPatchesStatusOnly: a burst of stats snapshots costs status patches only: no
// apply, no other write, no uncached read (the LoopModel's PVC would be read by a full
// reconcile), while status.observed and the recommendation follow the stats. A spec change
// still runs the full reconcile, and the counts see it.
func TestStatsPathPatchesStatusOnly(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "weights"},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
		},
	}
	if err := k8s.Create(ctx, pvc); err != nil {
		t.Fatal(err)
	}
	lm := tunedLoopModel(ns, "quiet", srv.url(), v1alpha1.TuningAdvisory)
	lm.Spec.Model.Source = v1alpha1.ModelSource{PVC: &v1alpha1.PVCSource{ClaimName: "weights"}}
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "queue in place", conditionIs(ns, "quiet", CondDegraded, metav1.ConditionFalse, ReasonAsExpected))

	c := startCountedOperator(t, ns)
	// Every full reconcile reads the PVC, then lists the pods (the rollout is incomplete: no
	// Deployment controller runs). Once a reconcile has started after the annotation below and
	// as many have finished as started, no full reconcile is due: nothing it acts on changes.
	await(t, waitLong, "the counted operator's first full reconcile", func() error {
		if n := c.snapshot(); n["reader list"] == 0 {
			return fmt.Errorf("calls %v", n)
		}
		return nil
	})
	marked := c.snapshot()["reader get"]
	updateLoopModel(t, ns, "quiet", func(lm *v1alpha1.LoopModel) { lm.Annotations = map[string]string{"example.com/mark": "1"} })
	await(t, waitLong, "full reconciles done", func() error {
		n := c.snapshot()
		if n["reader get"] <= marked || n["reader get"] != n["reader list"] {
			return fmt.Errorf("calls %v", n)
		}
		return nil
	})

	before := c.snapshot()
	stop := feed(t, srv, ns, "quiet", func(float64) (int64, int, float64) { return 40, 2, 0.004 })
	await(t, waitLong, "status patches from the stats", func() error {
		if n := c.snapshot()["status patch"] - before["status patch"]; n < 5 {
			return fmt.Errorf("%d status patches", n)
		}
		return nil
	})
	stop()
	after := c.snapshot()
	for verb, n := range after {
		switch d := n - before[verb]; verb {
		case "get": // from the cache
		case "status patch":
			t.Logf("%d status patches during the burst", d)
		default:
			if d != 0 {
				t.Errorf("%d %s calls during the stats burst, want 0 (calls before %v, after %v)", d, verb, before, after)
			}
		}
	}
	st := getLoopModel(t, ns, "quiet").Status
	if st.Observed == nil || st.Recommendation == nil || st.LastTuneTime == nil {
		t.Errorf("status after the burst: observed %+v, recommendation %+v, lastTuneTime %v", st.Observed, st.Recommendation, st.LastTuneTime)
	}

	// A spec change is the full reconcile's: the counts see its applies and uncached reads.
	updateLoopModel(t, ns, "quiet", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.ExitThreshold = 0.8 })
	await(t, waitLong, "full reconcile of the spec change", func() error {
		n := c.snapshot()
		if n["apply"]-after["apply"] < 3 || n["reader get"] == after["reader get"] {
			return fmt.Errorf("calls %v, before %v", n, after)
		}
		return nil
	})
	await(t, waitLong, "ConfigMap follows", configMapThreshold(ns, "quiet-config", 0.8))
}

// configMapThreshold reports nil once the LoopModel's ConfigMap carries threshold tau.
func configMapThreshold(ns, name string, tau float64) func() error {
	return func() error {
		var cm corev1.ConfigMap
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &cm); err != nil {
			return err
		}
		var c bus.Control
		if err := json.Unmarshal([]byte(cm.Data[configFile]), &c); err != nil {
			return err
		}
		if !sameThreshold(c.ExitThreshold, tau) {
			return fmt.Errorf("ConfigMap threshold %v, want %v", c.ExitThreshold, tau)
		}
		return nil
	}
}

// TestTuneKeepsDecision: within an interval both paths write the tuner's last decision, even
// from a copy of the LoopModel that missed it (a status patch lost to a conflict, a stale
// cache), and a new decision comes only once the interval has passed.
func TestTuneKeepsDecision(t *testing.T) {
	r := &LoopModelReconciler{stats: newStatsBook(time.Minute, time.Hour, nil)}
	lm := defaulted()
	lm.Spec.Tuning = v1alpha1.TuningSpec{Mode: v1alpha1.TuningAdvisory, Interval: &metav1.Duration{Duration: 30 * time.Second}}
	stale := lm.DeepCopy()
	t0 := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)

	r.tune(lm, t0)
	first := lm.Status.DeepCopy()
	if first.Recommendation == nil || first.LastTuneTime == nil || !first.LastTuneTime.Time.Equal(t0) {
		t.Fatalf("status after the first decision: %+v", first)
	}
	r.tune(stale, t0.Add(10*time.Second))
	if diff := cmp.Diff(stale.Status, *first); diff != "" {
		t.Errorf("within the interval, from a copy that missed the decision (-got +want):\n%s", diff)
	}
	r.tune(stale, t0.Add(30*time.Second))
	if got := stale.Status.LastTuneTime; got == nil || !got.Time.Equal(t0.Add(30*time.Second)) {
		t.Errorf("lastTuneTime after the interval = %v, want a new decision at %v", got, t0.Add(30*time.Second))
	}
	lm.Spec.Tuning.Mode = v1alpha1.TuningOff
	r.tune(lm, t0.Add(31*time.Second))
	if lm.Status.Recommendation != nil {
		t.Errorf("off mode kept recommendation %+v", lm.Status.Recommendation)
	}
}
