// matmul.cu: the bf16-weight matrix product for small batches, and SwiGLU.
#include "common.cuh"

#define MM_ROWS 8  // input rows per block: each weight element is read once per MM_ROWS rows
#define MM_WARPS 8 // output columns per block, one per warp

// matmul_rows: out[r, j] = Σ_k x[r, k] · w[j, k] (f32 accumulation) for r < n, j < N.
// A warp owns one weight row (output column j) and up to MM_ROWS input rows; lane l takes the
// 8 consecutive k at 8·l + 256·i (one 16-byte load of w), accumulating in k order, then the
// warp adds its lanes in a fixed butterfly. A result is therefore the same sequence of
// operations whatever n is and whichever block holds the row: batch-invariant.
// Needs K % 8 == 0, w and x rows 16-byte aligned (ldx % 8 == 0).
// grid (ceil(N / MM_WARPS), ceil(n / MM_ROWS)), block 32·MM_WARPS.
// out [n, ldo] f32, x [n, ldx] act_t, w [N, K] bf16.
extern "C" __global__ void matmul_rows(float* __restrict__ out, int ldo, const act_t* __restrict__ x, int ldx,
                                       const bf16* __restrict__ w, int n, int N, int K) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int j = blockIdx.x * MM_WARPS + warp;
    int r0 = blockIdx.y * MM_ROWS;
    if (j >= N || r0 >= n) return; // warp-uniform; no barrier follows
    int nr = min(MM_ROWS, n - r0);
    float acc[MM_ROWS];
#pragma unroll
    for (int i = 0; i < MM_ROWS; i++) acc[i] = 0.f;
    const bf16* wr = w + (i64)j * K;
    const act_t* xb = x + (i64)r0 * ldx;
    for (int k = lane * 8; k < K; k += 256) {
        float wf[8];
        load8(wr + k, wf);
#pragma unroll
        for (int i = 0; i < MM_ROWS; i++) {
            if (i < nr) {
                float xf[8];
                load8(xb + (i64)i * ldx + k, xf);
                float s = acc[i];
#pragma unroll
                for (int e = 0; e < 8; e++) s = fmaf(wf[e], xf[e], s);
                acc[i] = s;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < MM_ROWS; i++) {
        if (i < nr) {
            float v = warp_sum(acc[i]);
            if (lane == 0) out[(i64)(r0 + i) * ldo + j] = v;
        }
    }
}

// swiglu: out[r, c] = silu(g[r, c]) · u[r, c], silu(x) = x / (1 + e^−x).
// grid (ceil(cols / 256), n), block 256. out [n, cols] act_t, g [n, ldg], u [n, ldu] f32
// (g and u may be the two halves of one fused gate/up product).
extern "C" __global__ void swiglu(act_t* __restrict__ out, const float* __restrict__ g, int ldg,
                                  const float* __restrict__ u, int ldu, int n, int cols) {
    int r = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n || c >= cols) return;
    float x = g[(i64)r * ldg + c];
    store(out + (i64)r * cols + c, x / (1.f + expf(-x)) * u[(i64)r * ldu + c]);
}
