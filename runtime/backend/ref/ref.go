// Package ref is the reference backend: plain single-threaded loops with float64
// accumulation, written for obviousness, not speed. It is the oracle the optimised backends
// are tested against, kernel by kernel and step by step.
package ref

import (
	"fmt"
	"math"

	"github.com/loopserve/loopserve/runtime/backend/host"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// Backend is the reference backend; its methods are also the reference kernels. The zero
// value is ready to use and safe for concurrent use.
type Backend struct{}

var _ engine.Backend = Backend{}

// MatMul computes out[n, w.Rows] = x[n, w.Cols] · wᵀ.
func (Backend) MatMul(out, x []float32, n int, w *model.Matrix) {
	row := make([]float32, w.Cols)
	for r := 0; r < w.Rows; r++ {
		w.Row(r, row)
		for i := 0; i < n; i++ {
			var s float64
			for j, v := range row {
				s += float64(v) * float64(x[i*w.Cols+j])
			}
			out[i*w.Rows+r] = float32(s)
		}
	}
}

// RMSNorm computes out[n, d] = x / sqrt(mean(x²) + eps) · weight, d = len(weight); out may
// alias x.
func (Backend) RMSNorm(out, x []float32, n int, weight []float32, eps float32) {
	d := len(weight)
	for i := 0; i < n; i++ {
		var ss float64
		for _, v := range x[i*d : (i+1)*d] {
			ss += float64(v) * float64(v)
		}
		inv := 1 / math.Sqrt(ss/float64(d)+float64(eps))
		for j := 0; j < d; j++ {
			out[i*d+j] = float32(float64(weight[j]) * float64(x[i*d+j]) * inv)
		}
	}
}

// RoPE rotates x[n, heads·headDim] in place at positions pos[n] (rotate-half convention),
// with invFreq[headDim/2] the per-pair frequencies.
func (Backend) RoPE(x []float32, n, heads, headDim int, pos []int, invFreq []float32) {
	half := headDim / 2
	for i := 0; i < n; i++ {
		for h := 0; h < heads; h++ {
			v := x[(i*heads+h)*headDim : (i*heads+h+1)*headDim]
			for k := 0; k < half; k++ {
				// The angle is a float32 product, as in the Hugging Face implementation.
				ang := float64(float32(pos[i]) * invFreq[k])
				c, s := math.Cos(ang), math.Sin(ang)
				a, b := float64(v[k]), float64(v[k+half])
				v[k] = float32(a*c - b*s)
				v[k+half] = float32(b*c + a*s)
			}
		}
	}
}

// SiLUMul computes gate[i] = silu(gate[i]) · up[i].
func (Backend) SiLUMul(gate, up []float32) {
	for i, g := range gate {
		gate[i] = float32(float64(g) / (1 + math.Exp(-float64(g))) * float64(up[i]))
	}
}

// Attention computes causal grouped-query attention for each job over its runs.
func (Backend) Attention(jobs []host.AttnJob, heads, kvHeads, headDim int, scale float32) {
	kvDim := kvHeads * headDim
	for _, j := range jobs {
		// Gather the runs, widening bfloat16 keys and values; the arithmetic below is the oracle's.
		var K, V []float64
		for _, r := range j.Runs {
			for i := 0; i < r.N*kvDim; i++ {
				if r.K16 != nil {
					K, V = append(K, float64(model.BF16ToF32(r.K16[i]))), append(V, float64(model.BF16ToF32(r.V16[i])))
				} else {
					K, V = append(K, float64(r.K[i])), append(V, float64(r.V[i]))
				}
			}
		}
		n := len(K) / kvDim
		for h := 0; h < heads; h++ {
			kh := h / (heads / kvHeads)
			sc := make([]float64, n)
			mx := math.Inf(-1)
			for p := 0; p < n; p++ {
				var s float64
				for d := 0; d < headDim; d++ {
					s += float64(j.Q[h*headDim+d]) * K[p*kvDim+kh*headDim+d]
				}
				sc[p] = s * float64(scale)
				mx = math.Max(mx, sc[p])
			}
			var sum float64
			for p := range sc {
				sc[p] = math.Exp(sc[p] - mx)
				sum += sc[p]
			}
			for d := 0; d < headDim; d++ {
				var o float64
				for p := range sc {
					o += sc[p] / sum * V[p*kvDim+kh*headDim+d]
				}
				j.Out[h*headDim+d] = float32(o)
			}
		}
	}
}

// Load implements engine.Backend: the executor reads m's weights in place.
func (Backend) Load(m *model.Model, o engine.LoadOptions) (engine.Executor, error) {
	if m == nil {
		return nil, fmt.Errorf("reference backend: no model")
	}
	return &executor{m: m, bf16: o.KVBF16}, nil
}

type executor struct {
	m    *model.Model
	bf16 bool
}

func (x *executor) NewStream() (engine.Stream, error) {
	c := x.m.Config
	hd := c.HeadDimOrDefault()
	s := &stream{m: x.m, caches: host.NewCaches(c.NumHiddenLayers, c.KVDim(), x.bf16), states: host.States{H: c.HiddenSize},
		hd: hd, eps: float32(c.RMSNormEps), scale: float32(1 / math.Sqrt(float64(hd)))}
	s.invFreq = make([]float32, hd/2)
	for i := range s.invFreq {
		s.invFreq[i] = float32(1 / math.Pow(c.RopeTheta, float64(2*i)/float64(hd)))
	}
	return s, nil
}

func (x *executor) KVBlock() int { return host.Block }

func (x *executor) KVBlockBytes(slots int) int64 { return host.BlockBytes(x.m.Config, slots, x.bf16) }

func (x *executor) Close() error { return nil }

// stream runs each kernel over the whole batch, one after the other.
type stream struct {
	m       *model.Model
	caches  *host.Caches
	states  host.States
	hd      int
	eps     float32
	scale   float32
	invFreq []float32
}

func (s *stream) NewKV(slots int) (engine.KV, error)    { return s.caches.New(slots) }
func (s *stream) GrowKV(kv engine.KV, blocks int) error { return s.caches.Grow(kv, blocks) }
func (s *stream) FreeKV(kv engine.KV)                   { s.caches.Free(kv) }
func (s *stream) CopyKV(c []engine.KVCopy)              { s.caches.Copy(c) }
func (s *stream) State(i int, dst []float32)            { copy(dst, s.states.Row(i)) }
func (s *stream) Close() error                          { return nil }

func (s *stream) Step(b *engine.Batch) error {
	var ref Backend
	m, c := s.m, s.m.Config
	n := len(b.Rows)
	H, Q, KV, I, V := c.HiddenSize, c.QDim(), c.KVDim(), c.IntermediateSize, c.VocabSize
	h := make([]float32, n*H) // [n, hidden]
	pos := make([]int, n)
	for i, r := range b.Rows {
		if r.Step == 0 {
			m.Embed.Row(r.Token, s.states.Row(r.State))
		}
		copy(h[i*H:(i+1)*H], s.states.Row(r.State))
		pos[i] = r.Pos
	}
	x, q, k, v := make([]float32, n*H), make([]float32, n*Q), make([]float32, n*KV), make([]float32, n*KV)
	att, o, g, u := make([]float32, n*Q), make([]float32, n*H), make([]float32, n*I), make([]float32, n*I)
	jobs := make([]host.AttnJob, n)
	for li := range m.Layers {
		L := &m.Layers[li]
		ref.RMSNorm(x, h, n, L.InputNorm, s.eps)
		ref.MatMul(q, x, n, &L.Q)
		ref.MatMul(k, x, n, &L.K)
		ref.MatMul(v, x, n, &L.V)
		ref.RoPE(q, n, c.NumAttentionHeads, s.hd, pos, s.invFreq)
		ref.RoPE(k, n, c.NumKeyValueHeads, s.hd, pos, s.invFreq)
		for i, r := range b.Rows {
			s.caches.Put(r.KV, r.Slot, li, r.Pos, k[i*KV:(i+1)*KV], v[i*KV:(i+1)*KV])
		}
		for i, r := range b.Rows {
			jobs[i] = host.AttnJob{Q: q[i*Q : (i+1)*Q], Runs: s.caches.Runs(nil, r.KV, r.Slot, li, r.Pos+1), Out: att[i*Q : (i+1)*Q]}
		}
		ref.Attention(jobs, c.NumAttentionHeads, c.NumKeyValueHeads, s.hd, s.scale)
		ref.MatMul(o, att, n, &L.O)
		ref.RMSNorm(o, o, n, L.InputNorm2, s.eps)
		addTo(h, o)
		ref.RMSNorm(x, h, n, L.PostAttnNorm, s.eps)
		ref.MatMul(g, x, n, &L.Gate)
		ref.MatMul(u, x, n, &L.Up)
		ref.SiLUMul(g, u)
		ref.MatMul(o, g, n, &L.Down)
		ref.RMSNorm(o, o, n, L.PostAttnNorm2, s.eps)
		addTo(h, o)
	}
	ref.RMSNorm(h, h, n, m.Norm, s.eps)
	R := c.TotalUTSteps
	for i, r := range b.Rows {
		hi := h[i*H : (i+1)*H]
		copy(s.states.Row(r.State), hi)
		var dot float64
		for j, w := range m.ExitW {
			dot += float64(w) * float64(hi[j])
		}
		out := engine.RowOut{Gate: float32(dot) + m.ExitB}
		out.Exit = r.Exit.Advance(r.ExitIn, r.Step, R, out.Gate)
		decided := r.ExitIn.Chosen < 0 && out.Exit.Chosen == r.Step
		if r.Head.Every || (r.Head.AtExit && decided) {
			logits := make([]float32, V)
			ref.MatMul(logits, hi, 1, &m.LMHead)
			lse := engine.LogSumExp(logits)
			out.Ran = true
			out.Argmax = engine.Argmax(logits)
			out.Logprob = float32(float64(logits[out.Argmax]) - lse)
			if r.Head.Score {
				out.Score = float32(float64(logits[r.Head.ScoreID]) - lse)
			}
			if r.Head.Top > 0 {
				out.Top = engine.TopLogprobs(nil, logits, r.Head.Top, lse)
			}
			if r.Head.Logits {
				out.Logits = logits
			}
		}
		b.Out[i] = out
	}
	return nil
}

func addTo(dst, src []float32) {
	for i := range dst {
		dst[i] += src[i]
	}
}
