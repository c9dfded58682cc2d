package cpu

import (
	"math"

	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// Reference is the oracle backend: plain single-threaded loops with float64 accumulation,
// written for obviousness, not speed. Optimised kernels are tested against it. The zero value
// is ready to use and safe for concurrent use.
type Reference struct{}

var _ engine.Backend = Reference{}

// MatMul implements engine.Backend.
func (Reference) MatMul(out, x []float32, n int, w *model.Matrix) {
	row := make([]float32, w.Cols)
	for r := 0; r < w.Rows; r++ {
		w.Row(r, row)
		for i := 0; i < n; i++ {
			var s float64
			for j, v := range row {
				s += float64(v) * float64(x[i*w.Cols+j])
			}
			out[i*w.Rows+r] = float32(s)
		}
	}
}

// RMSNorm implements engine.Backend.
func (Reference) RMSNorm(out, x []float32, n int, weight []float32, eps float32) {
	d := len(weight)
	for i := 0; i < n; i++ {
		var ss float64
		for _, v := range x[i*d : (i+1)*d] {
			ss += float64(v) * float64(v)
		}
		inv := 1 / math.Sqrt(ss/float64(d)+float64(eps))
		for j := 0; j < d; j++ {
			out[i*d+j] = float32(float64(weight[j]) * float64(x[i*d+j]) * inv)
		}
	}
}

// RoPE implements engine.Backend.
func (Reference) RoPE(x []float32, n, heads, headDim int, pos []int, invFreq []float32) {
	half := headDim / 2
	for i := 0; i < n; i++ {
		for h := 0; h < heads; h++ {
			v := x[(i*heads+h)*headDim : (i*heads+h+1)*headDim]
			for k := 0; k < half; k++ {
				// The angle is a float32 product, as in the Hugging Face implementation.
				ang := float64(float32(pos[i]) * invFreq[k])
				c, s := math.Cos(ang), math.Sin(ang)
				a, b := float64(v[k]), float64(v[k+half])
				v[k] = float32(a*c - b*s)
				v[k+half] = float32(b*c + a*s)
			}
		}
	}
}

// SiLUMul implements engine.Backend.
func (Reference) SiLUMul(gate, up []float32) {
	for i, g := range gate {
		gate[i] = float32(float64(g) / (1 + math.Exp(-float64(g))) * float64(up[i]))
	}
}

// Attention implements engine.Backend.
func (Reference) Attention(jobs []engine.AttnJob, heads, kvHeads, headDim int, scale float32) {
	kvDim := kvHeads * headDim
	for _, j := range jobs {
		if j.K16 != nil {
			// Widen bfloat16 keys and values; the arithmetic below is the oracle's.
			j.K, j.V = make([]float32, len(j.K16)), make([]float32, len(j.V16))
			for i := range j.K16 {
				j.K[i], j.V[i] = model.BF16ToF32(j.K16[i]), model.BF16ToF32(j.V16[i])
			}
		}
		for h := 0; h < heads; h++ {
			kh := h / (heads / kvHeads)
			sc := make([]float64, j.N)
			mx := math.Inf(-1)
			for p := 0; p < j.N; p++ {
				var s float64
				for d := 0; d < headDim; d++ {
					s += float64(j.Q[h*headDim+d]) * float64(j.K[p*kvDim+kh*headDim+d])
				}
				sc[p] = s * float64(scale)
				mx = math.Max(mx, sc[p])
			}
			var sum float64
			for p := range sc {
				sc[p] = math.Exp(sc[p] - mx)
				sum += sc[p]
			}
			for d := 0; d < headDim; d++ {
				var o float64
				for p := range sc {
					o += sc[p] / sum * float64(j.V[p*kvDim+kh*headDim+d])
				}
				j.Out[h*headDim+d] = float32(o)
			}
		}
	}
}
