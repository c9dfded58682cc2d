package gatepolicy

import (
	"fmt"
	"maps"
	"math"
	"time"
)

// Observation is what the caller saw during the interval that ends at Now.
type Observation struct {
	Now time.Time
	// Windows holds the interval's window per tier name (absent or empty: no traffic seen).
	Windows map[string]*Window
	// Tau is the τ in force per tier (what the workers applied); absent tiers are taken at the
	// Tuner's last decision, or at the ceiling before the first.
	Tau map[string]float64

	ReadyReplicas    int // workers ready to serve now
	DesiredReplicas  int // replicas currently asked of the Deployment
	StartingReplicas int // asked for but not ready yet
}

// Reason codes of a Decision (machine-friendly; Reason.Message says the rest).
const (
	ReasonNoStats          = "NoStats"          // no window with tokens yet: holding
	ReasonHeld             = "Held"             // τ already at its target
	ReasonRaised           = "ThresholdRaised"  // demand allows a better τ
	ReasonLowered          = "ThresholdLowered" // the SLO needs a lower τ
	ReasonBrownout         = "Brownout"         // τ lowered to fit the capacity ready now
	ReasonAgreementFloor   = "AgreementFloor"   // minAgreement's bound keeps τ up
	ReasonMinDepth         = "MinDepth"         // a tier's minDepth keeps τ up
	ReasonScaledUp         = "ScaledUp"
	ReasonScaleDownPending = "ScaleDownPending" // demand is low, scaleDownDelay not over yet
	ReasonScaledDown       = "ScaledDown"
	ReasonAtMaxReplicas    = "AtMaxReplicas"
	ReasonSLOUnreachable   = "SLOUnreachable" // not met even at the floor with maxReplicas
	ReasonRejectedStats    = "RejectedStats"  // some samples were refused
)

// Reason explains one part of a Decision.
type Reason struct {
	Code    string
	Message string
}

// Decision is the Tuner's output for one interval.
type Decision struct {
	Tau      map[string]float64 // τ per tier, each within [tier floor, ceiling]
	Replicas int                // within [MinReplicas, MaxReplicas]
	Reasons  []Reason

	PredictedDepth        float64       // token-weighted mean depth at Tau (NaN without stats)
	PredictedLatency      time.Duration // ITL p95 at Tau on the ready replicas (0 when unknown)
	PredictedAgreementLCB float64       // lowest tier's agreement lower bound at Tau (NaN without probes)
	SLOReachable          bool          // false: not met even at the floor with MaxReplicas
	// QualityFloors is, per tier, the lowest τ that keeps minAgreement's lower bound and the
	// tier's minDepth (on the bin grid, within the tier's floor; nil without stats). It is the
	// brownout order's reference: a tier is below the ceiling only while every cheaper tier is
	// at or below its quality floor.
	QualityFloors map[string]float64
	Brownout      bool     // some tier runs below its target for lack of ready capacity
	Capacity      Capacity // the model the decision used
	Rejected      Rejected // samples refused in this interval's windows
}

// HasReason reports whether the decision carries a reason code.
func (d Decision) HasReason(code string) bool {
	for _, r := range d.Reasons {
		if r.Code == code {
			return true
		}
	}
	return false
}

// Tuner holds the state between intervals: the τ it last chose, the capacity fit, the latest
// usable histograms of every tier, and the replica targets of the scale-down and scale-up
// windows.
type Tuner struct {
	spec   Spec
	tau    map[string]float64
	hist   map[string]*Window // newest window with tokens, per tier
	demand map[string]float64 // tokens/s per tier (smoothed)
	served float64            // tokens/s of the last interval, all tiers, unsmoothed and as served
	points []fitPoint
	capy   Capacity

	memo map[depthKey]float64 // depth predictions of the current Decide
	// block remembers, per tier, a τ the Tuner had to leave because it missed the SLO with
	// exact statistics, and the per-replica token rate then: τ does not climb back to it from
	// (noisier) probe predictions until that rate has fallen by blockRelief.
	block map[string]blocked
	// cool counts the decisions left before any τ may rise again after a window that missed
	// the SLO or queued (latency and batch slots are shared by the tiers).
	cool int
	// tried remembers, per tier, the last raise made on measured headroom against the model
	// (explore) until a window at that τ met the SLO, or the last τ measured to miss.
	tried map[string]tried
	// steady counts the decisions in a row that kept the replicas ready and wanted unchanged
	// (and none pending to go): the only ones whose measured headroom explore may use.
	steady int
	// decisions counts the calls of Decide: the clock of tried's back-off.
	decisions int
	// good counts, per tier, the windows in a row measured at the τ in force within holdMargin
	// of the SLO: a miss after outlierWindows of them is taken for an outlier (see explore).
	good map[string]goodRun

	replicas int
	recent   []stampedTarget // replica targets of the last ScaleDownDelay, oldest first
	// lastDown is the latest scale-down; downBlock a count that a scale-down went to and a
	// scale-up left again within ScaleDownDelay at about the same load (see scale), with the
	// token demand when it scaled down: no scale-down goes to that count or below until the
	// demand has fallen by blockRelief (a model that puts the SLO within a hair of a smaller
	// fleet flaps between the two).
	lastDown  scaledDown
	downBlock scaledDown
	upRecent  []stampedTarget // replica targets of the last ScaleUpDelay, oldest first
}

// NewTuner validates spec (after WithDefaults) and returns a Tuner at the ceiling τ and
// MinReplicas.
func NewTuner(spec Spec) (*Tuner, error) {
	spec = spec.WithDefaults()
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	t := &Tuner{spec: spec, tau: map[string]float64{}, hist: map[string]*Window{}, demand: map[string]float64{}, block: map[string]blocked{}, tried: map[string]tried{}, good: map[string]goodRun{}, replicas: spec.MinReplicas}
	for _, tr := range spec.Tiers {
		t.tau[tr.Name] = spec.Ceiling
	}
	return t, nil
}

// Spec returns the spec in force, defaults filled.
func (t *Tuner) Spec() Spec { return t.spec }

