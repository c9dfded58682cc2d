// Package cpu is the CPU backend: pure Go plus Go assembly, no cgo. A loop step runs as a few
// phases per layer, each one hand-off to a fixed pool of worker goroutines (see stream), with
// product kernels chosen at start-up from the CPU's features: AVX-512 pair tiles (exact float32
// activations against bf16 weights read in place) or AVX-512 BF16 dot products (bf16
// activations, Options.Numerics), else AVX2/FMA tiles, else portable loops. Reference is the
// plain reference backend (package ref) the kernels and steps are tested against.
package cpu

import (
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/loopserve/loopserve/runtime/backend/host"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// Backend is the parallel CPU backend. The zero value is not usable; call New. It holds no
// per-call state and is safe for concurrent use. Its worker goroutines stop at Close, or
// when the Backend becomes unreachable.
type Backend struct {
	threads  int
	numerics Numerics
	poisonKV bool
	pool     *pool
	rope     atomic.Pointer[ropeTable] // the latest rotation table, see rotations
}

// Close stops the worker goroutines and waits for them; the Backend must not be used after.
func (b *Backend) Close() error {
	if b.pool != nil {
		b.pool.stop()
	}
	return nil
}

var _ engine.Backend = (*Backend)(nil)

// Options configure a Backend.
type Options struct {
	Threads  int      // goroutines per step (GOMAXPROCS when <= 0)
	Numerics Numerics // Exact (the default) or BF16
	// PoisonKV fills every KV block a stream reuses from a freed cache with NaN (host.Caches.
	// Poison): a step that read a position its request never wrote would show it (tests).
	PoisonKV bool
}

// New returns an Exact backend using threads goroutines (GOMAXPROCS when threads <= 0).
func New(threads int) *Backend {
	b, _ := NewWith(Options{Threads: threads})
	return b
}

// NewWith returns a backend configured by o; BF16 numerics need AVX-512 BF16.
func NewWith(o Options) (*Backend, error) {
	switch {
	case o.Numerics != Exact && o.Numerics != BF16:
		return nil, fmt.Errorf("cpu backend: numerics %d", o.Numerics)
	case o.Numerics == BF16 && !haveBF16:
		return nil, fmt.Errorf("cpu backend: bf16 numerics need a CPU with AVX-512 BF16 (VDPBF16PS); this one has none")
	}
	threads := o.Threads
	if threads <= 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	b := &Backend{threads: threads, numerics: o.Numerics, poisonKV: o.PoisonKV}
	if threads > 1 {
		b.pool = newPool(threads - 1)
		runtime.AddCleanup(b, func(p *pool) { p.stop() }, b.pool)
	}
	return b, nil
}

// Numerics is the backend's arithmetic.
func (b *Backend) Numerics() Numerics { return b.numerics }

// minWork is the multiply-adds below which a kernel runs on the calling goroutine: spawning
// costs about a microsecond, which a few thousand FMAs do not repay.
const minWork = 32 << 10

// parallel runs fn over [0, total) split into contiguous chunks, one per worker, and waits.
func (b *Backend) parallel(total, work int, fn func(lo, hi int)) {
	b.parallelGrain(total, work, 1, fn)
}

// parallelGrain is parallel with chunk boundaries at multiples of grain (matrix tiles span
// four rows: a chunk edge inside a tile computes the tile twice).
func (b *Backend) parallelGrain(total, work, grain int, fn func(lo, hi int)) {
	workers := b.threads
	if max := work / minWork; max < workers {
		workers = max
	}
	if workers > total {
		workers = total
	}
	if workers <= 1 {
		fn(0, total)
		return
	}
	wg := new(sync.WaitGroup)
	chunk := (total + workers - 1) / workers
	chunk = (chunk + grain - 1) / grain * grain
	for lo := chunk; lo < total; lo += chunk {
		wg.Add(1)
		b.pool.work <- poolTask{fn: fn, lo: lo, hi: min(lo+chunk, total), done: wg}
	}
	fn(0, min(chunk, total))
	wg.Wait()
}

// MatMul computes out[n, w.Rows] = x[n, w.Cols] · wᵀ, reading w once for all n rows.
func (b *Backend) MatMul(out, x []float32, n int, w *model.Matrix) {
	rows, cols := w.Rows, w.Cols
	if n <= 0 {
		return
	}
	b.parallelGrain(rows, rows*cols*n, 4, func(lo, hi int) { matRows(out, x, n, w, lo, hi, rows, cols) })
}

// MultiMatMul applies several weights with the same Cols to x in one parallel pass: the rows
// of all weights form one index space.
func (b *Backend) MultiMatMul(outs [][]float32, x []float32, n int, ws []*model.Matrix) {
	if n <= 0 {
		return
	}
	total, work := 0, 0
	for _, w := range ws {
		total += w.Rows
		work += w.Rows * w.Cols * n
	}
	b.parallelGrain(total, work, 4, func(lo, hi int) {
		base := 0
		for i, w := range ws {
			a, z := max(lo-base, 0), min(hi-base, w.Rows)
			if a < z {
				matRows(outs[i], x, n, w, a, z, w.Rows, w.Cols)
			}
			base += w.Rows
		}
	})
}

// matRows computes output columns [lo, hi) for every batch row. Four weight rows are taken at
// a time so each x element loaded serves four FMAs; every output is one dotN/dot call with a
// fixed summation order, whatever n is.
//
//go:norace
func matRows(out, x []float32, n int, w *model.Matrix, lo, hi, rows, cols int) {
	if fastMatRows(out, x, n, w, lo, hi, rows, cols) {
		return
	}
	r := lo
	if w.BF16 != nil && n > 1 {
		// Widen four weight rows once and reuse them for every batch row.
		buf := make([]float32, 4*cols)
		f0, f1, f2, f3 := buf[:cols], buf[cols:2*cols], buf[2*cols:3*cols], buf[3*cols:]
		for ; r+4 <= hi; r += 4 {
			widen(f0, w.BF16[r*cols:(r+1)*cols])
			widen(f1, w.BF16[(r+1)*cols:(r+2)*cols])
			widen(f2, w.BF16[(r+2)*cols:(r+3)*cols])
			widen(f3, w.BF16[(r+3)*cols:(r+4)*cols])
			for i := 0; i < n; i++ {
				a, b2, c, d := dot4F32(f0, f1, f2, f3, x[i*cols:(i+1)*cols])
				o := out[i*rows+r : i*rows+r+4]
				o[0], o[1], o[2], o[3] = a, b2, c, d
			}
		}
	}
	if w.BF16 != nil {
		for ; r+4 <= hi; r += 4 {
			w0 := w.BF16[r*cols : (r+1)*cols]
			w1 := w.BF16[(r+1)*cols : (r+2)*cols]
			w2 := w.BF16[(r+2)*cols : (r+3)*cols]
			w3 := w.BF16[(r+3)*cols : (r+4)*cols]
			for i := 0; i < n; i++ {
				a, b2, c, d := dot4BF16(w0, w1, w2, w3, x[i*cols:(i+1)*cols])
				o := out[i*rows+r : i*rows+r+4]
				o[0], o[1], o[2], o[3] = a, b2, c, d
			}
		}
		for ; r < hi; r++ {
			wr := w.BF16[r*cols : (r+1)*cols]
			for i := 0; i < n; i++ {
				out[i*rows+r] = dotBF16(wr, x[i*cols:(i+1)*cols])
			}
		}
		return
	}
	for ; r < hi; r++ {
		wr := w.F32[r*cols : (r+1)*cols]
		for i := 0; i < n; i++ {
			out[i*rows+r] = dotF32(wr, x[i*cols:(i+1)*cols])
		}
	}
}

func bf(u uint16) float32 { return math.Float32frombits(uint32(u) << 16) }

// dotBF16 and dot4BF16 must sum in the same order (4 lanes over j mod 4, then a fixed
// combination) so that a row's value does not depend on which of them computed it.
//
//go:norace
func dotBF16(w []uint16, x []float32) float32 {
	x = x[:len(w)]
	var s0, s1, s2, s3 float32
	j := 0
	for ; j+4 <= len(w); j += 4 {
		s0 += bf(w[j]) * x[j]
		s1 += bf(w[j+1]) * x[j+1]
		s2 += bf(w[j+2]) * x[j+2]
		s3 += bf(w[j+3]) * x[j+3]
	}
	for ; j < len(w); j++ {
		s0 += bf(w[j]) * x[j]
	}
	return (s0 + s1) + (s2 + s3)
}

//go:norace
func dot4BF16(w0, w1, w2, w3 []uint16, x []float32) (float32, float32, float32, float32) {
	m := len(x)
	w0, w1, w2, w3 = w0[:m], w1[:m], w2[:m], w3[:m]
	var a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3 float32
	j := 0
	for ; j+4 <= m; j += 4 {
		x0, x1, x2, x3 := x[j], x[j+1], x[j+2], x[j+3]
		a0 += bf(w0[j]) * x0
		a1 += bf(w0[j+1]) * x1
		a2 += bf(w0[j+2]) * x2
		a3 += bf(w0[j+3]) * x3
		b0 += bf(w1[j]) * x0
		b1 += bf(w1[j+1]) * x1
		b2 += bf(w1[j+2]) * x2
		b3 += bf(w1[j+3]) * x3
		c0 += bf(w2[j]) * x0
		c1 += bf(w2[j+1]) * x1
		c2 += bf(w2[j+2]) * x2
		c3 += bf(w2[j+3]) * x3
		d0 += bf(w3[j]) * x0
		d1 += bf(w3[j+1]) * x1
		d2 += bf(w3[j+2]) * x2
		d3 += bf(w3[j+3]) * x3
	}
	for ; j < m; j++ {
		a0 += bf(w0[j]) * x[j]
		b0 += bf(w1[j]) * x[j]
		c0 += bf(w2[j]) * x[j]
		d0 += bf(w3[j]) * x[j]
	}
	return (a0 + a1) + (a2 + a3), (b0 + b1) + (b2 + b3), (c0 + c1) + (c2 + c3), (d0 + d1) + (d2 + d3)
}

//go:norace
func widen(dst []float32, src []uint16) {
	dst = dst[:len(src)]
	for i, u := range src {
		dst[i] = bf(u)
	}
}

// dot4F32 is dot4BF16 over widened rows, with the same summation order.
//
//go:norace
func dot4F32(w0, w1, w2, w3, x []float32) (float32, float32, float32, float32) {
	m := len(x)
	w0, w1, w2, w3 = w0[:m], w1[:m], w2[:m], w3[:m]
	var a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3 float32
	j := 0
	for ; j+4 <= m; j += 4 {
		x0, x1, x2, x3 := x[j], x[j+1], x[j+2], x[j+3]
		a0 += w0[j] * x0
		a1 += w0[j+1] * x1
		a2 += w0[j+2] * x2
		a3 += w0[j+3] * x3
		b0 += w1[j] * x0
		b1 += w1[j+1] * x1
		b2 += w1[j+2] * x2
		b3 += w1[j+3] * x3
		c0 += w2[j] * x0
		c1 += w2[j+1] * x1
		c2 += w2[j+2] * x2
		c3 += w2[j+3] * x3
		d0 += w3[j] * x0
		d1 += w3[j+1] * x1
		d2 += w3[j+2] * x2
		d3 += w3[j+3] * x3
	}
	for ; j < m; j++ {
		a0 += w0[j] * x[j]
		b0 += w1[j] * x[j]
		c0 += w2[j] * x[j]
		d0 += w3[j] * x[j]
	}
	return (a0 + a1) + (a2 + a3), (b0 + b1) + (b2 + b3), (c0 + c1) + (c2 + c3), (d0 + d1) + (d2 + d3)
}

//go:norace
func dotF32(w, x []float32) float32 {
	x = x[:len(w)]
	var s0, s1, s2, s3 float32
	j := 0
	for ; j+4 <= len(w); j += 4 {
		s0 += w[j] * x[j]
		s1 += w[j+1] * x[j+1]
		s2 += w[j+2] * x[j+2]
		s3 += w[j+3] * x[j+3]
	}
	for ; j < len(w); j++ {
		s0 += w[j] * x[j]
	}
	return (s0 + s1) + (s2 + s3)
}

// The kernels below are marked go:norace: they touch only the slices their caller hands
// them, disjoint per goroutine by construction, and race instrumentation of every element
// access would make -race test runs an order of magnitude slower.

// RMSNorm computes out[n, d] = x / sqrt(mean(x²) + eps) · weight, d = len(weight); out may
// alias x.
func (b *Backend) RMSNorm(out, x []float32, n int, weight []float32, eps float32) {
	d := len(weight)
	b.parallel(n, n*d*4, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			rmsRow(out[i*d:(i+1)*d], x[i*d:(i+1)*d], weight, eps)
		}
	})
}

