package controllers

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/prometheus/client_golang/prometheus/testutil"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

// snapshot is one worker's window: 2 seconds with the given depth counts, loop steps, P95 and
// probe agreement counts.
func snapshot(r bus.Ref, worker string, end time.Time, depth []int64, loopSteps int64, p95 float64, probes int64, agree []int64) bus.StatsSnapshot {
	s := bus.NewStatsSnapshot(r, worker, len(depth))
	s.Start, s.End = end.Add(-2*time.Second), end
	s.ExitThreshold = 0.9
	copy(s.DepthCounts, depth)
	for _, c := range depth {
		s.Tokens += c
	}
	s.LoopSteps = loopSteps
	s.TokenLatencyP95 = p95
	s.Probes = probes
	copy(s.ProbeAgree, agree)
	return s
}

func TestAggregate(t *testing.T) {
	r := bus.Ref{Namespace: "ml", Name: "ouro"}
	now := time.Now()
	a := snapshot(r, "a", now, []int64{10, 20, 10, 0}, 80, 0.020, 10, []int64{5, 8, 9, 10})
	b := snapshot(r, "b", now, []int64{0, 0, 0, 40}, 160, 0.050, 10, []int64{6, 8, 10, 10})
	a2 := snapshot(r, "a", now.Add(-2*time.Second), []int64{40, 0, 0, 0}, 40, 0.010, 0, nil)
	old := snapshot(r, "c", now, []int64{0, 0, 5}, 15, 0.5, 0, nil) // before a rollout to 4 steps
	idle := snapshot(r, "a", now, []int64{0, 0, 0, 0}, 0, 0, 0, nil)

	tests := []struct {
		name  string
		snaps []bus.StatsSnapshot
		want  *v1alpha1.ObservedFigures
	}{
		{"none", nil, nil},
		{"idle", []bus.StatsSnapshot{idle}, nil},
		{"two workers", []bus.StatsSnapshot{a, b}, &v1alpha1.ObservedFigures{
			MeanDepth: 3, LoopStepsPerSecond: 120, Agreement: 0.8875,
			TokenLatencyP95: &metav1.Duration{Duration: 50 * time.Millisecond}}},
		{"one worker over two windows", []bus.StatsSnapshot{a2, a}, &v1alpha1.ObservedFigures{
			MeanDepth: 1.5, LoopStepsPerSecond: 30, Agreement: 0.625*0.5 + 0.25*0.8 + 0.125*0.9,
			TokenLatencyP95: &metav1.Duration{Duration: 20 * time.Millisecond}}},
		{"other step count skipped", []bus.StatsSnapshot{old, b}, &v1alpha1.ObservedFigures{
			MeanDepth: 4, LoopStepsPerSecond: 80, Agreement: 1,
			TokenLatencyP95: &metav1.Duration{Duration: 50 * time.Millisecond}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := aggregate(tt.snaps, "", 0.9)
			if ok != (tt.want != nil) {
				t.Fatalf("aggregate ok = %v, want %v", ok, tt.want != nil)
			}
			if !ok {
				return
			}
			if diff := cmp.Diff(&got, tt.want, cmpopts.EquateApprox(0, 1e-3)); diff != "" {
				t.Errorf("observed (-got +want):\n%s", diff)
			}
		})
	}
}

// TestObservedStats: snapshots published by (simulated) workers on the stats subject show up
// in status.observed within seconds.
func TestObservedStats(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	lm := newLoopModel(ns, "stats", srv.url())
	maxDepth := 3.5
	lm.Spec.SLO.MaxMeanDepth = &maxDepth
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatal(err)
	}
	r := bus.Ref{Namespace: ns, Name: "stats"}
	await(t, waitLong, "queue in place", conditionIs(ns, "stats", CondDegraded, metav1.ConditionFalse, ReasonAsExpected))
	await(t, waitLong, "SLO unknown without stats", conditionIs(ns, "stats", CondSLOMet, metav1.ConditionUnknown, ReasonNoStats))

	nc, _ := srv.js()
	publish := func(s bus.StatsSnapshot) {
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		if err := nc.Publish(r.StatsSubject(), b); err != nil {
			t.Fatal(err)
		}
	}
	publish(bus.StatsSnapshot{Namespace: ns, Name: "stats"}) // invalid: ignored
	now := time.Now()
	publish(snapshot(r, "a", now, []int64{10, 20, 10, 0}, 80, 0.020, 10, []int64{5, 8, 9, 10}))
	publish(snapshot(r, "b", now, []int64{0, 0, 0, 40}, 160, 0.050, 10, []int64{6, 8, 10, 10}))
	await(t, waitLong, "status.observed", func() error {
		obs := getLoopModel(t, ns, "stats").Status.Observed
		if obs == nil || math.Abs(obs.MeanDepth-3) > 1e-9 || math.Abs(obs.LoopStepsPerSecond-120) > 1e-9 ||
			math.Abs(obs.Agreement-0.888) > 1e-3 || obs.TokenLatencyP95 == nil || obs.TokenLatencyP95.Duration != 50*time.Millisecond {
			return fmt.Errorf("observed = %+v", obs)
		}
		return nil
	})
	await(t, waitLong, "SLO met", conditionIs(ns, "stats", CondSLOMet, metav1.ConditionTrue, ReasonWithinSLO))
}

