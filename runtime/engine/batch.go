package engine

import (
	"errors"
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
	rowReplay                 // a generated token whose keys and values are recomputed after a preemption
)

// rowState is one token's progress through the loop steps.
type rowState struct {
	kind       rowKind
	id, pos    int
	state      int  // the stream's hidden-state slot
	runAll     bool // compute every step (prefill, Exact mode, probes, verification)
	rule       ExitRule
	exit       ExitState
	wantLogits bool // the row yields a token: its exit step's head chooses it
	scores     bool // a prompt row whose exit head scores the next prompt token (PromptLogprobs)
	sample     bool // the token is sampled on the host: the exit step's logits come back
	probe      bool

	ran     int  // steps executed
	stopped bool // no more steps to compute
	cums    []float32
	stepArg []int // probes: argmax after each step
	// The head at the exit step.
	argmax  int
	logprob float32
	score   float32
	top     []Logprob
}

// head reports whether the row's exit state goes through the LM head.
func (r *rowState) head() bool { return r.wantLogits || r.scores }

// unit is the rows a sequence has in flight: a prefill or replay chunk, one decode or draft
// token, or a verification pass. Its rows advance one loop step per iteration, all at step t.
type unit struct {
	inFlight bool
	rows     []rowState
	t        int // the step the rows run next
}

// active is the rows of u still computing.
func (u *unit) active() int {
	n := 0
	for i := range u.rows {
		if !u.rows[i].stopped {
			n++
		}
	}
	return n
}

// rowRef names one active row of the batch.
type rowRef struct {
	s *sequence
	i int
}

// batcher advances sequences one loop step per iterate call. Every sequence has its own unit at
// its own step, and one pass over the layer weights serves them all, since every loop step
// shares the same weights: a token that exits early frees its place at once, and the next
// token of its sequence starts at step 0 beside tokens still at step 3. It owns a backend
// stream (hidden states, caches, scratch), so it is not safe for concurrent use.
type batcher struct {
	e      *Engine
	st     Stream
	R      int
	refs   []rowRef
	batch  Batch
	copies []KVCopy
	free   []int // free hidden-state slots
	states int   // slots handed out so far
	done   []*sequence
	// stash holds, at the position of a KVLast probe's state slot, the keys and values of its
	// exit step, which its extra steps overwrite (Fast mode).
	stash *kvCache
}

func newBatcher(e *Engine) (*batcher, error) {
	st, err := e.ex.NewStream()
	if err != nil {
		return nil, fmt.Errorf("opening a backend stream: %w", err)
	}
	return &batcher{e: e, st: st, R: e.steps}, nil
}

// close frees the stream; the batcher's sequences must have released their caches.
func (b *batcher) close() error {
	if b.stash != nil {
		b.stash.release()
	}
	return b.st.Close()
}

func grow[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n, max(n, 2*cap(s)))
	}
	return s[:n]
}

func (b *batcher) takeState() int {
	if n := len(b.free); n > 0 {
		i := b.free[n-1]
		b.free = b.free[:n-1]
		return i
	}
	b.states++
	return b.states - 1
}

// endUnit returns the unit's hidden-state slots.
func (b *batcher) endUnit(u *unit) {
	for i := range u.rows {
		b.free = append(b.free, u.rows[i].state)
	}
	u.inFlight = false
}

// drop ends s with err between iterations (a cancelled request), returning its rows' slots.
func (b *batcher) drop(s *sequence, err error) {
	if s.unit.inFlight {
		b.endUnit(&s.unit)
	}
	s.finish("", err)
}

// maxRows is the most rows a decoding sequence puts in one iteration.
func (s *sequence) maxRows() int { return s.req.Speculative.Draft + 1 }

// exitRule is the exit rule of the sequence's next token.
func (b *batcher) exitRule(s *sequence) ExitRule {
	e := b.e
	exit := s.req.Exit
	tau := exit.Threshold
	if tau == 0 {
		tau = e.Threshold()
	}
	depth := b.R
	if exit.MaxDepth > 0 {
		depth = min(depth, exit.MaxDepth)
	}
	forced := exit.ForceDepth > 0
	if forced {
		depth = exit.ForceDepth
	}
	depth = min(depth, e.deadlineDepth(s))
	return ExitRule{Tau: float32(tau), MaxDepth: depth, Forced: forced}
}

