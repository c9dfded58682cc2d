package gatepolicy

import (
	"errors"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"pgregory.net/rapid"
)

// token is one synthetic token: its cumulative exit probabilities c_1..c_R (non-decreasing,
// c_R = 1) and whether its argmax after each step equals the full-depth one.
type token struct {
	c     []float64
	agree []bool
}

// tokens draws n synthetic tokens of r steps; hardness skews c_t low (deeper tokens).
func tokens(rng *rand.Rand, n, r int, hardness float64) []token {
	out := make([]token, n)
	for i := range out {
		c := make([]float64, r)
		agree := make([]bool, r)
		prev := 0.0
		for t := range r {
			u := math.Pow(rng.Float64(), hardness)
			prev += (1 - prev) * u
			if t == r-1 {
				prev = 1
			}
			c[t] = prev
			agree[t] = t == r-1 || rng.Float64() < 0.5+0.5*prev
		}
		out[i] = token{c: c, agree: agree}
	}
	return out
}

// exitDepth applies the Q-exit rule: the first step whose c_t reaches tau, else R.
func exitDepth(tk token, tau float64) int {
	for t, c := range tk.c {
		if c >= tau {
			return t + 1
		}
	}
	return len(tk.c)
}

func bin(c float64) int { return min(int(c*Bins), Bins-1) }

// record builds the sample a worker would publish for toks served at tau, every probeEvery-th
// token a probe (0: none).
func record(toks []token, tau float64, probeEvery int) Sample {
	r := len(toks[0].c)
	s := Sample{Worker: "w", ExitThreshold: tau, MaxSteps: r, Start: time.Unix(0, 0), End: time.Unix(10, 0),
		Cum: make([][]int64, r), Censored: make([]int64, r), ProbeCum: make([][]int64, r), ProbeAgree: make([]int64, r)}
	for t := range r {
		s.Cum[t] = make([]int64, Bins)
		s.ProbeCum[t] = make([]int64, Bins)
	}
	for i, tk := range toks {
		probe := probeEvery > 0 && i%probeEvery == 0
		d := exitDepth(tk, tau)
		if probe {
			d = r
			s.Probes++
			for t := range r {
				s.ProbeCum[t][bin(tk.c[t])]++
				if tk.agree[t] {
					s.ProbeAgree[t]++
				}
			}
		}
		for t := range r {
			if t < d {
				s.Cum[t][bin(tk.c[t])]++
			} else {
				s.Censored[t]++
			}
		}
		s.Tokens++
		s.LoopSteps += int64(d)
	}
	return s
}

func meanDepth(toks []token, tau float64) float64 {
	sum := 0
	for _, tk := range toks {
		sum += exitDepth(tk, tau)
	}
	return float64(sum) / float64(len(toks))
}

// TestDepthMatchesMeasured: at or below the τ in force, the predicted depth equals the depth
// the exit rule gives on the same tokens, and above it too when every token is a probe. It
// never decreases in τ and stays in [1, R].
func TestDepthMatchesMeasured(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		rng := rand.New(rand.NewPCG(rapid.Uint64().Draw(rt, "seed"), 1))
		r := rapid.IntRange(1, 8).Draw(rt, "steps")
		toks := tokens(rng, rapid.IntRange(1, 400).Draw(rt, "tokens"), r, rapid.Float64Range(0.3, 3).Draw(rt, "hardness"))
		inForce := float64(rapid.IntRange(1, Bins).Draw(rt, "inForce")) / Bins
		every := rapid.IntRange(1, 10).Draw(rt, "probeEvery")
		w := NewWindow("", inForce, r, 10)
		if err := w.Add(record(toks, inForce, every)); err != nil {
			rt.Fatal(err)
		}
		prev := 1.0
		for k := 1; k <= Bins; k++ {
			tau := float64(k) / Bins
			got := w.Depth(tau)
			// exact at or below the τ in force; above it exact when every token is a probe
			if want := meanDepth(toks, tau); (tau <= inForce || every == 1) && math.Abs(got-want) > 1e-9 {
				rt.Fatalf("Depth(%v) with τ in force %v = %v, measured %v", tau, inForce, got, want)
			}
			if got < 1 || got > float64(r)+1e-9 {
				rt.Fatalf("Depth(%v) = %v outside [1, %d]", tau, got, r)
			}
			if got < prev-1e-9 {
				rt.Fatalf("Depth not monotone: Depth(%v) = %v < %v", tau, got, prev)
			}
			prev = got
		}
	})
}