// grid is the τ resolution of a decision: the histograms' bin width.
const grid = 1.0 / Bins

// Decide returns the decision for the interval that ended at obs.Now.
func (t *Tuner) Decide(obs Observation) Decision {
	d := Decision{Tau: map[string]float64{}, SLOReachable: true}
	t.memo = map[depthKey]float64{}
	t.decisions++
	t.syncInForce(obs)
	t.absorb(obs, &d)
	if len(t.hist) == 0 {
		for k, v := range t.tau {
			d.Tau[k] = v
		}
		d.Replicas = t.holdReplicas(obs)
		d.PredictedDepth, d.PredictedAgreementLCB = math.NaN(), math.NaN()
		d.Reasons = append(d.Reasons, Reason{ReasonNoStats, "no window with tokens yet: holding τ and replicas"})
		return d
	}
	floors := t.qualityFloors(&d)
	d.QualityFloors = floors
	target, n, reachable := t.targets(floors)
	if !reachable {
		d.SLOReachable = false
		d.Reasons = append(d.Reasons, Reason{ReasonSLOUnreachable, "the latency SLO is not met even at the floor τ with maxReplicas: running at the floor"})
	}
	n = t.patient(obs, n, floors)
	t.scale(obs, n, target, &d)
	ready := max(obs.ReadyReplicas, 0)
	// While replicas are on their way a brownout may go down to the spec floors; without
	// capacity coming (at maxReplicas) the quality floors hold.
	low := floors
	if ready < d.Replicas || obs.StartingReplicas > 0 {
		low = t.tierFloors()
	}
	browned := t.brownout(target, low, ready)
	hot := t.correct(obs, browned, low)
	for _, tr := range t.spec.Tiers {
		if browned[tr.Name] < target[tr.Name]-1e-9 {
			d.Brownout = true
		}
	}
	if d.Brownout {
		d.Reasons = append(d.Reasons, Reason{ReasonBrownout, fmt.Sprintf("%d replicas ready of %d wanted: τ lowered to fit the ready capacity", ready, d.Replicas)})
	}
	// measured headroom raises τ only on the replicas meant to stay: not while a scale-down is
	// pending (the headroom is about to go) nor while replicas are still starting
	if n >= d.Replicas && ready == d.Replicas && obs.DesiredReplicas == d.Replicas && obs.StartingReplicas <= 0 {
		t.steady++
	} else {
		t.steady = 0
	}
	settled := t.steady >= 2 // this interval and the one before ran on the replicas that stay
	raise, holds := t.explore(obs, hot, settled)
	t.step(browned, raise, holds, floors, d.Brownout, hot, t.rate(d.Replicas), &d)
	t.predict(ready, &d)
	return d
}

// syncInForce takes the τ in force from the caller (advisory mode applies nothing, so the
// Tuner steps from what the workers run, not from its own recommendation).
func (t *Tuner) syncInForce(obs Observation) {
	for _, tr := range t.spec.Tiers {
		if v, ok := obs.Tau[tr.Name]; ok && v > 0 && v <= 1 {
			t.tau[tr.Name] = t.clampTier(tr, v)
		}
	}
	if obs.DesiredReplicas > 0 {
		t.replicas = min(max(obs.DesiredReplicas, t.spec.MinReplicas), t.spec.MaxReplicas)
	}
}

// absorb takes the interval's windows: demand per tier, usable histograms, a capacity point.
func (t *Tuner) absorb(obs Observation, d *Decision) {
	// steps and lat/latW give the mean depth and step latency; the load is the sum of each
	// tier's loop-step rate, each over the time its own accepted samples cover (a τ change of
	// one tier shortens only that tier's Seconds).
	var steps, stepRate float64
	var lat, latW float64
	saturated := false
	t.served = 0
	for _, tr := range t.spec.Tiers {
		w := obs.Windows[tr.Name]
		if w == nil {
			t.demand[tr.Name] *= 0.5
			continue
		}
		d.Rejected = d.Rejected.Add(w.Rejected)
		if w.Seconds > 0 {
			r := w.TokenRate()
			t.served += r
			if w.Saturated() {
				r *= saturatedDemand // requests queue: the offered rate exceeds what was served
			}
			if r > t.demand[tr.Name] {
				t.demand[tr.Name] = r // rises at once
			} else {
				t.demand[tr.Name] = 0.5*t.demand[tr.Name] + 0.5*r // falls smoothly
			}
		}
		if w.Tokens > 0 && !math.IsNaN(w.Depth(w.Tau)) {
			t.hist[tr.Name] = w
		}
		saturated = saturated || w.Saturated()
		steps += float64(w.LoopSteps)
		if w.Seconds > 0 {
			stepRate += float64(w.LoopSteps) / w.Seconds
		}
		if w.TokenLatencyP95 > 0 && w.Tokens > 0 {
			lat += w.TokenLatencyP95 * float64(w.Tokens)
			latW += float64(w.Tokens)
		}
	}
	if total := d.Rejected.Total(); total > 0 {
		d.Reasons = append(d.Reasons, Reason{ReasonRejectedStats, fmt.Sprintf("%d stats samples refused (%d malformed, %d misaddressed, %d under a stale τ)", total, d.Rejected.Malformed, d.Rejected.Misaddressed, d.Rejected.StaleThreshold)})
	}
	if latW > 0 && stepRate > 0 && obs.ReadyReplicas > 0 {
		depth := steps / latW
		if depth >= 1 {
			t.points = append(t.points, fitPoint{load: stepRate / float64(obs.ReadyReplicas), step: lat / latW / depth, saturated: saturated})
			if len(t.points) > fitPoints {
				t.points = t.points[len(t.points)-fitPoints:]
			}
		}
	}
	t.capy = fit(t.points, t.capy)
	d.Capacity = t.capy
}

func (t *Tuner) clampTier(tr Tier, v float64) float64 { return min(max(v, tr.Floor), t.spec.Ceiling) }

type blocked struct{ tau, rate float64 }

