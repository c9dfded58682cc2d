package serve

import (
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are loopserve's Prometheus metrics, all prefixed loopserve_ and labelled by loopmodel
// ("<ns>/<name>"). One Metrics serves any number of workers and gateways in a process; create it
// with NewMetrics. Safe for concurrent use.
type Metrics struct {
	exitDepth     *prometheus.HistogramVec
	cum           *prometheus.HistogramVec
	probeTokens   *prometheus.CounterVec
	probeAgree    *prometheus.CounterVec
	tokens        *prometheus.CounterVec
	loopSteps     *prometheus.CounterVec
	tokensPerSec  *prometheus.GaugeVec
	stepsPerSec   *prometheus.GaugeVec
	queueWait     *prometheus.HistogramVec
	ttft          *prometheus.HistogramVec
	itl           *prometheus.HistogramVec
	batch         *prometheus.GaugeVec
	inflight      *prometheus.GaugeVec
	threshold     *prometheus.GaugeVec
	requests      *prometheus.CounterVec
	refused       *prometheus.CounterVec
	expired       *prometheus.CounterVec
	panics        *prometheus.CounterVec
	gwInflight    *prometheus.GaugeVec
	gwTTFT        *prometheus.HistogramVec
	gwRetries     *prometheus.CounterVec
	mu            sync.Mutex
	models        map[string]*modelMetrics
	gatewayModels map[string]*gatewayMetrics
}

var latencyBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}

// NewMetrics registers the metrics with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	lm := []string{"loopmodel"}
	cumBuckets := prometheus.LinearBuckets(0.05, 0.05, 20)
	m := &Metrics{
		exitDepth: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "loopserve_exit_depth",
			Help: "Loop steps whose output chose each generated token.", Buckets: prometheus.LinearBuckets(1, 1, 8)}, lm),
		cum: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "loopserve_cumulative_exit",
			Help: "Cumulative exit probability c_t after each executed loop step (label step = t).", Buckets: cumBuckets}, []string{"loopmodel", "step"}),
		probeTokens: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "loopserve_probe_tokens_total",
			Help: "Probe tokens: run every loop step for unbiased depth and agreement statistics."}, lm),
		probeAgree: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "loopserve_probe_agreement_total",
			Help: "Probe tokens whose argmax after step t equals the full-depth argmax; agreement = rate(this) / rate(loopserve_probe_tokens_total)."}, []string{"loopmodel", "step"}),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "loopserve_generated_tokens_total",
			Help: "Tokens generated."}, lm),
		loopSteps: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "loopserve_loop_steps_total",
			Help: "Decoder-stack passes executed for generated tokens."}, lm),
		tokensPerSec: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "loopserve_tokens_per_second",
			Help: "Tokens generated per second over the last stats window."}, lm),
		stepsPerSec: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "loopserve_loop_steps_per_second",
			Help: "Loop steps executed per second over the last stats window."}, lm),
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "loopserve_queue_wait_seconds",
			Help: "Time from enqueue to a worker taking the request.", Buckets: latencyBuckets}, lm),
		ttft: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "loopserve_time_to_first_token_seconds",
			Help: "Worker time from submission to the first token (prefill).", Buckets: latencyBuckets}, lm),
		itl: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "loopserve_inter_token_latency_seconds",
			Help: "Time between consecutive tokens of a request.", Buckets: latencyBuckets}, lm),
		batch: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "loopserve_batch_size",
			Help: "Requests generating on the worker right now (the engine's batch)."}, lm),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "loopserve_inflight_requests",
			Help: "Requests a worker has taken from the queue and not finished."}, lm),
		threshold: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "loopserve_exit_threshold",
			Help: "Exit threshold in force on the worker."}, lm),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "loopserve_gateway_requests_total",
			Help: "Gateway requests by HTTP status code."}, []string{"loopmodel", "code"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "loopserve_worker_refused_replies_total",
			Help: "Requests refused because their reply subject was not under a gateway inbox (loopserve.inbox.<gateway>.<request>)."}, lm),
		expired: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "loopserve_worker_expired_requests_total",
			Help: "Requests dropped because their gateway's timeout passed while they were queued."}, lm),
		panics: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "loopserve_worker_panics_total",
			Help: "Requests whose handling panicked; each got an error and the worker kept running."}, lm),
		gwInflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "loopserve_gateway_inflight_requests",
			Help: "Requests the gateway is waiting on."}, lm),
		gwTTFT: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "loopserve_gateway_time_to_first_token_seconds",
			Help: "Gateway time from receiving a request to its first token, queueing included.", Buckets: latencyBuckets}, lm),
		gwRetries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "loopserve_gateway_publish_retries_total",
			Help: "Publishes of requests retried because JetStream could not take them (a leader election, a reconnection)."}, lm),
		models:        make(map[string]*modelMetrics),
		gatewayModels: make(map[string]*gatewayMetrics),
	}
	for _, c := range []prometheus.Collector{m.exitDepth, m.cum, m.probeTokens, m.probeAgree, m.tokens, m.loopSteps, m.tokensPerSec,
		m.stepsPerSec, m.queueWait, m.ttft, m.itl, m.batch, m.inflight, m.threshold, m.requests, m.refused, m.expired, m.panics,
		m.gwInflight, m.gwTTFT, m.gwRetries} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// modelMetrics are the worker metrics of one LoopModel, curried once so that recording a token
