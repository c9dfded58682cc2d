package controllers

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv1 "k8s.io/api/autoscaling/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

const waitLong = 20 * time.Second

// updateLoopModel applies change to the stored LoopModel, retrying on conflicts with the operator.
func updateLoopModel(t *testing.T, ns, name string, change func(*v1alpha1.LoopModel)) {
	t.Helper()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		lm := getLoopModel(t, ns, name)
		change(lm)
		return k8s.Update(context.Background(), lm)
	})
	if err != nil {
		t.Fatalf("updating LoopModel %s: %v", name, err)
	}
}

// TestLoopModelLifecycle walks one LoopModel through create, rollout, threshold change, spec
// change, scale and delete against the real API server and an embedded NATS server.
func TestLoopModelLifecycle(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	nc, js := srv.js()
	ctl, err := nc.SubscribeSync(bus.Ref{Namespace: ns, Name: "tiny"}.ControlSubject())
	if err != nil {
		t.Fatalf("subscribing to the control subject: %v", err)
	}

	lm := newLoopModel(ns, "tiny", srv.url())
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatalf("creating LoopModel: %v", err)
	}

	// The objects appear, owned by the LoopModel, with the fields the workers need.
	var dep appsv1.Deployment
	var svc corev1.Service
	var cm corev1.ConfigMap
	await(t, waitLong, "Deployment created", exists(&dep, ns, "tiny-worker"))
	await(t, waitLong, "Service created", exists(&svc, ns, "tiny-metrics"))
	await(t, waitLong, "ConfigMap created", exists(&cm, ns, "tiny-config"))
	lm = getLoopModel(t, ns, "tiny")
	for _, obj := range []client.Object{&dep, &svc, &cm} {
		owners := obj.GetOwnerReferences()
		if len(owners) != 1 || owners[0].UID != lm.UID || !ptr.Deref(owners[0].Controller, false) {
			t.Errorf("%s owners = %+v, want the LoopModel %s as controller", obj.GetName(), owners, lm.UID)
		}
	}
	c := dep.Spec.Template.Spec.Containers[0]
	wantArgs := []string{"worker", "--nats", srv.url(), "--model", "/models/ouro-tiny-arith", "--loopmodel", ns + "/tiny",
		"--threshold-file", "/etc/loopserve/threshold.json", "--metrics-listen", ":9090",
		"--kv-policy", "full", "--probe-fraction", "0.02", "--capacity", "8", "--drain", "50s",
		"--max-steps", "4", "--context-length", "2048"}
	if diff := cmp.Diff(c.Args, wantArgs); diff != "" {
		t.Errorf("worker args (-got +want):\n%s", diff)
	}
	if c.Image != testImage {
		t.Errorf("worker image = %q, want the operator default %q", c.Image, testImage)
	}
	if got := ptr.Deref(dep.Spec.Replicas, -1); got != 1 {
		t.Errorf("replicas = %d, want the default 1", got)
	}
	if ru := dep.Spec.Strategy.RollingUpdate; ru == nil || ru.MaxUnavailable.IntValue() != 0 || ru.MaxSurge.IntValue() != 1 {
		t.Errorf("rolling update = %+v, want maxUnavailable 0, maxSurge 1", dep.Spec.Strategy.RollingUpdate)
	}
	if sc := c.SecurityContext; sc == nil || !ptr.Deref(sc.ReadOnlyRootFilesystem, false) || !ptr.Deref(sc.RunAsNonRoot, false) {
		t.Errorf("container security context = %+v, want read-only root FS and non-root", c.SecurityContext)
	}
	if hp := dep.Spec.Template.Spec.Volumes[0].HostPath; hp == nil || hp.Path != "/var/lib/models" {
		t.Errorf("model volume = %+v, want hostPath /var/lib/models", dep.Spec.Template.Spec.Volumes[0])
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 9090 || svc.Spec.Selector[labelInstance] != "tiny" {
		t.Errorf("service = ports %+v selector %v, want metrics port 9090 selecting the workers", svc.Spec.Ports, svc.Spec.Selector)
	}
	// The worker decodes the file with the same function as the control messages.
	if c, err := bus.DecodeControl([]byte(cm.Data["threshold.json"])); err != nil || c.ExitThreshold != 0.9 {
		t.Errorf("threshold.json %q = %+v, %v; want the default threshold 0.9", cm.Data["threshold.json"], c, err)
	}

	// Until the workers are ready: not Ready, Progressing; the queue and entry already exist.
	await(t, waitLong, "Progressing", conditionIs(ns, "tiny", CondProgressing, metav1.ConditionTrue, ReasonRollingOut))
	await(t, waitLong, "not Ready", conditionIs(ns, "tiny", CondReady, metav1.ConditionFalse, ReasonPodsNotReady))
	ref := bus.Ref{Namespace: ns, Name: "tiny"}
	st, err := js.Stream(ctx, ref.Stream())
	if err != nil {
		t.Fatalf("stream %s: %v", ref.Stream(), err)
	}
	if subj := st.CachedInfo().Config.Subjects; !slices.Equal(subj, []string{ref.RequestSubject()}) {
		t.Errorf("stream subjects = %v, want [%s]", subj, ref.RequestSubject())
	}
	if _, err := st.Consumer(ctx, bus.ConsumerName); err != nil {
		t.Errorf("consumer %s: %v", bus.ConsumerName, err)
	}
	entry, err := srv.registryEntryOf(ctx, ref)
	if err != nil {
		t.Fatalf("registry entry: %v", err)
	}
	entry.Updated = time.Time{}
	wantEntry := bus.ModelEntry{Namespace: ns, Name: "tiny", Subject: ref.RequestSubject(), ContextLength: 2048, Thresholds: bus.Thresholds{ExitThreshold: 0.9}, MaxSteps: 4}
	if diff := cmp.Diff(entry, wantEntry); diff != "" {
		t.Errorf("registry entry before rollout (-got +want):\n%s", diff)
	}

	// The Deployment reports its pods ready: Ready, rollout done, registry says ready.
	markDeploymentReady(t, ns, "tiny-worker")
	await(t, waitLong, "Ready", conditionIs(ns, "tiny", CondReady, metav1.ConditionTrue, ReasonAvailable))
	await(t, waitLong, "rolled out", conditionIs(ns, "tiny", CondProgressing, metav1.ConditionFalse, ReasonRolloutDone))
	await(t, waitLong, "RolledOut event", hasEvent(ns, "tiny", EventRolledOut))
	lm = getLoopModel(t, ns, "tiny")
	if lm.Status.ReadyReplicas != 1 || lm.Status.Replicas != 1 || lm.Status.ObservedGeneration != lm.Generation || lm.Status.ExitThreshold != 0.9 {
		t.Errorf("status = %+v, want 1/1 replicas, observedGeneration %d, threshold 0.9", lm.Status, lm.Generation)
	}
	if lm.Status.Selector != "app.kubernetes.io/instance=tiny,app.kubernetes.io/name=loopserve-worker" {
		t.Errorf("status.selector = %q", lm.Status.Selector)
	}
	await(t, waitLong, "registry entry ready", func() error {
		e, err := srv.registryEntryOf(ctx, ref)
		if err != nil || !e.Ready {
			return fmt.Errorf("entry %+v, %v", e, err)
		}
		return nil
	})

	// Changing only the threshold updates the ConfigMap, the registry and the workers (over
	// NATS) but leaves the pod template alone: no rollout.
	drainControl(ctl)
	hashBefore := getDeployment(t, ns, "tiny-worker").Spec.Template.Annotations[AnnotationSpecHash]
	genBefore := getDeployment(t, ns, "tiny-worker").Generation
	updateLoopModel(t, ns, "tiny", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.ExitThreshold = 0.7 })
	msg, err := ctl.NextMsg(waitLong)
	if err != nil {
		t.Fatalf("no control message after the threshold change: %v", err)
	}
	got, err := bus.DecodeControl(msg.Data)
	if err != nil || got.ExitThreshold != 0.7 {
		t.Errorf("control message %s = %+v, %v; want exitThreshold 0.7", msg.Data, got, err)
	}
	await(t, waitLong, "ConfigMap threshold 0.7", func() error {
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "tiny-config"}, &cm); err != nil {
			return err
		}
		if !strings.Contains(cm.Data["threshold.json"], `"exitThreshold":0.7`) {
			return fmt.Errorf("threshold.json = %s", cm.Data["threshold.json"])
		}
		return nil
	})
	await(t, waitLong, "status threshold 0.7", func() error {
		if lm := getLoopModel(t, ns, "tiny"); lm.Status.ExitThreshold != 0.7 || lm.Status.ObservedGeneration != lm.Generation {
			return fmt.Errorf("status threshold %v at generation %d of %d", lm.Status.ExitThreshold, lm.Status.ObservedGeneration, lm.Generation)
		}
		return nil
	})
	await(t, waitLong, "ThresholdPublished event", hasEvent(ns, "tiny", EventThresholdPublished))
	await(t, waitLong, "Updated event for the ConfigMap", hasEvent(ns, "tiny", EventUpdated))
	dep2 := getDeployment(t, ns, "tiny-worker")
	if h := dep2.Spec.Template.Annotations[AnnotationSpecHash]; h != hashBefore || dep2.Generation != genBefore {
		t.Errorf("threshold change touched the pod template: hash %s -> %s, generation %d -> %d", hashBefore, h, genBefore, dep2.Generation)
	}
	if e, err := srv.registryEntryOf(ctx, ref); err != nil || e.ExitThreshold != 0.7 {
		t.Errorf("registry entry = %+v, %v; want threshold 0.7", e, err)
	}

	// A restart-relevant change rolls the pods: new hash, new image, Progressing again.
	updateLoopModel(t, ns, "tiny", func(lm *v1alpha1.LoopModel) {
		lm.Spec.Loop.KVPolicy = v1alpha1.KVLast
		lm.Spec.Runtime.Image = "registry.example/loopserve:v2"
	})
	await(t, waitLong, "Deployment updated", func() error {
		d := getDeployment(t, ns, "tiny-worker")
		if d.Spec.Template.Annotations[AnnotationSpecHash] == hashBefore || d.Spec.Template.Spec.Containers[0].Image != "registry.example/loopserve:v2" {
			return fmt.Errorf("template hash %s image %s", d.Spec.Template.Annotations[AnnotationSpecHash], d.Spec.Template.Spec.Containers[0].Image)
		}
		return nil
	})
	await(t, waitLong, "Progressing after spec change", conditionIs(ns, "tiny", CondProgressing, metav1.ConditionTrue, ReasonRollingOut))
	markDeploymentReady(t, ns, "tiny-worker")
	await(t, waitLong, "rolled out again", conditionIs(ns, "tiny", CondProgressing, metav1.ConditionFalse, ReasonRolloutDone))

	// The /scale subresource drives the replicas, clamped to maxReplicas.
	updateLoopModel(t, ns, "tiny", func(lm *v1alpha1.LoopModel) { lm.Spec.Scaling.MaxReplicas = 3 })
	var scale autoscalingv1.Scale
	lm = getLoopModel(t, ns, "tiny")
	if err := k8s.SubResource("scale").Get(ctx, lm, &scale); err != nil {
		t.Fatalf("reading /scale: %v", err)
	}
	if scale.Spec.Replicas != 1 || scale.Status.Selector != lm.Status.Selector {
		t.Errorf("scale = spec %d selector %q, want 1 and %q", scale.Spec.Replicas, scale.Status.Selector, lm.Status.Selector)
	}
	scale.Spec.Replicas = 5
	if err := k8s.SubResource("scale").Update(ctx, lm, client.WithSubResourceBody(&scale)); err != nil {
		t.Fatalf("scaling to 5: %v", err)
	}
	await(t, waitLong, "Deployment scaled to maxReplicas 3", func() error {
		if n := ptr.Deref(getDeployment(t, ns, "tiny-worker").Spec.Replicas, 0); n != 3 {
			return fmt.Errorf("replicas %d", n)
		}
		return nil
	})

	// Deletion removes the stream and the registry entry, then the LoopModel.
	if err := k8s.Delete(ctx, getLoopModel(t, ns, "tiny")); err != nil {
		t.Fatalf("deleting LoopModel: %v", err)
	}
	await(t, waitLong, "LoopModel deleted", gone(&v1alpha1.LoopModel{}, ns, "tiny"))
	if _, err := js.Stream(ctx, ref.Stream()); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Errorf("stream after delete: err = %v, want ErrStreamNotFound", err)
	}
	if _, err := srv.registryEntryOf(ctx, ref); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("registry entry after delete: err = %v, want ErrKeyNotFound", err)
	}
}

