package serve

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/loopserve/loopserve/runtime/engine"
)

// completionLP and chatLP are the OpenAI shapes as a client decodes them.
type completionLP struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []*float32           `json:"token_logprobs"`
	TopLogprobs   []map[string]float32 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
	LoopDepths    []*int               `json:"loop_depths"`
}

type chatLP struct {
	Content []struct {
		Token       string  `json:"token"`
		Logprob     float32 `json:"logprob"`
		Bytes       []int   `json:"bytes"`
		LoopDepth   int     `json:"loop_depth"`
		TopLogprobs []struct {
			Token   string  `json:"token"`
			Logprob float32 `json:"logprob"`
			Bytes   []int   `json:"bytes"`
		} `json:"top_logprobs"`
	} `json:"content"`
}

type lpChoice struct {
	Text       string
	Message    *Message
	Delta      *chatDelta
	Logprobs   json.RawMessage `json:"logprobs"`
	LoopDepths []int           `json:"loop_depths"`
}

// postLP returns the choice-0 text, loop depths and the logprobs objects (one per SSE event, or
// the one of a whole answer).
func postLP(t *testing.T, base, path string, body map[string]any) (string, []int, []json.RawMessage) {
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
	var text strings.Builder
	var depths []int
	var lps []json.RawMessage
	apply := func(cs []lpChoice) {
		for _, c := range cs {
			text.WriteString(c.Text)
			if c.Message != nil {
				text.WriteString(c.Message.Content)
			}
			if c.Delta != nil {
				text.WriteString(c.Delta.Content)
			}
			depths = append(depths, c.LoopDepths...)
			if len(c.Logprobs) > 0 && string(c.Logprobs) != "null" {
				lps = append(lps, c.Logprobs)
			}
		}
	}
	var x struct{ Choices []lpChoice }
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		if err := json.NewDecoder(resp.Body).Decode(&x); err != nil {
			t.Fatal(err)
		}
		apply(x.Choices)
		return text.String(), depths, lps
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || line == "[DONE]" {
			continue
		}
		x.Choices = nil
		if err := json.Unmarshal([]byte(line), &x); err != nil {
			t.Fatal(err)
		}
		apply(x.Choices)
	}
	return text.String(), depths, lps
}

func mergeCompletionLP(t *testing.T, raws []json.RawMessage) completionLP {
	t.Helper()
	var out completionLP
	for _, r := range raws {
		var x completionLP
		if err := json.Unmarshal(r, &x); err != nil {
			t.Fatal(err)
		}
		out.Tokens = append(out.Tokens, x.Tokens...)
		out.TokenLogprobs = append(out.TokenLogprobs, x.TokenLogprobs...)
		out.TopLogprobs = append(out.TopLogprobs, x.TopLogprobs...)
		out.TextOffset = append(out.TextOffset, x.TextOffset...)
		out.LoopDepths = append(out.LoopDepths, x.LoopDepths...)
	}
	return out
}

// engineTokens runs the same request on the engine directly: the reference for the values.
func engineTokens(t *testing.T, gen Generator, prompt []int, maxTokens, top int, promptScores bool) ([]engine.Token, []engine.Token) {
	t.Helper()
	events, err := gen.Submit(context.Background(), engine.Request{ID: "ref", Prompt: prompt, MaxTokens: maxTokens, StopTokens: []int{2, 0},
		Exit: engine.Exit{MaxDepth: 4}, Sampling: engine.Sampling{Seed: 1}, Logprobs: true, TopLogprobs: top, PromptLogprobs: promptScores})
	if err != nil {
		t.Fatal(err)
	}
	var toks, ptoks []engine.Token
	for ev := range events {
		if ev.Done {
			if ev.Err != nil {
				t.Fatal(ev.Err)
			}
			break
		}
		if ev.Prompt != nil {
			ptoks = ev.Prompt
		}
		toks = append(toks, ev.Token)
	}
	return toks, ptoks
}