//go:norace
func rmsRow(out, x, weight []float32, eps float32) {
	scaleRow(out, x, weight, rmsInv(x, eps), false)
}

// rmsInv is 1/sqrt(mean(x²) + eps), the sum of squares in float64 (vector lanes where the
// rows are whole 16-element groups: a fixed order per width, so a row's norm never depends on
// the batch).
//
//go:norace
func rmsInv(x []float32, eps float32) float32 {
	var ss float64
	if haveAVX512 && len(x)%16 == 0 && len(x) > 0 {
		ss = sumSquaresAVX512(&x[0], len(x))
	} else {
		for _, v := range x {
			ss += float64(v) * float64(v)
		}
	}
	return float32(1 / math.Sqrt(float64(float32(ss/float64(len(x))))+float64(eps)))
}

// scaleRow sets out[j] = weight[j]·(x[j]·inv), or adds it to out[j].
//
//go:norace
func scaleRow(out, x, weight []float32, inv float32, add bool) {
	if haveAVX512 && len(x)%16 == 0 && len(x) > 0 {
		scaleAVX512(&out[0], &x[0], &weight[0], inv, len(x), add)
		return
	}
	out, weight = out[:len(x)], weight[:len(x)]
	for j, v := range x {
		if add {
			out[j] += weight[j] * (v * inv)
		} else {
			out[j] = weight[j] * (v * inv)
		}
	}
}