func TestSLOCondition(t *testing.T) {
	ms := func(n int) *metav1.Duration { return &metav1.Duration{Duration: time.Duration(n) * time.Millisecond} }
	f := func(x float64) *float64 { return &x }
	observed := &v1alpha1.ObservedStats{ObservedFigures: v1alpha1.ObservedFigures{MeanDepth: 2.5, TokenLatencyP95: ms(40), Agreement: 0.96}}
	tests := []struct {
		name   string
		slo    v1alpha1.SLOSpec
		obs    *v1alpha1.ObservedStats
		status metav1.ConditionStatus
		reason string // "" when no condition
	}{
		{"no SLO", v1alpha1.SLOSpec{}, observed, "", ""},
		{"no stats", v1alpha1.SLOSpec{MaxMeanDepth: f(3)}, nil, metav1.ConditionUnknown, ReasonNoStats},
		{"met", v1alpha1.SLOSpec{TokenLatencyP95: ms(50), MaxMeanDepth: f(3), MinAgreement: f(0.95)}, observed, metav1.ConditionTrue, ReasonWithinSLO},
		{"slow", v1alpha1.SLOSpec{TokenLatencyP95: ms(30), MaxMeanDepth: f(3)}, observed, metav1.ConditionFalse, ReasonLatencyHigh},
		{"deep", v1alpha1.SLOSpec{MaxMeanDepth: f(2)}, observed, metav1.ConditionFalse, ReasonDepthHigh},
		{"disagreeing", v1alpha1.SLOSpec{MinAgreement: f(0.99)}, observed, metav1.ConditionFalse, ReasonAgreementLow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lm := defaulted()
			lm.Spec.SLO, lm.Status.Observed = tt.slo, tt.obs
			c, ok := sloCondition(lm)
			if ok != (tt.reason != "") || c.Status != tt.status || c.Reason != tt.reason {
				t.Errorf("sloCondition = %v %s/%s (%s), want %s/%s", ok, c.Status, c.Reason, c.Message, tt.status, tt.reason)
			}
		})
	}
}

// TestStatsBookFilters: the book keeps out malformed, misaddressed and stale-threshold
// snapshots (counting each), and forgets everything older than its window.
func TestStatsBookFilters(t *testing.T) {
	r := bus.Ref{Namespace: "ml", Name: "ouro"}
	b := newStatsBook(time.Minute, time.Hour, nil)
	b.books[r] = &modelStats{}
	count := func(reason string) float64 { return testutil.ToFloat64(statsRejected.WithLabelValues(reason)) }
	malformed, misaddressed, stale := count(rejectMalformed), count(rejectMisaddressed), count(rejectStale)
	add := func(s bus.StatsSnapshot) {
		data, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		b.add(r, data)
	}
	now := time.Now()
	if _, ok := b.observed(r, now, bus.Thresholds{ExitThreshold: 0.9}); ok { // sets the threshold in force
		t.Fatal("observed without snapshots")
	}
	b.add(r, []byte("{not json"))
	add(bus.StatsSnapshot{Namespace: "ml", Name: "ouro", MaxSteps: 4}) // arrays missing
	add(snapshot(bus.Ref{Namespace: "ml", Name: "other"}, "a", now, []int64{10, 0, 0, 0}, 10, 0.01, 0, nil))
	lowered := snapshot(r, "b", now, []int64{0, 0, 0, 40}, 160, 0.05, 0, nil)
	lowered.ExitThreshold = 0.5 // a worker still on a threshold no longer in force
	add(lowered)
	add(snapshot(r, "a", now, []int64{10, 20, 10, 0}, 80, 0.02, 0, nil))

	got, ok := b.observed(r, now, bus.Thresholds{ExitThreshold: 0.9})
	want := &v1alpha1.ObservedStats{ObservedFigures: v1alpha1.ObservedFigures{MeanDepth: 2, LoopStepsPerSecond: 40, TokenLatencyP95: &metav1.Duration{Duration: 20 * time.Millisecond}}}
	if !ok {
		t.Fatal("no observed stats from the snapshot under the threshold in force")
	}
	if diff := cmp.Diff(got, want, cmpopts.EquateApprox(0, 1e-3)); diff != "" {
		t.Errorf("observed (-got +want):\n%s", diff)
	}
	for _, c := range []struct {
		reason    string
		got, want float64
	}{
		{rejectMalformed, count(rejectMalformed) - malformed, 2},
		{rejectMisaddressed, count(rejectMisaddressed) - misaddressed, 1},
		{rejectStale, count(rejectStale) - stale, 1},
	} {
		if c.got != c.want {
			t.Errorf("rejected %s = %v, want %v", c.reason, c.got, c.want)
		}
	}
	if _, ok := b.observed(r, now.Add(2*time.Minute), bus.Thresholds{ExitThreshold: 0.9}); ok {
		t.Error("snapshots older than the window still observed")
	}
}

