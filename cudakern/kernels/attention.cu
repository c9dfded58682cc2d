// attention.cu: causal grouped-query attention over the paged KV cache.
//   attn_decode + attn_combine: rows that attend alone (decode), split over the cache (split-K)
//   attn_prefill: tiles of up to PF_BQ rows of one cache (prefill, verification), K/V tiles in
//                 shared memory, online softmax.
// Queries are f32 and already rotated; scale multiplies the scores. Row r attends positions
// [0, pos[r]] of its cache page_tab + tab_off[r] + layer_off. Query head h reads kv head
// h / (nh / nkv).
#include "common.cuh"

// attn_decode: one block per (kv head, decode row, split): the G = nh/nkv query heads sharing
// the kv head, over positions [split·chunk, min(split·chunk + chunk, pos + 1)): their scores,
// local softmax (max m, sum l) and exp-weighted sum of values. A split past the row's last
// position writes l = 0 and nothing else. The chunk is fixed by the host independently of the
// batch, so a row's sums never depend on the other rows.
// grid (nkv, n, splits), block 128, dynamic shared memory (G·HD + G·chunk + 2·G)·4 bytes.
// part_o [n, nh, splits, HD] f32, part_ml [n, nh, splits, 2] f32 (indexed by the row's place i
// in the decode list); rows [n] (nullptr: row i is row i) picks the batch row.
extern "C" __global__ void attn_decode(float* __restrict__ part_o, float* __restrict__ part_ml,
                                       const float* __restrict__ q, int ldq,
                                       const kv_t* __restrict__ k_pool, const kv_t* __restrict__ v_pool,
                                       const int* __restrict__ page_tab, const int* __restrict__ tab_off, int layer_off,
                                       const int* __restrict__ pos, const int* __restrict__ rows, int n,
                                       int nh, int nkv, int chunk, float scale) {
    extern __shared__ float sm[];
    const int T = (HD + 31) / 32;
    int kvh = blockIdx.x, i = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    if (i >= n) return;
    int r = rows != nullptr ? rows[i] : i;
    int G = nh / nkv;
    int c0 = split * chunk, c1 = min(c0 + chunk, pos[r] + 1);
    int len = c1 - c0;
    if (len <= 0) {
        for (int g = threadIdx.x; g < G; g += blockDim.x) {
            float* ml = part_ml + (((i64)i * nh + kvh * G + g) * splits + split) * 2;
            ml[0] = -LS_INF;
            ml[1] = 0.f;
        }
        return;
    }
    float* q_s = sm;              // [G, HD]
    float* s_s = q_s + G * HD;    // [G, chunk]
    float* stat = s_s + G * chunk; // [G, 2]
    const float* qr = q + (i64)r * ldq + kvh * G * HD;
    for (int e = threadIdx.x; e < G * HD; e += blockDim.x) q_s[e] = qr[e] * scale;
    __syncthreads();

    const int* pages = page_tab + tab_off[r] + layer_off;
    int kv_dim = nkv * HD;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int p = c0 + warp; p < c1; p += nw) {
        const kv_t* kr = k_pool + kv_slot(pages, p) * kv_dim + kvh * HD;
        float kf[T];
#pragma unroll
        for (int t = 0; t < T; t++) {
            int d = lane + 32 * t;
            kf[t] = d < HD ? to_f32(kr[d]) : 0.f;
        }
        for (int g = 0; g < G; g++) {
            float s = 0.f;
#pragma unroll
            for (int t = 0; t < T; t++) {
                int d = lane + 32 * t;
                if (d < HD) s += q_s[g * HD + d] * kf[t];
            }
            s = warp_sum(s);
            if (lane == 0) s_s[g * chunk + (p - c0)] = s;
        }
    }
    __syncthreads();
    for (int g = warp; g < G; g += nw) {
        float* sg = s_s + g * chunk;
        float m = -LS_INF;
        for (int j = lane; j < len; j += 32) m = fmaxf(m, sg[j]);
        m = warp_max(m);
        float l = 0.f;
        for (int j = lane; j < len; j += 32) {
            float e = expf(sg[j] - m);
            sg[j] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) {
            stat[2 * g] = m;
            stat[2 * g + 1] = l;
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < G * HD; e += blockDim.x) {
        int g = e / HD, d = e % HD;
        const float* sg = s_s + g * chunk;
        const kv_t* vb = v_pool + kvh * HD + d;
        float acc = 0.f;
        for (int j = 0; j < len; j++) acc += sg[j] * to_f32(vb[kv_slot(pages, c0 + j) * kv_dim]);
        i64 at = ((i64)i * nh + kvh * G + g) * splits + split;
        part_o[at * HD + d] = acc;
        if (d == 0) {
            part_ml[at * 2] = stat[2 * g];
            part_ml[at * 2 + 1] = stat[2 * g + 1];
        }
    }
}

