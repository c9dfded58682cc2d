package controllers

import (
	"maps"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/event"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/gatepolicy"
)

// statsBook collects the stats snapshots the workers of each LoopModel publish and turns the
// recent ones into status.observed and tuning windows. It subscribes once per LoopModel on the
// operator's pooled connection (nats.go resubscribes after reconnects) and wakes the stats path
// (reconcileStats), at most once per interval, when snapshots arrive; the full reconcile
// subscribes, both paths read. Safe for concurrent use.
type statsBook struct {
	window   time.Duration             // snapshots older than this are dropped
	interval time.Duration             // least time between two wake-ups of the stats path for one LoopModel
	notify   chan<- event.GenericEvent // stats path requests; sends never block

	mu    sync.Mutex
	books map[bus.Ref]*modelStats
}

type modelStats struct {
	conn      *nats.Conn
	sub       *nats.Subscription
	snaps     []bus.StatsSnapshot // by arrival, within the window
	tau       float64             // the threshold in force at the last observed call
	lastAsked time.Time
}

func newStatsBook(window, interval time.Duration, notify chan<- event.GenericEvent) *statsBook {
	return &statsBook{window: window, interval: interval, notify: notify, books: make(map[bus.Ref]*modelStats)}
}

// watch subscribes to a LoopModel's stats subject on nc, moving the subscription when the
// LoopModel's connection changed (another NATS URL or credentials).
func (b *statsBook) watch(nc *nats.Conn, r bus.Ref) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if ms, ok := b.books[r]; ok {
		if ms.conn == nc && ms.sub.IsValid() {
			return nil
		}
		_ = ms.sub.Unsubscribe()
	}
	ms := &modelStats{conn: nc}
	sub, err := nc.Subscribe(r.StatsSubject(), func(m *nats.Msg) { b.add(r, m.Data) })
	if err != nil {
		return err
	}
	ms.sub = sub
	b.books[r] = ms
	return nil
}

// forget drops a deleted LoopModel's subscription and snapshots.
func (b *statsBook) forget(r bus.Ref) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if ms, ok := b.books[r]; ok {
		_ = ms.sub.Unsubscribe()
		delete(b.books, r)
	}
}

func (b *statsBook) add(r bus.Ref, data []byte) {
	// A malformed or misaddressed snapshot is ignored and counted: workers are not trusted to be right.
	s, err := bus.DecodeStats(data)
	if err != nil {
		statsRejected.WithLabelValues(rejectMalformed).Inc()
		return
	}
	if s.Ref() != r {
		statsRejected.WithLabelValues(rejectMisaddressed).Inc()
		return
	}
	now := time.Now()
	b.mu.Lock()
	ms, ok := b.books[r]
	if !ok {
		b.mu.Unlock()
		return
	}
	if ms.tau != 0 && s.ExitThreshold != ms.tau {
		statsRejected.WithLabelValues(rejectStale).Inc() // kept: it counts if that threshold returns
	}
	ms.snaps = append(prune(ms.snaps, now.Add(-b.window)), s)
	ask := now.Sub(ms.lastAsked) >= b.interval
	if ask {
		ms.lastAsked = now
	}
	b.mu.Unlock()
	if ask && b.notify != nil {
		lm := &v1alpha1.LoopModel{}
		lm.Namespace, lm.Name = r.Namespace, r.Name
		select {
		case b.notify <- event.GenericEvent{Object: lm}:
		default: // a request is already queued
		}
	}
}

// observed aggregates the LoopModel's snapshots of the last window taken under th, the
// thresholds in force: the default tier's figures, and each tier's in Tiers (by name); ok is
// false when the default tier generated no token. A tier's part of a snapshot under another
// threshold (a worker that has not applied the latest, or the window before a change) is left
// out; add counts the default tier's in loopserve_operator_stats_rejected_total.
func (b *statsBook) observed(r bus.Ref, now time.Time, th bus.Thresholds) (*v1alpha1.ObservedStats, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	ms, ok := b.books[r]
	if !ok {
		return nil, false
	}
	ms.snaps = prune(ms.snaps, now.Add(-b.window))
	ms.tau = th.ExitThreshold
	def, ok := aggregate(ms.snaps, th.DefaultTier, th.ExitThreshold)
	if !ok {
		return nil, false
	}
	obs := &v1alpha1.ObservedStats{ObservedFigures: def}
	for _, name := range slices.Sorted(maps.Keys(th.Tiers)) {
		if f, ok := aggregate(ms.snaps, name, th.Tiers[name]); ok {
			obs.Tiers = append(obs.Tiers, v1alpha1.TierObserved{Name: name, ObservedFigures: f})
		}
	}
	return obs, true
}

