package gatepolicy

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"time"
)

// ErrInvalidSpec reports a Spec the Tuner cannot honour.
var ErrInvalidSpec = errors.New("invalid tuning spec")

// Tier is one quality tier: requests choose it by name; its τ lies in [Floor, Spec.Ceiling].
// A tier whose Floor equals the ceiling (gold) is never lowered. Every lowering of τ (capacity
// brownout, a queue, a measured latency miss) takes tiers in ascending BrownoutOrder (ties: by
// name), each down to its floor before the next moves; raising goes in the reverse order.
type Tier struct {
	Name          string
	Floor         float64 // lowest τ of the tier; 0 means Spec.Floor
	MinDepth      float64 // minimum predicted mean depth (loop steps); 0 means none
	BrownoutOrder int
}

// Spec is what the Tuner honours, taken from the LoopModel (zero values mean "unset" where the
// doc says so; WithDefaults fills them).
type Spec struct {
	Ceiling  float64 // spec.loop.exitThreshold: the best-quality τ, never exceeded
	Floor    float64 // spec.loop.minExitThreshold: never lowered below; 0 means Ceiling
	MaxSteps int     // spec.loop.maxSteps (R)

	MaxStep    float64 // spec.tuning.maxStep: largest τ change of one decision (default 0.05)
	Hysteresis float64 // τ is raised only when the target exceeds it by this much (default 0.02)

	MinReplicas, MaxReplicas int
	ScaleDownDelay           time.Duration // demand must stay low this long before a scale-down
	// ScaleUpDelay is how long the part of a scale-up that brownout can absorb within the
	// quality floors (minAgreement's bound, minDepth) waits: a surge shorter than it is
	// served by a lower τ alone, and replicas come only for the demand that persists (the
	// lowest target of the delay). Demand the quality floors cannot absorb on the current
	// replicas is scaled for at once. 0: every scale-up at once.
	ScaleUpDelay time.Duration
	// TargetUtilisation is the share of a replica's loop-step capacity it should carry (default 0.7).
	TargetUtilisation float64
	// TargetLoopStepsPerReplica (loop steps/s) replaces capacity × TargetUtilisation when set.
	TargetLoopStepsPerReplica float64

	TokenLatencyP95 time.Duration // SLO on inter-token latency p95; 0 means none
	TTFTP95         time.Duration // SLO on time to first token p95; 0 means none (reported only)
	MaxMeanDepth    float64       // 0 means none
	MinAgreement    float64       // held on the lower confidence bound; 0 means none
	Confidence      float64       // of that bound (default 0.95)

	Tiers       []Tier // empty: one tier named DefaultTier with the spec's floor
	DefaultTier string
}

// WithDefaults returns the spec with unset members filled.
func (s Spec) WithDefaults() Spec {
	if s.Floor == 0 {
		s.Floor = s.Ceiling
	}
	if s.MaxStep == 0 {
		s.MaxStep = 0.05
	}
	if s.Hysteresis == 0 {
		s.Hysteresis = 0.02
	}
	if s.MinReplicas == 0 {
		s.MinReplicas = 1
	}
	if s.MaxReplicas == 0 {
		s.MaxReplicas = s.MinReplicas
	}
	if s.TargetUtilisation == 0 {
		s.TargetUtilisation = 0.7
	}
	if s.Confidence == 0 {
		s.Confidence = 0.95
	}
	if len(s.Tiers) == 0 {
		s.Tiers = []Tier{{Name: s.DefaultTier}}
	}
	s.Tiers = slices.Clone(s.Tiers)
	for i := range s.Tiers {
		if s.Tiers[i].Floor == 0 {
			s.Tiers[i].Floor = s.Floor
		}
	}
	slices.SortStableFunc(s.Tiers, func(a, b Tier) int {
		if a.BrownoutOrder != b.BrownoutOrder {
			return a.BrownoutOrder - b.BrownoutOrder
		}
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	return s
}

// Validate checks a spec after WithDefaults.
func (s Spec) Validate() error {
	in01 := func(x float64) bool { return x > 0 && x <= 1 }
	switch {
	case !in01(s.Ceiling):
		return fmt.Errorf("%w: exitThreshold %v outside (0, 1]", ErrInvalidSpec, s.Ceiling)
	case !in01(s.Floor) || s.Floor > s.Ceiling:
		return fmt.Errorf("%w: minExitThreshold %v outside (0, exitThreshold %v]", ErrInvalidSpec, s.Floor, s.Ceiling)
	case s.MaxSteps < 1 || s.MaxSteps > 64:
		return fmt.Errorf("%w: maxSteps %d outside [1, 64]", ErrInvalidSpec, s.MaxSteps)
	case !(s.MaxStep > 0 && s.MaxStep <= 1) || !(s.Hysteresis >= 0 && s.Hysteresis < 1):
		return fmt.Errorf("%w: maxStep %v or hysteresis %v out of range", ErrInvalidSpec, s.MaxStep, s.Hysteresis)
	case s.MinReplicas < 1 || s.MaxReplicas < s.MinReplicas:
		return fmt.Errorf("%w: replicas [%d, %d]", ErrInvalidSpec, s.MinReplicas, s.MaxReplicas)
	case !(s.TargetUtilisation > 0 && s.TargetUtilisation < 1):
		return fmt.Errorf("%w: target utilisation %v outside (0, 1)", ErrInvalidSpec, s.TargetUtilisation)
	case s.TargetLoopStepsPerReplica < 0 || math.IsNaN(s.TargetLoopStepsPerReplica) || math.IsInf(s.TargetLoopStepsPerReplica, 0):
		return fmt.Errorf("%w: targetLoopStepsPerReplica %v", ErrInvalidSpec, s.TargetLoopStepsPerReplica)
	case s.TokenLatencyP95 < 0 || s.TTFTP95 < 0 || s.ScaleDownDelay < 0 || s.ScaleUpDelay < 0:
		return fmt.Errorf("%w: negative duration", ErrInvalidSpec)
	case s.MaxMeanDepth != 0 && !(s.MaxMeanDepth >= 1):
		return fmt.Errorf("%w: maxMeanDepth %v below 1", ErrInvalidSpec, s.MaxMeanDepth)
	case !(s.MinAgreement >= 0 && s.MinAgreement <= 1) || !(s.Confidence > 0 && s.Confidence < 1):
		return fmt.Errorf("%w: minAgreement %v or confidence %v out of range", ErrInvalidSpec, s.MinAgreement, s.Confidence)
	}
	seen := map[string]bool{}
	for _, t := range s.Tiers {
		if seen[t.Name] {
			return fmt.Errorf("%w: tier %q twice", ErrInvalidSpec, t.Name)
		}
		seen[t.Name] = true
		if !in01(t.Floor) || t.Floor > s.Ceiling || t.Floor < s.Floor {
			return fmt.Errorf("%w: tier %q floor %v outside [%v, %v]", ErrInvalidSpec, t.Name, t.Floor, s.Floor, s.Ceiling)
		}
		if t.MinDepth < 0 || t.MinDepth > float64(s.MaxSteps) {
			return fmt.Errorf("%w: tier %q minDepth %v outside [0, %d]", ErrInvalidSpec, t.Name, t.MinDepth, s.MaxSteps)
		}
	}
	if !seen[s.DefaultTier] {
		return fmt.Errorf("%w: default tier %q is not a tier", ErrInvalidSpec, s.DefaultTier)
	}
	return nil
}
