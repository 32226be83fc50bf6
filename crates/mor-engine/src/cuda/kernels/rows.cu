// Row kernels: RMSNorm, rotary embedding, softmax, cross-entropy, row gathers and scatters.
// Row kernels run one block per row (grid-stride over rows, so any grid size is correct).

// ---- RMSNorm -------------------------------------------------------------------------------
// Memory-bound: the forward reads an f32 row and writes it normalised (f32, or bf16 in the bf16
// mode), the backward reads dout, x and dx and writes dx, once each. Rows with d % 4 == 0,
// d <= 128 V and aligned pointers (the host checks) run one row per warp: lane l owns the
// 4-element groups q = l + 32 k (k < V) of the row and keeps them in registers between the row's
// reduction (warp shuffles, no barrier) and its output, so every byte moves once, in 16-byte
// loads and stores of f32 (8-byte stores of bf16), a warp instruction covering 512 contiguous
// bytes. Other rows take the block-per-row kernels further below.

// Forward, one row per warp (grid-stride over rows, so any grid is correct): out = w * (x * rs),
// rs = 1 / sqrt(mean(x²) + eps), as the block-per-row kernel computes them.
template <int V, typename TO>
__device__ void rmsnorm_fwd_warp(TO* out, float* rstd, const float* x, const float* w, int n, int d, float eps) {
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    const int nq = d >> 2;
    for (int r = blockIdx.x * wpb + (threadIdx.x >> 5); r < n; r += gridDim.x * wpb) {
        const float* xr = x + (i64)r * d;
        float v[V][4];
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const int q = lane + 32 * k;
            if (q < nq) ld4(v[k], xr + 4 * q);
            else v[k][0] = v[k][1] = v[k][2] = v[k][3] = 0.f;
        }
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < V; ++k)
#pragma unroll
            for (int e = 0; e < 4; ++e) ss += v[k][e] * v[k][e];
        ss = warp_sum(ss);
        const float rs = 1.f / sqrtf(ss / (float)d + eps);
        if (lane == 0) rstd[r] = rs;
        TO* o = out + (i64)r * d;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const int q = lane + 32 * k;
            if (q >= nq) break;
            float wv[4], y[4];
            ld4(wv, w + 4 * q);
#pragma unroll
            for (int e = 0; e < 4; ++e) y[e] = wv[e] * (v[k][e] * rs);
            st4(o + 4 * q, y);
        }
    }
}

// Warps per block of the backward (its dynamic shared memory is RMS_BWD_WARPS * d floats).
#define RMS_BWD_WARPS 4

// Backward, one row per warp, dx and the weight gradient in one pass. Block b owns rows
// [b * rpb, (b + 1) * rpb), warp i of it rows b * rpb + i + RMS_BWD_WARPS * t; per row, with
// x̂ = x * rs, c = mean(g * w * x̂) (Σ times inv_d = (f32)(1 / (f64)d) from the host, as the CPU):
//   dx += rs * (g * w - x̂ * c),  acc_i[j] += g * x̂ (warp i's weight-gradient sum, shared memory).
// At the end partial[b, j] = Σ_i acc_i[j] in warp order; rmsnorm_dw_reduce adds the partials in a
// fixed order. Every sum depends on (n, d, rpb) only: run-to-run identical, no atomics.
template <int V>
__device__ void rmsnorm_bwd_warp(float* dx, unsigned short* dx_bf16, float* partial, const float* g, const float* x,
                                 const float* w, const float* rstd, int n, int d, float inv_d, int rpb) {
    extern __shared__ float4 rms_acc4[];
    float* rms_acc = (float*)rms_acc4;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, wpb = blockDim.x >> 5;
    const int nq = d >> 2;
    float* acc = rms_acc + wid * d;  // 16-byte aligned: d % 4 == 0
#pragma unroll
    for (int k = 0; k < V; ++k)
        if (lane + 32 * k < nq) *(float4*)(acc + 4 * (lane + 32 * k)) = make_float4(0.f, 0.f, 0.f, 0.f);
    const int r1 = min(n, (blockIdx.x + 1) * rpb);
    for (int r = blockIdx.x * rpb + wid; r < r1; r += wpb) {
        const i64 o = (i64)r * d;
        // dx is loaded with g and x, before the row's reduction: one round trip to memory per row.
        float gv[V][4], xv[V][4], dv[V][4];
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const int q = lane + 32 * k;
            if (q < nq) ld4(gv[k], g + o + 4 * q), ld4(xv[k], x + o + 4 * q), ld4(dv[k], dx + o + 4 * q);
        }
        const float rs = rstd[r];
        float c = 0.f;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const int q = lane + 32 * k;
            if (q >= nq) break;
            float wv[4], a[4];
            ld4(wv, w + 4 * q);
            ld4(a, acc + 4 * q);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float xh = xv[k][e] * rs, gw = gv[k][e] * wv[e];
                c += gw * xh;
                a[e] += gv[k][e] * xh;
                xv[k][e] = xh, gv[k][e] = gw;  // kept for dx
            }
            st4(acc + 4 * q, a);
        }
        c = warp_sum(c) * inv_d;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const int q = lane + 32 * k;
            if (q >= nq) break;
            float(&nv)[4] = dv[k];