// tried is a raise to tau made on measured headroom, from a window whose latency p95 was p95,
// or (failed) the lowest τ whose window missed the SLO or queued, with p95 the latency of the
// next window (under the τ it went down to, or the same at the floor): after a failure no
// raise is made on measured headroom (the model alone may raise) until the latency at the τ
// then in force has fallen to retryLatency × p95 (the load got lighter), or until the
// back-off has passed (retryAfter: a miss may have been a hiccup of the machine, and the
// model alone misreads a fixed-concurrency load for good). A raise that the model lowers
// again after a window at it fails too. at is the decision that made the raise or saw the
// (latest) miss; fails counts the failures since a raise last held.
type tried struct {
	tau, p95  float64
	failed    bool
	at, fails int
}

// goodRun is n windows in a row measured at tau within holdMargin of the SLO.
type goodRun struct {
	tau float64
	n   int
}

// outlierWindows is how many windows in a row must have met the SLO with room at a τ for a miss
// there to be taken for an outlier: τ is lowered and cools as after any miss, but the miss is
// not recorded against measured headroom (a hiccup of the machine must not hold τ low for an
// hour; a load that did grow shows again in the next window tried).
const outlierWindows = 3

// retryAfter is the number of decisions after a failure before measured headroom is tried
// again at the same load: RetryDecisions, doubled for each failure in a row, at most 8 times
// that.
func retryAfter(fails int) int { return RetryDecisions << min(max(fails-1, 0), 3) }

// pendingDecisions is how many decisions a raise made on measured headroom is kept against the
// model while no window has measured it yet (the window after a change mostly ran under the
// old τ): the model, which refused it, does not get to lower it unseen.
const pendingDecisions = 3

// exploreMargin is the share of the SLO that the measured latency, scaled by the predicted
// depth ratio, may take for a raise the model refuses (explore); retryLatency is the fall in
// measured latency after which a failed one may be tried again.
const (
	exploreMargin = 0.8
	retryLatency  = 0.7
)

// RetryDecisions is the number of decisions after a miss on measured headroom before it is
// tried again at the same load (doubled for each failure in a row: see retryAfter): with
// spec.tuning.interval, the time a hiccup of the machine on a raise may hold τ low.
const RetryDecisions = 120

// holdMargin is the share of the SLO under which the latency measured at the τ in force keeps
// that τ against a model that would lower it (outside a brownout): see explore.
const holdMargin = 0.8

// saturatedDemand is the factor by which a saturated window's served token rate is taken to
// understate demand (the queue hides the rest): it makes the Tuner scale up and brown out at
// once rather than one served-rate step per interval.
const saturatedDemand = 1.5

// coolDecisions is how many decisions τ holds (may fall, may not rise) after a window that
// missed the SLO or queued, so a brownout does not climb back into the burst it absorbs.
const coolDecisions = 4

// blockRelief is the fall in per-replica token rate that lifts a block.
const blockRelief = 0.9

type depthKey struct {
	tier string
	bin  int
}

// depth predicts tier k's mean executed depth at tau from its newest histograms, probes
// included (R when no tier has histograms yet: the safe side for latency).
func (t *Tuner) depth(k string, tau float64) float64 {
	key := depthKey{k, cut(tau)}
	if v, ok := t.memo[key]; ok {
		return v
	}
	v := t.depthUncached(k, tau)
	t.memo[key] = v
	return v
}

func (t *Tuner) depthUncached(k string, tau float64) float64 {
	w := t.hist[k]
	if w == nil {
		// a tier without traffic costs nothing; borrow another tier's histograms when it starts
		for _, o := range t.hist {
			w = o
			break
		}
	}
	if w == nil {
		return float64(t.spec.MaxSteps)
	}
	x := w.Depth(tau)
	if math.IsNaN(x) {
		return float64(t.spec.MaxSteps)
	}
	f := w.ProbeFraction() // probes run every step whatever τ is
	return (1-f)*x + f*float64(t.spec.MaxSteps)
}

// taus lists the candidate τ of a tier from the ceiling down to its floor on the bin grid.
func (t *Tuner) taus(tr Tier) []float64 {
	out := []float64{t.spec.Ceiling}
	for v := math.Floor(t.spec.Ceiling*Bins-1e-9) / Bins; v >= tr.Floor-1e-9; v -= grid {
		out = append(out, math.Round(v*Bins)/Bins)
	}
	return out
}

// qualityFloors returns, per tier, the lowest τ that keeps minAgreement's lower bound and the
// tier's minDepth: the floor the latency targets may not cross.
func (t *Tuner) qualityFloors(d *Decision) map[string]float64 {
	f := map[string]float64{}
	for _, tr := range t.spec.Tiers {
		f[tr.Name] = t.spec.Ceiling
		w := t.hist[tr.Name]
		for _, v := range t.taus(tr) {
			if t.spec.MinAgreement > 0 && w != nil && w.AgreementLCB(v, t.spec.Confidence) < t.spec.MinAgreement {
				if v < t.tau[tr.Name] || v == t.spec.Ceiling {
					d.Reasons = append(d.Reasons, Reason{ReasonAgreementFloor, fmt.Sprintf("tier %q: agreement lower bound below %.3f under τ %.2f", tr.Name, t.spec.MinAgreement, v)})
				}
				break
			}
			if t.spec.MinAgreement > 0 && w == nil {
				break // no probes: cannot vouch for a lower τ
			}
			if tr.MinDepth > 0 && t.depth(tr.Name, v) < tr.MinDepth {
				d.Reasons = append(d.Reasons, Reason{ReasonMinDepth, fmt.Sprintf("tier %q: depth under τ %.2f below minDepth %.2f", tr.Name, v, tr.MinDepth)})
				break
			}
			f[tr.Name] = v
		}
	}
	return f
}

// ok reports whether tier k at tau meets the depth cap and, at per-replica load, the latency SLO.
func (t *Tuner) ok(k string, tau, load float64) bool {
	dep := t.depth(k, tau)
	if t.spec.MaxMeanDepth > 0 && dep > t.spec.MaxMeanDepth+1e-9 {
		return false
	}
	if t.spec.TokenLatencyP95 > 0 && t.capy.Known() {
		return t.capy.ITL(dep, load) <= t.spec.TokenLatencyP95.Seconds()
	}
	return true
}

