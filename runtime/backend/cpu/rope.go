package cpu

import (
	"math"
	"slices"
)

// ropeCap bounds the positions a rotation table covers ([ropeCap, half] cos and sin: 16 MB
// at half 64); rows past it compute their rotations directly.
const ropeCap = 1 << 15

// ropeTable holds cos and sin of pos·invFreq[k], exactly as ropeRow computes them, for
// positions [0, n): the same positions are rotated for the queries and the keys of every layer
// and loop step, and Sincos dominated RoPE. Immutable once published.
type ropeTable struct {
	invFreq  []float32 // the frequencies it was built for
	n        int
	cos, sin []float32 // [n, half]
}

// rotations returns a table for invFreq covering every position in pos, or nil where one is
// out of range. Concurrent callers may each build one; any of them is correct.
func (b *Backend) rotations(pos []int, invFreq []float32) *ropeTable {
	top := -1
	for _, p := range pos {
		if p < 0 || p >= ropeCap {
			return nil
		}
		top = max(top, p)
	}
	t := b.rope.Load()
	if t != nil && top < t.n && slices.Equal(t.invFreq, invFreq) {
		return t
	}
	half := len(invFreq)
	n := top + 1
	from := 0
	nt := &ropeTable{invFreq: slices.Clone(invFreq)}
	if t != nil && slices.Equal(t.invFreq, invFreq) {
		n = min(max(n, 2*t.n), ropeCap)
		from = t.n
	}
	nt.n = n
	nt.cos, nt.sin = make([]float32, n*half), make([]float32, n*half)
	if from > 0 {
		copy(nt.cos, t.cos)
		copy(nt.sin, t.sin)
	}
	for p := from; p < n; p++ {
		for k, f := range invFreq {
			s, c := math.Sincos(float64(float32(p) * f))
			nt.cos[p*half+k], nt.sin[p*half+k] = float32(c), float32(s)
		}
	}
	b.rope.Store(nt)
	return nt
}

// ropeRowTable is ropeRow with the rotation of position pos read from t.
//
//go:norace
func ropeRowTable(x []float32, heads, headDim, pos int, t *ropeTable) {
	half := headDim / 2
	cs, sn := t.cos[pos*half:(pos+1)*half], t.sin[pos*half:(pos+1)*half]
	for h := 0; h < heads; h++ {
		v := x[h*headDim : (h+1)*headDim]
		lo, hi := v[:half], v[half:2*half]
		for k := range lo {
			a, bb, c, s := lo[k], hi[k], cs[k], sn[k]
			lo[k] = a*c - bb*s
			hi[k] = bb*c + a*s
		}
	}
}

// ropeHeads rotates heads [h0, h1) of one row x [heads·headDim] at position pos, from the table
// t when it covers pos (as ropeRowTable), else computing the angles (as ropeRow).
//
//go:norace
func ropeHeads(x []float32, h0, h1, headDim, pos int, t *ropeTable, invFreq []float32) {
	half := headDim / 2
	if t != nil && pos < t.n {
		cs, sn := t.cos[pos*half:(pos+1)*half], t.sin[pos*half:(pos+1)*half]
		for h := h0; h < h1; h++ {
			v := x[h*headDim : (h+1)*headDim]
			lo, hi := v[:half], v[half:2*half]
			for k := range lo {
				a, bb, c, s := lo[k], hi[k], cs[k], sn[k]
				lo[k] = a*c - bb*s
				hi[k] = bb*c + a*s
			}
		}
		return
	}
	ropeRow(x[h0*headDim:h1*headDim], h1-h0, headDim, pos, invFreq)
}
