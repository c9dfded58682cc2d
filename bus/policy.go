package bus

import "github.com/loopserve/loopserve/gatepolicy"

// The histograms cross into gatepolicy unchanged, so both must bin alike.
var _ [CumBins - gatepolicy.Bins]struct{}
var _ [gatepolicy.Bins - CumBins]struct{}

// Samples converts a snapshot into the policy's input: one sample per tier, the default
// tier's first, each under its tier's threshold. The worker's Capacity and InFlight go into
// every tier's sample (a full batch queues requests of every tier), BusySeconds into the
// default tier's only. The slices are shared, not copied: the caller must not change the
// snapshot while the samples are in use.
func (s StatsSnapshot) Samples() []gatepolicy.Sample {
	out := make([]gatepolicy.Sample, 0, 1+len(s.Tiers))
	for i, ts := range s.All() {
		p := gatepolicy.Sample{
			Worker:          s.Worker,
			Tier:            ts.Tier,
			Start:           s.Start,
			End:             s.End,
			ExitThreshold:   ts.ExitThreshold,
			MaxSteps:        s.MaxSteps,
			Capacity:        s.Capacity,
			InFlight:        s.InFlight,
			Requests:        ts.Requests,
			Tokens:          ts.Tokens,
			LoopSteps:       ts.LoopSteps,
			TokenLatencyP95: ts.TokenLatencyP95,
			TTFTP95:         ts.TTFTP95,
			Cum:             ts.Cum,
			Censored:        ts.Censored,
			Probes:          ts.Probes,
			ProbeCum:        ts.ProbeCum,
			ProbeAgree:      ts.ProbeAgree,
		}
		if i == 0 {
			p.BusySeconds = s.BusySeconds
		}
		out = append(out, p)
	}
	return out
}
