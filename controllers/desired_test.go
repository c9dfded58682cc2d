package controllers

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

var testDefaults = defaults{NATSURL: "nats://nats:4222", Image: "loopserve:1"}

// defaulted is a LoopModel as the API server stores it after defaulting.
func defaulted() *v1alpha1.LoopModel {
	return &v1alpha1.LoopModel{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "ouro", Generation: 1},
		Spec: v1alpha1.LoopModelSpec{
			Model: v1alpha1.ModelSpec{
				Source:        v1alpha1.ModelSource{HostPath: &v1alpha1.HostPathSource{Path: "/data"}},
				Path:          "ouro",
				Format:        v1alpha1.FormatHF,
				ContextLength: 2048,
			},
			Loop:    v1alpha1.LoopSpec{MaxSteps: 4, ExitThreshold: 0.9, ProbeFraction: ptr.To(0.02), KVPolicy: v1alpha1.KVFull},
			Scaling: v1alpha1.ScalingSpec{Replicas: ptr.To[int32](1), MinReplicas: 1, MaxReplicas: 1},
			Tuning:  v1alpha1.TuningSpec{Mode: v1alpha1.TuningAuto},
		},
	}
}

func mustDeployment(t *testing.T, lm *v1alpha1.LoopModel) *appsv1.Deployment {
	t.Helper()
	d, err := desiredDeployment(lm, testDefaults)
	if err != nil {
		t.Fatalf("desiredDeployment: %v", err)
	}
	return d
}

func TestDesiredReplicas(t *testing.T) {
	tests := []struct {
		name               string
		replicas           *int32
		min, max, expected int32
	}{
		{"as asked", ptr.To[int32](3), 1, 5, 3},
		{"clamped to max", ptr.To[int32](9), 1, 5, 5},
		{"clamped to min", ptr.To[int32](0), 2, 5, 2},
		{"unset takes min", nil, 2, 5, 2},
		{"never zero", nil, 0, 0, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lm := defaulted()
			lm.Spec.Scaling = v1alpha1.ScalingSpec{Replicas: tt.replicas, MinReplicas: tt.min, MaxReplicas: tt.max}
			if got := desiredReplicas(lm); got != tt.expected {
				t.Errorf("desiredReplicas = %d, want %d", got, tt.expected)
			}
		})
	}
}

// TestThresholdDoesNotRollPods: the pod template is identical for any exit threshold (it lives
// in the ConfigMap and on the control subject), while every restart-relevant change alters it.
func TestThresholdDoesNotRollPods(t *testing.T) {
	base := mustDeployment(t, defaulted()).Spec.Template
	lower := defaulted()
	lower.Spec.Loop.ExitThreshold = 0.5
	lower.Spec.Loop.MinExitThreshold = ptr.To(0.4)
	if diff := cmp.Diff(mustDeployment(t, lower).Spec.Template, base); diff != "" {
		t.Errorf("threshold change altered the pod template (-got +want):\n%s", diff)
	}

	changes := []struct {
		name   string
		change func(*v1alpha1.LoopModel)
	}{
		{"max steps", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.MaxSteps = 3 }},
		{"kv policy", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.KVPolicy = v1alpha1.KVLast }},
		{"probe fraction", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.ProbeFraction = ptr.To(0.1) }},
		{"model path", func(lm *v1alpha1.LoopModel) { lm.Spec.Model.Path = "other" }},
		{"image", func(lm *v1alpha1.LoopModel) { lm.Spec.Runtime.Image = "loopserve:2" }},
		{"env", func(lm *v1alpha1.LoopModel) { lm.Spec.Runtime.Env = []corev1.EnvVar{{Name: "X", Value: "1"}} }},
		{"nats url", func(lm *v1alpha1.LoopModel) { lm.Spec.NATS.URL = "nats://other:4222" }},
	}
	baseHash := base.Annotations[AnnotationSpecHash]
	for _, tt := range changes {
		t.Run(tt.name, func(t *testing.T) {
			lm := defaulted()
			tt.change(lm)
			if h := mustDeployment(t, lm).Spec.Template.Annotations[AnnotationSpecHash]; h == baseHash {
				t.Errorf("spec hash unchanged (%s) after changing %s", h, tt.name)
			}
		})
	}
}

