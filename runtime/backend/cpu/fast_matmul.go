package cpu

import "github.com/loopserve/loopserve/runtime/model"

// fastMatRows is the optional vector path of matRows for bf16 weights: it computes output
// columns [lo, hi) for every batch row with the assembly tiles and reports true, or reports
// false (leaving out untouched) where the tiles do not apply: no AVX2/FMA, float32 weights,
// cols not a multiple of 8, fewer than 4 rows, or short buffers. Whether it applies depends
// only on the matrix and the machine, never on n, so one matrix is always computed the same
// way and a row's result does not depend on what else is batched with it.
func fastMatRows(out, x []float32, n int, w *model.Matrix, lo, hi, rows, cols int) bool {
	if !haveAVX2FMA || w.BF16 == nil || cols%8 != 0 || cols == 0 || rows < 4 || hi <= lo ||
		len(w.BF16) < rows*cols || len(x) < n*cols || len(out) < n*rows {
		return false
	}
	var acc [96]float32 // [3 x rows][4 weight rows][8 lanes]
	for r := lo; r < hi; r += 4 {
		// A tile that would run past the matrix starts earlier; a tile keeps only the rows of
		// its chunk, [r, min(r+4, hi)): the others belong to another goroutine's chunk.
		r0 := min(r, rows-4)
		end := min(r+4, hi) - r0
		wt := w.BF16[r0*cols : (r0+4)*cols]
		for i := 0; i < n; i += 3 {
			m := min(3, n-i)
			tile(m, wt, x[i*cols:(i+m)*cols], cols, &acc)
			for xi := range m {
				o := out[(i+xi)*rows : (i+xi+1)*rows]
				for wi := r - r0; wi < end; wi++ {
					o[r0+wi] = laneSum(acc[(xi*4+wi)*8 : (xi*4+wi+1)*8])
				}
			}
		}
	}
	return true
}

// laneSum adds 8 lanes in a fixed order (pairs 4 apart, then 2 apart, then the last two), the
// same for every tile.
func laneSum(a []float32) float32 {
	a = a[:8]
	return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}
