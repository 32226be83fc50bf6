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

// Σ over the block in double, valid in thread 0 only (one call per kernel: no leading barrier).
// `sh` is a __shared__ scratch of 32 doubles. A fixed tree: the sum depends on blockDim only.
__device__ __forceinline__ double block_sum_d_to0(double v, double* sh) {
    v = warp_sum_d(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) sh[w] = v;
    __syncthreads();
    double t = 0.0;
    if (w == 0) {
        t = lane < nw ? sh[lane] : 0.0;
        t = warp_sum_d(t);
    }
    return t;
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

// Numerically stable logistic sigmoid: the CPU reference's two branches (1 / (1 + e^-x) for
// x >= 0, e^x / (1 + e^x) below) without a branch, one expf and one division, the same values.
__device__ __forceinline__ float sigmoidf_(float x) {
    const float e = expf(-fabsf(x));
    return (x >= 0.f ? 1.f : e) / (1.f + e);
}

// ---- vector access for the memory-bound kernels ---------------------------------------------

// bf16 halves of a 32-bit word (the lower address in the low half) as f32.
__device__ __forceinline__ float bf16_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }
// Two f32 -> a bf16 pair, round to nearest even (one cvt): the bits of bf16_bits, except that a NaN
// becomes the canonical NaN.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 16 bytes (4 f32 or 8 bf16) at a 16-byte aligned address, converted to / from f32.
__device__ __forceinline__ void ld16(float (&f)[4], const float* p) {
    const float4 v = *(const float4*)p;
    f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
}
__device__ __forceinline__ void ld16(float (&f)[8], const bf16* p) {
    const uint4 v = *(const uint4*)p;
    f[0] = bf16_lo(v.x), f[1] = bf16_hi(v.x), f[2] = bf16_lo(v.y), f[3] = bf16_hi(v.y);
    f[4] = bf16_lo(v.z), f[5] = bf16_hi(v.z), f[6] = bf16_lo(v.w), f[7] = bf16_hi(v.w);
}
__device__ __forceinline__ void st16(float* p, const float (&f)[4]) { *(float4*)p = make_float4(f[0], f[1], f[2], f[3]); }
__device__ __forceinline__ void st16(bf16* p, const float (&f)[8]) {
    *(uint4*)p = make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]),
                            pack_bf16x2(f[6], f[7]));
}
// The same 16 bytes kept raw (fewer registers while loads are in flight), element e read on use.
__device__ __forceinline__ uint4 ld16_raw(const void* p) { return *(const uint4*)p; }
template <typename T>
__device__ __forceinline__ float raw_elem(const uint4& v, int e) {
    constexpr int per = 4 / sizeof(T);  // elements per 32-bit word
    const int c = e / per;
    const u32 w = c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
    if constexpr (per == 1) return __uint_as_float(w);
    else return (e & 1) ? bf16_hi(w) : bf16_lo(w);
}
// Whether a pointer can be read / written in 16-byte vectors.
__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15) == 0; }
// 4 elements at a 4-element aligned address (16 bytes of f32, 8 of bf16).
__device__ __forceinline__ void ld4(float (&f)[4], const float* p) { ld16(f, p); }
__device__ __forceinline__ void ld4(float (&f)[4], const bf16* p) {
    const uint2 v = *(const uint2*)p;
    f[0] = bf16_lo(v.x), f[1] = bf16_hi(v.x), f[2] = bf16_lo(v.y), f[3] = bf16_hi(v.y);
}
__device__ __forceinline__ void st4(float* p, const float (&f)[4]) { st16(p, f); }
__device__ __forceinline__ void st4(bf16* p, const float (&f)[4]) {
    *(uint2*)p = make_uint2(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]));
}

// Whether every pointer is aligned to `a` bytes.
__device__ __forceinline__ bool aligned_to(u64 a, const void* p0, const void* p1 = 0, const void* p2 = 0,
                                           const void* p3 = 0, const void* p4 = 0) {
    return (((u64)p0 | (u64)p1 | (u64)p2 | (u64)p3 | (u64)p4) & (a - 1)) == 0;
}

// One AdamW element (adamw_f32, adamw_many_f32): IEEE operations in the CPU reference's order with
// no contraction into FMAs, so every kernel using it rounds alike (and bit for bit like the CPU).
__device__ __forceinline__ void adamw_elem(float& p, float& m, float& v, float g, float decay, float step_size,
                                           float bc2_sqrt, float b1, float b2, float ob1, float ob2, float eps) {
    const float mi = __fadd_rn(__fmul_rn(b1, m), __fmul_rn(ob1, g));
    const float vi = __fadd_rn(__fmul_rn(b2, v), __fmul_rn(__fmul_rn(ob2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
    p = __fsub_rn(__fmul_rn(p, decay), __fmul_rn(step_size, __fdiv_rn(mi, denom)));
    m = mi;
    v = vi;
}

// Rotary embedding. The frequencies theta^(-2j/hd) of the pairs j < hd / 2, computed on the host
// in double as the CPU reference computes them and passed by value (a pow per element made the
// RoPE kernels bound by FP64 work).
#define ROPE_MAX_PAIRS 128
struct RopeFreqs {
    double f[ROPE_MAX_PAIRS];
};

// cos and sign · sin of the angle pos · f, in double precision (positions reach thousands of
// radians): the angle is first reduced to [-pi, pi] (2pi as a double: exact to ~1e-12 at 1e4
// radians), so sincos takes its short path.
__device__ __forceinline__ void rope_cs(u32 pos, double f, float sign, float& cf, float& sf) {
    const double two_pi = 6.283185307179586, a = (double)pos * f;
    double s, c;
    sincos(fma(-rint(a * (1.0 / two_pi)), two_pi, a), &s, &c);
    sf = (float)s * sign;
    cf = (float)c;
}