// TestDepthMonotoneOnProbes: from probes only (τ in force below every candidate), the
// prediction never decreases in τ and stays in [1, R].
func TestDepthMonotoneOnProbes(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		rng := rand.New(rand.NewPCG(rapid.Uint64().Draw(rt, "seed"), 2))
		r := rapid.IntRange(1, 8).Draw(rt, "steps")
		toks := tokens(rng, rapid.IntRange(1, 300).Draw(rt, "tokens"), r, rapid.Float64Range(0.3, 3).Draw(rt, "hardness"))
		w := NewWindow("", 0.01, r, 10)
		if err := w.Add(record(toks, 0.01, 1)); err != nil {
			rt.Fatal(err)
		}
		prev := 1.0
		for k := 2; k <= Bins; k++ {
			d := w.Depth(float64(k) / Bins)
			if d < prev-1e-12 || d > float64(r)+1e-12 {
				rt.Fatalf("Depth(%v) = %v after %v (R %d)", float64(k)/Bins, d, prev, r)
			}
			prev = d
		}
	})
}

func TestAgreement(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	toks := tokens(rng, 4000, 4, 1)
	w := NewWindow("", 0.9, 4, 10)
	if err := w.Add(record(toks, 0.9, 2)); err != nil {
		t.Fatal(err)
	}
	if got := w.Agreement(1); got != 1 {
		t.Errorf("Agreement(1) = %v, want 1", got)
	}
	// Agreement by the marginal formula, computed directly from the probe tokens.
	var probes []token
	for i, tk := range toks {
		if i%2 == 0 {
			probes = append(probes, tk)
		}
	}
	for _, tau := range []float64{0.3, 0.6, 0.9} {
		// the exit distribution comes from every token at or below the τ in force
		pool := toks
		pExit := make([]float64, 4)
		for _, tk := range pool {
			pExit[exitDepth(tk, tau)-1]++
		}
		agree := make([]float64, 4)
		for _, tk := range probes {
			for s, a := range tk.agree {
				if a {
					agree[s]++
				}
			}
		}
		want := 0.0
		for s := range 4 {
			want += pExit[s] / float64(len(pool)) * agree[s] / float64(len(probes))
		}
		got := w.Agreement(tau)
		if math.Abs(got-want) > 1e-9 {
			t.Errorf("Agreement(%v) = %v, want %v", tau, got, want)
		}
		lcb := w.AgreementLCB(tau, 0.95)
		if !(lcb < got && lcb > got-0.05) {
			t.Errorf("AgreementLCB(%v) = %v, want a little below %v", tau, lcb, got)
		}
	}
	if a, lo, hi := w.Agreement(0.95), w.Agreement(0.9), w.Agreement(1); !(a >= lo && a <= hi) {
		t.Errorf("Agreement(0.95) = %v, want within [%v, %v]", a, lo, hi)
	}
	if got := NewWindow("", 0.9, 4, 10).AgreementLCB(0.5, 0.95); got != 0 {
		t.Errorf("AgreementLCB without probes = %v, want 0", got)
	}
}

func TestWilsonLower(t *testing.T) {
	for _, c := range []struct{ p, n, want float64 }{
		{0.5, 100, 0.4038}, // textbook value
		{1, 10, 0.7225},
		{0, 10, 0},
		{0.9, 0, 0},
	} {
		got := math.Round(WilsonLower(c.p, c.n, 0.95)*1e4) / 1e4
		if got != c.want {
			t.Errorf("WilsonLower(%v, %v) = %v, want %v", c.p, c.n, got, c.want)
		}
	}
}

