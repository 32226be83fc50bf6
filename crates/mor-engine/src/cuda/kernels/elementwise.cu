// Elementwise kernels: memory helpers, activations, losses, AdamW, sum of squares.

// The memory helpers move 4 elements per thread and iteration (16-byte f32 vectors) when the
// pointers allow it; the elements after the last whole vector take the scalar loop.
#define VEC4_LOOP(v, nv, ...) \
    for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < (nv); v += (i64)blockDim.x * gridDim.x) __VA_ARGS__
#define TAIL_LOOP(i, from, n, ...) \
    for (i64 i = (from) + (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x) __VA_ARGS__

extern "C" __global__ void fill_f32(float* x, i64 n, float v) {
    const i64 nv = aligned_to(16, x) ? n / 4 : 0;
    VEC4_LOOP(j, nv, { ((float4*)x)[j] = make_float4(v, v, v, v); })
    TAIL_LOOP(i, nv * 4, n, { x[i] = v; })
}

extern "C" __global__ void axpy_f32(float* y, const float* x, float a, i64 n) {
    const i64 nv = aligned_to(16, x, y) ? n / 4 : 0;
    VEC4_LOOP(j, nv, {
        const float4 s = ((const float4*)x)[j];
        float4 d = ((float4*)y)[j];
        d.x += a * s.x, d.y += a * s.y, d.z += a * s.z, d.w += a * s.w;
        ((float4*)y)[j] = d;
    })
    TAIL_LOOP(i, nv * 4, n, { y[i] += a * x[i]; })
}

extern "C" __global__ void scale_f32(float* x, float a, i64 n) {
    GRID_STRIDE(i, n) x[i] *= a;
}

// Σ x² in double, deterministic: a fixed grid (chosen by the host from n only) writes one partial
// per block; a single block adds the partials in a fixed tree order.
// Block lb of `blocks`: its threads' sums of x², tree-added into thread 0's return value. A
// 16-byte aligned x is read in float4 vectors at a stride of the whole grid (the n % 4 tail by
// block 0), any other scalar; sumsq_partial_f32 and sumsq_many_partial_f32 share it, so a
// tensor's partials are the same bits in both.
__device__ __forceinline__ double sumsq_block(const float* x, i64 n, i64 lb, i64 blocks, double* sh) {
    double acc = 0.0;
    const i64 stride = (i64)blockDim.x * blocks;
    if (aligned16(x)) {
        const i64 n4 = n >> 2;
#pragma unroll 4
        for (i64 i = lb * blockDim.x + threadIdx.x; i < n4; i += stride) {
            const float4 v = ((const float4*)x)[i];
            acc += (double)v.x * v.x;
            acc += (double)v.y * v.y;
            acc += (double)v.z * v.z;
            acc += (double)v.w * v.w;
        }
        if (lb == 0 && threadIdx.x < (n & 3)) {
            const double v = (double)x[4 * n4 + threadIdx.x];
            acc += v * v;
        }
    } else {
        for (i64 i = lb * blockDim.x + threadIdx.x; i < n; i += stride) {
            const double v = (double)x[i];
            acc += v * v;
        }
    }
    return block_sum_d_to0(acc, sh);
}

extern "C" __global__ void sumsq_partial_f32(const float* x, i64 n, double* partial) {
    __shared__ double sh[32];
    const double acc = sumsq_block(x, n, blockIdx.x, gridDim.x, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void sumsq_final(const double* partial, int parts, double* out) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) acc += partial[i];
    acc = block_sum_d_to0(acc, sh);
    if (threadIdx.x == 0) out[0] = acc;
}

// ---- activations ---------------------------------------------------------------------------

// SwiGLU is memory-bound (a few flops per 6-10 bytes): 16-byte vectors (8 bf16 or 4 f32), EW_UNROLL
// of them per thread and iteration at a stride of the whole grid (a warp's accesses stay
// contiguous), every load of an iteration issued before its math. The elements after the last
// whole vector, and all of them when a pointer is not 16-byte aligned, take the scalar loop.
// The host sizes the grid to the vector count (Cuda::ew16); any grid is correct.
#define EW_UNROLL 2

__device__ __forceinline__ float swiglu_f(float g, float u) { return g * sigmoidf_(g) * u; }

// d(silu(g) * u) / dg and / du, times the output gradient o.
__device__ __forceinline__ void swiglu_df(float o, float g, float u, float& dg, float& du) {
    const float s = sigmoidf_(g);
    dg = o * u * s * (1.f + g * (1.f - s));
    du = o * (g * s);
}

// SwiGLU on rows of width f with gate and up side by side in gate_up[rows, 2f] (the gate/up GEMM's
// output): element i = r * f + c of out reads gate_up[r * 2f + c] and gate_up[r * 2f + f + c], i.e.
// offset i + r * f. Vectors of 16 bytes when f is a multiple of the vector (no vector spans two
// rows) and the pointers are aligned; 32-bit row division while the index fits.
__device__ __forceinline__ i64 swiglu_row(i64 i, int f, i64 n) {
    return n <= 0xffffffffll ? (i64)((u32)i / (u32)f) : i / f;
}

template <typename T>
__device__ void swiglu_fwd(T* out, const T* gu, int f, i64 n) {
    constexpr int N = 16 / sizeof(T);
    const i64 t0 = (i64)blockIdx.x * blockDim.x + threadIdx.x, st = (i64)blockDim.x * gridDim.x;
    const i64 nv = f % N == 0 && aligned_to(16, out, gu) ? n / N : 0;
    for (i64 v = t0; v < nv; v += EW_UNROLL * st) {
        uint4 g[EW_UNROLL], u[EW_UNROLL];
#pragma unroll
        for (int k = 0; k < EW_UNROLL; ++k) {
            const i64 i = (v + k * st) * N, j = i + swiglu_row(i, f, n) * f;
            if (v + k * st < nv) g[k] = ld16_raw(gu + j), u[k] = ld16_raw(gu + j + f);
        }
#pragma unroll
        for (int k = 0; k < EW_UNROLL; ++k) {
            if (v + k * st >= nv) break;
            float o[N];
#pragma unroll
            for (int e = 0; e < N; ++e) o[e] = swiglu_f(raw_elem<T>(g[k], e), raw_elem<T>(u[k], e));
            st16(out + (v + k * st) * N, o);
        }
    }
    for (i64 i = nv * N + t0; i < n; i += st) {
        const i64 j = i + swiglu_row(i, f, n) * f;
        out[i] = from_f<T>(swiglu_f(to_f(gu[j]), to_f(gu[j + f])));
    }
}

// acc = 1: add to dgate_up (the op interface's backward convention); 0: overwrite it (and never
// read it). out (may be null): the forward's output written again, as swiglu_fwd computes it (the
// layer recomputes it here instead of keeping it).
template <typename T>
__device__ void swiglu_bwd(T* dgu, T* out, const T* dout, const T* gu, int f, int acc, i64 n) {
    constexpr int N = 16 / sizeof(T);
    const i64 t0 = (i64)blockIdx.x * blockDim.x + threadIdx.x, st = (i64)blockDim.x * gridDim.x;
    const i64 nv = f % N == 0 && aligned_to(16, dgu, dout, gu) && (!out || aligned_to(16, out)) ? n / N : 0;
    for (i64 v = t0; v < nv; v += EW_UNROLL * st) {
        uint4 o[EW_UNROLL], g[EW_UNROLL], u[EW_UNROLL], ag[EW_UNROLL], au[EW_UNROLL];
        i64 j[EW_UNROLL];
#pragma unroll
        for (int k = 0; k < EW_UNROLL; ++k) {
            const i64 i = (v + k * st) * N;
            j[k] = i + swiglu_row(i, f, n) * f;
            if (v + k * st < nv) {
                o[k] = ld16_raw(dout + i), g[k] = ld16_raw(gu + j[k]), u[k] = ld16_raw(gu + j[k] + f);
                if (acc) ag[k] = ld16_raw(dgu + j[k]), au[k] = ld16_raw(dgu + j[k] + f);
            }
        }
#pragma unroll
        for (int k = 0; k < EW_UNROLL; ++k) {
            if (v + k * st >= nv) break;
            float dg[N], du[N];
#pragma unroll
            for (int e = 0; e < N; ++e) {
                swiglu_df(raw_elem<T>(o[k], e), raw_elem<T>(g[k], e), raw_elem<T>(u[k], e), dg[e], du[e]);
                if (acc) dg[e] = raw_elem<T>(ag[k], e) + dg[e], du[e] = raw_elem<T>(au[k], e) + du[e];
            }
            st16(dgu + j[k], dg);
            st16(dgu + j[k] + f, du);
            if (out) {
                float h[N];
#pragma unroll
                for (int e = 0; e < N; ++e) h[e] = swiglu_f(raw_elem<T>(g[k], e), raw_elem<T>(u[k], e));
                st16(out + (v + k * st) * N, h);
            }
        }
    }
    for (i64 i = nv * N + t0; i < n; i += st) {
        const i64 j = i + swiglu_row(i, f, n) * f;
        float dg, du;
        swiglu_df(to_f(dout[i]), to_f(gu[j]), to_f(gu[j + f]), dg, du);
        dgu[j] = from_f<T>(acc ? to_f(dgu[j]) + dg : dg);
        dgu[j + f] = from_f<T>(acc ? to_f(dgu[j + f]) + du : du);
        if (out) out[i] = from_f<T>(swiglu_f(to_f(gu[j]), to_f(gu[j + f])));
    }
}

template <typename T>
__device__ void gelu_fwd(T* out, const T* x, i64 n) {
    GRID_STRIDE(i, n) {
        const float v = to_f(x[i]);
        out[i] = from_f<T>(v * 0.5f * erfcf(-v * SQRT1_2));
    }
}

template <typename T>
__device__ void gelu_bwd(T* dx, const T* dout, const T* x, i64 n) {
    GRID_STRIDE(i, n) {
        const float v = to_f(x[i]);
        const float cdf = 0.5f * erfcf(-v * SQRT1_2);
        const float pdf = expf(-0.5f * v * v) * INV_SQRT_2PI;
        dx[i] = from_f<T>(to_f(dx[i]) + to_f(dout[i]) * (cdf + v * pdf));
    }
}

// f: 0 sigmoid, 1 tanh, 2 identity (alpha ignored).
template <typename T>
__device__ void gate_fwd(T* out, const T* x, int f, float alpha, i64 n) {
    GRID_STRIDE(i, n) {
        const float v = to_f(x[i]);
        float r;
        if (f == 0) r = alpha * sigmoidf_(v);
        else if (f == 1) r = alpha * tanhf(v);
        else r = v;
        out[i] = from_f<T>(r);
    }
}

template <typename T>
__device__ void gate_bwd(T* dx, const T* dout, const T* x, int f, float alpha, i64 n) {
    GRID_STRIDE(i, n) {
        const float v = to_f(x[i]), g = to_f(dout[i]);
        float d;
        if (f == 0) {
            const float s = sigmoidf_(v);
            d = g * alpha * s * (1.f - s);
        } else if (f == 1) {
            const float t = tanhf(v);
            d = g * alpha * (1.f - t * t);
        } else {
            d = g;
        }
        dx[i] = from_f<T>(to_f(dx[i]) + d);
    }
}

// ---- elementwise losses --------------------------------------------------------------------

extern "C" __global__ void bce_fwd_f32(float* loss, const float* x, const float* t, i64 n) {
    GRID_STRIDE(i, n) {
        const float v = x[i];
        loss[i] = fmaxf(v, 0.f) - v * t[i] + log1pf(expf(-fabsf(v)));
    }
}

extern "C" __global__ void bce_bwd_f32(float* dx, const float* x, const float* t, float scale, i64 n) {
    GRID_STRIDE(i, n) dx[i] += scale * (sigmoidf_(x[i]) - t[i]);
}

// ---- optimiser -----------------------------------------------------------------------------

// PyTorch AdamW; the scalar factors are computed on the host in double precision.
extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, i64 n, float decay,
                                     float step_size, float bc2_sqrt, float b1, float b2, float ob1,
                                     float ob2, float eps) {
    GRID_STRIDE(i, n) {
        float pi = p[i], mi = m[i], vi = v[i];
        adamw_elem(pi, mi, vi, g[i], decay, step_size, bc2_sqrt, b1, b2, ob1, ob2, eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

#define INST_EW(T, SUF)                                                                              \
    extern "C" __global__ void swiglu_fwd_##SUF(T* o, const T* gu, int f, i64 n) {                  \
        swiglu_fwd<T>(o, gu, f, n);                                                                  \
    }                                                                                                \
    extern "C" __global__ void swiglu_bwd_##SUF(T* dgu, T* o, const T* d, const T* gu, int f, int acc, \
                                                i64 n) {                                             \
        swiglu_bwd<T>(dgu, o, d, gu, f, acc, n);                                                  \
    }                                                                                                \
    extern "C" __global__ void gelu_fwd_##SUF(T* o, const T* x, i64 n) { gelu_fwd<T>(o, x, n); }    \
    extern "C" __global__ void gelu_bwd_##SUF(T* dx, const T* d, const T* x, i64 n) {               \
        gelu_bwd<T>(dx, d, x, n);                                                                    \
    }                                                                                                \
    extern "C" __global__ void gate_fwd_##SUF(T* o, const T* x, int f, float a, i64 n) {            \
        gate_fwd<T>(o, x, f, a, n);                                                                  \
    }                                                                                                \
    extern "C" __global__ void gate_bwd_##SUF(T* dx, const T* d, const T* x, int f, float a, i64 n) { \
        gate_bwd<T>(dx, d, x, f, a, n);                                                              \
    }

