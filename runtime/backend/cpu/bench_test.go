package cpu

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/loopserve/loopserve/runtime/model"
)

// benchShapes are Ouro-1.4B's matrices (q/o, gate/up, down, and the LM head).
var benchShapes = []struct {
	name       string
	rows, cols int
}{
	{"2048x2048", 2048, 2048},
	{"5632x2048", 5632, 2048},
	{"2048x5632", 2048, 5632},
}

// BenchmarkMatMul measures the backend's bf16 MatMul (whichever path it takes) at decode (n 1,
// 8) and prefill (n 128) batch sizes, reporting weight GB/s and GFLOP/s.
func BenchmarkMatMul(b *testing.B) {
	be := New(0)
	benchMatMul(b, func(out, x []float32, n int, w *model.Matrix) { be.MatMul(out, x, n, w) })
}

// BenchmarkMatMulPortable is MatMul with the vector path switched off: the pure-Go fallback.
func BenchmarkMatMulPortable(b *testing.B) {
	saved2, saved512 := haveAVX2FMA, haveAVX512
	haveAVX2FMA, haveAVX512 = false, false
	defer func() { haveAVX2FMA, haveAVX512 = saved2, saved512 }()
	be := New(0)
	benchMatMul(b, func(out, x []float32, n int, w *model.Matrix) { be.MatMul(out, x, n, w) })
}

// BenchmarkMatMulFast is the assembly path alone, split over GOMAXPROCS workers like MatMul.
func BenchmarkMatMulFast(b *testing.B) {
	if !haveAVX2FMA && !haveAVX512 {
		b.Skip("no AVX2/FMA or AVX-512")
	}
	be := New(0)
	benchMatMul(b, func(out, x []float32, n int, w *model.Matrix) {
		be.parallel(w.Rows, w.Rows*w.Cols*n, func(lo, hi int) { fastMatRows(out, x, n, w, lo, hi, w.Rows, w.Cols) })
	})
}

func benchMatMul(b *testing.B, mm func(out, x []float32, n int, w *model.Matrix)) {
	r := rand.New(rand.NewPCG(1, 1))
	for _, s := range benchShapes {
		w := fastRandMatrix(r, s.rows, s.cols)
		for _, n := range benchBatches {
			b.Run(fmt.Sprintf("%s/n%d", s.name, n), func(b *testing.B) {
				x := fastRandVec(r, n*s.cols)
				out := make([]float32, n*s.rows)
				for b.Loop() {
					mm(out, x, n, w)
				}
				sec := b.Elapsed().Seconds() / float64(b.N)
				b.ReportMetric(float64(2*s.rows*s.cols)/sec/1e9, "wGB/s")
				b.ReportMetric(float64(2*s.rows*s.cols*n)/sec/1e9, "GFLOP/s")
			})
		}
	}
}

// benchBatches are the batch sizes benchMatMul runs: decode at 1 and 8, prefill at 128.
var benchBatches = []int{1, 8, 128}
