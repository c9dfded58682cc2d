package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// LoopModel serves one looped language model: the operator rolls out runtime workers for it,
// creates its JetStream work queue and registers it for the gateway.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:subresource:scale:specpath=.spec.scaling.replicas,statuspath=.status.replicas,selectorpath=.status.selector
// +kubebuilder:resource:shortName=lm;lms,categories=loopserve
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Replicas",type=integer,JSONPath=`.status.readyReplicas`
// +kubebuilder:printcolumn:name="Threshold",type=number,JSONPath=`.status.exitThreshold`
// +kubebuilder:printcolumn:name="Mean depth",type=number,JSONPath=`.status.observed.meanDepth`
// +kubebuilder:printcolumn:name="P95",type=string,JSONPath=`.status.observed.tokenLatencyP95`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:validation:XValidation:rule="self.metadata.name.size() <= 50 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",message="metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter) of at most 50 characters: it names the worker Deployment and Service"
type LoopModel struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// spec declares the model, its loop and SLO settings and how to run it.
	// +required
	Spec LoopModelSpec `json:"spec"`

	// status is written by the operator.
	// +optional
	Status LoopModelStatus `json:"status,omitempty"`
}

// LoopModelList is a list of LoopModels.
//
// +kubebuilder:object:root=true
type LoopModelList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []LoopModel `json:"items"`
}

// LoopModelSpec is the desired state of a LoopModel. Only exitThreshold and the tiers may
// change without restarting the workers: they are applied live over NATS.
//
// While tuning.mode stays auto the tuning loop owns the worker count, so scaling.replicas cannot
// change: writes through /scale (HPA, KEDA, kubectl scale) are refused instead of being fought.
// Changing the mode away from auto in the same write is allowed.
//
// +kubebuilder:validation:XValidation:rule="!(has(self.tuning) && has(self.tuning.mode) && self.tuning.mode == 'auto' && has(oldSelf.tuning) && has(oldSelf.tuning.mode) && oldSelf.tuning.mode == 'auto') || ((has(self.scaling) && has(self.scaling.replicas)) ? self.scaling.replicas : -1) == ((has(oldSelf.scaling) && has(oldSelf.scaling.replicas)) ? oldSelf.scaling.replicas : -1)",message="spec.scaling.replicas cannot change while spec.tuning.mode is auto: the tuning loop owns the worker count (status.recommendation.replicas); set spec.tuning.mode to advisory or off to scale through /scale (HPA, KEDA, kubectl scale)"
// +kubebuilder:validation:XValidation:rule="!has(self.tiers) || has(self.defaultTier)",message="defaultTier must be set when tiers are"
// +kubebuilder:validation:XValidation:rule="!has(self.defaultTier) || (has(self.tiers) && self.tiers.exists(t, t.name == self.defaultTier))",message="defaultTier must name one of spec.tiers"
// +kubebuilder:validation:XValidation:rule="!has(self.tiers) || self.tiers.all(t, !has(t.minExitThreshold) || t.minExitThreshold <= self.loop.exitThreshold)",message="a tier's minExitThreshold must be less than or equal to spec.loop.exitThreshold"
// +kubebuilder:validation:XValidation:rule="!has(self.tiers) || self.tiers.all(t, !has(t.minExitThreshold) || t.minExitThreshold >= (has(self.loop.minExitThreshold) ? self.loop.minExitThreshold : self.loop.exitThreshold))",message="a tier's minExitThreshold must be greater than or equal to spec.loop.minExitThreshold (spec.loop.exitThreshold when unset)"
// +kubebuilder:validation:XValidation:rule="!has(self.tiers) || self.tiers.all(t, !has(t.minDepth) || t.minDepth <= self.loop.maxSteps)",message="a tier's minDepth must be less than or equal to spec.loop.maxSteps"
type LoopModelSpec struct {
	// model says where the weights are.
	// +required
	Model ModelSpec `json:"model"`

	// loop sets the depth behaviour: loop steps, exit threshold and its floor, probes, KV policy.
	// +kubebuilder:default={}
	// +optional
	Loop LoopSpec `json:"loop,omitempty"`

	// slo is what the tuning loop aims for.
	// +optional
	SLO SLOSpec `json:"slo,omitempty"`

	// scaling bounds the number of workers.
	// +kubebuilder:default={}
	// +optional
	Scaling ScalingSpec `json:"scaling,omitempty"`

	// tuning controls the threshold and replica tuning loop.
	// +kubebuilder:default={}
	// +optional
	Tuning TuningSpec `json:"tuning,omitempty"`

	// tiers are the model's quality tiers, listed cheapest first: brownout lowers the first
	// tier's threshold down to its floor before it touches the second, and so on. A request
	// picks its tier by name (its "tier" field or the X-Loopserve-Tier header). A tier whose
	// minExitThreshold equals spec.loop.exitThreshold (gold) is never lowered. Unset, the model
	// has one implicit tier with spec.loop's floor.
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=16
	// +optional
	Tiers []Tier `json:"tiers,omitempty"`

	// defaultTier is the tier of requests that name none; required when tiers are set.
	// +kubebuilder:validation:MaxLength=63
	// +optional
	DefaultTier string `json:"defaultTier,omitempty"`

	// runtime sets the worker pods' image, resources and placement.
	// +optional
	Runtime RuntimeSpec `json:"runtime,omitempty"`

	// nats is the NATS server with JetStream that carries the requests; the operator's
	// --nats-url applies when it is empty.
	// +optional
	NATS NATSSpec `json:"nats,omitempty"`
}

