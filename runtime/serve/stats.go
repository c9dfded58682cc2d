package serve

import (
	"context"
	"encoding/json"
	"slices"
	"sync"
	"time"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/engine"
)

// maxSamples bounds the latency samples a window keeps for its quantiles (reservoir sampling).
const maxSamples = 4096

// statsWindow accumulates one worker's bus.StatsSnapshot between publications. Safe for
// concurrent use.
type statsWindow struct {
	mu       sync.Mutex
	snap     bus.StatsSnapshot
	active   int       // requests generating
	busyFrom time.Time // when active last became > 0
	itl      samples
	ttft     samples
	wait     samples
}

type samples struct {
	xs   []float64
	seen int
	rng  uint64
}

func (s *samples) add(x float64) {
	s.seen++
	if len(s.xs) < maxSamples {
		s.xs = append(s.xs, x)
		return
	}
	// xorshift: cheap and good enough to pick which sample to replace.
	s.rng ^= s.rng << 13
	s.rng ^= s.rng >> 7
	s.rng ^= s.rng << 17
	if i := int(s.rng % uint64(s.seen)); i < maxSamples {
		s.xs[i] = x
	}
}

// quantile returns the q-quantile (nearest rank) of the samples, 0 when empty; it sorts in place.
func (s *samples) quantile(q float64) float64 {
	if len(s.xs) == 0 {
		return 0
	}
	slices.Sort(s.xs)
	i := int(q*float64(len(s.xs))+0.5) - 1
	return s.xs[max(0, min(i, len(s.xs)-1))]
}

func (s *samples) reset() {
	s.xs, s.seen = s.xs[:0], 0
}

func newStatsWindow(r bus.Ref, worker string, steps, capacity int, tau float64) *statsWindow {
	w := &statsWindow{}
	w.snap = bus.NewStatsSnapshot(r, worker, steps)
	w.snap.Capacity = capacity
	w.snap.ExitThreshold = tau
	w.snap.Start = time.Now()
	for _, s := range []*samples{&w.itl, &w.ttft, &w.wait} {
		s.rng = 0x9e3779b97f4a7c15
	}
	return w
}

func (w *statsWindow) begin() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.active == 0 {
		w.busyFrom = time.Now()
	}
	w.active++
	w.snap.InFlight = w.active
}

func (w *statsWindow) end() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.active--
	if w.active == 0 {
		w.snap.BusySeconds += time.Since(w.busyFrom).Seconds()
	}
	w.snap.InFlight = w.active
}

func (w *statsWindow) request() {
	w.mu.Lock()
	w.snap.Requests++
	w.mu.Unlock()
}

// token records one generated token: its loop steps, and for probes their c_t and agreement
// with full depth. The depth histograms (DepthCounts, Cum, Censored) assume the window's
// threshold, so only a token generated under it (inForce) enters them: a request that set its
// own exit_threshold, max_depth or deadline, or that was stamped with an earlier threshold,
// still counts in the load (Tokens, LoopSteps) and as a probe, whose steps all ran. tau is the
// threshold the token's request ran under, 0 for a request that overrode its depth.
func (w *statsWindow) token(t engine.Token, tau float64) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := &w.snap
	inForce := tau > 0 && tau == s.ExitThreshold
	steps := len(t.Cum)
	if steps == 0 {
		steps = t.Depth
	}
	s.Tokens++
	s.LoopSteps += int64(steps)
	if inForce {
		if t.Depth >= 1 && t.Depth <= s.MaxSteps {
			s.DepthCounts[t.Depth-1]++
		}
		for i := range s.MaxSteps {
			if i < len(t.Cum) {
				s.Cum[i][bus.CumBin(float64(t.Cum[i]))]++
			} else {
				s.Censored[i]++
			}
		}
	}
	if t.Probe && len(t.Cum) >= s.MaxSteps {
		s.Probes++
		for i := range s.MaxSteps {
			s.ProbeCum[i][bus.CumBin(float64(t.Cum[i]))]++
			if i < len(t.Agree) && t.Agree[i] {
				s.ProbeAgree[i]++
			}
		}
	}
	return steps
}

func (w *statsWindow) observe(s *samples, d time.Duration) {
	w.mu.Lock()
	s.add(d.Seconds())
	w.mu.Unlock()
}

// rotate closes the window at now and starts the next one under threshold tau, returning the
// closed window. Idle windows are published too: the operator divides loop steps by the time
// the windows cover, so a window left out would inflate the rates.
func (w *statsWindow) rotate(now time.Time, tau float64) bus.StatsSnapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.snap
	out.End = now
	if w.active > 0 {
		out.BusySeconds += now.Sub(w.busyFrom).Seconds()
		w.busyFrom = now
	}
	out.TokenLatencyP50 = w.itl.quantile(0.5)
	out.TokenLatencyP95 = w.itl.quantile(0.95)
	out.TTFTP95 = w.ttft.quantile(0.95)
	out.QueueWaitP95 = w.wait.quantile(0.95)
	for _, s := range []*samples{&w.itl, &w.ttft, &w.wait} {
		s.reset()
	}
	w.snap = bus.NewStatsSnapshot(out.Ref(), out.Worker, out.MaxSteps)
	w.snap.Capacity = out.Capacity
	w.snap.ExitThreshold = tau
	w.snap.Start = now
	w.snap.InFlight = w.active
	return out
}

func (w *statsWindow) threshold() float64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.snap.ExitThreshold
}

func (w *Worker) observeToken(t engine.Token, tau float64) {
	steps := w.stats.token(t, tau)
	m := w.met
	if m == nil {
		return
	}
	m.tokens.Inc()
	m.loopSteps.Add(float64(steps))
	m.exitDepth.Observe(float64(t.Depth))
	for i, c := range t.Cum {
		if i < len(m.cum) {
			m.cum[i].Observe(float64(c))
		}
	}
	if t.Probe {
		m.probeTokens.Inc()
		for i, a := range t.Agree {
			if a && i < len(m.probeAgree) {
				m.probeAgree[i].Inc()
			}
		}
	}
}

func (w *Worker) observeQueueWait(d time.Duration) {
	w.stats.observe(&w.stats.wait, d)
	if w.met != nil {
		w.met.queueWait.Observe(d.Seconds())
	}
}

func (w *Worker) observeTTFT(d time.Duration) {
	w.stats.observe(&w.stats.ttft, d)
	if w.met != nil {
		w.met.ttft.Observe(d.Seconds())
	}
}

func (w *Worker) observeITL(d time.Duration) {
	w.stats.observe(&w.stats.itl, d)
	if w.met != nil {
		w.met.itl.Observe(d.Seconds())
	}
}

// statsLoop publishes a snapshot every StatsInterval until ctx ends.
func (w *Worker) statsLoop(ctx context.Context) {
	t := time.NewTicker(w.opt.StatsInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			snap := w.stats.rotate(now, w.stats.threshold())
			if w.met != nil {
				secs := snap.End.Sub(snap.Start).Seconds()
				if secs > 0 {
					w.met.tokensPerSec.Set(float64(snap.Tokens) / secs)
					w.met.stepsPerSec.Set(float64(snap.LoopSteps) / secs)
				}
			}
			w.publishStats(snap)
		}
	}
}

func (w *Worker) publishStats(s bus.StatsSnapshot) {
	b, err := json.Marshal(s)
	if err != nil {
		return
	}
	if err := w.nc.Publish(w.opt.Ref.StatsSubject(), b); err != nil {
		w.log.Debug("publishing stats", "err", err)
	}
}