func drainControl(sub *nats.Subscription) {
	for {
		if _, err := sub.NextMsg(10 * time.Millisecond); err != nil {
			return
		}
	}
}

// TestNATSOutageDegradesAndRecovers stops the NATS server under a Ready LoopModel: it turns
// Degraded/NATSUnreachable without the operator failing, and recovers when NATS returns.
func TestNATSOutageDegradesAndRecovers(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	if err := k8s.Create(ctx, newLoopModel(ns, "flaky", srv.url())); err != nil {
		t.Fatalf("creating LoopModel: %v", err)
	}
	await(t, waitLong, "Deployment created", exists(&appsv1.Deployment{}, ns, "flaky-worker"))
	markDeploymentReady(t, ns, "flaky-worker")
	await(t, waitLong, "Ready", conditionIs(ns, "flaky", CondReady, metav1.ConditionTrue, ReasonAvailable))

	srv.stop()
	await(t, waitLong, "Degraded", conditionIs(ns, "flaky", CondDegraded, metav1.ConditionTrue, ReasonNATSUnreachable))
	await(t, waitLong, "not Ready", conditionIs(ns, "flaky", CondReady, metav1.ConditionFalse, ReasonNATSUnreachable))
	await(t, waitLong, "NATSUnreachable event", hasEvent(ns, "flaky", ReasonNATSUnreachable))

	srv.start() // same port, same store
	await(t, waitLong, "Ready again", conditionIs(ns, "flaky", CondReady, metav1.ConditionTrue, ReasonAvailable))
	await(t, waitLong, "not Degraded", conditionIs(ns, "flaky", CondDegraded, metav1.ConditionFalse, ReasonAsExpected))
	_, js := srv.js()
	if _, err := js.Stream(ctx, bus.Ref{Namespace: ns, Name: "flaky"}.Stream()); err != nil {
		t.Errorf("stream after recovery: %v", err)
	}
}