// TestObservedPerTier: status.observed holds the default tier's figures and, in tiers, each
// tier's, each from the snapshots' part under that tier's threshold in force: a tier whose
// part ran under another threshold is left out of its figures, a tier without tokens is not
// listed.
func TestObservedPerTier(t *testing.T) {
	r := bus.Ref{Namespace: "ml", Name: "ouro"}
	b := newStatsBook(time.Minute, time.Hour, nil)
	b.books[r] = &modelStats{}
	th := bus.Thresholds{DefaultTier: "standard", ExitThreshold: 0.9, Tiers: map[string]float64{"batch": 0.5, "gold": 0.9, "standard": 0.9}}
	now := time.Now()
	add := func(s bus.StatsSnapshot) {
		data, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		b.add(r, data)
	}
	// a: one second of standard (3 steps) and batch (1 step at 0.5); b: batch under an older
	// threshold, standard in force.
	add(tieredWindow(r, "a", now, bus.Thresholds{DefaultTier: "standard", ExitThreshold: 0.9, Tiers: map[string]float64{"batch": 0.5, "standard": 0.9}},
		map[string]int64{"batch": 120, "standard": 10}))
	add(tieredWindow(r, "b", now, bus.Thresholds{DefaultTier: "standard", ExitThreshold: 0.9, Tiers: map[string]float64{"batch": 0.6, "standard": 0.9}},
		map[string]int64{"batch": 500, "standard": 30}))
	got, ok := b.observed(r, now, th)
	if !ok {
		t.Fatal("no observed stats")
	}
	standard := v1alpha1.ObservedFigures{MeanDepth: 3, LoopStepsPerSecond: 120, Agreement: 1}
	want := &v1alpha1.ObservedStats{ObservedFigures: standard, Tiers: []v1alpha1.TierObserved{
		{Name: "batch", ObservedFigures: v1alpha1.ObservedFigures{MeanDepth: 1, LoopStepsPerSecond: 120, Agreement: 1}},
		{Name: "standard", ObservedFigures: standard},
	}}
	if diff := cmp.Diff(got, want, cmpopts.EquateApprox(0, 1e-3)); diff != "" {
		t.Errorf("observed (-got +want):\n%s", diff)
	}
}

// TestObservedTiersInStatus: a tiered LoopModel's status.observed lists each tier's figures
// through the API server (the CRD keeps the field).
func TestObservedTiersInStatus(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	if err := k8s.Create(ctx, tieredSpec(ns, "tiered", srv.url())); err != nil {
		t.Fatal(err)
	}
	r := bus.Ref{Namespace: ns, Name: "tiered"}
	await(t, waitLong, "queue in place", conditionIs(ns, "tiered", CondDegraded, metav1.ConditionFalse, ReasonAsExpected))
	nc, _ := srv.js()
	th := bus.Thresholds{DefaultTier: "standard", ExitThreshold: 0.9, Tiers: map[string]float64{"batch": 0.9, "gold": 0.9, "standard": 0.9}}
	await(t, waitLong, "status.observed.tiers", func() error {
		b, err := json.Marshal(tieredWindow(r, "a", time.Now(), th, map[string]int64{"batch": 120, "standard": 10}))
		if err != nil {
			return err
		}
		if err := nc.Publish(r.StatsSubject(), b); err != nil {
			return err
		}
		obs := getLoopModel(t, ns, "tiered").Status.Observed
		if obs == nil {
			return fmt.Errorf("no status.observed")
		}
		var names []string
		for _, tr := range obs.Tiers {
			names = append(names, fmt.Sprintf("%s:%g", tr.Name, tr.MeanDepth))
		}
		// batch runs 4 steps above its floor of 0.5, standard 3 at 0.9; gold saw no token
		if got, want := fmt.Sprint(names), "[batch:4 standard:3]"; got != want || obs.MeanDepth != 3 {
			return fmt.Errorf("observed mean depth %v, tiers %s, want 3 and %s", obs.MeanDepth, got, want)
		}
		return nil
	})
}
