package serve

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/engine"
)

const arithPrompt = "a = 2 ; n = a + 7 ; b = 0 ; ? n ="

func checkDepths(t *testing.T, r result, n int) {
	t.Helper()
	if len(r.Depths) != n {
		t.Errorf("got %d loop depths, want %d", len(r.Depths), n)
	}
	for i, d := range r.Depths {
		if d < 1 || d > 4 {
			t.Errorf("depth[%d] = %d, want 1..4", i, d)
		}
	}
}

func TestCompletionEndToEnd(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startWorker("w1", newGenerator(t), WorkerOptions{Capacity: 4})
	ctx := context.Background()

	whole, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "default/ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 12, "temperature": 0})
	if err != nil {
		t.Fatal(err)
	}
	if whole.Status != http.StatusOK {
		t.Fatalf("status %d: %s", whole.Status, whole.Error)
	}
	nPrompt := len(c.tok.Encode(arithPrompt))
	if whole.Usage.PromptTokens != nPrompt || whole.Usage.TotalTokens != nPrompt+whole.Usage.CompletionTokens {
		t.Errorf("usage = %+v, prompt has %d tokens", whole.Usage, nPrompt)
	}
	if whole.Usage.CompletionTokens < 1 || whole.Usage.CompletionTokens > 12 {
		t.Errorf("completion tokens = %d, want 1..12", whole.Usage.CompletionTokens)
	}
	if whole.Finish != "stop" && whole.Finish != "length" {
		t.Errorf("finish = %q", whole.Finish)
	}
	checkDepths(t, whole, whole.Usage.CompletionTokens)

	// The same request streamed yields the same text, chunk by chunk, by bare model name.
	streamed, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 12,
		"stream": true, "stream_options": map[string]bool{"include_usage": true}})
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(streamed, whole, cmpIgnoreChunks); d != "" {
		t.Errorf("streamed vs whole (-got +want):\n%s", d)
	}
	if streamed.Chunks < whole.Usage.CompletionTokens {
		t.Errorf("streamed %d chunks for %d tokens", streamed.Chunks, whole.Usage.CompletionTokens)
	}

	// Per-request depth controls reach the engine.
	shallow, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 8, "max_depth": 1})
	if err != nil || shallow.Status != 200 {
		t.Fatalf("max_depth 1: %v %+v", err, shallow)
	}
	for i, d := range shallow.Depths {
		if d != 1 {
			t.Errorf("max_depth 1: token %d ran %d steps", i, d)
		}
	}
	anytime, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 8, "deadline_ms": 1})
	if err != nil || anytime.Status != 200 {
		t.Fatalf("deadline_ms 1: %v %+v", err, anytime)
	}
	checkDepths(t, anytime, anytime.Usage.CompletionTokens)
}

var cmpIgnoreChunks = cmp.FilterPath(func(p cmp.Path) bool { return p.Last().String() == ".Chunks" }, cmp.Ignore())

func TestChatCompletion(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startWorker("w1", newGenerator(t), WorkerOptions{})
	ctx := context.Background()
	body := map[string]any{"model": "default/ouro-tiny-arith", "max_tokens": 6, "messages": []map[string]any{
		{"role": "system", "content": "You compute."},
		{"role": "user", "content": []map[string]string{{"type": "text", "text": arithPrompt}}},
	}}
	whole, err := post(ctx, c.gw.URL, "/v1/chat/completions", body)
	if err != nil {
		t.Fatal(err)
	}
	if whole.Status != http.StatusOK {
		t.Fatalf("status %d: %s", whole.Status, whole.Error)
	}
	tmpl, err := c.tok.ChatPrompt([]Message{{"system", "You compute."}, {"user", arithPrompt}})
	if err != nil {
		t.Fatal(err)
	}
	if want := len(c.tok.Encode(tmpl)); whole.Usage.PromptTokens != want {
		t.Errorf("prompt tokens = %d, want %d (chat template applied)", whole.Usage.PromptTokens, want)
	}
	checkDepths(t, whole, whole.Usage.CompletionTokens)
	body["stream"] = true
	streamed, err := post(ctx, c.gw.URL, "/v1/chat/completions", body)
	if err != nil {
		t.Fatal(err)
	}
	whole.Usage = Usage{} // usage is only streamed on request
	if d := cmp.Diff(streamed, whole, cmpIgnoreChunks); d != "" {
		t.Errorf("streamed vs whole (-got +want):\n%s", d)
	}
}

