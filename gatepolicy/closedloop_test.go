package gatepolicy

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

// closedPlant is one replica serving clients that each send their next request as soon as the
// last one ends (a benchmark client at fixed concurrency): the rows in the batch are the
// clients (up to the batch capacity), an iteration takes t0 + t1·rows, and a token of depth d
// takes d iterations. Unlike plant's open arrivals, the token rate falls when τ rises: the
// loop-step load stays rows / iteration time whatever τ is.
type closedPlant struct {
	toks           []token
	t0, t1, tail   float64
	lightTail      float64 // p95/mean with one row (tail otherwise); 0: tail
	tk             float64 // per-token work in an iteration (sampling, streaming)
	clients, slots int
	noise          float64 // lognormal σ of each window's p95 and iteration time
	rng            *rand.Rand
	secs           float64
	// lag is the share of the window after a τ change that ran under the old τ (a worker
	// applies a change mid-window; the operator refuses those samples as stale): the window
	// that follows a change covers only 1-lag of the interval.
	lag  float64
	last float64 // the τ of the previous window
	// spike multiplies the p95 of the window of that number (counted from 1): a hiccup of the
	// machine (a GC pause, a noisy neighbour) that misses the SLO once
	spike map[int]float64
	n     int
}

func (p *closedPlant) observe(now time.Time, tau float64) Observation {
	s := record(p.toks, tau, 20)
	d := float64(s.LoopSteps) / float64(s.Tokens)
	rows := min(p.clients, p.slots)
	iter := p.t0 + p.t1*float64(rows) + p.tk*float64(rows)/d
	if p.rng != nil {
		iter *= math.Exp(p.noise * p.rng.NormFloat64())
	}
	tokens := float64(rows) / (d * iter) * p.secs
	share := 1.0
	if p.last != 0 && p.last != tau {
		share = 1 - p.lag
	}
	scale := tokens * share / float64(s.Tokens)
	s.Tokens = int64(math.Round(tokens * share))
	s.LoopSteps = int64(math.Round(tokens * share * d))
	s.Probes = int64(math.Round(float64(s.Probes) * scale))
	for st := range s.ProbeAgree {
		s.ProbeAgree[st] = min(int64(math.Round(float64(s.ProbeAgree[st])*scale)), s.Probes)
	}
	tail := p.tail
	if rows == 1 && p.lightTail > 0 {
		tail = p.lightTail
	}
	if p.rng != nil {
		tail *= math.Exp(p.noise * p.rng.NormFloat64())
	}
	s.TokenLatencyP95 = d * iter * tail
	p.n++
	if x, ok := p.spike[p.n]; ok {
		s.TokenLatencyP95 *= x
	}
	s.Capacity, s.InFlight = p.slots, p.clients
	w := NewWindow("", tau, 4, p.secs)
	if share < 1 {
		// the part under the old τ, refused as stale: it counts in the demand and the time
		old := record(p.toks[:1], p.last, 0)
		old.Tokens = int64(math.Round(tokens * (1 - share)))
		old.LoopSteps = int64(math.Round(tokens * (1 - share) * d))
		old.End = s.Start.Add(time.Duration(float64(s.End.Sub(s.Start)) * (1 - share)))
		s.Start = old.End
		_ = w.Add(old)
	}
	p.last = tau
	if err := w.Add(s); err != nil {
		panic(err)
	}
	return Observation{Now: now, Windows: map[string]*Window{"": w}, Tau: map[string]float64{"": tau}, ReadyReplicas: 1, DesiredReplicas: 1}
}

// spec is the one-replica spec (τ 0.9, floor 0.3, maxStep 0.1) whose SLO lies between the
// latencies at the floor and at the ceiling under the plant's clients (their geometric mean).
func (p *closedPlant) spec() Spec {
	lo, hi := p.observe(time.Unix(0, 0), 0.3), p.observe(time.Unix(0, 0), 0.9)
	slo := math.Sqrt(lo.Windows[""].TokenLatencyP95 * hi.Windows[""].TokenLatencyP95)
	return Spec{Ceiling: 0.9, Floor: 0.3, MaxSteps: 4, MaxStep: 0.1, MinReplicas: 1, MaxReplicas: 1,
		TokenLatencyP95: time.Duration(slo * float64(time.Second))}
}

