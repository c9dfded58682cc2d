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
// when it applies a τ change of the default tier (its window under the old τ closes then, as
// runtime/serve's worker does), each at a steady tokensPerSec with the latency p95(τ)
// seconds. A worker applies a change lag after the control message announced it (a worker
// busy with a batch, or one that converges through the registry entry). τ starts at start.
// The workers' periods start spread over one period, as independent processes' would. It
// returns a stop that ends and waits for the workers.
func tilingWorkers(t *testing.T, srv *natsServer, r bus.Ref, workers []string, period, lag time.Duration, start float64, tokensPerSec float64, p95 func(tau float64) float64) (stop func()) {
	t.Helper()
	nc, _ := srv.js()
	changes := make([]chan float64, len(workers))
	for i := range changes {
		changes[i] = make(chan float64, 64)
	}
	sub, err := nc.Subscribe(r.ControlSubject(), func(m *nats.Msg) {
		c, err := bus.DecodeControl(m.Data)
		if err != nil {
			return
		}
		for _, ch := range changes {
			select {
			case ch <- c.ExitThreshold:
			default: // the worker is far behind: the next message repeats it
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i, name := range workers {
		wg.Go(func() {
			select {
			case <-ctx.Done():
				return
			case <-time.After(period * time.Duration(i) / time.Duration(len(workers))):
			}
			tau, since := start, time.Now()
			publish := func(now time.Time) {
				n := int64(math.Round(tokensPerSec * now.Sub(since).Seconds()))
				s := busyWindow(r, name, now, tau, n, 2, p95(tau))
				s.Start = since
				b, _ := json.Marshal(s)
				_ = nc.Publish(r.StatsSubject(), b)
				since = now
			}
			tick := time.NewTicker(period)
			defer tick.Stop()
			var apply <-chan time.Time
			next := tau
			for {
				select {
				case <-ctx.Done():
					return
				case v := <-changes[i]:
					if v != next {
						next, apply = v, time.After(lag)
					}
				case now := <-apply:
					if next != tau {
						publish(now)
						tau = next
					}
					apply = nil
				case now := <-tick.C:
					publish(now)
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
// Two workers report 300 tokens/s each every 500ms and apply a τ change 400ms after it is
// published; the decision interval is 1s, so the refused windows cover 40% to 90% of the
// next interval. Latency (p95) is 48ms at τ 0.9 (3 loop steps), over the 30ms SLO, and 16ms at
// 0.85 (2 steps). With replicas of 523 loop steps/s (targetLoopStepsPerReplica) the ceiling's
// demand of about 600 × 3.05 loop steps/s needs 3.5, so 4; a demand 15% lower needs 3. A
// snapshot that arrives just after a decision lowers that decision's measure by 25% (12.5%
// once smoothed): the count holds through it.
func TestDemandSteadyAcrossThresholdChange(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	lm := newLoopModel(ns, "steady", srv.url())
	lm.Spec.Loop.ExitThreshold = 0.9
	lm.Spec.Loop.MinExitThreshold = ptr.To(0.5)
	lm.Spec.SLO.TokenLatencyP95 = &metav1.Duration{Duration: 30 * time.Millisecond}
	lm.Spec.Scaling = v1alpha1.ScalingSpec{Replicas: ptr.To[int32](4), MinReplicas: 1, MaxReplicas: 10,
		TargetLoopStepsPerReplica: ptr.To[int64](523), ScaleDownDelay: &metav1.Duration{Duration: 3 * time.Second}}
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
	stop := tilingWorkers(t, srv, r, []string{"a", "b"}, 500*time.Millisecond, 400*time.Millisecond, 0.9, 300, func(tau float64) float64 {
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
