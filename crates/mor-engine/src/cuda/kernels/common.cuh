// Shared definitions for every mor CUDA kernel (compiled by NVRTC for sm_90, no #include).
//
// Element types: parameters, gradients and optimiser states are f32. Activation kernels are C++
// templates over their element type `T` (loads through `to_f`, stores through `from_f<T>`, math in
// f32) with `extern "C"` instantiations named `<op>_f32` and, where the bf16 mode stores that
// op's activations in bf16, `<op>_bf16`. `bf16` is our own storage type (no cuda_bf16.h, so NVRTC
// needs no include path).

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define F_INF __int_as_float(0x7f800000)
#define F_NINF __int_as_float(0xff800000)
#define U32_MAX 0xffffffffu
#define U64_MAX 0xffffffffffffffffull
#define SQRT1_2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

// bf16 storage: the upper 16 bits of an f32.
struct bf16 {
    unsigned short bits;
};

// f32 -> bf16 bits, round to nearest even; a NaN stays a quiet NaN.
__device__ __forceinline__ unsigned short bf16_bits(float x) {
    const u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((b >> 16) | 0x40u);
    return (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __uint_as_float((u32)x.bits << 16); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) {
    bf16 r;
    r.bits = bf16_bits(x);
    return r;
}

// Grid-stride loop over `n` elements with 64-bit indices.
#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n); i += (i64)blockDim.x * gridDim.x)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `sh` is a __shared__ scratch of 32 floats; the leading barrier makes back-to-back calls safe.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? sh[lane] : 0.f;
        t = warp_sum(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    return sh[0];
}

__device__ __forceinline__ float block_max(float v, float* sh) {
    v = warp_max(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? sh[lane] : F_NINF;
        t = warp_max(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    return sh[0];
}

// Merge two (max, sum of exp(x - max)) pairs of an online log-sum-exp.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == F_NINF) { m = mn; s = 0.f; return; }
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// Block-wide online log-sum-exp merge; every thread gets (max, sumexp).
__device__ __forceinline__ void block_lse(float& m, float& s, float* shm, float* shs) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) { shm[w] = m; shs[w] = s; }
    __syncthreads();
    if (w == 0) {
        float mm = lane < nw ? shm[lane] : F_NINF;
        float ss = lane < nw ? shs[lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, mm, o);
            const float s2 = __shfl_xor_sync(0xffffffffu, ss, o);
            lse_merge(mm, ss, m2, s2);
        }
        if (lane == 0) { shm[0] = mm; shs[0] = ss; }
    }
    __syncthreads();
    m = shm[0];
    s = shs[0];
}

// Numerically stable logistic sigmoid (same branches as the CPU reference).
__device__ __forceinline__ float sigmoidf_(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    const float e = expf(x);
    return e / (1.f + e);
}
