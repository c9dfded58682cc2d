package sim

import (
	"testing"
)

// TestTargets runs the benchmark on the default trace and on traces of the same family with
// other seeds and shapes, and checks the targets: joint attains ≥ 99% of tokens within the ITL
// SLO, uses ≥ 30% fewer replica-seconds than the cheapest replica-only run (either kind, any
// swept setting) whose ITL and TTFT attainment are at least joint's, and keeps mean agreement ≥
// minAgreement. Under the race detector only the default trace runs (the simulation is slow there).
func TestTargets(t *testing.T) {
	cases := []struct {
		name  string
		shape Shape
		seed  uint64
	}{
		{"default", DefaultShape, 1},
		{"seed 2", DefaultShape, 2},
		{"seed 3, busier, sharper bursts", Shape{Seconds: 3600, Mean: 100, Swing: 0.5, Period: 3600, Spikes: 8, SpikeMax: 2.5}, 3},
		{"half-hour day", Shape{Seconds: 1800, Mean: 80, Swing: 0.6, Period: 1800, Spikes: 4, SpikeMax: 2}, 4},
	}
	if raceEnabled {
		cases = cases[:1]
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig(DefaultProfile(), Synthetic(tc.shape, tc.seed), tc.seed)
			rep, err := Compare(c)
			if err != nil {
				t.Fatal(err)
			}
			j := rep.Policies["joint"]
			t.Logf("joint: ITL %.4f TTFT %.4f agreement %.4f replica-seconds %.0f scale events %d", j.Attainment, j.TTFTAttainment, j.Agreement, j.ReplicaSeconds, j.ScaleEvents)
			if j.Attainment < 0.99 {
				t.Errorf("joint ITL attainment %.4f, want ≥ 0.99", j.Attainment)
			}
			if j.Agreement < c.MinAgreement {
				t.Errorf("joint mean agreement %.4f, want ≥ minAgreement %.2f", j.Agreement, c.MinAgreement)
			}
			riv, ok := rep.Rival(j)
			if !ok {
				t.Logf("no replica-only run reaches joint's attainment (ITL %.4f, TTFT %.4f): joint is better at any cost", j.Attainment, j.TTFTAttainment)
				return
			}
			saving := 1 - j.ReplicaSeconds/riv.ReplicaSeconds
			t.Logf("rival %s (%s): ITL %.4f TTFT %.4f replica-seconds %.0f: joint saves %.0f%%", riv.Policy, riv.Setting, riv.Attainment, riv.TTFTAttainment, riv.ReplicaSeconds, 100*saving)
			if saving < 0.30 {
				t.Errorf("joint saves %.0f%% replica-seconds against %s (%s), want ≥ 30%%", 100*saving, riv.Policy, riv.Setting)
			}
		})
	}
}
