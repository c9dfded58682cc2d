package cpu

import (
	"math"
	"math/rand/v2"
	"runtime"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/loopserve/loopserve/runtime/model"
)

func bf16Vec(x []float32) []uint16 {
	out := make([]uint16, len(x))
	toBF16(out, x)
	return out
}

// checkDP compares dpRows over [lo, hi) with the reference product of the rounded activations
// (float32 sums of cols terms: |error| ≤ (cols/32 + 6)·2⁻²⁴·Σ|w·x|, doubled) and checks that it
// writes nothing outside [lo, hi).
func checkDP(t testing.TB, w *model.Matrix, x []float32, n, lo, hi int, rows func(out []float32, ldo int, x []uint16, n int, w *model.Matrix, lo, hi int)) []float32 {
	t.Helper()
	const sentinel = -12345
	xb := bf16Vec(x)
	xr := make([]float32, len(x))
	for i, b := range xb {
		xr[i] = model.BF16ToF32(b)
	}
	got := make([]float32, n*w.Rows)
	for i := range got {
		got[i] = sentinel
	}
	rows(got, w.Rows, xb, n, w, lo, hi)
	want := make([]float32, n*w.Rows)
	Reference{}.MatMul(want, xr, n, w)
	for i := 0; i < n; i++ {
		for r := 0; r < w.Rows; r++ {
			g, wv := got[i*w.Rows+r], want[i*w.Rows+r]
			if r < lo || r >= hi {
				if g != sentinel {
					t.Fatalf("%d×%d n %d [%d,%d): wrote column %d of row %d", w.Rows, w.Cols, n, lo, hi, r, i)
				}
				continue
			}
			var abs float64
			for c := 0; c < w.Cols; c++ {
				abs += math.Abs(float64(model.BF16ToF32(w.BF16[r*w.Cols+c])) * float64(xr[i*w.Cols+c]))
			}
			tol := 2 * float64(w.Cols/32+6) * 0x1p-24 * abs
			if d := math.Abs(float64(g - wv)); d > tol || math.IsNaN(float64(g)) {
				t.Fatalf("%d×%d n %d: out[%d,%d] = %g, reference %g (|diff| %g > %g)", w.Rows, w.Cols, n, i, r, g, wv, d, tol)
			}
		}
	}
	return got
}

// TestDPRowsMatchReference: the VDPBF16PS tiles and the plain-Go path both compute the product
// of the rounded activations, for every tile height and several shapes.
func TestDPRowsMatchReference(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for _, sh := range []struct{ rows, cols int }{{4, 32}, {8, 64}, {64, 256}, {36, 2048}, {12, 160}} {
		w := fastRandMatrix(r, sh.rows, sh.cols)
		for _, n := range []int{1, 2, 3, 4, 5, 6, 7, 12, 13} {
			x := fastRandVec(r, n*sh.cols)
			checkDP(t, w, x, n, 0, sh.rows, dpRowsGo)
			if !haveBF16 {
				continue
			}
			checkDP(t, w, x, n, 0, sh.rows, dpRows)
			if sh.rows >= 8 {
				checkDP(t, w, x, n, 4, sh.rows-4, dpRows)
			}
		}
	}
	if !haveBF16 {
		t.Log("no AVX-512 BF16: only the plain-Go path ran")
	}
}

// TestDPRowsBatchInvariant: each output row is bit for bit the same computed alone as in a
// batch of any size (every tile height sums alike).
func TestDPRowsBatchInvariant(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	for _, fn := range []struct {
		name string
		rows func(out []float32, ldo int, x []uint16, n int, w *model.Matrix, lo, hi int)
	}{{"asm", dpRows}, {"go", dpRowsGo}} {
		if fn.name == "asm" && !haveBF16 {
			continue
		}
		w := fastRandMatrix(r, 16, 96)
		const n = 13
		xb := bf16Vec(fastRandVec(r, n*w.Cols))
		all := make([]float32, n*w.Rows)
		fn.rows(all, w.Rows, xb, n, w, 0, w.Rows)
		for i := 0; i < n; i++ {
			for _, m := range []int{1, 2, 5} {
				if i+m > n {
					continue
				}
				part := make([]float32, m*w.Rows)
				fn.rows(part, w.Rows, xb[i*w.Cols:(i+m)*w.Cols], m, w, 0, w.Rows)
				for j := range part[:w.Rows] {
					if part[j] != all[i*w.Rows+j] {
						t.Fatalf("%s: row %d in a batch of %d differs from the batch of %d: %g vs %g", fn.name, i, m, n, part[j], all[i*w.Rows+j])
					}
				}
			}
		}
	}
}