// TestCompletionLogprobs: logprobs on /v1/completions come in OpenAI's legacy shape, whole and
// streamed alike, with the engine's values, the chosen token among the alternatives, offsets
// into the text and each token's loop depth; with echo the prompt's tokens come first, the
// first without a log-probability; max_tokens 0 with echo scores the prompt alone.
func TestCompletionLogprobs(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	gen := newGenerator(t)
	c.startWorker("w1", gen, WorkerOptions{})
	prompt := c.tok.Encode(arithPrompt)
	body := map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 8, "logprobs": 3}
	text, depths, raws := postLP(t, c.gw.URL, "/v1/completions", body)
	lp := mergeCompletionLP(t, raws)
	want, _ := engineTokens(t, gen, prompt, 8, 3, false)
	if len(lp.Tokens) != len(want) || len(lp.TokenLogprobs) != len(want) || len(lp.TopLogprobs) != len(want) || len(lp.TextOffset) != len(want) {
		t.Fatalf("logprobs of %d tokens (%+v), want %d", len(lp.Tokens), lp, len(want))
	}
	offset := 0
	for i, tok := range want {
		if got := *lp.TokenLogprobs[i]; got != tok.Logprob {
			t.Errorf("token %d: logprob %v, the engine's %v", i, got, tok.Logprob)
		}
		if lp.Tokens[i] != string(c.tok.TokenBytes(tok.ID)) {
			t.Errorf("token %d: %q, want %q", i, lp.Tokens[i], c.tok.TokenBytes(tok.ID))
		}
		if got := lp.TopLogprobs[i][lp.Tokens[i]]; got != tok.Logprob || len(lp.TopLogprobs[i]) < 3 || len(lp.TopLogprobs[i]) > 4 {
			t.Errorf("token %d: top %v lacks the chosen token or holds the wrong number", i, lp.TopLogprobs[i])
		}
		if lp.TextOffset[i] != offset {
			t.Errorf("token %d: text_offset %d, want %d", i, lp.TextOffset[i], offset)
		}
		if i < len(depths) && (lp.LoopDepths[i] == nil || *lp.LoopDepths[i] != depths[i]) {
			t.Errorf("token %d: logprobs loop depth %v, the choice's %d", i, lp.LoopDepths[i], depths[i])
		}
		if i < len(text) {
			offset += len([]rune(lp.Tokens[i]))
		}
	}
	if !strings.HasPrefix(strings.Join(lp.Tokens, ""), text) {
		t.Errorf("tokens %q do not spell the text %q", lp.Tokens, text)
	}
	body["stream"] = true
	stext, _, sraws := postLP(t, c.gw.URL, "/v1/completions", body)
	if d := cmp.Diff(mergeCompletionLP(t, sraws), lp); d != "" || stext != text {
		t.Errorf("streamed logprobs (-got +want):\n%s", d)
	}

	// echo: the prompt's tokens first.
	_, wantPrompt := engineTokens(t, gen, prompt, 8, 3, true)
	for _, stream := range []bool{false, true} {
		etext, _, eraws := postLP(t, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 8,
			"logprobs": 3, "echo": true, "stream": stream})
		elp := mergeCompletionLP(t, eraws)
		if etext != arithPrompt+text || len(elp.Tokens) != len(prompt)+len(want) {
			t.Fatalf("stream=%v: echo text %q, %d tokens; want %q, %d", stream, etext, len(elp.Tokens), arithPrompt+text, len(prompt)+len(want))
		}
		if elp.TokenLogprobs[0] != nil || elp.TopLogprobs[0] != nil || elp.LoopDepths[0] != nil || elp.TextOffset[0] != 0 {
			t.Errorf("stream=%v: first prompt token has a score: %v %v %v", stream, elp.TokenLogprobs[0], elp.TopLogprobs[0], elp.LoopDepths[0])
		}
		for i := 1; i < len(prompt); i++ {
			if *elp.TokenLogprobs[i] != wantPrompt[i].Logprob || *elp.LoopDepths[i] != wantPrompt[i].Depth {
				t.Errorf("stream=%v: prompt token %d: %v at depth %v, the engine's %v at %d", stream, i, *elp.TokenLogprobs[i], *elp.LoopDepths[i],
					wantPrompt[i].Logprob, wantPrompt[i].Depth)
			}
		}
		if d := cmp.Diff(elp.Tokens[len(prompt):], lp.Tokens); d != "" {
			t.Errorf("stream=%v: generated tokens after the echo (-got +want):\n%s", stream, d)
		}
	}

	// Scoring a prompt alone.
	otext, odepths, oraws := postLP(t, c.gw.URL, "/v1/completions", map[string]any{"model": "ouro-tiny-arith", "prompt": arithPrompt, "max_tokens": 0,
		"logprobs": 1, "echo": true})
	olp := mergeCompletionLP(t, oraws)
	if otext != arithPrompt || len(odepths) != 0 || len(olp.Tokens) != len(prompt) || *olp.TokenLogprobs[1] != wantPrompt[1].Logprob {
		t.Errorf("max_tokens 0: text %q, %d depths, %d tokens", otext, len(odepths), len(olp.Tokens))
	}
}

// TestChatLogprobs: chat's logprobs/top_logprobs come as choices[].logprobs.content[], whole and
// streamed alike, with bytes and loop depth per token.
func TestChatLogprobs(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	gen := newGenerator(t)
	c.startWorker("w1", gen, WorkerOptions{})
	body := map[string]any{"model": "ouro-tiny-arith", "messages": []map[string]string{{"role": "user", "content": arithPrompt}},
		"max_tokens": 6, "logprobs": true, "top_logprobs": 2}
	merge := func(raws []json.RawMessage) chatLP {
		var out chatLP
		for _, r := range raws {
			var x chatLP
			if err := json.Unmarshal(r, &x); err != nil {
				t.Fatal(err)
			}
			out.Content = append(out.Content, x.Content...)
		}
		return out
	}
	_, depths, raws := postLP(t, c.gw.URL, "/v1/chat/completions", body)
	lp := merge(raws)
	if len(lp.Content) != len(depths) || len(depths) == 0 {
		t.Fatalf("%d logprob entries for %d tokens", len(lp.Content), len(depths))
	}
	for i, e := range lp.Content {
		var b []byte
		for _, x := range e.Bytes {
			b = append(b, byte(x))
		}
		if string(b) != e.Token || e.LoopDepth != depths[i] || len(e.TopLogprobs) != 2 || e.Logprob > 0 ||
			e.TopLogprobs[0].Logprob < e.TopLogprobs[1].Logprob || e.TopLogprobs[0].Logprob < e.Logprob {
			t.Errorf("entry %d: %+v (depth %d)", i, e, depths[i])
		}
	}
	body["stream"] = true
	_, _, sraws := postLP(t, c.gw.URL, "/v1/chat/completions", body)
	if d := cmp.Diff(merge(sraws), lp); d != "" {
		t.Errorf("streamed (-got +want):\n%s", d)
	}
	delete(body, "stream")
	body["logprobs"] = false
	delete(body, "top_logprobs")
	if _, _, none := postLP(t, c.gw.URL, "/v1/chat/completions", body); len(none) != 0 {
		t.Errorf("logprobs false: %s", none)
	}
}
