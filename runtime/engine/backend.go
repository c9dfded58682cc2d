package engine

import (
	"math"

	"github.com/loopserve/loopserve/runtime/model"
)

// The backend boundary. The engine decides policy: which rows run, at which loop step, under
// which exit rule, into which KV slots, what the LM head must report, how tokens are sampled,
// drafted, verified and probed. A backend owns the numbers: the weights (uploaded once by
// Load), the rows' hidden states, the KV memory, and the work of a loop step and the LM head.
// Per Stream.Step call only O(rows) scalars cross the boundary each way, plus logits for the
// rows that ask for them (Head.Logits: sampling on the host) — greedy rows get their argmax,
// log-probabilities and top candidates from the backend, so a GPU backend keeps weights,
// states and caches in device memory and decides exits on the device.
//
// Ownership and aliasing. The engine owns every Batch, Row and KVCopy it passes; a backend
// reads them during the call only. RowOut.Top and RowOut.Logits point into the stream's memory
// and stay valid until the stream's next call; the engine copies what it keeps. KV caches and
// hidden-state slots belong to the stream that made them and are named by small integers
// (KV handles, Row.State), never by host pointers.
//
// Ordering. Calls on one stream are ordered: each observes the effects of the ones before it
// (a backend may run them asynchronously, e.g. on a device stream, and wait only when a result
// is read). A Stream is used by one goroutine at a time; an Executor is safe for concurrent use.
//
// Batch invariance. Every output of a row (its new hidden state, keys, values, gate logit, exit
// state and head results) depends only on that row's inputs and on the cache contents it
// attends — never on which other rows share the call, their number or their order — so a
// request's tokens do not depend on what it is batched with. Kernels must therefore fix their
// summation order per row (no split of a row's reductions that depends on the batch size).

// Backend loads models onto a compute device (the CPU, a GPU). Implementations are in
// runtime/backend/...; the engine imports none of them.
type Backend interface {
	// Load uploads m's weights (or maps them in place) and returns the executor that owns
	// them. m stays open until the executor is closed.
	Load(m *model.Model, o LoadOptions) (Executor, error)
}

// LoadOptions fix how an executor stores its state.
type LoadOptions struct {
	KVBF16 bool // keys and values stored as bfloat16 (half the KV memory; see Options.KVBF16)
}

// Executor is one model on a backend: its weights and the streams that run loop steps on
// them. Safe for concurrent use.
type Executor interface {
	// NewStream returns a stream with its own hidden states, KV caches and scratch memory.
	NewStream() (Stream, error)
	// KVBlock is the positions of one KV block: caches grow a block at a time.
	KVBlock() int
	// KVBlockBytes is the memory one block of a cache with slots step-slots takes: keys and
	// values of every layer, in the device's memory. The engine counts it against its budget.
	KVBlockBytes(slots int) int64
	// Close frees the executor's memory; its streams must be closed first.
	Close() error
}

// KVCapacitor is an optional Executor interface: the memory the device can give KV caches
// (for the CPU, the container's memory limit less the weights and working memory). The engine
// takes it as its KV budget when Options.MaxKVBytes is 0.
type KVCapacitor interface {
	KVCapacity() (int64, error)
}

// KV names a cache of one stream: slots step-slots (KVFull: one per loop step; KVLast: one),
// each holding keys and values for every layer at positions [0, blocks×KVBlock()).
type KV int32

// Stream runs loop steps on one executor. Not safe for concurrent use.
type Stream interface {
	// NewKV makes an empty cache (no positions yet) of slots step-slots.
	NewKV(slots int) (KV, error)
	// GrowKV appends blocks to kv, keeping its content; the engine has taken their bytes
	// from its budget. An error (device memory exhausted) leaves kv as it was.
	GrowKV(kv KV, blocks int) error
	// FreeKV frees kv and its memory; the handle may be reused by a later NewKV.
	FreeKV(kv KV)
	// CopyKV copies positions between step-slots, of one cache or two, in order, for every
	// layer: how the engine fills the slots of steps a token skipped and saves a probe's keys.
	CopyKV(copies []KVCopy)
	// Step runs one loop step for every row of b and fills b.Out[:len(b.Rows)].
	Step(b *Batch) error
	// State copies the hidden state of slot i after its last step (the normed state that
	// feeds the next step, the gate and the LM head) into dst [hidden]: for traces and tests.
	State(i int, dst []float32)
	// Close frees the stream's caches, states and scratch.
	Close() error
}

// KVCopy copies N positions from (Src, SrcSlot, SrcPos...) to (Dst, DstSlot, DstPos...),
// keys and values of every layer.
type KVCopy struct {
	Dst, Src         KV
	DstSlot, SrcSlot int
	DstPos, SrcPos   int
	N                int
}