// RoPE rotates x[n, heads·headDim] in place at positions pos[n] (rotate-half convention).
func (b *Backend) RoPE(x []float32, n, heads, headDim int, pos []int, invFreq []float32) {
	var t *ropeTable
	if len(invFreq) == headDim/2 {
		t = b.rotations(pos[:n], invFreq)
	}
	b.parallel(n, n*heads*headDim*8, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			row := x[i*heads*headDim : (i+1)*heads*headDim]
			if t != nil {
				ropeRowTable(row, heads, headDim, pos[i], t)
			} else {
				ropeRow(row, heads, headDim, pos[i], invFreq)
			}
		}
	})
}

//go:norace
func ropeRow(x []float32, heads, headDim, pos int, invFreq []float32) {
	half := headDim / 2
	for k := 0; k < half; k++ {
		ang := float32(pos) * invFreq[k]
		s64, c64 := math.Sincos(float64(ang))
		c, s := float32(c64), float32(s64)
		for h := 0; h < heads; h++ {
			v := x[h*headDim : (h+1)*headDim]
			a, bb := v[k], v[k+half]
			v[k] = a*c - bb*s
			v[k+half] = bb*c + a*s
		}
	}
}

// SiLUMul computes gate[i] = silu(gate[i]) · up[i].
func (b *Backend) SiLUMul(gate, up []float32) {
	b.parallel(len(gate), len(gate)*16, func(lo, hi int) { siluMul(gate[lo:hi], up[lo:hi]) })
}