// TestNATSNeverReachable: a LoopModel whose NATS never answers still gets its workers, is
// reported Degraded, and can be deleted with the skip annotation.
func TestNATSNeverReachable(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	url := srv.url()
	srv.stop()
	if err := k8s.Create(ctx, newLoopModel(ns, "nowhere", url)); err != nil {
		t.Fatalf("creating LoopModel: %v", err)
	}
	await(t, waitLong, "Deployment created anyway", exists(&appsv1.Deployment{}, ns, "nowhere-worker"))
	await(t, waitLong, "Degraded", conditionIs(ns, "nowhere", CondDegraded, metav1.ConditionTrue, ReasonNATSUnreachable))

	if err := k8s.Delete(ctx, getLoopModel(t, ns, "nowhere")); err != nil {
		t.Fatalf("deleting: %v", err)
	}
	// Deletion waits for NATS, and says so...
	await(t, waitLong, "deletion held", func() error {
		lm := getLoopModel(t, ns, "nowhere")
		c := meta.FindStatusCondition(lm.Status.Conditions, CondDegraded)
		if lm.DeletionTimestamp.IsZero() || c == nil || !strings.Contains(c.Message, "deletion waits for NATS cleanup") {
			return fmt.Errorf("deletion %v, Degraded %+v", lm.DeletionTimestamp, c)
		}
		return nil
	})
	// ...unless told to skip it.
	updateLoopModel(t, ns, "nowhere", func(lm *v1alpha1.LoopModel) {
		metav1.SetMetaDataAnnotation(&lm.ObjectMeta, AnnotationSkipNATSCleanup, "true")
	})
	await(t, waitLong, "deleted with skip annotation", gone(&v1alpha1.LoopModel{}, ns, "nowhere"))
}

