package cpu_test

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/backend/host"
	"github.com/loopserve/loopserve/runtime/model"
)

func randVec(r *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64())
	}
	return v
}

func toBF16(v []float32) []uint16 {
	out := make([]uint16, len(v))
	for i, x := range v {
		out[i] = model.F32ToBF16(x)
	}
	return out
}

func randMatrix(r *rand.Rand, rows, cols int, bf16 bool) *model.Matrix {
	v := randVec(r, rows*cols)
	m := &model.Matrix{Name: "w", Rows: rows, Cols: cols}
	if bf16 {
		m.BF16 = make([]uint16, len(v))
		for i, x := range v {
			m.BF16[i] = model.F32ToBF16(x)
		}
	} else {
		m.F32 = v
	}
	return m
}

// close reports whether got is within tol (relative to the scale of want) everywhere.
func closeTo(t *testing.T, what string, got, want []float32, tol float64) {
	t.Helper()
	var scale float64
	for _, w := range want {
		scale = math.Max(scale, math.Abs(float64(w)))
	}
	for i := range want {
		if d := math.Abs(float64(got[i]) - float64(want[i])); d > tol*math.Max(scale, 1) || math.IsNaN(float64(got[i])) {
			t.Fatalf("%s[%d] = %g, want %g (tolerance %g × %g)", what, i, got[i], want[i], tol, scale)
		}
	}
}

func TestKernelsMatchReference(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	be := cpu.New(4)
	ref := cpu.Reference{}
	for _, tc := range []struct{ n, rows, cols int }{{1, 7, 5}, {1, 256, 256}, {3, 130, 67}, {9, 704, 256}, {2, 1024, 64}} {
		for _, bf := range []bool{true, false} {
			w := randMatrix(r, tc.rows, tc.cols, bf)
			x := randVec(r, tc.n*tc.cols)
			got, want := make([]float32, tc.n*tc.rows), make([]float32, tc.n*tc.rows)
			be.MatMul(got, x, tc.n, w)
			ref.MatMul(want, x, tc.n, w)
			closeTo(t, "MatMul", got, want, 1e-5)
			// Each output row must not depend on the batch it was computed in.
			for i := 0; i < tc.n; i++ {
				one := make([]float32, tc.rows)
				be.MatMul(one, x[i*tc.cols:(i+1)*tc.cols], 1, w)
				for j := range one {
					if one[j] != got[i*tc.rows+j] {
						t.Fatalf("row %d of %d differs alone: %g vs %g", i, tc.n, one[j], got[i*tc.rows+j])
					}
				}
			}
			w2 := randMatrix(r, tc.rows+3, tc.cols, bf)
			outs := [][]float32{make([]float32, tc.n*tc.rows), make([]float32, tc.n*(tc.rows+3))}
			be.MultiMatMul(outs, x, tc.n, []*model.Matrix{w, w2})
			want2 := make([]float32, tc.n*(tc.rows+3))
			ref.MatMul(want2, x, tc.n, w2)
			closeTo(t, "MultiMatMul[0]", outs[0], want, 1e-5)
			closeTo(t, "MultiMatMul[1]", outs[1], want2, 1e-5)
		}
	}
	// An empty batch is a no-op (a prefill chunk that needs no logits).
	be.MatMul(nil, nil, 0, randMatrix(r, 1024, 64, true))
	be.MultiMatMul([][]float32{nil}, nil, 0, []*model.Matrix{randMatrix(r, 8, 64, true)})
	for _, n := range []int{1, 5, 300} {
		d := 64
		x, wt := randVec(r, n*d), randVec(r, d)
		got, want := make([]float32, n*d), make([]float32, n*d)
		be.RMSNorm(got, x, n, wt, 1e-6)
		ref.RMSNorm(want, x, n, wt, 1e-6)
		closeTo(t, "RMSNorm", got, want, 1e-6)

		heads, hd := 4, 16
		pos := make([]int, n)
		for i := range pos {
			pos[i] = r.IntN(4000)
		}
		inv := make([]float32, hd/2)
		for i := range inv {
			inv[i] = float32(1 / math.Pow(10000, float64(2*i)/float64(hd)))
		}
		a := randVec(r, n*heads*hd)
		b := append([]float32(nil), a...)
		be.RoPE(a, n, heads, hd, pos, inv)
		ref.RoPE(b, n, heads, hd, pos, inv)
		closeTo(t, "RoPE", a, b, 1e-5)

		g, u := randVec(r, n*d), randVec(r, n*d)
		g2 := append([]float32(nil), g...)
		be.SiLUMul(g, u)
		ref.SiLUMul(g2, u)
		closeTo(t, "SiLUMul", g, g2, 1e-6)
	}
	// Head widths 16 and 128 take the vector loops (where the CPU has them), 12 the plain ones.
	for _, hd := range []int{16, 12, 128} {
		heads, kvHeads := 8, 2
		var jobs, refJobs []host.AttnJob
		for _, n := range []int{1, 2, 17, 90} {
			q := randVec(r, heads*hd)
			k, v := randVec(r, n*kvHeads*hd), randVec(r, n*kvHeads*hd)
			jobs = append(jobs, host.AttnJob{Q: q, Runs: host.Contiguous(k, v, n), Out: make([]float32, heads*hd)})
			refJobs = append(refJobs, host.AttnJob{Q: q, Runs: host.Contiguous(k, v, n), Out: make([]float32, heads*hd)})
		}
		scale := float32(1 / math.Sqrt(float64(hd)))
		be.Attention(jobs, heads, kvHeads, hd, scale)
		ref.Attention(refJobs, heads, kvHeads, hd, scale)
		for i := range jobs {
			closeTo(t, "Attention", jobs[i].Out, refJobs[i].Out, 1e-5)
		}
		// bfloat16 keys and values.
		for i := range jobs {
			run := jobs[i].Runs[0]
			half := []host.Run{{K16: toBF16(run.K), V16: toBF16(run.V), N: run.N}}
			jobs[i].Runs, refJobs[i].Runs = half, half
		}
		be.Attention(jobs, heads, kvHeads, hd, scale)
		ref.Attention(refJobs, heads, kvHeads, hd, scale)
		for i := range jobs {
			closeTo(t, "Attention bf16", jobs[i].Out, refJobs[i].Out, 1e-5)
		}
	}
}

