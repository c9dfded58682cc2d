package serve

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
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

// unsupported refuses an OpenAI field loopserve does not implement: a 400 naming it, never a
// silent no-op.
func unsupported(param, why string) *apiError {
	return &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "unsupported_parameter", Param: param,
		Message: fmt.Sprintf("%s is not supported by loopserve%s", param, why)}
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

// Request limits.
const (
	maxChoices     = 16  // n
	maxStops       = 4   // stop sequences, as OpenAI
	maxStopBytes   = 256 // bytes of one stop sequence: the worker holds back up to this much text
	maxLogprobs    = 5   // completions' logprobs, as OpenAI
	maxTopLogprobs = 20  // chat's top_logprobs, as OpenAI (and the engine's bound)
)

// openAIRequest is the union of the completion and chat completion request bodies, plus
// loopserve's extensions (top_k, exit_threshold, max_depth, deadline_ms, tier). Only the fields
// loopserve implements are decoded; checkFields refuses every other one that would change the
// answer (see knownFields).
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
	StreamOptions       *streamOptions  `json:"stream_options"`
	Echo                bool            `json:"echo"`
	// Logprobs is an integer 0..5 on /v1/completions and a boolean on /v1/chat/completions.
	Logprobs    json.RawMessage `json:"logprobs"`
	TopLogprobs *int            `json:"top_logprobs"`

	ExitThreshold *float64 `json:"exit_threshold"`
	MaxDepth      *int     `json:"max_depth"`
	DeadlineMS    *int64   `json:"deadline_ms"`
	// Tier is the quality tier (the X-Loopserve-Tier header when absent; the body wins).
	Tier *string `json:"tier"`
}

// HeaderTier is the request header that picks a quality tier when the body has no "tier".
const HeaderTier = "X-Loopserve-Tier"

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type chatMessageIn struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// fieldRule says what a request field may hold: implemented fields are decoded; the others
// are accepted only with the value that changes nothing (their OpenAI default).
type fieldRule struct {
	endpoints int                    // which endpoints know the field: forCompletions|forChat
	inert     func([]byte) bool      // nil: implemented; else true when the value changes nothing
	why       string                 // appended to the refusal
	check     func([]byte) *apiError // extra shape check of an accepted field
}

const (
	forCompletions = 1 << iota
	forChat
	forBoth = forCompletions | forChat
)

// knownFields are the request fields of OpenAI's completions and chat completions APIs (as the
// official client sends them) and loopserve's extensions.
var knownFields = map[string]fieldRule{
	"model":                 {endpoints: forBoth},
	"prompt":                {endpoints: forCompletions},
	"messages":              {endpoints: forChat, check: checkMessages},
	"max_tokens":            {endpoints: forBoth},
	"max_completion_tokens": {endpoints: forBoth},
	"temperature":           {endpoints: forBoth},
	"top_p":                 {endpoints: forBoth},
	"seed":                  {endpoints: forBoth},
	"stop":                  {endpoints: forBoth},
	"n":                     {endpoints: forBoth},
	"stream":                {endpoints: forBoth},
	"stream_options":        {endpoints: forBoth, check: checkStreamOptions},
	"echo":                  {endpoints: forCompletions},
	"logprobs":              {endpoints: forBoth},
	"top_logprobs":          {endpoints: forChat},
	// Identifiers with no effect on the answer: accepted (OpenAI uses them for abuse monitoring
	// and caching); they must be strings.
	"user":              {endpoints: forBoth, check: checkString("user")},
	"safety_identifier": {endpoints: forBoth, check: checkString("safety_identifier")},
	"prompt_cache_key":  {endpoints: forBoth, check: checkString("prompt_cache_key")},
	// loopserve's extensions.
	"top_k":          {endpoints: forBoth},
	"exit_threshold": {endpoints: forBoth},
	"max_depth":      {endpoints: forBoth},
	"deadline_ms":    {endpoints: forBoth},
	"tier":           {endpoints: forBoth, check: checkString("tier")},

	// Not implemented: refused unless they hold their no-op default.
	"frequency_penalty":   {endpoints: forBoth, inert: isZeroNumber, why: " (only 0)"},
	"presence_penalty":    {endpoints: forBoth, inert: isZeroNumber, why: " (only 0)"},
	"logit_bias":          {endpoints: forBoth, inert: isEmptyObject},
	"best_of":             {endpoints: forCompletions, inert: isNullOrOne, why: " (use n: every sample is returned)"},
	"suffix":              {endpoints: forCompletions, inert: isEmptyString, why: " (no fill-in-the-middle)"},
	"tools":               {endpoints: forChat, inert: isEmptyArray, why: " (no tool calling)"},
	"tool_choice":         {endpoints: forChat, inert: isNone, why: " (no tool calling)"},
	"parallel_tool_calls": {endpoints: forChat, inert: isNullOrBool},
	"functions":           {endpoints: forChat, inert: isEmptyArray, why: " (no function calling)"},
	"function_call":       {endpoints: forChat, inert: isNone, why: " (no function calling)"},
	"response_format":     {endpoints: forChat, inert: isTextFormat, why: ` (only {"type": "text"})`},
	"modalities":          {endpoints: forChat, inert: isTextModality, why: ` (only ["text"])`},
	"audio":               {endpoints: forChat, inert: isNull, why: " (text only)"},
	"prediction":          {endpoints: forChat, inert: isNull},
	"reasoning_effort":    {endpoints: forChat, inert: isNull},
	"verbosity":           {endpoints: forChat, inert: isNull},
	"web_search_options":  {endpoints: forChat, inert: isNull},
	"store":               {endpoints: forChat, inert: isNullOrFalse, why: " (nothing is stored)"},
	"metadata":            {endpoints: forChat, inert: isEmptyObject, why: " (nothing is stored)"},
	"service_tier":        {endpoints: forBoth, inert: isDefaultTier, why: ` (only "auto" or "default")`},
}