// FuzzDPRows checks the tiles against the reference on fuzzer-chosen shapes and values.
func FuzzDPRows(f *testing.F) {
	f.Add(uint8(1), uint8(1), uint8(1), uint64(1))
	f.Add(uint8(6), uint8(3), uint8(7), uint64(2))
	f.Fuzz(func(t *testing.T, rowTiles, chunks, n uint8, seed uint64) {
		rows, cols, m := 4*(1+int(rowTiles%8)), 32*(1+int(chunks%8)), 1+int(n%14)
		r := rand.New(rand.NewPCG(seed, seed^5))
		w := fastRandMatrix(r, rows, cols)
		x := fastRandVec(r, m*cols)
		if haveBF16 {
			checkDP(t, w, x, m, 0, rows, dpRows)
		}
		checkDP(t, w, x, m, 0, rows, dpRowsGo)
	})
}

// BenchmarkProduct compares one thread's product kernels on a 16384×2048 weight (64 MB:
// streamed from memory) at decode and prefill batch sizes: widen (the float32 tiles that
// widen bf16 weights), pairs (the exact pair tiles) and bf16 (VDPBF16PS). GMAC/s is the
// multiply-add rate by wall time; pairs-old and bf16-old are the former kernel sets (tiles
// without prefetching, row blocks at every batch size), kept for comparison. GMAC/s is the
// multiply-add rate by wall time, cpu-GMAC/s by the thread's CPU time (steadier on a shared
// machine: time the thread spent descheduled is not counted).
func BenchmarkProduct(b *testing.B) {
	r := rand.New(rand.NewPCG(1, 2))
	w := fastRandMatrix(r, 16384, 2048)
	for _, n := range []int{1, 8, 64} {
		x := fastRandVec(r, n*w.Cols)
		xb := bf16Vec(x)
		xp := make([]float32, len(x))
		permutePairs(xp, x)
		out := make([]float32, n*w.Rows)
		macs := float64(n) * float64(w.Rows) * float64(w.Cols)
		for _, k := range []struct {
			name string
			ok   bool
			run  func()
		}{
			{"widen", true, func() { matRows(out, x, n, w, 0, w.Rows, w.Rows, w.Cols) }},
			{"pairs-old", pairOK(w), func() { pairOld.rows(out, w.Rows, xp, n, w, 0, w.Rows) }},
			{"pairs", pairOK(w), func() { pairRows(out, w.Rows, xp, n, w, 0, w.Rows) }},
			{"bf16-old", dpOK(w), func() { dpOld.rows(out, w.Rows, xb, n, w, 0, w.Rows) }},
			{"bf16", dpOK(w), func() { dpRows(out, w.Rows, xb, n, w, 0, w.Rows) }},
		} {
			if !k.ok {
				continue
			}
			b.Run(k.name+"/n="+itoa(n), func(b *testing.B) {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				b.SetBytes(int64(2 * w.Rows * w.Cols))
				c0 := threadCPU()
				for b.Loop() {
					k.run()
				}
				b.ReportMetric(macs*float64(b.N)/b.Elapsed().Seconds()/1e9, "GMAC/s")
				b.ReportMetric(macs*float64(b.N)/(threadCPU()-c0).Seconds()/1e9, "cpu-GMAC/s")
			})
		}
	}
}

// threadCPU is the calling thread's CPU time (Linux; 0 elsewhere).
func threadCPU() time.Duration {
	var ts syscall.Timespec
	const clockThreadCPUTime = 3
	if _, _, e := syscall.Syscall(syscall.SYS_CLOCK_GETTIME, clockThreadCPUTime, uintptr(unsafe.Pointer(&ts)), 0); e != 0 {
		return 0
	}
	return time.Duration(ts.Nano())
}

func itoa(n int) string {
	s := ""
	for ; n > 0; n /= 10 {
		s = string(rune('0'+n%10)) + s
	}
	return s
}

// pairProduct runs pairRows on x after permuting it.
func pairProduct(out []float32, ldo int, x []float32, n int, w *model.Matrix, lo, hi int) {
	xp := make([]float32, len(x))
	permutePairs(xp, x)
	pairRows(out, ldo, xp, n, w, lo, hi)
}