func TestDesiredDeploymentModelSources(t *testing.T) {
	tests := []struct {
		name      string
		source    v1alpha1.ModelSource
		volume    corev1.VolumeSource
		initImage string // the fetch init container's image, "" when none
	}{
		{"pvc", v1alpha1.ModelSource{PVC: &v1alpha1.PVCSource{ClaimName: "weights"}},
			corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "weights", ReadOnly: true}}, ""},
		{"hostPath", v1alpha1.ModelSource{HostPath: &v1alpha1.HostPathSource{Path: "/data"}},
			corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/data", Type: ptr.To(corev1.HostPathDirectory)}}, ""},
		{"image", v1alpha1.ModelSource{Image: &v1alpha1.ImageSource{Reference: "reg/ouro:1", PullPolicy: corev1.PullIfNotPresent}},
			corev1.VolumeSource{Image: &corev1.ImageVolumeSource{Reference: "reg/ouro:1", PullPolicy: corev1.PullIfNotPresent}}, ""},
		{"url", v1alpha1.ModelSource{URL: &v1alpha1.URLSource{URL: "https://x/ouro.tar.gz", FetchImage: "curl:1"}},
			corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}, "curl:1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lm := defaulted()
			lm.Spec.Model.Source = tt.source
			pod := mustDeployment(t, lm).Spec.Template.Spec
			if diff := cmp.Diff(pod.Volumes[0].VolumeSource, tt.volume); diff != "" {
				t.Errorf("model volume (-got +want):\n%s", diff)
			}
			var initImage string
			if len(pod.InitContainers) == 1 {
				initImage = pod.InitContainers[0].Image
				if env := pod.InitContainers[0].Env[0]; env.Name != "MODEL_URL" || env.Value != tt.source.URL.URL {
					t.Errorf("fetch env = %+v, want MODEL_URL=%s", env, tt.source.URL.URL)
				}
			}
			if initImage != tt.initImage || len(pod.InitContainers) > 1 {
				t.Errorf("init containers = %+v, want image %q", pod.InitContainers, tt.initImage)
			}
			if m := pod.Containers[0].VolumeMounts[0]; m.MountPath != "/models" || !m.ReadOnly {
				t.Errorf("worker model mount = %+v, want /models read-only", m)
			}
		})
	}
}