func raw(b []byte) []byte { return bytes.TrimSpace(b) }

func isNull(b []byte) bool { return bytes.Equal(raw(b), []byte("null")) }

func isZeroNumber(b []byte) bool {
	var f *float64
	return json.Unmarshal(b, &f) == nil && (f == nil || *f == 0)
}

func isEmptyObject(b []byte) bool {
	var m map[string]json.RawMessage
	return json.Unmarshal(b, &m) == nil && len(m) == 0
}

func isEmptyArray(b []byte) bool {
	var a []json.RawMessage
	return json.Unmarshal(b, &a) == nil && len(a) == 0
}

func isEmptyString(b []byte) bool {
	var s *string
	return json.Unmarshal(b, &s) == nil && (s == nil || *s == "")
}

func isNullOrOne(b []byte) bool {
	var n *int
	return json.Unmarshal(b, &n) == nil && (n == nil || *n == 1)
}

func isNullOrBool(b []byte) bool {
	var v *bool
	return json.Unmarshal(b, &v) == nil
}

func isNullOrFalse(b []byte) bool {
	var v *bool
	return json.Unmarshal(b, &v) == nil && (v == nil || !*v)
}

func isNone(b []byte) bool {
	var s *string
	return json.Unmarshal(b, &s) == nil && (s == nil || *s == "none")
}

func isTextFormat(b []byte) bool {
	if isNull(b) {
		return true
	}
	var f map[string]json.RawMessage
	if json.Unmarshal(b, &f) != nil || len(f) != 1 {
		return false
	}
	var typ string
	return json.Unmarshal(f["type"], &typ) == nil && typ == "text"
}

func isTextModality(b []byte) bool {
	var m []string
	return json.Unmarshal(b, &m) == nil && (m == nil || slices.Equal(m, []string{"text"}))
}

func isDefaultTier(b []byte) bool {
	var s *string
	return json.Unmarshal(b, &s) == nil && (s == nil || *s == "auto" || *s == "default")
}

func checkString(param string) func([]byte) *apiError {
	return func(b []byte) *apiError {
		var s *string
		if json.Unmarshal(b, &s) != nil {
			return badRequest(param, "%s must be a string", param)
		}
		return nil
	}
}

