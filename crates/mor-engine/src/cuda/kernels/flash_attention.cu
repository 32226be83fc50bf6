// Tensor-core attention for the bf16 mode (MatmulPrecision::Bf16): the same packed, position-masked
// attention as attention.cu, with Q·Kᵀ, P·V and the backward products on mma.sync m16n8k16
// (bf16 operands, f32 accumulation). Softmax statistics, lse, delta and every gradient stay f32.
// Inputs and outputs are the f32 activation buffers; tiles are rounded to bf16 (nearest even) as
// they are staged in shared memory.
//
// Layout: a block of 4 warps owns 64 rows (queries in the forward and the dq pass, keys in the
// dk/dv pass) of one segment and one head (kv head for dk/dv); each warp owns 16 of them and keeps
// their operand fragments in registers. The other side streams through shared memory in tiles of
// 64 rows. Tiles are skipped when no position of the tile is visible to the block, and the mask is
// evaluated only on tiles that are partly visible. Like attention.cu the backward is two passes
// (dq over key tiles, dk/dv over query tiles summing the heads of a kv group), so every gradient
// row has one owner: deterministic, no atomics.
//
// mma.m16n8k16 fragments (g = lane / 4, t = lane % 4; a register holds two bf16, low half first):
//   A 16x16 (row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8  (k x n):     b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C 16x8  (f32):       c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// Two C tiles side by side (16 x 16) are exactly one A fragment, so scores turn into the A operand
// of the next product without leaving registers. Shared tiles are padded by 8 bf16 per row, which
// makes every fragment load below conflict-free.

#define FA_ROWS 64
#define FA_THREADS 128
#define FA_PAD 8
#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

// Two f32 -> one bf16x2 word (round to nearest even, one instruction): `lo` in the low half.
__device__ __forceinline__ u32 fa_pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void fa_mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One 32-bit word (two bf16 at columns col, col+1) of a shared tile.
#define FA_W(tile, row, col) (*(const u32*)&(tile)[row][col])

// Stage rows t0..t0+nt of an f32 matrix (row stride `stride`, columns col..col+HD) as bf16:
// row-major into dst[r][d], zero rows past nt.
template <int HD>
__device__ __forceinline__ void fa_stage(unsigned short (*dst)[HD + FA_PAD], const float* src, u32 t0, int nt,
                                         int stride, int col) {
    for (int e = threadIdx.x; e < FA_ROWS * HD / 4; e += FA_THREADS) {
        const int r = e / (HD / 4), c = (e % (HD / 4)) * 4;
        const float4 x = r < nt ? *(const float4*)(src + (i64)(t0 + r) * stride + col + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        *(uint2*)&dst[r][c] = make_uint2(fa_pack(x.x, x.y), fa_pack(x.z, x.w));
    }
}

// The same rows transposed: dst[d][r].
template <int HD>
__device__ __forceinline__ void fa_stage_t(unsigned short (*dst)[FA_ROWS + FA_PAD], const float* src, u32 t0, int nt,
                                           int stride, int col) {
    for (int e = threadIdx.x; e < FA_ROWS * HD / 4; e += FA_THREADS) {
        const int r = e % FA_ROWS, c = (e / FA_ROWS) * 4;
        const float4 x = r < nt ? *(const float4*)(src + (i64)(t0 + r) * stride + col + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        const u32 a = fa_pack(x.x, x.y), b = fa_pack(x.z, x.w);
        dst[c][r] = (unsigned short)(a & 0xffffu);
        dst[c + 1][r] = (unsigned short)(a >> 16);
        dst[c + 2][r] = (unsigned short)(b & 0xffffu);
        dst[c + 3][r] = (unsigned short)(b >> 16);
    }
}

// The A fragments of a warp's 16 rows (tile rows w16..w16+15) over all HD columns.
template <int HD>
__device__ __forceinline__ void fa_frag_a(u32 (*a)[4], const unsigned short (*t)[HD + FA_PAD], int w16, int g, int tq) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        a[kk][0] = FA_W(t, w16 + g, kk * 16 + 2 * tq);
        a[kk][1] = FA_W(t, w16 + g + 8, kk * 16 + 2 * tq);
        a[kk][2] = FA_W(t, w16 + g, kk * 16 + 8 + 2 * tq);
        a[kk][3] = FA_W(t, w16 + g + 8, kk * 16 + 8 + 2 * tq);
    }
}

