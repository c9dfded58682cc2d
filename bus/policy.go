package bus

import "github.com/loopserve/loopserve/gatepolicy"

// The histograms cross into gatepolicy unchanged, so both must bin alike.
var _ [CumBins - gatepolicy.Bins]struct{}
var _ [gatepolicy.Bins - CumBins]struct{}

// Sample converts a snapshot into the policy's input for the default tier ("" until snapshots
// carry a tier). The slices are shared, not copied: the caller must not change the snapshot
// while the sample is in use.
func (s StatsSnapshot) Sample() gatepolicy.Sample {
	return gatepolicy.Sample{
		Worker:          s.Worker,
		Start:           s.Start,
		End:             s.End,
		ExitThreshold:   s.ExitThreshold,
		MaxSteps:        s.MaxSteps,
		Capacity:        s.Capacity,
		InFlight:        s.InFlight,
		Requests:        s.Requests,
		Tokens:          s.Tokens,
		LoopSteps:       s.LoopSteps,
		BusySeconds:     s.BusySeconds,
		TokenLatencyP95: s.TokenLatencyP95,
		TTFTP95:         s.TTFTP95,
		Cum:             s.Cum,
		Censored:        s.Censored,
		Probes:          s.Probes,
		ProbeCum:        s.ProbeCum,
		ProbeAgree:      s.ProbeAgree,
	}
}
