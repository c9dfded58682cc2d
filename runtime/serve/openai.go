package serve

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/loopserve/loopserve/bus"
)

// apiError is an OpenAI-style error answer.
type apiError struct {
	Status  int
	Type    string
	Code    string
	Param   string
	Message string
}

func (e *apiError) Error() string { return e.Message }

func badRequest(param, format string, a ...any) *apiError {
	return &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: param, Message: fmt.Sprintf(format, a...)}
}

func (e *apiError) write(w http.ResponseWriter) {
	type body struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	}
	b := body{Message: e.Message, Type: e.Type}
	if e.Param != "" {
		b.Param = &e.Param
	}
	if e.Code != "" {
		b.Code = &e.Code
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.Status)
	_ = json.NewEncoder(w).Encode(map[string]any{"error": b})
}

// openAIRequest is the union of the completion and chat completion request bodies, plus
// loopserve's extensions (exit_threshold, max_depth, deadline_ms). Unknown fields are ignored, as
// OpenAI clients send many.
type openAIRequest struct {
	Model               string          `json:"model"`
	Prompt              json.RawMessage `json:"prompt"`
	Messages            []chatMessageIn `json:"messages"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	TopK                *int            `json:"top_k"`
	Seed                *int64          `json:"seed"`
	Stop                json.RawMessage `json:"stop"`
	N                   *int            `json:"n"`
	Stream              bool            `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	ExitThreshold *float64 `json:"exit_threshold"`
	MaxDepth      *int     `json:"max_depth"`
	DeadlineMS    *int64   `json:"deadline_ms"`
}

type chatMessageIn struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// seedZero stands for a client's "seed": 0 in a Job, whose zero Seed means none was given. The
// client seed with the same bits (-7046029254386353131) samples the same tokens.
const seedZero = 0x9e3779b97f4a7c15

// defaultCompletionTokens is OpenAI's max_tokens default for /v1/completions.
const defaultCompletionTokens = 16

// toJob validates a request against the model entry and builds the queued job. chat selects the
// chat completion rules. It never consults a worker: malformed requests stop here.
func (r *openAIRequest) toJob(id string, e bus.ModelEntry, chat bool, now time.Time) (Job, *apiError) {
	j := Job{ID: id, Model: e.ID()}
	if chat {
		if len(r.Messages) == 0 {
			return Job{}, badRequest("messages", "messages must be a non-empty array")
		}
		for i, m := range r.Messages {
			switch m.Role {
			case "system", "developer", "user", "assistant", "tool":
			default:
				return Job{}, badRequest(fmt.Sprintf("messages[%d].role", i), "unknown role %q", m.Role)
			}
			text, err := messageText(m.Content)
			if err != nil {
				return Job{}, badRequest(fmt.Sprintf("messages[%d].content", i), "%v", err)
			}
			j.Messages = append(j.Messages, Message{Role: m.Role, Content: text})
		}
	} else {
		if err := r.parsePrompt(&j); err != nil {
			return Job{}, err
		}
	}

	maxTokens := r.MaxTokens
	if r.MaxCompletionTokens != nil {
		maxTokens = r.MaxCompletionTokens
	}
	switch {
	case maxTokens != nil && *maxTokens <= 0:
		return Job{}, badRequest("max_tokens", "max_tokens must be positive, got %d", *maxTokens)
	case maxTokens != nil && e.ContextLength > 0 && *maxTokens >= e.ContextLength:
		return Job{}, &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "context_length_exceeded", Param: "max_tokens",
			Message: fmt.Sprintf("max_tokens %d does not fit this model's context of %d tokens", *maxTokens, e.ContextLength)}
	case maxTokens != nil:
		j.MaxTokens = *maxTokens
	case !chat:
		j.MaxTokens = defaultCompletionTokens
	}
	if r.N != nil && *r.N != 1 {
		return Job{}, badRequest("n", "only n = 1 is supported")
	}
	if t := r.Temperature; t != nil {
		if !(*t >= 0 && *t <= 2) {
			return Job{}, badRequest("temperature", "temperature must be in [0, 2]")
		}
		j.Temperature = *t
	}
	if p := r.TopP; p != nil {
		if !(*p > 0 && *p <= 1) {
			return Job{}, badRequest("top_p", "top_p must be in (0, 1]")
		}
		j.TopP = *p
	}
	if k := r.TopK; k != nil {
		if *k < 0 {
			return Job{}, badRequest("top_k", "top_k must not be negative")
		}
		j.TopK = *k
	}
	if s := r.Seed; s != nil {
		j.Seed = uint64(*s)
		if j.Seed == 0 {
			// Job.Seed 0 means "derive from the request id"; seed 0 is a seed like any other.
			j.Seed = seedZero
		}
	}
	stop, err := stringOrList(r.Stop, "stop")
	if err != nil {
		return Job{}, err
	}
	if len(stop) > 4 {
		return Job{}, badRequest("stop", "at most 4 stop sequences")
	}
	j.Stop = stop
	if x := r.ExitThreshold; x != nil {
		if !(*x > 0 && *x <= 1) {
			return Job{}, badRequest("exit_threshold", "exit_threshold must be in (0, 1]")
		}
		j.ExitThreshold = *x
	}
	if d := r.MaxDepth; d != nil {
		if *d < 1 || (e.MaxSteps > 0 && *d > e.MaxSteps) {
			return Job{}, badRequest("max_depth", "max_depth must be in [1, %d]", e.MaxSteps)
		}
		j.MaxDepth = *d
	}
	if d := r.DeadlineMS; d != nil {
		if *d <= 0 {
			return Job{}, badRequest("deadline_ms", "deadline_ms must be positive")
		}
		j.Deadline = now.Add(time.Duration(*d) * time.Millisecond)
	}
	return j, nil
}