// TestPairRowsMatchReference: the pair tiles compute the exact product of float32 activations
// (within float32 summation error), for every tile height and several shapes, and write
// nothing outside their rows.
func TestPairRowsMatchReference(t *testing.T) {
	if !haveAVX512 {
		t.Skip("no AVX-512: the pair tiles do not run here")
	}
	r := rand.New(rand.NewPCG(11, 12))
	for _, sh := range []struct{ rows, cols int }{{4, 32}, {8, 64}, {64, 256}, {36, 2048}, {12, 160}} {
		w := fastRandMatrix(r, sh.rows, sh.cols)
		for _, n := range []int{1, 2, 3, 4, 5, 6, 7, 12, 13} {
			x := fastRandVec(r, n*sh.cols)
			checkPair(t, w, x, n, 0, sh.rows)
			if sh.rows >= 8 {
				checkPair(t, w, x, n, 4, sh.rows-4)
			}
		}
	}
}

func checkPair(t testing.TB, w *model.Matrix, x []float32, n, lo, hi int) {
	t.Helper()
	const sentinel = -12345
	got := make([]float32, n*w.Rows)
	for i := range got {
		got[i] = sentinel
	}
	pairProduct(got, w.Rows, x, n, w, lo, hi)
	want := make([]float32, n*w.Rows)
	Reference{}.MatMul(want, x, n, w)
	for i := 0; i < n; i++ {
		for r := 0; r < w.Rows; r++ {
			g, wv := got[i*w.Rows+r], want[i*w.Rows+r]
			if r < lo || r >= hi {
				if g != sentinel {
					t.Fatalf("%d×%d n %d [%d,%d): wrote column %d of row %d", w.Rows, w.Cols, n, lo, hi, r, i)
				}
				continue
			}
			var abs float64
			for c := 0; c < w.Cols; c++ {
				abs += math.Abs(float64(model.BF16ToF32(w.BF16[r*w.Cols+c])) * float64(x[i*w.Cols+c]))
			}
			tol := 2 * float64(w.Cols/16+6) * 0x1p-24 * abs
			if d := math.Abs(float64(g - wv)); d > tol || math.IsNaN(float64(g)) {
				t.Fatalf("%d×%d n %d: out[%d,%d] = %g, reference %g (|diff| %g > %g)", w.Rows, w.Cols, n, i, r, g, wv, d, tol)
			}
		}
	}
}

// TestPairRowsBatchInvariant: each output row is bit for bit the same alone as in any batch.
func TestPairRowsBatchInvariant(t *testing.T) {
	if !haveAVX512 {
		t.Skip("no AVX-512")
	}
	r := rand.New(rand.NewPCG(13, 14))
	w := fastRandMatrix(r, 16, 96)
	const n = 13
	x := fastRandVec(r, n*w.Cols)
	all := make([]float32, n*w.Rows)
	pairProduct(all, w.Rows, x, n, w, 0, w.Rows)
	for i := 0; i < n; i++ {
		for _, m := range []int{1, 2, 5} {
			if i+m > n {
				continue
			}
			part := make([]float32, m*w.Rows)
			pairProduct(part, w.Rows, x[i*w.Cols:(i+m)*w.Cols], m, w, 0, w.Rows)
			for j := range part[:w.Rows] {
				if part[j] != all[i*w.Rows+j] {
					t.Fatalf("row %d in a batch of %d differs from the batch of %d", i, m, n)
				}
			}
		}
	}
}

// FuzzPairRows checks the pair tiles against the reference on fuzzer-chosen shapes and values.
func FuzzPairRows(f *testing.F) {
	if !haveAVX512 {
		f.Skip("no AVX-512")
	}
	f.Add(uint8(1), uint8(1), uint8(1), uint64(1))
	f.Add(uint8(6), uint8(3), uint8(7), uint64(2))
	f.Fuzz(func(t *testing.T, rowTiles, chunks, n uint8, seed uint64) {
		rows, cols, m := 4*(1+int(rowTiles%8)), 32*(1+int(chunks%8)), 1+int(n%14)
		r := rand.New(rand.NewPCG(seed, seed^5))
		checkPair(t, fastRandMatrix(r, rows, cols), fastRandVec(r, m*cols), m, 0, rows)
	})
}