// room makes c hold n positions. While the budget cannot grant them, it preempts the newest
// sequence that holds KV memory and is newer than s (vLLM's order: the oldest requests keep
// theirs). It reports whether s may run now; when it may not, s either waits (older requests,
// or a Generate call, hold the memory) or has finished with an error (it cannot fit alone).
func (b *batcher) room(s *sequence, c *kvCache, n int, seqs []*sequence) bool {
	for {
		ok, err := c.reserve(n)
		if err != nil {
			s.finish("", err)
			return false
		}
		if ok {
			return true
		}
		var victim *sequence
		for _, o := range seqs {
			if o != s && !o.done && o.holdsKV() && o.order > s.order && (victim == nil || o.order > victim.order) {
				victim = o
			}
		}
		if victim != nil {
			b.preempt(victim)
			continue
		}
		others := false
		for _, o := range seqs {
			others = others || (o != s && !o.done && o.holdsKV())
		}
		if others || (s.direct == nil && b.e.kvBudget.used.Load() > s.kvBytes()) {
			return false // older requests (or a Generate call) hold the memory: wait
		}
		s.finish("", fmt.Errorf("%d positions do not fit the KV budget of %d bytes: %w", n, b.e.kvBudget.limit, ErrKVFull))
		return false
	}
}

// preempt frees s's caches and in-flight rows: it recomputes its keys and values (prompt and
// generated tokens, each at the depth it ran) when memory allows, then goes on where it was.
func (b *batcher) preempt(s *sequence) {
	if s.unit.inFlight {
		b.endUnit(&s.unit)
	}
	s.releaseKV()
	s.filled = 0
	s.drafts, s.draftSteps = s.drafts[:0], 0
	if !s.started() {
		s.prompt = nil // scores not sent yet: they are recomputed
	}
	b.e.count(func(c *Counters) { c.Preemptions++ })
}

