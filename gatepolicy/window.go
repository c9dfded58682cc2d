// Package gatepolicy decides, once per tuning interval, the exit threshold τ of each quality tier
// and the replica count of a LoopModel from the depth statistics its workers publish (DESIGN §4).
//
// It is pure: no Kubernetes, NATS or clock imports. Time comes in as a value (Observation.Now),
// stats come in as Samples (bus converts its StatsSnapshot into one), and a Decision goes out;
// the caller owns publishing, status writes and scaling. A Tuner is not safe for concurrent use:
// the caller runs one Decide at a time per LoopModel.
//
// Units: thresholds are cumulative exit probabilities in (0, 1]; depths are loop steps per
// token; rates are per second; latencies are seconds (float64) in Samples and Windows and
// time.Duration in Spec and Decision.
package gatepolicy

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"time"
)

// Bins is the number of equal-width bins over [0, 1] of the c_t histograms; it equals
// bus.CumBins (bus checks it). A threshold on a bin edge is predicted exactly.
const Bins = 100

// Sentinels for samples a Window refuses; Window.Add wraps one of them and counts it.
var (
	// ErrMalformed: arrays that do not match MaxSteps/Bins, negative counts, a window that
	// ends before it starts.
	ErrMalformed = errors.New("malformed stats sample")
	// ErrMisaddressed: a sample for another tier or another loop depth than the window's.
	ErrMisaddressed = errors.New("misaddressed stats sample")
	// ErrStaleThreshold: a sample observed under another τ than the one in force for its tier
	// (a worker that has not applied the latest control message yet).
	ErrStaleThreshold = errors.New("stats sample under a threshold not in force")
)

// Sample is what one worker observed for one tier during one stats window [Start, End). It has
// the fields of bus.StatsSnapshot that the policy reads (bus.StatsSnapshot.Sample converts).
// Histograms: Cum[t][i] counts tokens that executed step t+1 with c_t in bin i; Censored[t]
// counts tokens that had exited before step t+1; ProbeCum and ProbeAgree hold the same for
// probe tokens, which ran all MaxSteps steps (ProbeAgree[t]: probes whose token after step t+1
// equals the full-depth token).
type Sample struct {
	Worker        string
	Tier          string // "" is the default tier
	Start, End    time.Time
	ExitThreshold float64 // τ in force during the window
	MaxSteps      int
	Capacity      int // requests the worker batches at once
	InFlight      int

	Requests    int64
	Tokens      int64
	LoopSteps   int64
	BusySeconds float64

	TokenLatencyP95 float64 // seconds
	TTFTP95         float64 // seconds

	Cum        [][]int64 // [MaxSteps][Bins]
	Censored   []int64   // [MaxSteps]
	Probes     int64
	ProbeCum   [][]int64 // [MaxSteps][Bins]
	ProbeAgree []int64   // [MaxSteps]
}

// Validate reports ErrMalformed for arrays that do not match MaxSteps and Bins or for negative
// counts, so a Window can index freely.
func (s Sample) Validate() error {
	if s.MaxSteps <= 0 || s.MaxSteps > 64 {
		return fmt.Errorf("%w: maxSteps %d", ErrMalformed, s.MaxSteps)
	}
	if len(s.Cum) != s.MaxSteps || len(s.Censored) != s.MaxSteps || len(s.ProbeCum) != s.MaxSteps || len(s.ProbeAgree) != s.MaxSteps {
		return fmt.Errorf("%w: per-step arrays need %d entries", ErrMalformed, s.MaxSteps)
	}
	if s.End.Before(s.Start) {
		return fmt.Errorf("%w: window ends before it starts", ErrMalformed)
	}
	if !(s.ExitThreshold > 0 && s.ExitThreshold <= 1) {
		return fmt.Errorf("%w: exitThreshold %v outside (0, 1]", ErrMalformed, s.ExitThreshold)
	}
	if s.Capacity < 0 || s.InFlight < 0 || s.Requests < 0 || s.Tokens < 0 || s.LoopSteps < 0 || s.Probes < 0 || !(s.BusySeconds >= 0) || !(s.TokenLatencyP95 >= 0) || !(s.TTFTP95 >= 0) {
		return fmt.Errorf("%w: negative or NaN count", ErrMalformed)
	}
	for t := range s.MaxSteps {
		if len(s.Cum[t]) != Bins || len(s.ProbeCum[t]) != Bins {
			return fmt.Errorf("%w: step %d histograms need %d bins", ErrMalformed, t+1, Bins)
		}
		if s.Censored[t] < 0 || s.ProbeAgree[t] < 0 || s.ProbeAgree[t] > s.Probes {
			return fmt.Errorf("%w: step %d counts out of range", ErrMalformed, t+1)
		}
		for i := range Bins {
			if s.Cum[t][i] < 0 || s.ProbeCum[t][i] < 0 {
				return fmt.Errorf("%w: step %d negative histogram count", ErrMalformed, t+1)
			}
		}
	}
	return nil
}

