package serve

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/loopserve/loopserve/bus"
)

// TestRequestSeed: a seed the client gives fixes the sampling seed whatever the request id,
// seed 0 included (Job.Seed 0 would otherwise mean "derive from the id"); without one the seed
// follows the id, so a redelivery repeats the output.
func TestRequestSeed(t *testing.T) {
	entry := bus.ModelEntry{Namespace: "default", Name: "m", ContextLength: 64, MaxSteps: 4, Ready: true}
	seedOf := func(body, id string) uint64 {
		t.Helper()
		var r openAIRequest
		if err := json.Unmarshal([]byte(body), &r); err != nil {
			t.Fatal(err)
		}
		j, aerr := r.toJob(id, entry, false, time.Now())
		if aerr != nil {
			t.Fatalf("%s: %s", body, aerr.Message)
		}
		return j.SeedFor(0)
	}
	for _, seed := range []string{"0", "1", "7", "-1"} {
		body := fmt.Sprintf(`{"model": "default/m", "prompt": "a", "temperature": 1, "seed": %s}`, seed)
		if a, b := seedOf(body, "cmpl-a"), seedOf(body, "cmpl-b"); a != b {
			t.Errorf("seed %s: sampling seeds %d and %d for two request ids, want one", seed, a, b)
		}
	}
	if seedOf(`{"prompt": "a", "seed": 0}`, "x") == seedOf(`{"prompt": "a", "seed": 1}`, "x") {
		t.Error("seeds 0 and 1 give the same sampling seed")
	}
	noSeed := `{"model": "default/m", "prompt": "a", "temperature": 1}`
	if a, b := seedOf(noSeed, "cmpl-a"), seedOf(noSeed, "cmpl-a"); a != b {
		t.Errorf("no seed: sampling seeds %d and %d for the same request id, want one", a, b)
	}
	if seedOf(noSeed, "cmpl-a") == seedOf(noSeed, "cmpl-b") {
		t.Error("no seed: two request ids share a sampling seed")
	}
}

// TestDecodeRequestFields: every OpenAI request field is implemented, accepted with its no-op
// default only, or refused with a 400 naming it; fields OpenAI does not define are refused too.
func TestDecodeRequestFields(t *testing.T) {
	entry := bus.ModelEntry{Namespace: "default", Name: "m", ContextLength: 64, MaxSteps: 4, Ready: true}
	const prompt = `"model": "m", "prompt": "x"`
	const msgs = `"model": "m", "messages": [{"role": "user", "content": "x"}]`
	for _, tc := range []struct {
		name  string
		chat  bool
		body  string
		param string // "" = accepted
		code  string
	}{
		{"plain completion", false, prompt, "", ""},
		{"plain chat", true, msgs, "", ""},
		{"logit_bias", false, prompt + `, "logit_bias": {"50256": -100}`, "logit_bias", "unsupported_parameter"},
		{"empty logit_bias", true, msgs + `, "logit_bias": {}`, "", ""},
		{"frequency_penalty", true, msgs + `, "frequency_penalty": 0.5`, "frequency_penalty", "unsupported_parameter"},
		{"zero frequency_penalty", false, prompt + `, "frequency_penalty": 0`, "", ""},
		{"presence_penalty", false, prompt + `, "presence_penalty": -1`, "presence_penalty", "unsupported_parameter"},
		{"best_of", false, prompt + `, "best_of": 3`, "best_of", "unsupported_parameter"},
		{"best_of 1", false, prompt + `, "best_of": 1`, "", ""},
		{"suffix", false, prompt + `, "suffix": "}"`, "suffix", "unsupported_parameter"},
		{"tools", true, msgs + `, "tools": [{"type": "function", "function": {"name": "f"}}]`, "tools", "unsupported_parameter"},
		{"no tools", true, msgs + `, "tools": [], "tool_choice": "none", "parallel_tool_calls": false`, "", ""},
		{"tool_choice auto", true, msgs + `, "tool_choice": "auto"`, "tool_choice", "unsupported_parameter"},
		{"functions", true, msgs + `, "functions": [{"name": "f"}]`, "functions", "unsupported_parameter"},
		{"json mode", true, msgs + `, "response_format": {"type": "json_object"}`, "response_format", "unsupported_parameter"},
		{"text format", true, msgs + `, "response_format": {"type": "text"}`, "", ""},
		{"audio", true, msgs + `, "modalities": ["text", "audio"]`, "modalities", "unsupported_parameter"},
		{"reasoning_effort", true, msgs + `, "reasoning_effort": "low"`, "reasoning_effort", "unsupported_parameter"},
		{"store", true, msgs + `, "store": true`, "store", "unsupported_parameter"},
		{"metadata", true, msgs + `, "metadata": {"k": "v"}`, "metadata", "unsupported_parameter"},
		{"service_tier flex", false, prompt + `, "service_tier": "flex"`, "service_tier", "unsupported_parameter"},
		{"service_tier auto", false, prompt + `, "service_tier": "auto"`, "", ""},
		{"user", true, msgs + `, "user": "u-1", "safety_identifier": "s", "prompt_cache_key": "k"`, "", ""},
		{"user not a string", true, msgs + `, "user": 5`, "user", ""},
		{"unknown field", false, prompt + `, "repetition_penalty": 1.1`, "repetition_penalty", ""},
		{"echo on chat", true, msgs + `, "echo": true`, "echo", ""},
		{"top_logprobs on completions", false, prompt + `, "top_logprobs": 2`, "top_logprobs", ""},
		{"prompt on chat", true, msgs + `, "prompt": "x"`, "prompt", ""},
		{"include_obfuscation", false, prompt + `, "stream": true, "stream_options": {"include_obfuscation": true}`, "stream_options.include_obfuscation", "unsupported_parameter"},
		{"stream_options unknown", false, prompt + `, "stream_options": {"chunk_size": 3}`, "stream_options.chunk_size", ""},
		{"message name", true, `"model": "m", "messages": [{"role": "user", "content": "x", "name": "bob"}]`, "messages[0].name", "unsupported_parameter"},
		{"message tool_calls", true, `"model": "m", "messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]`, "messages[0].tool_calls", "unsupported_parameter"},
		{"message refusal null", true, `"model": "m", "messages": [{"role": "assistant", "content": "x", "refusal": null, "tool_calls": []}]`, "", ""},
		{"seed not an integer", false, prompt + `, "seed": 1.5`, "seed", ""},
		{"not an object", false, `[1]`, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := tc.body
			if body[0] != '[' {
				body = "{" + body + "}"
			}
			r, aerr := decodeRequest([]byte(body), tc.chat)
			if aerr == nil {
				_, aerr = r.toJob("cmpl-x", entry, tc.chat, time.Now())
			}
			switch {
			case tc.name == "not an object":
				if aerr == nil || aerr.Status != 400 {
					t.Errorf("got %+v, want a 400", aerr)
				}
			case tc.param == "" && aerr != nil:
				t.Errorf("refused: %d %s %q", aerr.Status, aerr.Param, aerr.Message)
			case tc.param != "" && aerr == nil:
				t.Errorf("accepted, want a 400 naming %s", tc.param)
			case tc.param != "" && (aerr.Status != 400 || aerr.Param != tc.param || aerr.Code != tc.code ||
				aerr.Type != "invalid_request_error" || !strings.Contains(aerr.Message, tc.param[strings.LastIndexByte(tc.param, '.')+1:])):
				t.Errorf("got %d param %q code %q %q, want 400 param %q code %q naming it", aerr.Status, aerr.Param, aerr.Code, aerr.Message, tc.param, tc.code)
			}
		})
	}
}