// acc[16 x 64] = A[16 x HD] · Bᵀ where B is a row-major [64][HD] tile (B row = output column).
template <int HD>
__device__ __forceinline__ void fa_mm_nt(float (*acc)[4], const u32 (*a)[4], const unsigned short (*b)[HD + FA_PAD],
                                         int g, int tq) {
#pragma unroll
    for (int n = 0; n < FA_ROWS / 8; ++n) {
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk)
            fa_mma(acc[n], a[kk], FA_W(b, n * 8 + g, kk * 16 + 2 * tq), FA_W(b, n * 8 + g, kk * 16 + 8 + 2 * tq));
    }
}

// acc[16 x HD] += P[16 x 64] · B where P is held as C fragments p[8][4] (rounded to bf16 here) and
// B is given transposed, bt[HD][64].
template <int HD>
__device__ __forceinline__ void fa_mm_pv(float (*acc)[4], const float (*p)[4], const unsigned short (*bt)[FA_ROWS + FA_PAD],
                                         int g, int tq) {
#pragma unroll
    for (int j = 0; j < FA_ROWS / 16; ++j) {
        const u32 a[4] = {fa_pack(p[2 * j][0], p[2 * j][1]), fa_pack(p[2 * j][2], p[2 * j][3]),
                          fa_pack(p[2 * j + 1][0], p[2 * j + 1][1]), fa_pack(p[2 * j + 1][2], p[2 * j + 1][3])};
#pragma unroll
        for (int n = 0; n < HD / 8; ++n)
            fa_mma(acc[n], a, FA_W(bt, n * 8 + g, j * 16 + 2 * tq), FA_W(bt, n * 8 + g, j * 16 + 8 + 2 * tq));
    }
}

// Positions of tile rows t0..t0+nt into P (rows past nt get `pad`); returns through `range` the
// min and max over the valid rows (block-wide; two warps, FA_ROWS = 64). Ends with a barrier.
__device__ __forceinline__ void fa_positions(u32* P, u32* range, const u32* pos, u32 t0, int nt, u32 pad) {
    const int tid = threadIdx.x;
    if (tid < FA_ROWS) {
        const bool in = tid < nt;
        const u32 p = in ? pos[t0 + tid] : pad;
        P[tid] = p;
        const u32 mn = warp_min_u32(in ? p : U32_MAX), mx = warp_max_u32(in ? p : 0u);
        if ((tid & 31) == 0) {
            range[2 * (tid >> 5)] = mn;
            range[2 * (tid >> 5) + 1] = mx;
        }
    }
    __syncthreads();
    if (tid == 0) {
        range[0] = min(range[0], range[2]);
        range[1] = max(range[1], range[3]);
    }
    __syncthreads();
}

