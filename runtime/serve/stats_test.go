package serve

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/engine"
)

// TestStatsWindowKeepsOverridesOut: tokens of requests that overrode their depth, or ran
// under another threshold than the window's, count as load and as probes but stay out of the
// depth histograms that assume the threshold in force.
func TestStatsWindowKeepsOverridesOut(t *testing.T) {
	w := newStatsWindow(testRef, "w", 3, 8, bus.Thresholds{ExitThreshold: 0.7})
	early := engine.Token{Depth: 1, Cum: []float32{0.8}}
	full := engine.Token{Depth: 3, Cum: []float32{0.1, 0.2, 0.3}}
	probe := engine.Token{Depth: 3, Cum: []float32{0.75, 0.9, 1}, Probe: true, Agree: []bool{true, true, true}}
	for _, c := range []struct {
		tok engine.Token
		tau float64
	}{
		{early, 0.7}, // in force
		{full, 0.7},  // in force
		{full, 0},    // own exit_threshold, max_depth or deadline
		{early, 0.9}, // stamped with an earlier threshold
		{probe, 0},   // a probe of an overriding request: all steps ran
	} {
		w.token(c.tok, "", c.tau)
	}
	got := w.rotate(time.Now(), bus.Thresholds{ExitThreshold: 0.7})
	if got.Tokens != 5 || got.LoopSteps != 1+3+3+1+3 {
		t.Errorf("tokens %d loop steps %d, want 5 and 11", got.Tokens, got.LoopSteps)
	}
	if d := cmp.Diff(got.DepthCounts, []int64{1, 0, 1}); d != "" {
		t.Errorf("depth counts (-got +want):\n%s", d)
	}
	if d := cmp.Diff(got.Censored, []int64{0, 1, 1}); d != "" {
		t.Errorf("censored (-got +want):\n%s", d)
	}
	if got.Probes != 1 || got.ProbeCum[0][bus.CumBin(0.75)] != 1 || got.ProbeAgree[2] != 1 {
		t.Errorf("probes %d, probe histogram step 1 %v, agreement %v: want the one probe", got.Probes, got.ProbeCum[0][bus.CumBin(0.75)], got.ProbeAgree)
	}
	var cum0 int64
	for _, c := range got.Cum[0] {
		cum0 += c
	}
	if cum0 != 2 {
		t.Errorf("step 1 histogram holds %d tokens, want the 2 in force", cum0)
	}
	// The next window is idle, and still a window: its seconds count in the rates.
	idle := w.rotate(got.End.Add(time.Second), bus.Thresholds{ExitThreshold: 0.7})
	if idle.Tokens != 0 || idle.End.Sub(idle.Start) != time.Second || idle.ExitThreshold != 0.7 {
		t.Errorf("idle window = %d tokens over %v under %v, want 0 over 1s under 0.7", idle.Tokens, idle.End.Sub(idle.Start), idle.ExitThreshold)
	}
}

// TestStatsWindowPerTier: each tier's tokens land in its own histograms under its own
// threshold; the default tier heads the snapshot, the other tiers with traffic follow, and a
// tier the worker does not know counts as the default tier's load only.
func TestStatsWindowPerTier(t *testing.T) {
	th := bus.Thresholds{ExitThreshold: 0.7, DefaultTier: "standard", Tiers: map[string]float64{"gold": 0.9, "standard": 0.7, "batch": 0.5}}
	w := newStatsWindow(testRef, "w", 3, 8, th)
	one := engine.Token{Depth: 1, Cum: []float32{0.6}}      // exits at 0.5, not at 0.7
	two := engine.Token{Depth: 2, Cum: []float32{0.6, 0.8}} // exits at 0.7
	for _, c := range []struct {
		tok  engine.Token
		tier string
		tau  float64
	}{
		{one, "batch", 0.5},
		{one, "batch", 0.5},
		{two, "", 0.7}, // the default tier
		{two, "standard", 0.7},
		{two, "silver", 0.7}, // unknown: load only
	} {
		w.token(c.tok, c.tier, c.tau)
	}
	w.request("batch")
	got := w.rotate(time.Now(), th)
	type row struct {
		Tier              string
		Tau               float64
		Tokens, LoopSteps int64
		Requests          int64
		Depths            []int64
	}
	var rows []row
	for _, ts := range got.All() {
		rows = append(rows, row{ts.Tier, ts.ExitThreshold, ts.Tokens, ts.LoopSteps, ts.Requests, ts.DepthCounts})
	}
	want := []row{
		{"standard", 0.7, 3, 6, 0, []int64{0, 2, 0}},
		{"batch", 0.5, 2, 2, 1, []int64{2, 0, 0}},
	}
	if d := cmp.Diff(rows, want); d != "" {
		t.Errorf("tiers (-got +want):\n%s", d)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("snapshot invalid: %v", err)
	}
	// The sample of each tier predicts that tier's depth at its threshold.
	for _, p := range got.Samples() {
		if p.Tier == "batch" && (p.ExitThreshold != 0.5 || p.Tokens != 2) {
			t.Errorf("batch sample %+v", p)
		}
	}
}

