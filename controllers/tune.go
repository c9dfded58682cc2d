package controllers

import (
	"cmp"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/gatepolicy"
)

// defaultTuningInterval applies when spec.tuning.interval is unset.
const defaultTuningInterval = 30 * time.Second

// tuningMode is spec.tuning.mode, off when unset.
func tuningMode(lm *v1alpha1.LoopModel) v1alpha1.TuningMode {
	return cmp.Or(lm.Spec.Tuning.Mode, v1alpha1.TuningOff)
}

func tuningInterval(lm *v1alpha1.LoopModel) time.Duration {
	if i := lm.Spec.Tuning.Interval; i != nil && i.Duration > 0 {
		return i.Duration
	}
	return defaultTuningInterval
}

// floorThreshold is spec.loop.minExitThreshold, or the spec's threshold when unset (never lowered).
func floorThreshold(lm *v1alpha1.LoopModel) float64 {
	if f := lm.Spec.Loop.MinExitThreshold; f != nil && *f > 0 && *f <= lm.Spec.Loop.ExitThreshold {
		return *f
	}
	return lm.Spec.Loop.ExitThreshold
}

// policySpec is what gatepolicy honours for a LoopModel: a pure function of its spec.
func policySpec(lm *v1alpha1.LoopModel) gatepolicy.Spec {
	s := lm.Spec
	ps := gatepolicy.Spec{
		Ceiling:     s.Loop.ExitThreshold,
		Floor:       floorThreshold(lm),
		MaxSteps:    int(cmp.Or(s.Loop.MaxSteps, 4)),
		MinReplicas: int(max(s.Scaling.MinReplicas, 1)),
		MaxReplicas: int(max(s.Scaling.MaxReplicas, s.Scaling.MinReplicas, 1)),
	}
	if m := s.Tuning.MaxStep; m != nil {
		ps.MaxStep = *m
	}
	if d := s.Scaling.ScaleDownDelay; d != nil {
		ps.ScaleDownDelay = d.Duration
	}
	if d := s.Scaling.ScaleUpDelay; d != nil {
		ps.ScaleUpDelay = d.Duration
	}
	if t := s.Scaling.TargetLoopStepsPerReplica; t != nil {
		ps.TargetLoopStepsPerReplica = float64(*t)
	}
	if t := s.SLO.TokenLatencyP95; t != nil {
		ps.TokenLatencyP95 = t.Duration
	}
	if d := s.SLO.MaxMeanDepth; d != nil {
		ps.MaxMeanDepth = *d
	}
	if a := s.SLO.MinAgreement; a != nil {
		ps.MinAgreement = *a
	}
	// Tiers are listed cheapest first: the list position is the brownout order.
	ps.DefaultTier = s.DefaultTier
	for i, t := range s.Tiers {
		ps.Tiers = append(ps.Tiers, gatepolicy.Tier{Name: t.Name, Floor: tierFloor(lm, t), MinDepth: ptrOr(t.MinDepth), BrownoutOrder: i})
	}
	return ps
}

func ptrOr(p *float64) float64 {
	if p == nil {
		return 0
	}
	return *p
}

// tierFloor is a tier's minExitThreshold, or the spec's floor when unset.
func tierFloor(lm *v1alpha1.LoopModel, t v1alpha1.Tier) float64 {
	if m := t.MinExitThreshold; m != nil {
		return *m
	}
	return floorThreshold(lm)
}

// checkTiers is the operator's own check of spec.tiers (the API server's rules may be older
// than the operator): unique DNS-label names, a default tier among them, floors within
// [spec.loop.minExitThreshold, spec.loop.exitThreshold], minDepth within [1, maxSteps].
func checkTiers(lm *v1alpha1.LoopModel) error {
	s := lm.Spec
	if len(s.Tiers) == 0 {
		if s.DefaultTier != "" {
			return fmt.Errorf("spec.defaultTier %q is set without spec.tiers", s.DefaultTier)
		}
		return nil
	}
	lo, hi := floorThreshold(lm), s.Loop.ExitThreshold
	seen := map[string]bool{}
	for i, t := range s.Tiers {
		switch {
		case !bus.ValidTierName(t.Name):
			return fmt.Errorf("spec.tiers[%d].name %q is not a DNS label", i, t.Name)
		case seen[t.Name]:
			return fmt.Errorf("spec.tiers[%d].name %q is used twice", i, t.Name)
		case t.MinExitThreshold != nil && !(*t.MinExitThreshold >= lo && *t.MinExitThreshold <= hi):
			return fmt.Errorf("spec.tiers[%d] (%s): minExitThreshold %g outside [%g, %g] (spec.loop.minExitThreshold, exitThreshold)", i, t.Name, *t.MinExitThreshold, lo, hi)
		case t.MinDepth != nil && !(*t.MinDepth >= 1 && *t.MinDepth <= float64(cmp.Or(s.Loop.MaxSteps, 4))):
			return fmt.Errorf("spec.tiers[%d] (%s): minDepth %g outside [1, %d] (spec.loop.maxSteps)", i, t.Name, *t.MinDepth, cmp.Or(s.Loop.MaxSteps, 4))
		}
		seen[t.Name] = true
	}
	if !seen[s.DefaultTier] {
		return fmt.Errorf("spec.defaultTier %q is not one of spec.tiers", s.DefaultTier)
	}
	return nil
}

