package controllers

import (
	"cmp"
	"fmt"
	"math"
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
	return ps
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
// decision fills status.recommendation and status.lastTuneTime. In auto mode its threshold
// becomes status.exitThreshold (thresholdInForce) and its replicas the replicas in force
// (replicasInForce), which the full reconcile then writes to the ConfigMap, the registry entry,
// the workers and the Deployment. Between decisions it writes the last decision again, so a
// status write lost to a conflict is not a decision lost. Off clears what an earlier mode
// reported.
func (r *LoopModelReconciler) tune(lm *v1alpha1.LoopModel, now time.Time) {
	st := &lm.Status
	mode := tuningMode(lm)
	if mode == v1alpha1.TuningOff || r.stats == nil {
		st.Recommendation = nil
		return
	}
	to, err := r.tuners.get(ref(lm), policySpec(lm))
	if err != nil {
		st.Recommendation = &v1alpha1.Recommendation{ExitThreshold: thresholdInForce(lm), Replicas: replicasInForce(lm),
			Reasons: []string{"InvalidSpec: " + err.Error()}}
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
	}
}

// decide asks the tuner for the decision of the interval that ends now, from the stats of
// that interval and the τ and replicas in force.
func (r *LoopModelReconciler) decide(lm *v1alpha1.LoopModel, t *gatepolicy.Tuner, now time.Time) *v1alpha1.Recommendation {
	st := &lm.Status
	interval := tuningInterval(lm)
	tau := thresholdInForce(lm)
	win := r.stats.policyWindow(ref(lm), tau, t.Spec().MaxSteps, now, interval)
	desired := int(replicasInForce(lm))
	d := t.Decide(gatepolicy.Observation{
		Now:              now,
		Windows:          map[string]*gatepolicy.Window{"": win},
		Tau:              map[string]float64{"": tau},
		ReadyReplicas:    int(st.ReadyReplicas),
		DesiredReplicas:  desired,
		StartingReplicas: max(desired-int(st.ReadyReplicas), 0),
	})
	r.tuneMetrics(lm, d)
	rec := &v1alpha1.Recommendation{ExitThreshold: d.Tau[""], Replicas: int32(d.Replicas), SLOReachable: d.SLOReachable}
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

// announce records an event for each thing an auto-mode decision changes: the threshold in
// force and the replicas in force, with the decision's reasons.
func (r *LoopModelReconciler) announce(lm *v1alpha1.LoopModel, rec *v1alpha1.Recommendation) {
	why := truncate(fmt.Sprint(rec.Reasons), maxMessage)
	if tau := thresholdInForce(lm); rec.ExitThreshold > 0 && !sameThreshold(rec.ExitThreshold, tau) {
		reason := EventThresholdLowered
		if rec.ExitThreshold > tau {
			reason = EventThresholdRaised
		}
		r.Events.Eventf(lm, nil, corev1.EventTypeNormal, reason, "Tune", "exit threshold tuned from %g to %g: %s", tau, rec.ExitThreshold, why)
	}
	if n, want := replicasInForce(lm), clampReplicas(lm, rec.Replicas); want != n {
		reason := EventScaledDown
		if want > n {
			reason = EventScaledUp
		}
		r.Events.Eventf(lm, nil, corev1.EventTypeNormal, reason, "Tune", "workers tuned from %d to %d: %s", n, want, why)
	}
}