INST_EW(float, f32)

INST_EW(bf16, bf16)

// ---- element type conversions and fills -----------------------------------------------------

// f32 -> bf16 (round to nearest even): GEMM and attention operands, bf16 activation buffers.
extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* y, i64 n) {
    const i64 nv = aligned_to(16, x) && aligned_to(8, y) ? n / 4 : 0;
    VEC4_LOOP(j, nv, {
        const float4 s = ((const float4*)x)[j];
        ((uint2*)y)[j] = make_uint2((u32)bf16_bits(s.x) | (u32)bf16_bits(s.y) << 16,
                                    (u32)bf16_bits(s.z) | (u32)bf16_bits(s.w) << 16);
    })
    TAIL_LOOP(i, nv * 4, n, { y[i] = bf16_bits(x[i]); })
}

extern "C" __global__ void bf16_to_f32(const bf16* x, float* y, i64 n) {
    const i64 nv = aligned_to(8, x) && aligned_to(16, y) ? n / 4 : 0;
    VEC4_LOOP(j, nv, {
        const uint2 s = ((const uint2*)x)[j];
        ((float4*)y)[j] = make_float4(__uint_as_float(s.x << 16), __uint_as_float(s.x & 0xffff0000u),
                                      __uint_as_float(s.y << 16), __uint_as_float(s.y & 0xffff0000u));
    })
    TAIL_LOOP(i, nv * 4, n, { y[i] = to_f(x[i]); })
}