func TestDesiredDeploymentRuntime(t *testing.T) {
	lm := defaulted()
	gpu := corev1.ResourceList{"nvidia.com/gpu": resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("24Gi")}
	lm.Spec.Runtime = v1alpha1.RuntimeSpec{
		Resources:    corev1.ResourceRequirements{Limits: gpu},
		NodeSelector: map[string]string{"gpu": "h200"},
		Tolerations:  []corev1.Toleration{{Key: "nvidia.com/gpu", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}},
		Env:          []corev1.EnvVar{{Name: "LOOPSERVE_BACKEND", Value: "cuda"}},
	}
	lm.Spec.NATS.CredentialsSecret = &v1alpha1.SecretKey{Name: "nats", Key: "op.creds"}
	dep := mustDeployment(t, lm)
	pod := dep.Spec.Template.Spec
	c := pod.Containers[0]
	if diff := cmp.Diff(c.Resources.Limits, gpu); diff != "" {
		t.Errorf("limits (-got +want):\n%s", diff)
	}
	if diff := cmp.Diff(pod.NodeSelector, lm.Spec.Runtime.NodeSelector); diff != "" {
		t.Errorf("node selector (-got +want):\n%s", diff)
	}
	if diff := cmp.Diff(pod.Tolerations, lm.Spec.Runtime.Tolerations); diff != "" {
		t.Errorf("tolerations (-got +want):\n%s", diff)
	}
	wantEnv := []corev1.EnvVar{
		{Name: "LOOPSERVE_BACKEND", Value: "cuda"},
		{Name: "LOOPSERVE_NATS_CREDS", Value: "/var/run/loopserve/nats/op.creds"},
		{Name: "HOME", Value: "/tmp"},
		{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
	}
	if diff := cmp.Diff(c.Env, wantEnv); diff != "" {
		t.Errorf("env (-got +want):\n%s", diff)
	}
	wantArgs := []string{"worker", "--nats", "nats://nats:4222", "--model", "/models/ouro", "--loopmodel", "ml/ouro",
		"--threshold-file", "/etc/loopserve/threshold.json", "--metrics-listen", ":9090",
		"--kv-policy", "full", "--probe-fraction", "0.02", "--capacity", "8", "--drain", "50s",
		"--max-steps", "4", "--context-length", "2048"}
	if diff := cmp.Diff(c.Args, wantArgs); diff != "" {
		t.Errorf("args (-got +want):\n%s", diff)
	}
	if c.Image != "loopserve:1" {
		t.Errorf("image = %q, want the default loopserve:1", c.Image)
	}
	psc := pod.SecurityContext
	if !ptr.Deref(psc.RunAsNonRoot, false) || ptr.Deref(psc.RunAsUser, 0) == 0 || psc.SeccompProfile == nil {
		t.Errorf("pod security context = %+v, want non-root with a seccomp profile", psc)
	}
	if sc := c.SecurityContext; !ptr.Deref(sc.ReadOnlyRootFilesystem, false) || ptr.Deref(sc.AllowPrivilegeEscalation, true) ||
		len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		t.Errorf("container security context = %+v, want read-only root, no escalation, all capabilities dropped", sc)
	}
	if c.StartupProbe == nil || c.LivenessProbe == nil || c.ReadinessProbe == nil {
		t.Fatal("worker container lacks a startup, liveness or readiness probe")
	}
	// Alive while it waits for its queue and loads weights; ready only once it takes requests.
	if got := []string{c.StartupProbe.HTTPGet.Path, c.LivenessProbe.HTTPGet.Path, c.ReadinessProbe.HTTPGet.Path}; !cmp.Equal(got, []string{"/healthz", "/healthz", "/readyz"}) {
		t.Errorf("probe paths (startup, liveness, readiness) = %q", got)
	}
	if ru := dep.Spec.Strategy.RollingUpdate; ru.MaxUnavailable.IntValue() != 0 || ru.MaxSurge.IntValue() != 1 {
		t.Errorf("rolling update = %+v, want maxUnavailable 0 (keep capacity), maxSurge 1", ru)
	}
	if !cmp.Equal(dep.Spec.Selector.MatchLabels, map[string]string{labelName: workerApp, labelInstance: "ouro"}) {
		t.Errorf("selector = %v", dep.Spec.Selector.MatchLabels)
	}
}

func TestModelDir(t *testing.T) {
	for path, want := range map[string]string{"": "/models", ".": "/models", "a/b": "/models/a/b", "a//b/": "/models/a/b", "./a": "/models/a"} {
		lm := defaulted()
		lm.Spec.Model.Path = path
		if got := modelDir(lm); got != want {
			t.Errorf("modelDir(%q) = %q, want %q", path, got, want)
		}
	}
}

