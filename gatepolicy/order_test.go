package gatepolicy

import (
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"pgregory.net/rapid"
)

// tieredSpec is baseSpec with batch (cheapest, floor batchFloor), standard (floor 0.6, the
// default) and gold (never lowered) tiers, listed in the brownout order.
func tieredSpec(batchFloor float64, maxReplicas int) Spec {
	sp := baseSpec()
	sp.MaxReplicas = maxReplicas
	sp.TokenLatencyP95 = 40 * time.Millisecond
	sp.Tiers = []Tier{{Name: "batch", Floor: batchFloor}, {Name: "standard", Floor: 0.6, BrownoutOrder: 1}, {Name: "gold", Floor: 0.9, BrownoutOrder: 2}}
	sp.DefaultTier = "standard"
	return sp
}

// inOrder reports how d breaks the brownout order of sp's tiers ("" when it keeps it): a tier
// is below the ceiling only while every cheaper tier is at or below its quality floor.
func inOrder(sp Spec, d Decision) string {
	sp = sp.WithDefaults()
	for i, tr := range sp.Tiers {
		if d.Tau[tr.Name] >= sp.Ceiling-1e-6 {
			continue
		}
		for _, c := range sp.Tiers[:i] {
			if f := d.QualityFloors[c.Name]; d.Tau[c.Name] > f+1e-6 {
				return fmt.Sprintf("tier %q at τ %v below the ceiling while the cheaper %q is at %v above its floor %v", tr.Name, d.Tau[tr.Name], c.Name, d.Tau[c.Name], f)
			}
		}
	}
	return ""
}

// TestBrownoutOrder: with three tiers, whatever lowers τ — a measured latency miss, a queue
// (saturated windows), a capacity shortfall while replicas start — lowers batch first, moves
// standard only once batch is at its floor (within one decision the rest of maxStep spills
// over only then), never moves gold, and on the way back raises standard to the ceiling
// before batch rises above its floor.
func TestBrownoutOrder(t *testing.T) {
	tau := func(batch, standard float64) map[string]float64 {
		return map[string]float64{"batch": batch, "standard": standard, "gold": 0.9}
	}
	for _, tc := range []struct {
		name        string
		batchFloor  float64
		maxReplicas int
		surge       float64                                         // demand factor
		coldStart   int                                             // intervals
		cause       func(obs Observation, d Decision, sp Spec) bool // the surge's first window and decision show the case
		want        []map[string]float64                            // τ of the first decisions of the surge
	}{
		{name: "latency miss at maxReplicas", batchFloor: 0.3, maxReplicas: 1, surge: 1.7, coldStart: 1, cause: missed,
			want: []map[string]float64{tau(0.85, 0.9), tau(0.8, 0.9), tau(0.75, 0.9)}},
		{name: "latency miss spills over once batch is at its floor", batchFloor: 0.87, maxReplicas: 1, surge: 1.7, coldStart: 1, cause: missed,
			want: []map[string]float64{tau(0.87, 0.88), tau(0.87, 0.83), tau(0.87, 0.78)}},
		{name: "saturated at maxReplicas", batchFloor: 0.3, maxReplicas: 1, surge: 2.2, coldStart: 1, cause: saturated,
			want: []map[string]float64{tau(0.85, 0.9), tau(0.8, 0.9), tau(0.75, 0.9)}},
		{name: "capacity shortfall while replicas start", batchFloor: 0.3, maxReplicas: 20, surge: 1.6, coldStart: 8, cause: starting,
			want: []map[string]float64{tau(0.3, 0.67), tau(0.3, 0.67)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sp := tieredSpec(tc.batchFloor, tc.maxReplicas)
			tu, err := NewTuner(sp)
			if err != nil {
				t.Fatal(err)
			}
			p := newPlant(4)
			p.demand = map[string]float64{"gold": 100, "standard": 300, "batch": 300}
			taus, ready := tauOf(sp), 1
			var hist []Decision
			run(t, tu, p, time.Unix(0, 0), 20, 1, taus, &ready, &hist)
			if d := hist[len(hist)-1]; d.Brownout || d.Tau["batch"] != 0.9 || d.Tau["standard"] != 0.9 {
				t.Fatalf("before the surge: τ %v brownout %v, want the ceiling", d.Tau, d.Brownout)
			}
			before := hist[len(hist)-1].Replicas
			for k := range p.demand {
				p.demand[k] *= tc.surge
			}
			first := p.observe(time.Unix(0, 0), taus, ready, before)
			hist = hist[:0]
			run(t, tu, p, time.Unix(1000, 0), 16, tc.coldStart, taus, &ready, &hist)
			if !tc.cause(first, hist[0], sp) {
				t.Fatalf("the surge's first window and decision (%+v) do not show the case under test", hist[0])
			}
			var got []map[string]float64
			for _, d := range hist[:len(tc.want)] {
				got = append(got, d.Tau)
			}
			if d := cmp.Diff(got, tc.want); d != "" {
				t.Errorf("τ of the first decisions (-got +want):\n%s", d)
			}
			for k := range p.demand {
				p.demand[k] /= tc.surge
			}
			run(t, tu, p, time.Unix(2000, 0), 60, tc.coldStart, taus, &ready, &hist)
			for i, d := range hist {
				if msg := inOrder(sp, d); msg != "" {
					t.Errorf("decision %d: %s", i, msg)
				}
				if d.Tau["gold"] != 0.9 {
					t.Errorf("decision %d: gold lowered to %v", i, d.Tau["gold"])
				}
			}
			if end := hist[len(hist)-1]; end.Tau["batch"] != 0.9 || end.Tau["standard"] != 0.9 {
				t.Errorf("after the surge: τ %v, want the ceiling back", end.Tau)
			}
		})
	}
}