// TestClosedLoopClientsRestoreTau: clients at fixed concurrency that break the SLO at the
// ceiling get τ lowered; when most of them leave, τ climbs back to the ceiling, although the
// token rate the few left reach at the lowered τ, taken as a fixed demand, would not fit the
// ceiling (the loop-step load of a closed loop does not grow with τ). It does so too when the
// window after each τ change covers only 40% of the interval (the rest ran under the old τ
// and is refused: a raise is not measured before the next decision), and when one window of
// the light load misses the SLO five times over (a hiccup of the machine, not the load): at
// a τ that met the SLO before, within 10 decisions more; where the hiccup may hit the first
// window of a raise (indistinguishable from a raise that failed), within the back-off more.
func TestClosedLoopClientsRestoreTau(t *testing.T) {
	for _, cond := range []struct {
		name   string
		lag    float64
		spike  int // the window of the light load (counted from 1) whose p95 is 5×; 0: none
		budget int // the decisions of the light load
	}{
		{"", 0, 0, 30},
		{"late windows, ", 0.6, 0, 30},
		{"one hiccup, ", 0, 20, 40},
		{"a hiccup on a raise, ", 0, 10, 30 + retryAfter(1)},
		{"late windows and a hiccup, ", 0.6, 8, 30 + retryAfter(1)},
	} {
		testClosedLoopClientsRestoreTau(t, cond.name, cond.lag, cond.spike, cond.budget)
	}
}

func testClosedLoopClientsRestoreTau(t *testing.T, cond string, lag float64, spike, budget int) {
	for _, c := range []struct {
		name          string
		t0, t1, tail  float64
		lightTail, tk float64
	}{
		{"per-row cost", 0.0005, 0.0003, 3, 0, 0},
		{"heavy tail", 0.0004, 0.0004, 8, 0, 0},
		{"per-token cost", 0.0004, 0.0002, 3, 0, 0.0005},
		{"per-token cost, heavier tail alone", 0.0004, 0.0002, 3, 6, 0.0005},
		{"mostly per-token cost", 0.0002, 0.0001, 3, 0, 0.001},
		{"rows cost all", 0.0001, 0.0005, 3, 0, 0},
		{"rows cost all, heavier tail alone", 0.0001, 0.0005, 2, 3, 0},
		{"no batching gain", 0.00002, 0.0004, 3, 0, 0.0003},
		{"no batching gain, heavier tail alone", 0.00002, 0.0004, 2, 4, 0.0003},
	} {
		for seed := range uint64(20) {
			t.Run(fmt.Sprint(cond, c.name, seed), func(t *testing.T) {
				p := &closedPlant{toks: tokens(rand.New(rand.NewPCG(3, 9)), 3000, 4, 1.2), t0: c.t0, t1: c.t1, tail: c.tail, lightTail: c.lightTail, tk: c.tk, clients: 8, slots: 8, secs: 1, noise: 0.1}
				// the SLO lies between the latencies at the floor and at the ceiling under 8 clients
				sp := p.spec()
				slo := sp.TokenLatencyP95.Seconds()
				p.clients = 1
				if light := p.observe(time.Unix(0, 0), 0.9).Windows[""].TokenLatencyP95; light > 0.8*slo {
					t.Fatalf("no room: one client at the ceiling takes %v of the SLO %v", light, slo)
				}
				p.clients, p.lag = 8, lag
				tu, err := NewTuner(sp)
				if err != nil {
					t.Fatal(err)
				}
				tau, now := 0.9, time.Unix(0, 0)
				step := func(n int) {
					for range n {
						now = now.Add(time.Second)
						d := tu.Decide(p.observe(now, tau))
						tau = d.Tau[""]
					}
				}
				step(30)
				if got := p.observe(now, tau).Windows[""].TokenLatencyP95; tau >= 0.9 || got > slo {
					t.Fatalf("8 clients: τ %v, p95 %v, SLO %v", tau, got, slo)
				}
				lowered := tau
				p.rng = rand.New(rand.NewPCG(seed, 1)) // each window's p95 and iteration time vary from here on
				p.clients = 1
				if spike > 0 {
					p.spike = map[int]float64{p.n + spike: 5}
				}
				step(budget)
				if tau != 0.9 {
					d := tu.Decide(p.observe(now.Add(time.Second), tau))
					t.Errorf("1 client after %d decisions: τ %v (lowered to %v under 8), want the ceiling 0.9; last reasons %v", budget, tau, lowered, d.Reasons)
				}
			})
		}
	}
}