func TestWindowRefuses(t *testing.T) {
	good := record(tokens(rand.New(rand.NewPCG(1, 1)), 50, 4, 1), 0.8, 5)
	mut := func(f func(*Sample)) Sample {
		s := record(tokens(rand.New(rand.NewPCG(1, 1)), 50, 4, 1), 0.8, 5)
		f(&s)
		return s
	}
	for _, c := range []struct {
		name string
		s    Sample
		want error
	}{
		{"short cum", mut(func(s *Sample) { s.Cum = s.Cum[:2] }), ErrMalformed},
		{"short bins", mut(func(s *Sample) { s.ProbeCum[1] = s.ProbeCum[1][:7] }), ErrMalformed},
		{"negative", mut(func(s *Sample) { s.Cum[0][3] = -1 }), ErrMalformed},
		{"agree above probes", mut(func(s *Sample) { s.ProbeAgree[0] = s.Probes + 1 }), ErrMalformed},
		{"NaN latency", mut(func(s *Sample) { s.TokenLatencyP95 = math.NaN() }), ErrMalformed},
		{"backwards window", mut(func(s *Sample) { s.End = s.Start.Add(-time.Second) }), ErrMalformed},
		{"zero steps", mut(func(s *Sample) { s.MaxSteps = 0 }), ErrMalformed},
		{"other tier", mut(func(s *Sample) { s.Tier = "gold" }), ErrMisaddressed},
		{"stale τ", mut(func(s *Sample) { s.ExitThreshold = 0.7 }), ErrStaleThreshold},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := NewWindow("", 0.8, 4, 10)
			if err := w.Add(good); err != nil {
				t.Fatal(err)
			}
			before := w.Depth(0.5)
			if err := w.Add(c.s); !errors.Is(err, c.want) {
				t.Fatalf("Add = %v, want %v", err, c.want)
			}
			if got := w.Depth(0.5); got != before || w.Samples != 1 || w.Tokens != good.Tokens {
				t.Errorf("refused sample changed the window: depth %v → %v, samples %d", before, got, w.Samples)
			}
			if w.Rejected.Total() != 1 {
				t.Errorf("Rejected = %+v, want one", w.Rejected)
			}
		})
	}
}

func TestWindowSumsWorkers(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	a, b := tokens(rng, 300, 4, 1), tokens(rng, 500, 4, 2)
	w := NewWindow("", 0.7, 4, 10)
	sa, sb := record(a, 0.7, 4), record(b, 0.7, 4)
	sa.TokenLatencyP95, sb.TokenLatencyP95 = 0.01, 0.03
	for _, s := range []Sample{sa, sb} {
		if err := w.Add(s); err != nil {
			t.Fatal(err)
		}
	}
	got := []float64{w.Depth(0.7), w.TokenRate(), w.TokenLatencyP95}
	want := []float64{meanDepth(append(a, b...), 0.7), 80, (0.01*300 + 0.03*500) / 800}
	if diff := cmp.Diff(got, want, cmp.Comparer(func(x, y float64) bool { return math.Abs(x-y) < 1e-9 })); diff != "" {
		t.Errorf("depth, rate, p95 (-got +want):\n%s", diff)
	}
}

// profile is the c_t of every token of steady: τ 0.9 runs 3 steps, τ 0.8 two.
var profile = []float64{0.5, 0.85, 0.95, 1}

// steady returns the sample worker w would publish for [from, from+secs) at a steady rate of
// tokensPerSec tokens under tau, every token's c_t following profile.
func steady(worker string, from time.Time, secs float64, tau float64, tokensPerSec float64) Sample {
	s := Sample{Worker: worker, ExitThreshold: tau, MaxSteps: 4, Start: from, End: from.Add(time.Duration(secs * float64(time.Second))),
		Cum: make([][]int64, 4), Censored: make([]int64, 4), ProbeCum: make([][]int64, 4), ProbeAgree: make([]int64, 4), Capacity: 8, InFlight: 2}
	depth := 4
	for t, c := range profile {
		if c >= tau {
			depth = t + 1
			break
		}
	}
	s.Tokens = int64(math.Round(tokensPerSec * secs))
	s.Requests = s.Tokens / 10
	s.LoopSteps = s.Tokens * int64(depth)
	for t := range 4 {
		s.Cum[t] = make([]int64, Bins)
		s.ProbeCum[t] = make([]int64, Bins)
		if t < depth {
			s.Cum[t][bin(profile[t])] = s.Tokens
		} else {
			s.Censored[t] = s.Tokens
		}
	}
	s.TokenLatencyP95 = 0.01 * float64(depth)
	return s
}

