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
// file the operator mounts from a ConfigMap): the exit threshold workers apply at once.
type Control struct {
	ExitThreshold float64 `json:"exitThreshold"`
}

// DecodeControl parses a control message and checks that the threshold lies in (0, 1].
func DecodeControl(b []byte) (Control, error) {
	var c Control
	if err := json.Unmarshal(b, &c); err != nil {
		return Control{}, fmt.Errorf("decoding control message: %w", err)
	}
	if !(c.ExitThreshold > 0 && c.ExitThreshold <= 1) {
		return Control{}, fmt.Errorf("decoding control message: exitThreshold %v outside (0, 1]", c.ExitThreshold)
	}
	return c, nil
}

// StatsSnapshot is what one worker observed during one window [Start, End): published on the
// LoopModel's stats subject every few seconds. Counts cover the window only (they reset after
// each snapshot), and a threshold change closes the window early, so every count was observed
// under the single ExitThreshold reported. The operator sums the snapshots of all workers.
//
// Depth statistics (DESIGN §4): Cum[t] counts the c_t of tokens that executed step t+1; tokens
// that exited before it are only counted in Censored[t] (their c_t is at least the threshold in
// force, so the depth under any lower threshold is still exact). ProbeCum holds the same for
// probe tokens only, which ran all MaxSteps steps and give the unbiased distribution needed to
// predict a higher threshold. ProbeAgree[t] counts probes whose argmax after step t+1 equals the
// full-depth argmax.
type StatsSnapshot struct {
	Namespace     string    `json:"namespace"`
	Name          string    `json:"name"`
	Worker        string    `json:"worker"` // pod or host name, unique per worker process
	Start         time.Time `json:"start"`
	End           time.Time `json:"end"`
	ExitThreshold float64   `json:"exitThreshold"` // threshold in force during the window
	MaxSteps      int       `json:"maxSteps"`      // R
	Capacity      int       `json:"capacity"`      // requests the worker batches at once
	InFlight      int       `json:"inFlight"`      // requests running at End

	Requests    int64   `json:"requests"`    // requests finished in the window
	Tokens      int64   `json:"tokens"`      // tokens generated
	LoopSteps   int64   `json:"loopSteps"`   // decoder-stack passes executed for generated tokens
	BusySeconds float64 `json:"busySeconds"` // time with at least one request running

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

// NewStatsSnapshot returns an empty snapshot with its arrays sized for maxSteps loop steps.
func NewStatsSnapshot(r Ref, worker string, maxSteps int) StatsSnapshot {
	s := StatsSnapshot{
		Namespace:   r.Namespace,
		Name:        r.Name,
		Worker:      worker,
		MaxSteps:    maxSteps,
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

// Validate checks that every array matches MaxSteps and CumBins, so consumers can index freely.
func (s StatsSnapshot) Validate() error {
	if err := s.Ref().Validate(); err != nil {
		return err
	}
	if s.MaxSteps <= 0 || s.MaxSteps > 64 {
		return fmt.Errorf("%w: maxSteps %d", ErrInvalidStats, s.MaxSteps)
	}
	for name, n := range map[string]int{"depthCounts": len(s.DepthCounts), "cum": len(s.Cum), "censored": len(s.Censored), "probeCum": len(s.ProbeCum), "probeAgree": len(s.ProbeAgree)} {
		if n != s.MaxSteps {
			return fmt.Errorf("%w: %s has %d entries, want %d", ErrInvalidStats, name, n, s.MaxSteps)
		}
	}
	for t := range s.MaxSteps {
		if len(s.Cum[t]) != CumBins || len(s.ProbeCum[t]) != CumBins {
			return fmt.Errorf("%w: step %d histograms need %d bins", ErrInvalidStats, t+1, CumBins)
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
func (s StatsSnapshot) MeanDepth() float64 {
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
func (s StatsSnapshot) PredictDepth(tau float64) float64 {
	useProbes := tau > s.ExitThreshold+1e-12
	cut := CumBin(tau) // bins below cut hold c < tau
	if tau >= 1 {
		cut = CumBins
	}
	depth := 1.0
	for t := 0; t < s.MaxSteps-1; t++ {
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
func (s StatsSnapshot) Agreement(d int) float64 {
	if s.Probes == 0 || d < 1 || d > s.MaxSteps {
		return math.NaN()
	}
	return float64(s.ProbeAgree[d-1]) / float64(s.Probes)
}
