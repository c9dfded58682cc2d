package serve

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/gatepolicy"
)

// Tuning modes of LocalTuning, as in a LoopModel's spec.tuning.mode.
const (
	TuningAuto     = "auto"
	TuningAdvisory = "advisory"
	TuningOff      = "off"
)

// LocalTuning is the tuning loop of `loopserve up`: the same gatepolicy code as the operator,
// fed by the local worker's stats snapshots, for one worker (replicas fixed at 1), with the
// quality tiers of Spec.Tiers. In auto mode each decision's thresholds are written to the
// registry entry, which the worker follows and the gateway stamps into new jobs and shows in
// /v1/models; advisory only records the decision.
type LocalTuning struct {
	Mode     string          // TuningAuto or TuningAdvisory; "" or TuningOff runs no loop
	Spec     gatepolicy.Spec // Ceiling and MaxSteps default to the engine's threshold and the worker's MaxSteps
	Interval time.Duration   // between decisions; 0 = twice the worker's stats interval
}

func (o LocalTuning) enabled() bool { return o.Mode == TuningAuto || o.Mode == TuningAdvisory }

// thresholds are the model's thresholds at start: every tier of Spec.Tiers (none: the one
// implicit tier) at ceiling, the engine's threshold. Requests pick a tier whatever the mode.
func (o LocalTuning) thresholds(ceiling float64) (bus.Thresholds, error) {
	th := bus.Thresholds{ExitThreshold: ceiling}
	if len(o.Spec.Tiers) == 0 {
		return th, nil
	}
	th.DefaultTier, th.Tiers = o.Spec.DefaultTier, map[string]float64{}
	for _, t := range o.Spec.Tiers {
		if _, dup := th.Tiers[t.Name]; dup {
			return bus.Thresholds{}, fmt.Errorf("tier %q given twice", t.Name)
		}
		th.Tiers[t.Name] = ceiling
	}
	if err := th.Validate(); err != nil {
		return bus.Thresholds{}, fmt.Errorf("tiers: %w", err)
	}
	return th, nil
}

// localTuner owns the loop's state; Run is its only goroutine.
type localTuner struct {
	nc       *nats.Conn
	kv       jetstream.KeyValue
	entry    bus.ModelEntry
	tuner    *gatepolicy.Tuner
	mode     string
	interval time.Duration
	last     atomic.Pointer[gatepolicy.Decision]

	mu    sync.Mutex
	snaps []bus.StatsSnapshot // since the last decision
}

func newLocalTuner(nc *nats.Conn, kv jetstream.KeyValue, entry bus.ModelEntry, o LocalTuning, statsInterval time.Duration) (*localTuner, error) {
	spec := o.Spec
	if spec.Ceiling == 0 {
		spec.Ceiling = entry.ExitThreshold
	}
	if spec.MaxSteps == 0 {
		spec.MaxSteps = entry.MaxSteps
	}
	spec.MinReplicas, spec.MaxReplicas = 1, 1
	t, err := gatepolicy.NewTuner(spec)
	if err != nil {
		return nil, err
	}
	interval := o.Interval
	if interval <= 0 {
		interval = 2 * statsInterval
	}
	return &localTuner{nc: nc, kv: kv, entry: entry, tuner: t, mode: o.Mode, interval: interval}, nil
}

// Run decides every interval until ctx ends.
func (lt *localTuner) Run(ctx context.Context) error {
	r := lt.entry.Ref()
	sub, err := lt.nc.Subscribe(r.StatsSubject(), func(m *nats.Msg) {
		s, err := bus.DecodeStats(m.Data)
		if err != nil || s.Ref() != r {
			return // the window counts nothing it never got; malformed input is dropped
		}
		lt.mu.Lock()
		lt.snaps = append(lt.snaps, s)
		lt.mu.Unlock()
	})
	if err != nil {
		return err
	}
	defer func() { _ = sub.Unsubscribe() }()
	tick := time.NewTicker(lt.interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-tick.C:
			lt.decide(ctx, now)
		}
	}
}

func (lt *localTuner) decide(ctx context.Context, now time.Time) {
	lt.mu.Lock()
	snaps := lt.snaps
	lt.snaps = nil
	lt.mu.Unlock()
	taus := lt.entry.PerTier()
	wins := make(map[string]*gatepolicy.Window, len(taus))
	for tier, tau := range taus {
		wins[tier] = gatepolicy.NewWindow(tier, tau, lt.entry.MaxSteps, lt.interval.Seconds())
	}
	for _, s := range snaps {
		for _, p := range s.Samples() {
			w, ok := wins[p.Tier]
			if !ok {
				w = wins[lt.entry.DefaultTier] // refuses it as misaddressed
			}
			_ = w.Add(p) // refusals (a window under an older threshold) are counted in w.Rejected
		}
	}
	d := lt.tuner.Decide(gatepolicy.Observation{Now: now, Windows: wins, Tau: taus, ReadyReplicas: 1, DesiredReplicas: 1})
	lt.last.Store(&d)
	next := lt.entry.With(d.Tau)
	if lt.mode != TuningAuto || next.Validate() != nil || next.Equal(lt.entry.Thresholds) {
		return
	}
	e := lt.entry
	e.Thresholds, e.Updated = next, now.UTC()
	if err := bus.PutModel(ctx, lt.kv, e); err != nil {
		return // retried at the next decision
	}
	lt.entry = e
}

// Decision returns the tuning loop's last decision; ok is false without a loop or before the
// first decision.
func (l *Local) Decision() (d gatepolicy.Decision, ok bool) {
	if l.tuner == nil {
		return gatepolicy.Decision{}, false
	}
	p := l.tuner.last.Load()
	if p == nil {
		return gatepolicy.Decision{}, false
	}
	return *p, true
}