// siluMul takes e^-g in blocks through expShift (the vector exp where there is one).
//
//go:norace
func siluMul(gate, up []float32) {
	up = up[:len(gate)]
	var e [256]float32
	for lo := 0; lo < len(gate); lo += len(e) {
		g := gate[lo:min(lo+len(e), len(gate))]
		u := up[lo : lo+len(g)]
		en := e[:len(g)]
		for i, v := range g {
			en[i] = -v
		}
		expShift(en, 0)
		for i, v := range g {
			g[i] = v / (1 + en[i]) * u[i]
		}
	}
}

// Attention computes causal grouped-query attention for each job, one task per (job, head).
func (b *Backend) Attention(jobs []host.AttnJob, heads, kvHeads, headDim int, scale float32) {
	work, maxN := 0, 0
	for i := range jobs {
		n := jobs[i].N()
		work += n * heads * headDim * 2
		maxN = max(maxN, n)
	}
	b.parallel(len(jobs)*heads, work, func(lo, hi int) {
		// One scratch row per chunk, with room to pad to 16 lanes (see attnHead).
		var stack [512]float32
		scores := stack[:]
		if maxN+15 > len(stack) {
			scores = make([]float32, maxN+15)
		}
		for t := lo; t < hi; t++ {
			j := &jobs[t/heads]
			attnHead(j, t%heads, heads/kvHeads, kvHeads*headDim, headDim, scale, scores)
		}
	})
}