// thresholdsInForce is what the workers apply per tier: the spec's exitThreshold for every
// tier, or in auto tuning mode, once the loop has decided, the tuned status.tiers
// (status.exitThreshold without tiers), each kept within [its floor, exitThreshold] so that a
// spec edit bounds it at once. The default tier's τ is also ExitThreshold.
func thresholdsInForce(lm *v1alpha1.LoopModel) bus.Thresholds {
	spec := lm.Spec.Loop.ExitThreshold
	tuned := tuningMode(lm) == v1alpha1.TuningAuto && lm.Status.LastTuneTime != nil
	in := func(v, floor float64) float64 {
		if !tuned || !(v > 0) {
			return spec
		}
		return min(max(v, floor), spec)
	}
	if len(lm.Spec.Tiers) == 0 {
		return bus.Thresholds{ExitThreshold: in(lm.Status.ExitThreshold, floorThreshold(lm))}
	}
	th := bus.Thresholds{DefaultTier: lm.Spec.DefaultTier, Tiers: make(map[string]float64, len(lm.Spec.Tiers))}
	for _, t := range lm.Spec.Tiers {
		th.Tiers[t.Name] = in(statusTier(lm.Status.Tiers, t.Name), tierFloor(lm, t))
	}
	th.ExitThreshold = th.Tiers[th.DefaultTier]
	return th
}

func statusTier(ts []v1alpha1.TierStatus, name string) float64 {
	for _, t := range ts {
		if t.Name == name {
			return t.ExitThreshold
		}
	}
	return 0
}

// tierStatuses lists taus in the order of spec.tiers (nil without tiers).
func tierStatuses(lm *v1alpha1.LoopModel, taus map[string]float64) []v1alpha1.TierStatus {
	var out []v1alpha1.TierStatus
	for _, t := range lm.Spec.Tiers {
		out = append(out, v1alpha1.TierStatus{Name: t.Name, ExitThreshold: taus[t.Name]})
	}
	return out
}

// tuners keeps one gatepolicy.Tuner per LoopModel, since its state (last τ, capacity fit,
// scale-down candidate) spans intervals; it is rebuilt when the policy spec changes. Safe for
// concurrent use. The full reconcile and the stats path may refresh one LoopModel at once:
// each tunerOf serialises its decisions and holds the last one, so that both paths write the
// same decision into status however stale their cached copy of the LoopModel is.
type tuners struct {
	mu sync.Mutex
	m  map[bus.Ref]*tunerOf
}

type tunerOf struct {
	spec  gatepolicy.Spec
	tuner *gatepolicy.Tuner

	mu   sync.Mutex               // held for a decision and while its result is read
	at   time.Time                // when the last decision was taken; zero before the first
	mode v1alpha1.TuningMode      // the mode it was taken in
	rec  *v1alpha1.Recommendation // the last decision
}

func (ts *tuners) get(r bus.Ref, spec gatepolicy.Spec) (*tunerOf, error) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if t, ok := ts.m[r]; ok && equalSpec(t.spec, spec) {
		return t, nil
	}
	t, err := gatepolicy.NewTuner(spec)
	if err != nil {
		return nil, err
	}
	if ts.m == nil {
		ts.m = make(map[bus.Ref]*tunerOf)
	}
	to := &tunerOf{spec: spec, tuner: t}
	ts.m[r] = to
	return to, nil
}

func (ts *tuners) forget(r bus.Ref) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	delete(ts.m, r)
}

func equalSpec(a, b gatepolicy.Spec) bool {
	return fmt.Sprint(a) == fmt.Sprint(b) // plain values and slices of plain values
}

