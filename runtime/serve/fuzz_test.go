package serve

import (
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/loopserve/loopserve/bus"
)

// fuzzRequest checks one body against an endpoint: never a panic; a refusal is a 4xx with an
// OpenAI error body (message, type, param, code); an accepted request becomes a job within the
// limits that survives the trip through the queue.
func fuzzRequest(t *testing.T, body []byte, chat bool) {
	entry := bus.ModelEntry{Namespace: "default", Name: "m", ContextLength: 2048, MaxSteps: 4, Ready: true,
		Thresholds: bus.Thresholds{ExitThreshold: 0.8, DefaultTier: "standard", Tiers: map[string]float64{"gold": 0.9, "standard": 0.8, "batch": 0.5}}}
	r, aerr := decodeRequest(body, chat)
	var job Job
	if aerr == nil {
		job, aerr = r.toJob("cmpl-fuzz", entry, chat, time.Unix(1_800_000_000, 0))
	}
	if aerr != nil {
		if aerr.Status < 400 || aerr.Status > 499 || aerr.Type == "" || aerr.Message == "" {
			t.Fatalf("refusal %+v is not a 4xx OpenAI error", aerr)
		}
		rec := httptest.NewRecorder()
		aerr.write(rec)
		var e struct {
			Error *struct {
				Message string  `json:"message"`
				Type    string  `json:"type"`
				Param   *string `json:"param"`
				Code    *string `json:"code"`
			} `json:"error"`
		}
		if rec.Code != aerr.Status || json.Unmarshal(rec.Body.Bytes(), &e) != nil || e.Error == nil || e.Error.Message == "" || e.Error.Type == "" {
			t.Fatalf("error body %q (status %d) is not an OpenAI error", rec.Body.String(), rec.Code)
		}
		return
	}
	switch {
	case job.N < 0 || job.N > maxChoices, len(job.Stop) > maxStops, job.TopLogprobs < 0 || job.TopLogprobs > maxTopLogprobs,
		job.MaxTokens < 0 || job.MaxTokens >= entry.ContextLength, job.MaxDepth < 0 || job.MaxDepth > entry.MaxSteps,
		job.Temperature < 0 || job.Temperature > 2, job.TopP < 0 || job.TopP > 1, job.ExitThreshold < 0 || job.ExitThreshold > 1,
		chat && len(job.Messages) == 0, !chat && job.Prompt == "" && len(job.PromptIDs) == 0,
		job.Threshold != entry.Tiers[job.Tier]:
		t.Fatalf("accepted job outside the limits: %+v", job)
	}
	for _, s := range job.Stop {
		if len(s) > maxStopBytes {
			t.Fatalf("accepted a %d-byte stop string", len(s))
		}
	}
	b, err := json.Marshal(job)
	if err != nil {
		t.Fatalf("job does not encode: %v", err)
	}
	back, err := decodeJob(b)
	if err != nil || back.ID != job.ID || back.N != job.N || back.Prompt != job.Prompt || len(back.Messages) != len(job.Messages) ||
		back.Tier != job.Tier || back.Threshold != job.Threshold {
		t.Fatalf("job does not survive the queue: %v %+v", err, back)
	}
}

var fuzzSeeds = []string{
	`{"model": "m", "prompt": "a = 2 ; ? a =", "max_tokens": 4}`,
	`{"model": "m", "prompt": ["x"], "n": 3, "temperature": 1.2, "seed": -7, "stop": ["\n", ";"], "stream": true, "stream_options": {"include_usage": true}}`,
	`{"model": "m", "prompt": [1, 2, 3], "echo": true, "logprobs": 5, "max_tokens": 0}`,
	`{"model": "m", "prompt": "x", "logit_bias": {"1": 2}, "best_of": 2, "suffix": "y"}`,
	`{"model": "m", "prompt": "x", "exit_threshold": 0.5, "max_depth": 2, "deadline_ms": 20, "top_k": 4, "top_p": 0.9}`,
	`{"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "t"}]}], "logprobs": true, "top_logprobs": 3}`,
	`{"model": "m", "messages": [{"role": "assistant", "content": "a", "tool_calls": [], "refusal": null}], "tools": [], "tool_choice": "none"}`,
	`{"model": "m", "messages": [{"role": "user", "content": "x", "name": "n"}], "response_format": {"type": "json_object"}}`,
	`{"model": "m", "messages": [], "max_completion_tokens": -1, "frequency_penalty": 1e309}`,
	`{"model": "m", "prompt": null, "stop": 3, "n": 1e3, "seed": 1.5}`,
	`{"model": "m", "prompt": "x", "tier": "batch"}`,
	`{"model": "m", "messages": [{"role": "user", "content": "x"}], "tier": "gold", "exit_threshold": 0.3}`,
	`{"model": "m", "prompt": "x", "tier": "silver"}`,
	`{"model": "m", "prompt": "x", "tier": ["gold"]}`,
	`{"model": "m", "prompt": "x", "tier": ""}`,
	`[{"model": "m"}]`, `null`, `{"model": "m", "prompt": "\ud800"}`, `{"model":` + strings.Repeat(`[`, 64),
}

func FuzzDecodeCompletion(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) { fuzzRequest(t, body, false) })
}

func FuzzDecodeChat(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) { fuzzRequest(t, body, true) })
}