template <int HD>
__device__ void fa_fwd_impl(float* out, float* lse, const float* q, const float* k, const float* v, const u32* cu_q,
                            const u32* cu_k, const u32* pos_q, const u32* pos_k, const int* qoff, int num_seqs,
                            int heads, int kv_heads, float scale) {
    __shared__ __align__(16) unsigned short Qs[FA_ROWS][HD + FA_PAD];
    __shared__ __align__(16) unsigned short Ks[FA_ROWS][HD + FA_PAD];
    __shared__ __align__(16) unsigned short Vt[HD][FA_ROWS + FA_PAD];
    __shared__ u32 Pq[FA_ROWS], Pk[FA_ROWS];
    __shared__ u32 rq[4], rk[4];
    const int b = blockIdx.x;
    if (b >= qoff[num_seqs]) return;
    const int s = att_find_seg(qoff, num_seqs, b);
    const int h = blockIdx.y, kh = h / (heads / kv_heads);
    const int tid = threadIdx.x, w16 = (tid >> 5) * 16, g = (tid & 31) >> 2, tq = tid & 3;
    const u32 q0 = cu_q[s] + (u32)(b - qoff[s]) * FA_ROWS;
    const int nq = (int)min((u32)FA_ROWS, cu_q[s + 1] - q0);
    const int qs = heads * HD, ks = kv_heads * HD;

    fa_stage<HD>(Qs, q, q0, nq, qs, h * HD);
    fa_positions(Pq, rq, pos_q, q0, nq, 0u);
    const u32 minpq = rq[0], maxpq = rq[1];
    u32 qa[HD / 16][4];
    fa_frag_a<HD>(qa, Qs, w16, g, tq);
    const u32 pq0 = Pq[w16 + g], pq1 = Pq[w16 + g + 8];

    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = F_NINF, m1 = F_NINF, l0 = 0.f, l1 = 0.f;  // running max (log2 domain) and sum per row
    const float sl2 = scale * LOG2E_F;
    const u32 ka = cu_k[s], kb = cu_k[s + 1];
    for (u32 t0 = ka; t0 < kb; t0 += FA_ROWS) {
        const int nt = (int)min((u32)FA_ROWS, kb - t0);
        __syncthreads();  // the previous tile is consumed
        fa_positions(Pk, rk, pos_k, t0, nt, U32_MAX);
        if (rk[0] > maxpq) continue;  // block-uniform: every key of the tile is in the future
        const bool masked = !(rk[1] <= minpq && nt == FA_ROWS);
        fa_stage<HD>(Ks, k, t0, nt, ks, kh * HD);
        fa_stage_t<HD>(Vt, v, t0, nt, ks, kh * HD);
        __syncthreads();
        float sc[FA_ROWS / 8][4];
        fa_mm_nt<HD>(sc, qa, Ks, g, tq);
        float mx0 = F_NINF, mx1 = F_NINF;
#pragma unroll
        for (int n = 0; n < FA_ROWS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = sc[n][e] * sl2;
                if (masked && Pk[n * 8 + 2 * tq + (e & 1)] > (e < 2 ? pq0 : pq1)) x = F_NINF;
                sc[n][e] = x;
            }
            mx0 = fmaxf(mx0, fmaxf(sc[n][0], sc[n][1]));
            mx1 = fmaxf(mx1, fmaxf(sc[n][2], sc[n][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        // A row with nothing visible yet keeps m = -inf; subtract 0 then (exp2(-inf) = 0, no NaN).
        const float s0 = n0 == F_NINF ? 0.f : n0, s1 = n1 == F_NINF ? 0.f : n1;
        const float c0 = exp2f(m0 - s0), c1 = exp2f(m1 - s1);
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            o[n][0] *= c0;
            o[n][1] *= c0;
            o[n][2] *= c1;
            o[n][3] *= c1;
        }
#pragma unroll
        for (int n = 0; n < FA_ROWS / 8; ++n) {
            sc[n][0] = exp2f(sc[n][0] - s0);
            sc[n][1] = exp2f(sc[n][1] - s0);
            sc[n][2] = exp2f(sc[n][2] - s1);
            sc[n][3] = exp2f(sc[n][3] - s1);
            l0 += sc[n][0] + sc[n][1];
            l1 += sc[n][2] + sc[n][3];
        }
        m0 = n0;
        m1 = n1;
        fa_mm_pv<HD>(o, sc, Vt, g, tq);
    }
    l0 += __shfl_xor_sync(FULL_MASK, l0, 1);
    l0 += __shfl_xor_sync(FULL_MASK, l0, 2);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 1);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 2);
    const int r0 = w16 + g, r1 = r0 + 8;
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        const int d = h * HD + n * 8 + 2 * tq;
        if (r0 < nq) *(float2*)(out + (i64)(q0 + r0) * qs + d) = make_float2(o[n][0] * i0, o[n][1] * i0);
        if (r1 < nq) *(float2*)(out + (i64)(q0 + r1) * qs + d) = make_float2(o[n][2] * i1, o[n][3] * i1);
    }
    if (tq == 0) {
        if (r0 < nq) lse[(i64)(q0 + r0) * heads + h] = l0 > 0.f ? (m0 + log2f(l0)) * LN2_F : F_INF;
        if (r1 < nq) lse[(i64)(q0 + r1) * heads + h] = l1 > 0.f ? (m1 + log2f(l1)) * LN2_F : F_INF;
    }
}

