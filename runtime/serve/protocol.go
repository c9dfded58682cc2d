// Package serve is loopserve's serving path: the runtime worker that pulls requests from a
// LoopModel's JetStream work queue and feeds them to the engine, the OpenAI-compatible HTTP
// gateway that publishes them and streams the token chunks back, the Prometheus metrics and the
// depth statistics both publish, and an embedded NATS server for running it all on one machine.
//
// Delivery contract between worker and gateway: every request carries an id (its Nats-Msg-Id)
// and a reply subject (header Loopserve-Reply). The worker publishes one Chunk per generated
// token, indexed from 0, then sends the final chunk as a NATS request; the gateway answers with
// the next index it still needs, so lost chunks are resent, and the worker acks the JetStream
// message only once the gateway holds everything (or is gone). A redelivered request is
// regenerated deterministically and the gateway drops indices it already has, so the client
// sees one clean stream.
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

	Temperature float64  `json:"temperature,omitempty"`
	TopP        float64  `json:"topP,omitempty"`
	TopK        int      `json:"topK,omitempty"`
	Seed        uint64   `json:"seed,omitempty"` // 0: derived from ID, so redeliveries repeat the output
	Stop        []string `json:"stop,omitempty"`

	ExitThreshold float64   `json:"exitThreshold,omitempty"`
	MaxDepth      int       `json:"maxDepth,omitempty"`
	Deadline      time.Time `json:"deadline,omitzero"` // anytime generation: finish by then (gateway clock: keep hosts in NTP sync)
}

// SeedFor returns the sampling seed of a job: its own, or one derived from its id, never 0.
func (j Job) SeedFor() uint64 {
	if j.Seed != 0 {
		return j.Seed
	}
	h := fnv.New64a()
	h.Write([]byte(j.ID))
	if s := h.Sum64(); s != 0 {
		return s
	}
	return 1
}

// Chunk is one message on a request's reply subject: a generated token (Index = its position),
// or the end of the request (Done, Index = number of tokens generated), or an error.
type Chunk struct {
	ID     string      `json:"id"`
	Index  int         `json:"index"`
	Text   string      `json:"text,omitempty"`
	Tokens []int       `json:"tokens,omitempty"`
	Depths []int       `json:"depths,omitempty"` // loop depth of each token
	Done   bool        `json:"done,omitempty"`
	Finish string      `json:"finish,omitempty"` // "stop" or "length" when Done
	Usage  *Usage      `json:"usage,omitempty"`  // on the final chunk
	Error  *ChunkError `json:"error,omitempty"`  // a failed request (Done is set too)
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

// finalReply is the gateway's answer to a final chunk: the next token index it still needs.
// Next equal to the final chunk's Index means it holds the whole stream.
type finalReply struct {
	Next int `json:"next"`
}

func decodeJob(b []byte) (Job, error) {
	var j Job
	if err := json.Unmarshal(b, &j); err != nil {
		return Job{}, fmt.Errorf("decoding job: %w", err)
	}
	if j.ID == "" {
		return Job{}, fmt.Errorf("decoding job: missing id")
	}
	return j, nil
}