// TestJobLimits: choices, logprobs and stop strings within their bounds reach the job; beyond
// them they are refused.
func TestJobLimits(t *testing.T) {
	entry := bus.ModelEntry{Namespace: "default", Name: "m", ContextLength: 64, MaxSteps: 4, Ready: true}
	job := func(chat bool, body string) (Job, *apiError) {
		r, aerr := decodeRequest([]byte(body), chat)
		if aerr != nil {
			return Job{}, aerr
		}
		return r.toJob("cmpl-x", entry, chat, time.Now())
	}
	long := strings.Repeat("s", maxStopBytes+1)
	for _, tc := range []struct {
		chat  bool
		body  string
		param string
		want  Job
	}{
		{false, `{"prompt": "x", "n": 3, "logprobs": 2, "echo": true}`, "", Job{N: 3, Logprobs: true, TopLogprobs: 2, Echo: true}},
		{false, `{"prompt": "x", "logprobs": 0}`, "", Job{Logprobs: true}},
		{true, `{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 20, "n": 1}`, "", Job{Logprobs: true, TopLogprobs: 20}},
		{false, `{"prompt": "x", "n": 0}`, "n", Job{}},
		{false, `{"prompt": "x", "n": 17}`, "n", Job{}},
		{false, `{"prompt": "x", "logprobs": 6}`, "logprobs", Job{}},
		{false, `{"prompt": "x", "logprobs": true}`, "logprobs", Job{}},
		{true, `{"messages": [{"role": "user", "content": "x"}], "logprobs": 3}`, "logprobs", Job{}},
		{true, `{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}`, "top_logprobs", Job{}},
		{true, `{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}`, "top_logprobs", Job{}},
		{false, `{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}`, "stop", Job{}},
		{false, `{"prompt": "x", "stop": "` + long + `"}`, "stop", Job{}},
	} {
		got, aerr := job(tc.chat, tc.body)
		switch {
		case tc.param != "":
			if aerr == nil || aerr.Param != tc.param || aerr.Status != 400 {
				t.Errorf("%s: got %+v, want 400 naming %s", tc.body, aerr, tc.param)
			}
		case aerr != nil:
			t.Errorf("%s: refused: %s", tc.body, aerr.Message)
		default:
			if got.N != tc.want.N || got.Logprobs != tc.want.Logprobs || got.TopLogprobs != tc.want.TopLogprobs || got.Echo != tc.want.Echo {
				t.Errorf("%s: job n %d logprobs %v top %d echo %v, want %+v", tc.body, got.N, got.Logprobs, got.TopLogprobs, got.Echo, tc.want)
			}
		}
	}
}

// TestChoiceSeeds: each choice samples with its own seed, fixed by the request's seed (or id),
// so a redelivered request repeats every choice.
func TestChoiceSeeds(t *testing.T) {
	for _, j := range []Job{{ID: "cmpl-a"}, {ID: "cmpl-a", Seed: 7}} {
		seen := map[uint64]bool{}
		for i := range maxChoices {
			s := j.SeedFor(i)
			if s == 0 || seen[s] {
				t.Errorf("job %+v: choice %d seed %d repeats or is 0", j, i, s)
			}
			seen[s] = true
			if again := j.SeedFor(i); again != s {
				t.Errorf("choice %d: seed %d then %d", i, s, again)
			}
		}
	}
	if (Job{ID: "x", Seed: 7}).SeedFor(0) != 7 {
		t.Error("choice 0 does not use the request's own seed")
	}
}