// perReplica is the loop-step rate a replica should carry.
func (t *Tuner) perReplica() float64 {
	if t.spec.TargetLoopStepsPerReplica > 0 {
		return t.spec.TargetLoopStepsPerReplica
	}
	if t.capy.LoopStepsPerSecond > 0 {
		return t.capy.LoopStepsPerSecond * t.spec.TargetUtilisation
	}
	return math.NaN()
}

// targets returns each tier's best τ and the replicas to run: replicas n = ceil(loop-step
// demand at the ceiling / per-replica target) within bounds, then the cheapest tiers are
// lowered (each to its quality floor before the next) until every tier's depth and latency at
// the load on n replicas meet the SLO. When even the floors miss, more replicas (up to
// MaxReplicas) are tried; reachable is false when MaxReplicas at the floors still miss.
func (t *Tuner) targets(floors map[string]float64) (map[string]float64, int, bool) {
	top := map[string]float64{}
	for _, tr := range t.spec.Tiers {
		top[tr.Name] = t.spec.Ceiling
	}
	if math.IsNaN(t.perReplica()) {
		out, ok := t.fitInto(top, floors, t.replicas)
		return out, t.replicas, ok
	}
	n := min(max(t.replicasFor(top, 1), t.spec.MinReplicas), t.spec.MaxReplicas)
	if out, ok := t.fitInto(top, floors, n); ok {
		return out, n, true
	}
	out, ok := t.fitInto(top, floors, t.spec.MaxReplicas)
	if !ok {
		return out, t.spec.MaxReplicas, false
	}
	lo, hi := n, t.spec.MaxReplicas // fits at hi, not at lo
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		if _, ok := t.fitInto(top, floors, mid); ok {
			hi = mid
		} else {
			lo = mid
		}
	}
	out, _ = t.fitInto(top, floors, hi)
	return out, hi, true
}

// demandAt is the loop-step demand (steps/s) with tier τ values taus.
func (t *Tuner) demandAt(taus map[string]float64) float64 {
	s := 0.0
	for _, tr := range t.spec.Tiers {
		s += t.demand[tr.Name] * t.depth(tr.Name, taus[tr.Name])
	}
	return s
}

// replicasFor is ceil(loop-step demand × margin / per-replica target), unclamped (the current
// replicas without a capacity model).
func (t *Tuner) replicasFor(taus map[string]float64, margin float64) int {
	per := t.perReplica()
	if math.IsNaN(per) || per <= 0 {
		return t.replicas
	}
	return int(math.Ceil(t.demandAt(taus)*margin/per - 1e-9))
}

// cancelMargin is the demand margin under which the ready replicas must fit before the ones
// still starting are dropped: a window's token rate varies by several percent on a steady
// load, and a cancelled replica asked for again starts its cold start over.
const cancelMargin = 1.15

// maxLoad is the share of a replica's fitted capacity that fits never plans past.
const maxLoad = 0.95

// fits reports whether every tier meets the SLO with taus on n replicas.
func (t *Tuner) fits(taus map[string]float64, n int) bool {
	if n <= 0 {
		return false
	}
	load := t.demandAt(taus) / float64(n)
	per := t.perReplica()
	if t.capy.LoopStepsPerSecond > 0 && load >= t.capy.LoopStepsPerSecond*maxLoad {
		return false
	}
	if !math.IsNaN(per) && !(t.spec.TokenLatencyP95 > 0 && t.capy.Known()) && load > per/t.spec.TargetUtilisation {
		return false // no latency model: never above the full capacity the target implies
	}
	for _, tr := range t.spec.Tiers {
		if t.demand[tr.Name] > 0 && !t.ok(tr.Name, taus[tr.Name], load) {
			return false
		}
	}
	return true
}

// fitInto lowers tiers from start along the brownout order until the load fits n replicas; ok
// is false when all floors still miss.
func (t *Tuner) fitInto(start, floors map[string]float64, n int) (map[string]float64, bool) {
	out := maps.Clone(start)
	t.lower(out, floors, func(taus map[string]float64) bool { return t.fits(taus, n) })
	return out, t.fits(out, n)
}

// lower is the brownout order: it lowers taus in place one grid step at a time, cheapest tier
// first, each down to its floor before the next moves, until done holds or every tier is at
// its floor.
func (t *Tuner) lower(taus, floors map[string]float64, done func(map[string]float64) bool) {
	for _, tr := range t.spec.Tiers { // sorted by BrownoutOrder: cheapest first
		for !done(taus) && taus[tr.Name] > floors[tr.Name]+1e-9 {
			taus[tr.Name] = max(floors[tr.Name], math.Round((taus[tr.Name]-grid)*Bins)/Bins)
		}
	}
}

// cost is the demand-weighted loop-step cost of taus (equal weights when no tier has demand):
// what a latency correction scales down, whichever tiers give the loop steps up.
func (t *Tuner) cost(taus map[string]float64) float64 {
	total := 0.0
	for _, tr := range t.spec.Tiers {
		total += t.demand[tr.Name]
	}
	s := 0.0
	for _, tr := range t.spec.Tiers {
		w := t.demand[tr.Name]
		if total <= 0 {
			w = 1
		}
		s += w * t.depth(tr.Name, taus[tr.Name])
	}
	return s
}