// attnHead computes head h of job j, over its runs in position order: the scores of every
// position, one softmax, then the values, run by run. scores has room for N+15 positions.
//
//go:norace
func attnHead(j *host.AttnJob, h, group, kvDim, headDim int, scale float32, scores []float32) {
	q := j.Q[h*headDim : (h+1)*headDim]
	off := (h / group) * headDim
	out := j.Out[h*headDim : (h+1)*headDim]
	N := j.N()
	half := len(j.Runs) > 0 && j.Runs[0].K16 != nil
	if attnAVX512 && !half && headDim%16 == 0 && headDim > 0 && N > 0 {
		// Whole loops in assembly: at head width 16 a call per position costs more than its
		// arithmetic.
		mx := float32(math.Inf(-1))
		p := 0
		for _, r := range j.Runs {
			mx = max(mx, attnScoresAVX512(&q[0], &r.K[off], 4*kvDim, r.N, headDim, scale, &scores[p]))
			p += r.N
		}
		// Pad to whole vectors so no position takes the scalar exp: a padding score of
		// -MaxFloat32 becomes ~1e-38, which leaves a sum of at least 1 (e^0 at the maximum)
		// unchanged.
		padded := scores[:(N+15)&^15]
		for p := N; p < len(padded); p++ {
			padded[p] = -math.MaxFloat32
		}
		inv := 1 / expShift(padded, mx)
		p = 0
		for i, r := range j.Runs {
			attnMixAVX512(&out[0], &scores[p], inv, &r.V[off], 4*kvDim, r.N, headDim, i > 0)
			p += r.N
		}
		return
	}
	vec := attnAVX2 && headDim%16 == 0 && headDim > 0
	mx := float32(math.Inf(-1))
	p := 0
	for _, r := range j.Runs {
		for i := 0; i < r.N; i++ {
			lo := i*kvDim + off
			var s float32
			switch {
			case half && vec:
				s = dotBF16F32AVX2(&r.K16[lo], &q[0], headDim)
			case half:
				s = dotBF16(r.K16[lo:lo+headDim], q)
			case vec:
				s = dotF32AVX2(&q[0], &r.K[lo], headDim)
			default:
				s = dotF32(q, r.K[lo:lo+headDim])
			}
			s *= scale
			scores[p] = s
			mx = max(mx, s)
			p++
		}
	}
	sum := expShift(scores[:N], mx)
	clear(out)
	inv := 1 / sum
	p = 0
	for _, r := range j.Runs {
		for i := 0; i < r.N; i++ {
			wgt := scores[p] * inv
			p++
			lo := i*kvDim + off
			switch {
			case half && vec:
				axpyBF16AVX2(&out[0], wgt, &r.V16[lo], headDim)
			case half:
				for d, u := range r.V16[lo : lo+headDim] {
					out[d] += wgt * bf(u)
				}
			case vec:
				axpyF32AVX2(&out[0], wgt, &r.V[lo], headDim)
			default:
				for d, v := range r.V[lo : lo+headDim] {
					out[d] += wgt * v
				}
			}
		}
	}
}
