package engine

import "time"

// Request is one generation: a tokenized prompt and how to continue it. The zero values of its
// option fields mean "the engine's defaults" (greedy, the threshold in force, full depth allowed).
type Request struct {
	ID          string      // caller's id; also seeds sampling and probe choice when Sampling.Seed is 0
	Prompt      []int       // token ids, already templated
	MaxTokens   int         // tokens to generate, > 0
	Sampling    Sampling    // how to pick each token
	Exit        Exit        // how deep each token runs
	StopTokens  []int       // ids that end generation (the eos id is always one unless IgnoreEOS)
	StopStrings []string    // generation ends once the generated text contains one (needs Options.Decode); the token completing it is still emitted
	IgnoreEOS   bool        // do not stop at the model's eos id (benchmarks, golden checks)
	Deadline    time.Time   // anytime generation: lower depth to finish by then (saves time in Fast mode); zero = none
	Speculative Speculative // self-speculative decoding; zero = off

	Logprobs       bool // report each generated token's log-probability (Token.Logprob)
	TopLogprobs    int  // 0..MaxTopLogprobs: also the most likely alternatives at each position (Token.Top); needs Logprobs
	PromptLogprobs bool // the prompt tokens' log-probabilities too (Event.Prompt, on the first token's event); Submit only
}

// MaxTopLogprobs bounds Request.TopLogprobs.
const MaxTopLogprobs = 20

// Logprob is one token id with its log-probability.
type Logprob struct {
	ID      int
	Logprob float32
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

// Speculative turns on self-speculative decoding for a greedy request: Draft tokens are
// drafted at DraftDepth loop steps (1 when 0), then verified at full depth in one pass and the
// agreeing prefix is kept, so the output equals full-depth greedy decoding (exactly so under
// KVFull; under KVLast the verify pass attends to in-flight keys of the same pass). Draft 0 is off.
type Speculative struct {
	Draft      int
	DraftDepth int
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
	// Steps is the loop steps this token cost (drafts and verification included for speculative
	// requests, where it is attributed to the tokens a verify pass accepted).
	Steps int
	// Logprob (with Request.Logprobs, or for prompt tokens with PromptLogprobs) is the
	// log-softmax of the raw logits of the exit step that scored this token, before
	// temperature, top-k and top-p (as vLLM reports by default). Top holds the
	// Request.TopLogprobs most likely tokens at that position, most likely first (ties by id).
	Logprob float32
	Top     []Logprob
}

// Event is what a running request yields: one token, or its end (Done with a finish reason or Err).
type Event struct {
	Token  Token
	Done   bool
	Finish string // "stop" (stop token or string) or "length" (MaxTokens or context) when Done without Err
	Err    error
	// Prompt (with Request.PromptLogprobs) holds one Token per prompt token, sent once, on the
	// event of the first generated token. Token i is scored by the logits of prompt position
	// i-1 at that row's exit step, and its Depth is that step (1..R); the first prompt token
	// has Logprob 0, Depth 0 and no Top: nothing precedes it.
	Prompt []Token
}
