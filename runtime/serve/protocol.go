// Package serve is loopserve's serving path: the runtime worker that pulls requests from a
// LoopModel's JetStream work queue and feeds them to the engine, the OpenAI-compatible HTTP
// gateway that publishes them and streams the token chunks back, the Prometheus metrics and the
// depth statistics both publish, and an embedded NATS server for running it all on one machine.
//
// Delivery contract between worker and gateway: every request carries an id (its Nats-Msg-Id)
// and a reply subject (header Loopserve-Reply) under the gateway's inbox,
// loopserve.inbox.<gateway id>.<request id>; a worker publishes nowhere else. A request asks for
// one or more choices (n); the worker publishes one Chunk per generated token of each choice,
// indexed from 0 within its choice, then sends the final chunk as a NATS request. The gateway
// answers with the next index it still needs per choice, so lost chunks are resent, or says
// that it no longer waits for the request (Gone). The worker acks the JetStream message only
// once the gateway holds everything, or when the gateway is gone: it answered Gone, or its
// liveness key (bus.GatewaysBucket) expired. While the gateway is only unreachable (a NATS
// failover) the worker keeps trying, then hands the request back for redelivery. A
// redelivered request is regenerated deterministically (seeds derive from the request id and
// the choice) and the gateway drops indices it already has, so the client sees one clean
// stream per choice.
package serve

import (
	"encoding/json"
	"fmt"
	"hash/fnv"
	"time"
)

// HeaderReply names the NATS header holding the subject a request's chunks go to.
const HeaderReply = "Loopserve-Reply"

// Message is one chat message.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// Job is a request as it travels through the work queue. Exactly one of Prompt, PromptIDs and
// Messages is set. Zero option fields mean the worker's defaults.
type Job struct {
	ID        string    `json:"id"`
	Model     string    `json:"model"` // "<ns>/<name>"
	Prompt    string    `json:"prompt,omitempty"`
	PromptIDs []int     `json:"promptIds,omitempty"`
	Messages  []Message `json:"messages,omitempty"`
	MaxTokens int       `json:"maxTokens"`
	N         int       `json:"n,omitempty"` // choices: independent samples of the prompt, generated side by side; 0 means 1

	Echo        bool `json:"echo,omitempty"`        // the prompt's text (and its tokens' log-probabilities with Logprobs) comes first
	PromptOnly  bool `json:"promptOnly,omitempty"`  // echo with max_tokens 0: the prompt (and its scores) only, nothing generated
	Logprobs    bool `json:"logprobs,omitempty"`    // each token's log-probability
	TopLogprobs int  `json:"topLogprobs,omitempty"` // and this many most likely alternatives (0..20)

	Temperature float64  `json:"temperature,omitempty"`
	TopP        float64  `json:"topP,omitempty"`
	TopK        int      `json:"topK,omitempty"`
	Seed        uint64   `json:"seed,omitempty"` // 0: derived from ID, so redeliveries repeat the output
	Stop        []string `json:"stop,omitempty"`

	ExitThreshold float64 `json:"exitThreshold,omitempty"` // the request's own exit_threshold
	// Threshold is the exit threshold in force when the gateway accepted the request (from the
	// registry entry). The worker runs the job under it rather than under the threshold in
	// force when it takes the job, so a redelivery after a change regenerates the same tokens.
	// Deadline-driven depth is the exception: a job with a Deadline stops its loops by the
	// clock, so a redelivery may differ; the gateway drops indices it already holds, so the
	// client still sees one stream, but its later tokens may come from another continuation.
	Threshold float64 `json:"threshold,omitempty"`
	// Tier is the quality tier the request chose (or the model's default tier), resolved by the
	// gateway; Threshold is that tier's threshold. "" means the default tier (a job from a
	// gateway that knows no tiers).
	Tier     string    `json:"tier,omitempty"`
	MaxDepth int       `json:"maxDepth,omitempty"`
	Deadline time.Time `json:"deadline,omitzero"` // anytime generation: finish by then (gateway clock: keep hosts in NTP sync)
	// Expires is when the gateway stops waiting for the answer (its request timeout); a worker
	// drops a job taken after it (gateway clock).
	Expires time.Time `json:"expires,omitzero"`
}

// Choices is the number of choices the job asks for (at least 1).
func (j Job) Choices() int { return max(j.N, 1) }

