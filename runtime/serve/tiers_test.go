package serve

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loopserve/loopserve/bus"
)

var tieredThresholds = bus.Thresholds{ExitThreshold: 0.8, DefaultTier: "standard",
	Tiers: map[string]float64{"gold": 0.9, "standard": 0.8, "batch": 0.5}}

// TestGatewayStampsTier: a request's tier (its "tier" field, else the X-Loopserve-Tier
// header, else the model's default tier) reaches the queued job with that tier's threshold in
// force, on both endpoints; an unknown tier is a 400 naming the known ones and queues nothing;
// /v1/models lists the tiers.
func TestGatewayStampsTier(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.setThresholds(tieredThresholds)
	ctx := context.Background()
	js, _ := jetstream.New(c.connect("reader"))
	cons, err := bus.BindQueue(ctx, js, c.ref)
	if err != nil {
		t.Fatal(err)
	}
	// queued sends a request and returns the job it put on the queue (no worker runs: the
	// test takes the job, then drops the request).
	queued := func(path string, body map[string]any, header ...string) Job {
		t.Helper()
		rctx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() { _, _ = post(rctx, c.gw.URL, path, body, header...) })
		defer func() { cancel(); wg.Wait() }()
		batch, err := cons.Fetch(1, jetstream.FetchMaxWait(10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		m, ok := <-batch.Messages()
		if !ok {
			t.Fatalf("no job queued for %v", body)
		}
		_ = m.Term()
		j, err := decodeJob(m.Data())
		if err != nil {
			t.Fatal(err)
		}
		return j
	}
	completion := func(extra map[string]any) map[string]any {
		b := map[string]any{"model": c.ref.String(), "prompt": arithPrompt, "max_tokens": 2}
		for k, v := range extra {
			b[k] = v
		}
		return b
	}
	chat := map[string]any{"model": c.ref.String(), "messages": []map[string]string{{"role": "user", "content": "hi"}}, "max_tokens": 2, "tier": "batch"}
	type stamp struct {
		Tier      string
		Threshold float64
	}
	for _, tc := range []struct {
		name   string
		path   string
		body   map[string]any
		header []string
		want   stamp
	}{
		{"field", "/v1/completions", completion(map[string]any{"tier": "batch"}), nil, stamp{"batch", 0.5}},
		{"header", "/v1/completions", completion(nil), []string{HeaderTier, "gold"}, stamp{"gold", 0.9}},
		{"field wins over header", "/v1/completions", completion(map[string]any{"tier": "standard"}), []string{HeaderTier, "batch"}, stamp{"standard", 0.8}},
		{"default tier", "/v1/completions", completion(nil), nil, stamp{"standard", 0.8}},
		{"chat field", "/v1/chat/completions", chat, nil, stamp{"batch", 0.5}},
	} {
		j := queued(tc.path, tc.body, tc.header...)
		if d := cmp.Diff(stamp{j.Tier, j.Threshold}, tc.want); d != "" {
			t.Errorf("%s: job stamp (-got +want):\n%s", tc.name, d)
		}
	}

	for _, tc := range []struct {
		name   string
		body   map[string]any
		header []string
	}{
		{"unknown field", completion(map[string]any{"tier": "silver"}), nil},
		{"unknown header", completion(nil), []string{HeaderTier, "silver"}},
	} {
		got, err := post(ctx, c.gw.URL, "/v1/completions", tc.body, tc.header...)
		if err != nil {
			t.Fatal(err)
		}
		want := `invalid_request_error: the model "default/ouro-tiny-arith" has no tier "silver": its tiers are batch, gold, standard`
		if got.Status != http.StatusBadRequest || got.Error != want {
			t.Errorf("%s: %d %q, want 400 %q", tc.name, got.Status, got.Error, want)
		}
	}
	if got, err := post(ctx, c.gw.URL, "/v1/completions", completion(map[string]any{"tier": 3})); err != nil || got.Status != http.StatusBadRequest || !strings.Contains(got.Error, "tier must be a string") {
		t.Errorf("numeric tier: %+v, %v; want a 400", got, err)
	}
	if n := streamMsgs(t, c); n != 0 {
		t.Errorf("%d requests left on the queue, want the refused ones never queued", n)
	}

	resp, err := http.Get(c.gw.URL + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ml modelList
	if err := json.NewDecoder(resp.Body).Decode(&ml); err != nil || len(ml.Data) != 1 {
		t.Fatalf("models %+v, %v", ml, err)
	}
	m := ml.Data[0]
	want := []tierObject{{"batch", 0.5}, {"gold", 0.9}, {"standard", 0.8}}
	if d := cmp.Diff(m.Tiers, want); d != "" || m.DefaultTier != "standard" || m.ExitThreshold != 0.8 {
		t.Errorf("/v1/models tiers (-got +want):\n%s\ndefault %q threshold %v, want standard 0.8", d, m.DefaultTier, m.ExitThreshold)
	}
}

// TestWorkerStatsPerTier: a worker follows the thresholds per tier from the registry entry and
// reports each tier's tokens under that tier's threshold in its stats snapshots.
func TestWorkerStatsPerTier(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	nc := c.connect("observer")
	snaps := c.subscribeStats(nc, 256)
	gen := newGenerator(t)
	c.startWorker("w1", gen, WorkerOptions{})
	c.setThresholds(tieredThresholds)
	awaitCond(t, func() bool {
		return gen.Threshold() == 0.8 && c.workers["w1"].stats.thresholds().Equal(tieredThresholds)
	})
	ctx := context.Background()
	for _, tier := range []string{"batch", "gold"} {
		got, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": c.ref.String(), "prompt": arithPrompt, "max_tokens": 6, "tier": tier})
		if err != nil || got.Status != http.StatusOK {
			t.Fatalf("tier %s: %+v, %v", tier, got, err)
		}
	}
	seen := map[string]int64{}
	deadline := time.After(30 * time.Second)
	for seen["batch"] == 0 || seen["gold"] == 0 {
		select {
		case s := <-snaps:
			if s.Tier != "standard" || s.ExitThreshold != 0.8 {
				continue // a window from before the tiers arrived
			}
			for _, ts := range s.Tiers {
				if want := tieredThresholds.Tiers[ts.Tier]; ts.ExitThreshold != want {
					t.Errorf("tier %s reported under %v, want %v", ts.Tier, ts.ExitThreshold, want)
				}
				var depthTokens int64
				for _, n := range ts.DepthCounts {
					depthTokens += n
				}
				if depthTokens > ts.Tokens {
					t.Errorf("tier %s: %d tokens in the depth histogram of %d", ts.Tier, depthTokens, ts.Tokens)
				}
				seen[ts.Tier] += ts.Tokens
			}
		case <-deadline:
			t.Fatalf("tokens per tier seen: %v, want batch and gold", seen)
		}
	}
	if seen["batch"] != 6 || seen["gold"] != 6 {
		t.Errorf("tokens per tier %v, want 6 each", seen)
	}
}