// correct lowers taus in place by what was measured, in the brownout order (cheapest tier
// first, each to its floor before the next): latency is shared by the tiers, so a miss in any
// tier's window is cured from the cheapest one. A window that saturated (every batch slot
// busy, requests queueing) sends the cheapest tier not at its floor to it at once: the queue
// drains fastest there. A window whose latency p95 exceeded the SLO then caps the loop-step
// cost at what would have met it (cost at the τ in force × SLO / worst measured p95; with one
// tier: depth × SLO / measured), whatever the model predicted; the model learns from the same
// window next interval. It reports whether a window missed the SLO or saturated: then no τ is
// raised for coolDecisions.
func (t *Tuner) correct(obs Observation, taus, floors map[string]float64) bool {
	slo := t.spec.TokenLatencyP95.Seconds()
	saturated, worst := false, 0.0
	for _, tr := range t.spec.Tiers {
		w := obs.Windows[tr.Name]
		if w == nil {
			continue
		}
		saturated = saturated || w.Saturated()
		if w.Tokens > 0 {
			worst = max(worst, w.TokenLatencyP95)
		}
	}
	if saturated {
		for _, tr := range t.spec.Tiers {
			if taus[tr.Name] > floors[tr.Name]+1e-9 {
				taus[tr.Name] = floors[tr.Name]
				break
			}
		}
	}
	missed := slo > 0 && worst > slo
	if missed {
		goal := t.cost(t.tau) * slo / worst
		t.lower(taus, floors, func(v map[string]float64) bool { return t.cost(v) <= goal })
	}
	return saturated || missed
}

// tierFloors is each tier's spec floor.
func (t *Tuner) tierFloors() map[string]float64 {
	f := map[string]float64{}
	for _, tr := range t.spec.Tiers {
		f[tr.Name] = tr.Floor
	}
	return f
}

// brownout returns the τ per tier that fits the replicas ready now, never above target and
// never below floors. While replicas are starting, Decide passes the spec floors, so it may
// cross the minAgreement and minDepth floors: such a brownout lasts until the replicas asked
// for are ready, and serving every request at a lower depth beats queueing them. At
// maxReplicas it passes the quality floors, which then hold.
func (t *Tuner) brownout(target, floors map[string]float64, ready int) map[string]float64 {
	if ready <= 0 || math.IsNaN(t.perReplica()) || t.fits(target, ready) {
		return target
	}
	low := map[string]float64{}
	for k, v := range floors {
		low[k] = min(v, target[k])
	}
	out, _ := t.fitInto(target, low, ready)
	return out
}

// step moves τ toward want in the brownout order. First the order is restored: a tier
// cheaper than a lowered one (τ below the ceiling) that is above its quality floor (floors)
// goes down to it at once (its floor fell, or the caller applied other values). Lowering then
// walks the tiers cheapest first, down at once in brownout (capacity is short now), otherwise
// by at most MaxStep in all: what is left of the step spills over to the next tier only when
// the cheaper one reached its quality floor. A decision that lowers nothing raises, dearest
// tier first, by at most MaxStep in all, a tier only when its want exceeds τ by the
// hysteresis (or reaches the ceiling), not within coolDecisions of a window that missed the
// SLO or queued, and above its quality floor only while every dearer tier is at the ceiling.
// measured and holds come from explore: a measured raise replaces a lower want (a block on
// it is lifted: what was measured supersedes the prediction it stood for), and a held tier is
// not lowered by the model outside a brownout.
func (t *Tuner) step(want map[string]float64, measured map[string]tried, holds map[string]bool, floors map[string]float64, brownout, hot bool, rate float64, d *Decision) {
	tiers := t.spec.Tiers
	next := maps.Clone(t.tau)
	ordered := t.order(next, floors)
	if hot {
		t.cool = coolDecisions
	}
	cooling := t.cool > 0
	if cooling {
		t.cool--
	}
	w, onMeasure := map[string]float64{}, map[string]bool{}
	for _, tr := range tiers {
		k, cur := tr.Name, next[tr.Name]
		w[k] = want[k]
		if cooling {
			w[k] = min(w[k], cur) // a recent window missed the SLO or queued: no raise yet
		}
		if b, ok := t.block[k]; ok {
			if rate < blockRelief*b.rate {
				delete(t.block, k)
			} else if w[k] >= b.tau-1e-9 {
				w[k] = min(max(cur, math.Round((b.tau-grid)*Bins)/Bins), w[k])
			}
		}
		if m, ok := measured[k]; ok && !cooling && m.tau > w[k]+1e-9 && m.tau > cur+1e-9 {
			// the model refuses what the latency measured at the τ in force allows
			onMeasure[k] = true
			w[k] = m.tau
			m.at = t.decisions
			t.tried[k] = m
			if b, ok := t.block[k]; ok && m.tau >= b.tau-1e-9 {
				delete(t.block, k)
			}
		}
	}
	budget := t.spec.MaxStep
	if brownout {
		budget = math.Inf(1)
	}
	lowered := false
	for _, tr := range tiers { // cheapest first
		k := tr.Name
		if w[k] < next[k]-1e-9 && budget > 1e-9 && !(holds[k] && !brownout) {
			v := max(w[k], next[k]-budget)
			budget -= next[k] - v
			if !brownout {
				t.block[k] = blocked{tau: next[k], rate: rate}
			}
			if tp, ok := t.tried[k]; ok && next[k] >= tp.tau-1e-9 && !tp.failed {
				// a measured raise the model lowers again is not retried at once
				tp.failed, tp.at, tp.fails = true, t.decisions, tp.fails+1
				t.tried[k] = tp
			}
			next[k], lowered = v, true
		}
		if next[k] > floors[k]+1e-9 {
			break // the dearer tiers wait until this one is at its floor
		}
	}
	if !lowered {
		budget, top := t.spec.MaxStep, true
		for i := len(tiers) - 1; i >= 0; i-- { // dearest first
			k, ceil := tiers[i].Name, t.spec.Ceiling
			g := w[k]
			if !top {
				g = min(g, floors[k]) // a dearer tier is lowered: this one stays at its floor
			}
			if budget > 1e-9 && (g > next[k]+t.spec.Hysteresis-1e-9 || (g > next[k]+1e-9 && g >= ceil-1e-9)) {
				v := min(g, next[k]+budget)
				budget -= v - next[k]
				next[k] = v
			}
			top = top && next[k] >= ceil-1e-9
		}
	}
	for _, tr := range tiers {
		k, cur := tr.Name, t.tau[tr.Name]
		v := t.clampTier(tr, math.Round(next[k]*1e6)/1e6)
		switch {
		case v < cur-1e-9 && !brownout && ordered[k]:
			d.Reasons = append(d.Reasons, Reason{ReasonLowered, fmt.Sprintf("tier %q: τ %.2f → %.2f: a dearer tier is lowered, so this cheaper one goes to its quality floor first", k, cur, v)})
		case v < cur-1e-9 && !brownout:
			d.Reasons = append(d.Reasons, Reason{ReasonLowered, fmt.Sprintf("tier %q: τ %.2f → %.2f to meet the SLO", k, cur, v)})
		case v > cur+1e-9 && onMeasure[k]:
			d.Reasons = append(d.Reasons, Reason{ReasonRaised, fmt.Sprintf("tier %q: τ %.2f → %.2f, the latency measured at %.2f allows it", k, cur, v, cur)})
		case v > cur+1e-9:
			d.Reasons = append(d.Reasons, Reason{ReasonRaised, fmt.Sprintf("tier %q: τ %.2f → %.2f, demand allows it", k, cur, v)})
		case v == cur && v < t.spec.Ceiling-1e-9:
			d.Reasons = append(d.Reasons, Reason{ReasonHeld, fmt.Sprintf("tier %q: τ %.2f held: %s%s", k, cur, t.heldBy(k, want[k], w[k], cooling, d.Replicas), t.retryNote(k))})
		case v == cur:
			d.Reasons = append(d.Reasons, Reason{ReasonHeld, fmt.Sprintf("tier %q: τ %.2f held", k, cur)})
		}
		if tp, ok := t.tried[k]; ok && !tp.failed && !onMeasure[k] && v > tp.tau+1e-9 {
			delete(t.tried, k) // the model raised past the measured raise: its prediction carries it
		}
		t.tau[k] = v
		d.Tau[k] = v
	}
}