// TestNormVectorMatchesScalar: the vector sum of squares agrees with the scalar float64 sum
// (another order of exact squares: within a few float64 ulps), and the vector scaling is bit
// for bit the scalar loop.
func TestNormVectorMatchesScalar(t *testing.T) {
	if !haveAVX512 {
		t.Skip("no AVX-512")
	}
	r := rand.New(rand.NewPCG(15, 16))
	for _, n := range []int{16, 64, 2048} {
		x, w := fastRandVec(r, n), fastRandVec(r, n)
		var want float64
		for _, v := range x {
			want += float64(v) * float64(v)
		}
		if got := sumSquaresAVX512(&x[0], n); math.Abs(got-want) > 1e-12*want {
			t.Errorf("n %d: sum of squares %g, scalar %g", n, got, want)
		}
		for _, add := range []bool{false, true} {
			got, ref := fastRandVec(r, n), make([]float32, n)
			copy(ref, got)
			scaleAVX512(&got[0], &x[0], &w[0], 0.37, n, add)
			for j, v := range x {
				if add {
					ref[j] += w[j] * (v * 0.37)
				} else {
					ref[j] = w[j] * (v * 0.37)
				}
			}
			for j := range got {
				if got[j] != ref[j] {
					t.Fatalf("n %d add %v: out[%d] = %g, scalar %g", n, add, j, got[j], ref[j])
				}
			}
		}
	}
}

// TestKernelSetsAgree: every kernel set (the prefetching small-batch walk, the row blocks, the
// former set) gives bit for bit the same outputs on random shapes and batch sizes, within
// [lo, hi) only, and the sets match the plain-Go reference within tolerance (checkDP,
// checkPair).
func TestKernelSetsAgree(t *testing.T) {
	if !haveAVX512 {
		t.Skip("no AVX-512")
	}
	r := rand.New(rand.NewPCG(17, 18))
	for trial := range 40 {
		rows, cols := 4*(1+r.IntN(40)), 32*(1+r.IntN(40))
		n := 1 + r.IntN(2*smallBatch)
		lo := 4 * r.IntN(rows/4)
		hi := lo + 4*(1+r.IntN((rows-lo)/4))
		w := fastRandMatrix(r, rows, cols)
		x := fastRandVec(r, n*cols)
		xp := make([]float32, len(x))
		permutePairs(xp, x)
		xb := bf16Vec(x)
		type run struct {
			name string
			ok   bool
			fn   func(out []float32)
		}
		for _, runs := range [][]run{
			{
				{"pairs", true, func(o []float32) { pairNew.rows(o, rows, xp, n, w, lo, hi) }},
				{"pairs-old", true, func(o []float32) { pairOld.rows(o, rows, xp, n, w, lo, hi) }},
				{"pairs-walk", true, func(o []float32) { k := pairNew; k.small = 1 << 20; k.rows(o, rows, xp, n, w, lo, hi) }},
			},
			{
				{"bf16", haveBF16, func(o []float32) { dpNew.rows(o, rows, xb, n, w, lo, hi) }},
				{"bf16-old", haveBF16, func(o []float32) { dpOld.rows(o, rows, xb, n, w, lo, hi) }},
				{"bf16-walk", haveBF16, func(o []float32) { k := dpNew; k.small = 1 << 20; k.rows(o, rows, xb, n, w, lo, hi) }},
				{"go", true, func(o []float32) { dpRowsGo(o, rows, xb, n, w, lo, hi) }},
			},
		} {
			var want []float32
			for _, rn := range runs {
				if !rn.ok {
					continue
				}
				got := make([]float32, n*rows)
				for i := range got {
					got[i] = -12345
				}
				rn.fn(got)
				if want == nil {
					want = got
					continue
				}
				for i := range got {
					if got[i] != want[i] && !(rn.name == "go" && closeRel(got[i], want[i], cols)) {
						t.Fatalf("trial %d %d×%d n %d [%d,%d): %s out[%d] = %g, %s %g", trial, rows, cols, n, lo, hi, rn.name, i, got[i], runs[0].name, want[i])
					}
				}
			}
		}
		if trial < 8 {
			checkPair(t, w, x, n, lo, hi)
			if haveBF16 {
				checkDP(t, w, x, n, lo, hi, dpRows)
			}
		}
	}
}

// closeRel reports whether a and b agree to float32 summation error over cols terms of
// magnitude about 1 (the Go path sums in the same lanes but may round the final sum apart).
func closeRel(a, b float32, cols int) bool {
	return math.Abs(float64(a-b)) <= float64(cols)*0x1p-22*(1+math.Abs(float64(b)))
}