#pragma unroll
            for (int e = 0; e < 4; ++e) nv[e] = nv[e] + rs * (gv[k][e] - xv[k][e] * c);
            st4(dx + o + 4 * q, nv);
            // The bf16 copy of the new dx that the next backward GEMM reads (no conversion pass).
            if (dx_bf16)
                *(uint2*)(dx_bf16 + o + 4 * q) = make_uint2((u32)bf16_bits(nv[0]) | (u32)bf16_bits(nv[1]) << 16,
                                                            (u32)bf16_bits(nv[2]) | (u32)bf16_bits(nv[3]) << 16);
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float s = rms_acc[j];
        for (int i = 1; i < wpb; ++i) s += rms_acc[i * d + j];
        partial[(i64)blockIdx.x * d + j] = s;
    }
}

// dw[j] += Σ_p partial[p, j]: block (32 columns) x (blockDim.x / 32 strands), strand y adding
// p = y, y + strands, ... in order, then the strands in order.
extern "C" __global__ void rmsnorm_dw_reduce(float* dw, const float* partial, int parts, int d) {
    __shared__ float sh[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5, ny = blockDim.x >> 5;
    const int j = blockIdx.x * 32 + tx;
    float s = 0.f;
    if (j < d) {
#pragma unroll 8
        for (int p = ty; p < parts; p += ny) s += partial[(i64)p * d + j];
    }
    sh[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && j < d) {
        float t = sh[0][tx];
        for (int y = 1; y < ny; ++y) t += sh[y][tx];
        dw[j] += t;
    }
}

#define INST_RMS_WARP(V)                                                                                     \
    extern "C" __global__ void rmsnorm_fwd_v##V##_f32(float* o, float* rs, const float* x, const float* w, int n, \
                                                      int d, float eps) {                                    \
        rmsnorm_fwd_warp<V, float>(o, rs, x, w, n, d, eps);                                                  \
    }                                                                                                        \
    extern "C" __global__ void rmsnorm_fwd_v##V##_to_bf16(bf16* o, float* rs, const float* x, const float* w,  \
                                                          int n, int d, float eps) {                         \
        rmsnorm_fwd_warp<V, bf16>(o, rs, x, w, n, d, eps);                                                   \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * RMS_BWD_WARPS)                                         \
        rmsnorm_bwd_v##V##_f32(float* dx, unsigned short* dxb, float* p, const float* g, const float* x,      \
                               const float* w, const float* rs, int n, int d, float inv_d, int rpb) {        \
        rmsnorm_bwd_warp<V>(dx, dxb, p, g, x, w, rs, n, d, inv_d, rpb);                                      \
    }

INST_RMS_WARP(2)
INST_RMS_WARP(4)
INST_RMS_WARP(8)
INST_RMS_WARP(16)

// Block-per-row kernels for the other rows (d % 4 != 0, d > 128 * 16, unaligned pointers), and
// the reference the warp kernels follow. The output may be stored at a lower precision than the
// input (TO = bf16 for the bf16 mode's activations, the input being the f32 residual stream).
template <typename TO, typename T>
__device__ void rmsnorm_fwd(TO* out, float* rstd, const T* x, const float* w, int n, int d, float eps) {
    __shared__ float sh[32];
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const T* xr = x + (i64)r * d;
        float ss = 0.f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float v = to_f(xr[j]);
            ss += v * v;
        }
        ss = block_sum(ss, sh);
        const float rs = 1.f / sqrtf(ss / (float)d + eps);
        if (threadIdx.x == 0) rstd[r] = rs;
        TO* o = out + (i64)r * d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = from_f<TO>(w[j] * (to_f(xr[j]) * rs));
    }
}

