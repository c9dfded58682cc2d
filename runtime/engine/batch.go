package engine

import (
	"fmt"
	"time"
)

// rowKind says why a row is in an iteration.
type rowKind int

const (
	rowPrefill rowKind = iota // a prompt token; the last one yields the first generated token
	rowDecode                 // the newest token of a running sequence
	rowDraft                  // a speculative draft step at shallow depth
	rowVerify                 // a speculative verification row at full depth
)

// rowState is one token's progress through the loop steps.
type rowState struct {
	kind       rowKind
	id, pos    int
	runAll     bool    // compute every step (prefill, Exact mode, probes, verification)
	maxDepth   int     // the token's exit is at most this deep
	forced     bool    // exit exactly at maxDepth, ignoring the gate
	tau        float32 // Q-exit threshold
	wantLogits bool    // the row yields a token: its exit step's logits choose it
	scores     bool    // a prompt row whose exit logits score the next prompt token (PromptLogprobs)
	probe      bool

	rest, cum float32
	chosen    int  // exit step (0-based), -1 until decided
	ran       int  // steps executed
	stopped   bool // no more steps to compute
	cums      []float32
	stepArg   []int     // probes: argmax after each step
	saveK     []float32 // probes under KVLast: [layers, kvDim] keys of the exit step
	saveV     []float32
	hIdx      int // row of the LM head batch when head()
}

// head reports whether the row's exit state goes through the LM head.
func (r *rowState) head() bool { return r.wantLogits || r.scores }

// unit is the rows a sequence has in flight: a prefill chunk, one decode or draft token, or a
// verification pass. Its rows advance one loop step per iteration, all at step t.
type unit struct {
	inFlight bool
	rows     []rowState
	t        int       // the step the rows run next
	h        []float32 // [rows, hidden]: state entering step t
	exitH    []float32 // [rows, hidden]: normed state at each row's exit step
}

// rowRef names one active row of the batch.
type rowRef struct {
	s *sequence
	i int
}

// batcher advances sequences one loop step per iterate call. Every sequence has its own unit at
// its own step, and one pass over the layer weights serves them all, since every loop step
// shares the same weights: a token that exits early frees its place at once, and the next
// token of its sequence starts at step 0 beside tokens still at step 3. It owns its runner and
// buffers (reused across iterations), so it is not safe for concurrent use.
type batcher struct {
	e      *Engine
	r      *runner
	refs   []rowRef
	fwd    []fwdRow  // [refs]
	h      []float32 // [refs, hidden]
	headH  []float32 // [rows wanting logits, hidden]
	done   []*sequence
	ids    []int
	probeH []float32 // [probes, hidden]
	pidx   []int
}

func newBatcher(e *Engine) *batcher {
	return &batcher{e: e, r: newRunner(e.m, e.opts.Backend)}
}

func grow[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n, max(n, 2*cap(s)))
	}
	return s[:n]
}

