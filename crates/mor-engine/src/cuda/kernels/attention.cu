// Attention over packed variable-length segments with position masks (see AttnShape).
//
// Phase-1 kernels: simple and exact (f32 CUDA cores, no tensor cores). A block of 128 threads
// owns 32 rows (queries in the forward and the dq pass, keys in the dk/dv pass) of one segment and
// one head; each row is held by 4 threads (dims sub, sub+4, ...; dot products reduced over the 4
// lanes with two shuffles). The other side streams through shared memory in tiles of 32 rows.
// A tile whose positions are all masked for the whole block is skipped.
//
// Blocks map to (segment, row tile) through a tile table off[s] = Σ_{s'<s} ceil(len_s' / rows) (rows = 32 here, 64 in flash_attention.cu)
// built on the device (attn_tiles), so no host synchronisation is needed; the grid is the upper
// bound ceil(rows / 32) + num_seqs and surplus blocks exit.
//
// Outputs: out [nq, heads*hd], lse [nq, heads] (+inf for a query with no visible key, whose output
// is 0). Backward recomputes P = exp(S - lse); delta = <dout, out>; dq in a pass over query tiles,
// dk/dv in a pass over key tiles (summing over the heads of a kv group), so each gradient row has
// one owner: deterministic, no atomics.

#define ATT_TPQ 4
#define ATT_ROWS 32
#define ATT_KT 32
#define ATT_MAXD 128
#define FULL_MASK 0xffffffffu

extern "C" __global__ void attn_tiles(const u32* cu, int num_seqs, int rows, int* off) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int acc = 0;
    for (int s = 0; s < num_seqs; ++s) {
        off[s] = acc;
        acc += (int)((cu[s + 1] - cu[s] + rows - 1) / rows);
    }
    off[num_seqs] = acc;
}