// dx += rs * (g*w - x̂ * mean(g*w*x̂)), one block per row.
template <typename T>
__device__ void rmsnorm_bwd_dx(T* dx, const T* dout, const T* x, const float* w, const float* rstd, int n,
                               int d) {
    __shared__ float sh[32];
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const i64 o = (i64)r * d;
        const float rs = rstd[r];
        float c = 0.f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) c += to_f(dout[o + j]) * w[j] * (to_f(x[o + j]) * rs);
        c = block_sum(c, sh) / (float)d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float xh = to_f(x[o + j]) * rs;
            dx[o + j] = from_f<T>(to_f(dx[o + j]) + rs * (to_f(dout[o + j]) * w[j] - xh * c));
        }
    }
}

// dw, pass 1: partial[c, j] = Σ_{rows of chunk c} g * x̂ (grid: x over column tiles, y over chunks).
template <typename T>
__device__ void rmsnorm_dw_partial(float* partial, const T* dout, const T* x, const float* rstd, int n, int d,
                                   int rows_per_chunk) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int c = blockIdx.y;
    if (j >= d) return;
    const int r0 = c * rows_per_chunk;
    const int r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.f;
    for (int r = r0; r < r1; ++r) {
        const i64 o = (i64)r * d + j;
        acc += to_f(dout[o]) * (to_f(x[o]) * rstd[r]);
    }
    partial[(i64)c * d + j] = acc;
}

// dw, pass 2: dw[j] += Σ_c partial[c, j] in chunk order.
extern "C" __global__ void rmsnorm_dw_final(float* dw, const float* partial, int chunks, int d) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = 0.f;
    for (int c = 0; c < chunks; ++c) acc += partial[(i64)c * d + j];
    dw[j] += acc;
}

// ---- rotary embedding ----------------------------------------------------------------------

// In place on x[n, heads, hd] (rotate_half layout); one thread per (row, j < hd/2), angles by
// rope_cs. sign = -1 applies the inverse. The general kernel; rope_vec below takes the usual shapes.
template <typename T>
__device__ void rope(T* x, const u32* pos, const RopeFreqs& fq, int n, int heads, int hd, float sign) {
    const int half = hd / 2;
    GRID_STRIDE(e, (i64)n * half) {
        const int r = (int)(e / half), j = (int)(e % half);
        float cf, sf;
        rope_cs(pos[r], fq.f[j], sign, cf, sf);
        T* xr = x + (i64)r * heads * hd;
        for (int h = 0; h < heads; ++h) {
            const float x1 = to_f(xr[h * hd + j]), x2 = to_f(xr[h * hd + half + j]);
            xr[h * hd + j] = from_f<T>(x1 * cf - x2 * sf);
            xr[h * hd + half + j] = from_f<T>(x2 * cf + x1 * sf);
        }
    }
}