// Tier is one quality tier of a LoopModel.
type Tier struct {
	// name identifies the tier in requests, status and metrics: a DNS label.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	// +required
	Name string `json:"name"`

	// minExitThreshold is the tier's floor: tuning never lowers its threshold below it. It lies
	// within [spec.loop.minExitThreshold, spec.loop.exitThreshold]; equal to exitThreshold the
	// tier is never lowered. Unset, spec.loop.minExitThreshold applies.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:ExclusiveMinimum=true
	// +kubebuilder:validation:Maximum=1
	// +optional
	MinExitThreshold *float64 `json:"minExitThreshold,omitempty"`

	// minDepth is the least predicted mean loop depth the tier keeps (e.g. for safety-sensitive
	// traffic): tuning does not lower its threshold below the one that gives this depth, except
	// briefly while new workers start.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=64
	// +optional
	MinDepth *float64 `json:"minDepth,omitempty"`
}

// ModelFormat is the on-disk layout of a model.
// +kubebuilder:validation:Enum=hf
type ModelFormat string

// FormatHF is a Hugging Face folder: config.json, *.safetensors, tokenizer.json.
const FormatHF ModelFormat = "hf"

// ModelSpec locates the model's weights.
type ModelSpec struct {
	// source is the volume that holds the model; exactly one of its members is set.
	// +required
	Source ModelSource `json:"source"`

	// path is the model folder inside the source, relative to its root ("" or "." for the root).
	// +kubebuilder:validation:MaxLength=1024
	// +kubebuilder:validation:XValidation:rule="!self.startsWith('/') && !self.contains('..')",message="path must be relative and must not contain '..'"
	// +optional
	Path string `json:"path,omitempty"`

	// format is the model's layout.
	// +kubebuilder:default=hf
	// +optional
	Format ModelFormat `json:"format,omitempty"`

	// contextLength is the longest prompt plus completion, in tokens, that the gateway accepts;
	// keep it at or below the model's max_position_embeddings.
	// +kubebuilder:default=2048
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=1048576
	// +optional
	ContextLength int32 `json:"contextLength,omitempty"`
}