// plan gives sequence s its next unit of rows, at most allow rows of prompt or replay. It
// reports the rows planned (0 when s waits or finished).
func (b *batcher) plan(s *sequence, allow int, seqs []*sequence) int {
	e := b.e
	R := b.R
	P := len(s.req.Prompt)
	n := len(s.tokens) - 1 // positions the cache must hold before the next decode row
	if s.kv == nil {
		s.kv = newKVCache(b.st, e.ex, e.opts.KVPolicy.slots(R), e.kvBudget)
	}
	base := rowState{rule: b.exitRule(s), exit: StartExit, runAll: e.opts.Mode == Exact}
	u := &s.unit
	u.rows = u.rows[:0]
	add := func(r rowState) {
		if r.wantLogits {
			r.cums = make([]float32, 0, R) // handed to the Token as is
		}
		r.state = b.takeState()
		u.rows = append(u.rows, r)
	}
	switch {
	case s.filled < P:
		// A prompt chunk (under KVFull or with per-step scratch under KVLast: see below).
		need := n
		if !s.started() {
			need = P
		}
		end := min(P, s.filled+min(allow, e.opts.PrefillChunk))
		if !b.room(s, s.kv, need, seqs) {
			return 0
		}
		if e.opts.KVPolicy == KVLast && s.pkv == nil && s.filled == 0 && end < P {
			// A chunked prompt under KVLast: a chunk must attend the earlier chunks' keys of
			// every step, which the single slot cannot hold, so steps 0..R-2 of the prompt go to
			// a scratch cache, freed once the prompt is in (step R-1 is what KVLast keeps). When
			// the budget cannot grant it now, the prompt goes in one pass instead.
			s.pkv = newKVCache(b.st, e.ex, R-1, e.kvBudget)
			if ok, err := s.pkv.reserve(P); !ok || err != nil {
				s.pkv.release()
				s.pkv = nil
				end = P
			}
		}
		for i := s.filled; i < end; i++ {
			r := base
			r.kind, r.id, r.pos, r.runAll = rowPrefill, s.tokens[i], i, true
			r.wantLogits = i == P-1 && !s.started()
			r.scores = s.req.PromptLogprobs && !s.started() && i < P-1
			r.sample = r.wantLogits && s.req.Sampling.Temperature > 0
			if s.req.Speculative.Draft > 0 {
				r.rule.MaxDepth, r.rule.Forced = R, true
			}
			add(r)
		}
	case s.filled < n:
		// Replay after a preemption: each generated token again at the depth it ran, with no
		// head, so the cache ends as it was. Under KVLast a token attended the final keys of
		// every earlier one, so tokens replay as they ran (one at a time, verification passes
		// together); under KVFull each step-slot holds its own step, so chunks give the same.
		if !b.room(s, s.kv, n, seqs) {
			return 0
		}
		end := min(n, s.filled+max(allow, 1))
		if e.opts.KVPolicy == KVLast {
			end = s.filled + 1
			for end < n && s.kvRecs[end-P].joined {
				end++
			}
		}
		for i := s.filled; i < end; i++ {
			r := base
			r.kind, r.id, r.pos = rowReplay, s.tokens[i], i
			r.rule = ExitRule{MaxDepth: int(s.kvRecs[i-P].depth), Forced: true}
			add(r)
		}
	case s.req.Speculative.Draft > 0 && s.specBudget() > 0 && len(s.drafts) == s.specBudget():
		if !b.room(s, s.kv, n+len(s.drafts)+1, seqs) {
			return 0
		}
		for i := 0; i <= len(s.drafts); i++ {
			r := base
			r.kind, r.pos, r.runAll, r.wantLogits = rowVerify, n+i, true, true
			r.rule.MaxDepth, r.rule.Forced = R, true
			r.id = s.tokens[n]
			if i > 0 {
				r.id = s.drafts[i-1]
			}
			add(r)
		}
	case s.req.Speculative.Draft > 0 && s.specBudget() > 0:
		i := len(s.drafts)
		if !b.room(s, s.kv, n+i+1, seqs) {
			return 0
		}
		r := base
		r.kind, r.pos, r.runAll, r.wantLogits = rowDraft, n+i, false, true
		r.rule.MaxDepth, r.rule.Forced = max(1, min(s.req.Speculative.DraftDepth, R)), true
		r.id = s.tokens[n]
		if i > 0 {
			r.id = s.drafts[i-1]
		}
		add(r)
	default:
		if !b.room(s, s.kv, n+1, seqs) {
			return 0
		}
		r := base
		r.kind, r.id, r.pos, r.wantLogits = rowDecode, s.tokens[n], n, true
		r.sample = s.req.Sampling.Temperature > 0
		if s.req.Speculative.Draft > 0 {
			r.rule.MaxDepth, r.rule.Forced = R, true // the tail of a speculative request: plain full depth
		}
		if s.req.Speculative.Draft == 0 && probeHit(s.seed, s.generated, e.opts.ProbeFraction) {
			r.probe, r.runAll = true, true
		}
		add(r)
	}
	u.inFlight, u.t = true, 0
	return len(u.rows)
}

// specBudget is how many drafts the sequence may still propose: fewer near its token or
// context limit, so drafting never runs past what can be emitted.
func (s *sequence) specBudget() int {
	left := min(s.req.MaxTokens-s.generated, s.e.ctxLen-len(s.tokens))
	return max(0, min(s.req.Speculative.Draft, left-1))
}

// schedule gives units to the sequences without one, within the iteration's row budget
// (Options.MaxBatchedTokens): decoding sequences first, each counted at its largest unit, then
// prompt and replay chunks in the rows left over, so a long prompt never delays decoding rows.
func (b *batcher) schedule(seqs []*sequence) {
	budget := b.e.maxBatched
	reserved, chunks := 0, 0 // rows held for decoding sequences; prompt and replay rows in flight
	for _, s := range seqs {
		switch {
		case s.done:
		case s.decoding():
			reserved += s.maxRows()
			if !s.unit.inFlight {
				b.plan(s, 0, seqs)
			}
		case s.unit.inFlight:
			chunks += s.unit.active()
		}
	}
	for _, s := range seqs {
		if s.done || s.unit.inFlight || s.decoding() {
			continue
		}
		allow := budget - reserved - chunks
		if allow <= 0 {
			if chunks > 0 {
				continue // wait for the chunks in flight
			}
			allow = 1 // the oldest prompt always progresses
		}
		chunks += b.plan(s, allow, seqs)
	}
}

