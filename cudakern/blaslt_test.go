package cudakern

import (
	"math/rand/v2"
	"testing"
	"unsafe"
)

// colMajorGemm computes D = op(A)·op(B) exactly as BLAS defines it for column-major storage
// (element (i, j) of a matrix with leading dimension ld at i + j·ld), for the layouts cuBLASLt
// is given: an emulation of the library call, to check the row-major mapping on the CPU.
func colMajorGemm(g ltGemm, a, b []float32, d []float32) {
	opRows := func(l ltLayout, trans int32) (rows, cols int) {
		if trans == cublasOpT {
			return int(l.Cols), int(l.Rows)
		}
		return int(l.Rows), int(l.Cols)
	}
	at := func(m []float32, l ltLayout, trans int32, i, j int) float32 {
		if trans == cublasOpT {
			i, j = j, i
		}
		return m[i+j*int(l.LD)]
	}
	m, k := opRows(g.A, g.TransA)
	k2, n := opRows(g.B, g.TransB)
	if k != k2 || m != int(g.C.Rows) || n != int(g.C.Cols) {
		panic("inconsistent gemm layout")
	}
	for i := range m {
		for j := range n {
			var s float32
			for p := range k {
				s += at(a, g.A, g.TransA, i, p) * at(b, g.B, g.TransB, p, j)
			}
			d[i+j*int(g.C.LD)] = s
		}
	}
}

// TestGemmLayout: the layouts handed to cuBLASLt make its column-major product the row-major
// out[n, N] = x[n, K] · w[N, K]ᵀ, with row strides for x and out.
func TestGemmLayout(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, tc := range []struct{ n, N, K, ldx, ldo int }{
		{1, 5, 3, 3, 5}, {4, 6, 8, 8, 6}, {3, 7, 4, 10, 9}, {9, 2, 16, 16, 2},
	} {
		w := make([]float32, tc.N*tc.K)
		x := make([]float32, tc.n*tc.ldx)
		for k := range w {
			w[k] = float32(rng.IntN(9) - 4)
		}
		for k := range x {
			x[k] = float32(rng.IntN(9) - 4)
		}
		got := make([]float32, tc.n*tc.ldo)
		colMajorGemm(gemmLayout(tc.n, tc.N, tc.K, tc.ldx, tc.ldo), w, x, got)
		for r := range tc.n {
			for j := range tc.N {
				var want float32
				for k := range tc.K {
					want += x[r*tc.ldx+k] * w[j*tc.K+k]
				}
				if got[r*tc.ldo+j] != want {
					t.Fatalf("%+v: out[%d, %d] = %v, want %v", tc, r, j, got[r*tc.ldo+j], want)
				}
			}
		}
	}
}

// TestHeuristicLayout: ltHeuristic has cublasLtMatmulHeuristicResult_t's layout (64-byte
// algorithm, then workspaceSize, state, wavesCount, four reserved ints: 96 bytes).
func TestHeuristicLayout(t *testing.T) {
	var h ltHeuristic
	if unsafe.Sizeof(h) != 96 || unsafe.Offsetof(h.workspaceSize) != 64 || unsafe.Offsetof(h.state) != 72 {
		t.Errorf("size %d, workspaceSize at %d, state at %d; want 96, 64, 72",
			unsafe.Sizeof(h), unsafe.Offsetof(h.workspaceSize), unsafe.Offsetof(h.state))
	}
}