// costs no label lookups.
type modelMetrics struct {
	exitDepth      prometheus.Observer
	cum            []prometheus.Observer // [steps]
	probeTokens    prometheus.Counter
	probeAgree     []prometheus.Counter // [steps]
	tokens         prometheus.Counter
	loopSteps      prometheus.Counter
	tokensPerSec   prometheus.Gauge
	stepsPerSec    prometheus.Gauge
	queueWait      prometheus.Observer
	ttft           prometheus.Observer
	itl            prometheus.Observer
	batch          prometheus.Gauge
	inflight       prometheus.Gauge
	threshold      prometheus.Gauge
	refusedReplies prometheus.Counter
	expired        prometheus.Counter
	panics         prometheus.Counter
}

func (m *Metrics) model(lm string, steps int) *modelMetrics {
	m.mu.Lock()
	defer m.mu.Unlock()
	if mm := m.models[lm]; mm != nil && len(mm.cum) >= steps {
		return mm
	}
	mm := &modelMetrics{
		exitDepth:      m.exitDepth.WithLabelValues(lm),
		probeTokens:    m.probeTokens.WithLabelValues(lm),
		tokens:         m.tokens.WithLabelValues(lm),
		loopSteps:      m.loopSteps.WithLabelValues(lm),
		tokensPerSec:   m.tokensPerSec.WithLabelValues(lm),
		stepsPerSec:    m.stepsPerSec.WithLabelValues(lm),
		queueWait:      m.queueWait.WithLabelValues(lm),
		ttft:           m.ttft.WithLabelValues(lm),
		itl:            m.itl.WithLabelValues(lm),
		batch:          m.batch.WithLabelValues(lm),
		inflight:       m.inflight.WithLabelValues(lm),
		threshold:      m.threshold.WithLabelValues(lm),
		refusedReplies: m.refused.WithLabelValues(lm),
		expired:        m.expired.WithLabelValues(lm),
		panics:         m.panics.WithLabelValues(lm),
	}
	for t := 1; t <= steps; t++ {
		s := strconv.Itoa(t)
		mm.cum = append(mm.cum, m.cum.WithLabelValues(lm, s))
		mm.probeAgree = append(mm.probeAgree, m.probeAgree.WithLabelValues(lm, s))
	}
	m.models[lm] = mm
	return mm
}

type gatewayMetrics struct {
	inflight prometheus.Gauge
	ttft     prometheus.Observer
	retries  prometheus.Counter
	requests *prometheus.CounterVec
	lm       string
}

func (m *Metrics) gateway(lm string) *gatewayMetrics {
	m.mu.Lock()
	defer m.mu.Unlock()
	if g := m.gatewayModels[lm]; g != nil {
		return g
	}
	g := &gatewayMetrics{inflight: m.gwInflight.WithLabelValues(lm), ttft: m.gwTTFT.WithLabelValues(lm), retries: m.gwRetries.WithLabelValues(lm),
		requests: m.requests, lm: lm}
	m.gatewayModels[lm] = g
	return g
}

func (g *gatewayMetrics) count(code int) {
	g.requests.WithLabelValues(g.lm, strconv.Itoa(code)).Inc()
}