// attn_combine merges a decode row's splits: out = Σ_s e^(m_s − M) o_s / Σ_s e^(m_s − M) l_s.
// grid (nh, n), block 32·ceil(HD/32). out [*, ldo] act_t (row rows[i], columns head·HD...).
extern "C" __global__ void attn_combine(act_t* __restrict__ out, int ldo, const float* __restrict__ part_o,
                                        const float* __restrict__ part_ml, const int* __restrict__ rows, int n,
                                        int nh, int splits) {
    int head = blockIdx.x, i = blockIdx.y;
    if (i >= n) return;
    int r = rows != nullptr ? rows[i] : i;
    i64 base = ((i64)i * nh + head) * splits;
    const float* ml = part_ml + base * 2;
    float M = -LS_INF;
    for (int s = 0; s < splits; s++)
        if (ml[2 * s + 1] > 0.f) M = fmaxf(M, ml[2 * s]);
    float L = 0.f;
    for (int s = 0; s < splits; s++)
        if (ml[2 * s + 1] > 0.f) L += ml[2 * s + 1] * expf(ml[2 * s] - M);
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < splits; s++)
            if (ml[2 * s + 1] > 0.f) acc += expf(ml[2 * s] - M) * part_o[(base + s) * HD + d];
        store(out + (i64)r * ldo + head * HD + d, acc / L);
    }
}

#define PF_BQ 16
#define PF_BK 32
#define PF_THREADS 128
#define PF_ACC ((PF_BQ * HD + PF_THREADS - 1) / PF_THREADS)

