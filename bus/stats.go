package bus

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"time"
)

// CumBins is the number of equal-width bins over [0, 1] in which workers count the cumulative
// exit probability c_t of each loop step. Bin i holds c in [i/CumBins, (i+1)/CumBins); c = 1
// falls in the last bin. A threshold on a bin edge is predicted exactly.
const CumBins = 100

// ErrInvalidStats reports a stats snapshot whose arrays do not match its MaxSteps.
var ErrInvalidStats = errors.New("invalid stats snapshot")

// CancelSubject is where the gateway announces that a client went away, so the worker running
// the request stops generating for nobody: loopserve.cancel.<ns>.<name>, body = request id.
func (r Ref) CancelSubject() string { return "loopserve.cancel." + r.Key() }

// Control is the message on a LoopModel's control subject (and the content of the threshold
// file the operator mounts from a ConfigMap): the exit thresholds workers apply at once, one
// per quality tier, and the default tier's alone in exitThreshold for workers that know no
// tiers: {"exitThreshold": 0.9, "defaultTier": "standard", "tiers": {"gold": 0.9, ...}}.
type Control struct {
	Thresholds
}

// DecodeControl parses a control message and checks it (Thresholds.Validate): every τ in
// (0, 1], the default tier among the tiers.
func DecodeControl(b []byte) (Control, error) {
	var c Control
	if err := json.Unmarshal(b, &c); err != nil {
		return Control{}, fmt.Errorf("decoding control message: %w", err)
	}
	if err := c.Validate(); err != nil {
		return Control{}, fmt.Errorf("decoding control message: %w", err)
	}
	return c, nil
}

// StatsSnapshot is what one worker observed during one window [Start, End): published on the
// LoopModel's stats subject every few seconds. Counts cover the window only (they reset after
// each snapshot), and a threshold change of any tier closes the window early, so every count of
// a tier was observed under the single ExitThreshold its TierStats reports. The operator sums
// the snapshots of all workers.
//
// The embedded TierStats is the default tier's window (Tier names it; "" for a model without
// tiers), so a reader that knows no tiers sees the default tier as before; Tiers holds the other
// tiers that saw traffic in the window, by name. Capacity, InFlight and BusySeconds are the
// worker's, whatever the tier.
type StatsSnapshot struct {
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	Worker    string    `json:"worker"` // pod or host name, unique per worker process
	Start     time.Time `json:"start"`
	End       time.Time `json:"end"`
	MaxSteps  int       `json:"maxSteps"` // R
	Capacity  int       `json:"capacity"` // requests the worker batches at once
	InFlight  int       `json:"inFlight"` // requests running at End, all tiers

	BusySeconds float64 `json:"busySeconds"` // time with at least one request running

	TierStats
	Tiers []TierStats `json:"tiers,omitempty"` // the other tiers with traffic, sorted by name
}

// TierStats is one quality tier's part of a stats snapshot, all under the tier's ExitThreshold.
//
// Depth statistics (DESIGN §4): Cum[t] counts the c_t of tokens that executed step t+1; tokens
// that exited before it are only counted in Censored[t] (their c_t is at least the threshold in
// force, so the depth under any lower threshold is still exact). ProbeCum holds the same for
// probe tokens only, which ran all MaxSteps steps and give the unbiased distribution needed to
// predict a higher threshold. ProbeAgree[t] counts probes whose argmax after step t+1 equals the
// full-depth argmax. Tokens of requests that set their own exit_threshold, max_depth or
// deadline count in the load (Tokens, LoopSteps) and as probes, not in DepthCounts, Cum or
// Censored.
type TierStats struct {
	Tier          string  `json:"tier,omitempty"`
	ExitThreshold float64 `json:"exitThreshold"` // the tier's threshold in force during the window

	Requests  int64 `json:"requests"`  // requests finished in the window
	Tokens    int64 `json:"tokens"`    // tokens generated
	LoopSteps int64 `json:"loopSteps"` // decoder-stack passes executed for generated tokens

	// Latency quantiles over the window in seconds (0 when nothing was measured).
	TokenLatencyP50 float64 `json:"tokenLatencyP50"` // inter-token latency
	TokenLatencyP95 float64 `json:"tokenLatencyP95"`
	TTFTP95         float64 `json:"ttftP95"`
	QueueWaitP95    float64 `json:"queueWaitP95"`

	DepthCounts []int64   `json:"depthCounts"` // [MaxSteps] tokens whose output came from step d+1
	Cum         [][]int64 `json:"cum"`         // [MaxSteps][CumBins]
	Censored    []int64   `json:"censored"`    // [MaxSteps]
	Probes      int64     `json:"probes"`
	ProbeCum    [][]int64 `json:"probeCum"`   // [MaxSteps][CumBins]
	ProbeAgree  []int64   `json:"probeAgree"` // [MaxSteps]
}

// NewStatsSnapshot returns an empty snapshot with the default tier's arrays sized for maxSteps
// loop steps.
func NewStatsSnapshot(r Ref, worker string, maxSteps int) StatsSnapshot {
	return StatsSnapshot{
		Namespace: r.Namespace,
		Name:      r.Name,
		Worker:    worker,
		MaxSteps:  maxSteps,
		TierStats: NewTierStats("", maxSteps),
	}
}

