package controllers

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/gatepolicy"
)

// tilingWorkers plays workers that follow the control subject as real ones do: each publishes
// a stats snapshot every period covering the time since its last one, and one more, early,
// when a control message changes the default tier's τ (its window under the old τ closes
// then, as runtime/serve's worker does), each at a steady tokensPerSec with the latency
// p95(τ) seconds. τ starts at start. The workers' periods start spread over one period, as
// independent processes' would. It returns a stop that ends and waits for the workers.
func tilingWorkers(t *testing.T, srv *natsServer, r bus.Ref, workers []string, period time.Duration, start float64, tokensPerSec float64, p95 func(tau float64) float64) (stop func()) {
	t.Helper()
	nc, _ := srv.js()
	type worker struct {
		mu    sync.Mutex
		name  string
		tau   float64
		since time.Time
	}
	publish := func(w *worker, now time.Time) { // w.mu held
		n := int64(math.Round(tokensPerSec * now.Sub(w.since).Seconds()))
		s := busyWindow(r, w.name, now, w.tau, n, 2, p95(w.tau))
		s.Start = w.since
		b, _ := json.Marshal(s)
		_ = nc.Publish(r.StatsSubject(), b)
		w.since = now
	}
	ws := make([]*worker, len(workers))
	for i, name := range workers {
		ws[i] = &worker{name: name, tau: start}
	}
	sub, err := nc.Subscribe(r.ControlSubject(), func(m *nats.Msg) {
		c, err := bus.DecodeControl(m.Data)
		if err != nil {
			return
		}
		for _, w := range ws {
			w.mu.Lock()
			if !w.since.IsZero() && c.ExitThreshold != w.tau {
				publish(w, time.Now())
				w.tau = c.ExitThreshold
			}
			w.mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i, w := range ws {
		// Workers are not in step: their periods start spread over one period.
		offset := period * time.Duration(i) / time.Duration(len(ws))
		wg.Go(func() {
			select {
			case <-ctx.Done():
				return
			case <-time.After(offset):
			}
			w.mu.Lock()
			w.since = time.Now()
			w.mu.Unlock()
			tick := time.NewTicker(period)
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case now := <-tick.C:
					w.mu.Lock()
					publish(w, now)
					w.mu.Unlock()
				}
			}
		})
	}
	return func() {
		cancel()
		wg.Wait()
		_ = sub.Unsubscribe()
	}
}

// TestDemandSteadyAcrossThresholdChange: on a steady load, a τ change in auto mode does not
// lower the demand the next decisions measure, although every worker's window under the old
// τ (closed when the change arrived) is refused for a stale τ: the recommended replicas stay
// at the steady count, no decision finds the demand low enough to scale down, and τ never
// climbs back.
//
// Two workers report 300 tokens/s each every 500ms; the decision interval is 1s, so the
// refused windows cover up to half an interval. Latency (p95) is 48ms at τ 0.9 (3 loop
// steps), over the 30ms SLO, and 16ms at 0.85 (2 steps). With 4 replicas of 580 loop steps/s
// (targetLoopStepsPerReplica), the ceiling's demand of about 600 × 3.05 loop steps/s needs 4;
// a demand 5% lower needs 3.
func TestDemandSteadyAcrossThresholdChange(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	lm := newLoopModel(ns, "steady", srv.url())
	lm.Spec.Loop.ExitThreshold = 0.9
	lm.Spec.Loop.MinExitThreshold = ptr.To(0.5)
	lm.Spec.SLO.TokenLatencyP95 = &metav1.Duration{Duration: 30 * time.Millisecond}
	lm.Spec.Scaling = v1alpha1.ScalingSpec{Replicas: ptr.To[int32](4), MinReplicas: 1, MaxReplicas: 10,
		TargetLoopStepsPerReplica: ptr.To[int64](580), ScaleDownDelay: &metav1.Duration{Duration: 3 * time.Second}}
	lm.Spec.Tuning = v1alpha1.TuningSpec{Mode: v1alpha1.TuningAuto, Interval: &metav1.Duration{Duration: time.Second}, MaxStep: ptr.To(0.05)}
	if err := k8s.Create(ctx, lm); err != nil {
		t.Fatal(err)
	}
	markReadyWhenCreated(t, ns, "steady-worker")
	r := bus.Ref{Namespace: ns, Name: "steady"}
	await(t, waitLong, "routable", func() error {
		e, err := srv.registryEntryOf(ctx, r)
		if err != nil || !e.Ready {
			return fmt.Errorf("entry %+v, %v", e, err)
		}
		return nil
	})
	stop := tilingWorkers(t, srv, r, []string{"a", "b"}, 500*time.Millisecond, 0.9, 300, func(tau float64) float64 {
		if tau > 0.85 {
			return 0.048
		}
		return 0.016
	})
	defer stop()

	await(t, waitLong, "τ lowered", func() error {
		if tau := getLoopModel(t, ns, "steady").Status.ExitThreshold; !(tau < 0.9) {
			return fmt.Errorf("status.exitThreshold %v", tau)
		}
		return nil
	})
	// Every decision of the next 6 intervals, as status shows it.
	type seen struct {
		tau      float64
		replicas int32
		reasons  string
	}
	var decisions []seen
	until := time.Now().Add(6 * time.Second)
	for time.Now().Before(until) {
		st := getLoopModel(t, ns, "steady").Status
		if rec := st.Recommendation; rec != nil {
			s := seen{st.ExitThreshold, rec.Replicas, strings.Join(rec.Reasons, "; ")}
			if len(decisions) == 0 || decisions[len(decisions)-1] != s {
				decisions = append(decisions, s)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The first is the decision that lowered τ, on the first stats: its window began before
	// the workers did. The ones after it measure the refused windows' intervals.
	if len(decisions) < 2 {
		t.Fatalf("decisions seen: %+v, want the one that lowered τ and those after it", decisions)
	}
	refused := false
	for i, d := range decisions {
		if i > 0 && d.tau > decisions[i-1].tau {
			t.Errorf("decision %d: τ climbed back from %v to %v on a steady load (%s)", i, decisions[i-1].tau, d.tau, d.reasons)
		}
		if i == 0 {
			continue
		}
		refused = refused || strings.Contains(d.reasons, gatepolicy.ReasonRejectedStats)
		if d.replicas != 4 || strings.Contains(d.reasons, gatepolicy.ReasonScaleDownPending) || strings.Contains(d.reasons, gatepolicy.ReasonScaledDown) {
			t.Errorf("decision %d after the τ change: %d replicas (%s), want the steady 4: the demand was measured low", i, d.replicas, d.reasons)
		}
	}
	if !refused {
		t.Errorf("no decision after the τ change refused a window under the old τ: %+v", decisions)
	}
	if got := decisions[len(decisions)-1].tau; got != 0.85 {
		t.Errorf("τ settled at %v, want 0.85 (the highest τ whose 2 loop steps meet the SLO)", got)
	}
	t.Logf("decisions after the τ change: %+v", decisions)
}
