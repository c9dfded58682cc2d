package controllers

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"path"
	"strconv"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

// Labels and names of the objects the operator owns.
const (
	labelName      = "app.kubernetes.io/name"
	labelInstance  = "app.kubernetes.io/instance"
	labelManagedBy = "app.kubernetes.io/managed-by"
	labelLoopModel = "loopserve.io/loopmodel"
	workerApp      = "loopserve-worker"
	managedBy      = "loopserve-operator"
	fieldOwner     = "loopserve-operator"
)

// The worker pod's layout; the worker's flags refer to these paths.
const (
	containerName = "worker"
	modelVolume   = "model"
	modelMount    = "/models"
	configVolume  = "config"
	configMount   = "/etc/loopserve"
	configFile    = "threshold.json" // a bus.Control message
	credsVolume   = "nats-creds"
	credsMount    = "/var/run/loopserve/nats"
	tmpVolume     = "tmp"
	metricsPort   = 9090
	metricsName   = "metrics"
	workerUID     = 65532
	// workerBatch is the requests one worker takes at once; the consumer's MaxAckPending is
	// this times maxReplicas, so scaling within bounds needs no consumer update.
	workerBatch = 8
	// terminationGrace lets a stopping worker finish requests in flight (--drain, 10s less)
	// before it hands the rest back to the queue.
	terminationGrace = 60 * time.Second
)

// defaults are the operator-wide settings a LoopModel may leave empty.
type defaults struct {
	NATSURL string // --nats-url
	Image   string // --worker-image
}

// resolved is a LoopModel's effective NATS URL and worker image.
func (d defaults) resolved(lm *v1alpha1.LoopModel) defaults {
	out := d
	if lm.Spec.NATS.URL != "" {
		out.NATSURL = lm.Spec.NATS.URL
	}
	if lm.Spec.Runtime.Image != "" {
		out.Image = lm.Spec.Runtime.Image
	}
	return out
}

func workerName(lm *v1alpha1.LoopModel) string  { return lm.Name + "-worker" }
func serviceName(lm *v1alpha1.LoopModel) string { return lm.Name + "-metrics" }
func configName(lm *v1alpha1.LoopModel) string  { return lm.Name + "-config" }

func ref(lm *v1alpha1.LoopModel) bus.Ref { return bus.Ref{Namespace: lm.Namespace, Name: lm.Name} }

// selectorLabels select a LoopModel's worker pods; they never change (Deployment selectors are immutable).
func selectorLabels(lm *v1alpha1.LoopModel) map[string]string {
	return map[string]string{labelName: workerApp, labelInstance: lm.Name}
}

func objectLabels(lm *v1alpha1.LoopModel) map[string]string {
	l := selectorLabels(lm)
	l[labelManagedBy] = managedBy
	l[labelLoopModel] = lm.Name
	return l
}

// desiredReplicas is spec.scaling.replicas clamped to [minReplicas, maxReplicas].
func desiredReplicas(lm *v1alpha1.LoopModel) int32 {
	n := lm.Spec.Scaling.MinReplicas
	if r := lm.Spec.Scaling.Replicas; r != nil {
		n = *r
	}
	return clampReplicas(lm, n)
}

// replicasInForce is the number of workers the Deployment runs: desiredReplicas, or in auto
// tuning mode the tuned status.recommendation.replicas once the loop has decided, kept within
// [minReplicas, maxReplicas] so that a spec edit bounds it at once. In auto mode the API server
// refuses changes of spec.scaling.replicas (/scale included): the loop owns the count.
func replicasInForce(lm *v1alpha1.LoopModel) int32 {
	rec := lm.Status.Recommendation
	if tuningMode(lm) != v1alpha1.TuningAuto || lm.Status.LastTuneTime == nil || rec == nil || rec.Replicas < 1 {
		return desiredReplicas(lm)
	}
	return clampReplicas(lm, rec.Replicas)
}

// clampReplicas keeps n within [minReplicas, maxReplicas] (maxReplicas 0: unbounded), and at least 1.
func clampReplicas(lm *v1alpha1.LoopModel, n int32) int32 {
	s := lm.Spec.Scaling
	if s.MaxReplicas > 0 {
		n = min(n, s.MaxReplicas)
	}
	return max(n, s.MinReplicas, 1)
}

