package engine

import "time"

// Request is one generation: a tokenized prompt and how to continue it. The zero values of its
// option fields mean "the engine's defaults" (greedy, the threshold in force, full depth allowed).
type Request struct {
	ID         string    // caller's id; also seeds sampling when Sampling.Seed is 0
	Prompt     []int     // token ids, already templated
	MaxTokens  int       // tokens to generate, > 0
	Sampling   Sampling  // how to pick each token
	Exit       Exit      // how deep each token runs
	StopTokens []int     // ids that end generation (the eos id is always one)
	Deadline   time.Time // anytime generation: lower depth to finish by then; zero = none
}

// Sampling picks the next token. Temperature 0 is greedy; TopK 0 and TopP 0 (or 1) disable
// those filters. The same Seed gives the same output.
type Sampling struct {
	Temperature float64
	TopK        int
	TopP        float64
	Seed        uint64
}

// Exit controls a request's loop depth. Threshold 0 takes the engine's threshold in force;
// MaxDepth 0 allows every loop step; ForceDepth > 0 runs exactly that many steps (1..R).
type Exit struct {
	Threshold  float64
	MaxDepth   int
	ForceDepth int
}

// Token is one generated token with what it cost.
type Token struct {
	ID    int
	Depth int // loop steps whose output chose this token (1..R)
	// Cum holds c_t, the cumulative exit probability after each executed step (len = steps run),
	// for depth statistics; Probe marks a token that ran all R steps for unbiased statistics, and
	// Agree (probes only) tells for each step whether its argmax equals the full-depth argmax.
	Cum   []float32
	Probe bool
	Agree []bool
}

// Event is what a running request yields: one token, or its end (Done with a finish reason or Err).
type Event struct {
	Token  Token
	Done   bool
	Finish string // "stop" (stop token) or "length" (MaxTokens) when Done without Err
	Err    error
}