// Rejected counts the samples a Window refused, by cause, for the caller's metrics.
type Rejected struct {
	Malformed      int
	Misaddressed   int
	StaleThreshold int
}

// Total is the number of refused samples.
func (r Rejected) Total() int { return r.Malformed + r.Misaddressed + r.StaleThreshold }

// Add sums two counts.
func (r Rejected) Add(o Rejected) Rejected {
	return Rejected{r.Malformed + o.Malformed, r.Misaddressed + o.Misaddressed, r.StaleThreshold + o.StaleThreshold}
}

// Window is the sum of the samples of all workers for ONE tier over one tuning interval. Build
// it with NewWindow and Add.
//
// Two kinds of figure, two sets of samples:
//
//   - The counts (Samples, Capacity, InFlight, Requests, Tokens, LoopSteps, BusySeconds, the
//     latencies and the histograms) are those of the accepted samples only, all observed under
//     the τ in force (Tau): the depth predictions assume it, and a latency measured under
//     another τ would make the Tuner correct τ for a depth that no longer runs.
//   - The demand (DemandRequests, DemandTokens, hence TokenRate and RequestRate) counts every
//     sample of the tier that is well formed and well addressed, under the τ in force or not.
//     A token asked for is demand whatever τ it ran under: τ changes the depth of a token, not
//     the tokens asked for, and the policy predicts the loop-step demand at any τ as
//     TokenRate × Depth(τ). Counting only the accepted samples over the whole interval would
//     lower the demand after every τ change (a worker's window under the old τ closes when
//     the new one arrives and is refused), by the share of the interval that window covers:
//     the next decision would see the load fall, lift τ back or drop replicas, and oscillate.
//
// Seconds is the wall time the counts stand for, so that LoopSteps/Seconds (the replicas'
// load at which the accepted latencies were measured, which the capacity fit reads) is not
// lowered either: Interval times the share of the time the tier's samples cover that the
// accepted ones cover (per worker, the union of its samples' spans; summed over workers, since
// each worker reports its own share). It equals Interval when nothing was refused for a stale
// τ, and is 0 when every sample was (the Tuner then keeps the demand it had). The share
// assumes that the workers' load was the same in the accepted and the refused spans, which
// holds on a steady load; the demand needs no such assumption.
type Window struct {
	Tier     string
	Tau      float64 // threshold in force for the tier
	MaxSteps int
	Interval float64 // length of the tuning interval (seconds): the demand rates divide by it
	Seconds  float64 // the time the accepted counts cover (see above): LoopStepRate divides by it

	Samples     int // accepted samples
	Capacity    int // batch slots of the workers that reported
	InFlight    int // requests running at the end of their windows
	Requests    int64
	Tokens      int64
	LoopSteps   int64
	BusySeconds float64
	// TokenLatencyP95 and TTFTP95 are the token- and request-weighted means of the workers'
	// p95 (seconds): an estimate of the pooled p95 without the raw latencies.
	TokenLatencyP95 float64
	TTFTP95         float64

	Cum        [][]int64
	Censored   []int64
	Probes     int64
	ProbeCum   [][]int64
	ProbeAgree []int64

	// DemandRequests and DemandTokens count the accepted samples and those refused for a
	// stale τ alike.
	DemandRequests int64
	DemandTokens   int64

	Rejected Rejected

	latW, ttftW float64
	covered     map[string]*coverage // per worker
}

// coverage is the spans one worker's samples cover: all that counted in the demand, and the
// accepted ones.
type coverage struct{ all, accepted []span }

type span struct{ start, end time.Time }

// union is the length in seconds of the union of spans; it sorts spans in place.
func union(spans []span) float64 {
	slices.SortFunc(spans, func(a, b span) int { return a.start.Compare(b.start) })
	var total time.Duration
	var cur span
	for i, s := range spans {
		switch {
		case i == 0:
			cur = s
		case s.start.After(cur.end):
			total += cur.end.Sub(cur.start)
			cur = s
		case s.end.After(cur.end):
			cur.end = s.end
		}
	}
	if len(spans) > 0 {
		total += cur.end.Sub(cur.start)
	}
	return total.Seconds()
}

// NewWindow returns an empty window of one tier whose τ in force is tau, for a model of
// maxSteps loop steps, over a tuning interval of seconds.
func NewWindow(tier string, tau float64, maxSteps int, seconds float64) *Window {
	w := &Window{Tier: tier, Tau: tau, MaxSteps: maxSteps, Interval: seconds, Seconds: seconds,
		Cum: make([][]int64, maxSteps), Censored: make([]int64, maxSteps),
		ProbeCum: make([][]int64, maxSteps), ProbeAgree: make([]int64, maxSteps)}
	for t := range maxSteps {
		w.Cum[t] = make([]int64, Bins)
		w.ProbeCum[t] = make([]int64, Bins)
	}
	return w
}