// RoPE in 16-byte vectors (half a head a multiple of 16 bytes, 16-byte aligned x; the host checks):
// a block takes `rpb` rows (rpb * heads * half / VEC <= ROPE_ITEMS * blockDim.x vectors pairs, the
// items). Each thread first issues the loads of its items, then the block computes each (row, pair)
// angle once into shared memory (the FP64 work under the loads' latency), then the items are
// rotated and stored. The same arithmetic per element as `rope`. A second tensor x2[n, heads2, hd]
// at the same positions (a layer's keys with its queries) rides along: its heads follow x's in
// each row's items and share the row's angles (heads2 = 0: none).
#define ROPE_ROWS 8
#define ROPE_ITEMS 4
template <typename T>
__device__ void rope_vec(T* x, int heads, T* x2, int heads2, const u32* pos, const RopeFreqs& fq, int n, int hd, float sign,
                         int rpb) {
    constexpr int VEC = 16 / (int)sizeof(T);
    __shared__ float2 cs[ROPE_ROWS * ROPE_MAX_PAIRS];
    const int half = hd / 2, vph = half / VEC, per_row = (heads + heads2) * vph;
    // Element 0 of vector v of head h of row r (x's heads, then x2's).
    auto at = [&](i64 r, int h, int v) {
        return h < heads ? x + (r * heads + h) * hd + v * VEC : x2 + (r * heads2 + h - heads) * hd + v * VEC;
    };
    for (i64 r0 = (i64)blockIdx.x * rpb; r0 < n; r0 += (i64)gridDim.x * rpb) {
        const int items = (int)min((i64)rpb, n - r0) * per_row;
        uint4 lo[ROPE_ITEMS], hi[ROPE_ITEMS];
#pragma unroll
        for (int k = 0; k < ROPE_ITEMS; ++k) {
            const int it = threadIdx.x + k * blockDim.x;
            if (it < items) {
                const int rr = it / per_row, h = (it % per_row) / vph, v = it % vph;
                const T* p = at(r0 + rr, h, v);
                lo[k] = ld16_raw(p);
                hi[k] = ld16_raw(p + half);
            }
        }
        for (int e = threadIdx.x; e < items / per_row * half; e += blockDim.x) {
            const int rr = e / half, j = e % half;
            float c, s;
            rope_cs(pos[r0 + rr], fq.f[j], sign, c, s);
            cs[rr * half + j] = make_float2(c, s);
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < ROPE_ITEMS; ++k) {
            const int it = threadIdx.x + k * blockDim.x;
            if (it < items) {
                const int rr = it / per_row, h = (it % per_row) / vph, v = it % vph;
                float y1[VEC], y2[VEC];
#pragma unroll
                for (int u = 0; u < VEC; ++u) {
                    const float2 q = cs[rr * half + v * VEC + u];
                    const float x1 = raw_elem<T>(lo[k], u), x2 = raw_elem<T>(hi[k], u);
                    y1[u] = x1 * q.x - x2 * q.y;
                    y2[u] = x2 * q.x + x1 * q.y;
                }
                T* p = at(r0 + rr, h, v);
                st16(p, y1);
                st16(p + half, y2);
            }
        }
        __syncthreads();
    }
}

// ---- softmax -------------------------------------------------------------------------------

template <typename T>
__device__ void softmax_fwd(T* out, const T* x, int n, int c) {
    __shared__ float sh[32];
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const T* xr = x + (i64)r * c;
        float m = F_NINF;
        for (int j = threadIdx.x; j < c; j += blockDim.x) m = fmaxf(m, to_f(xr[j]));
        m = block_max(m, sh);
        float s = 0.f;
        for (int j = threadIdx.x; j < c; j += blockDim.x) s += expf(to_f(xr[j]) - m);
        s = block_sum(s, sh);
        const float inv = 1.f / s;
        for (int j = threadIdx.x; j < c; j += blockDim.x) out[(i64)r * c + j] = from_f<T>(expf(to_f(xr[j]) - m) * inv);
    }
}

template <typename T>
__device__ void softmax_bwd(T* dx, const T* dout, const T* y, int n, int c) {
    __shared__ float sh[32];
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const i64 o = (i64)r * c;
        float dot = 0.f;
        for (int j = threadIdx.x; j < c; j += blockDim.x) dot += to_f(dout[o + j]) * to_f(y[o + j]);
        dot = block_sum(dot, sh);
        for (int j = threadIdx.x; j < c; j += blockDim.x)
            dx[o + j] = from_f<T>(to_f(dx[o + j]) + to_f(y[o + j]) * (to_f(dout[o + j]) - dot));
    }
}

// ---- cross-entropy (block per row, online log-sum-exp) -------------------------------------

template <typename T>
__device__ __forceinline__ void row_lse(const T* row, int vocab, float& m, float& s, float* shm, float* shs) {
    m = F_NINF;
    s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float v = to_f(row[j]);
        if (v > m) {
            s = s * expf(m - v) + 1.f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    block_lse(m, s, shm, shs);
}

template <typename T>
__device__ void cross_entropy_fwd(float* loss, const T* logits, const u32* targets, int n, int vocab) {
    __shared__ float shm[32], shs[32];
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const u32 t = targets[r];
        if (t == U32_MAX) {
            if (threadIdx.x == 0) loss[r] = 0.f;
            continue;
        }
        if (t >= (u32)vocab) {  // out of range: poison the loss rather than read past the row
            if (threadIdx.x == 0) loss[r] = __int_as_float(0x7fc00000);
            continue;
        }
        const T* row = logits + (i64)r * vocab;
        float m, s;
        row_lse(row, vocab, m, s, shm, shs);
        if (threadIdx.x == 0) loss[r] = m + logf(s) - to_f(row[t]);
    }
}