func checkStreamOptions(b []byte) *apiError {
	if isNull(b) {
		return nil
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(b, &m) != nil {
		return badRequest("stream_options", "stream_options must be an object")
	}
	for _, k := range slices.Sorted(mapKeys(m)) {
		switch k {
		case "include_usage":
			if !isNullOrBool(m[k]) {
				return badRequest("stream_options.include_usage", "stream_options.include_usage must be a boolean")
			}
		case "include_obfuscation":
			if !isNullOrFalse(m[k]) {
				return unsupported("stream_options.include_obfuscation", " (no obfuscation padding is sent)")
			}
		default:
			return badRequest("stream_options."+k, "unrecognized request argument supplied: stream_options.%s", k)
		}
	}
	return nil
}

// checkMessages refuses message fields loopserve does not render (names, tool calls, audio);
// roles and contents are checked when the job is built.
func checkMessages(b []byte) *apiError {
	var msgs []map[string]json.RawMessage
	if json.Unmarshal(b, &msgs) != nil {
		return badRequest("messages", "messages must be an array of objects")
	}
	for i, m := range msgs {
		for _, k := range slices.Sorted(mapKeys(m)) {
			param := fmt.Sprintf("messages[%d].%s", i, k)
			switch k {
			case "role", "content":
			case "tool_calls":
				if !isNull(m[k]) && !isEmptyArray(m[k]) {
					return unsupported(param, " (no tool calling)")
				}
			case "refusal", "function_call", "audio":
				if !isNull(m[k]) {
					return unsupported(param, "")
				}
			case "name", "tool_call_id":
				return unsupported(param, " (the chat template renders role and content only)")
			default:
				return badRequest(param, "unrecognized message field %s", k)
			}
		}
	}
	return nil
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// decodeRequest parses a request body for the completions (chat false) or chat completions
// endpoint. Every field is checked against knownFields before decoding, in name order, so the
// same body always gets the same answer.
func decodeRequest(body []byte, chat bool) (openAIRequest, *apiError) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return openAIRequest{}, badRequest("", "invalid JSON body: %v", err)
	}
	if fields == nil {
		return openAIRequest{}, badRequest("", "the request body must be a JSON object")
	}
	endpoint := forCompletions
	if chat {
		endpoint = forChat
	}
	for _, name := range slices.Sorted(mapKeys(fields)) {
		rule, ok := knownFields[name]
		if !ok || rule.endpoints&endpoint == 0 {
			return openAIRequest{}, badRequest(name, "unrecognized request argument supplied: %s", name)
		}
		if rule.inert != nil && !rule.inert(fields[name]) {
			return openAIRequest{}, unsupported(name, rule.why)
		}
		if rule.check != nil {
			if err := rule.check(fields[name]); err != nil {
				return openAIRequest{}, err
			}
		}
	}
	var r openAIRequest
	if err := json.Unmarshal(body, &r); err != nil {
		param := ""
		if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
			param = te.Field
		}
		return openAIRequest{}, badRequest(param, "invalid request body: %v", err)
	}
	return r, nil
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
	case maxTokens != nil && *maxTokens == 0 && !chat && r.Echo:
		j.PromptOnly = true // scoring a prompt: its text and log-probabilities, nothing generated
	case maxTokens != nil && *maxTokens <= 0:
		return Job{}, badRequest("max_tokens", "max_tokens must be positive (0 only with echo), got %d", *maxTokens)
	case maxTokens != nil && e.ContextLength > 0 && *maxTokens >= e.ContextLength:
		return Job{}, &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "context_length_exceeded", Param: "max_tokens",
			Message: fmt.Sprintf("max_tokens %d does not fit this model's context of %d tokens", *maxTokens, e.ContextLength)}
	case maxTokens != nil:
		j.MaxTokens = *maxTokens
	case !chat:
		j.MaxTokens = defaultCompletionTokens
	}
	if r.N != nil {
		if *r.N < 1 || *r.N > maxChoices {
			return Job{}, badRequest("n", "n must be in [1, %d], got %d", maxChoices, *r.N)
		}
		if *r.N > 1 {
			j.N = *r.N
		}
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
	if len(stop) > maxStops {
		return Job{}, badRequest("stop", "at most %d stop sequences", maxStops)
	}
	for _, s := range stop {
		if len(s) > maxStopBytes {
			return Job{}, badRequest("stop", "a stop sequence may hold at most %d bytes, got %d", maxStopBytes, len(s))
		}
	}
	j.Stop = stop
	if aerr := r.parseLogprobs(&j, chat); aerr != nil {
		return Job{}, aerr
	}
	j.Echo = r.Echo
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
		if *d <= 0 || *d > int64(24*time.Hour/time.Millisecond) {
			return Job{}, badRequest("deadline_ms", "deadline_ms must be in [1, 86400000]")
		}
		j.Deadline = now.Add(time.Duration(*d) * time.Millisecond)
	}
	// The tier's threshold in force at acceptance travels with the job: a redelivery runs
	// under it.
	tier := ""
	if r.Tier != nil {
		tier = *r.Tier
	}
	name, tau, terr := e.Threshold(tier)
	if terr != nil {
		known := "it declares no tiers"
		if names := e.TierNames(); len(names) > 0 {
			known = "its tiers are " + strings.Join(names, ", ")
		}
		return Job{}, &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "unknown_tier", Param: "tier",
			Message: fmt.Sprintf("the model %q has no tier %q: %s", e.ID(), truncateRunes(tier, bus.MaxTierName+1), known)}
	}
	j.Tier = name
	if tau > 0 && tau <= 1 {
		j.Threshold = tau
	}
	return j, nil
}

// truncateRunes keeps the first n runes of s (a client's string quoted in an error).
func truncateRunes(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n]) + "…"
}

// parseLogprobs reads logprobs (completions: an integer 0..5, the alternatives per position;
// chat: a boolean) and top_logprobs (chat: 0..20, needs logprobs).
func (r *openAIRequest) parseLogprobs(j *Job, chat bool) *apiError {
	lp := raw(r.Logprobs)
	if chat {
		var on *bool
		if len(lp) > 0 && json.Unmarshal(lp, &on) != nil {
			return badRequest("logprobs", "logprobs must be a boolean")
		}
		j.Logprobs = on != nil && *on
		if r.TopLogprobs != nil {
			if *r.TopLogprobs < 0 || *r.TopLogprobs > maxTopLogprobs {
				return badRequest("top_logprobs", "top_logprobs must be in [0, %d]", maxTopLogprobs)
			}
			if *r.TopLogprobs > 0 && !j.Logprobs {
				return badRequest("top_logprobs", "top_logprobs needs logprobs: true")
			}
			j.TopLogprobs = *r.TopLogprobs
		}
		return nil
	}
	var n *int
	if len(lp) > 0 && json.Unmarshal(lp, &n) != nil {
		return badRequest("logprobs", "logprobs must be an integer in [0, %d]", maxLogprobs)
	}
	if n != nil {
		if *n < 0 || *n > maxLogprobs {
			return badRequest("logprobs", "logprobs must be in [0, %d]", maxLogprobs)
		}
		j.Logprobs, j.TopLogprobs = true, *n
	}
	return nil
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
