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

// rowState is one token's progress through the loop steps of an iteration.
type rowState struct {
	seq        *sequence
	kind       rowKind
	id, pos    int
	runAll     bool    // compute every step (prefill, Exact mode, probes, verification)
	maxDepth   int     // the token's exit is at most this deep
	forced     bool    // exit exactly at maxDepth, ignoring the gate
	tau        float32 // Q-exit threshold
	wantLogits bool
	probe      bool

	rest, cum float32
	chosen    int // exit step (0-based), -1 until decided
	ran       int // steps executed
	cums      []float32
	stepArg   []int     // probes: argmax after each step
	saveK     []float32 // probes under KVLast: [layers, kvDim] keys of the exit step
	saveV     []float32
	hIdx      int // row in exitH when wantLogits
}

// batcher advances a set of sequences by one token boundary per iterate call. It owns its
// runner and buffers (reused across iterations), so it is not safe for concurrent use.
type batcher struct {
	e      *Engine
	r      *runner
	rows   []rowState
	active []int     // indices into rows still computing
	fwd    []fwdRow  // [active]
	h      []float32 // [active, hidden]
	exitH  []float32 // [wantLogits rows, hidden]: normed hidden state at the exit step
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

// plan appends the rows sequence s contributes to this iteration.
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
	base := rowState{seq: s, maxDepth: depth, forced: forced, tau: float32(tau), chosen: -1, rest: 1, runAll: e.opts.Mode == Exact}
	add := func(r rowState) {
		if r.wantLogits {
			r.cums = make([]float32, 0, R) // handed to the Token as is
		}
		b.rows = append(b.rows, r)
	}
	n := len(s.tokens) - 1 // positions already in the cache
	// need is the positions this iteration writes up to; a sequence the KV budget cannot
	// hold ends here ("length" once generating; ErrKVFull for a prompt).
	need := n + 1
	switch {
	case !s.prefilled:
		need = len(s.tokens)
	case s.req.Speculative.Draft > 0 && s.specBudget() > 0 && len(s.drafts) == s.specBudget():
		need = n + len(s.drafts) + 1
	case s.req.Speculative.Draft > 0 && s.specBudget() > 0:
		need = n + len(s.drafts) + 1
	}
	if !s.kv.reserve(need) {
		switch {
		case s.prefilled:
			s.finish("length", nil)
		case s.direct == nil && e.kvBudget.used.Load() > s.kv.bytes():
			// Other requests hold the memory: wait for them at the next boundary.
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
}

// specBudget is how many drafts the sequence may still propose: fewer near its token or
// context limit, so drafting never runs past what can be emitted.
func (s *sequence) specBudget() int {
	left := min(s.req.MaxTokens-s.generated, s.e.ctxLen-len(s.tokens))
	return max(0, min(s.req.Speculative.Draft, left-1))
}

// iterate advances every sequence in seqs by one token boundary.
func (b *batcher) iterate(seqs []*sequence) {
	e, r := b.e, b.r
	c := e.m.Config
	R, H, V := e.steps, c.HiddenSize, c.VocabSize
	b.rows = b.rows[:0]
	for _, s := range seqs {
		b.plan(s)
	}
	nRows := len(b.rows)
	b.active = grow(b.active, nRows)
	b.ids = grow(b.ids, nRows)
	nWant := 0
	for i := range b.rows {
		b.active[i] = i
		b.ids[i] = b.rows[i].id
		if b.rows[i].wantLogits {
			b.rows[i].hIdx = nWant
			nWant++
		}
	}
	b.h = grow(b.h, nRows*H)
	b.exitH = grow(b.exitH, nWant*H)
	r.embed(b.h, b.ids)
	var prefillSteps, decodeSteps uint64
	for t := 0; t < R && len(b.active) > 0; t++ {
		start := time.Now()
		nA := len(b.active)
		b.fwd = grow(b.fwd, nA)
		for i, ri := range b.active {
			b.fwd[i] = fwdRow{kv: b.rows[ri].seq.kv, pos: b.rows[ri].pos}
		}
		h := b.h[:nA*H]
		r.step(t, b.fwd, h)
		b.probeSteps(t, h)
		keep := 0
		for i, ri := range b.active {
			row := &b.rows[ri]
			hi := h[i*H : (i+1)*H]
			row.ran = t + 1
			if row.kind == rowPrefill {
				prefillSteps++
			} else {
				decodeSteps++
			}
			b.gate(row, t, hi)
			if row.chosen == t && row.wantLogits {
				copy(b.exitH[row.hIdx*H:(row.hIdx+1)*H], hi)
			}
			if row.chosen == t && row.probe && e.opts.Mode == Fast && e.opts.KVPolicy == KVLast {
				b.saveExitKV(row, t)
			}
			if row.chosen >= 0 && !row.runAll {
				// Leaves the batch: later steps read this step's keys and values (KVFull).
				if row.kind != rowDraft {
					row.seq.kv.copyStep(row.pos, t, R)
				}
				continue
			}
			if i != keep {
				copy(h[keep*H:(keep+1)*H], hi)
			}
			b.active[keep] = ri
			keep++
		}
		b.active = b.active[:keep]
		e.observeStep(time.Since(start))
	}
	var logits []float32 // [nWant, vocab]; none in a prefill chunk that is not the last
	if nWant > 0 {
		logits = r.lmHead(b.exitH[:nWant*H], nWant)
	}
	e.count(func(cn *Counters) {
		cn.Iterations++
		cn.BatchRows += uint64(nRows)
		cn.PrefillLoopSteps += prefillSteps
		cn.LoopSteps += decodeSteps
	})
	b.finish(logits[:nWant*V])
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

// probeSteps records, for probe rows, the argmax of every step's logits (one batched lm_head).
func (b *batcher) probeSteps(t int, h []float32) {
	H := b.e.m.Config.HiddenSize
	b.pidx = b.pidx[:0]
	for i, ri := range b.active {
		if b.rows[ri].probe {
			b.pidx = append(b.pidx, i)
		}
	}
	if len(b.pidx) == 0 {
		return
	}
	b.probeH = grow(b.probeH, len(b.pidx)*H)
	for j, i := range b.pidx {
		copy(b.probeH[j*H:(j+1)*H], h[i*H:(i+1)*H])
	}
	logits := b.r.lmHead(b.probeH, len(b.pidx))
	V := b.e.m.Config.VocabSize
	for j, i := range b.pidx {
		row := &b.rows[b.active[i]]
		row.stepArg = append(row.stepArg[:min(len(row.stepArg), t)], argmax(logits[j*V:(j+1)*V]))
	}
}

// saveExitKV keeps a KVLast probe's exit-step keys and values, which its extra steps overwrite.
func (b *batcher) saveExitKV(row *rowState, t int) {
	kv := row.seq.kv
	d := kv.kvDim
	row.saveK = grow(row.saveK, kv.layers*d)
	row.saveV = grow(row.saveV, kv.layers*d)
	for l := 0; l < kv.layers; l++ {
		kv.get(kv.slot(t, l), row.pos, row.saveK[l*d:(l+1)*d], row.saveV[l*d:(l+1)*d])
	}
}

// finish turns each sequence's exit logits into tokens and moves its state on.
func (b *batcher) finish(logits []float32) {
	e := b.e
	c := e.m.Config
	R, V := e.steps, c.VocabSize
	for i := 0; i < len(b.rows); {
		s := b.rows[i].seq
		j := i
		for j < len(b.rows) && b.rows[j].seq == s {
			j++
		}
		rows := b.rows[i:j]
		i = j
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
			if last.wantLogits {
				s.prefilled = true
				s.emit(b.token(last, s.smp.pick(lg(last)), last.ran))
			}
		case rowDecode:
			e.count(func(cn *Counters) {
				cn.DecodeTokens++
				cn.DecodeDepth += uint64(last.chosen + 1)
			})
			s.emit(b.token(last, s.smp.pick(lg(last)), last.ran))
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
				tok := b.token(&rows[k], v, 0)
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

// token builds the Token a row yields.
func (b *batcher) token(row *rowState, id, steps int) Token {
	t := Token{ID: id, Depth: row.chosen + 1, Cum: row.cums, Probe: row.probe, Steps: steps}
	if row.probe {
		full := row.stepArg[len(row.stepArg)-1]
		t.Agree = make([]bool, len(row.stepArg))
		for i, a := range row.stepArg {
			t.Agree[i] = a == full
		}
	}
	return t
}