template <typename T>
__device__ void cross_entropy_bwd(T* dlogits, const T* logits, const u32* targets, float scale, int n, int vocab) {
    __shared__ float shm[32], shs[32];
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const u32 t = targets[r];
        if (t == U32_MAX || t >= (u32)vocab) continue;
        const T* row = logits + (i64)r * vocab;
        T* d = dlogits + (i64)r * vocab;
        float m, s;
        row_lse(row, vocab, m, s, shm, shs);
        const float inv = 1.f / s;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float g = to_f(d[j]) + scale * (expf(to_f(row[j]) - m) * inv);
            if (j == (int)t) g -= scale;
            d[j] = from_f<T>(g);
        }
    }
}

// Forward and backward in one kernel (the LM head in training): per row one pass over the
// logits (f32, or bf16 as the bf16 mode's head GEMM writes them) for (max, Σexp) (online
// log-sum-exp), the loss as cross_entropy_fwd writes it, then one pass writing dlogits = scale *
// (softmax - onehot) (set, not accumulated; f32 or bf16). Rows with an ignored or out-of-range
// target get a zero gradient row (loss 0, or NaN out of range, as cross_entropy_fwd). Rows of
// vocab % 4 == 0 with 4-element aligned logits and dlogits move in 4-element loads and stores;
// others take the scalar loops. The gradient uses expf(x - m) * inv like cross_entropy_bwd; (m, s)
// differ from row_lse's only in summation order.
template <typename TL, typename TD>
__device__ void cross_entropy_fwd_bwd(float* loss, TD* dlogits, const TL* logits, const u32* targets, float scale,
                                      int n, int vocab) {
    __shared__ float shm[32], shs[32];
    const bool vec = (vocab & 3) == 0 && aligned_to(4 * sizeof(TL), logits) && aligned_to(4 * sizeof(TD), dlogits);
    const int nq = vocab >> 2;
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const u32 t = targets[r];
        const TL* row = logits + (i64)r * vocab;
        TD* d = dlogits + (i64)r * vocab;
        if (t == U32_MAX || t >= (u32)vocab) {
            if (threadIdx.x == 0) loss[r] = t == U32_MAX ? 0.f : __int_as_float(0x7fc00000);
            if (vec) {
                const float z[4] = {0.f, 0.f, 0.f, 0.f};
                for (int q = threadIdx.x; q < nq; q += blockDim.x) st4(d + 4 * q, z);
            } else {
                for (int j = threadIdx.x; j < vocab; j += blockDim.x) d[j] = from_f<TD>(0.f);
            }
            continue;
        }
        float m = F_NINF, s = 0.f;
        if (vec) {
            for (int q = threadIdx.x; q < nq; q += blockDim.x) {
                float v[4];
                ld4(v, row + 4 * q);
                const float mx = fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3]));
                if (mx > m) {
                    s *= expf(m - mx);
                    m = mx;
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) s += expf(v[e] - m);
            }
            block_lse(m, s, shm, shs);
        } else {
            row_lse(row, vocab, m, s, shm, shs);
        }
        if (threadIdx.x == 0) loss[r] = m + logf(s) - to_f(row[t]);
        const float inv = 1.f / s;
        if (vec) {
            for (int q = threadIdx.x; q < nq; q += blockDim.x) {
                float v[4];
                ld4(v, row + 4 * q);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    v[e] = scale * (expf(v[e] - m) * inv);
                    if (4 * q + e == (int)t) v[e] -= scale;
                }
                st4(d + 4 * q, v);
            }
        } else {
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
                float g = scale * (expf(to_f(row[j]) - m) * inv);
                if (j == (int)t) g -= scale;
                d[j] = from_f<TD>(g);
            }
        }
    }
}

extern "C" __global__ void cross_entropy_fwd_bwd_f32(float* l, float* dx, const float* x, const u32* t, float s, int n,
                                                     int v) {
    cross_entropy_fwd_bwd<float, float>(l, dx, x, t, s, n, v);
}
extern "C" __global__ void cross_entropy_fwd_bwd_bf16(float* l, bf16* dx, const float* x, const u32* t, float s, int n,
                                                      int v) {
    cross_entropy_fwd_bwd<float, bf16>(l, dx, x, t, s, n, v);
}
// bf16 logits (the bf16 mode's LM head) and gradient; the forward alone for evaluation.
extern "C" __global__ void cross_entropy_fwd_bwd_bf16_logits(float* l, bf16* dx, const bf16* x, const u32* t, float s,
                                                             int n, int v) {
    cross_entropy_fwd_bwd<bf16, bf16>(l, dx, x, t, s, n, v);
}
extern "C" __global__ void cross_entropy_fwd_bf16(float* l, const bf16* x, const u32* t, int n, int v) {
    cross_entropy_fwd<bf16>(l, x, t, n, v);
}

