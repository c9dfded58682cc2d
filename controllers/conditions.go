package controllers

// Condition types of a LoopModel's status.
const (
	// CondReady is True when enough workers are ready for the spec in force and the work queue
	// and registry entry exist on NATS: the gateway may route requests to the model.
	CondReady = "Ready"
	// CondProgressing is True while the worker Deployment rolls out or scales.
	CondProgressing = "Progressing"
	// CondDegraded is True when something needs attention; its reason says what.
	CondDegraded = "Degraded"
	// CondSLOMet compares status.observed with spec.slo; absent when the spec sets no SLO.
	CondSLOMet = "SLOMet"
)

// Condition reasons. Degraded reasons double as Warning event reasons.
const (
	ReasonAvailable       = "Available"       // Ready: workers ready and queue in place
	ReasonPodsNotReady    = "PodsNotReady"    // not Ready: fewer ready workers than desired
	ReasonRollingOut      = "RollingOut"      // Progressing: new pods are being rolled out
	ReasonRolloutDone     = "RolloutComplete" // Progressing False: every pod runs the current spec
	ReasonAsExpected      = "AsExpected"      // Degraded False
	ReasonNATSUnreachable = "NATSUnreachable" // the NATS server could not be reached
	ReasonNATSError       = "NATSError"       // NATS answered but refused the queue or registry write
	ReasonInvalidSpec     = "InvalidSpec"     // the spec cannot be turned into valid objects
	ReasonModelInvalid    = "ModelInvalid"    // the model source cannot be used (e.g. missing PVC)
	ReasonCrashLooping    = "PodsCrashLooping"
	ReasonImagePull       = "ImagePullFailed"
	ReasonRolloutStalled  = "RolloutStalled" // the Deployment exceeded its progress deadline
	ReasonNoStats         = "NoStats"        // SLOMet Unknown: no worker has reported tokens yet
	ReasonWithinSLO       = "WithinSLO"
	ReasonLatencyHigh     = "LatencyAboveSLO"
	ReasonDepthHigh       = "DepthAboveSLO"
	ReasonAgreementLow    = "AgreementBelowSLO"
	// ReasonSLOUnreachable (SLOMet False): the tuning loop cannot meet the SLO even at the floor
	// threshold with maxReplicas; the workers keep running at the floor.
	ReasonSLOUnreachable = "SLOUnreachable"
)

// Event reasons (past tense) for things that happened, besides the Degraded reasons above.
const (
	EventCreated            = "Created"
	EventUpdated            = "Updated"
	EventRolledOut          = "RolledOut"
	EventThresholdPublished = "ThresholdPublished"
	EventQueueDeleted       = "QueueDeleted"
	EventThresholdLowered   = "ThresholdLowered" // the tuning loop lowered the threshold in force
	EventThresholdRaised    = "ThresholdRaised"  // the tuning loop raised it back towards the spec's
	EventScaledUp           = "ScaledUp"         // the tuning loop (auto mode) added workers
	EventScaledDown         = "ScaledDown"       // the tuning loop removed workers after scaleDownDelay
	// EventCleanupAbandoned (Warning) says a deleted LoopModel's stream and registry entry were
	// left on NATS: its credentials Secret was gone, or NATS stayed unreachable for the
	// finalizer timeout. Deletion (and its namespace's) goes on.
	EventCleanupAbandoned = "NATSCleanupAbandoned"
)

// Finalizer holds a LoopModel until its JetStream stream and registry entry are deleted.
const Finalizer = "loopserve.io/nats-cleanup"

// AnnotationSkipNATSCleanup on a LoopModel lets its deletion proceed without reaching NATS
// (for a NATS server that is gone for good).
const AnnotationSkipNATSCleanup = "loopserve.io/skip-nats-cleanup"

// AnnotationSpecHash on the worker pod template is a hash of the settings that need a restart;
// the exit threshold is not among them, so changing it does not roll the pods.
const AnnotationSpecHash = "loopserve.io/spec-hash"
