package controllers

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/gatepolicy"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Reasons a stats snapshot is left out of status.observed (label values of statsRejected).
const (
	rejectMalformed    = "malformed"       // does not decode or its arrays do not match MaxSteps
	rejectMisaddressed = "misaddressed"    // names another LoopModel than its subject's
	rejectStale        = "stale_threshold" // taken under another threshold than the one in force
)

// statsRejected counts the workers' stats snapshots the operator ignored, by reason. It is
// served with the manager's metrics.
var statsRejected = prometheus.NewCounterVec(prometheus.CounterOpts{
	Name: "loopserve_operator_stats_rejected_total",
	Help: "Stats snapshots from workers that the operator ignored, by reason.",
}, []string{"reason"})

// The tuning loop's last decision per LoopModel (auto and advisory modes).
var (
	tunedThreshold = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "loopserve_operator_tuned_exit_threshold",
		Help: "Exit threshold the tuning loop chose, per LoopModel and quality tier.",
	}, []string{"namespace", "name", "tier"})
	wantedReplicas = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "loopserve_operator_wanted_replicas",
		Help: "Workers the tuning loop wants, per LoopModel.",
	}, []string{"namespace", "name"})
	predictedDepth = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "loopserve_operator_predicted_mean_depth",
		Help: "Mean loop steps per token predicted at the chosen threshold (NaN without stats).",
	}, []string{"namespace", "name"})
	predictedLatency = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "loopserve_operator_predicted_token_latency_p95_seconds",
		Help: "Inter-token latency p95 predicted at the chosen threshold on the ready workers (0 when unknown).",
	}, []string{"namespace", "name"})
)

func init() {
	ctrlmetrics.Registry.MustRegister(statsRejected, tunedThreshold, wantedReplicas, predictedDepth, predictedLatency)
}

// tuneMetrics exports one decision.
func (r *LoopModelReconciler) tuneMetrics(lm *v1alpha1.LoopModel, d gatepolicy.Decision) {
	for tier, tau := range d.Tau {
		tunedThreshold.WithLabelValues(lm.Namespace, lm.Name, tier).Set(tau)
	}
	wantedReplicas.WithLabelValues(lm.Namespace, lm.Name).Set(float64(d.Replicas))
	predictedDepth.WithLabelValues(lm.Namespace, lm.Name).Set(d.PredictedDepth)
	predictedLatency.WithLabelValues(lm.Namespace, lm.Name).Set(d.PredictedLatency.Seconds())
}

// forgetMetrics drops a deleted LoopModel's series.
func forgetMetrics(lm *v1alpha1.LoopModel) {
	labels := prometheus.Labels{"namespace": lm.Namespace, "name": lm.Name}
	for _, g := range []*prometheus.GaugeVec{tunedThreshold, wantedReplicas, predictedDepth, predictedLatency} {
		g.DeletePartialMatch(labels)
	}
}