// ---- row gathers and scatters --------------------------------------------------------------

// out[i] = x[idx[i]], rows of d.
template <typename T>
__device__ void gather_rows(T* out, const T* x, const u32* idx, int m, int d) {
    for (int i = blockIdx.x; i < m; i += gridDim.x) {
        const T* src = x + (i64)idx[i] * d;
        T* dst = out + (i64)i * d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] = src[j];
    }
}

// dy[i] += scale[i] * dh[idx[i]]; dscale[i] += <dh[idx[i]], y[i]>.
template <typename T>
__device__ void scatter_add_scaled_bwd(T* dy, float* dscale, const T* dh, const T* y, const float* scale,
                                       const u32* idx, int m, int d) {
    __shared__ float sh[32];
    for (int i = blockIdx.x; i < m; i += gridDim.x) {
        const T* h = dh + (i64)idx[i] * d;
        const i64 o = (i64)i * d;
        const float s = scale[i];
        float dot = 0.f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float hv = to_f(h[j]);
            dy[o + j] = from_f<T>(to_f(dy[o + j]) + s * hv);
            dot += hv * to_f(y[o + j]);
        }
        dot = block_sum(dot, sh);
        if (threadIdx.x == 0) dscale[i] += dot;
    }
}

// dy[i] += dx[idx[i]] (the first half of scatter_rows_bwd).
template <typename T>
__device__ void gather_add_rows(T* dy, const T* dx, const u32* idx, int m, int d) {
    for (int i = blockIdx.x; i < m; i += gridDim.x) {
        const T* src = dx + (i64)idx[i] * d;
        T* dst = dy + (i64)i * d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] = from_f<T>(to_f(dst[j]) + to_f(src[j]));
    }
}

// x[idx[i]] = 0 (rows).
template <typename T>
__device__ void zero_rows(T* x, const u32* idx, int m, int d) {
    for (int i = blockIdx.x; i < m; i += gridDim.x) {
        T* dst = x + (i64)idx[i] * d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] = from_f<T>(0.f);
    }
}

extern "C" __global__ void index_fill_f32(float* x, const u32* idx, int m, float v) {
    GRID_STRIDE(i, m) x[idx[i]] = v;
}

// ---- deterministic grouping of scatter indices -----------------------------------------------
// For scatters with possibly repeated destination rows: a counting sort of the positions i < m by
// destination row, stable (ascending i within a row), so every destination row is then written
// by one block that applies its sources in ascending i, exactly as the serial CPU loop does.
//   counts[0..=R] zeroed by the host; group_count; group_scan (counts -> exclusive starts, in
//   place, start[R] = m); group_place (unstable, via atomics on fill[0..R], zeroed by the host);
//   group_rank (stable order: rank by i inside the bucket).

// Indices >= rows (out of range) are skipped by every pass.
extern "C" __global__ void group_count(const u32* idx, int m, int rows, u32* counts) {
    GRID_STRIDE(i, m) {
        const u32 r = idx[i];
        if (r < (u32)rows) atomicAdd(&counts[r], 1u);
    }
}

// Exclusive scan of counts[0..len) in place, one block of 1024 threads.
extern "C" __global__ void group_scan(u32* counts, int len) {
    __shared__ u32 sh[1024];
    const int t = threadIdx.x, nt = blockDim.x;
    const int per = (len + nt - 1) / nt;
    const int a = min(len, t * per), b = min(len, a + per);
    u32 sum = 0;
    for (int i = a; i < b; ++i) sum += counts[i];
    sh[t] = sum;
    __syncthreads();
    // Hillis-Steele inclusive scan over the thread sums.
    for (int o = 1; o < nt; o <<= 1) {
        const u32 v = t >= o ? sh[t - o] : 0u;
        __syncthreads();
        sh[t] += v;
        __syncthreads();
    }
    u32 run = sh[t] - sum;  // exclusive prefix of this thread's chunk
    for (int i = a; i < b; ++i) {
        const u32 c = counts[i];
        counts[i] = run;
        run += c;
    }
}