// TestCrashLoopingPodsDegrade: a worker pod in CrashLoopBackOff makes the LoopModel Degraded
// with the pod's last error in the message.
func TestCrashLoopingPodsDegrade(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	lm := newLoopModel(ns, "crashy", srv.url())
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatalf("creating LoopModel: %v", err)
	}
	await(t, waitLong, "Deployment created", exists(&appsv1.Deployment{}, ns, "crashy-worker"))
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "crashy-worker-abc", Labels: selectorLabels(lm)},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: containerName, Image: testImage}}},
	}
	if err := k8s.Create(ctx, pod); err != nil {
		t.Fatalf("creating pod: %v", err)
	}
	pod.Status.ContainerStatuses = []corev1.ContainerStatus{{
		Name:                 containerName,
		RestartCount:         4,
		State:                corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff"}},
		LastTerminationState: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 1, Message: "loading weights /models/x: no such file"}},
	}}
	if err := k8s.Status().Update(ctx, pod); err != nil {
		t.Fatalf("setting pod status: %v", err)
	}
	await(t, waitLong, "Degraded", conditionIs(ns, "crashy", CondDegraded, metav1.ConditionTrue, ReasonCrashLooping))
	lm = getLoopModel(t, ns, "crashy")
	for _, c := range lm.Status.Conditions {
		if c.Type == CondDegraded && !strings.Contains(c.Message, "loading weights /models/x") {
			t.Errorf("Degraded message %q does not quote the pod's error", c.Message)
		}
	}
	await(t, waitLong, "PodsCrashLooping event", hasEvent(ns, "crashy", ReasonCrashLooping))
}