// A rows x cols block between row-major matrices (leading dimensions in elements), each side f32
// or bf16: the packing of the output gradients of a fused backward GEMM. Grid: x over groups of 4 columns, y (stride)
// over rows; vector loads and stores of 4 elements when every row start is 4-aligned (`vec`).
template <typename TS, typename TD>
__device__ void copy_block_t(TD* dst, const TS* src, int dst_ld, int src_ld, int rows, int cols, bool vec) {
    const int c = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (c >= cols) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const TS* s = src + (i64)r * src_ld + c;
        TD* d = dst + (i64)r * dst_ld + c;
        if (vec) {
            float v[4];
            if constexpr (sizeof(TS) == 4) {
                const float4 x = *(const float4*)s;
                v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
            } else {
                const uint2 x = *(const uint2*)s;
                v[0] = __uint_as_float(x.x << 16), v[1] = __uint_as_float(x.x & 0xffff0000u);
                v[2] = __uint_as_float(x.y << 16), v[3] = __uint_as_float(x.y & 0xffff0000u);
            }
            if constexpr (sizeof(TD) == 4) {
                *(float4*)d = make_float4(v[0], v[1], v[2], v[3]);
            } else {
                *(uint2*)d = make_uint2((u32)bf16_bits(v[0]) | ((u32)bf16_bits(v[1]) << 16),
                                        (u32)bf16_bits(v[2]) | ((u32)bf16_bits(v[3]) << 16));
            }
        } else {
            for (int j = c; j < min(c + 4, cols); ++j) d[j - c] = from_f<TD>(to_f(s[j - c]));
        }
    }
}

extern "C" __global__ void copy_block(void* dst, const void* src, int dst_ld, int dst_bf16, int src_ld, int src_bf16,
                                      int rows, int cols, int vec) {
    if (src_bf16 && dst_bf16) copy_block_t<bf16, bf16>((bf16*)dst, (const bf16*)src, dst_ld, src_ld, rows, cols, vec);
    else if (src_bf16) copy_block_t<bf16, float>((float*)dst, (const bf16*)src, dst_ld, src_ld, rows, cols, vec);
    else if (dst_bf16) copy_block_t<float, bf16>((bf16*)dst, (const float*)src, dst_ld, src_ld, rows, cols, vec);
    else copy_block_t<float, float>((float*)dst, (const float*)src, dst_ld, src_ld, rows, cols, vec);
}

extern "C" __global__ void fill_bf16(bf16* x, i64 n, float v) {
    GRID_STRIDE(i, n) x[i] = from_f<bf16>(v);
}