// iterate runs one loop step for every sequence in seqs (giving a unit to those without one)
// and turns the units that complete into tokens. It returns the rows it computed: none when
// every sequence is finished or waiting for KV memory.
func (b *batcher) iterate(seqs []*sequence) int {
	e := b.e
	R := b.R
	b.schedule(seqs)
	b.refs = b.refs[:0]
	for _, s := range seqs {
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
	rows := grow(b.batch.Rows, n)
	for k, rf := range b.refs {
		s, u := rf.s, &rf.s.unit
		row := &u.rows[rf.i]
		kv, slot := s.kv.id, e.opts.KVPolicy.slot(u.t)
		if row.kind == rowPrefill && s.pkv != nil && u.t < R-1 {
			kv, slot = s.pkv.id, u.t
		}
		h := Head{AtExit: row.head(), Every: row.probe, Logits: row.sample}
		if row.wantLogits && !row.sample && s.req.Logprobs && row.kind != rowDraft {
			h.Logprobs, h.Top = true, s.req.TopLogprobs
		}
		if row.scores {
			h.Score, h.ScoreID, h.Top = true, s.req.Prompt[row.pos+1], s.req.TopLogprobs
		}
		rows[k] = Row{State: row.state, Token: row.id, Step: u.t, Pos: row.pos, KV: kv, Slot: slot,
			Exit: row.rule, ExitIn: row.exit, Head: h}
	}
	b.batch.Rows = rows
	b.batch.Out = grow(b.batch.Out, n)
	start := time.Now()
	if err := b.st.Step(&b.batch); err != nil {
		b.fail(seqs, fmt.Errorf("loop step: %w", err))
		return n
	}
	var prefillSteps, decodeSteps uint64
	for k, rf := range b.refs {
		s, u := rf.s, &rf.s.unit
		row := &u.rows[rf.i]
		out := &b.batch.Out[k]
		t := u.t
		row.ran = t + 1
		if row.kind == rowPrefill || row.kind == rowReplay {
			prefillSteps++
		} else {
			decodeSteps++
		}
		decided := row.exit.Chosen < 0 && out.Exit.Chosen == t
		row.exit = out.Exit
		if row.wantLogits {
			row.cums = append(row.cums, row.exit.Cum)
		}
		if row.probe {
			row.stepArg = append(row.stepArg[:min(len(row.stepArg), t)], out.Argmax)
		}
		if decided && row.head() {
			row.argmax, row.logprob, row.score = out.Argmax, out.Logprob, out.Score
			row.top = append(row.top[:0], out.Top...)
			if row.sample {
				s.logits = append(s.logits[:0], out.Logits...)
			}
		}
		if decided && row.probe && e.opts.Mode == Fast && e.opts.KVPolicy == KVLast && t < R-1 {
			b.stashKV(s, row)
		}
		switch {
		case row.exit.Chosen >= 0 && !row.runAll:
			// Leaves the batch: later steps read this step's keys and values (KVFull).
			if row.kind != rowDraft && e.opts.KVPolicy == KVFull {
				b.copyKV(s.kv.fill(row.pos, t, R, b.copies[:0]))
			}
			row.stopped = true
		case t == R-1:
			row.stopped = true
		}
	}
	e.observeStep(time.Since(start))
	b.done = b.done[:0]
	for _, s := range seqs {
		u := &s.unit
		if !u.inFlight {
			continue
		}
		u.t++
		if u.active() == 0 {
			b.done = append(b.done, s)
		}
	}
	e.count(func(cn *Counters) {
		cn.Iterations++
		cn.BatchRows += uint64(n)
		cn.PrefillLoopSteps += prefillSteps
		cn.LoopSteps += decodeSteps
	})
	b.finish(b.done)
	return n
}

func (b *batcher) copyKV(c []KVCopy) {
	if len(c) > 0 {
		b.st.CopyKV(c)
	}
	b.copies = c[:0]
}

// stashKV saves a KVLast probe's exit-step keys and values at its state slot's position of
// the stash cache.
func (b *batcher) stashKV(s *sequence, row *rowState) {
	if b.stash == nil {
		// Scratch proportional to the rows in flight, like the hidden states: outside the
		// budget (which bounds what requests hold).
		b.stash = newKVCache(b.st, b.e.ex, 1, &kvBudget{limit: 1 << 62})
	}
	if ok, err := b.stash.reserve(b.states); !ok {
		s.finish("", fmt.Errorf("probe scratch: %w", errors.Join(err, ErrKVFull)))
		return
	}
	b.copyKV(append(b.copies[:0], KVCopy{Dst: b.stash.id, Src: s.kv.id, DstPos: row.state, SrcPos: row.pos, N: 1}))
}

// fail ends every sequence with rows in flight with err (a backend failure).
func (b *batcher) fail(seqs []*sequence, err error) {
	for _, s := range seqs {
		if s.unit.inFlight {
			b.endUnit(&s.unit)
			s.finish("", err)
		}
	}
}

// finish turns the completed units into tokens and moves their sequences on.
func (b *batcher) finish(done []*sequence) {
	e := b.e
	R := b.R
	for _, s := range done {
		rows := s.unit.rows
		P := len(s.req.Prompt)
		for k := range rows {
			row := &rows[k]
			if row.probe && e.opts.Mode == Fast && !s.done {
				// A probe's output and cache must be what its exit alone would give (in Exact
				// mode every token keeps its own per-step keys and values anyway).
				switch {
				case e.opts.KVPolicy == KVFull:
					b.copyKV(s.kv.fill(row.pos, row.exit.Chosen, R, b.copies[:0]))
				case row.exit.Chosen < R-1:
					b.copyKV(append(b.copies[:0], KVCopy{Dst: s.kv.id, Src: b.stash.id, DstPos: row.pos, SrcPos: row.state, N: 1}))
				}
			}
		}
		b.endUnit(&s.unit)
		if s.done {
			continue
		}
		last := &rows[len(rows)-1]
		switch last.kind {
		case rowPrefill:
			e.count(func(cn *Counters) { cn.PrefillTokens += uint64(len(rows)) })
			s.filled = last.pos + 1
			if s.req.PromptLogprobs && !s.started() {
				s.scorePrompt(rows)
			}
			if s.filled == P && s.pkv != nil {
				s.pkv.release()
				s.pkv = nil
			}
			if last.wantLogits {
				s.emit(b.token(s, last, last.ran))
			}
		case rowReplay:
			s.filled = last.pos + 1
			e.count(func(cn *Counters) { cn.ReplayedTokens += uint64(len(rows)) })
		case rowDecode:
			e.count(func(cn *Counters) {
				cn.DecodeTokens++
				cn.DecodeDepth += uint64(last.exit.Chosen + 1)
			})
			s.wrote(last.exit.Chosen+1, false)
			s.filled = last.pos + 1
			s.emit(b.token(s, last, last.ran))
		case rowDraft:
			s.drafts = append(s.drafts, last.argmax)
			s.draftSteps += last.ran
			e.count(func(cn *Counters) { cn.DraftTokens++ })
		case rowVerify:
			steps := s.draftSteps
			for k := range rows {
				steps += rows[k].ran
			}
			accepted := 0
			for k := range rows {
				s.wrote(R, k > 0) // row k's keys are right: its input was accepted
				tok := b.token(s, &rows[k], 0)
				if k == 0 {
					tok.Steps = steps
				}
				if !s.emit(tok) {
					break
				}
				if k == len(rows)-1 || tok.ID != s.drafts[k] {
					break
				}
				accepted++
			}
			e.count(func(cn *Counters) { cn.AcceptedDrafts += uint64(accepted) })
			s.filled = rows[0].pos + accepted + 1 // the rows whose inputs were accepted
			s.drafts = s.drafts[:0]
			s.draftSteps = 0
		}
	}
}

// token builds the Token a row yields from its exit head: sampled from the logits, or the
// backend's argmax (greedy).
func (b *batcher) token(s *sequence, row *rowState, steps int) Token {
	t := Token{ID: row.argmax, Depth: row.exit.Chosen + 1, Cum: row.cums, Probe: row.probe, Steps: steps}
	if row.sample {
		t.ID = s.smp.pick(s.logits)
		if s.req.Logprobs {
			scoreToken(&t, s.logits, s.req.TopLogprobs)
		}
	} else if s.req.Logprobs {
		t.Logprob = row.logprob
		if len(row.top) > 0 {
			t.Top = append([]Logprob(nil), row.top...)
		}
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
