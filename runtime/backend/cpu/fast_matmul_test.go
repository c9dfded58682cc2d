package cpu

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/loopserve/loopserve/runtime/model"
)

func fastRandMatrix(r *rand.Rand, rows, cols int) *model.Matrix {
	m := &model.Matrix{Name: "w", Rows: rows, Cols: cols, BF16: make([]uint16, rows*cols)}
	for i := range m.BF16 {
		m.BF16[i] = model.F32ToBF16(float32(r.NormFloat64()))
	}
	return m
}

func fastRandVec(r *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64())
	}
	return v
}

// vectorPaths runs fn once per vector path this machine has (AVX-512, then AVX2 with AVX-512
// switched off), skipping when it has none.
func vectorPaths(t testing.TB, fn func(t testing.TB)) {
	if !haveAVX2FMA && !haveAVX512 {
		t.Skip("no AVX2/FMA or AVX-512: the portable kernels run")
	}
	saved := haveAVX512
	defer func() { haveAVX512 = saved }()
	if saved {
		fn(t)
	}
	haveAVX512 = false
	if haveAVX2FMA {
		fn(t)
	}
}

// checkFast compares fastMatRows over [lo, hi) with the reference kernel (relative tolerance
// on the row's scale: float32 sums of cols terms in another order) and checks that columns
// outside [lo, hi) are untouched.
func checkFast(t testing.TB, w *model.Matrix, x []float32, n, lo, hi int) []float32 {
	t.Helper()
	const sentinel = -12345
	got := make([]float32, n*w.Rows)
	for i := range got {
		got[i] = sentinel
	}
	if !fastMatRows(got, x, n, w, lo, hi, w.Rows, w.Cols) {
		t.Fatalf("fastMatRows declined %d×%d, n %d", w.Rows, w.Cols, n)
	}
	want := make([]float32, n*w.Rows)
	Reference{}.MatMul(want, x, n, w)
	for i := 0; i < n; i++ {
		for r := 0; r < w.Rows; r++ {
			g, wv := got[i*w.Rows+r], want[i*w.Rows+r]
			if r < lo || r >= hi {
				if g != sentinel {
					t.Fatalf("%d×%d n %d [%d,%d): wrote column %d of row %d outside its range", w.Rows, w.Cols, n, lo, hi, r, i)
				}
				continue
			}
			// Float32 summation in 8 lanes of cols/8 terms then 3 levels: |error| ≤
			// (cols/8 + 3)·2⁻²⁴·Σ|w·x| (doubled for margin); the reference sums in float64.
			var abs float64
			for c := 0; c < w.Cols; c++ {
				abs += math.Abs(float64(model.BF16ToF32(w.BF16[r*w.Cols+c])) * float64(x[i*w.Cols+c]))
			}
			tol := 2 * float64(w.Cols/8+3) * 0x1p-24 * abs
			if d := math.Abs(float64(g - wv)); d > tol || math.IsNaN(float64(g)) {
				t.Fatalf("%d×%d n %d: out[%d,%d] = %g, reference %g (|diff| %g > %g)", w.Rows, w.Cols, n, i, r, g, wv, d, tol)
			}
		}
	}
	return got
}

func TestFastMatRowsMatchesReference(t *testing.T) {
	vectorPaths(t, testFastMatchesReference)
}

func testFastMatchesReference(t testing.TB) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, tc := range []struct{ n, rows, cols, lo, hi int }{
		{1, 4, 8, 0, 4},
		{1, 64, 64, 0, 64},
		{2, 128, 256, 0, 128},
		{3, 160, 64, 0, 160},
		{7, 704, 256, 0, 704},
		{1, 256, 704, 5, 130}, // chunk not aligned to 4
		{5, 37, 40, 0, 37},    // rows not a multiple of 4
		{4, 37, 40, 33, 37},   // last short chunk
		{9, 12, 2048, 3, 6},   // chunk shorter than a tile
		{128, 32, 512, 0, 32}, // prefill-shaped
		{8, 2048, 5632, 0, 8}, // long rows
		{1, 4, 16, 1, 2},      // one column
		{10, 20, 8, 0, 20},    // minimal cols
		{6, 1024, 64, 512, 1024},
		{13, 150, 400, 3, 147}, // blocked: k blocks, row blocks, unaligned chunk
		{7, 68, 24, 0, 68},     // blocked on AVX2 tiles under AVX-512 (cols not a multiple of 16)
	} {
		w := fastRandMatrix(r, tc.rows, tc.cols)
		x := fastRandVec(r, tc.n*tc.cols)
		checkFast(t, w, x, tc.n, tc.lo, tc.hi)
	}
}

