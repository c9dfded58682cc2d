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
	w := newStatsWindow(testRef, "w", 3, 8, 0.7)
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
		w.token(c.tok, c.tau)
	}
	got := w.rotate(time.Now(), 0.7)
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
	idle := w.rotate(got.End.Add(time.Second), 0.7)
	if idle.Tokens != 0 || idle.End.Sub(idle.Start) != time.Second || idle.ExitThreshold != 0.7 {
		t.Errorf("idle window = %d tokens over %v under %v, want 0 over 1s under 0.7", idle.Tokens, idle.End.Sub(idle.Start), idle.ExitThreshold)
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
	w := &Worker{gen: gen}
	gen.SetThreshold(0.3)
	for _, c := range []struct {
		name        string
		job         Job
		run, record float64
	}{
		{"stamped", Job{Threshold: 0.9}, 0.9, 0.9},
		{"own threshold", Job{Threshold: 0.9, ExitThreshold: 0.5}, 0.5, 0},
		{"max depth", Job{Threshold: 0.9, MaxDepth: 2}, 0.9, 0},
		{"deadline", Job{Threshold: 0.9, Deadline: time.Now()}, 0.9, 0},
		{"unstamped", Job{}, 0.3, 0.3},
	} {
		run, record := w.jobThreshold(c.job)
		if run != c.run || record != c.record {
			t.Errorf("%s: runs under %v recorded under %v, want %v and %v", c.name, run, record, c.run, c.record)
		}
	}
	// The stamp survives the queue's encoding.
	b, _ := json.Marshal(Job{ID: "x", Threshold: 0.9})
	var j Job
	if err := json.Unmarshal(b, &j); err != nil || j.Threshold != 0.9 {
		t.Errorf("decoded job threshold %v, %v; want 0.9", j.Threshold, err)
	}
}