// dq += scale * Σ_keys dS K with dS = P ⊙ (dout·vᵀ - delta); blocks over query tiles.
template <int HD>
__device__ void fa_bwd_dq_impl(float* dq, const float* dout, const float* lse, const float* delta, const float* q,
                               const float* k, const float* v, const u32* cu_q, const u32* cu_k, const u32* pos_q,
                               const u32* pos_k, const int* qoff, int num_seqs, int heads, int kv_heads, float scale) {
    __shared__ __align__(16) unsigned short Ks[FA_ROWS][HD + FA_PAD];
    __shared__ __align__(16) unsigned short Vs[FA_ROWS][HD + FA_PAD];
    __shared__ __align__(16) unsigned short Kt[HD][FA_ROWS + FA_PAD];
    __shared__ u32 Pq[FA_ROWS], Pk[FA_ROWS];
    __shared__ u32 rq[4], rk[4];
    const int b = blockIdx.x;
    if (b >= qoff[num_seqs]) return;
    const int s = att_find_seg(qoff, num_seqs, b);
    const int h = blockIdx.y, kh = h / (heads / kv_heads);
    const int tid = threadIdx.x, w16 = (tid >> 5) * 16, g = (tid & 31) >> 2, tq = tid & 3;
    const u32 q0 = cu_q[s] + (u32)(b - qoff[s]) * FA_ROWS;
    const int nq = (int)min((u32)FA_ROWS, cu_q[s + 1] - q0);
    const int qs = heads * HD, ks = kv_heads * HD;
    const int r0 = w16 + g, r1 = r0 + 8;

    // Q and dout fragments, staged through the K and V tiles.
    fa_stage<HD>(Ks, q, q0, nq, qs, h * HD);
    fa_stage<HD>(Vs, dout, q0, nq, qs, h * HD);
    fa_positions(Pq, rq, pos_q, q0, nq, 0u);
    const u32 minpq = rq[0], maxpq = rq[1];
    u32 qa[HD / 16][4], ga[HD / 16][4];
    fa_frag_a<HD>(qa, Ks, w16, g, tq);
    fa_frag_a<HD>(ga, Vs, w16, g, tq);
    const u32 pq0 = Pq[r0], pq1 = Pq[r1];
    const float L0 = r0 < nq ? lse[(i64)(q0 + r0) * heads + h] * LOG2E_F : F_INF;
    const float L1 = r1 < nq ? lse[(i64)(q0 + r1) * heads + h] * LOG2E_F : F_INF;
    const float D0 = r0 < nq ? delta[(i64)(q0 + r0) * heads + h] : 0.f;
    const float D1 = r1 < nq ? delta[(i64)(q0 + r1) * heads + h] : 0.f;

    float acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const float sl2 = scale * LOG2E_F;
    const u32 ka = cu_k[s], kb = cu_k[s + 1];
    for (u32 t0 = ka; t0 < kb; t0 += FA_ROWS) {
        const int nt = (int)min((u32)FA_ROWS, kb - t0);
        __syncthreads();
        fa_positions(Pk, rk, pos_k, t0, nt, U32_MAX);
        if (rk[0] > maxpq) continue;
        const bool masked = !(rk[1] <= minpq && nt == FA_ROWS);
        fa_stage<HD>(Ks, k, t0, nt, ks, kh * HD);
        fa_stage<HD>(Vs, v, t0, nt, ks, kh * HD);
        fa_stage_t<HD>(Kt, k, t0, nt, ks, kh * HD);
        __syncthreads();
        float p[FA_ROWS / 8][4], dp[FA_ROWS / 8][4];
        fa_mm_nt<HD>(p, qa, Ks, g, tq);
        fa_mm_nt<HD>(dp, ga, Vs, g, tq);
#pragma unroll
        for (int n = 0; n < FA_ROWS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool hi = e >= 2;
                float x = exp2f(p[n][e] * sl2 - (hi ? L1 : L0));
                if (masked && Pk[n * 8 + 2 * tq + (e & 1)] > (hi ? pq1 : pq0)) x = 0.f;
                p[n][e] = x * (dp[n][e] - (hi ? D1 : D0));  // dS
            }
        }
        fa_mm_pv<HD>(acc, p, Kt, g, tq);
    }
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        const int d = h * HD + n * 8 + 2 * tq;
        if (r0 < nq) {
            float2* o = (float2*)(dq + (i64)(q0 + r0) * qs + d);
            const float2 x = *o;
            *o = make_float2(x.x + scale * acc[n][0], x.y + scale * acc[n][1]);
        }
        if (r1 < nq) {
            float2* o = (float2*)(dq + (i64)(q0 + r1) * qs + d);
            const float2 x = *o;
            *o = make_float2(x.x + scale * acc[n][2], x.y + scale * acc[n][3]);
        }
    }
}

