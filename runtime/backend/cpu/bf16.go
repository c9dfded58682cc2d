package cpu

import (
	"fmt"

	"github.com/loopserve/loopserve/runtime/model"
)

// Numerics chooses the arithmetic of the CPU backend's matrix products.
type Numerics int

const (
	// Exact keeps activations in float32 (bf16 weights widen exactly): the arithmetic the
	// goldens are checked in, and the default.
	Exact Numerics = iota
	// BF16 rounds each matrix product's activations to bfloat16 and multiplies with the CPU's
	// bf16 dot-product instruction (VDPBF16PS, AVX-512 BF16), twice the multiply rate of
	// float32, as oneDNN does for PyTorch's bf16. Less accurate: on the tiny goldens' looped
	// models step logits drift by up to ~2 and 20 of the 24 greedy continuations match, so it
	// is offered for throughput, never the default.
	BF16
)

// String returns "exact" or "bf16".
func (n Numerics) String() string {
	if n == BF16 {
		return "bf16"
	}
	return "exact"
}

// ParseNumerics parses "exact" or "bf16".
func ParseNumerics(s string) (Numerics, error) {
	switch s {
	case "exact", "":
		return Exact, nil
	case "bf16":
		return BF16, nil
	}
	return 0, fmt.Errorf("numerics %q (want exact or bf16)", s)
}

// toBF16 rounds src to bfloat16 bits (nearest, ties to even) into dst.
//
//go:norace
func toBF16(dst []uint16, src []float32) {
	dst = dst[:len(src)]
	for i, v := range src {
		dst[i] = model.F32ToBF16(v)
	}
}

// dpOK reports whether the assembly tiles compute products of bf16 activations with w: bf16
// weights whose rows are whole 32-column chunks, in whole 4-row tiles.
func dpOK(w *model.Matrix) bool {
	return haveBF16 && w.BF16 != nil && w.Cols%32 == 0 && w.Rows%4 == 0 && w.Cols > 0
}

// dpRows computes out[i*ldo + r] = Σ_c w[r, c]·x[i, c] for rows r in [lo, hi) and activation
// rows i < n, x [n, cols] bfloat16. Rows are taken four at a time (lo and hi multiples of 4,
// or hi = w.Rows) and each weight tile serves all n activation rows while it is in L1. Every
// output is summed the same way whatever n is (see matmulbf16_amd64.s); matrices the tiles
// cannot take (dpOK false) use dpRowsGo, which is slower but equally batch-invariant.
//
//go:norace
func dpRows(out []float32, ldo int, x []uint16, n int, w *model.Matrix, lo, hi int) {
	if n <= 0 || hi <= lo {
		return
	}
	if !dpOK(w) {
		dpRowsGo(out, ldo, x, n, w, lo, hi)
		return
	}
	cols := w.Cols
	_ = out[(n-1)*ldo+hi-1]
	_ = x[n*cols-1]
	_ = w.BF16[hi*cols-1]
	dpNew.rows(out, ldo, x, n, w, lo, hi)
}