func desiredConfigMap(lm *v1alpha1.LoopModel, th bus.Thresholds) (*corev1.ConfigMap, error) {
	// The worker reads the file at start (--threshold-file); later changes reach it over NATS.
	b, err := json.Marshal(bus.Control{Thresholds: th})
	if err != nil {
		return nil, fmt.Errorf("encoding the threshold file: %w", err)
	}
	return &corev1.ConfigMap{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "ConfigMap"},
		ObjectMeta: metav1.ObjectMeta{Name: configName(lm), Namespace: lm.Namespace, Labels: objectLabels(lm)},
		Data:       map[string]string{configFile: string(b)},
	}, nil
}

func desiredService(lm *v1alpha1.LoopModel) *corev1.Service {
	return &corev1.Service{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Service"},
		ObjectMeta: metav1.ObjectMeta{Name: serviceName(lm), Namespace: lm.Namespace, Labels: objectLabels(lm)},
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeClusterIP,
			Selector: selectorLabels(lm),
			Ports: []corev1.ServicePort{{
				Name:       metricsName,
				Port:       metricsPort,
				TargetPort: intstr.FromString(metricsName),
				Protocol:   corev1.ProtocolTCP,
			}},
		},
	}
}

// specHash digests every setting that needs a worker restart, including those the pod template
// may not show. The exit threshold is left out on purpose: it is applied live over NATS, so
// changing it must not roll the pods.
func specHash(lm *v1alpha1.LoopModel, d defaults) (string, error) {
	in := struct {
		Model         v1alpha1.ModelSpec
		MaxSteps      int32
		ProbeFraction *float64
		KVPolicy      v1alpha1.KVPolicy
		Runtime       v1alpha1.RuntimeSpec
		NATS          v1alpha1.NATSSpec
		Resolved      defaults
	}{lm.Spec.Model, lm.Spec.Loop.MaxSteps, lm.Spec.Loop.ProbeFraction, lm.Spec.Loop.KVPolicy,
		lm.Spec.Runtime, lm.Spec.NATS, d.resolved(lm)}
	b, err := json.Marshal(in)
	if err != nil {
		return "", fmt.Errorf("hashing the spec: %w", err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8]), nil
}

// modelDir is the model folder inside the worker container.
func modelDir(lm *v1alpha1.LoopModel) string {
	return path.Join(modelMount, path.Clean("/"+lm.Spec.Model.Path))
}

// workerArgs are the worker's command line (the image's entrypoint is the loopserve binary).
// maxSteps and contextLength reach the worker too: the registry entry promises them to the
// gateway, and the worker is what enforces them.
func workerArgs(lm *v1alpha1.LoopModel, d defaults) []string {
	args := []string{
		"worker",
		"--nats", d.resolved(lm).NATSURL,
		"--model", modelDir(lm),
		"--loopmodel", ref(lm).String(),
		"--threshold-file", path.Join(configMount, configFile),
		"--metrics-listen", ":" + strconv.Itoa(metricsPort),
		"--kv-policy", string(cmp.Or(lm.Spec.Loop.KVPolicy, v1alpha1.KVFull)),
		"--probe-fraction", strconv.FormatFloat(ptr.Deref(lm.Spec.Loop.ProbeFraction, 0), 'g', -1, 64),
		"--capacity", strconv.Itoa(workerBatch),
		"--drain", (terminationGrace - 10*time.Second).String(),
	}
	if n := lm.Spec.Loop.MaxSteps; n > 0 {
		args = append(args, "--max-steps", strconv.Itoa(int(n)))
	}
	if n := lm.Spec.Model.ContextLength; n > 0 {
		args = append(args, "--context-length", strconv.Itoa(int(n)))
	}
	return args
}

func restrictedContainerSecurity() *corev1.SecurityContext {
	return &corev1.SecurityContext{
		AllowPrivilegeEscalation: ptr.To(false),
		ReadOnlyRootFilesystem:   ptr.To(true),
		RunAsNonRoot:             ptr.To(true),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
	}
}