// ModelSource is where a model's files come from. Exactly one member is set.
//
// +kubebuilder:validation:XValidation:rule="[has(self.pvc), has(self.hostPath), has(self.image), has(self.url)].filter(x, x).size() == 1",message="exactly one of pvc, hostPath, image or url must be set"
type ModelSource struct {
	// pvc mounts a PersistentVolumeClaim in the namespace of the LoopModel, read-only.
	// +optional
	PVC *PVCSource `json:"pvc,omitempty"`

	// hostPath mounts a directory of the node, read-only (single-node and test clusters).
	// +optional
	HostPath *HostPathSource `json:"hostPath,omitempty"`

	// image mounts an OCI image or artifact that contains the model (Kubernetes image volumes).
	// +optional
	Image *ImageSource `json:"image,omitempty"`

	// url downloads a .tar.gz of the model folder into an emptyDir before the worker starts.
	// +optional
	URL *URLSource `json:"url,omitempty"`
}

// PVCSource names a PersistentVolumeClaim.
type PVCSource struct {
	// claimName is the PersistentVolumeClaim's name.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +required
	ClaimName string `json:"claimName"`
}

// HostPathSource names a node directory.
type HostPathSource struct {
	// path is an absolute directory on the node.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=4096
	// +kubebuilder:validation:Pattern=`^/`
	// +required
	Path string `json:"path"`
}

// ImageSource names an OCI image or artifact mounted as a volume.
type ImageSource struct {
	// reference is the image reference, as in a container's image.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=1024
	// +required
	Reference string `json:"reference"`

	// pullPolicy is Always, Never or IfNotPresent (the kubelet's default when empty).
	// +kubebuilder:validation:Enum=Always;Never;IfNotPresent
	// +optional
	PullPolicy corev1.PullPolicy `json:"pullPolicy,omitempty"`
}

// URLSource downloads the model at pod start.
type URLSource struct {
	// url is an http(s) URL of a gzip-compressed tar of the model folder.
	// +kubebuilder:validation:MaxLength=2048
	// +kubebuilder:validation:Pattern=`^https?://`
	// +required
	URL string `json:"url"`

	// sha256 is the archive's SHA-256 (hex); when set, the download is checked before it is
	// unpacked and a mismatch fails the pod.
	// +kubebuilder:validation:Pattern=`^[0-9a-f]{64}$`
	// +optional
	SHA256 string `json:"sha256,omitempty"`

	// fetchImage runs the download (it needs sh, curl, tar and sha256sum).
	// +kubebuilder:default="curlimages/curl:8.11.1"
	// +kubebuilder:validation:MinLength=1
	// +optional
	FetchImage string `json:"fetchImage,omitempty"`
}

// KVPolicy is how the KV cache treats loop steps during decode.
// +kubebuilder:validation:Enum=full;last
type KVPolicy string

const (
	// KVFull keeps one KV cache per loop step and layer (exact; R times the memory).
	KVFull KVPolicy = "full"
	// KVLast keeps one KV cache per layer, written by each token's last executed step.
	KVLast KVPolicy = "last"
)

// LoopSpec sets how deep each token runs.
//
// +kubebuilder:validation:XValidation:rule="!has(self.minExitThreshold) || !has(self.exitThreshold) || self.minExitThreshold <= self.exitThreshold",message="minExitThreshold must be less than or equal to exitThreshold"
type LoopSpec struct {
	// maxSteps caps the loop steps per token (the model's total_ut_steps, 4 for Ouro);
	// running more steps than the model was trained with hurts quality.
	// +kubebuilder:default=4
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=64
	// +optional
	MaxSteps int32 `json:"maxSteps,omitempty"`

	// exitThreshold is the Q-exit threshold τ: a token stops at the first step whose cumulative
	// exit probability reaches it. 1 runs every step. Changing it does not restart workers.
	// +kubebuilder:default=0.9
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:ExclusiveMinimum=true
	// +kubebuilder:validation:Maximum=1
	// +optional
	ExitThreshold float64 `json:"exitThreshold,omitempty"`

	// minExitThreshold is the quality floor: tuning never lowers the threshold below it.
	// Unset, the threshold is not lowered below exitThreshold.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:ExclusiveMinimum=true
	// +kubebuilder:validation:Maximum=1
	// +optional
	MinExitThreshold *float64 `json:"minExitThreshold,omitempty"`

	// probeFraction is the share of tokens that run every step to keep the depth statistics
	// unbiased and measure agreement with full depth.
	// +kubebuilder:default=0.02
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=0.5
	// +optional
	ProbeFraction *float64 `json:"probeFraction,omitempty"`

	// kvPolicy is full (per-step KV caches) or last (one per layer: R times less memory).
	// +kubebuilder:default=full
	// +optional
	KVPolicy KVPolicy `json:"kvPolicy,omitempty"`
}

