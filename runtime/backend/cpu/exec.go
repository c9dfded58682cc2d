package cpu

import (
	"fmt"
	"math"

	"github.com/loopserve/loopserve/runtime/backend/host"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// Load implements engine.Backend: the weights stay where the model maps them (the kernels read
// bf16 in place), so loading costs nothing but the RoPE frequencies.
func (b *Backend) Load(m *model.Model, o engine.LoadOptions) (engine.Executor, error) {
	if m == nil {
		return nil, fmt.Errorf("cpu backend: no model")
	}
	c := m.Config
	hd := c.HeadDimOrDefault()
	if hd <= 0 || hd%2 != 0 || c.NumKeyValueHeads <= 0 || c.NumAttentionHeads%c.NumKeyValueHeads != 0 {
		return nil, fmt.Errorf("cpu backend: %d heads of %d over %d key/value heads", c.NumAttentionHeads, hd, c.NumKeyValueHeads)
	}
	x := &executor{b: b, m: m, c: c, bf16: o.KVBF16, hd: hd, eps: float32(c.RMSNormEps), scale: float32(1 / math.Sqrt(float64(hd)))}
	// inv_freq as Hugging Face computes it: 1 / theta^(2i/d) in float32.
	x.invFreq = make([]float32, hd/2)
	for i := range x.invFreq {
		x.invFreq[i] = float32(1 / math.Pow(c.RopeTheta, float64(2*i)/float64(hd)))
	}
	var layer int64
	for _, w := range []*model.Matrix{&m.Layers[0].Q, &m.Layers[0].K, &m.Layers[0].V, &m.Layers[0].O, &m.Layers[0].Gate, &m.Layers[0].Up, &m.Layers[0].Down} {
		layer += int64(w.Rows) * int64(w.Cols)
	}
	x.stepMACs = layer * int64(len(m.Layers))
	return x, nil
}

// executor is one model on the CPU backend. Read-only after Load: safe for concurrent use.
type executor struct {
	b        *Backend
	m        *model.Model
	c        model.Config
	bf16     bool // keys and values in bfloat16
	hd       int
	eps      float32
	scale    float32
	invFreq  []float32 // [headDim/2]
	stepMACs int64     // multiply-adds of one row's loop step (the layers)
}

func (x *executor) NewStream() (engine.Stream, error) {
	s := &stream{x: x, caches: host.NewCaches(x.c.NumHiddenLayers, x.c.KVDim(), x.bf16), states: host.States{H: x.c.HiddenSize}}
	if x.b.poisonKV {
		s.caches.Poison()
	}
	s.wk = make([]worker, x.b.threads)
	s.phases = [...]func(int, int){
		func(w, _ int) { s.attention(w) },
		func(w, _ int) { s.project(w) },
		func(w, _ int) { s.mlpIn(w) },
		func(w, _ int) { s.mlpOut(w) },
		func(w, _ int) { s.final(w) },
	}
	return s, nil
}

func (x *executor) KVBlock() int { return host.Block }

func (x *executor) KVBlockBytes(slots int) int64 { return host.BlockBytes(x.c, slots, x.bf16) }

func (x *executor) Close() error { return nil }

// acts are one product's activations [rows, cols] in the forms its kernels read: as computed
// (f), pair-permuted for the exact pair tiles (p), or rounded to bfloat16 (b).
type acts struct {
	f []float32
	p []float32
	b []uint16
}

// stream runs a loop step as four phases per layer and one after the last, each one hand-off
// to the backend's workers and one wait:
//
//	attention: norm, q/k/v for the worker's key/value heads, RoPE, cache write, attention
//	project:   the output projection, split by output columns
//	mlpIn:     residual + norm, gate and up for the worker's columns, SiLU·up
//	mlpOut:    the down projection, split by output columns
//	final:     (after the last layer) residual, final norm, gate, exit, LM head by vocab columns
//
// Every worker keeps its own copy of the residual stream and recomputes the norms (cheap:
// O(rows × hidden)), so the residual adds and norms between the products need no hand-off.
// Scratch grows to the largest batch seen and is reused: steady-state steps allocate nothing.
type stream struct {
	x      *executor
	caches *host.Caches
	states host.States
	wk     []worker
	phases [5]func(int, int)

	// The step in progress.
	bt         *engine.Batch
	n          int
	t          int        // workers
	attAligned bool       // see aligned
	li         int        // layer
	rope       *ropeTable // rotations of the batch's positions, or nil
	ta         int        // workers of the attention phase (at most the key/value heads)
	nh         int        // rows whose head runs
	headN      []int      // [nh] their rows
	pos        []int      // [rows] positions
	gates      []float32  // [rows] gate logits
	exits      []engine.ExitState
	tops       []engine.Logprob

	capRows int
	in      []float32 // [rows, hidden] the states entering the step
	q       []float32 // [rows, qDim]
	k, v    []float32 // [rows, kvDim]
	att     acts      // [rows, qDim]
	o       []float32 // [rows, hidden]
	g, u    []float32 // [rows, inter]
	gu      acts      // [rows, inter] silu(gate)·up
	d       []float32 // [rows, hidden]
	logits  []float32 // [head rows, vocab]
}

// worker is one goroutine's private scratch.
type worker struct {
	h      []float32 // [rows, hidden] its copy of the residual stream
	x      acts      // [rows, hidden] normed input of the current product
	head   acts      // [head rows, hidden]
	runs   []host.Run
	scores []float32
	argmax []int     // [head rows] over its vocabulary columns
	argval []float32 // [head rows]
}

func (s *stream) NewKV(slots int) (engine.KV, error)    { return s.caches.New(slots) }
func (s *stream) GrowKV(kv engine.KV, blocks int) error { return s.caches.Grow(kv, blocks) }
func (s *stream) FreeKV(kv engine.KV)                   { s.caches.Free(kv) }
func (s *stream) CopyKV(c []engine.KVCopy)              { s.caches.Copy(c) }
func (s *stream) State(i int, dst []float32)            { copy(dst, s.states.Row(i)) }
func (s *stream) Close() error                          { return nil }

func (s *stream) ensure(n int) {
	if n <= s.capRows {
		return
	}
	n = max(n, 2*s.capRows)
	c := s.x.c
	H, Q, KV, I := c.HiddenSize, c.QDim(), c.KVDim(), c.IntermediateSize
	s.capRows = n
	s.in = make([]float32, n*H)
	s.q, s.k, s.v = make([]float32, n*Q), make([]float32, n*KV), make([]float32, n*KV)
	s.att = newActs(n * Q)
	s.o, s.d = make([]float32, n*H), make([]float32, n*H)
	s.g, s.u = make([]float32, n*I), make([]float32, n*I)
	s.gu = acts{f: s.g, p: make([]float32, n*I), b: make([]uint16, n*I)}
	s.gates, s.exits, s.headN, s.pos = make([]float32, n), make([]engine.ExitState, n), make([]int, n), make([]int, n)
	for w := range s.wk {
		wk := &s.wk[w]
		wk.h = make([]float32, n*H)
		wk.x = newActs(n * H)
		wk.argmax, wk.argval = make([]int, n), make([]float32, n)
	}
}

func newActs(n int) acts {
	return acts{f: make([]float32, n), p: make([]float32, n), b: make([]uint16, n)}
}

// threads is how many workers a step of n rows uses: one per phaseWork multiply-adds of a
// phase, at most the backend's threads.
func (s *stream) threads(n int) int {
	per := int64(n) * s.x.stepMACs / int64(5*len(s.x.m.Layers))
	return int(max(1, min(int64(len(s.wk)), per/phaseWork)))
}

// phaseWork is the multiply-adds per worker and phase below which a step runs on fewer workers:
// each worker also recomputes the phase's norms and the hand-off costs microseconds, which
// small products do not repay (ouro-tiny-arith decodes faster on one thread at batch 1).
const phaseWork = 128 << 10

// run hands phase p to workers 1..t-1 and runs worker 0 on the calling goroutine.
func (s *stream) run(t, p int) {
	fn := s.phases[p]
	if t == 1 {
		fn(0, 0)
		return
	}
	s.x.b.pool.phase(t, fn)
}

// split returns worker w's share of [0, total) in whole grains, t workers in all.
func split(total, t, w, grain int) (lo, hi int) {
	units := (total + grain - 1) / grain
	lo, hi = units*w/t*grain, units*(w+1)/t*grain
	return min(lo, total), min(hi, total)
}

// Step implements engine.Stream.
func (s *stream) Step(bt *engine.Batch) error {
	x := s.x
	m, c := x.m, x.c
	n := len(bt.Rows)
	if n == 0 {
		return nil
	}
	H := c.HiddenSize
	for i, r := range bt.Rows {
		switch {
		case r.Token < 0 || r.Token >= c.VocabSize:
			return fmt.Errorf("row %d: token %d outside the vocabulary of %d", i, r.Token, c.VocabSize)
		case r.Step < 0 || r.Step >= c.TotalUTSteps:
			return fmt.Errorf("row %d: loop step %d of %d", i, r.Step, c.TotalUTSteps)
		case r.Pos < 0 || r.Pos >= s.caches.Positions(r.KV):
			return fmt.Errorf("row %d: position %d outside its cache of %d", i, r.Pos, s.caches.Positions(r.KV))
		case r.Head.Score && (r.Head.ScoreID < 0 || r.Head.ScoreID >= c.VocabSize):
			return fmt.Errorf("row %d: scores token %d outside the vocabulary", i, r.Head.ScoreID)
		}
	}
	s.ensure(n)
	s.bt, s.n = bt, n
	for i, r := range bt.Rows {
		if r.Step == 0 {
			m.Embed.Row(r.Token, s.states.Row(r.State))
		}
		copy(s.in[i*H:(i+1)*H], s.states.Row(r.State))
	}
	heads := 0
	for i, r := range bt.Rows {
		s.pos[i] = r.Pos
		if r.Head.Every || r.Head.AtExit {
			heads++
		}
	}
	s.logits = grow(s.logits, heads*c.VocabSize)
	s.rope = x.b.rotations(s.pos[:n], x.invFreq)
	t := s.threads(n)
	s.t, s.ta = t, min(t, c.NumKeyValueHeads)
	s.attAligned = s.aligned()
	for s.li = 0; s.li < len(m.Layers); s.li++ {
		s.run(t, 0)
		if !s.attAligned {
			s.prepare(&s.att, 0, n*c.QDim(), c.QDim())
		}
		s.run(t, 1)
		s.run(t, 2)
		s.run(t, 3)
	}
	s.run(t, 4)
	// Worker 0's copy of the residual stream is the new states; gates and exits are the same
	// in every worker.
	h := s.wk[0].h
	for i, r := range bt.Rows {
		copy(s.states.Row(r.State), h[i*H:(i+1)*H])
		bt.Out[i] = engine.RowOut{Gate: s.gates[i], Exit: s.exits[i]}
	}
	s.heads(t)
	return nil
}

// prologue brings worker w's residual stream to the input of layer li's attention (or of the
// final norm when li is the layer count): the states at layer 0, else the previous layer's
// down projection (in s.d) normed and added.
//
//go:norace
func (s *stream) prologue(wk *worker) {
	m, H, n := s.x.m, s.x.c.HiddenSize, s.n
	h := wk.h[:n*H]
	if s.li == 0 {
		copy(h, s.in[:n*H])
		return
	}
	addNormed(h, s.d[:n*H], m.Layers[s.li-1].PostAttnNorm2, s.x.eps)
}

// addNormed adds rmsnorm(src) (row by row, d = len(weight)) to dst, with the values rmsRow
// would compute.
//
//go:norace
func addNormed(dst, src, weight []float32, eps float32) {
	d := len(weight)
	for i := 0; i < len(dst); i += d {
		row := src[i : i+d]
		scaleRow(dst[i:i+d], row, weight, rmsInv(row, eps), true)
	}
}

// norm writes rmsnorm(h) into a's float32 form and prepares the form the products of width
// cols read.
//
//go:norace
func (s *stream) norm(a *acts, h []float32, weight []float32, rows int) {
	H := len(weight)
	for i := 0; i < rows; i++ {
		rmsRow(a.f[i*H:(i+1)*H], h[i*H:(i+1)*H], weight, s.x.eps)
	}
	s.prepare(a, 0, rows*H, H)
}

// prepare converts a.f[lo:hi] (whole 32-column chunks of rows of width cols, or whole rows)
// into the form the products read: bfloat16 (BF16 numerics) or pair-permuted (the exact pair
// tiles, when they take matrices of width cols).
//
//go:norace
func (s *stream) prepare(a *acts, lo, hi, cols int) {
	switch {
	case s.x.b.numerics == BF16:
		toBF16(a.b[lo:hi], a.f[lo:hi])
	case haveAVX512 && cols%32 == 0:
		permutePairs(a.p[lo:hi], a.f[lo:hi])
	}
}

// product computes out[i*w.Rows + r] for rows [lo, hi) of w and activation rows i < n.
//
//go:norace
func (s *stream) product(out []float32, a *acts, n int, w *model.Matrix, lo, hi int) {
	switch {
	case s.x.b.numerics == BF16:
		dpRows(out, w.Rows, a.b, n, w, lo, hi)
	case pairOK(w):
		pairRows(out, w.Rows, a.p, n, w, lo, hi)
	default:
		matRows(out, a.f, n, w, lo, hi, w.Rows, w.Cols)
	}
}

// attention is phase 0: worker w's key/value heads of layer li, for every row.
//
//go:norace
func (s *stream) attention(w int) {
	x, wk, n := s.x, &s.wk[w], s.n
	c := x.c
	L := &x.m.Layers[s.li]
	s.prologue(wk)
	s.norm(&wk.x, wk.h, L.InputNorm, n)
	if w >= s.ta {
		return
	}
	hd, Q, KV := x.hd, c.QDim(), c.KVDim()
	group := c.NumAttentionHeads / c.NumKeyValueHeads
	g0, g1 := split(c.NumKeyValueHeads, s.ta, w, 1)
	qlo, qhi, klo, khi := g0*group*hd, g1*group*hd, g0*hd, g1*hd
	s.product(s.q, &wk.x, n, &L.Q, qlo, qhi)
	s.product(s.k, &wk.x, n, &L.K, klo, khi)
	s.product(s.v, &wk.x, n, &L.V, klo, khi)
	maxN := 0
	for i, r := range s.bt.Rows {
		q, k := s.q[i*Q:(i+1)*Q], s.k[i*KV:(i+1)*KV]
		ropeHeads(q, g0*group, g1*group, hd, r.Pos, s.rope, x.invFreq)
		ropeHeads(k, g0, g1, hd, r.Pos, s.rope, x.invFreq)
		s.caches.PutCols(r.KV, r.Slot, s.li, r.Pos, klo, k[klo:khi], s.v[i*KV+klo:i*KV+khi])
		maxN = max(maxN, r.Pos+1)
	}
	wk.scores = grow(wk.scores, maxN+15)
	for i, r := range s.bt.Rows {
		wk.runs = s.caches.Runs(wk.runs[:0], r.KV, r.Slot, s.li, r.Pos+1)
		job := host.AttnJob{Q: s.q[i*Q : (i+1)*Q], Runs: wk.runs, Out: s.att.f[i*Q : (i+1)*Q]}
		for h := g0 * group; h < g1*group; h++ {
			attnHead(&job, h, group, KV, hd, x.scale, wk.scores)
		}
		if s.attAligned {
			s.prepare(&s.att, i*Q+qlo, i*Q+qhi, Q)
		}
	}
}

// project is phase 1: the attention output projection, split by output columns.
//
//go:norace
func (s *stream) project(w int) {
	lo, hi := split(s.x.c.HiddenSize, s.t, w, 16)
	s.product(s.o, &s.att, s.n, &s.x.m.Layers[s.li].O, lo, hi)
}

// aligned reports whether every attention worker's query heads are whole 32-column chunks, so
// each can prepare its own columns of att for the products.
func (s *stream) aligned() bool {
	c := s.x.c
	hd, group := s.x.hd, c.NumAttentionHeads/c.NumKeyValueHeads
	for w := 0; w <= s.ta; w++ {
		if g0, _ := split(c.NumKeyValueHeads, s.ta, w, 1); g0*group*hd%32 != 0 {
			return false
		}
	}
	return true
}

// mlpIn is phase 2: residual and norm, then gate and up for worker w's intermediate columns,
// and silu(gate)·up.
//
//go:norace
func (s *stream) mlpIn(w int) {
	x, wk, n := s.x, &s.wk[w], s.n
	c := x.c
	H, I := c.HiddenSize, c.IntermediateSize
	L := &x.m.Layers[s.li]
	addNormed(wk.h[:n*H], s.o[:n*H], L.InputNorm2, x.eps)
	s.norm(&wk.x, wk.h, L.PostAttnNorm, n)
	lo, hi := split(I, s.t, w, 32)
	s.product(s.g, &wk.x, n, &L.Gate, lo, hi)
	s.product(s.u, &wk.x, n, &L.Up, lo, hi)
	for i := 0; i < n; i++ {
		siluMul(s.g[i*I+lo:i*I+hi], s.u[i*I+lo:i*I+hi])
		s.prepare(&s.gu, i*I+lo, i*I+hi, I)
	}
}

// mlpOut is phase 3: the down projection, split by output columns.
//
//go:norace
func (s *stream) mlpOut(w int) {
	lo, hi := split(s.x.c.HiddenSize, s.t, w, 16)
	s.product(s.d, &s.gu, s.n, &s.x.m.Layers[s.li].Down, lo, hi)
}

// final is phase 4: the last residual, the final norm, gates and exits (every worker the
// same), then worker w's vocabulary columns of the LM head for the rows that ask for it.
//
//go:norace
func (s *stream) final(w int) {
	x, wk, n := s.x, &s.wk[w], s.n
	m, c := x.m, x.c
	H, V, R := c.HiddenSize, c.VocabSize, c.TotalUTSteps
	s.prologue(wk) // s.li is the layer count: the last layer's down projection
	h := wk.h[:n*H]
	for i := 0; i < n; i++ {
		rmsRow(h[i*H:(i+1)*H], h[i*H:(i+1)*H], m.Norm, x.eps)
	}
	nh := 0
	for i, r := range s.bt.Rows {
		gate := gateLogit(m, h[i*H:(i+1)*H])
		ex := r.Exit.Advance(r.ExitIn, r.Step, R, gate)
		if r.Head.Every || (r.Head.AtExit && r.ExitIn.Chosen < 0 && ex.Chosen == r.Step) {
			if w == 0 {
				s.headN[nh] = i
			}
			copy(wk.headRow(nh, H), h[i*H:(i+1)*H])
			nh++
		}
		if w == 0 {
			s.gates[i], s.exits[i] = gate, ex
		}
	}
	if w == 0 {
		s.nh = nh
	}
	if nh == 0 {
		return
	}
	s.prepare(&wk.head, 0, nh*H, H)
	lo, hi := split(V, s.t, w, 16)
	s.product(s.logits, &wk.head, nh, &m.LMHead, lo, hi) // grown by Step for every row that may ask
	for j := 0; j < nh; j++ {
		lg := s.logits[j*V+lo : j*V+hi]
		best := 0
		for k, v := range lg {
			if v > lg[best] {
				best = k
			}
		}
		wk.argmax[j], wk.argval[j] = lo+best, lg[best]
	}
}

// headRow returns row j of the worker's head activations [.., H], growing them.
func (wk *worker) headRow(j, H int) []float32 {
	if need := (j + 1) * H; need > len(wk.head.f) {
		n := max(need, 2*len(wk.head.f))
		f := make([]float32, n)
		copy(f, wk.head.f)
		wk.head = acts{f: f, p: make([]float32, n), b: make([]uint16, n)}
	}
	return wk.head.f[j*H : (j+1)*H]
}

// heads fills the head results of the step's head rows from the logits and the workers'
// partial argmaxes (the lowest index of the largest logit: workers own increasing columns).
func (s *stream) heads(t int) {
	V := s.x.c.VocabSize
	s.tops = s.tops[:0]
	for j := 0; j < s.nh; j++ {
		i := s.headN[j]
		r, out := &s.bt.Rows[i], &s.bt.Out[i]
		best, val := s.wk[0].argmax[j], s.wk[0].argval[j]
		for w := 1; w < t; w++ {
			if s.wk[w].argval[j] > val {
				best, val = s.wk[w].argmax[j], s.wk[w].argval[j]
			}
		}
		lg := s.logits[j*V : (j+1)*V]
		out.Ran, out.Argmax = true, best
		if r.Head.Logprobs || r.Head.Top > 0 || r.Head.Score {
			lse := engine.LogSumExp(lg)
			out.Logprob = float32(float64(lg[best]) - lse)
			if r.Head.Score {
				out.Score = float32(float64(lg[r.Head.ScoreID]) - lse)
			}
			if r.Head.Top > 0 {
				at := len(s.tops)
				s.tops = engine.TopLogprobs(s.tops, lg, r.Head.Top, lse)
				out.Top = s.tops[at:len(s.tops):len(s.tops)]
			}
		}
		if r.Head.Logits {
			out.Logits = lg
		}
	}
}

// gateLogit is w·h + b for one normed row (float64 sums, as the reference).
//
//go:norace
func gateLogit(m *model.Model, h []float32) float32 {
	var s float64
	for j, w := range m.ExitW {
		s += float64(w) * float64(h[j])
	}
	return float32(s) + m.ExitB
}

func grow[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n, max(n, 2*cap(s)))
	}
	return s[:n]
}
