package serve

import (
	"context"
	"encoding/json"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/engine"
)

// maxSamples bounds the latency samples a window keeps for its quantiles (reservoir sampling).
const maxSamples = 4096

// statsWindow accumulates one worker's bus.StatsSnapshot between publications: the worker's
// load, and per quality tier its counts and histograms under the tier's threshold in force.
// Safe for concurrent use.
type statsWindow struct {
	mu       sync.Mutex
	snap     bus.StatsSnapshot // the worker's fields; the tiers' are filled in by rotate
	th       bus.Thresholds    // in force during the window
	tiers    map[string]*tierWindow
	active   int       // requests generating
	busyFrom time.Time // when active last became > 0
}

// tierWindow is one tier's part of the window, with the latency samples of its requests.
type tierWindow struct {
	st   bus.TierStats
	itl  samples
	ttft samples
	wait samples
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

func newStatsWindow(r bus.Ref, worker string, steps, capacity int, th bus.Thresholds) *statsWindow {
	w := &statsWindow{}
	w.snap = bus.StatsSnapshot{Namespace: r.Namespace, Name: r.Name, Worker: worker, MaxSteps: steps, Capacity: capacity, Start: time.Now()}
	w.reset(th)
	return w
}

// reset starts empty tier windows under th; the caller holds mu (or owns w).
func (w *statsWindow) reset(th bus.Thresholds) {
	w.th = th
	w.tiers = make(map[string]*tierWindow, max(len(th.Tiers), 1))
	add := func(name string, tau float64) {
		tw := &tierWindow{st: bus.NewTierStats(name, w.snap.MaxSteps)}
		tw.st.ExitThreshold = tau
		for _, s := range []*samples{&tw.itl, &tw.ttft, &tw.wait} {
			s.rng = 0x9e3779b97f4a7c15
		}
		w.tiers[name] = tw
	}
	if len(th.Tiers) == 0 {
		add("", th.ExitThreshold)
		return
	}
	for name, tau := range th.Tiers {
		add(name, tau)
	}
}

// tier returns the window of a tier ("" is the default tier); a tier the worker does not know
// (yet) counts in the default tier's load, known is false.
func (w *statsWindow) tier(name string) (tw *tierWindow, known bool) {
	if name == "" {
		name = w.th.DefaultTier
	}
	if tw, ok := w.tiers[name]; ok {
		return tw, true
	}
	return w.tiers[w.th.DefaultTier], false
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

func (w *statsWindow) request(tier string) {
	w.mu.Lock()
	tw, _ := w.tier(tier)
	tw.st.Requests++
	w.mu.Unlock()
}

// token records one generated token of a tier's request: its loop steps, and for probes their
// c_t and agreement with full depth. The depth histograms (DepthCounts, Cum, Censored) assume
// the tier's threshold in force, so only a token generated under it (inForce) enters them: a
// request that set its own exit_threshold, max_depth or deadline, or that was stamped with an
// earlier threshold, still counts in the load (Tokens, LoopSteps) and as a probe, whose steps
// all ran. tau is the threshold the token's request ran under, 0 for a request that overrode
// its depth.
func (w *statsWindow) token(t engine.Token, tier string, tau float64) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	tw, known := w.tier(tier)
	s := &tw.st
	maxSteps := w.snap.MaxSteps
	inForce := known && tau > 0 && tau == s.ExitThreshold
	steps := len(t.Cum)
	if steps == 0 {
		steps = t.Depth
	}
	s.Tokens++
	s.LoopSteps += int64(steps)
	if inForce {
		if t.Depth >= 1 && t.Depth <= maxSteps {
			s.DepthCounts[t.Depth-1]++
		}
		for i := range maxSteps {
			if i < len(t.Cum) {
				s.Cum[i][bus.CumBin(float64(t.Cum[i]))]++
			} else {
				s.Censored[i]++
			}
		}
	}
	if t.Probe && len(t.Cum) >= maxSteps {
		s.Probes++
		for i := range maxSteps {
			s.ProbeCum[i][bus.CumBin(float64(t.Cum[i]))]++
			if i < len(t.Agree) && t.Agree[i] {
				s.ProbeAgree[i]++
			}
		}
	}
	return steps
}

// observe adds a latency sample of a tier's request; pick chooses which.
func (w *statsWindow) observe(tier string, pick func(*tierWindow) *samples, d time.Duration) {
	w.mu.Lock()
	tw, _ := w.tier(tier)
	pick(tw).add(d.Seconds())
	w.mu.Unlock()
}

func itlOf(tw *tierWindow) *samples  { return &tw.itl }
func ttftOf(tw *tierWindow) *samples { return &tw.ttft }
func waitOf(tw *tierWindow) *samples { return &tw.wait }

// rotate closes the window at now and starts the next one under thresholds th, returning the
// closed window: the default tier's part at the snapshot's top level, the other tiers that
// saw traffic in Tiers. Idle windows are published too: the operator divides loop steps by
// the time the windows cover, so a window left out would inflate the rates.
func (w *statsWindow) rotate(now time.Time, th bus.Thresholds) bus.StatsSnapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.snap
	out.End = now
	if w.active > 0 {
		out.BusySeconds += now.Sub(w.busyFrom).Seconds()
		w.busyFrom = now
	}
	for _, name := range slices.Sorted(maps.Keys(w.tiers)) {
		tw := w.tiers[name]
		st := tw.st
		st.TokenLatencyP50 = tw.itl.quantile(0.5)
		st.TokenLatencyP95 = tw.itl.quantile(0.95)
		st.TTFTP95 = tw.ttft.quantile(0.95)
		st.QueueWaitP95 = tw.wait.quantile(0.95)
		switch {
		case name == w.th.DefaultTier:
			out.TierStats = st
		case st.Tokens > 0 || st.Requests > 0:
			out.Tiers = append(out.Tiers, st)
		}
	}
	w.snap.Start, w.snap.BusySeconds, w.snap.InFlight = now, 0, w.active
	w.reset(th)
	return out
}

// thresholds returns the thresholds in force of the current window.
func (w *statsWindow) thresholds() bus.Thresholds {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.th
}

func (w *Worker) observeToken(t engine.Token, tier string, tau float64) {
	steps := w.stats.token(t, tier, tau)
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

func (w *Worker) observeQueueWait(tier string, d time.Duration) {
	w.stats.observe(tier, waitOf, d)
	if w.met != nil {
		w.met.queueWait.Observe(d.Seconds())
	}
}

func (w *Worker) observeTTFT(tier string, d time.Duration) {
	w.stats.observe(tier, ttftOf, d)
	if w.met != nil {
		w.met.ttft.Observe(d.Seconds())
	}
}

func (w *Worker) observeITL(tier string, d time.Duration) {
	w.stats.observe(tier, itlOf, d)
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
			snap := w.stats.rotate(now, w.stats.thresholds())
			if w.met != nil {
				secs := snap.End.Sub(snap.Start).Seconds()
				if secs > 0 {
					var tokens, steps int64
					for _, ts := range snap.All() {
						tokens, steps = tokens+ts.Tokens, steps+ts.LoopSteps
					}
					w.met.tokensPerSec.Set(float64(tokens) / secs)
					w.met.stepsPerSec.Set(float64(steps) / secs)
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
