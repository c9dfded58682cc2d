package controllers

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

// busyWindow is one simulated worker's second under threshold tau: n tokens whose cumulative
// exit probability is 0.5, 0.85 and 0.95 after steps 1 to 3 (so τ 0.9 runs 3 steps, τ 0.8
// two), a few probes, every batch slot busy and a p95 inter-token latency of p95 seconds.
func busyWindow(r bus.Ref, worker string, end time.Time, tau float64, n int64, inFlight int, p95 float64) bus.StatsSnapshot {
	s := bus.NewStatsSnapshot(r, worker, 4)
	s.Start, s.End = end.Add(-time.Second), end
	s.ExitThreshold, s.Capacity, s.InFlight = tau, 8, inFlight
	cum := []float64{0.5, 0.85, 0.95, 1}
	depth := 4
	for i, c := range cum {
		if c >= tau {
			depth = i + 1
			break
		}
	}
	s.Tokens, s.Requests, s.BusySeconds = n, max(n/16, 1), 1
	s.LoopSteps = n * int64(depth)
	s.DepthCounts[depth-1] = n
	for i := range 4 {
		if i < depth {
			s.Cum[i][bus.CumBin(cum[i])] = n
		} else {
			s.Censored[i] = n
		}
	}
	s.Probes = max(n/20, 1) // probes let the tuner predict above the threshold in force
	for i := range 4 {
		s.ProbeCum[i][bus.CumBin(cum[i])] = s.Probes
		s.ProbeAgree[i] = s.Probes
	}
	s.TokenLatencyP95, s.TTFTP95 = p95, 2*p95
	return s
}

// feed publishes a busy window every 100ms for each of two workers, under the threshold the
// LoopModel's status says is in force, until the returned stop is called.
func feed(t *testing.T, srv *natsServer, ns, name string, load func(tau float64) (tokens int64, inFlight int, p95 float64)) (stop func()) {
	t.Helper()
	nc, _ := srv.js()
	r := bus.Ref{Namespace: ns, Name: name}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-tick.C:
				tau := getLoopModel(t, ns, name).Status.ExitThreshold
				if tau == 0 {
					continue
				}
				n, inFlight, p95 := load(tau)
				for _, w := range []string{"a", "b"} {
					b, _ := json.Marshal(busyWindow(r, w, now, tau, n, inFlight, p95))
					_ = nc.Publish(r.StatsSubject(), b)
				}
			}
		}
	})
	return func() { cancel(); wg.Wait() }
}

// markReadyWhenCreated waits for the worker Deployment and reports its workers ready.
func markReadyWhenCreated(t *testing.T, ns, name string) {
	t.Helper()
	await(t, waitLong, "Deployment "+name, func() error {
		var dep appsv1.Deployment
		return k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &dep)
	})
	markDeploymentReady(t, ns, name)
}

func tunedLoopModel(ns, name, url string, mode v1alpha1.TuningMode) *v1alpha1.LoopModel {
	lm := newLoopModel(ns, name, url)
	lm.Spec.Loop.ExitThreshold = 0.9
	lm.Spec.Loop.MinExitThreshold = ptr.To(0.5)
	lm.Spec.SLO.TokenLatencyP95 = &metav1.Duration{Duration: 30 * time.Millisecond}
	lm.Spec.Tuning = v1alpha1.TuningSpec{Mode: mode, Interval: &metav1.Duration{Duration: 500 * time.Millisecond}, MaxStep: ptr.To(0.1)}
	return lm
}