// Batch is one loop step for a set of rows. The engine fills Rows; Step fills Out, which the
// engine sizes to len(Rows).
//
// A row at Step 0 first takes its token's embedding as its state; every row then runs every
// decoder layer and the final norm on its state, writing its keys and values at Pos of its
// (KV, Slot) and attending positions [0, Pos] of it. For each layer the keys and values of all
// rows are written before any row attends, so a row sees those of earlier positions computed
// in the same call; rows sharing a (KV, Slot) come in increasing Pos. Then the backend computes
// the gate logit, folds it into the row's exit state with Row.Exit.Advance (the engine's rule:
// backends compute exactly what it computes), and runs the LM head where Row.Head asks.
type Batch struct {
	Rows []Row
	Out  []RowOut // [len(Rows)]
}

// Row is one token's part in a loop step.
type Row struct {
	State  int       // hidden-state slot (small, dense indices chosen by the engine)
	Token  int       // embedded into the state first when Step is 0
	Step   int       // loop step 0..R-1
	Pos    int       // position written and attended up to
	KV     KV        // the cache written and attended
	Slot   int       // its step-slot (the engine's KV policy)
	Exit   ExitRule  // how the row's exit step is decided
	ExitIn ExitState // the row's exit state before this step
	Head   Head      // what the LM head reports
}

// Head says when the LM head runs on a row's state and what it reports. It runs at the step
// the row's exit is decided (AtExit) or at every step (Every); then RowOut reports the argmax,
// and the log-probabilities asked for.
type Head struct {
	AtExit   bool
	Every    bool
	Logits   bool // also the raw logits [vocab] (the engine samples on the host)
	Logprobs bool // also the log-probability of Argmax
	Top      int  // also the Top most likely tokens with their log-probabilities
	Score    bool // also the log-probability of token ScoreID (prompt scoring)
	// ScoreID is the token whose log-probability Score reports.
	ScoreID int
}

// RowOut is what a row's step reports.
type RowOut struct {
	Gate float32   // the exit gate's logit at this step
	Exit ExitState // the row's exit state after this step
	// Head results, when the LM head ran at this step (Ran).
	Ran     bool
	Argmax  int       // the most likely token (the lowest id among equal logits)
	Logprob float32   // log-softmax of Argmax (with Head.Logprobs, Top or Score)
	Score   float32   // log-softmax of Head.ScoreID (with Head.Score)
	Top     []Logprob // with Head.Top: most likely first, ties by id (stream memory)
	Logits  []float32 // with Head.Logits: [vocab] (stream memory)
}

// ExitRule decides a row's exit step from its gate: the first step t whose cumulative exit
// probability reaches Tau (unless Forced), and at step MaxDepth-1 (or R-1) at the latest.
type ExitRule struct {
	Tau      float32
	MaxDepth int  // 1..R
	Forced   bool // exit exactly at MaxDepth-1, ignoring the gate
}

// ExitState is a row's exit distribution so far. The zero state is not valid: rows start at
// StartExit.
type ExitState struct {
	Rest   float32 // Π_{j<t}(1−λ_j): the probability of not having exited yet
	Cum    float32 // c_t: the cumulative exit probability
	Chosen int     // the exit step, -1 until decided
}

// StartExit is the exit state of a row before its first step.
var StartExit = ExitState{Rest: 1, Chosen: -1}

// Advance folds step t's gate logit into s (R loop steps in all): λ_t = σ(gate), p_t = λ_t·Rest
// (the last step takes the rest), Cum += p_t, and decides the exit when the rule says so. Every
// backend computes exactly this.
func (r ExitRule) Advance(s ExitState, t, R int, gate float32) ExitState {
	var p float32
	if t == R-1 {
		p = s.Rest
	} else {
		lam := sigmoid(gate)
		p = lam * s.Rest
		s.Rest *= 1 - lam
	}
	s.Cum += p
	if s.Chosen < 0 && (t+1 >= r.MaxDepth || t == R-1 || (!r.Forced && s.Cum >= r.Tau)) {
		s.Chosen = t
	}
	return s
}

func sigmoid(x float32) float32 { return float32(1 / (1 + math.Exp(-float64(x)))) }

// LogSumExp is log Σ exp(logits[i]) in float64 around the maximum: the normaliser of every
// log-probability the engine reports. Host backends use it so that every path agrees.
func LogSumExp(logits []float32) float64 {
	mx := float64(logits[argmax(logits)])
	if math.IsInf(mx, 0) || math.IsNaN(mx) {
		return mx
	}
	var s float64
	for _, v := range logits {
		s += math.Exp(float64(v) - mx)
	}
	return mx + math.Log(s)
}

// Argmax is the lowest index of the largest logit.
func Argmax(logits []float32) int { return argmax(logits) }

// TopLogprobs appends to dst the k most likely tokens of logits with their log-probabilities
// (logit − lse), most likely first, ties by id.
func TopLogprobs(dst []Logprob, logits []float32, k int, lse float64) []Logprob {
	ids := topK(make([]int, 0, k), logits, min(k, len(logits)), func(a, b int) int {
		if c := cmpDesc(logits[a], logits[b]); c != 0 {
			return c
		}
		return a - b
	})
	for _, id := range ids {
		dst = append(dst, Logprob{ID: id, Logprob: float32(float64(logits[id]) - lse)})
	}
	return dst
}
