package controllers

import (
	"fmt"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/loopserve/loopserve/api/v1alpha1"
)

// rollout summarises the worker Deployment and, while it is incomplete, its pods.
type rollout struct {
	desired, replicas, ready, updated int32
	current                           bool   // the Deployment controller has seen the latest spec
	problem                           string // a Degraded reason found in pods or the Deployment, or ""
	message                           string
}

// available: enough ready workers to serve, possibly some still on the previous spec. It is
// what the Ready condition means.
func (ro rollout) available() bool { return ro.ready >= ro.desired && ro.desired > 0 }

// routable: at least one worker is ready, so the registry entry lets the gateway queue
// requests. A scale-up (fewer ready than desired for a while) is no outage.
func (ro rollout) routable() bool { return ro.ready > 0 }

// complete: every worker runs the current spec and is ready, and no old pod is left.
func (ro rollout) complete() bool {
	return ro.current && ro.updated >= ro.desired && ro.replicas == ro.updated && ro.available()
}

// maxMessage bounds a pod's termination message quoted in a condition.
const maxMessage = 512

func summarize(dep *appsv1.Deployment, pods []corev1.Pod) rollout {
	ro := rollout{
		replicas: dep.Status.Replicas,
		ready:    dep.Status.ReadyReplicas,
		updated:  dep.Status.UpdatedReplicas,
		current:  dep.Status.ObservedGeneration >= dep.Generation,
	}
	if dep.Spec.Replicas != nil {
		ro.desired = *dep.Spec.Replicas
	}
	for _, c := range dep.Status.Conditions {
		if c.Type == appsv1.DeploymentProgressing && c.Status == corev1.ConditionFalse && c.Reason == "ProgressDeadlineExceeded" {
			ro.problem, ro.message = ReasonRolloutStalled, c.Message
		}
	}
	for _, p := range pods {
		for _, cs := range append(append([]corev1.ContainerStatus(nil), p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
			w := cs.State.Waiting
			if w == nil {
				continue
			}
			switch w.Reason {
			case "CrashLoopBackOff":
				msg := fmt.Sprintf("pod %s container %s is crash looping (%d restarts)", p.Name, cs.Name, cs.RestartCount)
				if t := cs.LastTerminationState.Terminated; t != nil && t.Message != "" {
					msg += ": " + truncate(t.Message, maxMessage)
				}
				// A crash loop says more than a stalled rollout: it wins.
				return withProblem(ro, ReasonCrashLooping, msg)
			case "ErrImagePull", "ImagePullBackOff", "InvalidImageName":
				ro.problem = ReasonImagePull
				ro.message = fmt.Sprintf("pod %s container %s: %s: %s", p.Name, cs.Name, w.Reason, truncate(w.Message, maxMessage))
			}
		}
	}
	return ro
}

func withProblem(ro rollout, reason, msg string) rollout {
	ro.problem, ro.message = reason, msg
	return ro
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// setStatus fills the status from one reconcile's outcome: the rollout and the NATS sync
// (refresh fills what the stats decide).
func (r *LoopModelReconciler) setStatus(lm *v1alpha1.LoopModel, p *plan, ro rollout, natsErr error) {
	st := &lm.Status
	st.Replicas = ro.replicas
	st.ReadyReplicas = ro.ready
	st.Selector = labels.SelectorFromSet(p.deployment.Spec.Selector.MatchLabels).String()

	switch {
	case natsErr != nil && unreachable(natsErr):
		r.setCondition(lm, degraded(lm, ReasonNATSUnreachable, natsErr.Error()))
	case natsErr != nil:
		r.setCondition(lm, degraded(lm, ReasonNATSError, natsErr.Error()))
	case ro.problem != "":
		r.setCondition(lm, degraded(lm, ro.problem, ro.message))
	default:
		r.setCondition(lm, cond(lm, CondDegraded, metav1.ConditionFalse, ReasonAsExpected, "no problem found"))
	}

	if ro.complete() {
		r.setCondition(lm, cond(lm, CondProgressing, metav1.ConditionFalse, ReasonRolloutDone,
			fmt.Sprintf("%d of %d workers run the current spec", ro.updated, ro.desired)))
	} else {
		r.setCondition(lm, cond(lm, CondProgressing, metav1.ConditionTrue, ReasonRollingOut,
			fmt.Sprintf("%d of %d workers updated, %d ready", ro.updated, ro.desired, ro.ready)))
	}

	switch {
	case natsErr != nil:
		reason := ReasonNATSError
		if unreachable(natsErr) {
			reason = ReasonNATSUnreachable
		}
		r.setCondition(lm, cond(lm, CondReady, metav1.ConditionFalse, reason, "the work queue on NATS is not in place"))
	case !ro.available():
		r.setCondition(lm, cond(lm, CondReady, metav1.ConditionFalse, ReasonPodsNotReady,
			fmt.Sprintf("%d of %d workers ready", ro.ready, ro.desired)))
	default:
		r.setCondition(lm, cond(lm, CondReady, metav1.ConditionTrue, ReasonAvailable,
			fmt.Sprintf("%d of %d workers ready; requests go to %s", ro.ready, ro.desired, ref(lm).RequestSubject())))
	}

	if natsErr == nil {
		st.NATSURL = p.resolved.NATSURL
		st.ExitThreshold = p.tau
		st.Tiers = tierStatuses(lm, p.thresholds.Tiers)
		st.ObservedGeneration = lm.Generation
	}
}

// refresh recomputes the part of the status that the workers' stats decide: the tuning
// decision (tune), status.observed and the SLOMet condition. It reads memory only (the stats
// book and the tuners), never the API or NATS: the full reconcile and the stats path both call it.
func (r *LoopModelReconciler) refresh(lm *v1alpha1.LoopModel, now time.Time) {
	r.tune(lm, now)
	st := &lm.Status
	if r.stats != nil {
		// Without stats in the window, status.observed goes: SLOMet never rests on old figures.
		st.Observed = nil
		if obs, ok := r.stats.observed(ref(lm), now, thresholdsInForce(lm)); ok {
			st.Observed = obs
		}
	}
	if c, ok := sloCondition(lm); ok {
		r.setCondition(lm, c)
	} else {
		meta.RemoveStatusCondition(&st.Conditions, CondSLOMet)
	}
}

// reportSpecError marks a LoopModel whose spec cannot be served; nothing else is changed, so
// workers of an earlier valid spec keep serving.
func (r *LoopModelReconciler) reportSpecError(lm *v1alpha1.LoopModel, se *specError) {
	r.setCondition(lm, degraded(lm, se.reason, se.msg))
	r.setCondition(lm, cond(lm, CondReady, metav1.ConditionFalse, se.reason, se.msg))
	lm.Status.ObservedGeneration = lm.Generation
}

func cond(lm *v1alpha1.LoopModel, typ string, status metav1.ConditionStatus, reason, msg string) metav1.Condition {
	return metav1.Condition{Type: typ, Status: status, Reason: reason, Message: truncate(msg, 2*maxMessage), ObservedGeneration: lm.Generation}
}

func degraded(lm *v1alpha1.LoopModel, reason, msg string) metav1.Condition {
	return cond(lm, CondDegraded, metav1.ConditionTrue, reason, msg)
}

// setCondition sets c and records an event when it marks a new problem or a finished rollout.
func (r *LoopModelReconciler) setCondition(lm *v1alpha1.LoopModel, c metav1.Condition) {
	var old *metav1.Condition
	if o := meta.FindStatusCondition(lm.Status.Conditions, c.Type); o != nil {
		old = o.DeepCopy() // SetStatusCondition updates the found element in place
	}
	meta.SetStatusCondition(&lm.Status.Conditions, c)
	if old != nil && old.Status == c.Status && old.Reason == c.Reason {
		return
	}
	switch {
	case c.Type == CondDegraded && c.Status == metav1.ConditionTrue:
		r.Events.Eventf(lm, nil, corev1.EventTypeWarning, c.Reason, "Reconcile", "%s", c.Message)
	case c.Type == CondProgressing && c.Status == metav1.ConditionFalse && (old == nil || old.Status == metav1.ConditionTrue):
		// old is nil for a first rollout, and also when the cache has not yet seen the
		// status write that set Progressing: both are a finished rollout.
		r.Events.Eventf(lm, nil, corev1.EventTypeNormal, EventRolledOut, "Rollout", "%s", c.Message)
	}
}

// sloCondition compares the observed statistics with the spec's SLO; ok is false when the
// spec sets no objective. The first objective missed names the reason.
func sloCondition(lm *v1alpha1.LoopModel) (metav1.Condition, bool) {
	slo, obs := lm.Spec.SLO, lm.Status.Observed
	if slo.TokenLatencyP95 == nil && slo.MaxMeanDepth == nil && slo.MinAgreement == nil {
		return metav1.Condition{}, false
	}
	if rec := lm.Status.Recommendation; rec != nil && !rec.SLOReachable && tuningMode(lm) == v1alpha1.TuningAuto {
		return cond(lm, CondSLOMet, metav1.ConditionFalse, ReasonSLOUnreachable,
			fmt.Sprintf("the SLO is not met even at the floor threshold %g with %d workers: running at the floor", floorThreshold(lm), rec.Replicas)), true
	}
	if obs == nil {
		return cond(lm, CondSLOMet, metav1.ConditionUnknown, ReasonNoStats, "no worker reported generated tokens under the threshold in force in the stats window"), true
	}
	if t := slo.TokenLatencyP95; t != nil && obs.TokenLatencyP95 != nil && obs.TokenLatencyP95.Duration > t.Duration {
		return cond(lm, CondSLOMet, metav1.ConditionFalse, ReasonLatencyHigh,
			fmt.Sprintf("P95 inter-token latency %v exceeds %v", obs.TokenLatencyP95.Duration, t.Duration)), true
	}
	if d := slo.MaxMeanDepth; d != nil && obs.MeanDepth > *d {
		return cond(lm, CondSLOMet, metav1.ConditionFalse, ReasonDepthHigh,
			fmt.Sprintf("mean depth %g exceeds %g", obs.MeanDepth, *d)), true
	}
	if a := slo.MinAgreement; a != nil && obs.Agreement < *a {
		return cond(lm, CondSLOMet, metav1.ConditionFalse, ReasonAgreementLow,
			fmt.Sprintf("probe agreement %g is below %g", obs.Agreement, *a)), true
	}
	return cond(lm, CondSLOMet, metav1.ConditionTrue, ReasonWithinSLO, "observed latency, depth and agreement meet the SLO"), true
}