// attn_prefill: one block per (query head, tile). A tile is rows [tiles[2t], tiles[2t] +
// tiles[2t+1]) of the batch, at most PF_BQ, all on one cache (same tab_off), each at its own
// position (causal: row i sees positions ≤ pos[i]). K/V tiles of PF_BK positions are staged in
// shared memory and shared by the tile's rows; the softmax is online (running max and sum).
// grid (nh, ntiles), block PF_THREADS, dynamic shared memory
// (PF_BQ·HD + PF_BK·(HD+1) + PF_BK·HD + PF_BQ·PF_BK + 3·PF_BQ)·4 bytes.
// out [*, ldo] act_t, q [*, ldq] f32.
extern "C" __global__ void attn_prefill(act_t* __restrict__ out, int ldo, const float* __restrict__ q, int ldq,
                                        const kv_t* __restrict__ k_pool, const kv_t* __restrict__ v_pool,
                                        const int* __restrict__ page_tab, const int* __restrict__ tab_off, int layer_off,
                                        const int* __restrict__ pos, const int* __restrict__ tiles, int ntiles,
                                        int nh, int nkv, float scale) {
    extern __shared__ float sm[];
    int head = blockIdx.x, tile = blockIdx.y;
    if (tile >= ntiles) return;
    int r0 = tiles[2 * tile], nr = min(tiles[2 * tile + 1], PF_BQ);
    int G = nh / nkv, kvh = head / G, kv_dim = nkv * HD;
    float* q_s = sm;                     // [PF_BQ, HD]
    float* k_s = q_s + PF_BQ * HD;       // [PF_BK, HD + 1]
    float* v_s = k_s + PF_BK * (HD + 1); // [PF_BK, HD]
    float* s_s = v_s + PF_BK * HD;       // [PF_BQ, PF_BK]
    float* m_s = s_s + PF_BQ * PF_BK;    // [PF_BQ] running max
    float* l_s = m_s + PF_BQ;            // [PF_BQ] running sum
    float* c_s = l_s + PF_BQ;            // [PF_BQ] this tile's rescale of the accumulators
    const int* pages = page_tab + tab_off[r0] + layer_off;

    for (int e = threadIdx.x; e < PF_BQ * HD; e += blockDim.x) {
        int i = e / HD, d = e % HD;
        q_s[e] = i < nr ? q[(i64)(r0 + i) * ldq + head * HD + d] * scale : 0.f;
    }
    if (threadIdx.x < PF_BQ) {
        m_s[threadIdx.x] = -LS_INF;
        l_s[threadIdx.x] = 0.f;
    }
    int kv_end = 0;
    for (int i = 0; i < nr; i++) kv_end = max(kv_end, pos[r0 + i] + 1);
    float acc[PF_ACC];
#pragma unroll
    for (int t = 0; t < PF_ACC; t++) acc[t] = 0.f;

    for (int j0 = 0; j0 < kv_end; j0 += PF_BK) {
        __syncthreads(); // the previous tile's k_s, v_s, s_s are no longer read
        for (int e = threadIdx.x; e < PF_BK * HD; e += blockDim.x) {
            int jj = e / HD, d = e % HD, p = j0 + jj;
            float kv = 0.f, vv = 0.f;
            if (p < kv_end) {
                i64 at = kv_slot(pages, p) * kv_dim + kvh * HD + d;
                kv = to_f32(k_pool[at]);
                vv = to_f32(v_pool[at]);
            }
            k_s[jj * (HD + 1) + d] = kv;
            v_s[jj * HD + d] = vv;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < PF_BQ * PF_BK; e += blockDim.x) {
            int i = e / PF_BK, jj = e % PF_BK;
            float s = -LS_INF;
            if (i < nr && j0 + jj <= pos[r0 + i]) {
                s = 0.f;
                for (int d = 0; d < HD; d++) s += q_s[i * HD + d] * k_s[jj * (HD + 1) + d];
            }
            s_s[e] = s;
        }
        __syncthreads();
        if (threadIdx.x < PF_BQ) {
            int i = threadIdx.x;
            float* si = s_s + i * PF_BK;
            float mo = m_s[i], mx = mo;
            for (int jj = 0; jj < PF_BK; jj++) mx = fmaxf(mx, si[jj]);
            float corr = 1.f, l = l_s[i];
            if (mx == -LS_INF) { // nothing visible yet (a padding row): keep zeros
                for (int jj = 0; jj < PF_BK; jj++) si[jj] = 0.f;
            } else {
                corr = expf(mo - mx); // 0 on the first visible tile (mo = -inf)
                l *= corr;
                for (int jj = 0; jj < PF_BK; jj++) {
                    float pv = si[jj] == -LS_INF ? 0.f : expf(si[jj] - mx);
                    si[jj] = pv;
                    l += pv;
                }
            }
            m_s[i] = mx;
            l_s[i] = l;
            c_s[i] = corr;
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < PF_ACC; t++) {
            int e = threadIdx.x + t * PF_THREADS;
            if (e < PF_BQ * HD) {
                int i = e / HD, d = e % HD;
                float a = acc[t] * c_s[i];
                for (int jj = 0; jj < PF_BK; jj++) a += s_s[i * PF_BK + jj] * v_s[jj * HD + d];
                acc[t] = a;
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < PF_ACC; t++) {
        int e = threadIdx.x + t * PF_THREADS;
        int i = e / HD, d = e % HD;
        if (e < PF_BQ * HD && i < nr) store(out + (i64)(r0 + i) * ldo + head * HD + d, acc[t] / l_s[i]);
    }
}