extern "C" __global__ void group_place(const u32* idx, int m, int rows, const u32* start, u32* fill, u32* tmp) {
    GRID_STRIDE(i, m) {
        const u32 r = idx[i];
        if (r >= (u32)rows) continue;
        const u32 p = start[r] + atomicAdd(&fill[r], 1u);
        tmp[p] = (u32)i;
    }
}

extern "C" __global__ void group_rank(const u32* idx, int m, int rows, const u32* start, const u32* tmp,
                                      u32* order) {
    GRID_STRIDE(i, m) {
        const u32 r = idx[i];
        if (r >= (u32)rows) continue;
        const u32 a = start[r], b = start[r + 1];
        u32 rank = 0;
        for (u32 p = a; p < b; ++p) rank += tmp[p] < (u32)i;
        order[a + rank] = (u32)i;
    }
}

// Apply a grouped scatter: block per sorted position p; the block at the start of a bucket owns
// destination row r = idx[order[p]] and applies the bucket's sources in ascending i.
// mode 0: dst[r] += src[i]; mode 1: dst[r] += scale[i] * src[i]; mode 2: dst[r] = src[last i].
template <typename T>
__device__ void group_apply(T* dst, const T* src, const float* scale, const u32* idx, const u32* start,
                            const u32* order, int m, int rows, int d, int mode) {
    const u32 total = start[rows];  // in-range sources
    for (int p = blockIdx.x; p < m; p += gridDim.x) {
        if ((u32)p >= total) break;
        const u32 r = idx[order[p]];
        const u32 a = start[r], b = start[r + 1];
        if ((u32)p != a) continue;
        T* row = dst + (i64)r * d;
        if (mode == 2) {
            const T* s = src + (i64)order[b - 1] * d;
            for (int j = threadIdx.x; j < d; j += blockDim.x) row[j] = s[j];
            continue;
        }
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float acc = to_f(row[j]);
            for (u32 q = a; q < b; ++q) {
                const u32 i = order[q];
                const float v = to_f(src[(i64)i * d + j]);
                acc = mode == 1 ? acc + scale[i] * v : acc + v;
            }
            row[j] = from_f<T>(acc);
        }
    }
}

// group_apply for distinct rows idx[..m] (a token set's): no two sources meet, so one pass without
// the grouping, group_apply's arithmetic per element (mode 0: dst[r] += src[i]; 1: dst[r] +=
// scale[i] * src[i]; 2: dst[r] = src[i]). A block per source row; rows past `rows` are skipped as
// group_apply skips them.
extern "C" __global__ void scatter_distinct_f32(float* dst, const float* src, const float* scale, const u32* idx, int m,
                                                int rows, int d, int mode) {
    const bool vec = (d & 3) == 0 && aligned16(dst) && aligned16(src);
    for (int i = blockIdx.x; i < m; i += gridDim.x) {
        const u32 r = idx[i];
        if (r >= (u32)rows) continue;
        float* drow = dst + (i64)r * d;
        const float* srow = src + (i64)i * d;
        const float s = mode == 1 ? scale[i] : 0.f;
        auto apply = [&](float acc, float v) { return mode == 2 ? v : mode == 1 ? acc + s * v : acc + v; };
        if (vec) {
            for (int q = threadIdx.x; q < (d >> 2); q += blockDim.x) {
                float a[4], v[4];
                ld4(a, drow + 4 * q);
                ld4(v, srow + 4 * q);
#pragma unroll
                for (int e = 0; e < 4; ++e) a[e] = apply(a[e], v[e]);
                st4(drow + 4 * q, a);
            }
        } else {
            for (int j = threadIdx.x; j < d; j += blockDim.x) drow[j] = apply(drow[j], srow[j]);
        }
    }
}