// Add merges one sample, or refuses it with an error wrapping ErrMalformed, ErrMisaddressed or
// ErrStaleThreshold and counts it in Rejected. A malformed or misaddressed sample changes
// nothing else; one under a stale τ counts in the demand and in the time the tier's samples
// cover, nothing else.
func (w *Window) Add(s Sample) error {
	if err := s.Validate(); err != nil {
		w.Rejected.Malformed++
		return err
	}
	if s.Tier != w.Tier || s.MaxSteps != w.MaxSteps {
		w.Rejected.Misaddressed++
		return fmt.Errorf("%w: tier %q with %d steps, window is tier %q with %d", ErrMisaddressed, s.Tier, s.MaxSteps, w.Tier, w.MaxSteps)
	}
	w.DemandRequests += s.Requests
	w.DemandTokens += s.Tokens
	stale := math.Abs(s.ExitThreshold-w.Tau) > 1e-9
	w.cover(s, !stale)
	if stale {
		w.Rejected.StaleThreshold++
		return fmt.Errorf("%w: sample τ %v, in force %v", ErrStaleThreshold, s.ExitThreshold, w.Tau)
	}
	w.Samples++
	w.Capacity += s.Capacity
	w.InFlight += s.InFlight
	w.Requests += s.Requests
	w.Tokens += s.Tokens
	w.LoopSteps += s.LoopSteps
	w.BusySeconds += s.BusySeconds
	if s.Tokens > 0 && s.TokenLatencyP95 > 0 {
		n := float64(s.Tokens)
		w.TokenLatencyP95 = (w.TokenLatencyP95*w.latW + s.TokenLatencyP95*n) / (w.latW + n)
		w.latW += n
	}
	if s.Requests > 0 && s.TTFTP95 > 0 {
		n := float64(s.Requests)
		w.TTFTP95 = (w.TTFTP95*w.ttftW + s.TTFTP95*n) / (w.ttftW + n)
		w.ttftW += n
	}
	w.Probes += s.Probes
	for t := range w.MaxSteps {
		w.Censored[t] += s.Censored[t]
		w.ProbeAgree[t] += s.ProbeAgree[t]
		for i := range Bins {
			w.Cum[t][i] += s.Cum[t][i]
			w.ProbeCum[t][i] += s.ProbeCum[t][i]
		}
	}
	return nil
}

// cover records the span of a sample that counts in the demand (accepted or not) and sets
// Seconds to Interval times the accepted share of the time the tier's samples cover.
func (w *Window) cover(s Sample, accepted bool) {
	if w.covered == nil {
		w.covered = map[string]*coverage{}
	}
	c := w.covered[s.Worker]
	if c == nil {
		c = &coverage{}
		w.covered[s.Worker] = c
	}
	sp := span{s.Start, s.End}
	c.all = append(c.all, sp)
	if accepted {
		c.accepted = append(c.accepted, sp)
	}
	var all, acc float64
	for _, c := range w.covered {
		all += union(c.all)
		acc += union(c.accepted)
	}
	w.Seconds = w.Interval
	if all > 0 {
		w.Seconds = w.Interval * acc / all
	}
}

// cut is the number of bins that hold c < tau (tau rounded down to a bin edge).
func cut(tau float64) int {
	if tau >= 1 {
		return Bins
	}
	if !(tau > 0) {
		return 0
	}
	return min(int(tau*Bins+1e-9), Bins)
}

// continueProb returns P(c_t < tau) for t = 1..MaxSteps-1 (index t-1): the probability that a
// token runs past step t. At or below the τ in force it is exact from every token (censored
// tokens have c_t ≥ τ in force ≥ tau). Above it, the part below the τ in force stays exact and
// only the rest, P(τ in force ≤ c_t < tau), comes from the probes, so the curve is monotone in
// tau across the τ in force. ok is false when a step has no usable token (or no probe, above).
func (w *Window) continueProb(tau float64) (p []float64, ok bool) {
	c, cf := cut(tau), cut(w.Tau)
	p = make([]float64, max(w.MaxSteps-1, 0))
	for t := 0; t < w.MaxSteps-1; t++ {
		below, total := int64(0), w.Censored[t]
		for i, n := range w.Cum[t] {
			total += n
			if i < min(c, cf) {
				below += n
			}
		}
		if total == 0 {
			return nil, false
		}
		p[t] = float64(below) / float64(total)
		if c <= cf {
			continue
		}
		var mid, probes int64
		for i, n := range w.ProbeCum[t] {
			probes += n
			if i >= cf && i < c {
				mid += n
			}
		}
		if probes == 0 {
			return nil, false
		}
		p[t] = min(1, p[t]+float64(mid)/float64(probes))
	}
	return p, true
}