// BenchmarkAttention is one decode token's attention over 1024 cached positions in one layer
// of an Ouro-1.4B-shaped model (16 heads of 128).
func BenchmarkAttention(b *testing.B) {
	r := rand.New(rand.NewPCG(1, 2))
	const heads, hd, n = 16, 128, 1024
	jobs := []host.AttnJob{{Q: randVec(r, heads*hd), Runs: host.Contiguous(randVec(r, n*heads*hd), randVec(r, n*heads*hd), n), Out: make([]float32, heads*hd)}}
	be := cpu.New(0)
	for b.Loop() {
		be.Attention(jobs, heads, heads, hd, 0.088)
	}
}

func BenchmarkMatVecBF16(b *testing.B) {
	r := rand.New(rand.NewPCG(1, 2))
	w := randMatrix(r, 2048, 2048, true)
	x := randVec(r, 2048)
	out := make([]float32, 2048)
	be := cpu.New(0)
	b.SetBytes(int64(2 * w.Rows * w.Cols))
	for b.Loop() {
		be.MatMul(out, x, 1, w)
	}
}

func BenchmarkMatMulBF16Batch8(b *testing.B) {
	r := rand.New(rand.NewPCG(1, 2))
	w := randMatrix(r, 2048, 2048, true)
	x := randVec(r, 8*2048)
	out := make([]float32, 8*2048)
	be := cpu.New(0)
	b.SetBytes(int64(2 * w.Rows * w.Cols))
	for b.Loop() {
		be.MatMul(out, x, 8, w)
	}
}

// TestConcurrentUseAndClose runs kernels from several goroutines on one backend (the pool is
// shared), then closes it.
func TestConcurrentUseAndClose(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	be := cpu.New(3)
	w := randMatrix(r, 512, 256, true)
	x := randVec(r, 2*256)
	want := make([]float32, 2*512)
	cpu.Reference{}.MatMul(want, x, 2, w)
	done := make(chan []float32)
	for range 4 {
		go func() {
			out := make([]float32, 2*512)
			for range 20 {
				be.MatMul(out, x, 2, w)
			}
			done <- out
		}()
	}
	for range 4 {
		closeTo(t, "MatMul", <-done, want, 1e-5)
	}
	if err := be.Close(); err != nil {
		t.Fatal(err)
	}
}
