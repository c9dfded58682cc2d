package serve

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/engine"
)

// choiceOut is one choice of an answer as a client assembles it.
type choiceOut struct {
	Text   string
	Depths []int
	Finish string
}

// postChoices sends a request and returns its choices by index, from SSE or a whole body.
func postChoices(t *testing.T, base, path string, body map[string]any) (map[int]choiceOut, Usage) {
	t.Helper()
	b, _ := json.Marshal(body)
	resp, err := http.Post(base+path, "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	out := map[int]choiceOut{}
	var usage Usage
	type choice struct {
		Index   int
		Text    string
		Message *Message
		Delta   *chatDelta
		Finish  *string `json:"finish_reason"`
		Depths  []int   `json:"loop_depths"`
	}
	apply := func(cs []choice) {
		for _, c := range cs {
			o := out[c.Index]
			o.Text += c.Text
			if c.Message != nil {
				o.Text += c.Message.Content
			}
			if c.Delta != nil {
				o.Text += c.Delta.Content
			}
			o.Depths = append(o.Depths, c.Depths...)
			if c.Finish != nil {
				o.Finish = *c.Finish
			}
			out[c.Index] = o
		}
	}
	var x struct {
		Choices []choice
		Usage   *Usage
	}
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		if err := json.NewDecoder(resp.Body).Decode(&x); err != nil {
			t.Fatal(err)
		}
		apply(x.Choices)
		return out, *x.Usage
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || line == "[DONE]" {
			continue
		}
		x.Choices, x.Usage = nil, nil
		if err := json.Unmarshal([]byte(line), &x); err != nil {
			t.Fatal(err)
		}
		apply(x.Choices)
		if x.Usage != nil {
			usage = *x.Usage
		}
	}
	return out, usage
}

// TestChoices: n > 1 returns n independent samples of one prompt, indexed 0..n-1, the same
// whole and streamed and on every repetition (their seeds derive from the request's); greedy
// choices are equal; usage counts every choice's tokens.
func TestChoices(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startWorker("w1", newGenerator(t), WorkerOptions{})
	for _, path := range []string{"/v1/completions", "/v1/chat/completions"} {
		t.Run(path, func(t *testing.T) {
			body := map[string]any{"model": "ouro-tiny-arith", "max_tokens": 10, "n": 4, "temperature": 1.5, "seed": 11}
			if path == "/v1/completions" {
				body["prompt"] = arithPrompt
			} else {
				body["messages"] = []map[string]string{{"role": "user", "content": arithPrompt}}
			}
			whole, usage := postChoices(t, c.gw.URL, path, body)
			if len(whole) != 4 {
				t.Fatalf("%d choices, want 4: %+v", len(whole), whole)
			}
			distinct := map[string]bool{}
			tokens := 0
			for i := range 4 {
				ch := whole[i]
				distinct[ch.Text] = true
				tokens += len(ch.Depths)
				if ch.Finish != "stop" && ch.Finish != "length" {
					t.Errorf("choice %d finish %q", i, ch.Finish)
				}
			}
			if len(distinct) < 2 {
				t.Errorf("4 samples at temperature 1.5 are all %q: the choices share a seed", whole[0].Text)
			}
			if usage.CompletionTokens != tokens {
				t.Errorf("usage counts %d completion tokens, the choices hold %d", usage.CompletionTokens, tokens)
			}
			again, _ := postChoices(t, c.gw.URL, path, body)
			if d := cmp.Diff(again, whole); d != "" {
				t.Errorf("the same request again (-got +want):\n%s", d)
			}
			body["stream"] = true
			streamed, _ := postChoices(t, c.gw.URL, path, body)
			if d := cmp.Diff(streamed, whole); d != "" {
				t.Errorf("streamed (-got +want):\n%s", d)
			}
			delete(body, "stream")
			body["temperature"] = 0
			greedy, _ := postChoices(t, c.gw.URL, path, body)
			for i := 1; i < 4; i++ {
				if d := cmp.Diff(greedy[i], greedy[0]); d != "" {
					t.Errorf("greedy choice %d differs from choice 0 (-got +want):\n%s", i, d)
				}
			}
		})
	}
}

// TestEcho: echo puts the prompt's text before the completion, whole and streamed, for text
// and token-id prompts.
func TestEcho(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	c.startWorker("w1", newGenerator(t), WorkerOptions{})
	plain, _ := postChoices(t, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 6})
	ids := c.tok.Encode(arithPrompt)
	for _, tc := range []struct {
		name   string
		prompt any
		stream bool
	}{{"text", arithPrompt, false}, {"text streamed", arithPrompt, true}, {"token ids", ids, false}, {"token ids streamed", ids, true}} {
		t.Run(tc.name, func(t *testing.T) {
			got, _ := postChoices(t, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": tc.prompt, "max_tokens": 6,
				"echo": true, "stream": tc.stream})
			want := plain[0]
			want.Text = arithPrompt + want.Text
			if d := cmp.Diff(got[0], want); d != "" {
				t.Errorf("echo (-got +want):\n%s", d)
			}
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if r, err := post(ctx, c.gw.URL, "/v1/chat/completions", map[string]any{"model": "ouro-tiny-arith", "echo": true,
		"messages": []map[string]string{{"role": "user", "content": "x"}}}); err != nil || r.Status != http.StatusBadRequest {
		t.Errorf("echo on chat: %v %+v, want 400", err, r)
	}
}

// TestChoicesBatchedAndRedelivered: the choices of one request run side by side in the engine's
// batch, and after the worker holding them is killed mid-generation the redelivery regenerates
// every choice exactly: the client sees each one once and whole.
func TestChoicesBatchedAndRedelivered(t *testing.T) {
	c := newCluster(t, clusterOptions{queue: bus.QueueOptions{AckWait: time.Second}})
	gen := newGenerator(t)
	eng := gen.(*engine.Engine)
	body := map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 16, "n": 3, "temperature": 1, "seed": 3,
		"stream": true, "exit_threshold": 1}
	stopRef := c.startWorker("ref", gen, WorkerOptions{})
	before := eng.Stats()
	want, _ := postChoices(t, c.gw.URL, "/v1/completions", body)
	after := eng.Stats()
	if rows := float64(after.BatchRows-before.BatchRows) / float64(after.Iterations-before.Iterations); rows <= 1.5 {
		t.Errorf("%.2f rows per engine iteration for a lone n=3 request: the choices did not share the batch", rows)
	}
	stopRef()

	stopFirst := c.startWorker("first", slowGenerator{gen, 20 * time.Millisecond}, WorkerOptions{})
	done := make(chan map[int]choiceOut, 1)
	go func() {
		got, _ := postChoices(t, c.gw.URL, "/v1/completions", body)
		done <- got
	}()
	generated := tokensGenerated(t, c)
	awaitCond(t, func() bool { return tokensGenerated(t, c) > generated+3 })
	stopFirst()
	c.startWorker("second", gen, WorkerOptions{})
	got := <-done
	if d := cmp.Diff(got, want); d != "" {
		t.Errorf("after the worker was killed (-got +want):\n%s", d)
	}
}