#define INST_ROWS(T, SUF)                                                                              \
    extern "C" __global__ void rmsnorm_fwd_##SUF(T* o, float* rs, const T* x, const float* w, int n, int d, \
                                                 float eps) {                                          \
        rmsnorm_fwd<T, T>(o, rs, x, w, n, d, eps);                                                        \
    }                                                                                                  \
    extern "C" __global__ void rmsnorm_bwd_dx_##SUF(T* dx, const T* g, const T* x, const float* w,       \
                                                    const float* rs, int n, int d) {                   \
        rmsnorm_bwd_dx<T>(dx, g, x, w, rs, n, d);                                                      \
    }                                                                                                  \
    extern "C" __global__ void rmsnorm_dw_partial_##SUF(float* p, const T* g, const T* x, const float* rs, \
                                                        int n, int d, int rpc) {                       \
        rmsnorm_dw_partial<T>(p, g, x, rs, n, d, rpc);                                                 \
    }                                                                                                  \
    extern "C" __global__ void rope_##SUF(T* x, const u32* pos, const __grid_constant__ RopeFreqs fq, int n, int h, \
                                          int hd, float sg) {                                                      \
        rope<T>(x, pos, fq, n, h, hd, sg);                                                                         \
    }                                                                                                  \
    extern "C" __global__ void softmax_fwd_##SUF(T* o, const T* x, int n, int c) { softmax_fwd<T>(o, x, n, c); } \
    extern "C" __global__ void softmax_bwd_##SUF(T* dx, const T* g, const T* y, int n, int c) {         \
        softmax_bwd<T>(dx, g, y, n, c);                                                                \
    }                                                                                                  \
    extern "C" __global__ void cross_entropy_fwd_##SUF(float* l, const T* x, const u32* t, int n, int v) { \
        cross_entropy_fwd<T>(l, x, t, n, v);                                                           \
    }                                                                                                  \
    extern "C" __global__ void cross_entropy_bwd_##SUF(T* dx, const T* x, const u32* t, float s, int n,  \
                                                       int v) {                                        \
        cross_entropy_bwd<T>(dx, x, t, s, n, v);                                                       \
    }                                                                                                  \
    extern "C" __global__ void gather_rows_##SUF(T* o, const T* x, const u32* idx, int m, int d) {      \
        gather_rows<T>(o, x, idx, m, d);                                                               \
    }                                                                                                  \
    extern "C" __global__ void scatter_add_scaled_bwd_##SUF(T* dy, float* ds, const T* dh, const T* y,  \
                                                            const float* s, const u32* idx, int m, int d) { \
        scatter_add_scaled_bwd<T>(dy, ds, dh, y, s, idx, m, d);                                        \
    }                                                                                                  \
    extern "C" __global__ void gather_add_rows_##SUF(T* dy, const T* dx, const u32* idx, int m, int d) { \
        gather_add_rows<T>(dy, dx, idx, m, d);                                                         \
    }                                                                                                  \
    extern "C" __global__ void zero_rows_##SUF(T* x, const u32* idx, int m, int d) {                   \
        zero_rows<T>(x, idx, m, d);                                                                    \
    }                                                                                                  \
    extern "C" __global__ void group_apply_##SUF(T* dst, const T* src, const float* s, const u32* idx,  \
                                                 const u32* st, const u32* ord, int m, int rows, int d,   \
                                                 int mode) {                                           \
        group_apply<T>(dst, src, s, idx, st, ord, m, rows, d, mode);                                         \
    }

INST_ROWS(float, f32)

// The bf16 mode's activation kernels: RMSNorm of the f32 residual stream into a bf16 activation,
// rotary embedding on bf16 q/k (and their gradients).
extern "C" __global__ void rmsnorm_fwd_to_bf16(bf16* o, float* rs, const float* x, const float* w, int n, int d,
                                               float eps) {
    rmsnorm_fwd<bf16, float>(o, rs, x, w, n, d, eps);
}
extern "C" __global__ void rope_bf16(bf16* x, const u32* pos, const __grid_constant__ RopeFreqs fq, int n, int h, int hd,
                                     float sg) {
    rope<bf16>(x, pos, fq, n, h, hd, sg);
}
extern "C" __global__ void __launch_bounds__(256) rope_vec_f32(float* x, int h, float* x2, int h2, const u32* pos,
                                                             const __grid_constant__ RopeFreqs fq, int n, int hd,
                                                             float sg, int rpb) {
    rope_vec<float>(x, h, x2, h2, pos, fq, n, hd, sg, rpb);
}
extern "C" __global__ void __launch_bounds__(256) rope_vec_bf16(bf16* x, int h, bf16* x2, int h2, const u32* pos,
                                                              const __grid_constant__ RopeFreqs fq, int n, int hd,
                                                              float sg, int rpb) {
    rope_vec<bf16>(x, h, x2, h2, pos, fq, n, hd, sg, rpb);
}