func modelVolumeSource(src v1alpha1.ModelSource) corev1.VolumeSource {
	switch {
	case src.PVC != nil:
		return corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: src.PVC.ClaimName, ReadOnly: true}}
	case src.HostPath != nil:
		return corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: src.HostPath.Path, Type: ptr.To(corev1.HostPathDirectory)}}
	case src.Image != nil:
		return corev1.VolumeSource{Image: &corev1.ImageVolumeSource{Reference: src.Image.Reference, PullPolicy: src.Image.PullPolicy}}
	default: // url: filled by the fetch init container
		return corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}
	}
}

// fetchScript downloads the model archive into the model volume, checks its SHA-256 when one
// is given, and unpacks it. URL, digest and folder come in through the environment so the
// shell never parses them.
const fetchScript = `set -eu
cd "$MODEL_DIR"
curl -fsSL --retry 5 --retry-delay 2 -o .model.tar.gz "$MODEL_URL"
if [ -n "${MODEL_SHA256:-}" ]; then echo "$MODEL_SHA256  .model.tar.gz" | sha256sum -c -; fi
tar -xzf .model.tar.gz
rm -f .model.tar.gz
`

func desiredDeployment(lm *v1alpha1.LoopModel, d defaults) (*appsv1.Deployment, error) {
	hash, err := specHash(lm, d)
	if err != nil {
		return nil, err
	}
	rt := lm.Spec.Runtime
	res := d.resolved(lm)
	replicas := replicasInForce(lm)

	env := append([]corev1.EnvVar(nil), rt.Env...)
	mounts := []corev1.VolumeMount{
		{Name: modelVolume, MountPath: modelMount, ReadOnly: true},
		{Name: configVolume, MountPath: configMount, ReadOnly: true},
		{Name: tmpVolume, MountPath: "/tmp"},
	}
	volumes := []corev1.Volume{
		{Name: modelVolume, VolumeSource: modelVolumeSource(lm.Spec.Model.Source)},
		{Name: configVolume, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: configName(lm)},
		}}},
		// The root filesystem is read-only: scratch space and caches (compiled kernels) go here.
		{Name: tmpVolume, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
	}
	if cs := lm.Spec.NATS.CredentialsSecret; cs != nil {
		key := cs.Key
		if key == "" {
			key = "nats.creds"
		}
		volumes = append(volumes, corev1.Volume{Name: credsVolume, VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
			SecretName: cs.Name, Items: []corev1.KeyToPath{{Key: key, Path: key}},
		}}})
		mounts = append(mounts, corev1.VolumeMount{Name: credsVolume, MountPath: credsMount, ReadOnly: true})
		env = append(env, corev1.EnvVar{Name: "LOOPSERVE_NATS_CREDS", Value: path.Join(credsMount, key)})
	}
	env = append(env,
		corev1.EnvVar{Name: "HOME", Value: "/tmp"},
		// The worker names itself in its stats snapshots after its pod.
		corev1.EnvVar{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
	)

	probe := func(path string, period, failures int32) *corev1.Probe {
		return &corev1.Probe{
			ProbeHandler:     corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromString(metricsName)}},
			PeriodSeconds:    period,
			FailureThreshold: failures,
			TimeoutSeconds:   5,
		}
	}
	worker := corev1.Container{
		Name:            containerName,
		Image:           res.Image,
		ImagePullPolicy: rt.ImagePullPolicy,
		Args:            workerArgs(lm, d),
		Env:             env,
		Ports:           []corev1.ContainerPort{{Name: metricsName, ContainerPort: metricsPort, Protocol: corev1.ProtocolTCP}},
		Resources:       *rt.Resources.DeepCopy(),
		VolumeMounts:    mounts,
		// /healthz answers from the start (waiting for the queue, loading weights can take
		// minutes: the startup probe allows 10, then liveness takes over); /readyz once the
		// worker takes requests, and not while NATS is disconnected or the worker drains.
		StartupProbe:             probe("/healthz", 5, 120),
		LivenessProbe:            probe("/healthz", 10, 3),
		ReadinessProbe:           probe("/readyz", 5, 2),
		SecurityContext:          restrictedContainerSecurity(),
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
	var inits []corev1.Container
	if u := lm.Spec.Model.Source.URL; u != nil {
		inits = append(inits, corev1.Container{
			Name:    "fetch-model",
			Image:   u.FetchImage,
			Command: []string{"sh", "-c", fetchScript},
			Env: []corev1.EnvVar{
				{Name: "MODEL_URL", Value: u.URL}, {Name: "MODEL_SHA256", Value: u.SHA256},
				{Name: "MODEL_DIR", Value: modelMount}, {Name: "HOME", Value: "/tmp"},
			},
			VolumeMounts:             []corev1.VolumeMount{{Name: modelVolume, MountPath: modelMount}, {Name: tmpVolume, MountPath: "/tmp"}},
			SecurityContext:          restrictedContainerSecurity(),
			TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
		})
	}

	return &appsv1.Deployment{
		TypeMeta:   metav1.TypeMeta{APIVersion: "apps/v1", Kind: "Deployment"},
		ObjectMeta: metav1.ObjectMeta{Name: workerName(lm), Namespace: lm.Namespace, Labels: objectLabels(lm)},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: selectorLabels(lm)},
			// Surge one pod and never take one down before its replacement is ready: a rollout
			// keeps the serving capacity (a GPU model needs one spare GPU for the surge pod).
			Strategy: appsv1.DeploymentStrategy{
				Type: appsv1.RollingUpdateDeploymentStrategyType,
				RollingUpdate: &appsv1.RollingUpdateDeployment{
					MaxUnavailable: ptr.To(intstr.FromInt32(0)),
					MaxSurge:       ptr.To(intstr.FromInt32(1)),
				},
			},
			RevisionHistoryLimit:    ptr.To[int32](3),
			ProgressDeadlineSeconds: ptr.To[int32](900),
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{
					Labels:      objectLabels(lm),
					Annotations: map[string]string{AnnotationSpecHash: hash},
				},
				Spec: corev1.PodSpec{
					SecurityContext: &corev1.PodSecurityContext{
						RunAsNonRoot:   ptr.To(true),
						RunAsUser:      ptr.To[int64](workerUID),
						RunAsGroup:     ptr.To[int64](workerUID),
						FSGroup:        ptr.To[int64](workerUID),
						SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
					},
					AutomountServiceAccountToken:  ptr.To(false),
					EnableServiceLinks:            ptr.To(false),
					TerminationGracePeriodSeconds: ptr.To(int64(terminationGrace / time.Second)),
					NodeSelector:                  rt.NodeSelector,
					Tolerations:                   rt.Tolerations,
					InitContainers:                inits,
					Containers:                    []corev1.Container{worker},
					Volumes:                       volumes,
				},
			},
		},
	}, nil
}

