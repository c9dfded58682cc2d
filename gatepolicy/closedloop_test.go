package gatepolicy

import (
	"fmt"
	"math"
	"math/rand/v2"
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
	scale := tokens / float64(s.Tokens)
	s.Tokens = int64(math.Round(tokens))
	s.LoopSteps = int64(math.Round(tokens * d))
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
	s.Capacity, s.InFlight = p.slots, p.clients
	w := NewWindow("", tau, 4, p.secs)
	if err := w.Add(s); err != nil {
		panic(err)
	}
	return Observation{Now: now, Windows: map[string]*Window{"": w}, Tau: map[string]float64{"": tau}, ReadyReplicas: 1, DesiredReplicas: 1}
}

// TestClosedLoopClientsRestoreTau: clients at fixed concurrency that break the SLO at the
// ceiling get τ lowered; when most of them leave, τ climbs back to the ceiling, although the
// token rate the few left reach at the lowered τ, taken as a fixed demand, would not fit the
// ceiling (the loop-step load of a closed loop does not grow with τ).
func TestClosedLoopClientsRestoreTau(t *testing.T) {
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
			t.Run(fmt.Sprint(c.name, seed), func(t *testing.T) {
				p := &closedPlant{toks: tokens(rand.New(rand.NewPCG(3, 9)), 3000, 4, 1.2), t0: c.t0, t1: c.t1, tail: c.tail, lightTail: c.lightTail, tk: c.tk, clients: 8, slots: 8, secs: 1, noise: 0.1}
				// the SLO lies between the latencies at the floor and at the ceiling under 8 clients
				lo, hi := p.observe(time.Unix(0, 0), 0.3), p.observe(time.Unix(0, 0), 0.9)
				slo := math.Sqrt(lo.Windows[""].TokenLatencyP95 * hi.Windows[""].TokenLatencyP95)
				p.clients = 1
				if light := p.observe(time.Unix(0, 0), 0.9).Windows[""].TokenLatencyP95; light > 0.8*slo {
					t.Fatalf("no room: one client at the ceiling takes %v of the SLO %v", light, slo)
				}
				p.clients = 8
				sp := Spec{Ceiling: 0.9, Floor: 0.3, MaxSteps: 4, MaxStep: 0.1, MinReplicas: 1, MaxReplicas: 1,
					TokenLatencyP95: time.Duration(slo * float64(time.Second))}
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
				step(30)
				if tau != 0.9 {
					d := tu.Decide(p.observe(now.Add(time.Second), tau))
					t.Errorf("1 client after 30 decisions: τ %v (lowered to %v under 8), want the ceiling 0.9; last reasons %v", tau, lowered, d.Reasons)
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
