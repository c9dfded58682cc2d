// common.cuh: types and helpers shared by every kernel unit. It includes nothing: NVRTC's
// built-in device functions are all the kernels use, so no CUDA toolkit header is needed.
//
// Compile-time constants (NVRTC -D options, see cudakern.Spec):
//   LS_HEAD_DIM  attention head width
//   LS_KV_PAGE   positions per KV cache page
//   LS_ACT_BF16  1: GEMM inputs (normed rows, attention output, SwiGLU output) are bf16; 0: f32
//   LS_KV_BF16   1: the KV cache holds bf16; 0: f32
// Everything else (row counts, widths, head counts) is a kernel argument.
#pragma once

#ifndef LS_HEAD_DIM
#error "LS_HEAD_DIM must be defined"
#endif
#ifndef LS_KV_PAGE
#error "LS_KV_PAGE must be defined"
#endif

#define HD LS_HEAD_DIM
#define KV_PAGE LS_KV_PAGE
#define LS_INF __int_as_float(0x7f800000)

typedef unsigned short bf16; // bfloat16 bits: the upper half of an IEEE binary32
typedef unsigned int u32;
typedef long long i64;

#if LS_ACT_BF16
typedef bf16 act_t;
#else
typedef float act_t;
#endif

#if LS_KV_BF16
typedef bf16 kv_t;
#else
typedef float kv_t;
#endif

// bf16 <-> f32. Widening is exact; narrowing rounds to nearest, ties to even, and keeps NaN a
// (quiet) NaN, bit for bit as the host's model.F32ToBF16.
__device__ __forceinline__ float bf16_to_f32(bf16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return bf16_to_f32(x); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(bf16* p, float v) { *p = f32_to_bf16(v); }

// load8 widens 8 consecutive elements at a 16-byte (f32: 32-byte) aligned address.
__device__ __forceinline__ void load8(const float* p, float* f) {
    float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

__device__ __forceinline__ void load8(const bf16* p, float* f) {
    uint4 v = *(const uint4*)p;
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);          // the lower address holds the lower half
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Warp and block reductions in a fixed order (a butterfly), so a row's result never depends
// on what else runs: every lane of the warp ends with the same bits.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// block_sum / block_max: every thread of the block must call them (blockDim.x a multiple of
// 32); all get the result. scratch holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); // scratch may still be read from the previous call
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -LS_INF;
    return warp_max(v);
}

// Paged KV cache. A pool is [pages, KV_PAGE, kv_dim]; a cache (one sequence, one loop-step
// slot, one layer) is a list of page numbers, pages[p / KV_PAGE] holding position p.
// kv_slot is the pool row of position p.
__device__ __forceinline__ i64 kv_slot(const int* __restrict__ pages, int p) {
    return (i64)pages[p / KV_PAGE] * KV_PAGE + p % KV_PAGE;
}
