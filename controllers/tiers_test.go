package controllers

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/gatepolicy"
)

// tieredSpec is a LoopModel with batch (floor 0.5), standard (floor 0.6, the default) and gold
// (never lowered) tiers over thresholds [0.5, 0.9].
func tieredSpec(ns, name, url string) *v1alpha1.LoopModel {
	lm := newLoopModel(ns, name, url)
	lm.Spec.Loop.MaxSteps, lm.Spec.Loop.ExitThreshold, lm.Spec.Loop.MinExitThreshold = 4, 0.9, ptr.To(0.5)
	lm.Spec.Tiers = []v1alpha1.Tier{
		{Name: "batch"},
		{Name: "standard", MinExitThreshold: ptr.To(0.6)},
		{Name: "gold", MinExitThreshold: ptr.To(0.9), MinDepth: ptr.To(2.5)},
	}
	lm.Spec.DefaultTier = "standard"
	return lm
}

func TestPolicySpecTiers(t *testing.T) {
	lm := tieredSpec("ns", "m", "nats://x:4222")
	got := policySpec(lm)
	want := []gatepolicy.Tier{
		{Name: "batch", Floor: 0.5, BrownoutOrder: 0},
		{Name: "standard", Floor: 0.6, BrownoutOrder: 1},
		{Name: "gold", Floor: 0.9, MinDepth: 2.5, BrownoutOrder: 2},
	}
	if d := cmp.Diff(got.Tiers, want); d != "" || got.DefaultTier != "standard" {
		t.Errorf("policy tiers (-got +want):\n%s\ndefault %q", d, got.DefaultTier)
	}
	if err := got.WithDefaults().Validate(); err != nil {
		t.Errorf("the policy refuses the tiers: %v", err)
	}
	if got := policySpec(newLoopModel("ns", "m", "nats://x:4222")); len(got.Tiers) != 0 || got.DefaultTier != "" {
		t.Errorf("a spec without tiers maps to tiers %v, default %q; want the one implicit tier", got.Tiers, got.DefaultTier)
	}
}

// TestCheckTiers: the operator's own check names the problem of each bad tier spec (the API
// server's rules may be older than the operator).
func TestCheckTiers(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*v1alpha1.LoopModel)
		want   string
	}{
		{"valid", func(*v1alpha1.LoopModel) {}, ""},
		{"no tiers", func(lm *v1alpha1.LoopModel) { lm.Spec.Tiers, lm.Spec.DefaultTier = nil, "" }, ""},
		{"default without tiers", func(lm *v1alpha1.LoopModel) { lm.Spec.Tiers = nil }, `spec.defaultTier "standard" is set without spec.tiers`},
		{"default not a tier", func(lm *v1alpha1.LoopModel) { lm.Spec.DefaultTier = "silver" }, `spec.defaultTier "silver" is not one of spec.tiers`},
		{"twice", func(lm *v1alpha1.LoopModel) { lm.Spec.Tiers[1].Name = "batch" }, `spec.tiers[1].name "batch" is used twice`},
		{"bad name", func(lm *v1alpha1.LoopModel) { lm.Spec.Tiers[0].Name = "Batch!" }, `spec.tiers[0].name "Batch!" is not a DNS label`},
		{"floor below", func(lm *v1alpha1.LoopModel) { lm.Spec.Tiers[0].MinExitThreshold = ptr.To(0.4) },
			"spec.tiers[0] (batch): minExitThreshold 0.4 outside [0.5, 0.9] (spec.loop.minExitThreshold, exitThreshold)"},
		{"floor above", func(lm *v1alpha1.LoopModel) { lm.Spec.Tiers[2].MinExitThreshold = ptr.To(0.95) },
			"spec.tiers[2] (gold): minExitThreshold 0.95 outside [0.5, 0.9]"},
		{"deep", func(lm *v1alpha1.LoopModel) { lm.Spec.Tiers[2].MinDepth = ptr.To(5.0) },
			"spec.tiers[2] (gold): minDepth 5 outside [1, 4] (spec.loop.maxSteps)"},
	} {
		lm := tieredSpec("ns", "m", "nats://x:4222")
		tc.change(lm)
		err := checkTiers(lm)
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: checkTiers = %v, want %q", tc.name, err, tc.want)
		}
	}
}