// SLOSpec is what the tuning loop aims for; unset members are not constrained.
type SLOSpec struct {
	// tokenLatencyP95 is the 95th percentile inter-token latency to stay under, e.g. "50ms".
	// +optional
	TokenLatencyP95 *metav1.Duration `json:"tokenLatencyP95,omitempty"`

	// maxMeanDepth bounds the mean loop steps per token.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=64
	// +optional
	MaxMeanDepth *float64 `json:"maxMeanDepth,omitempty"`

	// minAgreement is the lowest acceptable share of probe tokens whose exit-step choice equals
	// the full-depth choice.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1
	// +optional
	MinAgreement *float64 `json:"minAgreement,omitempty"`
}

// ScalingSpec bounds the workers.
//
// +kubebuilder:validation:XValidation:rule="!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",message="minReplicas must be less than or equal to maxReplicas"
// +kubebuilder:validation:XValidation:rule="!has(self.scaleUpDelay) || duration(self.scaleUpDelay) >= duration('0s')",message="scaleUpDelay must not be negative"
type ScalingSpec struct {
	// replicas is the desired number of workers, clamped to [minReplicas, maxReplicas]; the
	// /scale subresource writes it (HPA, KEDA, kubectl scale). In auto tuning mode the tuning
	// loop sets the workers instead, and changes of replicas are refused.
	// +kubebuilder:default=1
	// +kubebuilder:validation:Minimum=0
	// +optional
	Replicas *int32 `json:"replicas,omitempty"`

	// minReplicas is the fewest workers.
	// +kubebuilder:default=1
	// +kubebuilder:validation:Minimum=1
	// +optional
	MinReplicas int32 `json:"minReplicas,omitempty"`

	// maxReplicas is the most workers.
	// +kubebuilder:default=1
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=1000
	// +optional
	MaxReplicas int32 `json:"maxReplicas,omitempty"`

	// targetLoopStepsPerReplica is the loop-step rate one worker should carry; unset, it is
	// learned from the workers' stats.
	// +kubebuilder:validation:Minimum=1
	// +optional
	TargetLoopStepsPerReplica *int64 `json:"targetLoopStepsPerReplica,omitempty"`

	// scaleDownDelay is how long demand must stay low before removing a worker.
	// +kubebuilder:default="5m"
	// +optional
	ScaleDownDelay *metav1.Duration `json:"scaleDownDelay,omitempty"`

	// scaleUpDelay is how long the part of a scale-up that a brownout within the quality
	// floors (minAgreement's bound, a tier's minDepth) can absorb waits: a surge shorter than
	// it is served by a lower exit threshold on the workers there are, and workers are added
	// only for the demand that lasts the whole delay. Demand the quality floors cannot absorb
	// is scaled for at once. Unset or 0: every scale-up at once.
	// +optional
	ScaleUpDelay *metav1.Duration `json:"scaleUpDelay,omitempty"`
}

// TuningMode says whether the tuning loop applies its decisions.
// +kubebuilder:validation:Enum=auto;advisory;off
type TuningMode string

const (
	// TuningAuto applies the tuned threshold.
	TuningAuto TuningMode = "auto"
	// TuningAdvisory reports decisions in status without applying them.
	TuningAdvisory TuningMode = "advisory"
	// TuningOff keeps spec.loop.exitThreshold and spec.scaling.replicas: the default.
	TuningOff TuningMode = "off"
)