// explore returns, per tier, the highest τ within MaxStep above the τ in force that the
// latency measured this interval allows by itself (the window's p95 scaled by the predicted
// depth ratio stays within exploreMargin of the SLO; absent where none), with that p95, and
// the tiers whose τ in force the measured latency keeps (p95 within holdMargin of the SLO:
// the model may not lower them outside a brownout; a window that misses still lowers them in
// correct). Neither is given unless settled: the replicas ready and wanted stayed the same
// over this interval and the one before, and no scale-down is pending (headroom that is about
// to go, or that was measured on other replicas, says nothing). A raise it made is kept from
// the model too until a window has measured it (for pendingDecisions at most): the window
// after a change mostly ran under the old τ.
//
// The capacity model takes the token rate as a demand that does not depend on τ (arrivals
// that do not wait for answers). Clients that send their next request when the last one ends
// (a fixed concurrency, as benchmark clients and chat users do) lower their token rate as τ
// rises, so their loop-step load does not grow, and the model alone would hold τ low for ever
// once they are few. This raises τ on what was measured, at most MaxStep per decision, never
// from a window that queued, missed, or was not mostly under the τ in force; a raise whose
// window then misses the SLO or queues is lowered again by correct, and after any such window
// no raise is made on measured headroom until the latency measured has fallen to retryLatency
// of what it was, or the back-off (retryAfter) has passed. A miss at a τ whose last
// outlierWindows windows met the SLO with room is taken for an outlier and not recorded.
func (t *Tuner) explore(obs Observation, hot, settled bool) (map[string]tried, map[string]bool) {
	out, holds := map[string]tried{}, map[string]bool{}
	slo := t.spec.TokenLatencyP95.Seconds()
	for _, tr := range t.spec.Tiers {
		k, cur := tr.Name, t.tau[tr.Name]
		w := obs.Windows[k]
		tp, ok := t.tried[k]
		if ok && tp.failed && tp.p95 == 0 && w != nil && w.Tau == cur && cur <= tp.tau+1e-9 && w.TokenLatencyP95 > 0 {
			tp.p95 = w.TokenLatencyP95 // the first window after the failure: the load it failed at
			t.tried[k] = tp
		}
		run := t.good[k]
		if run.tau != cur {
			run = goodRun{tau: cur}
		}
		switch {
		case hot && run.n >= outlierWindows:
			// an outlier at a τ that met the SLO with room until now: no failure recorded
		case hot && ok && tp.failed && tp.tau <= cur+1e-9:
			tp.at = t.decisions // still missing at this load: the back-off starts again
			t.tried[k] = tp
		case hot:
			// measured: cur misses or queues at this load (a raise on measured headroom failed,
			// or a τ the load outgrew; a failure at a higher τ goes on to this lower one)
			fails := tp.fails
			if !ok || !tp.failed {
				fails++
			}
			t.tried[k] = tried{tau: cur, failed: true, at: t.decisions, fails: fails}
		}
		measured := slo > 0 && !hot && settled && w != nil && w.Tokens >= minExploreTokens && w.Tau == cur && !w.Saturated() &&
			w.TokenLatencyP95 > 0 && w.Seconds >= 0.5*w.Interval
		pending := ok && !tp.failed && cur >= tp.tau-1e-9
		if hot {
			run.n = 0
		}
		if !measured {
			t.good[k] = run
			// a raise on measured headroom not yet measured itself is kept from the model
			holds[k] = pending && !hot && t.decisions-tp.at <= pendingDecisions
			continue
		}
		holds[k] = w.TokenLatencyP95 <= holdMargin*slo
		if holds[k] {
			run.n++
		} else {
			run.n = 0
		}
		t.good[k] = run
		if pending && holds[k] {
			delete(t.tried, k) // a window at the raised τ met the SLO with room: the raise held
		}
		if cur >= t.spec.Ceiling-1e-9 {
			continue
		}
		tp, ok = t.tried[k]
		if ok && tp.failed && !(tp.p95 > 0 && w.TokenLatencyP95 <= retryLatency*tp.p95) && t.decisions-tp.at < retryAfter(tp.fails) {
			continue // the gap up to tp.tau was measured at this load lately: the model decides it
		}
		dep := t.depth(k, cur)
		limit := min(t.spec.Ceiling, cur+t.spec.MaxStep)
		best := 0.0
		for _, v := range t.taus(tr) {
			if v > limit+1e-9 || v <= cur+1e-9 {
				continue
			}
			dv := t.depth(k, v)
			if t.spec.MaxMeanDepth > 0 && dv > t.spec.MaxMeanDepth+1e-9 {
				continue
			}
			if w.TokenLatencyP95*dv/dep <= exploreMargin*slo {
				best = max(best, v)
			}
		}
		if best > cur+1e-9 {
			out[k] = tried{tau: best, p95: w.TokenLatencyP95, fails: tp.fails}
		}
	}
	return out, holds
}