// parsePrompt accepts a string, a one-element array of strings, or an array of token ids.
func (r *openAIRequest) parsePrompt(j *Job) *apiError {
	raw := bytes.TrimSpace(r.Prompt)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return badRequest("prompt", "prompt is required")
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		if s == "" {
			return badRequest("prompt", "prompt must not be empty")
		}
		j.Prompt = s
		return nil
	}
	var list []string
	if json.Unmarshal(raw, &list) == nil {
		if len(list) != 1 || list[0] == "" {
			return badRequest("prompt", "only a single non-empty prompt is supported")
		}
		j.Prompt = list[0]
		return nil
	}
	var ids []int
	if json.Unmarshal(raw, &ids) == nil && len(ids) > 0 {
		for _, id := range ids {
			if id < 0 {
				return badRequest("prompt", "token ids must not be negative")
			}
		}
		j.PromptIDs = ids
		return nil
	}
	return badRequest("prompt", "prompt must be a string, an array of one string, or an array of token ids")
}

// messageText accepts a string or an array of {"type": "text", "text": ...} parts.
func messageText(raw json.RawMessage) (string, error) {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", fmt.Errorf("content must be a string or an array of text parts")
	}
	var b strings.Builder
	for _, p := range parts {
		if p.Type != "text" {
			return "", fmt.Errorf("content part type %q is not supported", p.Type)
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

func stringOrList(raw json.RawMessage, param string) ([]string, *apiError) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return []string{s}, nil
	}
	var list []string
	if json.Unmarshal(raw, &list) == nil {
		return list, nil
	}
	return nil, badRequest(param, "%s must be a string or an array of strings", param)
}

// Response bodies.

type completionChoice struct {
	Text         string  `json:"text"`
	Index        int     `json:"index"`
	Logprobs     any     `json:"logprobs"`
	FinishReason *string `json:"finish_reason"`
	LoopDepths   []int   `json:"loop_depths"`
}

type chatDelta struct {
	Role    string `json:"role,omitempty"`
	Content string `json:"content,omitempty"`
}

type chatChoice struct {
	Index        int        `json:"index"`
	Message      *Message   `json:"message,omitempty"`
	Delta        *chatDelta `json:"delta,omitempty"`
	Logprobs     any        `json:"logprobs"`
	FinishReason *string    `json:"finish_reason"`
	LoopDepths   []int      `json:"loop_depths"`
}

type openAIResponse struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []any  `json:"choices"`
	Usage   *Usage `json:"usage,omitempty"`
}

type modelList struct {
	Object string        `json:"object"`
	Data   []modelObject `json:"data"`
}

type modelObject struct {
	ID            string  `json:"id"`
	Object        string  `json:"object"`
	Created       int64   `json:"created"`
	OwnedBy       string  `json:"owned_by"`
	ContextLength int     `json:"context_length"`
	ExitThreshold float64 `json:"exit_threshold"`
	MaxSteps      int     `json:"max_steps"`
	Ready         bool    `json:"ready"`
}