func TestSummarize(t *testing.T) {
	dep := func(desired, replicas, updated, ready int32, current bool) *appsv1.Deployment {
		d := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Generation: 2}}
		d.Spec.Replicas = &desired
		d.Status = appsv1.DeploymentStatus{Replicas: replicas, UpdatedReplicas: updated, ReadyReplicas: ready, ObservedGeneration: 2}
		if !current {
			d.Status.ObservedGeneration = 1
		}
		return d
	}
	crash := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "w-1"}, Status: corev1.PodStatus{ContainerStatuses: []corev1.ContainerStatus{{
		Name: "worker", RestartCount: 3,
		State:                corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff"}},
		LastTerminationState: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{Message: "bad weights"}},
	}}}}
	pull := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "w-2"}, Status: corev1.PodStatus{InitContainerStatuses: []corev1.ContainerStatus{{
		Name: "fetch-model", State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ImagePullBackOff", Message: "not found"}},
	}}}}
	stalled := dep(2, 2, 1, 1, true)
	stalled.Status.Conditions = []appsv1.DeploymentCondition{{Type: appsv1.DeploymentProgressing, Status: corev1.ConditionFalse, Reason: "ProgressDeadlineExceeded", Message: "too slow"}}

	tests := []struct {
		name                string
		dep                 *appsv1.Deployment
		pods                []corev1.Pod
		available, complete bool
		problem, message    string
	}{
		{"fresh", dep(1, 0, 0, 0, false), nil, false, false, "", ""},
		{"done", dep(2, 2, 2, 2, true), nil, true, true, "", ""},
		{"surging: old pods still serve", dep(2, 3, 1, 2, true), nil, true, false, "", ""},
		{"spec not yet seen", dep(2, 2, 2, 2, false), nil, true, false, "", ""},
		{"crash loop", dep(1, 1, 1, 0, true), []corev1.Pod{pull, crash}, false, false, ReasonCrashLooping,
			"pod w-1 container worker is crash looping (3 restarts): bad weights"},
		{"image pull", dep(1, 1, 1, 0, true), []corev1.Pod{pull}, false, false, ReasonImagePull,
			"pod w-2 container fetch-model: ImagePullBackOff: not found"},
		{"stalled", stalled, nil, false, false, ReasonRolloutStalled, "too slow"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ro := summarize(tt.dep, tt.pods)
			if ro.available() != tt.available || ro.complete() != tt.complete {
				t.Errorf("available, complete = %v, %v; want %v, %v", ro.available(), ro.complete(), tt.available, tt.complete)
			}
			if ro.problem != tt.problem || ro.message != tt.message {
				t.Errorf("problem = %q %q, want %q %q", ro.problem, ro.message, tt.problem, tt.message)
			}
		})
	}
}

func TestDesiredConfigMap(t *testing.T) {
	cm, err := desiredConfigMap(defaulted(), bus.Thresholds{ExitThreshold: 0.75})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"exitThreshold":0.75}`
	if diff := cmp.Diff(cm.Data, map[string]string{"threshold.json": want}); diff != "" {
		t.Errorf("ConfigMap data (-got +want):\n%s", diff)
	}
	if cm.Name != "ouro-config" || cm.Labels[labelManagedBy] != managedBy {
		t.Errorf("ConfigMap %s labels %v", cm.Name, cm.Labels)
	}
}

// TestFetchScript runs the URL source's init script with this machine's sh, curl, tar and
// sha256sum against a real HTTP server: the archive is unpacked when its digest matches and
// refused when it does not.
func TestFetchScript(t *testing.T) {
	for _, tool := range []string{"sh", "curl", "tar", "sha256sum"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: the script runs in the fetch image, not here", tool)
		}
	}
	var archive bytes.Buffer
	gz := gzip.NewWriter(&archive)
	tw := tar.NewWriter(gz)
	body := []byte(`{"model_type": "ouro"}`)
	if err := tw.WriteHeader(&tar.Header{Name: "ouro/config.json", Mode: 0o644, Size: int64(len(body))}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(body); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(archive.Bytes()) }))
	defer srv.Close()
	sum := sha256.Sum256(archive.Bytes())

	tests := []struct {
		name   string
		digest string
		ok     bool
	}{
		{"no digest", "", true},
		{"right digest", hex.EncodeToString(sum[:]), true},
		{"wrong digest", strings.Repeat("0", 64), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			cmd := exec.Command("sh", "-c", fetchScript)
			cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "MODEL_DIR=" + dir,
				"MODEL_URL=" + srv.URL + "/ouro.tar.gz", "MODEL_SHA256=" + tt.digest}
			out, err := cmd.CombinedOutput()
			if (err == nil) != tt.ok {
				t.Fatalf("script err = %v, want ok=%v\n%s", err, tt.ok, out)
			}
			got, readErr := os.ReadFile(filepath.Join(dir, "ouro", "config.json"))
			if tt.ok && (readErr != nil || !bytes.Equal(got, body)) {
				t.Errorf("unpacked config.json = %q, %v; want %q", got, readErr, body)
			}
			if !tt.ok && readErr == nil {
				t.Error("archive unpacked despite a wrong digest")
			}
			if _, err := os.Stat(filepath.Join(dir, ".model.tar.gz")); tt.ok && err == nil {
				t.Error("downloaded archive left behind")
			}
		})
	}
}