// TuningSpec controls the tuning loop.
type TuningSpec struct {
	// mode is auto, advisory or off. off (the default) keeps spec.loop.exitThreshold and lets
	// spec.scaling.replicas (and /scale: HPA, KEDA) drive the workers; advisory runs the tuning
	// loop every interval and reports its decision in status.recommendation only; auto also
	// applies it: the tuned threshold (status.exitThreshold) within [minExitThreshold,
	// exitThreshold] and the replicas (status.recommendation.replicas) within [minReplicas,
	// maxReplicas], refusing changes of scaling.replicas meanwhile. status.observed is reported
	// in every mode.
	// +kubebuilder:default=off
	// +optional
	Mode TuningMode `json:"mode,omitempty"`

	// interval is the time between tuning decisions.
	// +kubebuilder:default="30s"
	// +optional
	Interval *metav1.Duration `json:"interval,omitempty"`

	// maxStep bounds one decision's change of the threshold.
	// +kubebuilder:default=0.05
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:ExclusiveMinimum=true
	// +kubebuilder:validation:Maximum=0.5
	// +optional
	MaxStep *float64 `json:"maxStep,omitempty"`
}

// RuntimeSpec shapes the worker pods.
type RuntimeSpec struct {
	// image is the loopserve image; the operator's --worker-image applies when it is empty.
	// +kubebuilder:validation:MaxLength=1024
	// +optional
	Image string `json:"image,omitempty"`

	// imagePullPolicy is the worker container's pull policy.
	// +kubebuilder:validation:Enum=Always;Never;IfNotPresent
	// +optional
	ImagePullPolicy corev1.PullPolicy `json:"imagePullPolicy,omitempty"`

	// resources of the worker container, e.g. limits {nvidia.com/gpu: 1}.
	// +optional
	Resources corev1.ResourceRequirements `json:"resources,omitempty"`

	// nodeSelector constrains the worker pods to matching nodes.
	// +optional
	NodeSelector map[string]string `json:"nodeSelector,omitempty"`

	// tolerations of the worker pods.
	// +listType=atomic
	// +optional
	Tolerations []corev1.Toleration `json:"tolerations,omitempty"`

	// env adds environment variables to the worker container.
	// +listType=map
	// +listMapKey=name
	// +optional
	Env []corev1.EnvVar `json:"env,omitempty"`
}

// NATSSpec locates the NATS server.
type NATSSpec struct {
	// url is the NATS server URL (several comma-separated URLs for a cluster).
	// +kubebuilder:validation:MaxLength=2048
	// +kubebuilder:validation:Pattern=`^(nats|tls|ws|wss)://\S+$`
	// +optional
	URL string `json:"url,omitempty"`

	// credentialsSecret holds a NATS .creds file (user JWT and NKey seed) used by the operator
	// and mounted into the workers.
	// +optional
	CredentialsSecret *SecretKey `json:"credentialsSecret,omitempty"`

	// replicas is the JetStream replication of the LoopModel's work-queue stream and of the
	// registry buckets: 1 for a single NATS server, 3 (or 5) for a cluster, so the queue survives
	// the loss of a node (of two with 5). Unset, the operator's --nats-replicas applies (1 unless
	// the chart's nats.replicas says otherwise). The registry buckets, shared by every LoopModel
	// on the server, keep the largest replicas any LoopModel asked for.
	// +kubebuilder:validation:Enum=1;3;5
	// +optional
	Replicas int32 `json:"replicas,omitempty"`
}