// Largest s < num_seqs with off[s] <= b (then off[s+1] > b for any b < off[num_seqs]).
__device__ __forceinline__ int att_find_seg(const int* off, int num_seqs, int b) {
    int lo = 0, hi = num_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (off[mid] <= b) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// The blocks of a pass (off: attn_tiles' per-segment block offsets) in rank-major order: block i of
// segment s goes to position sum_t min(i, n_t) + #{t < s : n_t > i} (n_t blocks in segment t), so
// the first block of every segment (the heaviest under a causal mask, as the flash kernels map
// them) runs before any second one. With the heads the fastest grid dimension, the grid's tail then
// holds the lightest blocks of all heads instead of the heavy ones of the last head.
extern "C" __global__ void attn_rank_order(int* order, const int* off, int num_seqs) {
    GRID_STRIDE(g, off[num_seqs]) {
        const int s = att_find_seg(off, num_seqs, (int)g), i = (int)g - off[s];
        int at = 0;
        for (int t = 0; t < num_seqs; ++t) {
            const int n = off[t + 1] - off[t];
            at += min(i, n) + (t < s && n > i);
        }
        order[at] = (int)g;
    }
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(FULL_MASK, v, 1);
    v += __shfl_xor_sync(FULL_MASK, v, 2);
    return v;
}

__device__ __forceinline__ u32 warp_min_u32(u32 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ u32 warp_max_u32(u32 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Load rows t0..t0+nt of `src` (row stride `stride`, column offset `col`) into a zero-padded tile.
__device__ __forceinline__ void att_load_tile(float (*dst)[ATT_MAXD], const float* src, u32 t0, int nt, int stride,
                                              int col, int hd) {
    for (int e = threadIdx.x; e < ATT_KT * hd; e += blockDim.x) {
        const int r = e / hd, d = e - r * hd;
        dst[r][d] = r < nt ? src[(i64)(t0 + r) * stride + col + d] : 0.f;
    }
}

template <int DPT>
__device__ void attn_fwd_impl(float* out, float* lse, const float* q, const float* k, const float* v,
                              const u32* cu_q, const u32* cu_k, const u32* pos_q, const u32* pos_k,
                              const int* qoff, int num_seqs, int heads, int kv_heads, int hd, float scale) {
    __shared__ float Ks[ATT_KT][ATT_MAXD];
    __shared__ float Vs[ATT_KT][ATT_MAXD];
    __shared__ u32 Pk[ATT_KT];
    __shared__ u32 sh_minpk, sh_maxpq;
    const int b = blockIdx.x;
    if (b >= qoff[num_seqs]) return;
    const int s = att_find_seg(qoff, num_seqs, b);
    const int h = blockIdx.y, kh = h / (heads / kv_heads);
    const int tid = threadIdx.x, sub = tid % ATT_TPQ;
    const u32 i = cu_q[s] + (u32)(b - qoff[s]) * ATT_ROWS + tid / ATT_TPQ;
    const bool valid = i < cu_q[s + 1];
    const int qs = heads * hd, ks = kv_heads * hd;
    const u32 pq = valid ? pos_q[i] : 0u;
    if (tid == 0) sh_maxpq = 0u;
    __syncthreads();
    if (valid) atomicMax(&sh_maxpq, pq);

    float qr[DPT], acc[DPT];
#pragma unroll
    for (int c = 0; c < DPT; ++c) {
        const int d = sub + ATT_TPQ * c;
        qr[c] = (valid && d < hd) ? q[(i64)i * qs + h * hd + d] : 0.f;
        acc[c] = 0.f;
    }
    float m = F_NINF, l = 0.f;
    const u32 ka = cu_k[s], kb = cu_k[s + 1];
    for (u32 t0 = ka; t0 < kb; t0 += ATT_KT) {
        __syncthreads();
        const int nt = (int)min((u32)ATT_KT, kb - t0);
        att_load_tile(Ks, k, t0, nt, ks, kh * hd, hd);
        att_load_tile(Vs, v, t0, nt, ks, kh * hd, hd);
        if (tid < 32) {
            const u32 pk = tid < nt ? pos_k[t0 + tid] : U32_MAX;
            Pk[tid] = pk;
            const u32 mn = warp_min_u32(pk);
            if (tid == 0) sh_minpk = mn;
        }
        __syncthreads();
        if (sh_minpk > sh_maxpq) continue;  // block-uniform: every key of the tile is in the future
        float sc[ATT_KT];
        float tmax = F_NINF;
#pragma unroll
        for (int r = 0; r < ATT_KT; ++r) {
            float part = 0.f;
#pragma unroll
            for (int c = 0; c < DPT; ++c) {
                const int d = sub + ATT_TPQ * c;
                if (d < hd) part += qr[c] * Ks[r][d];
            }
            part = quad_sum(part);
            const bool vis = valid && r < nt && Pk[r] <= pq;
            sc[r] = vis ? part * scale : F_NINF;
            tmax = fmaxf(tmax, sc[r]);
        }
        if (tmax != F_NINF) {
            const float mn = fmaxf(m, tmax);
            const float corr = expf(m - mn);
            l *= corr;
#pragma unroll
            for (int c = 0; c < DPT; ++c) acc[c] *= corr;
#pragma unroll
            for (int r = 0; r < ATT_KT; ++r) {
                const float p = expf(sc[r] - mn);
                l += p;
#pragma unroll
                for (int c = 0; c < DPT; ++c) {
                    const int d = sub + ATT_TPQ * c;
                    if (d < hd) acc[c] += p * Vs[r][d];
                }
            }
            m = mn;
        }
    }
    if (valid) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int c = 0; c < DPT; ++c) {
            const int d = sub + ATT_TPQ * c;
            if (d < hd) out[(i64)i * qs + h * hd + d] = acc[c] * inv;
        }
        if (sub == 0) lse[(i64)i * heads + h] = l > 0.f ? m + logf(l) : F_INF;
    }
}

// delta[i*heads + h] = <dout, out> over the head's hd values; one warp per (i, h).
template <typename TG, typename TO>
__device__ void attn_delta(float* delta, const TG* dout, const TO* out, int nq, int heads, int hd) {
    const i64 w = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= (i64)nq * heads) return;
    const i64 o = w * hd;
    float acc = 0.f;
    for (int d = lane; d < hd; d += 32) acc += to_f(dout[o + d]) * to_f(out[o + d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[w] = acc;
}
extern "C" __global__ void attn_delta_f32(float* delta, const float* dout, const float* out, int nq, int heads, int hd) {
    attn_delta<float, float>(delta, dout, out, nq, heads, hd);
}
// The tensor-core backward: D from the same bf16 dout its dP products read (so the rows of
// dS = P (dP - D) sum to zero up to accumulation), out as stored.
extern "C" __global__ void attn_delta_bf16(float* delta, const bf16* dout, const bf16* out, int nq, int heads, int hd) {
    attn_delta<bf16, bf16>(delta, dout, out, nq, heads, hd);
}
extern "C" __global__ void attn_delta_bf16_f32(float* delta, const bf16* dout, const float* out, int nq, int heads,
                                               int hd) {
    attn_delta<bf16, float>(delta, dout, out, nq, heads, hd);
}

template <int DPT>
__device__ void attn_bwd_dq_impl(float* dq, const float* dout, const float* lse, const float* delta, const float* q,
                                 const float* k, const float* v, const u32* cu_q, const u32* cu_k, const u32* pos_q,
                                 const u32* pos_k, const int* qoff, int num_seqs, int heads, int kv_heads, int hd,
                                 float scale) {
    __shared__ float Ks[ATT_KT][ATT_MAXD];
    __shared__ float Vs[ATT_KT][ATT_MAXD];
    __shared__ u32 Pk[ATT_KT];
    __shared__ u32 sh_minpk, sh_maxpq;
    const int b = blockIdx.x;
    if (b >= qoff[num_seqs]) return;
    const int s = att_find_seg(qoff, num_seqs, b);
    const int h = blockIdx.y, kh = h / (heads / kv_heads);
    const int tid = threadIdx.x, sub = tid % ATT_TPQ;
    const u32 i = cu_q[s] + (u32)(b - qoff[s]) * ATT_ROWS + tid / ATT_TPQ;
    const bool valid = i < cu_q[s + 1];
    const int qs = heads * hd, ks = kv_heads * hd;
    const u32 pq = valid ? pos_q[i] : 0u;
    if (tid == 0) sh_maxpq = 0u;
    __syncthreads();
    if (valid) atomicMax(&sh_maxpq, pq);
    const float li = valid ? lse[(i64)i * heads + h] : F_INF;
    const float di = valid ? delta[(i64)i * heads + h] : 0.f;

    float qr[DPT], dor[DPT], acc[DPT];
#pragma unroll
    for (int c = 0; c < DPT; ++c) {
        const int d = sub + ATT_TPQ * c;
        const bool ok = valid && d < hd;
        qr[c] = ok ? q[(i64)i * qs + h * hd + d] : 0.f;
        dor[c] = ok ? dout[(i64)i * qs + h * hd + d] : 0.f;
        acc[c] = 0.f;
    }
    const u32 ka = cu_k[s], kb = cu_k[s + 1];
    for (u32 t0 = ka; t0 < kb; t0 += ATT_KT) {
        __syncthreads();
        const int nt = (int)min((u32)ATT_KT, kb - t0);
        att_load_tile(Ks, k, t0, nt, ks, kh * hd, hd);
        att_load_tile(Vs, v, t0, nt, ks, kh * hd, hd);
        if (tid < 32) {
            const u32 pk = tid < nt ? pos_k[t0 + tid] : U32_MAX;
            Pk[tid] = pk;
            const u32 mn = warp_min_u32(pk);
            if (tid == 0) sh_minpk = mn;
        }
        __syncthreads();
        if (sh_minpk > sh_maxpq) continue;
#pragma unroll 4
        for (int r = 0; r < ATT_KT; ++r) {
            float sp = 0.f, dp = 0.f;
#pragma unroll
            for (int c = 0; c < DPT; ++c) {
                const int d = sub + ATT_TPQ * c;
                if (d < hd) {
                    sp += qr[c] * Ks[r][d];
                    dp += dor[c] * Vs[r][d];
                }
            }
            sp = quad_sum(sp);
            dp = quad_sum(dp);
            const bool vis = valid && r < nt && Pk[r] <= pq;
            const float p = vis ? expf(sp * scale - li) : 0.f;
            const float ds = p * (dp - di);
#pragma unroll
            for (int c = 0; c < DPT; ++c) {
                const int d = sub + ATT_TPQ * c;
                if (d < hd) acc[c] += ds * Ks[r][d];
            }
        }
    }
    if (valid) {
#pragma unroll
        for (int c = 0; c < DPT; ++c) {
            const int d = sub + ATT_TPQ * c;
            if (d < hd) dq[(i64)i * qs + h * hd + d] += scale * acc[c];
        }
    }
}

template <int DPT>
__device__ void attn_bwd_dkdv_impl(float* dk, float* dv, const float* dout, const float* lse, const float* delta,
                                   const float* q, const float* k, const float* v, const u32* cu_q, const u32* cu_k,
                                   const u32* pos_q, const u32* pos_k, const int* koff, int num_seqs, int heads,
                                   int kv_heads, int hd, float scale) {
    __shared__ float Qs[ATT_KT][ATT_MAXD];
    __shared__ float Gs[ATT_KT][ATT_MAXD];
    __shared__ float Ls[ATT_KT], Dl[ATT_KT];
    __shared__ u32 Pq[ATT_KT];
    __shared__ u32 sh_minpk, sh_maxpq;
    const int b = blockIdx.x;
    if (b >= koff[num_seqs]) return;
    const int s = att_find_seg(koff, num_seqs, b);
    const int kh = blockIdx.y, group = heads / kv_heads;
    const int tid = threadIdx.x, sub = tid % ATT_TPQ;
    const u32 j = cu_k[s] + (u32)(b - koff[s]) * ATT_ROWS + tid / ATT_TPQ;
    const bool valid = j < cu_k[s + 1];
    const int qs = heads * hd, ks = kv_heads * hd;
    const u32 pk = valid ? pos_k[j] : U32_MAX;
    if (tid == 0) sh_minpk = U32_MAX;
    __syncthreads();
    if (valid) atomicMin(&sh_minpk, pk);

    float kr[DPT], vr[DPT], dka[DPT], dva[DPT];
#pragma unroll
    for (int c = 0; c < DPT; ++c) {
        const int d = sub + ATT_TPQ * c;
        const bool ok = valid && d < hd;
        kr[c] = ok ? k[(i64)j * ks + kh * hd + d] : 0.f;
        vr[c] = ok ? v[(i64)j * ks + kh * hd + d] : 0.f;
        dka[c] = 0.f;
        dva[c] = 0.f;
    }
    const u32 qa = cu_q[s], qb = cu_q[s + 1];
    for (u32 t0 = qa; t0 < qb; t0 += ATT_KT) {
        const int nt = (int)min((u32)ATT_KT, qb - t0);
        for (int h = kh * group; h < (kh + 1) * group; ++h) {
            __syncthreads();
            att_load_tile(Qs, q, t0, nt, qs, h * hd, hd);
            att_load_tile(Gs, dout, t0, nt, qs, h * hd, hd);
            if (tid < 32) {
                const bool in = tid < nt;
                const u32 p = in ? pos_q[t0 + tid] : 0u;
                Pq[tid] = p;
                Ls[tid] = in ? lse[(i64)(t0 + tid) * heads + h] : F_INF;
                Dl[tid] = in ? delta[(i64)(t0 + tid) * heads + h] : 0.f;
                const u32 mx = warp_max_u32(p);
                if (tid == 0) sh_maxpq = mx;
            }
            __syncthreads();
            if (sh_maxpq < sh_minpk) continue;  // block-uniform: no query of the tile sees these keys
#pragma unroll 4
            for (int r = 0; r < ATT_KT; ++r) {
                float sp = 0.f, dp = 0.f;
#pragma unroll
                for (int c = 0; c < DPT; ++c) {
                    const int d = sub + ATT_TPQ * c;
                    if (d < hd) {
                        sp += kr[c] * Qs[r][d];
                        dp += vr[c] * Gs[r][d];
                    }
                }
                sp = quad_sum(sp);
                dp = quad_sum(dp);
                const bool vis = valid && r < nt && pk <= Pq[r];
                const float p = vis ? expf(sp * scale - Ls[r]) : 0.f;
                const float ds = p * (dp - Dl[r]);
#pragma unroll
                for (int c = 0; c < DPT; ++c) {
                    const int d = sub + ATT_TPQ * c;
                    if (d < hd) {
                        dva[c] += p * Gs[r][d];
                        dka[c] += ds * Qs[r][d];
                    }
                }
            }
        }
    }
    if (valid) {
#pragma unroll
        for (int c = 0; c < DPT; ++c) {
            const int d = sub + ATT_TPQ * c;
            if (d < hd) {
                dk[(i64)j * ks + kh * hd + d] += scale * dka[c];
                dv[(i64)j * ks + kh * hd + d] += dva[c];
            }
        }
    }
}

#define ATT_FWD_ARGS                                                                                   \
    float *out, float *lse, const float *q, const float *k, const float *v, const u32 *cu_q, const u32 *cu_k, \
        const u32 *pos_q, const u32 *pos_k, const int *qoff, int num_seqs, int heads, int kv_heads, int hd, \
        float scale
#define ATT_DQ_ARGS                                                                                    \
    float *dq, const float *dout, const float *lse, const float *delta, const float *q, const float *k,   \
        const float *v, const u32 *cu_q, const u32 *cu_k, const u32 *pos_q, const u32 *pos_k, const int *qoff, \
        int num_seqs, int heads, int kv_heads, int hd, float scale
#define ATT_DKDV_ARGS                                                                                  \
    float *dk, float *dv, const float *dout, const float *lse, const float *delta, const float *q,        \
        const float *k, const float *v, const u32 *cu_q, const u32 *cu_k, const u32 *pos_q, const u32 *pos_k, \
        const int *koff, int num_seqs, int heads, int kv_heads, int hd, float scale

#define INST_ATT(SUF, DPT)                                                                             \
    extern "C" __global__ void __launch_bounds__(128) attn_fwd_##SUF(ATT_FWD_ARGS) {                  \
        attn_fwd_impl<DPT>(out, lse, q, k, v, cu_q, cu_k, pos_q, pos_k, qoff, num_seqs, heads, kv_heads, hd, \
                           scale);                                                                     \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_##SUF(ATT_DQ_ARGS) {                \
        attn_bwd_dq_impl<DPT>(dq, dout, lse, delta, q, k, v, cu_q, cu_k, pos_q, pos_k, qoff, num_seqs, heads, \
                              kv_heads, hd, scale);                                                    \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdv_##SUF(ATT_DKDV_ARGS) {            \
        attn_bwd_dkdv_impl<DPT>(dk, dv, dout, lse, delta, q, k, v, cu_q, cu_k, pos_q, pos_k, koff, num_seqs, \
                                heads, kv_heads, hd, scale);                                           \
    }

// hd <= 64 and hd <= 128 variants (dims per thread 16 and 32).
INST_ATT(f32_d64, 16)
INST_ATT(f32_d128, 32)
