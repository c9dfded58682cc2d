// rope.cu: rotary position embedding fused with the KV cache write, and KV position copies.
#include "common.cuh"

// rope_angle is (cos, sin) of position p at frequency i: from the host's table (built exactly
// as the CPU backend's: float32(p)·inv_freq[i], then a float64 sin/cos rounded to float32)
// for p < rope_len, computed the same way past it.
__device__ __forceinline__ void rope_angle(int p, int i, const float* __restrict__ rope_cs, int rope_len,
                                           const float* __restrict__ inv_freq, float* c, float* s) {
    if (p < rope_len) {
        const float* e = rope_cs + ((i64)p * (HD / 2) + i) * 2;
        *c = e[0];
        *s = e[1];
        return;
    }
    float a = __fmul_rn((float)p, inv_freq[i]);
    double sd, cd;
    sincos((double)a, &sd, &cd);
    *c = (float)cd;
    *s = (float)sd;
}

// rope_kv rotates each row's queries in place (rotate-half convention, heads of HD) and writes
// its rotated keys and its values into the row's KV cache at the row's position.
// Row r's cache is the page list page_tab + tab_off[r] + layer_off (the backend lays out one
// list per sequence, loop-step slot and layer; layer_off selects the layer).
// grid (n), block 128. q [n, ldq] f32 (nh·HD used), k [n, ldk], v [n, ldv] f32 (nkv·HD used),
// pos/tab_off [n], pools [pages, KV_PAGE, nkv·HD] kv_t, rope_cs [rope_len, HD/2, 2] f32,
// inv_freq [HD/2] f32.
extern "C" __global__ void rope_kv(float* __restrict__ q, int ldq, const float* __restrict__ k, int ldk,
                                   const float* __restrict__ v, int ldv, const int* __restrict__ pos,
                                   const int* __restrict__ tab_off, const int* __restrict__ page_tab, int layer_off,
                                   kv_t* __restrict__ k_pool, kv_t* __restrict__ v_pool,
                                   const float* __restrict__ rope_cs, int rope_len, const float* __restrict__ inv_freq,
                                   int n, int nh, int nkv) {
    const int half = HD / 2;
    int r = blockIdx.x;
    if (r >= n) return;
    int p = pos[r];
    int kv_dim = nkv * HD;
    i64 slot = kv_slot(page_tab + tab_off[r] + layer_off, p);
    kv_t* kd = k_pool + slot * kv_dim;
    kv_t* vd = v_pool + slot * kv_dim;
    for (int e = threadIdx.x; e < (nh + nkv) * half; e += blockDim.x) {
        int head = e / half, i = e % half;
        float c, s;
        rope_angle(p, i, rope_cs, rope_len, inv_freq, &c, &s);
        if (head < nh) {
            float* x = q + (i64)r * ldq + head * HD;
            float a = x[i], b = x[i + half];
            x[i] = a * c - b * s;
            x[i + half] = b * c + a * s;
        } else {
            int kh = head - nh;
            const float* x = k + (i64)r * ldk + kh * HD;
            float a = x[i], b = x[i + half];
            store(kd + kh * HD + i, a * c - b * s);
            store(kd + kh * HD + i + half, b * c + a * s);
        }
    }
    const float* vr = v + (i64)r * ldv;
    for (int e = threadIdx.x; e < kv_dim; e += blockDim.x) store(vd + e, vr[e]);
}

// kv_copy copies the keys and values at position src_pos[j] of the cache page_tab + src_off[j]
// to position dst_pos[j] of the cache page_tab + dst_off[j], for m jobs (offsets include the
// layer): the full KV policy fills the later loop steps' caches of a token that exited early
// from its exit step's cache; probes and chunked prefill move positions between caches. The
// jobs' destinations must be distinct positions.
// grid (m), block 128. pools [pages, KV_PAGE, kv_dim] kv_t; src_off/dst_off/src_pos/dst_pos [m].
extern "C" __global__ void kv_copy(kv_t* __restrict__ k_pool, kv_t* __restrict__ v_pool,
                                   const int* __restrict__ page_tab, const int* __restrict__ src_off,
                                   const int* __restrict__ src_pos, const int* __restrict__ dst_off,
                                   const int* __restrict__ dst_pos, int m, int kv_dim) {
    int j = blockIdx.x;
    if (j >= m) return;
    i64 src = kv_slot(page_tab + src_off[j], src_pos[j]) * kv_dim;
    i64 dst = kv_slot(page_tab + dst_off[j], dst_pos[j]) * kv_dim;
    for (int e = threadIdx.x; e < kv_dim; e += blockDim.x) {
        k_pool[dst + e] = k_pool[src + e];
        v_pool[dst + e] = v_pool[src + e];
    }
}