// TestThresholdsInForce: the spec's threshold for every tier until auto mode has decided, then
// the tuned status.tiers, each kept within [its floor, exitThreshold].
func TestThresholdsInForce(t *testing.T) {
	lm := tieredSpec("ns", "m", "nats://x:4222")
	lm.Status.Tiers = []v1alpha1.TierStatus{{Name: "batch", ExitThreshold: 0.3}, {Name: "standard", ExitThreshold: 0.7}, {Name: "gold", ExitThreshold: 0.6}}
	spec := bus.Thresholds{ExitThreshold: 0.9, DefaultTier: "standard", Tiers: map[string]float64{"batch": 0.9, "standard": 0.9, "gold": 0.9}}
	if d := cmp.Diff(thresholdsInForce(lm), spec); d != "" {
		t.Errorf("mode off (-got +want):\n%s", d)
	}
	lm.Spec.Tuning.Mode = v1alpha1.TuningAuto
	if d := cmp.Diff(thresholdsInForce(lm), spec); d != "" {
		t.Errorf("auto before the first decision (-got +want):\n%s", d)
	}
	lm.Status.LastTuneTime = &metav1.Time{Time: time.Now()}
	want := bus.Thresholds{ExitThreshold: 0.7, DefaultTier: "standard", Tiers: map[string]float64{"batch": 0.5, "standard": 0.7, "gold": 0.9}}
	if d := cmp.Diff(thresholdsInForce(lm), want); d != "" {
		t.Errorf("auto, tuned (-got +want):\n%s", d)
	}
	if err := thresholdsInForce(lm).Validate(); err != nil {
		t.Errorf("thresholds in force invalid: %v", err)
	}
}

// tierStats is one tier's part of a simulated worker second: n tokens under threshold tau
// whose cumulative exit probability after each step is cum, and one probe in 20.
func tierStats(tier string, tau float64, n int64, cum []float64) bus.TierStats {
	ts := bus.NewTierStats(tier, len(cum))
	ts.ExitThreshold = tau
	depth := len(cum)
	for i, c := range cum {
		if c >= tau {
			depth = i + 1
			break
		}
	}
	ts.Tokens, ts.Requests = n, max(n/16, 1)
	ts.LoopSteps = n * int64(depth)
	ts.DepthCounts[depth-1] = n
	for i, c := range cum {
		if i < depth {
			ts.Cum[i][bus.CumBin(c)] = n
		} else {
			ts.Censored[i] = n
		}
	}
	ts.Probes = max(n/20, 1)
	for i, c := range cum {
		ts.ProbeCum[i][bus.CumBin(c)] = ts.Probes
		ts.ProbeAgree[i] = ts.Probes
	}
	return ts
}

// tieredWindow is one simulated worker's second with traffic in every tier, under the
// thresholds in force: n[tier] tokens each, no latency measured and a batch with free slots,
// so only the loop-step demand against targetLoopStepsPerReplica drives the tuner. Batch
// tokens run one loop step at τ 0.5 and all four above it; the others run 3 steps at τ 0.9
// and 2 at 0.6.
func tieredWindow(r bus.Ref, worker string, end time.Time, th bus.Thresholds, n map[string]int64) bus.StatsSnapshot {
	s := bus.NewStatsSnapshot(r, worker, 4)
	s.Start, s.End, s.Capacity, s.InFlight, s.BusySeconds = end.Add(-time.Second), end, 8, 1, 1
	profile := func(tier string) []float64 {
		if tier == "batch" {
			return []float64{0.5, 0.5, 0.5, 1}
		}
		return []float64{0.5, 0.85, 0.95, 1}
	}
	for _, tier := range th.TierNames() {
		ts := tierStats(tier, th.Tiers[tier], n[tier], profile(tier))
		if tier == th.DefaultTier {
			s.TierStats = ts
		} else {
			s.Tiers = append(s.Tiers, ts)
		}
	}
	return s
}

