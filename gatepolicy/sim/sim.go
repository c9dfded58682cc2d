package sim

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/loopserve/loopserve/gatepolicy"
)

// Config is one benchmark's common ground: every policy runs it with the same trace, seed,
// SLO and cold start.
type Config struct {
	Profile   *Profile
	Trace     Trace
	Seed      uint64
	Tick      float64 // seconds of one simulation step
	Interval  float64 // seconds between policy decisions (and stats windows)
	ColdStart float64 // seconds from asking for a replica to its first request
	Slots     int     // requests one replica batches at once

	TokensMin, TokensMax int     // output tokens per request, uniform
	ITLSLO, TTFTSLO      float64 // seconds
	Ceiling, Floor       float64 // τ of the LoopModel and its floor
	MinAgreement         float64
	MinReplicas          int
	MaxReplicas          int
	ScaleDownDelay       float64 // seconds
	ScaleUpDelay         float64 // seconds; the tuner's (gatepolicy.Spec.ScaleUpDelay)
	ProbeFraction        float64
}

// DefaultConfig is the benchmark's LoopModel: τ 0.9 with floor 0.5, an 8 ms ITL p95 SLO and a
// 1 s TTFT SLO, minAgreement 0.85, 1–40 replicas, a 60 s cold start, 2 min scale-down delay,
// decisions every 2 s; the tuner's scale-up delay is half the cold start (a surge shorter than
// that is absorbed by a lower τ; replicas asked after it still arrive within 1.5 cold starts).
func DefaultConfig(p *Profile, tr Trace, seed uint64) Config {
	return Config{Profile: p, Trace: tr, Seed: seed, Tick: 0.01, Interval: 2, ColdStart: 60, Slots: 32,
		TokensMin: 64, TokensMax: 256, ITLSLO: 0.008, TTFTSLO: 1, Ceiling: 0.9, Floor: 0.5, MinAgreement: 0.85,
		MinReplicas: 1, MaxReplicas: 40, ScaleDownDelay: 120, ScaleUpDelay: 30, ProbeFraction: 0.02}
}

// TunerSpec is the gatepolicy spec of the config's LoopModel.
func (c Config) TunerSpec() gatepolicy.Spec {
	return gatepolicy.Spec{Ceiling: c.Ceiling, Floor: c.Floor, MaxSteps: c.Profile.MaxSteps, MaxStep: 0.05,
		MinReplicas: c.MinReplicas, MaxReplicas: c.MaxReplicas, ScaleDownDelay: time.Duration(c.ScaleDownDelay * float64(time.Second)), ScaleUpDelay: time.Duration(c.ScaleUpDelay * float64(time.Second)),
		TokenLatencyP95: time.Duration(c.ITLSLO * float64(time.Second)), TTFTP95: time.Duration(c.TTFTSLO * float64(time.Second)),
		MinAgreement: c.MinAgreement}
}

// View is what a policy sees at a decision.
type View struct {
	Now                      float64
	Ready, Starting, Desired int
	Tau                      float64
	Running, Queued          int
	Samples                  []gatepolicy.Sample // one per ready replica, the last interval
	Interval                 float64
	Slots                    int
	ArrivalRate              float64 // requests/s over the last interval
	// MeanRunning and MeanQueued are Running and Queued averaged over the interval, as a
	// scraped gauge averaged over the sync period reads them.
	MeanRunning, MeanQueued float64
}

// Policy decides replicas and τ each interval.
type Policy interface {
	Decide(v View) (replicas int, tau float64)
}

// sampled is implemented by policies that read View.Samples; the others get none (building
// them is most of a run's work). Samples draw from their own random stream, so every policy
// sees the same arrivals.
type sampled interface{ NeedsSamples() bool }

// Point is one interval of a run, for plots.
type Point struct {
	T, Tau, P95 float64
	Ready, Want int
	Rate        float64
}

// Result is one policy's figures over the trace.
type Result struct {
	Policy         string  `json:"-"`
	Setting        string  `json:"setting"`
	Attainment     float64 `json:"attainment"`      // share of tokens within the ITL SLO
	TTFTAttainment float64 `json:"ttft_attainment"` // share of requests within the TTFT SLO
	Agreement      float64 `json:"agreement"`       // mean agreement with full depth, over tokens
	ReplicaSeconds float64 `json:"replica_seconds"` // starting, ready and draining replicas
	ScaleEvents    int     `json:"scale_events"`
	Series         []Point `json:"-"`
}

type request struct {
	arrive    float64
	remaining float64
	started   bool
}

type replica struct {
	id       int
	readyAt  float64
	draining bool
	running  []*request
	// the interval's stats
	tokens, steps, busy float64
	finished            int64
	// lat weighs the interval's tokens by (depth−1)·(Slots+1) + batch rows: a token's latency is
	// its depth times the iteration time at that batch.
	lat []float64
}

type latPoint struct{ lat, w float64 }

