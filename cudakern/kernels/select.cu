// select.cu: the exit decision, top-k / argmax / log-sum-exp of logits, and the row gather and
// scatter of depth-compacted batching.
#include "common.cuh"

// ExitState is a token's exit bookkeeping, kept on the device across its loop steps (the host
// mirror is cudakern.ExitState; same layout: six 4-byte fields).
struct ExitState {
    float rest;    // Π_{j<t} (1 − λ_j), 1 before the first step
    float cum;     // c_t = Σ_{j≤t} p_j
    float tau;     // the Q-exit threshold
    int max_depth; // the exit is at most this deep (steps)
    int forced;    // 1: exit exactly at max_depth, ignoring the gate
    int chosen;    // the exit step (0-based), −1 until decided
};

// exit_decide applies step t's gate to a token, exactly as the engine's host code does:
// λ = σ(gate) in float64 rounded to float32; p = λ·rest (the last step takes the rest);
// rest ← rest·(1 − λ); cum += p; the exit is the first step with t + 1 ≥ max_depth, t = R − 1,
// or (not forced and) cum ≥ τ. Products and sums are rounded one at a time (no fused
// multiply-add), so the decisions are those of the host arithmetic on the same logits.
// grid (ceil(n / 128)), block 128. st [slots], slot/step [n] (slot nullptr: row i is slot i),
// gate_logit/cum_out [n] f32, chosen_out [n].
extern "C" __global__ void exit_decide(ExitState* __restrict__ st, const int* __restrict__ slot,
                                       const int* __restrict__ step, const float* __restrict__ gate_logit,
                                       float* __restrict__ cum_out, int* __restrict__ chosen_out, int n, int R) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    ExitState* s = st + (slot != nullptr ? slot[i] : i);
    int t = step[i];
    float p;
    if (t == R - 1) {
        p = s->rest;
    } else {
        float lam = (float)(1.0 / (1.0 + exp(-(double)gate_logit[i])));
        p = __fmul_rn(lam, s->rest);
        s->rest = __fmul_rn(s->rest, __fsub_rn(1.f, lam));
    }
    s->cum = __fadd_rn(s->cum, p);
    if (s->chosen < 0 && (t + 1 >= s->max_depth || t == R - 1 || (!s->forced && s->cum >= s->tau))) s->chosen = t;
    cum_out[i] = s->cum;
    chosen_out[i] = s->chosen;
}

#define TK_THREADS 256
#define TK_NONE 0x7fffffff

// ranks_before: (v, i) ranks before (bv, bi) in the order logit descending, id ascending.
__device__ __forceinline__ bool ranks_before(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

// topk writes each row's k most likely ids and their logits, most likely first, ties to the
// smaller id (the host sampler's order), and with lse non-null log Σ_c e^logit[c] (so a
// log-probability is logit − lse) and, with score_id non-null too, the log-probability of token
// score_id[r] in score_out[r] (prompt scoring; an id outside the vocabulary scores NaN). NaN
// logits never rank; a row with fewer than k ranked logits gets id −1 after them. k = 1 is
// argmax. Pass j finds the best logit ranking after pass j−1's pick: k passes over the row,
// no sorting state.
// grid (n), block TK_THREADS. logits [n, ld] f32; ids/vals [n, k]; lse, score_id, score_out [n].
extern "C" __global__ void topk(int* __restrict__ ids, float* __restrict__ vals, float* __restrict__ lse,
                                const int* __restrict__ score_id, float* __restrict__ score_out,
                                const float* __restrict__ logits, int ld, int n, int vocab, int k) {
    __shared__ float wv[TK_THREADS / 32];
    __shared__ int wi[TK_THREADS / 32];
    __shared__ float red[32];
    int r = blockIdx.x;
    if (r >= n) return;
    const float* x = logits + (i64)r * ld;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float pv = LS_INF;
    int pi = -1;
    for (int j = 0; j < k; j++) {
        float bv = -LS_INF;
        int bi = TK_NONE;
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
            float v = x[c];
            if (v != v) continue;
            bool after = v < pv || (v == pv && c > pi);
            if (after && ranks_before(v, c, bv, bi)) {
                bv = v;
                bi = c;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ranks_before(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            wv[warp] = bv;
            wi[warp] = bi;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < nw; w++)
                if (ranks_before(wv[w], wi[w], bv, bi)) {
                    bv = wv[w];
                    bi = wi[w];
                }
            wv[0] = bv;
            wi[0] = bi;
            ids[(i64)r * k + j] = bi == TK_NONE ? -1 : bi;
            vals[(i64)r * k + j] = bv;
        }
        __syncthreads();
        pv = wv[0];
        pi = wi[0];
        __syncthreads(); // wv/wi are rewritten by the next pass
    }
    if (lse != nullptr) {
        float m = -LS_INF;
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
            float v = x[c];
            if (v == v) m = fmaxf(m, v);
        }
        m = block_max(m, red);
        float s = 0.f;
        if (m != -LS_INF) {
            for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
                float v = x[c];
                if (v == v) s += expf(v - m);
            }
        }
        s = block_sum(s, red);
        if (threadIdx.x == 0) {
            float z = m == -LS_INF ? -LS_INF : m + logf(s);
            lse[r] = z;
            if (score_id != nullptr) {
                int id = score_id[r];
                score_out[r] = id >= 0 && id < vocab ? x[id] - z : __int_as_float(0x7fc00000);
            }
        }
    }
}

// gather_rows: dst[i] = src[idx[i]] (compacting the rows still running a loop step).
// grid (ceil(cols / 256), m), block 256. dst [m, cols], src [*, cols] f32, idx [m].
extern "C" __global__ void gather_rows(float* __restrict__ dst, const float* __restrict__ src,
                                       const int* __restrict__ idx, int m, int cols) {
    int i = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m || c >= cols) return;
    dst[(i64)i * cols + c] = src[(i64)idx[i] * cols + c];
}

// scatter_rows: dst[idx[i]] = src[i] (the inverse: results back to the rows' own places).
// grid (ceil(cols / 256), m), block 256. dst [*, cols], src [m, cols] f32, idx [m] distinct.
extern "C" __global__ void scatter_rows(float* __restrict__ dst, const float* __restrict__ src,
                                        const int* __restrict__ idx, int m, int cols) {
    int i = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m || c >= cols) return;
    dst[(i64)idx[i] * cols + c] = src[(i64)i * cols + c];
}
