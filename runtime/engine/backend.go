package engine

import "github.com/loopserve/loopserve/runtime/model"

// Backend runs the numeric kernels of a forward pass. Buffers are row-major float32 on the
// host; n is the number of rows (tokens) in a batch. Each output row must depend only on its
// own input row (never on n or on the other rows), so a token's result does not depend on
// what else is batched with it. Implementations must be safe for concurrent use.
type Backend interface {
	// MatMul computes out[n, w.Rows] = x[n, w.Cols] · wᵀ, reading w once for all n rows.
	MatMul(out, x []float32, n int, w *model.Matrix)
	// RMSNorm computes out[n, d] = x / sqrt(mean(x²) + eps) · weight, d = len(weight);
	// out may alias x.
	RMSNorm(out, x []float32, n int, weight []float32, eps float32)
	// RoPE rotates x[n, heads·headDim] in place at positions pos[n] (rotate-half convention),
	// with invFreq[headDim/2] the per-pair frequencies.
	RoPE(x []float32, n, heads, headDim int, pos []int, invFreq []float32)
	// SiLUMul computes gate[i] = silu(gate[i]) · up[i] over the whole slices.
	SiLUMul(gate, up []float32)
	// Attention computes causal grouped-query attention for each job.
	Attention(jobs []AttnJob, heads, kvHeads, headDim int, scale float32)
}

// AttnJob is one query row attending over N cached positions, whose keys and values are
// float32 (K, V) or, with Options.KVBF16, bfloat16 bits (K16, V16).
type AttnJob struct {
	Q        []float32 // [heads·headDim]
	K, V     []float32 // [N, kvHeads·headDim], or nil
	K16, V16 []uint16  // [N, kvHeads·headDim], or nil
	N        int
	Out      []float32 // [heads·headDim]
}

// MultiMatMuler is an optional Backend fast path: several weights with the same Cols applied
// to the same input in one parallel pass (q/k/v, gate/up), saving a synchronisation each.
type MultiMatMuler interface {
	MultiMatMul(outs [][]float32, x []float32, n int, ws []*model.Matrix)
}