// tune runs one step of the tuning loop when the mode asks for it and an interval has passed
// since the last decision: the workers' stats of the last interval go to gatepolicy, whose
// decision fills status.recommendation and status.lastTuneTime. In auto mode its thresholds
// become status.exitThreshold (the default tier's) and status.tiers, the thresholds in force
// (thresholdsInForce), and its replicas the replicas in force (replicasInForce), which the full
// reconcile then writes to the ConfigMap, the registry entry, the workers and the Deployment.
// Between decisions it writes the last decision again, so a status write lost to a conflict is
// not a decision lost. Off clears what an earlier mode reported.
func (r *LoopModelReconciler) tune(lm *v1alpha1.LoopModel, now time.Time) {
	st := &lm.Status
	mode := tuningMode(lm)
	if mode == v1alpha1.TuningOff || r.stats == nil {
		st.Recommendation = nil
		return
	}
	to, err := r.tuners.get(ref(lm), policySpec(lm))
	if err != nil {
		th := thresholdsInForce(lm)
		st.Recommendation = &v1alpha1.Recommendation{ExitThreshold: th.ExitThreshold, Tiers: tierStatuses(lm, th.Tiers),
			Replicas: replicasInForce(lm), Reasons: []string{"InvalidSpec: " + err.Error()}}
		return
	}
	to.mu.Lock()
	defer to.mu.Unlock()
	if to.rec == nil || to.mode != mode || now.Sub(to.at) >= tuningInterval(lm) {
		to.rec, to.at, to.mode = r.decide(lm, to.tuner, now), now, mode
		if mode == v1alpha1.TuningAuto {
			r.announce(lm, to.rec)
		}
	}
	// Seconds: the API server keeps no finer time, and a finer one would differ at every write.
	st.LastTuneTime = &metav1.Time{Time: to.at.Truncate(time.Second)}
	st.Recommendation = to.rec.DeepCopy()
	if mode == v1alpha1.TuningAuto && to.rec.ExitThreshold > 0 {
		st.ExitThreshold = to.rec.ExitThreshold
		st.Tiers = slices.Clone(to.rec.Tiers)
	}
}

// decide asks the tuner for the decision of the interval that ends now, from the stats of
// that interval (one window per tier) and the thresholds and replicas in force.
func (r *LoopModelReconciler) decide(lm *v1alpha1.LoopModel, t *gatepolicy.Tuner, now time.Time) *v1alpha1.Recommendation {
	st := &lm.Status
	interval := tuningInterval(lm)
	taus := thresholdsInForce(lm).PerTier()
	wins := r.stats.policyWindows(ref(lm), taus, lm.Spec.DefaultTier, t.Spec().MaxSteps, now, interval)
	desired := int(replicasInForce(lm))
	d := t.Decide(gatepolicy.Observation{
		Now:              now,
		Windows:          wins,
		Tau:              taus,
		ReadyReplicas:    int(st.ReadyReplicas),
		DesiredReplicas:  desired,
		StartingReplicas: max(desired-int(st.ReadyReplicas), 0),
	})
	r.tuneMetrics(lm, d)
	rec := &v1alpha1.Recommendation{ExitThreshold: d.Tau[lm.Spec.DefaultTier], Tiers: tierStatuses(lm, d.Tau),
		Replicas: int32(d.Replicas), SLOReachable: d.SLOReachable}
	if !math.IsNaN(d.PredictedDepth) {
		rec.PredictedMeanDepth = round3(d.PredictedDepth)
	}
	if d.PredictedLatency > 0 {
		rec.PredictedTokenLatencyP95 = &metav1.Duration{Duration: d.PredictedLatency.Round(time.Microsecond)}
	}
	for _, reason := range d.Reasons {
		rec.Reasons = append(rec.Reasons, truncate(reason.Code+": "+reason.Message, maxMessage))
	}
	return rec
}

// announce records an event for each thing an auto-mode decision changes: the thresholds in
// force (one event naming every tier that moved) and the replicas in force, with the
// decision's reasons.
func (r *LoopModelReconciler) announce(lm *v1alpha1.LoopModel, rec *v1alpha1.Recommendation) {
	why := truncate(fmt.Sprint(rec.Reasons), maxMessage)
	if rec.ExitThreshold > 0 {
		taus := thresholdsInForce(lm).PerTier()
		next := map[string]float64{lm.Spec.DefaultTier: rec.ExitThreshold}
		for _, t := range rec.Tiers {
			next[t.Name] = t.ExitThreshold
		}
		var changes []string
		reason := EventThresholdRaised
		for _, k := range slices.Sorted(maps.Keys(taus)) {
			was, to := taus[k], next[k]
			if !(to > 0) || sameThreshold(was, to) {
				continue
			}
			if to < was {
				reason = EventThresholdLowered
			}
			if k == "" {
				changes = append(changes, fmt.Sprintf("from %g to %g", was, to))
			} else {
				changes = append(changes, fmt.Sprintf("tier %s from %g to %g", k, was, to))
			}
		}
		if len(changes) > 0 {
			r.Events.Eventf(lm, nil, corev1.EventTypeNormal, reason, "Tune", "exit threshold tuned %s: %s", strings.Join(changes, ", "), why)
		}
	}
	if n, want := replicasInForce(lm), clampReplicas(lm, rec.Replicas); want != n {
		reason := EventScaledDown
		if want > n {
			reason = EventScaledUp
		}
		r.Events.Eventf(lm, nil, corev1.EventTypeNormal, reason, "Tune", "workers tuned from %d to %d: %s", n, want, why)
	}
}