// TestMissingPVCIsReported: a PVC source that does not exist is reported as ModelInvalid with
// no workers created; creating the claim lets the LoopModel proceed.
func TestMissingPVCIsReported(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	lm := newLoopModel(ns, "pvcmodel", srv.url())
	lm.Spec.Model.Source = v1alpha1.ModelSource{PVC: &v1alpha1.PVCSource{ClaimName: "weights"}}
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatalf("creating LoopModel: %v", err)
	}
	await(t, waitLong, "ModelInvalid", conditionIs(ns, "pvcmodel", CondDegraded, metav1.ConditionTrue, ReasonModelInvalid))
	if err := gone(&appsv1.Deployment{}, ns, "pvcmodel-worker")(); err != nil {
		t.Errorf("Deployment for an invalid model: %v", err)
	}
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "weights"},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
		},
	}
	if err := k8s.Create(ctx, pvc); err != nil {
		t.Fatalf("creating PVC: %v", err)
	}
	var dep appsv1.Deployment
	await(t, waitLong, "Deployment once the PVC exists", exists(&dep, ns, "pvcmodel-worker"))
	if v := dep.Spec.Template.Spec.Volumes[0].PersistentVolumeClaim; v == nil || v.ClaimName != "weights" || !v.ReadOnly {
		t.Errorf("model volume = %+v, want the claim weights, read-only", dep.Spec.Template.Spec.Volumes[0])
	}
	await(t, waitLong, "no longer Degraded", conditionIs(ns, "pvcmodel", CondDegraded, metav1.ConditionFalse, ReasonAsExpected))
}

// TestUnservableSpecReported: a LoopModel the CRD accepts but whose Deployment the API server
// refuses (requests above limits) is reported as InvalidSpec in status, and fixing the spec
// lets it proceed; the operator keeps running throughout.
func TestUnservableSpecReported(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	lm := newLoopModel(ns, "greedy", srv.url())
	lm.Spec.Runtime.Resources = corev1.ResourceRequirements{
		Requests: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("2Gi")},
		Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1Gi")},
	}
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatalf("creating LoopModel: %v", err)
	}
	await(t, waitLong, "InvalidSpec", conditionIs(ns, "greedy", CondDegraded, metav1.ConditionTrue, ReasonInvalidSpec))
	for _, c := range getLoopModel(t, ns, "greedy").Status.Conditions {
		if c.Type == CondDegraded && !strings.Contains(c.Message, "must be less than or equal to memory limit") {
			t.Errorf("Degraded message %q does not carry the API server's reason", c.Message)
		}
	}
	await(t, waitLong, "InvalidSpec event", hasEvent(ns, "greedy", ReasonInvalidSpec))
	updateLoopModel(t, ns, "greedy", func(lm *v1alpha1.LoopModel) {
		lm.Spec.Runtime.Resources.Limits[corev1.ResourceMemory] = resource.MustParse("4Gi")
	})
	await(t, waitLong, "Deployment after the fix", exists(&appsv1.Deployment{}, ns, "greedy-worker"))
	await(t, waitLong, "no longer Degraded", conditionIs(ns, "greedy", CondDegraded, metav1.ConditionFalse, ReasonAsExpected))
}

// TestModelSourcesAccepted: the image-volume and URL sources produce Deployments the API
// server accepts (the fetch init container and the image volume are valid pod specs).
func TestModelSourcesAccepted(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	sources := map[string]v1alpha1.ModelSource{
		"from-image": {Image: &v1alpha1.ImageSource{Reference: "registry.example/models/ouro-tiny:1"}},
		"from-url":   {URL: &v1alpha1.URLSource{URL: "https://models.example/ouro-tiny.tar.gz"}},
	}
	for name, src := range sources {
		lm := newLoopModel(ns, name, srv.url())
		lm.Spec.Model.Source = src
		if err := k8s.Create(ctx, lm); err != nil {
			t.Fatalf("creating %s: %v", name, err)
		}
	}
	var dep appsv1.Deployment
	await(t, waitLong, "image-volume Deployment", exists(&dep, ns, "from-image-worker"))
	if v := dep.Spec.Template.Spec.Volumes[0].Image; v == nil || v.Reference != "registry.example/models/ouro-tiny:1" {
		t.Errorf("model volume = %+v, want the image volume", dep.Spec.Template.Spec.Volumes[0])
	}
	await(t, waitLong, "URL Deployment", exists(&dep, ns, "from-url-worker"))
	if ic := dep.Spec.Template.Spec.InitContainers; len(ic) != 1 || ic[0].Image != "curlimages/curl:8.11.1" {
		t.Errorf("init containers = %+v, want the default fetch image", ic)
	}
}
