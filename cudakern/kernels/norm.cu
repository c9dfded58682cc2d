// norm.cu: embedding gather, RMSNorm, and the fused residual + sandwich norms of a layer.
// One block per row; a row's result depends on that row alone.
#include "common.cuh"

// row_rms_scale is 1/sqrt(mean(x²) + eps) of x[cols], for every thread of the block.
__device__ __forceinline__ float row_rms_scale(const float* __restrict__ x, int cols, float eps, float* red) {
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = x[c];
        ss += v * v;
    }
    ss = block_sum(ss, red);
    return 1.f / sqrtf(ss / (float)cols + eps);
}

// embed: h[r] = table[ids[r]] widened to f32; an id outside [0, vocab) gives a zero row
// (the engine validates ids; the device never reads out of bounds).
// grid (n), block 256. h [n, cols] f32, table [vocab, cols] bf16, ids [n].
extern "C" __global__ void embed(float* __restrict__ h, const bf16* __restrict__ table,
                                 const int* __restrict__ ids, int n, int cols, int vocab) {
    int r = blockIdx.x;
    if (r >= n) return;
    int id = ids[r];
    bool ok = id >= 0 && id < vocab;
    const bf16* src = table + (i64)(ok ? id : 0) * cols;
    float* dst = h + (i64)r * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = ok ? bf16_to_f32(src[c]) : 0.f;
}

// rmsnorm: out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w.
// grid (n), block 256. out [n, cols] act_t, x [n, cols] f32, w [cols] f32.
extern "C" __global__ void rmsnorm(act_t* __restrict__ out, const float* __restrict__ x,
                                   const float* __restrict__ w, int n, int cols, float eps) {
    __shared__ float red[32];
    int r = blockIdx.x;
    if (r >= n) return;
    const float* xr = x + (i64)r * cols;
    act_t* o = out + (i64)r * cols;
    float s = row_rms_scale(xr, cols, eps, red);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) store(o + c, xr[c] * s * w[c]);
}

// residual_norm is the seam between two sublayers, fused (each step optional but the first):
//   h ← h + rmsnorm(o)·w_post                 (the sublayer's output norm and the residual add)
//   h ← rmsnorm(h)·w_mid          if w_mid    (the final norm of a loop step: next input, gate input)
//   x_out ← rmsnorm(h)·w_next     if w_next   (the next sublayer's input norm, as a GEMM input)
//   gate_out[r] ← gate_w·h + gate_b  if gate_w (the exit gate's logit of the normed state)
// grid (n), block 256. h [n, cols] f32 in place, o [n, cols] f32, weights [cols] f32,
// x_out [n, cols] act_t, gate_out [n] f32.
extern "C" __global__ void residual_norm(float* __restrict__ h, const float* __restrict__ o,
                                         const float* __restrict__ w_post, const float* __restrict__ w_mid,
                                         const float* __restrict__ w_next, act_t* __restrict__ x_out,
                                         const float* __restrict__ gate_w, float gate_b, float* __restrict__ gate_out,
                                         int n, int cols, float eps) {
    __shared__ float red[32];
    int r = blockIdx.x;
    if (r >= n) return;
    float* hr = h + (i64)r * cols;
    const float* orow = o + (i64)r * cols;
    // Each thread reads back only the columns it wrote itself: no barrier between passes.
    float s = row_rms_scale(orow, cols, eps, red);
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = hr[c] + orow[c] * s * w_post[c];
        hr[c] = v;
        ss += v * v;
    }
    ss = block_sum(ss, red);
    if (w_mid != nullptr) {
        float s2 = 1.f / sqrtf(ss / (float)cols + eps);
        ss = 0.f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = hr[c] * s2 * w_mid[c];
            hr[c] = v;
            ss += v * v;
        }
        ss = block_sum(ss, red);
    }
    if (w_next != nullptr) {
        float s3 = 1.f / sqrtf(ss / (float)cols + eps);
        act_t* xo = x_out + (i64)r * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) store(xo + c, hr[c] * s3 * w_next[c]);
    }
    if (gate_w != nullptr) {
        float g = 0.f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) g += hr[c] * gate_w[c];
        g = block_sum(g, red);
        if (threadIdx.x == 0) gate_out[r] = g + gate_b;
    }
}

// cast_rows: out[r] = x[r] as act_t (the LM head's input: the normed state, f32, rounded to
// the GEMM input type; a plain copy in the f32 mode).
// grid (n), block 256. out [n, cols] act_t, x [n, cols] f32.
extern "C" __global__ void cast_rows(act_t* __restrict__ out, const float* __restrict__ x, int n, int cols) {
    int r = blockIdx.x;
    if (r >= n) return;
    const float* xr = x + (i64)r * cols;
    act_t* o = out + (i64)r * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) store(o + c, xr[c]);
}
