package controllers

import (
	"github.com/prometheus/client_golang/prometheus"
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

func init() {
	ctrlmetrics.Registry.MustRegister(statsRejected)
}