// NewTierStats returns an empty tier window with its arrays sized for maxSteps loop steps.
func NewTierStats(tier string, maxSteps int) TierStats {
	s := TierStats{
		Tier:        tier,
		DepthCounts: make([]int64, maxSteps),
		Cum:         make([][]int64, maxSteps),
		Censored:    make([]int64, maxSteps),
		ProbeCum:    make([][]int64, maxSteps),
		ProbeAgree:  make([]int64, maxSteps),
	}
	for t := range maxSteps {
		s.Cum[t] = make([]int64, CumBins)
		s.ProbeCum[t] = make([]int64, CumBins)
	}
	return s
}

// All returns the default tier's window followed by the other tiers'.
func (s StatsSnapshot) All() []TierStats { return append([]TierStats{s.TierStats}, s.Tiers...) }

// Ref returns the snapshot's LoopModel reference.
func (s StatsSnapshot) Ref() Ref { return Ref{Namespace: s.Namespace, Name: s.Name} }

// CumBin returns the bin of a cumulative exit probability, clamping to [0, 1].
func CumBin(c float64) int {
	if !(c > 0) { // also NaN
		return 0
	}
	i := int(c * CumBins)
	return min(i, CumBins-1)
}

// Validate checks that every tier's arrays match MaxSteps and CumBins, so consumers can index
// freely, and that each tier appears once under a valid name.
func (s StatsSnapshot) Validate() error {
	if err := s.Ref().Validate(); err != nil {
		return err
	}
	if s.MaxSteps <= 0 || s.MaxSteps > 64 {
		return fmt.Errorf("%w: maxSteps %d", ErrInvalidStats, s.MaxSteps)
	}
	seen := map[string]bool{}
	for _, ts := range s.All() {
		if seen[ts.Tier] || (ts.Tier != "" && !ValidTierName(ts.Tier)) {
			return fmt.Errorf("%w: tier %q repeated or not a DNS label", ErrInvalidStats, ts.Tier)
		}
		seen[ts.Tier] = true
		for name, n := range map[string]int{"depthCounts": len(ts.DepthCounts), "cum": len(ts.Cum), "censored": len(ts.Censored), "probeCum": len(ts.ProbeCum), "probeAgree": len(ts.ProbeAgree)} {
			if n != s.MaxSteps {
				return fmt.Errorf("%w: tier %q: %s has %d entries, want %d", ErrInvalidStats, ts.Tier, name, n, s.MaxSteps)
			}
		}
		for t := range s.MaxSteps {
			if len(ts.Cum[t]) != CumBins || len(ts.ProbeCum[t]) != CumBins {
				return fmt.Errorf("%w: tier %q: step %d histograms need %d bins", ErrInvalidStats, ts.Tier, t+1, CumBins)
			}
		}
	}
	return nil
}

// DecodeStats parses and validates a snapshot.
func DecodeStats(b []byte) (StatsSnapshot, error) {
	var s StatsSnapshot
	if err := json.Unmarshal(b, &s); err != nil {
		return StatsSnapshot{}, fmt.Errorf("decoding stats snapshot: %w", err)
	}
	if err := s.Validate(); err != nil {
		return StatsSnapshot{}, err
	}
	return s, nil
}

// MeanDepth is the mean loop depth of the window's tokens (0 when none).
func (s TierStats) MeanDepth() float64 {
	var n, sum int64
	for d, c := range s.DepthCounts {
		n += c
		sum += int64(d+1) * c
	}
	if n == 0 {
		return 0
	}
	return float64(sum) / float64(n)
}

// PredictDepth estimates the mean depth under threshold tau as 1 + Σ_{t<R} P(c_t < tau)
// (DESIGN §4). For tau at or below the threshold in force it uses every token (censored tokens
// count as c_t ≥ tau); above it only the probes are unbiased, so it uses them. It returns NaN
// when the window holds no usable token. Thresholds are compared on bin edges: tau is rounded
// down to a multiple of 1/CumBins.
func (s TierStats) PredictDepth(tau float64) float64 {
	useProbes := tau > s.ExitThreshold+1e-12
	cut := CumBin(tau) // bins below cut hold c < tau
	if tau >= 1 {
		cut = CumBins
	}
	depth := 1.0
	for t := 0; t < len(s.Cum)-1; t++ {
		var below, total int64
		if useProbes {
			for i, c := range s.ProbeCum[t] {
				total += c
				if i < cut {
					below += c
				}
			}
		} else {
			total = s.Censored[t]
			for i, c := range s.Cum[t] {
				total += c
				if i < cut {
					below += c
				}
			}
		}
		if total == 0 {
			return math.NaN()
		}
		depth += float64(below) / float64(total)
	}
	return depth
}

// Agreement is the fraction of probes whose token at depth d (1..MaxSteps) equals the full-depth
// token; NaN without probes.
func (s TierStats) Agreement(d int) float64 {
	if s.Probes == 0 || d < 1 || d > len(s.ProbeAgree) {
		return math.NaN()
	}
	return float64(s.ProbeAgree[d-1]) / float64(s.Probes)
}