// plan gives sequence s its next unit of rows.
func (b *batcher) plan(s *sequence) {
	e := b.e
	R := e.steps
	exit := s.req.Exit
	tau := exit.Threshold
	if tau == 0 {
		tau = e.Threshold()
	}
	depth := R
	if exit.MaxDepth > 0 {
		depth = min(depth, exit.MaxDepth)
	}
	forced := exit.ForceDepth > 0
	if forced {
		depth = exit.ForceDepth
	}
	depth = min(depth, e.deadlineDepth(s))
	base := rowState{maxDepth: depth, forced: forced, tau: float32(tau), chosen: -1, rest: 1, runAll: e.opts.Mode == Exact}
	u := &s.unit
	u.rows = u.rows[:0]
	add := func(r rowState) {
		if r.wantLogits {
			r.cums = make([]float32, 0, R) // handed to the Token as is
		}
		u.rows = append(u.rows, r)
	}
	n := len(s.tokens) - 1 // positions already in the cache
	// need is the positions this unit writes up to; a sequence the KV budget cannot hold
	// ends here ("length" once generating; ErrKVFull for a prompt).
	need := n + 1
	switch {
	case !s.prefilled:
		need = len(s.tokens)
	case s.req.Speculative.Draft > 0 && s.specBudget() > 0:
		need = n + len(s.drafts) + 1
	}
	if !s.kv.reserve(need) {
		switch {
		case s.prefilled:
			s.finish("length", nil)
		case s.direct == nil && e.kvBudget.used.Load() > s.kv.bytes():
			// Other requests hold the memory: wait for them.
		default:
			s.finish("", fmt.Errorf("prompt of %d tokens: %w", len(s.tokens), ErrKVFull))
		}
		return
	}
	switch {
	case !s.prefilled:
		// Under KVFull a long prompt is prefilled in chunks so running sequences keep
		// decoding; KVLast needs the whole prompt in one pass (its single cache per layer
		// cannot hold an earlier chunk's per-step keys).
		end := len(s.tokens)
		if e.opts.KVPolicy == KVFull {
			end = min(end, s.prefillPos+e.opts.PrefillChunk)
		}
		for i := s.prefillPos; i < end; i++ {
			r := base
			r.kind, r.id, r.pos, r.runAll = rowPrefill, s.tokens[i], i, true
			r.wantLogits = i == len(s.tokens)-1
			r.scores = s.req.PromptLogprobs && !r.wantLogits
			if s.req.Speculative.Draft > 0 {
				r.maxDepth, r.forced = R, true
			}
			add(r)
		}
	case s.req.Speculative.Draft > 0 && s.specBudget() > 0 && len(s.drafts) == s.specBudget():
		for i := 0; i <= len(s.drafts); i++ {
			r := base
			r.kind, r.pos, r.runAll, r.maxDepth, r.forced, r.wantLogits = rowVerify, n+i, true, R, true, true
			r.id = s.tokens[n]
			if i > 0 {
				r.id = s.drafts[i-1]
			}
			add(r)
		}
	case s.req.Speculative.Draft > 0 && s.specBudget() > 0:
		i := len(s.drafts)
		r := base
		r.kind, r.pos, r.runAll, r.forced, r.wantLogits = rowDraft, n+i, false, true, true
		r.maxDepth = max(1, min(s.req.Speculative.DraftDepth, R))
		r.id = s.tokens[n]
		if i > 0 {
			r.id = s.drafts[i-1]
		}
		add(r)
	default:
		r := base
		r.kind, r.id, r.pos, r.wantLogits = rowDecode, s.tokens[n], n, true
		if s.req.Speculative.Draft > 0 {
			r.maxDepth, r.forced = R, true // the tail of a speculative request: plain full depth
		}
		if s.req.Speculative.Draft == 0 && probeHit(s.seed, s.generated, e.opts.ProbeFraction) {
			r.probe, r.runAll = true, true
		}
		add(r)
	}
	H := e.m.Config.HiddenSize
	u.inFlight, u.t = true, 0
	u.h = grow(u.h, len(u.rows)*H)
	u.exitH = grow(u.exitH, len(u.rows)*H)
	b.ids = b.ids[:0]
	for _, r := range u.rows {
		b.ids = append(b.ids, r.id)
	}
	b.r.embed(u.h, b.ids)
}

// specBudget is how many drafts the sequence may still propose: fewer near its token or
// context limit, so drafting never runs past what can be emitted.
func (s *sequence) specBudget() int {
	left := min(s.req.MaxTokens-s.generated, s.e.ctxLen-len(s.tokens))
	return max(0, min(s.req.Speculative.Draft, left-1))
}