// minExploreTokens is the fewest tokens of a window whose latency explore trusts.
const minExploreTokens = 50

// heldBy says why tier k, below the ceiling, kept its τ (want is its target of this decision,
// w that target after the guards of step, n the replicas decided): what an operator reads to
// tell a model limit from a guard.
func (t *Tuner) heldBy(k string, want, w float64, cooling bool, n int) string {
	cur := t.tau[k]
	switch {
	case w < cur-1e-9:
		return fmt.Sprintf("the latency measured at it is within %.0f%% of the SLO; the model's %.2f waits for a window that misses", holdMargin*100, w)
	case cooling:
		return "a recent window missed the SLO or queued"
	case want > cur+1e-9:
		if b, ok := t.block[k]; ok && want >= b.tau-1e-9 {
			return fmt.Sprintf("τ %.2f missed the SLO at %.0f tokens/s per replica; waiting for the rate to fall", b.tau, b.rate)
		}
		return fmt.Sprintf("target %.2f within the hysteresis %.2f", want, t.spec.Hysteresis)
	}
	up := maps.Clone(t.tau)
	up[k] = min(t.spec.Ceiling, math.Round((cur+grid)*Bins)/Bins)
	dep := t.depth(k, up[k])
	load := t.demandAt(up) / float64(max(n, 1))
	switch {
	case t.spec.MaxMeanDepth > 0 && dep > t.spec.MaxMeanDepth+1e-9:
		return fmt.Sprintf("τ %.2f predicts depth %.2f above maxMeanDepth %.2f", up[k], dep, t.spec.MaxMeanDepth)
	case t.capy.LoopStepsPerSecond > 0 && load >= t.capy.LoopStepsPerSecond*maxLoad:
		return fmt.Sprintf("τ %.2f predicts %.0f loop steps/s per replica, at its capacity %.0f", up[k], load, t.capy.LoopStepsPerSecond)
	case t.capy.Known():
		return fmt.Sprintf("τ %.2f predicts latency p95 %s at depth %.2f and %.0f loop steps/s per replica (capacity %.0f, step %s)",
			up[k], time.Duration(t.capy.ITL(dep, load)*float64(time.Second)).Round(time.Microsecond), dep, load, t.capy.LoopStepsPerSecond, time.Duration(t.capy.StepTime*float64(time.Second)).Round(time.Microsecond))
	}
	return fmt.Sprintf("τ %.2f predicts %.0f loop steps/s per replica, above the target utilisation", up[k], load)
}

// retryNote says, for a held τ, when measured headroom will be tried again after a failure
// (empty when none is recorded).
func (t *Tuner) retryNote(k string) string {
	tp, ok := t.tried[k]
	if !ok || !tp.failed {
		return ""
	}
	left := tp.at + retryAfter(tp.fails) - t.decisions
	if left <= 0 {
		return ""
	}
	note := fmt.Sprintf("; τ %.2f missed at this load: measured headroom is tried again in %d decisions", tp.tau, left)
	if tp.p95 > 0 {
		note += fmt.Sprintf(" or once the latency p95 falls to %s", time.Duration(retryLatency*tp.p95*float64(time.Second)).Round(time.Microsecond))
	}
	return note
}

// order restores the brownout order in taus: every tier cheaper than one below the ceiling
// goes down to its quality floor if it is above it. It returns the tiers it lowered.
func (t *Tuner) order(taus, floors map[string]float64) map[string]bool {
	moved := map[string]bool{}
	lowered := false
	for i := len(t.spec.Tiers) - 1; i >= 0; i-- { // dearest first
		k := t.spec.Tiers[i].Name
		if lowered && taus[k] > floors[k]+1e-9 {
			taus[k] = floors[k]
			moved[k] = true
		}
		lowered = lowered || taus[k] < t.spec.Ceiling-1e-9
	}
	return moved
}

// rate is the token rate per replica with n replicas (all tiers).
func (t *Tuner) rate(n int) float64 {
	s := 0.0
	for _, v := range t.demand {
		s += v
	}
	return s / float64(max(n, 1))
}

// holdReplicas keeps the current replica count within bounds.
func (t *Tuner) holdReplicas(obs Observation) int {
	return min(max(t.replicas, t.spec.MinReplicas), t.spec.MaxReplicas)
}

// scaledDown is a scale-down to n replicas at a total token demand (tokens/s).
type scaledDown struct {
	at     time.Time
	n      int
	demand float64
}

