package engine

import (
	"math"

	"github.com/loopserve/loopserve/runtime/model"
)

// fwdRow is one token being pushed through a loop step: its sequence's cache, its position
// and the loop step it runs (rows of one batch may be at different steps: the steps share
// their weights).
type fwdRow struct {
	kv  *kvCache
	pos int
	t   int
}

// runner owns the scratch buffers for forward passes. Buffers grow to the largest batch seen
// and are reused, so steady-state decoding allocates nothing. Not safe for concurrent use.
type runner struct {
	m       *model.Model
	be      Backend
	multi   MultiMatMuler // nil when the backend has no fused path
	c       model.Config
	hd      int
	invFreq []float32 // [headDim/2]
	scale   float32
	eps     float32

	capRows int
	x       []float32   // [rows, hidden] normed input / scratch
	q       []float32   // [rows, qDim]
	k, v    []float32   // [rows, kvDim]
	att     []float32   // [rows, qDim]
	o       []float32   // [rows, hidden]
	gate    []float32   // [rows, inter]
	up      []float32   // [rows, inter]
	pos     []int       // [rows]
	jobs    []AttnJob   // [rows]
	logits  []float32   // [rows, vocab]
	outs3   [][]float32 // reused argument slices for MultiMatMul, so a step allocates nothing
	outs2   [][]float32
	qkv, gu [][]*model.Matrix // per layer: {Q, K, V} and {Gate, Up}
}

func newRunner(m *model.Model, be Backend) *runner {
	c := m.Config
	hd := c.HeadDimOrDefault()
	r := &runner{m: m, be: be, c: c, hd: hd, scale: float32(1 / math.Sqrt(float64(hd))), eps: float32(c.RMSNormEps)}
	r.multi, _ = be.(MultiMatMuler)
	r.outs3, r.outs2 = make([][]float32, 3), make([][]float32, 2)
	for i := range m.Layers {
		L := &m.Layers[i]
		r.qkv = append(r.qkv, []*model.Matrix{&L.Q, &L.K, &L.V})
		r.gu = append(r.gu, []*model.Matrix{&L.Gate, &L.Up})
	}
	// inv_freq as Hugging Face computes it: 1 / theta^(2i/d) in float32.
	r.invFreq = make([]float32, hd/2)
	for i := range r.invFreq {
		r.invFreq[i] = float32(1 / math.Pow(c.RopeTheta, float64(2*i)/float64(hd)))
	}
	return r
}

func (r *runner) ensure(n int) {
	if n <= r.capRows {
		return
	}
	n = max(n, 2*r.capRows)
	c := r.c
	r.capRows = n
	r.x = make([]float32, n*c.HiddenSize)
	r.q = make([]float32, n*c.QDim())
	r.k = make([]float32, n*c.KVDim())
	r.v = make([]float32, n*c.KVDim())
	r.att = make([]float32, n*c.QDim())
	r.o = make([]float32, n*c.HiddenSize)
	r.gate = make([]float32, n*c.IntermediateSize)
	r.up = make([]float32, n*c.IntermediateSize)
	r.pos = make([]int, n)
	r.jobs = make([]AttnJob, n)
}

// embed writes the embeddings of ids into h[len(ids), hidden].
func (r *runner) embed(h []float32, ids []int) {
	H := r.c.HiddenSize
	for i, id := range ids {
		r.m.Embed.Row(id, h[i*H:(i+1)*H])
	}
}