func prune(snaps []bus.StatsSnapshot, since time.Time) []bus.StatsSnapshot {
	i := 0
	for i < len(snaps) && snaps[i].End.Before(since) {
		i++
	}
	return append(snaps[:0], snaps[i:]...)
}

// aggregate sums one tier's part of the workers' snapshots taken under tau: the mean depth
// over all tokens, the loop-step rate as the sum of each worker's rate over the time its
// snapshots cover, the highest worker P95 inter-token latency (a conservative reading of
// quantiles that cannot be merged), and the probe agreement expected at the observed exit
// depths, Σ_d P(depth d)·agree(d). Snapshots with another MaxSteps than the newest are skipped
// (a rollout changed it); ok is false when the tier generated no token.
func aggregate(snaps []bus.StatsSnapshot, tier string, tau float64) (v1alpha1.ObservedFigures, bool) {
	if len(snaps) == 0 {
		return v1alpha1.ObservedFigures{}, false
	}
	steps := snaps[len(snaps)-1].MaxSteps
	depth := make([]int64, steps)
	agree := make([]int64, steps)
	var probes int64
	var p95 float64
	type span struct {
		steps   int64
		seconds float64
	}
	perWorker := map[string]span{}
	for _, s := range snaps {
		if s.MaxSteps != steps {
			continue
		}
		i := slices.IndexFunc(s.All(), func(ts bus.TierStats) bool { return ts.Tier == tier })
		if i < 0 || s.All()[i].ExitThreshold != tau {
			continue
		}
		ts := s.All()[i]
		if len(ts.DepthCounts) != steps || len(ts.ProbeAgree) != steps {
			continue
		}
		for d := range steps {
			depth[d] += ts.DepthCounts[d]
			agree[d] += ts.ProbeAgree[d]
		}
		probes += ts.Probes
		if ts.Tokens > 0 {
			p95 = max(p95, ts.TokenLatencyP95)
		}
		w := perWorker[s.Worker]
		w.steps += ts.LoopSteps
		w.seconds += s.End.Sub(s.Start).Seconds()
		perWorker[s.Worker] = w
	}
	var tokens, sum int64
	for d, c := range depth {
		tokens += c
		sum += int64(d+1) * c
	}
	if tokens == 0 {
		return v1alpha1.ObservedFigures{}, false
	}
	var rate float64
	for _, w := range perWorker {
		if w.seconds > 0 {
			rate += float64(w.steps) / w.seconds
		}
	}
	obs := v1alpha1.ObservedFigures{
		MeanDepth:          round3(float64(sum) / float64(tokens)),
		LoopStepsPerSecond: round3(rate),
	}
	if p95 > 0 {
		obs.TokenLatencyP95 = &metav1.Duration{Duration: time.Duration(p95 * float64(time.Second)).Round(time.Microsecond)}
	}
	if probes > 0 {
		var a float64
		for d, c := range depth {
			a += float64(c) / float64(tokens) * float64(agree[d]) / float64(probes)
		}
		obs.Agreement = round3(a)
	}
	return obs, true
}

// round3 keeps three decimals: finer digits would only churn the status.
func round3(x float64) float64 { return math.Round(x*1000) / 1000 }

// policyWindows gathers the LoopModel's snapshots that ended in the last interval into one
// gatepolicy window per tier of taus, each for its tier's threshold in force; a window refuses
// (and counts) samples under another threshold or step count, and the default tier def's
// window those of a tier the spec does not declare.
func (b *statsBook) policyWindows(r bus.Ref, taus map[string]float64, def string, maxSteps int, now time.Time, interval time.Duration) map[string]*gatepolicy.Window {
	ws := make(map[string]*gatepolicy.Window, len(taus))
	for tier, tau := range taus {
		ws[tier] = gatepolicy.NewWindow(tier, tau, maxSteps, interval.Seconds())
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	ms, ok := b.books[r]
	if !ok {
		return ws
	}
	since := now.Add(-interval)
	for _, s := range ms.snaps {
		if !s.End.After(since) || s.End.After(now) {
			continue
		}
		for _, p := range s.Samples() {
			w, ok := ws[p.Tier]
			if !ok {
				w = ws[def] // refuses it as misaddressed, and counts it
			}
			if w == nil {
				continue
			}
			_ = w.Add(p) // a refusal is counted in w.Rejected
		}
	}
	return ws
}