// TestMalformedRequestsNeverReachWorker sends bad requests with no worker running and checks
// each answer and that the queue stayed empty.
func TestMalformedRequestsNeverReachWorker(t *testing.T) {
	c := newCluster(t, clusterOptions{tokens: []string{"s3cret"}, maxBody: 4096, ctxLen: 64})
	auth := []string{"Authorization", "Bearer s3cret"}
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		path   string
		body   any
		header []string
		status int
		typ    string
	}{
		{"no auth", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x"}, nil, 401, "invalid_request_error"},
		{"wrong token", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x"}, []string{"Authorization", "Bearer nope"}, 401, "invalid_request_error"},
		{"invalid json", "/v1/completions", `{"model":`, auth, 400, "invalid_request_error"},
		{"not an object", "/v1/completions", `[1,2]`, auth, 400, "invalid_request_error"},
		{"missing model", "/v1/completions", map[string]any{"prompt": "x"}, auth, 400, "invalid_request_error"},
		{"unknown model", "/v1/completions", map[string]any{"model": "default/nope", "prompt": "x"}, auth, 404, "invalid_request_error"},
		{"max_tokens zero", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x", "max_tokens": 0}, auth, 400, "invalid_request_error"},
		{"max_tokens negative", "/v1/chat/completions", map[string]any{"model": "ouro-tiny-arith", "messages": []map[string]string{{"role": "user", "content": "x"}}, "max_tokens": -3}, auth, 400, "invalid_request_error"},
		{"max_tokens over context", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x", "max_tokens": 64}, auth, 400, "invalid_request_error"},
		{"empty prompt", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": ""}, auth, 400, "invalid_request_error"},
		{"two prompts", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": []string{"a", "b"}}, auth, 400, "invalid_request_error"},
		{"no messages", "/v1/chat/completions", map[string]any{"model": "ouro-tiny-arith", "messages": []any{}}, auth, 400, "invalid_request_error"},
		{"bad role", "/v1/chat/completions", map[string]any{"model": "ouro-tiny-arith", "messages": []map[string]string{{"role": "wizard", "content": "x"}}}, auth, 400, "invalid_request_error"},
		{"n over the bound", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x", "n": 17}, auth, 400, "invalid_request_error"},
		{"exit_threshold 0", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x", "exit_threshold": 0}, auth, 400, "invalid_request_error"},
		{"max_depth 5", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x", "max_depth": 5}, auth, 400, "invalid_request_error"},
		{"deadline negative", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x", "deadline_ms": -1}, auth, 400, "invalid_request_error"},
		{"temperature 3", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x", "temperature": 3}, auth, 400, "invalid_request_error"},
		{"body too large", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": strings.Repeat("x", 5000)}, auth, 413, "invalid_request_error"},
		{"stop not strings", "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": "x", "stop": 3}, auth, 400, "invalid_request_error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := post(ctx, c.gw.URL, tc.path, tc.body, tc.header...)
			if err != nil {
				t.Fatal(err)
			}
			if got.Status != tc.status || !strings.HasPrefix(got.Error, tc.typ+": ") || len(got.Error) <= len(tc.typ)+2 {
				t.Errorf("got %d %q, want %d %s with a message", got.Status, got.Error, tc.status, tc.typ)
			}
		})
	}
	js, _ := jetstream.New(c.connect("check"))
	s, err := js.Stream(ctx, c.ref.Stream())
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 0 || info.State.LastSeq != 0 {
		t.Errorf("queue received %d messages (last seq %d), want none", info.State.Msgs, info.State.LastSeq)
	}
	// /v1/models needs the token too, /healthz does not.
	resp, err := http.Get(c.gw.URL + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("/v1/models without token: %d", resp.StatusCode)
	}
	req, _ := http.NewRequest(http.MethodGet, c.gw.URL+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer s3cret")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/v1/models with the token: %d", resp.StatusCode)
	}
}

// TestWorkerRejectsPromptOverContext checks the one validation only a worker can do: the prompt's
// token count.
func TestWorkerRejectsPromptOverContext(t *testing.T) {
	c := newCluster(t, clusterOptions{ctxLen: 16})
	c.startWorker("w1", newGenerator(t), WorkerOptions{ContextLength: 16})
	for _, stream := range []bool{false, true} {
		got, err := post(context.Background(), c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith",
			"prompt": strings.Repeat(arithPrompt+" ", 4), "max_tokens": 2, "stream": stream})
		if err != nil {
			t.Fatal(err)
		}
		if got.Status != 400 || !strings.Contains(got.Error, "maximum context length is 16") {
			t.Errorf("stream=%v: got %d %q, want 400 context_length_exceeded", stream, got.Status, got.Error)
		}
	}
	got, err := post(context.Background(), c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": []int{5, 2000}})
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != 400 || !strings.Contains(got.Error, "outside the vocabulary") {
		t.Errorf("token id 2000: got %d %q", got.Status, got.Error)
	}
}

func TestQueueFullAnswers429(t *testing.T) {
	c := newCluster(t, clusterOptions{queue: bus.QueueOptions{MaxQueued: 2}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	body := map[string]any{"model": "ouro-tiny-arith", "prompt": "x", "max_tokens": 1}
	var wg sync.WaitGroup
	for range 2 { // fill the queue; no worker takes them
		wg.Go(func() { _, _ = post(ctx, c.gw.URL, "/v1/completions", body) })
	}
	js, _ := jetstream.New(c.connect("check"))
	awaitCond(t, func() bool {
		s, err := js.Stream(ctx, c.ref.Stream())
		if err != nil {
			return false
		}
		return s.CachedInfo().State.Msgs == 2
	})
	got, err := post(ctx, c.gw.URL, "/v1/completions", body)
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != http.StatusTooManyRequests || got.RetryAfter == "" || !strings.HasPrefix(got.Error, "rate_limit_error") {
		t.Errorf("full queue: got %d %q Retry-After %q, want 429 with Retry-After", got.Status, got.Error, got.RetryAfter)
	}
	cancel()
	wg.Wait()
}

func awaitCond(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 20s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestModelsFollowRegistry(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	list := func() []string {
		resp, err := http.Get(c.gw.URL + "/v1/models")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var ml modelList
		if err := json.NewDecoder(resp.Body).Decode(&ml); err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, m := range ml.Data {
			ids = append(ids, m.ID)
		}
		return ids
	}
	if d := cmp.Diff(list(), []string{"default/ouro-tiny-arith"}); d != "" {
		t.Errorf("models (-got +want):\n%s", d)
	}
	ctx := context.Background()
	js, _ := jetstream.New(c.connect("operator"))
	kv, err := bus.EnsureRegistry(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	other := bus.ModelEntry{Namespace: "team-b", Name: "big", ContextLength: 4096, MaxSteps: 4, Ready: true}
	if err := bus.PutModel(ctx, kv, other); err != nil {
		t.Fatal(err)
	}
	c.awaitModel("team-b/big", true)
	if d := cmp.Diff(list(), []string{"default/ouro-tiny-arith", "team-b/big"}); d != "" {
		t.Errorf("models after put (-got +want):\n%s", d)
	}
	other.Ready = false
	if err := bus.PutModel(ctx, kv, other); err != nil {
		t.Fatal(err)
	}
	awaitCond(t, func() bool { e, _ := c.gateway.lookup("team-b/big"); return !e.Ready })
	got, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "team-b/big", "prompt": "x"})
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != http.StatusServiceUnavailable || got.RetryAfter == "" {
		t.Errorf("model not ready: status %d Retry-After %q, want 503 with Retry-After", got.Status, got.RetryAfter)
	}
	if err := bus.DeleteModel(ctx, kv, other.Ref()); err != nil {
		t.Fatal(err)
	}
	c.awaitModel("team-b/big", false)
	got, err = post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "team-b/big", "prompt": "x"})
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != http.StatusNotFound {
		t.Errorf("deleted model: status %d, want 404", got.Status)
	}
}

// TestWorkerKilledMidGeneration stops the worker holding a streaming request after its first
// tokens; the second worker gets the redelivery and the client sees the whole output once.
func TestWorkerKilledMidGeneration(t *testing.T) {
	c := newCluster(t, clusterOptions{queue: bus.QueueOptions{AckWait: time.Second}})
	ctx := context.Background()
	body := map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 24, "temperature": 0.8, "seed": 7,
		"stream": true, "exit_threshold": 0.5}

	// Slow the first worker's token stream so that it is surely mid-generation when killed.
	stopFirst := c.startWorker("first", slowGenerator{newGenerator(t), 20 * time.Millisecond}, WorkerOptions{Capacity: 2})
	want, err := post(ctx, c.gw.URL, "/v1/completions", body)
	if err != nil || want.Status != 200 {
		t.Fatalf("reference run: %v %+v", err, want)
	}

	// Kill the first worker once it generated a token of the second run.
	var got result
	done := make(chan error, 1)
	go func() {
		var err error
		got, err = post(ctx, c.gw.URL, "/v1/completions", body)
		done <- err
	}()
	before := len(want.Depths)
	awaitCond(t, func() bool { return tokensGenerated(t, c) > float64(before) })
	killed := time.Now()
	stopFirst()
	c.startWorker("second", newGenerator(t), WorkerOptions{Capacity: 2})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Logf("first worker killed after %d of %d tokens; stream complete %s later", int(tokensGenerated(t, c))-2*before, before, time.Since(killed))
	// Redelivery comes AckWait after the last heartbeat, which precedes the kill by up to a third
	// of AckWait; much sooner would mean the first worker had finished.
	if time.Since(killed) < time.Second/2 {
		t.Errorf("stream completed %s after the kill, before AckWait: the first worker was not mid-generation", time.Since(killed))
	}
	if d := cmp.Diff(got, want, cmpIgnoreChunks); d != "" {
		t.Errorf("after a worker was killed (-got +want):\n%s", d)
	}
}

func tokensGenerated(t testing.TB, c *cluster) float64 {
	mfs, err := c.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() == "loopserve_generated_tokens_total" {
			for _, m := range mf.GetMetric() {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return n
}

// slowGenerator delays each event of a real generator.
type slowGenerator struct {
	Generator
	delay time.Duration
}

func (s slowGenerator) Submit(ctx context.Context, r engine.Request) (<-chan engine.Event, error) {
	in, err := s.Generator.Submit(ctx, r)
	if err != nil {
		return nil, err
	}
	out := make(chan engine.Event)
	go func() {
		defer close(out)
		for ev := range in {
			time.Sleep(s.delay)
			out <- ev
		}
	}()
	return out, nil
}

func TestStopper(t *testing.T) {
	for _, tc := range []struct {
		name   string
		stops  []string
		pieces []string
		want   []string // emitted per piece
		hitAt  int      // piece index where a stop hits; -1 none
		tail   string
	}{
		{"none", nil, []string{"a", "b"}, []string{"a", "b"}, -1, ""},
		{"within a piece", []string{";"}, []string{" 9", " ; x"}, []string{" 9", " "}, 1, ""},
		{"across pieces", []string{"END"}, []string{"xE", "N", "Dy"}, []string{"x", "", ""}, 2, ""},
		{"false start flushed", []string{"END"}, []string{"xE", "N"}, []string{"x", ""}, -1, "EN"},
		{"earliest of two", []string{"b", "a"}, []string{"xab"}, []string{"x"}, 0, ""},
		{"empty stop ignored", []string{""}, []string{"ab"}, []string{"ab"}, -1, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStopper(tc.stops)
			var got []string
			hitAt := -1
			for i, p := range tc.pieces {
				out, hit := s.add(p)
				got = append(got, out)
				if hit {
					hitAt = i
					break
				}
			}
			if d := cmp.Diff(got, tc.want); d != "" || hitAt != tc.hitAt {
				t.Errorf("emitted (-got +want):\n%s hit at %d, want %d", d, hitAt, tc.hitAt)
			}
			if tail := s.flush(); tail != tc.tail {
				t.Errorf("tail %q, want %q", tail, tc.tail)
			}
		})
	}
}

func TestStopStringEndsGeneration(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startWorker("w1", newGenerator(t), WorkerOptions{})
	ctx := context.Background()
	body := map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 12}
	full, err := post(ctx, c.gw.URL, "/v1/completions", body)
	if err != nil || full.Status != 200 {
		t.Fatalf("%v %+v", err, full)
	}
	i := strings.Index(full.Text[1:], " ")
	if i < 0 {
		t.Skipf("output %q has no inner space to stop at", full.Text)
	}
	stop := full.Text[i+1 : i+3] // a two-character stop string from inside the output
	cut := strings.Index(full.Text, stop)
	for _, stream := range []bool{false, true} {
		body["stop"], body["stream"] = []string{stop}, stream
		got, err := post(ctx, c.gw.URL, "/v1/completions", body)
		if err != nil || got.Status != 200 {
			t.Fatalf("%v %+v", err, got)
		}
		if got.Text != full.Text[:cut] || got.Finish != "stop" {
			t.Errorf("stream=%v stop %q: got %q finish %q, want %q finish stop (full %q)", stream, stop, got.Text, got.Finish, full.Text[:cut], full.Text)
		}
	}
}

// TestStatsAndControl checks the worker's stats snapshots and that a threshold published on the
// control subject applies at once and shows in the next snapshots and in the depths.
func TestStatsAndControl(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	dir := t.TempDir()
	file := dir + "/threshold.json"
	if err := os.WriteFile(file, []byte(`{"exitThreshold": 0.9}`), 0o644); err != nil {
		t.Fatal(err)
	}
	gen := newGenerator(t)
	c.startWorker("w1", gen, WorkerOptions{ThresholdFile: file})
	if got := gen.Threshold(); got != 0.9 {
		t.Errorf("threshold after the file = %v, want 0.9", got)
	}
	nc := c.connect("operator")
	snaps := c.subscribeStats(nc, 64)
	ctx := context.Background()
	run := func() result {
		r, err := post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 16})
		if err != nil || r.Status != 200 {
			t.Fatalf("%v %+v", err, r)
		}
		return r
	}
	// Collect snapshots until they account for the request's tokens.
	collect := func(tau float64, tokens int) bus.StatsSnapshot {
		t.Helper()
		var sum bus.StatsSnapshot
		deadline := time.After(20 * time.Second)
		for sum.Tokens < int64(tokens) {
			select {
			case s := <-snaps:
				if s.ExitThreshold != tau || s.Tokens == 0 {
					continue
				}
				if sum.MaxSteps == 0 {
					sum = s
					continue
				}
				sum.Tokens += s.Tokens
				sum.Requests += s.Requests
				for i := range s.DepthCounts {
					sum.DepthCounts[i] += s.DepthCounts[i]
				}
			case <-deadline:
				t.Fatalf("snapshots under tau %v hold %d tokens, want %d", tau, sum.Tokens, tokens)
			}
		}
		return sum
	}
	high := run()
	s := collect(0.9, len(high.Depths))
	if s.Worker != "w1" || s.MaxSteps != 4 || s.Capacity != 8 || s.Requests != 1 {
		t.Errorf("snapshot = worker %q steps %d capacity %d requests %d", s.Worker, s.MaxSteps, s.Capacity, s.Requests)
	}
	want := make([]int64, 4)
	for _, d := range high.Depths {
		want[d-1]++
	}
	if d := cmp.Diff(s.DepthCounts, want); d != "" {
		t.Errorf("depth counts (-got +want):\n%s", d)
	}

	// The operator publishes a new threshold and writes it to the registry entry, from which
	// the gateway stamps it into the jobs it accepts.
	b, _ := json.Marshal(bus.Control{Thresholds: bus.Thresholds{ExitThreshold: 0.3}})
	if err := nc.Publish(c.ref.ControlSubject(), b); err != nil {
		t.Fatal(err)
	}
	awaitCond(t, func() bool { return gen.Threshold() == 0.3 })
	c.setThreshold(0.3)
	low := run()
	collect(0.3, len(low.Depths))
	mean := func(ds []int) float64 {
		var s int
		for _, d := range ds {
			s += d
		}
		return float64(s) / float64(len(ds))
	}
	if mean(low.Depths) >= mean(high.Depths) {
		t.Errorf("mean depth at tau 0.3 = %.2f, not below %.2f at 0.9", mean(low.Depths), mean(high.Depths))
	}
	// The Prometheus side.
	mfs, err := c.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, mf := range mfs {
		seen[mf.GetName()] = true
	}
	for _, name := range []string{"loopserve_exit_depth", "loopserve_cumulative_exit", "loopserve_generated_tokens_total", "loopserve_loop_steps_total",
		"loopserve_queue_wait_seconds", "loopserve_time_to_first_token_seconds", "loopserve_inter_token_latency_seconds",
		"loopserve_batch_size", "loopserve_inflight_requests", "loopserve_exit_threshold", "loopserve_gateway_requests_total"} {
		if !seen[name] {
			t.Errorf("metric %s missing", name)
		}
	}
}

// TestWorkerDrainOnStop stops workers the way a rolling update does: one with a long drain
// finishes its request; one with a short drain hands it back at once (well before AckWait) to
// the other worker.
func TestWorkerDrainOnStop(t *testing.T) {
	c := newCluster(t, clusterOptions{queue: bus.QueueOptions{AckWait: 30 * time.Second}})
	ctx := context.Background()
	gen := newGenerator(t)
	body := map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 24, "stream": true}
	stopRef := c.startWorker("ref", gen, WorkerOptions{})
	want, err := post(ctx, c.gw.URL, "/v1/completions", body)
	if err != nil || want.Status != 200 {
		t.Fatalf("reference: %v %+v", err, want)
	}
	stopRef()

	for _, tc := range []struct {
		name  string
		drain time.Duration
		other bool // a second worker takes over
	}{
		{"finishes within the drain", 20 * time.Second, false},
		{"handed back after a short drain", 50 * time.Millisecond, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := tokensGenerated(t, c)
			stop := c.startWorker("draining", slowGenerator{gen, 20 * time.Millisecond}, WorkerOptions{Drain: tc.drain})
			var got result
			done := make(chan error, 1)
			go func() {
				var err error
				got, err = post(ctx, c.gw.URL, "/v1/completions", body)
				done <- err
			}()
			awaitCond(t, func() bool { return tokensGenerated(t, c) > before })
			start := time.Now()
			if tc.other {
				c.startWorker("other", gen, WorkerOptions{})
			}
			stop()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if took := time.Since(start); took > 10*time.Second {
				t.Errorf("request completed %s after the stop: it waited for AckWait", took)
			}
			if d := cmp.Diff(got, want, cmpIgnoreChunks); d != "" {
				t.Errorf("(-got +want):\n%s", d)
			}
		})
	}
}

// TestClientGoneStopsGeneration cancels a streaming client mid-generation: the gateway tells the
// worker, which stops generating, drops the request from the queue and keeps no state for it.
func TestClientGoneStopsGeneration(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startWorker("w1", slowGenerator{newGenerator(t), 20 * time.Millisecond}, WorkerOptions{})
	w := c.workers["w1"]
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = post(ctx, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt,
			"max_tokens": 500, "stream": true, "exit_threshold": 1}) // 500 tokens take 10s here
	}()
	awaitCond(t, func() bool { return tokensGenerated(t, c) > 0 })
	cancel()
	<-done
	start := time.Now()
	awaitCond(t, func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return len(w.cancels) == 0 && len(w.histories) == 0
	})
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the worker generated for %s after the client left", took)
	}
	js, _ := jetstream.New(c.connect("check"))
	awaitCond(t, func() bool {
		s, err := js.Stream(context.Background(), c.ref.Stream())
		return err == nil && s.CachedInfo().State.Msgs == 0
	})
	if n := tokensGenerated(t, c); n >= 500 {
		t.Errorf("generated %v tokens: the request ran to its end", n)
	}
}