// TestWindowDemandWithRefusedSamples: samples refused for a stale τ (a worker's window under
// the τ before a change, closed when the change arrived) keep counting in the demand, and the
// accepted counts stand for the time they cover, so neither the token rate nor the executed
// loop-step rate falls after a τ change on a steady load. Each worker serves 100 tokens/s
// over a 10s interval: 3 steps a token under τ 0.9, 2 under the new τ 0.8.
func TestWindowDemandWithRefusedSamples(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	type want struct {
		tokenRate, requestRate, loopStepRate, seconds float64
		tokens                                        int64
		stale                                         int
	}
	for _, c := range []struct {
		name    string
		samples []Sample
		want    want
	}{
		{"steady under the τ in force", []Sample{
			steady("a", at(0), 5, 0.8, 100), steady("a", at(5), 5, 0.8, 100),
		}, want{100, 10, 200, 10, 1000, 0}},
		{"window under the old τ refused", []Sample{
			steady("a", at(0), 4, 0.9, 100), steady("a", at(4), 1, 0.8, 100), steady("a", at(5), 5, 0.8, 100),
		}, want{100, 10, 200, 6, 600, 1}},
		{"two workers, one slow to apply the change", []Sample{
			steady("a", at(0), 2, 0.9, 100), steady("a", at(2), 8, 0.8, 100),
			steady("b", at(0), 6, 0.9, 100), steady("b", at(6), 4, 0.8, 100),
		}, want{200, 20, 400, 6, 1200, 2}},
		{"idle window under the old τ", []Sample{
			steady("a", at(0), 5, 0.9, 0), steady("a", at(5), 5, 0.8, 100),
		}, want{50, 5, 200, 5, 500, 1}},
		{"every sample refused", []Sample{
			steady("a", at(0), 5, 0.9, 100), steady("a", at(5), 5, 0.9, 100),
		}, want{100, 10, 0, 0, 0, 2}},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := NewWindow("", 0.8, 4, 10)
			stale := 0
			for _, s := range c.samples {
				if err := w.Add(s); errors.Is(err, ErrStaleThreshold) {
					stale++
				} else if err != nil {
					t.Fatal(err)
				}
			}
			got := want{w.TokenRate(), w.RequestRate(), w.LoopStepRate(), w.Seconds, w.Tokens, w.Rejected.StaleThreshold}
			if diff := cmp.Diff(got, c.want, cmp.AllowUnexported(want{}), cmp.Comparer(func(x, y float64) bool { return math.Abs(x-y) < 1e-9 })); diff != "" {
				t.Errorf("window (-got +want):\n%s", diff)
			}
			if stale != c.want.stale {
				t.Errorf("Add refused %d samples for a stale τ, the window counted %d", stale, c.want.stale)
			}
		})
	}
}

// TestWindowDemandIgnoresBadSamples: malformed and misaddressed samples count nowhere, not
// even in the demand or the time covered.
func TestWindowDemandIgnoresBadSamples(t *testing.T) {
	t0 := time.Unix(1000, 0)
	good := steady("a", t0, 10, 0.8, 100)
	bad := []Sample{
		func() Sample { s := steady("a", t0, 10, 0.8, 100); s.Tier = "gold"; return s }(),
		func() Sample { s := steady("a", t0, 10, 0.8, 100); s.Cum = s.Cum[:2]; return s }(),
		func() Sample { s := steady("b", t0, 10, 0.9, 100); s.MaxSteps = 3; return s }(),
	}
	w := NewWindow("", 0.8, 4, 10)
	for _, s := range append([]Sample{good}, bad...) {
		_ = w.Add(s)
	}
	got := []float64{w.TokenRate(), w.LoopStepRate(), w.Seconds, float64(w.Rejected.Total())}
	if diff := cmp.Diff(got, []float64{100, 200, 10, 3}); diff != "" {
		t.Errorf("token rate, loop-step rate, seconds, rejected (-got +want):\n%s", diff)
	}
}