// dv += Σ_queries Pᵀ dout, dk += scale * Σ_queries dSᵀ q over the heads of kv head blockIdx.y;
// blocks over key tiles. Transposed products: warp rows are keys, tile columns are queries.
template <int HD>
__device__ void fa_bwd_dkdv_impl(float* dk, float* dv, const float* dout, const float* lse, const float* delta,
                                 const float* q, const float* k, const float* v, const u32* cu_q, const u32* cu_k,
                                 const u32* pos_q, const u32* pos_k, const int* koff, int num_seqs, int heads,
                                 int kv_heads, float scale) {
    __shared__ __align__(16) unsigned short Qs[FA_ROWS][HD + FA_PAD];
    __shared__ __align__(16) unsigned short Gs[FA_ROWS][HD + FA_PAD];
    __shared__ __align__(16) unsigned short Qt[HD][FA_ROWS + FA_PAD];
    __shared__ __align__(16) unsigned short Gt[HD][FA_ROWS + FA_PAD];
    __shared__ u32 Pq[FA_ROWS], Pk[FA_ROWS];
    __shared__ float Lq[FA_ROWS], Dq[FA_ROWS];
    __shared__ u32 rq[4], rk[4];
    const int b = blockIdx.x;
    if (b >= koff[num_seqs]) return;
    const int s = att_find_seg(koff, num_seqs, b);
    const int kh = blockIdx.y, group = heads / kv_heads;
    const int tid = threadIdx.x, w16 = (tid >> 5) * 16, g = (tid & 31) >> 2, tq = tid & 3;
    const u32 k0 = cu_k[s] + (u32)(b - koff[s]) * FA_ROWS;
    const int nk = (int)min((u32)FA_ROWS, cu_k[s + 1] - k0);
    const int qs = heads * HD, ks = kv_heads * HD;
    const int r0 = w16 + g, r1 = r0 + 8;

    fa_stage<HD>(Qs, k, k0, nk, ks, kh * HD);
    fa_stage<HD>(Gs, v, k0, nk, ks, kh * HD);
    fa_positions(Pk, rk, pos_k, k0, nk, U32_MAX);
    const u32 minpk = rk[0], maxpk = rk[1];
    u32 ka[HD / 16][4], va[HD / 16][4];
    fa_frag_a<HD>(ka, Qs, w16, g, tq);
    fa_frag_a<HD>(va, Gs, w16, g, tq);
    const u32 pk0 = Pk[r0], pk1 = Pk[r1];

    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        dka[n][0] = dka[n][1] = dka[n][2] = dka[n][3] = 0.f;
        dva[n][0] = dva[n][1] = dva[n][2] = dva[n][3] = 0.f;
    }
    const float sl2 = scale * LOG2E_F;
    const u32 qa_ = cu_q[s], qb = cu_q[s + 1];
    for (u32 t0 = qa_; t0 < qb; t0 += FA_ROWS) {
        const int nt = (int)min((u32)FA_ROWS, qb - t0);
        __syncthreads();
        fa_positions(Pq, rq, pos_q, t0, nt, 0u);
        if (rq[1] < minpk) continue;  // no query of the tile sees these keys
        const bool masked = !(maxpk <= rq[0] && nt == FA_ROWS);
        for (int h = kh * group; h < (kh + 1) * group; ++h) {
            __syncthreads();
            fa_stage<HD>(Qs, q, t0, nt, qs, h * HD);
            fa_stage<HD>(Gs, dout, t0, nt, qs, h * HD);
            fa_stage_t<HD>(Qt, q, t0, nt, qs, h * HD);
            fa_stage_t<HD>(Gt, dout, t0, nt, qs, h * HD);
            if (tid < FA_ROWS) {
                const bool in = tid < nt;
                Lq[tid] = in ? lse[(i64)(t0 + tid) * heads + h] * LOG2E_F : F_INF;
                Dq[tid] = in ? delta[(i64)(t0 + tid) * heads + h] : 0.f;
            }
            __syncthreads();
            float p[FA_ROWS / 8][4], dp[FA_ROWS / 8][4];
            fa_mm_nt<HD>(p, ka, Qs, g, tq);   // Sᵀ: keys x queries
            fa_mm_nt<HD>(dp, va, Gs, g, tq);  // dPᵀ = v · doutᵀ
#pragma unroll
            for (int n = 0; n < FA_ROWS / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = n * 8 + 2 * tq + (e & 1);
                    float x = exp2f(p[n][e] * sl2 - Lq[c]);
                    if (masked && (e < 2 ? pk0 : pk1) > Pq[c]) x = 0.f;
                    p[n][e] = x;
                    dp[n][e] = x * (dp[n][e] - Dq[c]);  // dSᵀ
                }
            }
            fa_mm_pv<HD>(dva, p, Gt, g, tq);
            fa_mm_pv<HD>(dka, dp, Qt, g, tq);
        }
    }
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        const int d = kh * HD + n * 8 + 2 * tq;
        if (r0 < nk) {
            float2* o = (float2*)(dk + (i64)(k0 + r0) * ks + d);
            float2 x = *o;
            *o = make_float2(x.x + scale * dka[n][0], x.y + scale * dka[n][1]);
            o = (float2*)(dv + (i64)(k0 + r0) * ks + d);
            x = *o;
            *o = make_float2(x.x + dva[n][0], x.y + dva[n][1]);
        }
        if (r1 < nk) {
            float2* o = (float2*)(dk + (i64)(k0 + r1) * ks + d);
            float2 x = *o;
            *o = make_float2(x.x + scale * dka[n][2], x.y + scale * dka[n][3]);
            o = (float2*)(dv + (i64)(k0 + r1) * ks + d);
            x = *o;
            *o = make_float2(x.x + dva[n][2], x.y + dva[n][3]);
        }
    }
}