// Depth predicts the mean loop depth under threshold tau: 1 + Σ_{t<R} P(c_t < tau) (DESIGN §4),
// exact at or below the τ in force; above it the probes add the share of c_t between the τ in
// force and tau. tau is rounded down to a bin
// edge. NaN when the window holds no usable token.
func (w *Window) Depth(tau float64) float64 {
	p, ok := w.continueProb(tau)
	if !ok {
		return math.NaN()
	}
	d := 1.0
	for _, x := range p {
		d += x
	}
	return d
}

// exitDist returns P(depth = d) for d = 1..MaxSteps under tau, made monotone (the continue
// probabilities of a non-decreasing c_t are non-increasing in t; sampling noise may break it).
func (w *Window) exitDist(tau float64) ([]float64, bool) {
	p, ok := w.continueProb(tau)
	if !ok {
		return nil, false
	}
	e := make([]float64, w.MaxSteps)
	prev := 1.0
	for t, x := range p {
		x = min(x, prev)
		e[t] = prev - x
		prev = x
	}
	e[w.MaxSteps-1] = prev
	return e, true
}

// Agreement predicts the share of tokens whose token under tau equals the full-depth token:
// Σ_d P(depth = d)·agree(d), with agree(d) the probes' agreement after step d. It treats the
// exit step and agreement at that step as independent; tokens that exit early are the ones the
// gate is sure of, which agree more often than average, so on a calibrated gate this errs low.
// NaN without probes.
func (w *Window) Agreement(tau float64) float64 {
	if w.Probes == 0 {
		return math.NaN()
	}
	if cut(tau) == Bins {
		return 1
	}
	e, ok := w.exitDist(tau)
	if !ok {
		return math.NaN()
	}
	a := 0.0
	for d, pd := range e {
		a += pd * float64(w.ProbeAgree[d]) / float64(w.Probes)
	}
	return a
}

// AgreementLCB is the Wilson score lower bound at two-sided confidence conf (e.g. 0.95) on
// Agreement(tau), with the window's probe count as the sample size: few probes give a low
// bound, so a quiet window cannot talk the tuner into a low τ. 0 without probes.
func (w *Window) AgreementLCB(tau, conf float64) float64 {
	a := w.Agreement(tau)
	if math.IsNaN(a) {
		return 0
	}
	if cut(tau) == Bins {
		return 1
	}
	return WilsonLower(a, float64(w.Probes), conf)
}

// WilsonLower is the Wilson score interval's lower end for a proportion p observed over n
// trials at two-sided confidence conf.
func WilsonLower(p, n, conf float64) float64 {
	if n <= 0 {
		return 0
	}
	z := normalQuantile(1 - (1-conf)/2)
	z2 := z * z
	centre := p + z2/(2*n)
	half := z * math.Sqrt(p*(1-p)/n+z2/(4*n*n))
	return max(0, (centre-half)/(1+z2/n))
}

// normalQuantile is the standard normal quantile function.
func normalQuantile(q float64) float64 { return math.Sqrt2 * math.Erfinv(2*q-1) }

// ProbeFraction is the share of tokens that were probes (they run every step).
func (w *Window) ProbeFraction() float64 {
	if w.Tokens == 0 {
		return 0
	}
	return min(1, float64(w.Probes)/float64(w.Tokens))
}

// Saturated reports whether every batch slot was busy at the end of the window: requests
// queue, and latency measures the queue rather than the replicas' speed.
func (w *Window) Saturated() bool { return w.Capacity > 0 && w.InFlight >= w.Capacity }

// TokenRate is the tier's token demand: tokens generated per second over the interval, those
// of samples refused for a stale τ included (see Window).
func (w *Window) TokenRate() float64 { return rate(float64(w.DemandTokens), w.Interval) }

// RequestRate is requests finished per second over the interval, as TokenRate counts them.
func (w *Window) RequestRate() float64 { return rate(float64(w.DemandRequests), w.Interval) }

// LoopStepRate is the loop steps per second the workers executed under the τ in force: the
// accepted samples' loop steps over the time they cover (Seconds). It is the replicas' load,
// not a demand: the loop-step demand at a τ is TokenRate() × Depth(τ).
func (w *Window) LoopStepRate() float64 { return rate(float64(w.LoopSteps), w.Seconds) }

// MeasuredDepth is loop steps per token as executed (NaN without tokens).
func (w *Window) MeasuredDepth() float64 {
	if w.Tokens == 0 {
		return math.NaN()
	}
	return float64(w.LoopSteps) / float64(w.Tokens)
}

func rate(n, s float64) float64 {
	if !(s > 0) {
		return 0
	}
	return n / s
}