// iterate runs one loop step for every sequence in seqs (giving a unit to those without one)
// and turns the units that complete into tokens. It returns the rows it computed: none when
// every sequence is finished or waiting for KV memory.
func (b *batcher) iterate(seqs []*sequence) int {
	e, r := b.e, b.r
	c := e.m.Config
	R, H := e.steps, c.HiddenSize
	b.refs = b.refs[:0]
	for _, s := range seqs {
		if !s.unit.inFlight && !s.done {
			b.plan(s)
		}
		if !s.unit.inFlight {
			continue // finished, or waiting for KV memory
		}
		for i := range s.unit.rows {
			if !s.unit.rows[i].stopped {
				b.refs = append(b.refs, rowRef{s, i})
			}
		}
	}
	n := len(b.refs)
	if n == 0 {
		return 0
	}
	// Gather every active row's state into one batch.
	b.h = grow(b.h, n*H)
	b.fwd = grow(b.fwd, n)
	for k, rf := range b.refs {
		u := &rf.s.unit
		copy(b.h[k*H:(k+1)*H], u.h[rf.i*H:(rf.i+1)*H])
		b.fwd[k] = fwdRow{kv: rf.s.kv, pos: u.rows[rf.i].pos, t: u.t}
	}
	start := time.Now()
	r.step(b.fwd, b.h)
	b.probeSteps(b.h)
	var prefillSteps, decodeSteps uint64
	for k, rf := range b.refs {
		u := &rf.s.unit
		row := &u.rows[rf.i]
		t := u.t
		hi := b.h[k*H : (k+1)*H]
		row.ran = t + 1
		if row.kind == rowPrefill {
			prefillSteps++
		} else {
			decodeSteps++
		}
		b.gate(row, t, hi)
		if row.chosen == t && row.head() {
			copy(u.exitH[rf.i*H:(rf.i+1)*H], hi)
		}
		if row.chosen == t && row.probe && e.opts.Mode == Fast && e.opts.KVPolicy == KVLast {
			b.saveExitKV(rf.s.kv, row, t)
		}
		switch {
		case row.chosen >= 0 && !row.runAll:
			// Leaves the batch: later steps read this step's keys and values (KVFull).
			if row.kind != rowDraft {
				rf.s.kv.copyStep(row.pos, t, R)
			}
			row.stopped = true
		case t == R-1:
			row.stopped = true
		default:
			copy(u.h[rf.i*H:(rf.i+1)*H], hi) // scatter back for the next step
		}
	}
	e.observeStep(time.Since(start))
	// Units whose rows have all stopped yield their tokens; one LM head pass serves them all.
	b.done = b.done[:0]
	nWant := 0
	for _, s := range seqs {
		u := &s.unit
		if !u.inFlight {
			continue
		}
		u.t++
		running := false
		for i := range u.rows {
			running = running || !u.rows[i].stopped
		}
		if running {
			continue
		}
		b.done = append(b.done, s)
		for i := range u.rows {
			if u.rows[i].head() {
				u.rows[i].hIdx = nWant
				nWant++
			}
		}
	}
	b.headH = grow(b.headH, nWant*H)
	for _, s := range b.done {
		u := &s.unit
		for i := range u.rows {
			if u.rows[i].head() {
				copy(b.headH[u.rows[i].hIdx*H:(u.rows[i].hIdx+1)*H], u.exitH[i*H:(i+1)*H])
			}
		}
	}
	var logits []float32 // [nWant, vocab]; none when only prefill chunks completed
	if nWant > 0 {
		logits = r.lmHead(b.headH[:nWant*H], nWant)
	}
	e.count(func(cn *Counters) {
		cn.Iterations++
		cn.BatchRows += uint64(n)
		cn.PrefillLoopSteps += prefillSteps
		cn.LoopSteps += decodeSteps
	})
	b.finish(b.done, logits)
	return n
}

// gate updates a row's exit distribution after step t and decides its exit.
func (b *batcher) gate(row *rowState, t int, h []float32) {
	R := b.e.steps
	var p float32
	if t == R-1 {
		p = row.rest
	} else {
		lam := sigmoid(b.r.gateLogit(h))
		p = lam * row.rest
		row.rest *= 1 - lam
	}
	row.cum += p
	if row.wantLogits {
		row.cums = append(row.cums, row.cum)
	}
	if row.chosen >= 0 {
		return
	}
	if t+1 >= row.maxDepth || t == R-1 || (!row.forced && row.cum >= row.tau) {
		row.chosen = t
	}
}

// probeSteps records, for probe rows, the argmax of this step's logits (one batched lm_head).
func (b *batcher) probeSteps(h []float32) {
	H := b.e.m.Config.HiddenSize
	b.pidx = b.pidx[:0]
	for k, rf := range b.refs {
		if rf.s.unit.rows[rf.i].probe {
			b.pidx = append(b.pidx, k)
		}
	}
	if len(b.pidx) == 0 {
		return
	}
	b.probeH = grow(b.probeH, len(b.pidx)*H)
	for j, k := range b.pidx {
		copy(b.probeH[j*H:(j+1)*H], h[k*H:(k+1)*H])
	}
	logits := b.r.lmHead(b.probeH, len(b.pidx))
	V := b.e.m.Config.VocabSize
	for j, k := range b.pidx {
		rf := b.refs[k]
		row := &rf.s.unit.rows[rf.i]
		row.stepArg = append(row.stepArg[:min(len(row.stepArg), rf.s.unit.t)], argmax(logits[j*V:(j+1)*V]))
	}
}

