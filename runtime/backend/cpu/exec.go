package cpu

import (
	"fmt"
	"math"

	"github.com/loopserve/loopserve/runtime/backend/host"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// Load implements engine.Backend: the weights stay where the model maps them (bf16 kernels read
// them in place), so loading costs nothing but the RoPE frequencies.
func (b *Backend) Load(m *model.Model, o engine.LoadOptions) (engine.Executor, error) {
	if m == nil {
		return nil, fmt.Errorf("cpu backend: no model")
	}
	c := m.Config
	hd := c.HeadDimOrDefault()
	x := &executor{b: b, m: m, c: c, bf16: o.KVBF16, hd: hd, eps: float32(c.RMSNormEps), scale: float32(1 / math.Sqrt(float64(hd)))}
	// inv_freq as Hugging Face computes it: 1 / theta^(2i/d) in float32.
	x.invFreq = make([]float32, hd/2)
	for i := range x.invFreq {
		x.invFreq[i] = float32(1 / math.Pow(c.RopeTheta, float64(2*i)/float64(hd)))
	}
	for i := range m.Layers {
		L := &m.Layers[i]
		x.qkv = append(x.qkv, []*model.Matrix{&L.Q, &L.K, &L.V})
		x.gu = append(x.gu, []*model.Matrix{&L.Gate, &L.Up})
	}
	return x, nil
}

// executor is one model on the CPU backend. Read-only after Load: safe for concurrent use.
type executor struct {
	b       *Backend
	m       *model.Model
	c       model.Config
	bf16    bool
	hd      int
	eps     float32
	scale   float32
	invFreq []float32         // [headDim/2]
	qkv, gu [][]*model.Matrix // per layer: {Q, K, V} and {Gate, Up}
}

func (x *executor) NewStream() (engine.Stream, error) {
	return &stream{x: x, caches: host.NewCaches(x.c.NumHiddenLayers, x.c.KVDim(), x.bf16), states: host.States{H: x.c.HiddenSize},
		outs3: make([][]float32, 3), outs2: make([][]float32, 2)}, nil
}

func (x *executor) KVBlock() int { return host.Block }

func (x *executor) KVBlockBytes(slots int) int64 { return host.BlockBytes(x.c, slots, x.bf16) }

func (x *executor) Close() error { return nil }

// stream owns the scratch buffers of its steps; they grow to the largest batch seen and are
// reused, so steady-state decoding allocates nothing.
type stream struct {
	x      *executor
	caches *host.Caches
	states host.States

	capRows int
	h       []float32      // [rows, hidden] the rows' states
	xn      []float32      // [rows, hidden] normed input
	q       []float32      // [rows, qDim]
	k, v    []float32      // [rows, kvDim]
	att     []float32      // [rows, qDim]
	o       []float32      // [rows, hidden]
	gate    []float32      // [rows, inter]
	up      []float32      // [rows, inter]
	pos     []int          // [rows]
	jobs    []host.AttnJob // [rows]
	runs    []host.Run     // the jobs' runs, one layer at a time
	head    []int          // rows whose head runs
	headH   []float32      // [head rows, hidden]
	logits  []float32      // [head rows, vocab]
	tops    []engine.Logprob
	outs3   [][]float32
	outs2   [][]float32
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
	s.capRows = n
	s.h = make([]float32, n*c.HiddenSize)
	s.xn = make([]float32, n*c.HiddenSize)
	s.q = make([]float32, n*c.QDim())
	s.k = make([]float32, n*c.KVDim())
	s.v = make([]float32, n*c.KVDim())
	s.att = make([]float32, n*c.QDim())
	s.o = make([]float32, n*c.HiddenSize)
	s.gate = make([]float32, n*c.IntermediateSize)
	s.up = make([]float32, n*c.IntermediateSize)
	s.pos = make([]int, n)
	s.jobs = make([]host.AttnJob, n)
}

// Step implements engine.Stream.
func (s *stream) Step(bt *engine.Batch) error {
	x, be := s.x, s.x.b
	m, c := x.m, x.c
	n := len(bt.Rows)
	if n == 0 {
		return nil
	}
	s.ensure(n)
	H, Q, KV, I := c.HiddenSize, c.QDim(), c.KVDim(), c.IntermediateSize
	h, xn, q, k, v, att, o := s.h[:n*H], s.xn[:n*H], s.q[:n*Q], s.k[:n*KV], s.v[:n*KV], s.att[:n*Q], s.o[:n*H]
	g, u := s.gate[:n*I], s.up[:n*I]
	pos := s.pos[:n]
	for i, r := range bt.Rows {
		if r.Token < 0 || r.Token >= c.VocabSize {
			return fmt.Errorf("row %d: token %d outside the vocabulary of %d", i, r.Token, c.VocabSize)
		}
		if r.Step == 0 {
			m.Embed.Row(r.Token, s.states.Row(r.State))
		}
		copy(h[i*H:(i+1)*H], s.states.Row(r.State))
		pos[i] = r.Pos
	}
	for li := range m.Layers {
		L := &m.Layers[li]
		be.RMSNorm(xn, h, n, L.InputNorm, x.eps)
		s.outs3[0], s.outs3[1], s.outs3[2] = q, k, v
		be.MultiMatMul(s.outs3, xn, n, x.qkv[li])
		be.RoPE(q, n, c.NumAttentionHeads, x.hd, pos, x.invFreq)
		be.RoPE(k, n, c.NumKeyValueHeads, x.hd, pos, x.invFreq)
		for i, r := range bt.Rows {
			s.caches.Put(r.KV, r.Slot, li, r.Pos, k[i*KV:(i+1)*KV], v[i*KV:(i+1)*KV])
		}
		s.runs = s.runs[:0]
		for _, r := range bt.Rows {
			s.runs = s.caches.Runs(s.runs, r.KV, r.Slot, li, r.Pos+1)
		}
		jobs := s.jobs[:n]
		at := 0
		for i, r := range bt.Rows {
			nr := (r.Pos + host.Block) / host.Block
			jobs[i] = host.AttnJob{Q: q[i*Q : (i+1)*Q], Runs: s.runs[at : at+nr], Out: att[i*Q : (i+1)*Q]}
			at += nr
		}
		be.Attention(jobs, c.NumAttentionHeads, c.NumKeyValueHeads, x.hd, x.scale)
		be.MatMul(o, att, n, &L.O)
		be.RMSNorm(o, o, n, L.InputNorm2, x.eps)
		add(h, o)
		be.RMSNorm(xn, h, n, L.PostAttnNorm, x.eps)
		s.outs2[0], s.outs2[1] = g, u
		be.MultiMatMul(s.outs2, xn, n, x.gu[li])
		be.SiLUMul(g, u)
		be.MatMul(o, g, n, &L.Down)
		be.RMSNorm(o, o, n, L.PostAttnNorm2, x.eps)
		add(h, o)
	}
	be.RMSNorm(h, h, n, m.Norm, x.eps)
	s.finalize(bt, h)
	return nil
}

// finalize stores the rows' states, computes their gates and exits, and runs the LM head (one
// batched pass) for the rows that ask for it.
func (s *stream) finalize(bt *engine.Batch, h []float32) {
	x := s.x
	m, c := x.m, x.c
	H, V, R := c.HiddenSize, c.VocabSize, c.TotalUTSteps
	s.head = s.head[:0]
	for i, r := range bt.Rows {
		hi := h[i*H : (i+1)*H]
		copy(s.states.Row(r.State), hi)
		gate := gateLogit(m, hi)
		out := engine.RowOut{Gate: gate, Exit: r.Exit.Advance(r.ExitIn, r.Step, R, gate)}
		decided := r.ExitIn.Chosen < 0 && out.Exit.Chosen == r.Step
		if r.Head.Every || (r.Head.AtExit && decided) {
			s.head = append(s.head, i)
		}
		bt.Out[i] = out
	}
	if len(s.head) == 0 {
		return
	}
	nh := len(s.head)
	s.headH = grow(s.headH, nh*H)
	for j, i := range s.head {
		copy(s.headH[j*H:(j+1)*H], h[i*H:(i+1)*H])
	}
	s.logits = grow(s.logits, nh*V)
	x.b.MatMul(s.logits, s.headH, nh, &m.LMHead)
	s.tops = s.tops[:0]
	for j, i := range s.head {
		r, out := &bt.Rows[i], &bt.Out[i]
		lg := s.logits[j*V : (j+1)*V]
		lse := engine.LogSumExp(lg)
		out.Ran = true
		out.Argmax = engine.Argmax(lg)
		out.Logprob = float32(float64(lg[out.Argmax]) - lse)
		if r.Head.Score {
			out.Score = float32(float64(lg[r.Head.ScoreID]) - lse)
		}
		if r.Head.Top > 0 {
			at := len(s.tops)
			s.tops = engine.TopLogprobs(s.tops, lg, r.Head.Top, lse)
			out.Top = s.tops[at:len(s.tops):len(s.tops)]
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

//go:norace
func add(dst, src []float32) {
	src = src[:len(dst)]
	for i := range dst {
		dst[i] += src[i]
	}
}

func grow[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n, max(n, 2*cap(s)))
	}
	return s[:n]
}