// step runs one loop step (every layer, then the final norm) on h[len(rows), hidden] in place,
// each row at its own step t: it writes the row's keys and values at its position in its
// cache's (t, layer) slot and attends over positions [0, pos] of that slot. Rows of one
// sequence must be at one step, in position order, with the cache reserved up to the largest.
func (r *runner) step(rows []fwdRow, h []float32) {
	n := len(rows)
	r.ensure(n)
	c := r.c
	H, Q, KV, I := c.HiddenSize, c.QDim(), c.KVDim(), c.IntermediateSize
	x, q, k, v, att, o := r.x[:n*H], r.q[:n*Q], r.k[:n*KV], r.v[:n*KV], r.att[:n*Q], r.o[:n*H]
	g, u := r.gate[:n*I], r.up[:n*I]
	pos := r.pos[:n]
	for i, row := range rows {
		pos[i] = row.pos
	}
	for li := range r.m.Layers {
		L := &r.m.Layers[li]
		r.be.RMSNorm(x, h, n, L.InputNorm, r.eps)
		if r.multi != nil {
			r.outs3[0], r.outs3[1], r.outs3[2] = q, k, v
			r.multi.MultiMatMul(r.outs3, x, n, r.qkv[li])
		} else {
			r.be.MatMul(q, x, n, &L.Q)
			r.be.MatMul(k, x, n, &L.K)
			r.be.MatMul(v, x, n, &L.V)
		}
		r.be.RoPE(q, n, c.NumAttentionHeads, r.hd, pos, r.invFreq)
		r.be.RoPE(k, n, c.NumKeyValueHeads, r.hd, pos, r.invFreq)
		jobs := r.jobs[:n]
		for i, row := range rows {
			s := row.kv.slot(row.t, li)
			row.kv.put(s, row.pos, k[i*KV:(i+1)*KV], v[i*KV:(i+1)*KV])
			jobs[i] = row.kv.attnJob(s, row.pos+1, q[i*Q:(i+1)*Q], att[i*Q:(i+1)*Q])
		}
		r.be.Attention(jobs, c.NumAttentionHeads, c.NumKeyValueHeads, r.hd, r.scale)
		r.be.MatMul(o, att, n, &L.O)
		r.be.RMSNorm(o, o, n, L.InputNorm2, r.eps)
		add(h, o)
		r.be.RMSNorm(x, h, n, L.PostAttnNorm, r.eps)
		if r.multi != nil {
			r.outs2[0], r.outs2[1] = g, u
			r.multi.MultiMatMul(r.outs2, x, n, r.gu[li])
		} else {
			r.be.MatMul(g, x, n, &L.Gate)
			r.be.MatMul(u, x, n, &L.Up)
		}
		r.be.SiLUMul(g, u)
		r.be.MatMul(o, g, n, &L.Down)
		r.be.RMSNorm(o, o, n, L.PostAttnNorm2, r.eps)
		add(h, o)
	}
	r.be.RMSNorm(h, h, n, r.m.Norm, r.eps)
}

func add(dst, src []float32) {
	src = src[:len(dst)]
	for i := range dst {
		dst[i] += src[i]
	}
}

// gateLogit is w·h + b for one normed row.
func (r *runner) gateLogit(h []float32) float32 {
	var s float64
	for j, w := range r.m.ExitW {
		s += float64(w) * float64(h[j])
	}
	return float32(s) + r.m.ExitB
}

// lmHead computes logits[n, vocab] for h[n, hidden] into the runner's logits buffer.
func (r *runner) lmHead(h []float32, n int) []float32 {
	V := r.c.VocabSize
	if cap(r.logits) < n*V {
		r.logits = make([]float32, max(n, 2*cap(r.logits)/V)*V)
	}
	out := r.logits[:n*V]
	r.be.MatMul(out, h, n, &r.m.LMHead)
	return out
}

// exitPDF converts gate logits [R] of one token into its exit distribution p[R] and
// cumulative c[R]: p_t = λ_t Π_{j<t}(1−λ_j), the last step takes the rest.
func exitPDF(gates, p, c []float32) {
	R := len(gates)
	rest := float32(1)
	var cum float32
	for t := 0; t < R; t++ {
		if t == R-1 {
			p[t] = rest
		} else {
			lam := sigmoid(gates[t])
			p[t] = lam * rest
			rest *= 1 - lam
		}
		cum += p[t]
		if c != nil {
			c[t] = cum
		}
	}
}

func sigmoid(x float32) float32 { return float32(1 / (1 + math.Exp(-float64(x)))) }