// SecretKey selects a key of a Secret in the LoopModel's namespace.
type SecretKey struct {
	// name of the Secret.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +required
	Name string `json:"name"`

	// key in the Secret's data.
	// +kubebuilder:default="nats.creds"
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^[-._a-zA-Z0-9]+$`
	// +optional
	Key string `json:"key,omitempty"`
}

// LoopModelStatus is the observed state of a LoopModel.
type LoopModelStatus struct {
	// observedGeneration is the spec generation the operator last reconciled fully.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// conditions: Ready, Progressing, Degraded and SLOMet.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`

	// replicas is the number of worker pods (from the Deployment).
	// +optional
	Replicas int32 `json:"replicas,omitempty"`

	// readyReplicas is the number of ready worker pods.
	// +optional
	ReadyReplicas int32 `json:"readyReplicas,omitempty"`

	// selector is the worker pods' label selector, for the /scale subresource.
	// +optional
	Selector string `json:"selector,omitempty"`

	// natsURL is the NATS server that holds the work queue and registry entry; when the
	// effective URL changes, the operator moves them and deletes the old ones.
	// +optional
	NATSURL string `json:"natsURL,omitempty"`

	// exitThreshold is the threshold in force, published to the workers (the default tier's
	// when spec.tiers is set).
	// +optional
	ExitThreshold float64 `json:"exitThreshold,omitempty"`

	// tiers is the threshold in force per quality tier (empty without spec.tiers).
	// +listType=map
	// +listMapKey=name
	// +optional
	Tiers []TierStatus `json:"tiers,omitempty"`

	// observed holds the depth and latency statistics the workers report.
	// +optional
	Observed *ObservedStats `json:"observed,omitempty"`

	// lastTuneTime is when the tuning loop last decided.
	// +optional
	LastTuneTime *metav1.Time `json:"lastTuneTime,omitempty"`

	// recommendation is the tuning loop's last decision, filled in auto and advisory modes
	// (in advisory mode it is the only output).
	// +optional
	Recommendation *Recommendation `json:"recommendation,omitempty"`
}

// TierStatus is one quality tier's threshold.
type TierStatus struct {
	// name of the tier.
	// +required
	Name string `json:"name"`

	// exitThreshold is the tier's threshold.
	// +required
	ExitThreshold float64 `json:"exitThreshold"`
}

// Recommendation is one decision of the tuning loop.
type Recommendation struct {
	// exitThreshold is the threshold the loop chose (the default tier's when spec.tiers is set).
	// +optional
	ExitThreshold float64 `json:"exitThreshold,omitempty"`

	// tiers is the threshold the loop chose per quality tier (empty without spec.tiers).
	// +listType=map
	// +listMapKey=name
	// +optional
	Tiers []TierStatus `json:"tiers,omitempty"`

	// replicas is the number of workers the loop would run.
	// +optional
	Replicas int32 `json:"replicas,omitempty"`

	// predictedMeanDepth is the mean loop steps per token predicted at exitThreshold.
	// +optional
	PredictedMeanDepth float64 `json:"predictedMeanDepth,omitempty"`

	// predictedTokenLatencyP95 is the inter-token latency predicted at exitThreshold.
	// +optional
	PredictedTokenLatencyP95 *metav1.Duration `json:"predictedTokenLatencyP95,omitempty"`

	// sloReachable is false when the SLO cannot be met even at the floor.
	// +optional
	SLOReachable bool `json:"sloReachable,omitempty"`

	// reasons explain the decision, one line each ("ThresholdLowered: ...").
	// +listType=atomic
	// +optional
	Reasons []string `json:"reasons,omitempty"`
}

// ObservedStats are aggregated from the workers' stats snapshots taken under the thresholds in
// force: the default tier's figures (all traffic without spec.tiers), and each tier's.
type ObservedStats struct {
	ObservedFigures `json:",inline"`

	// tiers holds the figures of each quality tier that generated tokens, by name (empty
	// without spec.tiers).
	// +listType=map
	// +listMapKey=name
	// +optional
	Tiers []TierObserved `json:"tiers,omitempty"`
}

// TierObserved is one quality tier's observed figures.
type TierObserved struct {
	// name of the tier.
	// +required
	Name string `json:"name"`

	ObservedFigures `json:",inline"`
}

// ObservedFigures are the figures observed over the stats window.
type ObservedFigures struct {
	// meanDepth is the mean loop steps per generated token.
	// +optional
	MeanDepth float64 `json:"meanDepth,omitempty"`

	// tokenLatencyP95 is the 95th percentile inter-token latency.
	// +optional
	TokenLatencyP95 *metav1.Duration `json:"tokenLatencyP95,omitempty"`

	// loopStepsPerSecond is the loop-step rate of all workers together.
	// +optional
	LoopStepsPerSecond float64 `json:"loopStepsPerSecond,omitempty"`

	// agreement is the share of probe tokens whose exit-step choice equals the full-depth one.
	// +optional
	Agreement float64 `json:"agreement,omitempty"`
}