// Run simulates one policy over the config's trace.
func Run(c Config, name string, pol Policy) Result {
	rng := rand.New(rand.NewPCG(c.Seed, 0x5eed))
	statsRng := rand.New(rand.NewPCG(c.Seed, 0x57a75))
	wantSamples := false
	if sp, ok := pol.(sampled); ok {
		wantSamples = sp.NeedsSamples()
	}
	var runSum, queueSum float64
	ticks := 0
	p := c.Profile
	res := Result{Policy: name}
	var queue []*request
	var reps []*replica
	nextID := 0
	add := func(now float64, readyAt float64) {
		reps = append(reps, &replica{id: nextID, readyAt: readyAt})
		nextID++
	}
	// every policy starts with the fleet sized for the trace's mean load, ready
	desired := StaticReplicas(c)
	for range desired {
		add(0, 0)
	}
	tau := c.Ceiling
	var tokens, attained, agree float64
	var reqs, reqsOK float64
	arrivals := 0
	nextDecision := c.Interval
	dt := c.Tick
	// dispatch: the work queue hands requests to ready replicas with free slots, least loaded first
	dispatch := func(t float64) {
		for len(queue) > 0 {
			var best *replica
			for _, r := range reps {
				if r.draining || t < r.readyAt || len(r.running) >= c.Slots {
					continue
				}
				if best == nil || len(r.running) < len(best.running) {
					best = r
				}
			}
			if best == nil {
				break
			}
			best.running = append(best.running, queue[0])
			queue = queue[1:]
		}
	}
	for t := 0.0; t < c.Trace.End; t += dt {
		// arrivals (Poisson)
		for n := poisson(rng, c.Trace.RateAt(t)*dt); n > 0; n-- {
			queue = append(queue, &request{arrive: t, remaining: float64(c.TokensMin + rng.IntN(c.TokensMax-c.TokensMin+1))})
			arrivals++
		}
		dispatch(t)
		ticks++
		queueSum += float64(len(queue))
		st := p.at(tau)
		dEff := (1-c.ProbeFraction)*st.meanDepth + c.ProbeFraction*float64(p.MaxSteps)
		live := reps[:0]
		for _, r := range reps {
			if t >= r.readyAt && len(r.running) > 0 {
				b := len(r.running)
				runSum += float64(b)
				s := p.StepTime(b)
				perReq := dt / s / dEff // tokens each running request gets this tick
				produced := 0.0
				keep := r.running[:0]
				for _, q := range r.running {
					if !q.started {
						q.started = true
						reqs++
						if t-q.arrive+s*(1+dEff) <= c.TTFTSLO { // prefill iteration + first token
							reqsOK++
						}
					}
					n := min(perReq, q.remaining)
					q.remaining -= n
					produced += n
					if q.remaining > 1e-9 {
						keep = append(keep, q)
					} else {
						r.finished++
					}
				}
				r.running = keep
				ok := c.ProbeFraction * b2f(float64(p.MaxSteps)*s <= c.ITLSLO)
				if r.lat == nil {
					r.lat = make([]float64, p.MaxSteps*(c.Slots+1))
				}
				for d, pd := range st.depthP {
					ok += (1 - c.ProbeFraction) * pd * b2f(float64(d+1)*s <= c.ITLSLO)
					r.lat[d*(c.Slots+1)+b] += produced * pd * (1 - c.ProbeFraction)
				}
				r.lat[(p.MaxSteps-1)*(c.Slots+1)+b] += produced * c.ProbeFraction
				tokens += produced
				attained += produced * ok
				agree += produced * ((1-c.ProbeFraction)*st.agreement + c.ProbeFraction)
				r.tokens += produced
				r.steps += produced * dEff
				r.busy += dt
			}
			if r.draining && len(r.running) == 0 {
				continue // gone
			}
			res.ReplicaSeconds += dt
			live = append(live, r)
		}
		reps = live
		if t+dt/2 < nextDecision {
			continue
		}
		nextDecision += c.Interval
		// a decision, on the state a worker reports: freed slots already refilled from the queue
		dispatch(t)
		v := View{Now: t, Tau: tau, Desired: desired, Interval: c.Interval, Slots: c.Slots, Queued: len(queue), ArrivalRate: float64(arrivals) / c.Interval,
			MeanRunning: runSum / float64(max(ticks, 1)), MeanQueued: queueSum / float64(max(ticks, 1))}
		arrivals, runSum, queueSum, ticks = 0, 0, 0, 0
		var p95s, p95w float64
		for _, r := range reps {
			v.Running += len(r.running)
			switch {
			case r.draining:
			case t < r.readyAt:
				v.Starting++
			default:
				v.Ready++
				var s gatepolicy.Sample
				if wantSamples {
					s = sample(statsRng, c, r, tau, t)
					v.Samples = append(v.Samples, s)
				} else {
					s = gatepolicy.Sample{Tokens: int64(math.Round(r.tokens)), TokenLatencyP95: r.p95(c)}
				}
				p95s += s.TokenLatencyP95 * float64(s.Tokens)
				p95w += float64(s.Tokens)
			}
			r.tokens, r.steps, r.busy, r.finished = 0, 0, 0, 0
			clear(r.lat)
		}
		want, newTau := pol.Decide(v)
		want = min(max(want, c.MinReplicas), c.MaxReplicas)
		newTau = min(max(newTau, c.Floor), c.Ceiling)
		if want != desired {
			res.ScaleEvents++
		}
		desired, tau = want, newTau
		pt := Point{T: t, Tau: tau, Ready: v.Ready, Want: desired, Rate: c.Trace.RateAt(t)}
		if p95w > 0 {
			pt.P95 = p95s / p95w
		}
		res.Series = append(res.Series, pt)
		// apply: start replicas, or drain the newest starting ones, then the least loaded ready ones
		active := 0
		for _, r := range reps {
			if !r.draining {
				active++
			}
		}
		for ; active < desired; active++ {
			add(t, t+c.ColdStart)
		}
		for active > desired {
			var pick *replica
			for _, r := range reps {
				if r.draining {
					continue
				}
				if pick == nil || (t < r.readyAt) && !(t < pick.readyAt) || (t < r.readyAt) == (t < pick.readyAt) && len(r.running) < len(pick.running) {
					pick = r
				}
			}
			pick.draining = true
			// queued work it held goes back to the queue's front
			queue = append(slices.Clone(pick.running), queue...)
			pick.running = nil
			active--
		}
	}
	res.Attainment = ratio(attained, tokens)
	res.TTFTAttainment = ratio(reqsOK, reqs)
	res.Agreement = ratio(agree, tokens)
	return res
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 1
	}
	return a / b
}