// TestHeartbeatsKeepLongRequests runs a request for well over AckWait with a second worker
// idle: InProgress heartbeats keep it with its worker, so it is generated exactly once.
func TestHeartbeatsKeepLongRequests(t *testing.T) {
	c := newCluster(t, clusterOptions{queue: bus.QueueOptions{AckWait: time.Second}})
	gen := newGenerator(t)
	c.startWorker("a", slowGenerator{gen, 60 * time.Millisecond}, WorkerOptions{})
	c.startWorker("b", slowGenerator{gen, 60 * time.Millisecond}, WorkerOptions{})
	start := time.Now()
	got, err := post(context.Background(), c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt,
		"max_tokens": 40, "exit_threshold": 1})
	if err != nil || got.Status != 200 {
		t.Fatalf("%v %+v", err, got)
	}
	if took := time.Since(start); took < 2*time.Second {
		t.Skipf("generation took %s, not over AckWait", took)
	}
	if n := tokensGenerated(t, c); int(n) != got.Usage.CompletionTokens {
		t.Errorf("workers generated %v tokens for a %d-token answer: the request was redelivered", n, got.Usage.CompletionTokens)
	}
}

// subscribeStats returns the stats snapshots published from now on, received over nc
// (buffered up to n; later ones are dropped while the buffer is full). The subscription ends
// with the test; a snapshot that does not decode fails the test.
func (c *cluster) subscribeStats(nc *nats.Conn, n int) <-chan bus.StatsSnapshot {
	c.t.Helper()
	t := c.t
	snaps := make(chan bus.StatsSnapshot, n)
	sub, err := nc.Subscribe(c.ref.StatsSubject(), func(m *nats.Msg) {
		s, err := bus.DecodeStats(m.Data)
		if err != nil {
			t.Errorf("bad snapshot: %v", err)
			return
		}
		select {
		case snaps <- s:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return snaps
}