// registryEntry is the LoopModel's record for the gateway.
func registryEntry(lm *v1alpha1.LoopModel, th bus.Thresholds, ready bool) bus.ModelEntry {
	return bus.ModelEntry{
		Namespace:     lm.Namespace,
		Name:          lm.Name,
		Subject:       ref(lm).RequestSubject(),
		ContextLength: int(lm.Spec.Model.ContextLength),
		Thresholds:    th,
		MaxSteps:      int(lm.Spec.Loop.MaxSteps),
		Ready:         ready,
	}
}

// queueOptions sizes the work queue for the most workers the LoopModel may have, with the
// given JetStream replicas.
func queueOptions(lm *v1alpha1.LoopModel, replicas int) bus.QueueOptions {
	return bus.QueueOptions{MaxAckPending: workerBatch * int(max(lm.Spec.Scaling.MaxReplicas, 1)), Replicas: replicas}
}

// natsReplicas is spec.nats.replicas, or def (the operator's --nats-replicas) when unset, and
// at least 1. Workers do not depend on it: changing it updates the stream, never the pods.
func natsReplicas(lm *v1alpha1.LoopModel, def int) int {
	if n := lm.Spec.NATS.Replicas; n > 0 {
		return int(n)
	}
	return max(def, 1)
}

// DesiredDeployment is the worker Deployment the operator applies for lm, given the operator's
// default NATS URL and worker image (without owner reference). For tools and contract tests.
func DesiredDeployment(lm *v1alpha1.LoopModel, natsURL, workerImage string) (*appsv1.Deployment, error) {
	return desiredDeployment(lm, defaults{NATSURL: natsURL, Image: workerImage})
}