func poisson(rng *rand.Rand, mean float64) int {
	if mean <= 0 {
		return 0
	}
	if mean > 30 {
		return max(0, int(math.Round(mean+math.Sqrt(mean)*rng.NormFloat64())))
	}
	l, k, q := math.Exp(-mean), 0, 1.0
	for {
		q *= rng.Float64()
		if q <= l {
			return k
		}
		k++
	}
}

// histDraws bounds the profile tokens drawn to fill one sample's histograms.
const histDraws = 300

// sample is the stats snapshot replica r would publish for the interval ending at t.
func sample(rng *rand.Rand, c Config, r *replica, tau, t float64) gatepolicy.Sample {
	p := c.Profile
	R := p.MaxSteps
	s := gatepolicy.Sample{Worker: fmt.Sprint("r", r.id), Start: epoch.Add(sec(t - c.Interval)), End: epoch.Add(sec(t)), ExitThreshold: tau, MaxSteps: R,
		Capacity: c.Slots, InFlight: len(r.running), Requests: r.finished, Tokens: int64(math.Round(r.tokens)), LoopSteps: int64(math.Round(r.steps)), BusySeconds: r.busy,
		Cum: make([][]int64, R), Censored: make([]int64, R), ProbeCum: make([][]int64, R), ProbeAgree: make([]int64, R)}
	for i := range R {
		s.Cum[i] = make([]int64, gatepolicy.Bins)
		s.ProbeCum[i] = make([]int64, gatepolicy.Bins)
	}
	if s.Tokens == 0 {
		return s
	}
	s.TokenLatencyP95 = r.p95(c)
	for range min(s.Tokens, histDraws) {
		i := rng.IntN(len(p.Cum))
		d := p.exit(i, tau)
		for st := range R {
			if st < d {
				s.Cum[st][bin(p.Cum[i][st])]++
			} else {
				s.Censored[st]++
			}
		}
	}
	probes := poisson(rng, float64(s.Tokens)*c.ProbeFraction)
	draws := min(probes, histDraws)
	agree := make([]int64, R)
	for range draws {
		i := rng.IntN(len(p.Cum))
		for st := range R {
			s.ProbeCum[st][bin(p.Cum[i][st])]++
			if p.Agree[i]>>st&1 == 1 {
				agree[st]++
			}
		}
	}
	s.Probes = int64(probes)
	if draws > 0 {
		for st := range R {
			s.ProbeAgree[st] = min(s.Probes, int64(math.Round(float64(agree[st])*float64(probes)/float64(draws))))
		}
	}
	return s
}

func bin(c1000 int) int { return min(max(c1000*gatepolicy.Bins/1000, 0), gatepolicy.Bins-1) }

// p95 is the token-latency p95 of the replica's interval.
func (r *replica) p95(c Config) float64 {
	var pts []latPoint
	for i, w := range r.lat {
		if w > 0 {
			pts = append(pts, latPoint{float64(i/(c.Slots+1)+1) * c.Profile.StepTime(i%(c.Slots+1)), w})
		}
	}
	return p95(pts)
}

func p95(pts []latPoint) float64 {
	slices.SortFunc(pts, func(a, b latPoint) int {
		switch {
		case a.lat < b.lat:
			return -1
		case a.lat > b.lat:
			return 1
		}
		return 0
	})
	total := 0.0
	for _, q := range pts {
		total += q.w
	}
	acc := 0.0
	for _, q := range pts {
		acc += q.w
		if acc >= 0.95*total {
			return q.lat
		}
	}
	return 0
}

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func sec(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