#define INST_FA(HD)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) attn_fwd_bf16_d##HD(                                    \
        float* out, float* lse, const float* q, const float* k, const float* v, const u32* cu_q, const u32* cu_k,    \
        const u32* pos_q, const u32* pos_k, const int* qoff, int num_seqs, int heads, int kv_heads, float scale) {   \
        fa_fwd_impl<HD>(out, lse, q, k, v, cu_q, cu_k, pos_q, pos_k, qoff, num_seqs, heads, kv_heads, scale);        \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) attn_bwd_dq_bf16_d##HD(                                 \
        float* dq, const float* dout, const float* lse, const float* delta, const float* q, const float* k,          \
        const float* v, const u32* cu_q, const u32* cu_k, const u32* pos_q, const u32* pos_k, const int* qoff,       \
        int num_seqs, int heads, int kv_heads, float scale) {                                                        \
        fa_bwd_dq_impl<HD>(dq, dout, lse, delta, q, k, v, cu_q, cu_k, pos_q, pos_k, qoff, num_seqs, heads, kv_heads, \
                           scale);                                                                                   \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) attn_bwd_dkdv_bf16_d##HD(                               \
        float* dk, float* dv, const float* dout, const float* lse, const float* delta, const float* q,               \
        const float* k, const float* v, const u32* cu_q, const u32* cu_k, const u32* pos_q, const u32* pos_k,        \
        const int* koff, int num_seqs, int heads, int kv_heads, float scale) {                                       \
        fa_bwd_dkdv_impl<HD>(dk, dv, dout, lse, delta, q, k, v, cu_q, cu_k, pos_q, pos_k, koff, num_seqs, heads,     \
                             kv_heads, scale);                                                                       \
    }

INST_FA(32)
INST_FA(64)