// saveExitKV keeps a KVLast probe's exit-step keys and values, which its extra steps overwrite.
func (b *batcher) saveExitKV(kv *kvCache, row *rowState, t int) {
	d := kv.kvDim
	row.saveK = grow(row.saveK, kv.layers*d)
	row.saveV = grow(row.saveV, kv.layers*d)
	for l := 0; l < kv.layers; l++ {
		kv.get(kv.slot(t, l), row.pos, row.saveK[l*d:(l+1)*d], row.saveV[l*d:(l+1)*d])
	}
}

// finish turns the completed units' exit logits into tokens and moves their sequences on.
func (b *batcher) finish(done []*sequence, logits []float32) {
	e := b.e
	c := e.m.Config
	R, V := e.steps, c.VocabSize
	for _, s := range done {
		rows := s.unit.rows
		s.unit.inFlight = false
		for k := range rows {
			row := &rows[k]
			if row.probe && e.opts.Mode == Fast {
				// A probe's output and cache must be what its exit alone would give (in Exact
				// mode every token keeps its own per-step keys and values anyway).
				if e.opts.KVPolicy == KVFull {
					s.kv.copyStep(row.pos, row.chosen, R)
				} else if row.chosen < R-1 {
					d := s.kv.kvDim
					for l := 0; l < s.kv.layers; l++ {
						// bf16 values round-trip exactly through float32.
						s.kv.put(l, row.pos, row.saveK[l*d:(l+1)*d], row.saveV[l*d:(l+1)*d])
					}
				}
			}
		}
		if s.done {
			continue
		}
		last := &rows[len(rows)-1]
		lg := func(row *rowState) []float32 { return logits[row.hIdx*V : (row.hIdx+1)*V] }
		switch last.kind {
		case rowPrefill:
			e.count(func(cn *Counters) { cn.PrefillTokens += uint64(len(rows)) })
			s.prefillPos = last.pos + 1
			if s.req.PromptLogprobs {
				s.scorePrompt(rows, lg)
			}
			if last.wantLogits {
				s.prefilled = true
				s.emit(b.token(s, last, s.smp.pick(lg(last)), last.ran, lg(last)))
			}
		case rowDecode:
			e.count(func(cn *Counters) {
				cn.DecodeTokens++
				cn.DecodeDepth += uint64(last.chosen + 1)
			})
			s.emit(b.token(s, last, s.smp.pick(lg(last)), last.ran, lg(last)))
		case rowDraft:
			s.drafts = append(s.drafts, argmax(lg(last)))
			s.draftSteps += last.ran
			e.count(func(cn *Counters) { cn.DraftTokens++ })
		case rowVerify:
			steps := s.draftSteps
			for k := range rows {
				steps += rows[k].ran
			}
			accepted := 0
			for k := range rows {
				v := argmax(lg(&rows[k]))
				tok := b.token(s, &rows[k], v, 0, lg(&rows[k]))
				if k == 0 {
					tok.Steps = steps
				}
				if !s.emit(tok) {
					break
				}
				if k == len(rows)-1 || v != s.drafts[k] {
					break
				}
				accepted++
			}
			e.count(func(cn *Counters) { cn.AcceptedDrafts += uint64(accepted) })
			s.drafts = s.drafts[:0]
			s.draftSteps = 0
		}
	}
}

// token builds the Token a row yields from its exit logits [vocab].
func (b *batcher) token(s *sequence, row *rowState, id, steps int, logits []float32) Token {
	t := Token{ID: id, Depth: row.chosen + 1, Cum: row.cums, Probe: row.probe, Steps: steps}
	if s.req.Logprobs {
		scoreToken(&t, logits, s.req.TopLogprobs)
	}
	if row.probe {
		full := row.stepArg[len(row.stepArg)-1]
		t.Agree = make([]bool, len(row.stepArg))
		for i, a := range row.stepArg {
			t.Agree[i] = a == full
		}
	}
	return t
}