type dpTileFunc = func(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

// dpKernels is a set of bf16 tiles for dpRows: tiles[m-1] and blocked[m-1] take 4 weight rows
// and m activation rows, wide 8 weight rows and one activation row. Products of 2 to small
// activation rows walk the weights 4 rows at a time with tiles, each weight tile serving every
// activation tile while it is in L1, the first prefetching the next weight tile (so the
// weights stream from memory once, overlapped with the arithmetic: on a Zen 5 core, 1.3-1.5×
// the rate of row blocks at 8 rows); one row takes wide, 8 weight rows at a time (in the
// new sets prefetching two tiles ahead), and more than small rows take row blocks (see
// blocking) with blocked. Every tile sums an output alike, so neither the set nor the order
// changes a result.
type dpKernels struct {
	tiles   [6]dpTileFunc // small batches
	blocked [6]dpTileFunc // row blocks
	wide    dpTileFunc
	small   int
}

//go:norace
func (k *dpKernels) rows(out []float32, ldo int, x []uint16, n int, w *model.Matrix, lo, hi int) {
	cols := w.Cols
	_ = out[(n-1)*ldo+hi-1]
	_ = x[n*cols-1]
	_ = w.BF16[hi*cols-1]
	m, rb := blocking(n, cols, 2, len(k.tiles))
	if n > 1 && n <= k.small {
		for r := lo; r < hi; r += 4 {
			for i := 0; i < n; i += m {
				h := min(m, n-i)
				k.tiles[h-1](&w.BF16[r*cols], 2*cols, &x[i*cols], 2*cols, cols, &out[i*ldo+r], 4*ldo)
			}
		}
		return
	}
	for r0 := lo; r0 < hi; r0 += rb {
		r1 := min(r0+rb, hi)
		for i := 0; i < n; i += m {
			h := min(m, n-i)
			t := k.blocked[h-1]
			r := r0
			for ; h == 1 && r+8 <= r1; r += 8 {
				k.wide(&w.BF16[r*cols], 2*cols, &x[i*cols], 2*cols, cols, &out[i*ldo+r], 4*ldo)
			}
			for ; r < r1; r += 4 {
				t(&w.BF16[r*cols], 2*cols, &x[i*cols], 2*cols, cols, &out[i*ldo+r], 4*ldo)
			}
		}
	}
}

// smallBatch is the most activation rows the products walk weight tile by weight tile.
const smallBatch = 16

// blocking chooses how a product of n activation rows of cols elements (elem bytes each)
// walks tiles of at most maxM rows: m activation rows per tile (up to 128 KB of them: from L2
// they cost less than the shorter tiles' extra weight conversions), while the weights of rb
// rows at a time (half a megabyte) stay in L2 and serve every activation tile before the next
// rows stream in. Tiles sum every output alike whatever m is, so the blocking never changes a
// result.
func blocking(n, cols, elem, maxM int) (m, rb int) {
	m = max(1, min(maxM, n, (128<<10)/(cols*elem)))
	rb = max(4, (512<<10)/(cols*2)&^3)
	return m, rb
}

// dpRowsGo is dpRows in plain Go: per output, 16 lanes over 32-column chunks (lane l takes
// columns 2l and 2l+1 of each), then laneSum.
//
//go:norace
func dpRowsGo(out []float32, ldo int, x []uint16, n int, w *model.Matrix, lo, hi int) {
	cols := w.Cols
	row := make([]float32, cols)
	var lanes [16]float32
	for r := lo; r < hi; r++ {
		w.Row(r, row)
		for i := 0; i < n; i++ {
			xi := x[i*cols : (i+1)*cols]
			lanes = [16]float32{}
			for c := 0; c < cols; c++ {
				l := (c % 32) / 2
				lanes[l] += row[c] * bf(xi[c])
			}
			out[i*ldo+r] = laneSum(lanes[:])
		}
	}
}

// pairOK reports whether the pair tiles compute products of float32 activations with w.
func pairOK(w *model.Matrix) bool {
	return haveAVX512 && w.BF16 != nil && w.Cols%32 == 0 && w.Rows%4 == 0 && w.Cols > 0
}

// permutePairs writes src [n, cols] into dst with each 32-column chunk reordered as its 16
// even columns then its 16 odd ones: the layout the pair tiles read (cols a multiple of 32).
//
//go:norace
func permutePairs(dst, src []float32) {
	dst = dst[:len(src)]
	for c := 0; c+32 <= len(src); c += 32 {
		s, d := src[c:c+32], dst[c:c+32]
		for l := range 16 {
			d[l], d[16+l] = s[2*l], s[2*l+1]
		}
	}
}

// pairRows is dpRows for float32 activations xp [n, cols], permuted by permutePairs, with the
// pair tiles (pairOK(w) must hold).
//
//go:norace
func pairRows(out []float32, ldo int, xp []float32, n int, w *model.Matrix, lo, hi int) {
	if n <= 0 || hi <= lo {
		return
	}
	cols := w.Cols
	_ = out[(n-1)*ldo+hi-1]
	_ = xp[n*cols-1]
	_ = w.BF16[hi*cols-1]
	pairNew.rows(out, ldo, xp, n, w, lo, hi)
}

type pairTileFunc = func(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

// pairKernels is dpKernels for the pair tiles.
type pairKernels struct {
	tiles   [5]pairTileFunc // small batches
	blocked [5]pairTileFunc // row blocks
	wide    pairTileFunc
	small   int
}

//go:norace
func (k *pairKernels) rows(out []float32, ldo int, xp []float32, n int, w *model.Matrix, lo, hi int) {
	cols := w.Cols
	_ = out[(n-1)*ldo+hi-1]
	_ = xp[n*cols-1]
	_ = w.BF16[hi*cols-1]
	m, rb := blocking(n, cols, 4, len(k.tiles))
	if n > 1 && n <= k.small {
		for r := lo; r < hi; r += 4 {
			for i := 0; i < n; i += m {
				h := min(m, n-i)
				k.tiles[h-1](&w.BF16[r*cols], 2*cols, &xp[i*cols], 4*cols, cols, &out[i*ldo+r], 4*ldo)
			}
		}
		return
	}
	for r0 := lo; r0 < hi; r0 += rb {
		r1 := min(r0+rb, hi)
		for i := 0; i < n; i += m {
			h := min(m, n-i)
			t := k.blocked[h-1]
			r := r0
			for ; h == 1 && r+8 <= r1; r += 8 {
				k.wide(&w.BF16[r*cols], 2*cols, &xp[i*cols], 4*cols, cols, &out[i*ldo+r], 4*ldo)
			}
			for ; r < r1; r += 4 {
				t(&w.BF16[r*cols], 2*cols, &xp[i*cols], 4*cols, cols, &out[i*ldo+r], 4*ldo)
			}
		}
	}
}