// A row's result must not depend on n or on its neighbours: compute each row alone and
// inside batches of every size, and require bit-identical outputs.
func TestFastMatRowsBatchInvariant(t *testing.T) {
	vectorPaths(t, testFastBatchInvariant)
}

func testFastBatchInvariant(t testing.TB) {
	r := rand.New(rand.NewPCG(5, 6))
	// k in several blocks, and in one (outputs summed right after each tile).
	for _, cols := range []int{272, 64} {
		const rows, n = 44, 14
		w := fastRandMatrix(r, rows, cols)
		x := fastRandVec(r, n*cols)
		alone := make([]float32, n*rows)
		for i := 0; i < n; i++ {
			if !fastMatRows(alone[i*rows:(i+1)*rows], x[i*cols:(i+1)*cols], 1, w, 0, rows, rows, cols) {
				t.Fatal("declined")
			}
		}
		for batch := 2; batch <= n; batch++ {
			got := make([]float32, batch*rows)
			// Two chunks as two workers would split the rows, at an unaligned boundary.
			fastMatRows(got, x[:batch*cols], batch, w, 0, 21, rows, cols)
			fastMatRows(got, x[:batch*cols], batch, w, 21, rows, rows, cols)
			for i := range got {
				if math.Float32bits(got[i]) != math.Float32bits(alone[i]) {
					t.Fatalf("cols %d batch %d: out[%d,%d] = %g, alone %g", cols, batch, i/rows, i%rows, got[i], alone[i])
				}
			}
		}
	}
}

func TestFastMatRowsDeclines(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	out := make([]float32, 64)
	for _, tc := range []struct {
		name string
		w    *model.Matrix
	}{
		{"float32", &model.Matrix{Rows: 8, Cols: 8, F32: make([]float32, 64)}},
		{"cols not multiple of 8", fastRandMatrix(r, 8, 6)},
		{"fewer than 4 rows", fastRandMatrix(r, 3, 8)},
		{"short weights", &model.Matrix{Rows: 8, Cols: 8, BF16: make([]uint16, 60)}},
	} {
		if fastMatRows(out, make([]float32, 8), 1, tc.w, 0, tc.w.Rows, tc.w.Rows, tc.w.Cols) {
			t.Errorf("%s: fastMatRows accepted", tc.name)
		}
	}
}

// FuzzFastMatRows differentially tests the assembly tiles against the reference on shapes
// and chunk bounds drawn from the fuzzer.
func FuzzFastMatRows(f *testing.F) {
	if !haveAVX2FMA && !haveAVX512 {
		f.Skip("no AVX2/FMA or AVX-512: the portable kernels run")
	}
	f.Add(uint8(1), uint8(4), uint8(1), uint8(0), uint8(4), uint64(1))
	f.Add(uint8(7), uint8(33), uint8(5), uint8(3), uint8(30), uint64(2))
	f.Fuzz(func(t *testing.T, n, rows, blocks, lo, hi uint8, seed uint64) {
		nn, rr, cc := int(n%12)+1, int(rows%70)+4, (int(blocks%40)+1)*8
		l, h := int(lo)%rr, int(hi)%(rr+1)
		if l >= h {
			l, h = 0, rr
		}
		vectorPaths(t, func(t testing.TB) {
			r := rand.New(rand.NewPCG(seed, 9))
			checkFast(t, fastRandMatrix(r, rr, cc), fastRandVec(r, nn*cc), nn, l, h)
		})
	})
}