// TestTuningAdvisoryReportsOnly: in advisory mode, with latency above the SLO, the loop
// recommends a lower threshold in status.recommendation and changes nothing: the threshold in force, the ConfigMap and the
// registry entry keep the spec's.
func TestTuningAdvisoryReportsOnly(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	if err := k8s.Create(ctx, tunedLoopModel(ns, "adv", srv.url(), v1alpha1.TuningAdvisory)); err != nil {
		t.Fatal(err)
	}
	markReadyWhenCreated(t, ns, "adv-worker")
	stop := feed(t, srv, ns, "adv", func(float64) (int64, int, float64) { return 400, 8, 0.060 })
	defer stop()
	await(t, waitLong, "a recommendation", func() error {
		st := getLoopModel(t, ns, "adv").Status
		rec := st.Recommendation
		if rec == nil || st.LastTuneTime == nil || len(rec.Reasons) == 0 || !(rec.ExitThreshold < 0.9) || rec.PredictedMeanDepth == 0 {
			return fmt.Errorf("status = %+v, recommendation %+v", st, rec)
		}
		return nil
	})
	st := getLoopModel(t, ns, "adv").Status
	if st.ExitThreshold != 0.9 {
		t.Errorf("status.exitThreshold = %v in advisory mode, want the spec's 0.9", st.ExitThreshold)
	}
	e, err := srv.registryEntryOf(ctx, bus.Ref{Namespace: ns, Name: "adv"})
	if err != nil || e.ExitThreshold != 0.9 {
		t.Errorf("registry entry %+v, %v; want threshold 0.9", e, err)
	}
	t.Logf("advisory recommendation: %+v", st.Recommendation)
}

// TestTuningAutoLowersAndRestores: in auto mode, with latency above the SLO at the spec's
// threshold, the loop lowers the threshold in force (status, registry entry, ConfigMap, an
// event); when the latency falls back under the SLO it returns to the spec's.
func TestTuningAutoLowersAndRestores(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	if err := k8s.Create(ctx, tunedLoopModel(ns, "auto", srv.url(), v1alpha1.TuningAuto)); err != nil {
		t.Fatal(err)
	}
	markReadyWhenCreated(t, ns, "auto-worker")
	var mu sync.Mutex
	overloaded := true
	// Overloaded: every batch slot busy, 20ms per loop step. Light: one request, 200 tokens/s,
	// 2ms per loop step.
	stop := feed(t, srv, ns, "auto", func(tau float64) (int64, int, float64) {
		mu.Lock()
		defer mu.Unlock()
		d := 3.0
		if tau <= 0.85 {
			d = 2
		}
		if overloaded {
			return 400, 8, 0.020 * d
		}
		return 20, 1, 0.002 * d
	})
	defer stop()
	await(t, waitLong, "threshold lowered", func() error {
		st := getLoopModel(t, ns, "auto").Status
		if !(st.ExitThreshold < 0.9) || st.ExitThreshold < 0.5 {
			return fmt.Errorf("status.exitThreshold = %v, recommendation %+v", st.ExitThreshold, st.Recommendation)
		}
		return nil
	})
	t.Logf("lowered: %+v", getLoopModel(t, ns, "auto").Status.Recommendation)
	await(t, waitLong, "ThresholdLowered event", hasEvent(ns, "auto", EventThresholdLowered))
	// The decision came through the stats path's status patch; the full reconcile it woke
	// writes the registry entry and the ConfigMap.
	await(t, waitLong, "registry follows", func() error {
		e, err := srv.registryEntryOf(ctx, bus.Ref{Namespace: ns, Name: "auto"})
		if err != nil || !(e.ExitThreshold < 0.9) {
			return fmt.Errorf("registry entry %+v, %v", e, err)
		}
		return nil
	})
	await(t, waitLong, "ConfigMap follows", func() error {
		tau := getLoopModel(t, ns, "auto").Status.ExitThreshold
		if !(tau < 0.9) {
			return fmt.Errorf("status.exitThreshold %v", tau)
		}
		return configMapThreshold(ns, "auto-config", tau)()
	})
	mu.Lock()
	overloaded = false
	mu.Unlock()
	await(t, waitLong, "threshold back at the spec's", func() error {
		st := getLoopModel(t, ns, "auto").Status
		if st.ExitThreshold != 0.9 {
			return fmt.Errorf("status.exitThreshold = %v, recommendation %+v", st.ExitThreshold, st.Recommendation)
		}
		return nil
	})
}