// scale moves replicas toward want: up at once; down to the highest target of the last
// ScaleDownDelay (the stabilisation window: a target below the current count must have held
// that long), except that replicas still starting are dropped at once when the ready ones
// suffice (they serve nothing yet; the delay guards serving capacity, not a cold start
// nobody needs). A scale-down that a scale-up undoes within ScaleDownDelay, while the token
// rate served is still within 1/blockRelief of the demand it was made at (the model misjudged
// that load; not a burst), blocks the next one to as few replicas until the demand has fallen
// by blockRelief (see downBlock).
func (t *Tuner) scale(obs Observation, want int, target map[string]float64, d *Decision) {
	cur := t.replicas
	start := obs.Now.Add(-t.spec.ScaleDownDelay)
	t.recent = window(t.recent, stampedTarget{obs.Now, want}, start)
	hi := want
	for _, r := range t.recent {
		hi = max(hi, r.n)
	}
	if t.recent[0].at.After(start) {
		hi = max(hi, cur) // the history is shorter than the delay
	}
	ready := cur - max(obs.StartingReplicas, 0)
	demand := t.rate(1)
	if b := t.downBlock; b.n > 0 && demand < blockRelief*b.demand {
		t.downBlock = scaledDown{}
	}
	floor := t.downBlock.n + 1 // the fewest replicas a scale-down may go to (1 when unblocked)
	switch {
	case want > cur:
		if l := t.lastDown; l.n == cur && !obs.Now.After(l.at.Add(t.spec.ScaleDownDelay)) && t.served <= l.demand/blockRelief {
			t.downBlock = l // the scale-down to cur was undone within the delay at the load it was made for
		}
		t.replicas = want
		d.Reasons = append(d.Reasons, Reason{ReasonScaledUp, fmt.Sprintf("replicas %d → %d for %.0f loop steps/s", cur, want, t.demandAt(target))})
	case want < cur && hi < cur && floor >= cur:
		b := t.downBlock
		d.Reasons = append(d.Reasons, Reason{ReasonScaleDownPending, fmt.Sprintf("%d replicas would do, but a scale-down to %d was undone at once %s ago: waiting for the demand to fall below %.0f tokens/s",
			want, b.n, obs.Now.Sub(b.at).Round(time.Second), blockRelief*b.demand)})
	case want < cur && hi < cur:
		t.replicas = max(hi, floor)
		t.lastDown = scaledDown{at: obs.Now, n: t.replicas, demand: demand}
		d.Reasons = append(d.Reasons, Reason{ReasonScaledDown, fmt.Sprintf("replicas %d → %d: demand stayed low for %s", cur, t.replicas, t.spec.ScaleDownDelay)})
	case want < cur && obs.StartingReplicas > 0 && t.replicasFor(target, cancelMargin) <= ready:
		t.replicas = max(ready, 1)
		d.Reasons = append(d.Reasons, Reason{ReasonScaledDown, fmt.Sprintf("replicas %d → %d: the %d still starting are no longer needed", cur, t.replicas, cur-t.replicas)})
	case want < cur:
		d.Reasons = append(d.Reasons, Reason{ReasonScaleDownPending, fmt.Sprintf("%d replicas would do; waiting out scaleDownDelay %s", want, t.spec.ScaleDownDelay)})
	}
	t.replicas = min(max(t.replicas, t.spec.MinReplicas), t.spec.MaxReplicas)
	if t.replicas == t.spec.MaxReplicas && want >= t.spec.MaxReplicas && t.spec.MaxReplicas > t.spec.MinReplicas {
		d.Reasons = append(d.Reasons, Reason{ReasonAtMaxReplicas, fmt.Sprintf("at maxReplicas %d", t.spec.MaxReplicas)})
	}
	d.Replicas = t.replicas
}

// patient returns the replica target to act on: want once it has held for ScaleUpDelay (the
// lowest target of that window), and meanwhile at least the replicas the demand needs with
// every tier at its quality floor, so that the wait never asks brownout for more than the
// quality floors allow.
func (t *Tuner) patient(obs Observation, want int, floors map[string]float64) int {
	if t.spec.ScaleUpDelay <= 0 {
		return want
	}
	t.upRecent = window(t.upRecent, stampedTarget{obs.Now, want}, obs.Now.Add(-t.spec.ScaleUpDelay))
	lo := want
	for _, r := range t.upRecent {
		lo = min(lo, r.n)
	}
	if t.upRecent[0].at.After(obs.Now.Add(-t.spec.ScaleUpDelay)) {
		lo = min(lo, t.replicas) // the history is shorter than the delay
	}
	if lo >= want {
		return want
	}
	return min(want, max(lo, t.fewest(floors)))
}

// fewest is the fewest replicas (within bounds) on which taus meet the SLO at the demand.
func (t *Tuner) fewest(taus map[string]float64) int {
	lo := min(max(t.replicasFor(taus, 1), t.spec.MinReplicas), t.spec.MaxReplicas)
	if t.fits(taus, lo) {
		return lo
	}
	hi := t.spec.MaxReplicas
	if !t.fits(taus, hi) {
		return hi
	}
	for hi-lo > 1 { // fits at hi, not at lo
		mid := (lo + hi) / 2
		if t.fits(taus, mid) {
			hi = mid
		} else {
			lo = mid
		}
	}
	return hi
}

// window appends s to w and drops the targets older than start, keeping the newest one at or
// before it (it was in force at start).
func window(w []stampedTarget, s stampedTarget, start time.Time) []stampedTarget {
	w = append(w, s)
	for len(w) > 1 && !w[1].at.After(start) {
		w = w[1:]
	}
	return w
}

// stampedTarget is one decision's replica target.
type stampedTarget struct {
	at time.Time
	n  int
}

// predict fills the decision's predictions at its τ on the ready replicas.
func (t *Tuner) predict(ready int, d *Decision) {
	var dw, tw float64
	lcb := math.NaN()
	for _, tr := range t.spec.Tiers {
		dep := t.depth(tr.Name, d.Tau[tr.Name])
		n := t.demand[tr.Name]
		dw += dep * n
		tw += n
		if w := t.hist[tr.Name]; w != nil && w.Probes > 0 {
			l := w.AgreementLCB(d.Tau[tr.Name], t.spec.Confidence)
			if math.IsNaN(lcb) || l < lcb {
				lcb = l
			}
		}
	}
	d.PredictedDepth = math.NaN()
	if tw > 0 {
		d.PredictedDepth = dw / tw
	}
	d.PredictedAgreementLCB = lcb
	if t.capy.Known() && ready > 0 && tw > 0 {
		worst := 0.0
		load := t.demandAt(d.Tau) / float64(ready)
		for _, tr := range t.spec.Tiers {
			if t.demand[tr.Name] > 0 {
				worst = max(worst, t.capy.ITL(t.depth(tr.Name, d.Tau[tr.Name]), load))
			}
		}
		if !math.IsInf(worst, 0) {
			d.PredictedLatency = time.Duration(worst * float64(time.Second))
		} else {
			d.PredictedLatency = time.Duration(math.MaxInt64)
		}
	}
}