// missed: a window's latency p95 is over the SLO, none queued.
func missed(obs Observation, _ Decision, sp Spec) bool {
	for _, w := range obs.Windows {
		if w.Saturated() {
			return false
		}
	}
	for _, w := range obs.Windows {
		if w.TokenLatencyP95 > sp.TokenLatencyP95.Seconds() {
			return true
		}
	}
	return false
}

// saturated: a window queued.
func saturated(obs Observation, _ Decision, _ Spec) bool {
	for _, w := range obs.Windows {
		if w.Saturated() {
			return true
		}
	}
	return false
}

// starting: no window queued, and the decision browns out because the replicas it asked for
// are still starting.
func starting(obs Observation, d Decision, sp Spec) bool {
	return !saturated(obs, d, sp) && d.Brownout && d.Replicas > obs.ReadyReplicas
}

// TestBrownoutOrderHolds: for any observation sequence — arbitrary or realistic histograms,
// latencies over and under the SLO, saturated windows, any ready, desired and starting
// replicas, the τ in force fed back from the decisions or anything else the caller applied —
// every decision with stats keeps the brownout order (a tier is below the ceiling only while
// every cheaper tier is at or below its quality floor), each quality floor is one that
// minAgreement's bound or the tier's minDepth imposes (or the tier's floor), gold stays at
// the ceiling and every τ within its tier's bounds.
func TestBrownoutOrderHolds(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		ceil := rapid.Float64Range(0.1, 1).Draw(rt, "ceiling")
		floor := rapid.Float64Range(0.01, ceil).Draw(rt, "floor")
		minR := rapid.IntRange(1, 3).Draw(rt, "minR")
		minAgree := 0.0
		if rapid.Bool().Draw(rt, "agreementFloor") {
			minAgree = rapid.Float64Range(0, 1).Draw(rt, "minAgree")
		}
		tiers := []Tier{
			{Name: "batch", Floor: rapid.Float64Range(floor, ceil).Draw(rt, "batchFloor"), MinDepth: rapid.Float64Range(0, 4).Draw(rt, "batchMinDepth")},
			{Name: "standard", Floor: rapid.Float64Range(floor, ceil).Draw(rt, "standardFloor"), MinDepth: rapid.Float64Range(0, 4).Draw(rt, "standardMinDepth"), BrownoutOrder: 1},
			{Name: "gold", Floor: ceil, BrownoutOrder: 2},
		}
		sp := Spec{Ceiling: ceil, Floor: floor, MaxSteps: 4, MaxStep: rapid.Float64Range(0.01, 0.5).Draw(rt, "maxStep"),
			MinReplicas: minR, MaxReplicas: minR + rapid.IntRange(0, 8).Draw(rt, "spanR"),
			ScaleDownDelay:            time.Duration(rapid.IntRange(0, 120).Draw(rt, "delay")) * time.Second,
			ScaleUpDelay:              time.Duration(rapid.IntRange(0, 60).Draw(rt, "upDelay")) * time.Second,
			TokenLatencyP95:           time.Duration(rapid.IntRange(0, 60).Draw(rt, "slo")) * time.Millisecond,
			MinAgreement:              minAgree,
			TargetLoopStepsPerReplica: float64(rapid.IntRange(0, 3000).Draw(rt, "target")),
			Tiers:                     tiers, DefaultTier: "standard",
		}
		tu, err := NewTuner(sp)
		if err != nil {
			rt.Fatal(err)
		}
		toks := tokens(rand.New(rand.NewPCG(rapid.Uint64().Draw(rt, "seed"), 3)), 400, 4, rapid.Float64Range(0.5, 3).Draw(rt, "hardness"))
		tau := tauOf(sp)
		for i := range 25 {
			if rapid.Bool().Draw(rt, "otherTau") { // the caller applied something else
				for _, tr := range tiers {
					tau[tr.Name] = rapid.Float64Range(0.01, 1).Draw(rt, "tau")
				}
			}
			obs := Observation{Now: time.Unix(int64(15*i), 0), Windows: map[string]*Window{}, Tau: maps.Clone(tau),
				ReadyReplicas: rapid.IntRange(0, 10).Draw(rt, "ready"), DesiredReplicas: rapid.IntRange(0, 10).Draw(rt, "desired"), StartingReplicas: rapid.IntRange(0, 10).Draw(rt, "starting")}
			for _, tr := range tiers {
				switch rapid.IntRange(0, 2).Draw(rt, "window") {
				case 1:
					obs.Windows[tr.Name] = drawWindow(rt, tr.Name, rapid.Float64Range(0.01, 1).Draw(rt, "inForce"))
				case 2:
					obs.Windows[tr.Name] = drawRealWindow(rt, toks, tr.Name, min(max(tau[tr.Name], 0.01), 1))
				}
			}
			d := tu.Decide(obs)
			if d.HasReason(ReasonNoStats) {
				continue
			}
			for _, tr := range tu.Spec().Tiers {
				k, v, f := tr.Name, d.Tau[tr.Name], d.QualityFloors[tr.Name]
				if !(v >= tr.Floor-1e-9 && v <= ceil+1e-9) {
					rt.Fatalf("decision %d: tier %q τ %v outside [%v, %v]", i, k, v, tr.Floor, ceil)
				}
				if !(f >= tr.Floor-1e-9 && f <= ceil+1e-9) {
					rt.Fatalf("decision %d: tier %q quality floor %v outside [%v, %v]", i, k, f, tr.Floor, ceil)
				}
				// a quality floor above the tier's floor is there because the next τ down fails
				if below := math.Floor(f*Bins-1e-9) / Bins; f < ceil-1e-9 && below >= tr.Floor-1e-9 {
					w := tu.hist[k]
					agreement := sp.MinAgreement > 0 && (w == nil || w.AgreementLCB(below, tu.Spec().Confidence) < sp.MinAgreement)
					depth := tr.MinDepth > 0 && tu.depth(k, below) < tr.MinDepth
					if !agreement && !depth {
						rt.Fatalf("decision %d: tier %q quality floor %v, yet τ %v keeps minAgreement %v and minDepth %v", i, k, f, below, sp.MinAgreement, tr.MinDepth)
					}
				}
			}
			if d.Tau["gold"] != ceil {
				rt.Fatalf("decision %d: gold lowered to %v", i, d.Tau["gold"])
			}
			if msg := inOrder(sp, d); msg != "" {
				rt.Fatalf("decision %d: %s (in force %v, quality floors %v)", i, msg, obs.Tau, d.QualityFloors)
			}
			tau = maps.Clone(d.Tau)
		}
	})
}

// drawRealWindow is a window of tier k under τ inForce with the histograms of the token pool
// toks, scaled to a drawn token count, with a drawn latency p95 and, sometimes, every batch
// slot busy.
func drawRealWindow(rt *rapid.T, toks []token, k string, inForce float64) *Window {
	s := record(toks, inForce, 20)
	s.Tier = k
	scale := float64(rapid.IntRange(1, 50).Draw(rt, "scale"))
	s.Tokens = int64(float64(s.Tokens) * scale)
	s.LoopSteps = int64(float64(s.LoopSteps) * scale)
	s.TokenLatencyP95 = rapid.Float64Range(0.001, 0.2).Draw(rt, "p95")
	s.Capacity = 64
	if rapid.Bool().Draw(rt, "saturated") {
		s.InFlight = 64
	}
	w := NewWindow(k, inForce, 4, 15)
	if err := w.Add(s); err != nil {
		rt.Fatalf("a recorded sample was refused: %v", err)
	}
	return w
}
