package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/gatepolicy"
	"github.com/loopserve/loopserve/runtime/serve"
)

func TestLoopModelName(t *testing.T) {
	for _, tc := range []struct{ dir, want string }{
		{"testdata/models/ouro-tiny-arith", "ouro-tiny-arith"},
		{"/models/Ouro-1.4B/", "ouro-1-4b"},
		{"/x/__", "ouro-tiny-arith"},
		{"/m/my_model.v2", "my-model-v2"},
	} {
		if got := loopModelName(tc.dir); got != tc.want {
			t.Errorf("loopModelName(%q) = %q, want %q", tc.dir, got, tc.want)
		}
	}
}

// TestResolveModelEmbedded runs where no testdata/ exists: the embedded model is extracted and
// removed again by cleanup.
func TestResolveModelEmbedded(t *testing.T) {
	t.Chdir(t.TempDir())
	dir, cleanup, err := resolveModel("")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("extracted model lacks %s: %v", f, err)
		}
	}
	cleanup()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("cleanup left %s: %v", dir, err)
	}
	if got, _, _ := resolveModel("/some/dir"); got != "/some/dir" {
		t.Errorf("resolveModel(flag) = %q", got)
	}
}

// syncBuffer is a bytes.Buffer safe for one writer and one reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestUpServesAndStops runs `up` on the shipped model: it prints a working URL and curl line,
// answers a completion, and returns cleanly when its context ends (Ctrl-C).
func TestUpServesAndStops(t *testing.T) {
	modelDir := filepath.Join("..", "..", "testdata", "models", "ouro-tiny-arith")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	ef := serveEngineFlags{threshold: 0.7, mode: "fast", kvPolicy: "full", capacity: 4}
	done := make(chan error, 1)
	go func() {
		done <- runUp(ctx, &out, slog.New(slog.DiscardHandler), upConfig{dir: modelDir, ref: bus.Ref{Namespace: "default", Name: "ouro-tiny-arith"},
			listen: "127.0.0.1:0", engine: ef})
	}()
	url := regexp.MustCompile(`curl -s (http://[0-9.:]+)/v1/completions`)
	deadline := time.Now().Add(60 * time.Second)
	var base string
	for base == "" {
		if m := url.FindStringSubmatch(out.String()); m != nil {
			base = m[1]
		}
		select {
		case err := <-done:
			t.Fatalf("up exited early: %v\n%s", err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no curl line printed:\n%s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	resp, err := http.Post(base+"/v1/completions", "application/json",
		strings.NewReader(`{"model": "default/ouro-tiny-arith", "prompt": "a = 2 ; n = a + 7 ; b = 0 ; ? n =", "max_tokens": 4}`))
	if err != nil {
		t.Fatal(err)
	}
	var body struct {
		Choices []struct {
			Text       string `json:"text"`
			LoopDepths []int  `json:"loop_depths"`
		} `json:"choices"`
	}
	err = json.NewDecoder(resp.Body).Decode(&body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || len(body.Choices) != 1 || len(body.Choices[0].LoopDepths) == 0 {
		t.Fatalf("completion: status %d, %+v, %v", resp.StatusCode, body, err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("up stopped with %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("up did not stop within 20s")
	}
	if !strings.Contains(out.String(), "stopping") {
		t.Errorf("output lacks the stop notice:\n%s", out.String())
	}
}

// TestUpListensOnLoopback: up serves on 127.0.0.1 unless --listen says otherwise, and the
// workers' and gateways' --nats takes several URLs.
func TestUpListensOnLoopback(t *testing.T) {
	if got := newUpCmd().Flags().Lookup("listen").DefValue; got != "127.0.0.1:8080" {
		t.Errorf("up --listen default = %q, want 127.0.0.1:8080", got)
	}
	for _, cmd := range []func() *cobra.Command{newWorkerCmd, newGatewayCmd} {
		if usage := cmd().Flags().Lookup("nats").Usage; !strings.Contains(usage, "comma-separated") {
			t.Errorf("%s --nats: %q does not say it takes several URLs", cmd().Name(), usage)
		}
	}
}

// startTunedUp starts `up` on the shipped tiny model (spec threshold 0.7, fast mode) with the
// tuning flags tf, until ctx ends; it is stopped when the test ends.
func startTunedUp(t *testing.T, ctx context.Context, tf upTuningFlags) *serve.Local {
	t.Helper()
	tuning, err := tf.tuning()
	if err != nil {
		t.Fatal(err)
	}
	ef := serveEngineFlags{threshold: 0.7, mode: "fast", kvPolicy: "full", capacity: 4}
	_, local, stop, err := startUp(ctx, slog.New(slog.DiscardHandler), upConfig{dir: filepath.Join("..", "..", "testdata", "models", "ouro-tiny-arith"),
		ref: bus.Ref{Namespace: "default", Name: "ouro-tiny-arith"}, listen: "127.0.0.1:0", engine: ef, tuning: tuning})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("stopping: %v", err)
		}
	})
	return local
}

// TestUpTuning runs `up` with an inter-token latency SLO no machine meets: in auto mode the
// tuning loop lowers the threshold in force step by step to --min-threshold under load, and
// /v1/models and /metrics show it; in advisory mode the decision says so but the threshold in
// force stays.
func TestUpTuning(t *testing.T) {
	for _, mode := range []string{"auto", "advisory"} {
		t.Run(mode, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			local := startTunedUp(t, ctx, upTuningFlags{slo: time.Microsecond, floor: 0.3, mode: mode, interval: 300 * time.Millisecond})
			base := local.URL()
			var load sync.WaitGroup
			load.Go(func() {
				for ctx.Err() == nil {
					req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/completions",
						strings.NewReader(`{"model": "default/ouro-tiny-arith", "prompt": "a = 2 ; n = a + 7 ; b = 0 ; ? n =", "max_tokens": 16}`))
					req.Header.Set("Content-Type", "application/json")
					if resp, err := http.DefaultClient.Do(req); err == nil {
						resp.Body.Close()
					}
				}
			})
			defer load.Wait()
			defer cancel()
			threshold := func() float64 {
				resp, err := http.Get(base + "/v1/models")
				if err != nil {
					return -1
				}
				defer resp.Body.Close()
				var body struct {
					Data []struct {
						ExitThreshold float64 `json:"exit_threshold"`
					} `json:"data"`
				}
				if json.NewDecoder(resp.Body).Decode(&body) != nil || len(body.Data) != 1 {
					return -1
				}
				return body.Data[0].ExitThreshold
			}
			deadline := time.Now().Add(90 * time.Second)
			for {
				d, ok := local.Decision()
				if mode == "auto" && threshold() == 0.3 {
					break
				}
				if mode == "advisory" && ok && d.Tau[""] < 0.7 {
					if got := threshold(); got != 0.7 {
						t.Errorf("advisory: /v1/models threshold %v, want 0.7 kept", got)
					}
					return
				}
				if time.Now().After(deadline) {
					t.Fatalf("threshold %v in /v1/models, last decision %+v (%v)", threshold(), d, ok)
				}
				time.Sleep(50 * time.Millisecond)
			}
			// /metrics shows the threshold the worker applied.
			metric := regexp.MustCompile(`(?m)^loopserve_exit_threshold\{[^}]*\} ([0-9.]+)$`)
			for {
				resp, err := http.Get(base + "/metrics")
				if err != nil {
					t.Fatal(err)
				}
				var b bytes.Buffer
				_, _ = b.ReadFrom(resp.Body)
				resp.Body.Close()
				if m := metric.FindStringSubmatch(b.String()); m != nil && m[1] == "0.3" {
					return
				}
				if time.Now().After(deadline) {
					t.Fatalf("/metrics lacks loopserve_exit_threshold 0.3:\n%s", metric.FindString(b.String()))
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

func TestUpTierFlags(t *testing.T) {
	for _, tc := range []struct {
		name    string
		flags   upTuningFlags
		want    serve.LocalTuning
		wantErr string
	}{
		{"tiers without tuning", upTuningFlags{tiers: []string{"batch=0.4", "gold=0.7,minDepth=3"}, defaultTier: "gold"},
			serve.LocalTuning{Spec: gatepolicy.Spec{DefaultTier: "gold", Tiers: []gatepolicy.Tier{{Name: "batch", Floor: 0.4}, {Name: "gold", Floor: 0.7, MinDepth: 3, BrownoutOrder: 1}}}}, ""},
		{"tiers set the floor", upTuningFlags{slo: time.Millisecond, interval: time.Second, tiers: []string{"batch=0.4", "std=0.6"}, defaultTier: "std"},
			serve.LocalTuning{Mode: serve.TuningAuto, Interval: time.Second, Spec: gatepolicy.Spec{TokenLatencyP95: time.Millisecond, Floor: 0.4, DefaultTier: "std",
				Tiers: []gatepolicy.Tier{{Name: "batch", Floor: 0.4}, {Name: "std", Floor: 0.6, BrownoutOrder: 1}}}}, ""},
		{"no default", upTuningFlags{tiers: []string{"batch=0.4"}}, serve.LocalTuning{}, "--default-tier \"\": give it exactly when --tier is given"},
		{"default without tiers", upTuningFlags{defaultTier: "gold"}, serve.LocalTuning{}, "give it exactly when --tier is given"},
		{"no floor", upTuningFlags{tiers: []string{"batch"}, defaultTier: "batch"}, serve.LocalTuning{}, `--tier "batch": want name=floor`},
		{"bad name", upTuningFlags{tiers: []string{"Batch=0.4"}, defaultTier: "Batch"}, serve.LocalTuning{}, "DNS-label name"},
		{"floor out of range", upTuningFlags{tiers: []string{"batch=1.5"}, defaultTier: "batch"}, serve.LocalTuning{}, `floor "1.5" must be a number in (0, 1]`},
		{"bad option", upTuningFlags{tiers: []string{"batch=0.4,depth=2"}, defaultTier: "batch"}, serve.LocalTuning{}, "want minDepth=N"},
	} {
		got, err := tc.flags.tuning()
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: err = %v, want %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if d := cmp.Diff(got, tc.want); d != "" {
			t.Errorf("%s (-got +want):\n%s", tc.name, d)
		}
	}
}

// TestUpTiers: `up` with tiers and an SLO it cannot meet lowers the tier with traffic to its
// floor, never lowers the tier whose floor is the threshold, and shows both in /v1/models;
// a request for an unknown tier is refused.
func TestUpTiers(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	local := startTunedUp(t, ctx, upTuningFlags{slo: time.Microsecond, mode: "auto", interval: 300 * time.Millisecond,
		tiers: []string{"batch=0.3", "gold=0.7"}, defaultTier: "gold"})
	base := local.URL()
	send := func(ctx context.Context, tier string) int {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/completions",
			strings.NewReader(`{"model": "default/ouro-tiny-arith", "prompt": "a = 2 ; n = a + 7 ; b = 0 ; ? n =", "max_tokens": 16}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set(serve.HeaderTier, tier)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := send(ctx, "silver"); got != http.StatusBadRequest {
		t.Errorf("unknown tier: status %d, want 400", got)
	}
	var load sync.WaitGroup
	load.Go(func() {
		for ctx.Err() == nil {
			send(ctx, "batch")
		}
	})
	defer load.Wait()
	defer cancel()
	tiers := func() map[string]float64 {
		resp, err := http.Get(base + "/v1/models")
		if err != nil {
			return nil
		}
		defer resp.Body.Close()
		var body struct {
			Data []struct {
				Tiers []struct {
					Name          string  `json:"name"`
					ExitThreshold float64 `json:"exit_threshold"`
				} `json:"tiers"`
			} `json:"data"`
		}
		if json.NewDecoder(resp.Body).Decode(&body) != nil || len(body.Data) != 1 {
			return nil
		}
		m := map[string]float64{}
		for _, t := range body.Data[0].Tiers {
			m[t.Name] = t.ExitThreshold
		}
		return m
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		m := tiers()
		if m["gold"] != 0.7 {
			t.Fatalf("/v1/models tiers %v: gold must stay at 0.7", m)
		}
		if m["batch"] == 0.3 {
			return
		}
		if time.Now().After(deadline) {
			d, ok := local.Decision()
			t.Fatalf("tiers %v in /v1/models, last decision %+v (%v)", m, d, ok)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