// TestRefusedSamplesKeepDecision: the decision after a τ change is the one the Tuner takes
// when the whole interval ran under the new τ: the window under the old τ that the change
// closed is refused, and neither the replicas (sized under targetLoopStepsPerReplica from the
// token demand) nor τ move for it. Counting only the accepted samples over the interval, the
// replicas would drop from 4 to 3 here.
func TestRefusedSamplesKeepDecision(t *testing.T) {
	sp := Spec{Ceiling: 0.8, Floor: 0.3, MaxSteps: 4, MinReplicas: 1, MaxReplicas: 10, TargetLoopStepsPerReplica: 300}
	t0 := time.Unix(1000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	decide := func(samples []Sample) Decision {
		tu, err := NewTuner(sp)
		if err != nil {
			t.Fatal(err)
		}
		// a first interval that sizes the replicas, then the interval under test
		first := NewWindow("", 0.8, 4, 10)
		for _, w := range []string{"a", "b"} {
			if err := first.Add(steady(w, at(-10), 10, 0.8, 300)); err != nil {
				t.Fatal(err)
			}
		}
		if d := tu.Decide(Observation{Now: at(0), Windows: map[string]*Window{"": first}, Tau: map[string]float64{"": 0.8}, ReadyReplicas: 1, DesiredReplicas: 1}); d.Replicas != 4 {
			t.Fatalf("first decision: %d replicas, want 4 (1200 loop steps/s at 300 a replica)", d.Replicas)
		}
		w := NewWindow("", 0.8, 4, 10)
		for _, s := range samples {
			_ = w.Add(s)
		}
		return tu.Decide(Observation{Now: at(10), Windows: map[string]*Window{"": w}, Tau: map[string]float64{"": 0.8}, ReadyReplicas: 4, DesiredReplicas: 4})
	}
	var inForce, changed []Sample
	for _, w := range []string{"a", "b"} {
		inForce = append(inForce, steady(w, at(0), 10, 0.8, 300))
		// the worker's window under the τ before (0.9) closed at 7s, when the change arrived
		changed = append(changed, steady(w, at(0), 7, 0.9, 300), steady(w, at(7), 3, 0.8, 300))
	}
	want, got := decide(inForce), decide(changed)
	if got.Replicas != want.Replicas || got.Tau[""] != want.Tau[""] {
		t.Errorf("after a τ change: τ %v, %d replicas; the same interval under the τ in force: τ %v, %d replicas", got.Tau[""], got.Replicas, want.Tau[""], want.Replicas)
	}
	if want.Replicas != 4 {
		t.Errorf("steady load: %d replicas, want 4", want.Replicas)
	}
	if got.Rejected.StaleThreshold != 2 {
		t.Errorf("rejected %+v, want the two windows under the old τ", got.Rejected)
	}
}

// With several tiers, the capacity fit's load is the sum of each tier's loop-step rate over
// the time its own accepted samples cover: a τ change of one tier (its window under the old τ
// refused) must not lower the load the fit sees.
func TestCapacityLoadAcrossTiers(t *testing.T) {
	sp := Spec{Ceiling: 0.8, Floor: 0.3, MaxSteps: 4, MinReplicas: 1, MaxReplicas: 10,
		Tiers: []Tier{{Name: "batch"}, {Name: "gold", Floor: 0.8}}, DefaultTier: "gold"}
	t0 := time.Unix(1000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	tiered := func(s Sample, tier string) Sample { s.Tier = tier; return s }
	load := func(batch []Sample) float64 {
		tu, err := NewTuner(sp)
		if err != nil {
			t.Fatal(err)
		}
		ws := map[string]*Window{"batch": NewWindow("batch", 0.8, 4, 10), "gold": NewWindow("gold", 0.8, 4, 10)}
		for _, s := range batch {
			_ = ws["batch"].Add(tiered(s, "batch"))
		}
		if err := ws["gold"].Add(tiered(steady("a", at(0), 10, 0.8, 100), "gold")); err != nil {
			t.Fatal(err)
		}
		tu.Decide(Observation{Now: at(10), Windows: ws, Tau: map[string]float64{"batch": 0.8, "gold": 0.8}, ReadyReplicas: 2, DesiredReplicas: 2})
		if len(tu.points) != 1 {
			t.Fatalf("%d capacity points after one interval, want 1", len(tu.points))
		}
		return tu.points[0].load
	}
	inForce := load([]Sample{steady("a", at(0), 10, 0.8, 300)})
	// batch's window under the τ before (0.9) closed at 7s, when the change arrived
	changed := load([]Sample{steady("a", at(0), 7, 0.9, 300), steady("a", at(7), 3, 0.8, 300)})
	if math.Abs(changed-inForce) > 1e-9*inForce {
		t.Errorf("capacity load after batch's τ change: %v loop steps/s a replica; the interval under the τ in force: %v", changed, inForce)
	}
}