// SeedFor returns the sampling seed of a job's choice: for choice 0 its own seed, or one
// derived from its id; for the other choices a seed mixed from that one and the choice, so the
// choices are independent samples and a redelivery repeats each of them. Never 0.
func (j Job) SeedFor(choice int) uint64 {
	s := j.Seed
	if s == 0 {
		h := fnv.New64a()
		h.Write([]byte(j.ID))
		s = h.Sum64()
	}
	if choice > 0 {
		s = splitmix64(s + uint64(choice)*0x9e3779b97f4a7c15)
	}
	if s == 0 {
		return 1
	}
	return s
}

// splitmix64 is the finaliser of SplitMix64: a bijection that scatters nearby inputs.
func splitmix64(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// Chunk is one message on a request's reply subject: a generated token of one choice (Index =
// its position in that choice), or the end of the request (Done, with Ends), or an error.
type Chunk struct {
	ID       string      `json:"id"`
	Choice   int         `json:"choice,omitempty"`
	Index    int         `json:"index"`
	Text     string      `json:"text,omitempty"`
	Tokens   []int       `json:"tokens,omitempty"`
	Depths   []int       `json:"depths,omitempty"`   // loop depth of each token
	Logprobs []Logprob   `json:"logprobs,omitempty"` // [len(Tokens)] when the job asked for them
	Echo     *Echo       `json:"echo,omitempty"`     // on index 0 of each choice of an echo job
	Done     bool        `json:"done,omitempty"`
	Ends     []End       `json:"ends,omitempty"`    // on the final chunk: how each choice ended
	Usage    *Usage      `json:"usage,omitempty"`   // on the final chunk
	Error    *ChunkError `json:"error,omitempty"`   // a failed request (Done is set too)
	Elapsed  float64     `json:"elapsed,omitempty"` // on the final chunk: seconds the worker spent on the request
}

// End is how one choice ended: the number of its token chunks (indices 0..Tokens-1), the
// finish reason and text held back until the end (bytes of a split character, a false start
// of a stop string).
type End struct {
	Tokens int    `json:"tokens"`
	Finish string `json:"finish"` // "stop" or "length"
	Text   string `json:"text,omitempty"`
}

// Echo is the prompt of an echo job: its text, and with logprobs one entry per prompt token
// (the first has no log-probability: nothing precedes it).
type Echo struct {
	Text     string    `json:"text"`
	Logprobs []Logprob `json:"logprobs,omitempty"`
}

// Logprob is a token's log-probability as a client sees it: the token's text (invalid UTF-8
// replaced), its bytes, and the most likely alternatives at its position. None marks a token
// without one (the first prompt token). Log-probabilities of -Inf travel as -9999, as OpenAI
// reports them.
type Logprob struct {
	Token   string    `json:"token"`
	Bytes   []byte    `json:"bytes,omitempty"`
	Logprob float32   `json:"logprob"`
	None    bool      `json:"none,omitempty"`
	Depth   int       `json:"depth,omitempty"` // loop steps of the exit step that scored it
	Top     []Logprob `json:"top,omitempty"`
}

// Usage counts a request's tokens.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

// ChunkError is a request the worker refused or could not finish, with the HTTP status and
// OpenAI error type/code the gateway answers with.
type ChunkError struct {
	Status  int    `json:"status"`
	Type    string `json:"type"`
	Code    string `json:"code,omitempty"`
	Param   string `json:"param,omitempty"`
	Message string `json:"message"`
}

// Error returns the message, so a ChunkError can travel as an error.
func (e *ChunkError) Error() string { return e.Message }

// finalReply is the gateway's answer to a final chunk: the next token index it still needs for
// each choice (equal to the choice's End.Tokens once it holds all of them), or Gone when it no
// longer waits for the request (it finished, timed out or its client left).
type finalReply struct {
	Next []int `json:"next,omitempty"`
	Gone bool  `json:"gone,omitempty"`
}

func decodeJob(b []byte) (Job, error) {
	var j Job
	if err := json.Unmarshal(b, &j); err != nil {
		return Job{}, fmt.Errorf("decoding job: %w", err)
	}
	if j.ID == "" {
		return Job{}, fmt.Errorf("decoding job: missing id")
	}
	if j.N < 0 || j.N > maxChoices {
		return Job{}, fmt.Errorf("decoding job %s: n %d outside 1..%d", j.ID, j.N, maxChoices)
	}
	return j, nil
}
