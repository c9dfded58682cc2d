package cpu

import (
	"sync"

	"github.com/loopserve/loopserve/runtime/model"
)

// fastMatRows is the optional vector path of matRows for bf16 weights: it computes output
// columns [lo, hi) for every batch row with the assembly tiles and reports true, or reports
// false (leaving out untouched) where no tiles apply: no AVX2/FMA, float32 weights, cols not a
// multiple of 8, fewer than 4 rows, or short buffers. The path and tile family depend only on
// the matrix and the machine, never on n, and every tile of a family sums an output in the
// same order however the work is blocked, so a row's result does not depend on what else is
// batched with it.
func fastMatRows(out, x []float32, n int, w *model.Matrix, lo, hi, rows, cols int) bool {
	if w.BF16 == nil || cols == 0 || rows < 4 || hi <= lo ||
		len(w.BF16) < rows*cols || len(x) < n*cols || len(out) < n*rows {
		return false
	}
	lanes, maxM := pickTiles(cols)
	if lanes == 0 {
		return false
	}
	if n <= maxM {
		decodeRows(out, x, n, w, lo, hi, rows, cols, lanes)
	} else {
		blockedRows(out, x, n, w, lo, hi, rows, cols, lanes, maxM)
	}
	return true
}

// tileStart returns the first row of the 4-row tile holding row r of chunk [lo, hi), and the
// end (relative to it) of the rows the chunk owns. A tile that would run past the matrix starts
// earlier; only rows [r, min(r+4, hi)) are written: the others belong to another chunk.
func tileStart(r, hi, rows int) (r0, end int) {
	r0 = min(r, rows-4)
	return r0, min(r+4, hi) - r0
}

// decodeRows is the path for a few activation rows (decode): each tile streams 4 weight rows
// once over the whole k, the pattern memory bandwidth favours.
func decodeRows(out, x []float32, n int, w *model.Matrix, lo, hi, rows, cols, lanes int) {
	var acc [6 * 4 * 16]float32 // [x rows][4 weight rows][lanes]
	for r := lo; r < hi; r += 4 {
		r0, end := tileStart(r, hi, rows)
		tile(lanes, n, w.BF16[r0*cols:(r0+4)*cols], cols, x[:n*cols], cols, cols, acc[:], 4*lanes, true)
		for xi := range n {
			o := out[xi*rows : (xi+1)*rows]
			for wi := r - r0; wi < end; wi++ {
				a := (xi*4 + wi) * lanes
				o[r0+wi] = laneSum(acc[a : a+lanes])
			}
		}
	}
}

// Blocking of the many-row path (prefill): kBlock columns of a tile's activation rows stay in
// L1 while the weight tiles of a block of rowBlock rows stream past them from L2; lane
// accumulators for [n, rowBlock] outputs persist across the k blocks.
const (
	kBlock   = 256
	rowBlock = 64
)

// partPool recycles blockedRows' accumulator buffers (up to n×rowBlock×16 floats: 512 KB at
// n = 128 when k spans several blocks), which prefill would otherwise allocate per call.
var partPool = sync.Pool{New: func() any { return new([]float32) }}

func blockedRows(out, x []float32, n int, w *model.Matrix, lo, hi, rows, cols, lanes, maxM int) {
	// Each tile of a row block has its own accumulators (a chunk's last tile may overlap the
	// one before it, see tileStart): [n][tiles][4][lanes]. With one k block the outputs of a
	// tile's activation rows are summed right after it, so only those rows' accumulators are
	// kept ([maxM][tiles][4][lanes]: in L1 rather than half a megabyte).
	tiles := (min(rowBlock, hi-lo) + 3) / 4 // tiles in the largest row block
	ld := tiles * 4 * lanes
	oneBlock := cols <= kBlock
	size := n * ld
	if oneBlock {
		size = min(n, maxM) * ld
	}
	buf := partPool.Get().(*[]float32)
	defer partPool.Put(buf)
	if cap(*buf) < size {
		*buf = make([]float32, size)
	}
	part := (*buf)[:size]
	for rb := lo; rb < hi; rb += rowBlock {
		rbEnd := min(rb+rowBlock, hi)
		for k0 := 0; k0 < cols; k0 += kBlock {
			kc := min(kBlock, cols-k0)
			for i := 0; i < n; i += maxM {
				m := min(maxM, n-i)
				pi := i * ld // accumulators of activation row i
				if oneBlock {
					pi = 0
				}
				for t, r := 0, rb; r < rbEnd; t, r = t+1, r+4 {
					r0, _ := tileStart(r, rbEnd, rows)
					tile(lanes, m, w.BF16[r0*cols+k0:], cols, x[i*cols+k0:], cols, kc, part[pi+t*4*lanes:], ld, k0 == 0)
				}
				if k0+kc == cols {
					sumRows(out, part[pi:], ld, i, m, rb, rbEnd, rows, lanes)
				}
			}
		}
	}
}

// sumRows writes outputs [rb, rbEnd) of activation rows [i, i+m) from their lane
// accumulators, part[(i'-i)*ld + t*4*lanes + wi*lanes] for tile t's weight row wi.
func sumRows(out, part []float32, ld, i, m, rb, rbEnd, rows, lanes int) {
	for a := range m {
		o := out[(i+a)*rows : (i+a+1)*rows]
		p := part[a*ld:]
		if lanes == 16 && (rbEnd-rb)%4 == 0 && rbEnd <= rows-rows%4 {
			// No tile overlaps another (tileStart): output rb+j is lane vector j.
			laneSums16(&o[rb], &p[0], rbEnd-rb)
			continue
		}
		for t, r := 0, rb; r < rbEnd; t, r = t+1, r+4 {
			r0, end := tileStart(r, rbEnd, rows)
			for wi := r - r0; wi < end; wi++ {
				c := (t*4 + wi) * lanes
				o[r0+wi] = laneSum(p[c : c+lanes])
			}
		}
	}
}

// laneSum adds 8 or 16 lanes in a fixed pairwise order (each lane with the one half the width
// away, repeatedly), the same for every tile.
func laneSum(a []float32) float32 {
	if len(a) == 16 {
		a = a[:16]
		b0, b1, b2, b3 := a[0]+a[8], a[1]+a[9], a[2]+a[10], a[3]+a[11]
		b4, b5, b6, b7 := a[4]+a[12], a[5]+a[13], a[6]+a[14], a[7]+a[15]
		c0, c1, c2, c3 := b0+b4, b1+b5, b2+b6, b3+b7
		return (c0 + c2) + (c1 + c3)
	}
	a = a[:8]
	c0, c1, c2, c3 := a[0]+a[4], a[1]+a[5], a[2]+a[6], a[3]+a[7]
	return (c0 + c2) + (c1 + c3)
}