// TestWorkerFollowsRegistry: a worker that never gets a control message applies the threshold
// of its registry entry, and publishes windows while idle.
func TestWorkerFollowsRegistry(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	nc := c.connect("observer")
	snaps := c.subscribeStats(nc, 256)
	gen := newGenerator(t)
	c.startWorker("w1", gen, WorkerOptions{})
	awaitCond(t, func() bool { return gen.Threshold() == 0.9 }) // the entry's, not the engine's 0.7
	c.setThreshold(0.4)
	awaitCond(t, func() bool { return gen.Threshold() == 0.4 })
	deadline := time.After(30 * time.Second)
	for {
		select {
		case s := <-snaps:
			if s.ExitThreshold == 0.4 && s.Tokens == 0 && s.End.After(s.Start) {
				return // an idle window under the new threshold
			}
		case <-deadline:
			t.Fatal("no idle window under the registry's threshold")
		}
	}
}

// TestRedeliveryKeepsStampedThreshold: a job keeps the threshold the gateway stamped even
// after the worker's changed, so it generates what it would have before the change.
func TestRedeliveryKeepsStampedThreshold(t *testing.T) {
	gen := newGenerator(t)
	gen.SetThreshold(0.3)
	plain := &Worker{gen: gen, stats: newStatsWindow(testRef, "w", 4, 8, bus.Thresholds{ExitThreshold: 0.3})}
	tiered := &Worker{gen: gen, stats: newStatsWindow(testRef, "w", 4, 8,
		bus.Thresholds{ExitThreshold: 0.3, DefaultTier: "standard", Tiers: map[string]float64{"standard": 0.3, "batch": 0.2, "gold": 0.9}})}
	for _, c := range []struct {
		name   string
		w      *Worker
		job    Job
		run    float64
		tier   string
		record float64
	}{
		{"stamped", plain, Job{Threshold: 0.9}, 0.9, "", 0.9},
		{"own threshold", plain, Job{Threshold: 0.9, ExitThreshold: 0.5}, 0.5, "", 0},
		{"max depth", plain, Job{Threshold: 0.9, MaxDepth: 2}, 0.9, "", 0},
		{"deadline", plain, Job{Threshold: 0.9, Deadline: time.Now()}, 0.9, "", 0},
		{"unstamped", plain, Job{}, 0.3, "", 0.3},
		{"tier stamped", tiered, Job{Tier: "batch", Threshold: 0.25}, 0.25, "batch", 0.25},
		{"tier unstamped", tiered, Job{Tier: "gold"}, 0.9, "gold", 0.9},
		{"default tier", tiered, Job{}, 0.3, "standard", 0.3},
		{"tier unknown here", tiered, Job{Tier: "silver", Threshold: 0.6}, 0.6, "standard", 0},
		{"tier without tiers here", plain, Job{Tier: "batch", Threshold: 0.6}, 0.6, "", 0},
	} {
		run, tier, record := c.w.jobThreshold(c.job)
		if run != c.run || tier != c.tier || record != c.record {
			t.Errorf("%s: runs under %v in tier %q recorded under %v, want %v, %q and %v", c.name, run, tier, record, c.run, c.tier, c.record)
		}
	}
	// The stamp survives the queue's encoding.
	b, _ := json.Marshal(Job{ID: "x", Threshold: 0.9})
	var j Job
	if err := json.Unmarshal(b, &j); err != nil || j.Threshold != 0.9 {
		t.Errorf("decoded job threshold %v, %v; want 0.9", j.Threshold, err)
	}
}