// TestHeldSaysWhy: a τ held below the ceiling names what holds it, here the model's predicted
// latency at the next τ on the open-arrival plant (a fixed load the ceiling cannot carry on
// one replica), and a hold right after a missed window names the miss.
func TestHeldSaysWhy(t *testing.T) {
	sp := baseSpec()
	sp.TokenLatencyP95 = 7 * time.Millisecond
	p := newPlant(0)
	p.demand[""] = 865
	tu, err := NewTuner(sp)
	if err != nil {
		t.Fatal(err)
	}
	tau, ready := tauOf(sp), 1
	var hist []Decision
	run(t, tu, p, time.Unix(0, 0), 80, 1, tau, &ready, &hist)
	var cooling, predicted bool
	for _, d := range hist {
		for _, r := range d.Reasons {
			if r.Code != ReasonHeld {
				continue
			}
			cooling = cooling || strings.Contains(r.Message, "held: a recent window missed the SLO or queued")
			predicted = predicted || strings.Contains(r.Message, "predicts latency p95")
		}
	}
	last := hist[len(hist)-1]
	if !(last.Tau[""] < sp.Ceiling) || !cooling || !predicted {
		t.Errorf("settled τ %v; a held reason naming the missed window: %v, naming the predicted latency: %v; last reasons %v", last.Tau[""], cooling, predicted, last.Reasons)
	}
}

// TestMissBackOff: one client at fixed concurrency; one window misses the SLO five times over.
// On the first windows of a raise to the ceiling the miss counts against measured headroom: τ
// stays below the ceiling, its held reason names the retry, and it is back at the ceiling
// once the back-off has passed. After outlierWindows windows at the ceiling within the SLO it
// is an outlier: τ is back within a few decisions and no reason names a retry.
func TestMissBackOff(t *testing.T) {
	for _, c := range []struct {
		name    string
		spike   int // the window of the light load whose p95 is 5×
		outlier bool
	}{
		{"on the second window at the ceiling", 11, false},
		{"on the third window at the ceiling", 12, false},
		{"after three windows at the ceiling", 13, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := &closedPlant{toks: tokens(rand.New(rand.NewPCG(3, 9)), 3000, 4, 1.2), t0: 0.0001, t1: 0.0005, tail: 3, clients: 8, slots: 8, secs: 1}
			tu, err := NewTuner(p.spec())
			if err != nil {
				t.Fatal(err)
			}
			tau, now := 0.9, time.Unix(0, 0)
			var taus []float64 // of the light load's decisions
			retryNamed := false
			for i := range 30 + c.spike + retryAfter(1) + 10 {
				if i == 30 {
					p.clients = 1
					p.spike = map[int]float64{p.n + c.spike: 5}
				}
				now = now.Add(time.Second)
				d := tu.Decide(p.observe(now, tau))
				tau = d.Tau[""]
				if i < 30 {
					continue
				}
				taus = append(taus, tau)
				for _, r := range d.Reasons {
					retryNamed = retryNamed || (len(taus) > c.spike && r.Code == ReasonHeld && strings.Contains(r.Message, "measured headroom is tried again in"))
				}
			}
			if got := taus[c.spike-2]; got != 0.9 {
				t.Fatalf("τ %v before the miss, want the ceiling 0.9 (decisions %v)", got, taus)
			}
			back := slices.Index(taus[c.spike-1:], 0.9) // decisions after the miss until τ is back
			switch {
			case c.outlier && (back < 0 || back > coolDecisions+4 || retryNamed):
				t.Errorf("an outlier: τ back at the ceiling after %d decisions (want ≤ %d), a retry named: %v; decisions %v", back, coolDecisions+4, retryNamed, taus)
			case !c.outlier && (back < retryAfter(1)-2 || back > retryAfter(1)+8 || !retryNamed):
				t.Errorf("a miss on a raise: τ back at the ceiling after %d decisions (want after the back-off of %d), a retry named: %v; decisions %v", back, retryAfter(1), retryNamed, taus)
			}
		})
	}
}