// TestTiersBrownoutOrder closes the loop per tier on envtest and an embedded NATS server with
// synthetic worker stats: at one replica (maxReplicas), a load above the replica's loop-step
// target lowers batch, the first tier, down to its floor while standard and gold keep the
// spec's threshold; a heavier load lowers standard too, to its floor (where the registry entry
// and the ConfigMap show the thresholds per tier); gold is never lowered;
// when the load falls every tier returns to the spec's.
//
// Loads (tokens/s per tier, batch:standard:gold = 12:1:1, u = standard's, nominally 200/s):
// the target of 4620 loop steps/s allows 4620/0.7 = 6600 = 33u. All tiers at 0.9 need about
// 54u (batch at any τ above its floor too), batch at its floor 20u, so the first load lowers
// batch alone, to its floor, even with rates measured 40% low or 60% high; five times that load
// does not fit even at the floors.
func TestTiersBrownoutOrder(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	lm := tieredSpec(ns, "tiers", srv.url())
	lm.Spec.Scaling.TargetLoopStepsPerReplica = ptr.To[int64](4620)
	lm.Spec.Tuning = v1alpha1.TuningSpec{Mode: v1alpha1.TuningAuto, Interval: &metav1.Duration{Duration: 500 * time.Millisecond}, MaxStep: ptr.To(0.1)}
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatal(err)
	}
	markReadyWhenCreated(t, ns, "tiers-worker")
	r := bus.Ref{Namespace: ns, Name: "tiers"}

	var mu sync.Mutex
	scale := 1.0
	nc, _ := srv.js()
	fctx, stopFeed := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { stopFeed(); wg.Wait() }()
	wg.Go(func() { // two workers, a window every 100ms each, under the thresholds in force
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-fctx.Done():
				return
			case now := <-tick.C:
				th := thresholdsInForce(getLoopModel(t, ns, "tiers"))
				mu.Lock()
				k := scale
				mu.Unlock()
				n := map[string]int64{"batch": int64(120 * k), "standard": int64(10 * k), "gold": int64(10 * k)}
				for _, w := range []string{"a", "b"} {
					b, _ := json.Marshal(tieredWindow(r, w, now, th, n))
					_ = nc.Publish(r.StatsSubject(), b)
				}
			}
		}
	})
	setLoad := func(k float64) { mu.Lock(); scale = k; mu.Unlock() }
	// tiers reads status.tiers; an error while the first status write with the tiers is still
	// to come (the registry entry is written before the status).
	tiers := func() (map[string]float64, error) {
		st := getLoopModel(t, ns, "tiers").Status
		if len(st.Tiers) != 3 {
			return nil, fmt.Errorf("status.tiers %v, want the three tiers", st.Tiers)
		}
		m := map[string]float64{}
		for _, ts := range st.Tiers {
			m[ts.Name] = ts.ExitThreshold
		}
		if st.ExitThreshold != m["standard"] {
			t.Errorf("status.exitThreshold %v, want the default tier's %v", st.ExitThreshold, m["standard"])
		}
		if m["gold"] != 0.9 {
			t.Fatalf("gold lowered: status.tiers %v", st.Tiers)
		}
		return m, nil
	}
	entryTiers := func(want map[string]float64) func() error {
		return func() error {
			e, err := srv.registryEntryOf(ctx, r)
			if err != nil {
				return err
			}
			if d := cmp.Diff(e.Tiers, want); d != "" || e.DefaultTier != "standard" || e.ExitThreshold != want["standard"] {
				return fmt.Errorf("registry entry %+v (-got +want):\n%s", e.Thresholds, d)
			}
			var cm corev1.ConfigMap
			if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "tiers-config"}, &cm); err != nil {
				return err
			}
			c, err := bus.DecodeControl([]byte(cm.Data[configFile]))
			if err != nil || !c.Thresholds.Equal(e.Thresholds) {
				return fmt.Errorf("ConfigMap %q (%v), want the registry's %+v", cm.Data[configFile], err, e.Thresholds)
			}
			return nil
		}
	}
	await(t, waitLong, "every tier at the spec's threshold", entryTiers(map[string]float64{"batch": 0.9, "standard": 0.9, "gold": 0.9}))

	// Phase 1: batch alone goes down, to its floor.
	await(t, waitLong, "batch at its floor", func() error {
		m, err := tiers()
		if err != nil {
			return err
		}
		if m["standard"] != 0.9 {
			t.Fatalf("standard lowered before batch reached its floor: %v, recommendation %+v", m, getLoopModel(t, ns, "tiers").Status.Recommendation)
		}
		if m["batch"] != 0.5 {
			return fmt.Errorf("tiers %v, recommendation %+v", m, getLoopModel(t, ns, "tiers").Status.Recommendation)
		}
		return nil
	})
	await(t, waitLong, "ThresholdLowered event", hasEvent(ns, "tiers", EventThresholdLowered))
	// Phase 2: five times the load: standard goes down too; gold holds (checked by tiers()).
	setLoad(5)
	await(t, waitLong, "standard at its floor", func() error {
		m, err := tiers()
		if err == nil && (m["standard"] != 0.6 || m["batch"] != 0.5) {
			err = fmt.Errorf("tiers %v", m)
		}
		return err
	})
	await(t, waitLong, "registry and ConfigMap follow", entryTiers(map[string]float64{"batch": 0.5, "standard": 0.6, "gold": 0.9}))
	rec := getLoopModel(t, ns, "tiers").Status.Recommendation
	if rec == nil || len(rec.Tiers) != 3 {
		t.Errorf("recommendation %+v, want thresholds for the three tiers", rec)
	}

	// Phase 3: a light load: every tier returns to the spec's threshold.
	setLoad(0.2)
	await(t, waitLong, "every tier back at the spec's", func() error {
		m, err := tiers()
		if err == nil && (m["batch"] != 0.9 || m["standard"] != 0.9) {
			err = fmt.Errorf("tiers %v", m)
		}
		return err
	})
	await(t, waitLong, "registry and ConfigMap follow", entryTiers(map[string]float64{"batch": 0.9, "standard": 0.9, "gold": 0.9}))
}
