// Tensor-core attention for the bf16 mode (MatmulPrecision::Bf16): the same packed, position-masked
// attention as attention.cu, with Q·Kᵀ, P·V and the backward products on mma.sync m16n8k16
// (bf16 operands, f32 accumulation). Softmax statistics, lse and delta stay f32. q, k, v and dout
// are bf16 (activation buffers of the bf16 mode, or copies the host rounded from f32); each output
// (out, dq, dk/dv) is f32 or bf16 as its buffer says (a flag), written through fa_put2.
//
// Layout: a block of WARPS warps owns 16·WARPS rows (queries in the forward and the dq pass, keys in
// the dk/dv pass) of one segment and one head (kv head for dk/dv); each warp owns 16 rows and keeps
// their operand fragments in registers. The other side streams through shared memory in tiles of
// FA_BN rows, double-buffered with cp.async (the next tile loads while this one computes);
// fragments come from shared memory through ldmatrix (.trans where the product needs the tile
// transposed). A streamed tile is skipped when none of its positions is visible to the block
// (per-tile position ranges from attn_tile_range), and the mask is evaluated only on tiles that
// are partly visible. The backward is one fused kernel by default (dk/dv over query tiles and the
// heads of a kv group, dq added to an f32 workspace by float atomics: 5 products) or, in the
// deterministic mode, two passes like attention.cu (dq over key tiles, then dk/dv: every gradient
// row has one owner, no atomics, 7 products).
//
// mma.m16n8k16 fragments (g = lane / 4, t = lane % 4; a register holds two bf16, low half first):
//   A 16x16 (row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8  (k x n):     b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C 16x8  (f32):       c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// Two C tiles side by side (16 x 16) are exactly one A fragment, so scores turn into the A operand
// of the next product without leaving registers. Shared tiles are padded by 8 bf16 per row, which
// makes every ldmatrix conflict-free.

#define FA_BN 64
#define FA_PAD 8
#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

typedef unsigned short bf16_t;

__device__ __forceinline__ u32 fa_smem(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16 (or 4) bytes global -> shared without passing through registers; zero-filled when !full.
__device__ __forceinline__ void fa_cp16(void* dst, const void* src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fa_smem(dst)), "l"(src), "r"(full ? 16 : 0));
}
__device__ __forceinline__ void fa_cp4(void* dst, const void* src, bool full) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(fa_smem(dst)), "l"(src), "r"(full ? 4 : 0));
}
__device__ __forceinline__ void fa_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void fa_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void fa_ldsm(u32* r, const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem(p)));
}
__device__ __forceinline__ void fa_ldsm_t(u32* r, const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem(p)));
}

// Store — or add to, when `acc` — two f32 values at element `i` (even) of an f32 or bf16 buffer.
__device__ __forceinline__ void fa_put2(void* base, i64 i, float a, float b, int is_bf16, bool acc) {
    if (is_bf16) {
        u32* p = (u32*)((bf16_t*)base + i);
        if (acc) {
            const u32 x = *p;
            a += __uint_as_float(x << 16);
            b += __uint_as_float(x & 0xffff0000u);
        }
        *p = pack_bf16x2(a, b);
    } else {
        float2* p = (float2*)((float*)base + i);
        if (acc) {
            const float2 x = *p;
            a += x.x;
            b += x.y;
        }
        *p = make_float2(a, b);
    }
}

// 2^x on the SFU (approximate, ~2 ulp; 2^-inf = 0), as every flash-attention kernel uses.
__device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// 2^x for x <= 0 on the FMA and integer pipes instead of the SFU (FlashAttention-4's offload; the
// forward's softmax is SFU-bound at head dim 64): x = j + f with j = round(x) (the 1.5 * 2^23
// trick), 2^f by a degree-3 minimax polynomial on [-0.5, 0.5] (relative error 7.5e-5, far below
// bf16's 2^-9), 2^j added to the exponent bits. At and below -127 (masked: -inf) the bits would go
// negative; the max makes that exactly +0, as ex2 gives.
__device__ __forceinline__ float fa_exp2_poly(float x) {
    x = fmaxf(x, -127.f);
    const float t = x + 12582912.f;
    const float f = x - (t - 12582912.f);
    const float p = fmaf(fmaf(fmaf(0.0551716685f, f, 0.2426111400f), f, 0.6932609677f), f, 0.9999280572f);
    return __int_as_float(max(__float_as_int(p) + (__float_as_int(t) << 23), 0));
}

// Every FA_EXP_POLY-th group of 8 key columns of the forward's softmax takes fa_exp2_poly (0: none).
#ifndef FA_EXP_POLY
#define FA_EXP_POLY 0
#endif
__device__ __forceinline__ float fa_exp2_group(float x, int group) {
    if (FA_EXP_POLY > 0 && group % (FA_EXP_POLY > 0 ? FA_EXP_POLY : 1) == 0) return fa_exp2_poly(x);
    return fa_exp2(x);
}

__device__ __forceinline__ void fa_mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Asynchronously copy rows t0..t0+nt of a bf16 matrix (row stride `stride`, columns col..col+HD)
// into rows 0..ROWS of a shared tile with row stride HD + FA_PAD; rows past nt become zero.
template <int HD, int ROWS>
__device__ __forceinline__ void fa_load(bf16_t* dst, const bf16_t* src, u32 t0, int nt, int stride, int col) {
    constexpr int CH = HD / 8;  // 16-byte chunks per row
    for (int e = threadIdx.x; e < ROWS * CH; e += blockDim.x) {
        const int r = e / CH, c = (e % CH) * 8;
        const bool in = r < nt;
        fa_cp16(dst + r * (HD + FA_PAD) + c, src + (i64)(t0 + (in ? r : 0)) * stride + col + c, in);
    }
}

// `n` u32/f32 values src[(t0 + i) * stride] (i < nt, else 0) into dst[i], asynchronously.
__device__ __forceinline__ void fa_load_col(void* dst, const void* src, u32 t0, int nt, int stride) {
    for (int i = threadIdx.x; i < FA_BN; i += blockDim.x) {
        const bool in = i < nt;
        fa_cp4((u32*)dst + i, (const u32*)src + (i64)(t0 + (in ? i : 0)) * stride, in);
    }
}

// A fragments of one warp's 16 rows (row0..row0+15 of a shared tile) over all HD columns.
template <int HD>
__device__ __forceinline__ void fa_frag_a(u32 (*a)[4], const bf16_t* t, int row0, int lane) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
        fa_ldsm(a[kk], t + (row0 + (lane & 15)) * (HD + FA_PAD) + kk * 16 + (lane >> 4) * 8);
}

// acc[mt][16 x FA_BN] = A[mt][16 x HD] · Tᵀ for the warp's MT row tiles, T a shared [FA_BN][HD]
// tile (its rows are the output columns). Each B fragment is loaded once for all MT row tiles.
template <int HD, int MT>
__device__ __forceinline__ void fa_mm_abt_mt(float (*acc)[FA_BN / 8][4], const u32 (*a)[HD / 16][4], const bf16_t* t,
                                             int lane) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < FA_BN / 8; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
#pragma unroll
    for (int np = 0; np < FA_BN / 16; ++np) {
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            u32 b[4];
            fa_ldsm(b, t + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * (HD + FA_PAD) + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                fa_mma(acc[mt][2 * np], a[mt][kk], b[0], b[1]);
                fa_mma(acc[mt][2 * np + 1], a[mt][kk], b[2], b[3]);
            }
        }
    }
}

// acc[mt][16 x HD] += P[mt][16 x FA_BN] · T, P held as C fragments (rounded to bf16 here), T a
// shared [FA_BN][HD] tile read transposed by ldmatrix.trans; B fragments shared by the MT tiles.
template <int HD, int MT>
__device__ __forceinline__ void fa_mm_pt_mt(float (*acc)[HD / 8][4], const float (*p)[FA_BN / 8][4], const bf16_t* t,
                                            int lane) {
#pragma unroll
    for (int j = 0; j < FA_BN / 16; ++j) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = pack_bf16x2(p[mt][2 * j][0], p[mt][2 * j][1]);
            a[mt][1] = pack_bf16x2(p[mt][2 * j][2], p[mt][2 * j][3]);
            a[mt][2] = pack_bf16x2(p[mt][2 * j + 1][0], p[mt][2 * j + 1][1]);
            a[mt][3] = pack_bf16x2(p[mt][2 * j + 1][2], p[mt][2 * j + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
            u32 b[4];
            fa_ldsm_t(b, t + (j * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * (HD + FA_PAD) + dp * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                fa_mma(acc[mt][2 * dp], a[mt], b[0], b[1]);
                fa_mma(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// Single row tile forms of the two products (the backward kernels).
template <int HD>
__device__ __forceinline__ void fa_mm_abt(float (*acc)[4], const u32 (*a)[4], const bf16_t* t, int lane) {
    fa_mm_abt_mt<HD, 1>((float (*)[FA_BN / 8][4])acc, (const u32 (*)[HD / 16][4])a, t, lane);
}
template <int HD>
__device__ __forceinline__ void fa_mm_pt(float (*acc)[4], const float (*p)[4], const bf16_t* t, int lane) {
    fa_mm_pt_mt<HD, 1>((float (*)[HD / 8][4])acc, (const float (*)[FA_BN / 8][4])p, t, lane);
}

// ---- Hopper warpgroup MMA (wgmma, sm_90a) ----------------------------------------------------
// A warpgroup (4 consecutive warps, 64 rows) multiplies with one instruction per 16-deep step. The
// A operand is the same register fragment as mma.sync's (each warp its 16 rows, so scores still
// turn into the next product's A without leaving registers, and every softmax / mask loop is
// shared with the mma.sync path); the B operand is read by the tensor cores straight from shared
// memory, once per warpgroup instead of once per warp through ldmatrix (which bounds the mma.sync
// kernels). Streamed tiles for wgmma are stored as 8 x 8 "core matrices" (8 rows of 16 bytes,
// contiguous, no swizzle): element (r, c) of a FA_BN-row tile at bf16 index ((c / 8) · FA_BN + r) · 8
// + c % 8. The same tile is a K-major B (its rows are the output columns: A·Tᵀ) or an MN-major B
// (its rows are the reduction: A·T). Descriptor: start, LBO = byte stride between core matrices
// along the reduction (K), SBO = along the output (M/N), for both majors (checked on the H200:
// cuda_parity --wg-probe).
// The wgmma kernels reload the A fragments of their own rows (q, dout, k, v) from a staging tile
// for every streamed tile instead of keeping them in registers across the loop: ptxas (CUDA 13.0)
// reused the registers of a wgmma's A operand after it completed, so fragments kept for the next
// tile were overwritten (seen in the SASS; the second key tile's scores came out wrong).

// Rows t0..t0+nt of a bf16 matrix (columns col..col+HD) into a FA_BN-row core-matrix tile, rows
// past nt zero. Eight consecutive threads fill one core matrix (128 contiguous bytes: no bank
// conflicts) from eight rows.
template <int HD>
__device__ __forceinline__ void fa_load_cm(bf16_t* dst, const bf16_t* src, u32 t0, int nt, int stride, int col) {
    constexpr int CH = HD / 8;
    for (int e = threadIdx.x; e < FA_BN * CH; e += blockDim.x) {
        const int r = (e / (8 * CH)) * 8 + (e & 7), c = (e >> 3) % CH;
        const bool in = r < nt;
        fa_cp16(dst + (c * FA_BN + r) * 8, src + (i64)(t0 + (in ? r : 0)) * stride + col + c * 8, in);
    }
}

__device__ __forceinline__ u64 wg_desc(const bf16_t* p, u32 lbo, u32 sbo) {
    return (u64)((fa_smem(p) & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// cp.async writes shared memory through the generic proxy, wgmma reads it through the async proxy.
__device__ __forceinline__ void fa_fence_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pins registers a wgmma reads or writes at this point of the instruction stream: before the
// fence (every write by ordinary instructions must precede it, and the compiler does not order
// register writes against an asm that does not name them) and after the wait.
__device__ __forceinline__ void wg_pin(float (*d)[4], int n) {
#pragma unroll
    for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])::"memory");
}
__device__ __forceinline__ void wg_pin(u32 (*a)[4], int n) {
#pragma unroll
    for (int i = 0; i < n; ++i) asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
}

#define WG_D(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
// d[64 x N] += a[64 x 16] · B[16 x N] (each warp its 16 rows of a and d); TB = 1: B is MN-major.
template <int TB>
__device__ __forceinline__ void wg_mma_n64(float (*d)[4], const u32* a, u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
        "{%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
        : WG_D(0), WG_D(1), WG_D(2), WG_D(3), WG_D(4), WG_D(5), WG_D(6), WG_D(7)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1), "n"(TB));
}
template <int TB>
__device__ __forceinline__ void wg_mma_n32(float (*d)[4], const u32* a, u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, "
        "{%16,%17,%18,%19}, %20, p, 1, 1, %22;\n}\n"
        : WG_D(0), WG_D(1), WG_D(2), WG_D(3)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1), "n"(TB));
}
// d[64 x 64] += A[64 x 16] · B[16 x 64], both from shared memory; K-major unless TA / TB = 1
// (MN-major A / B).
template <int TA = 0, int TB = 0>
__device__ __forceinline__ void wg_mma_ss_n64(float (*d)[4], u64 da, u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
        "%32, %33, p, 1, 1, %35, %36;\n}\n"
        : WG_D(0), WG_D(1), WG_D(2), WG_D(3), WG_D(4), WG_D(5), WG_D(6), WG_D(7)
        : "l"(da), "l"(db), "r"(1), "n"(TA), "n"(TB));
}
// d[64 x 128] += A[64 x 16] · B[16 x 128], both from shared memory (majors as wg_mma_ss_n64).
template <int TA = 0, int TB = 0>
__device__ __forceinline__ void wg_mma_ss_n128(float (*d)[4], u64 da, u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
        "%64, %65, p, 1, 1, %67, %68;\n}\n"
        : WG_D(0), WG_D(1), WG_D(2), WG_D(3), WG_D(4), WG_D(5), WG_D(6), WG_D(7), WG_D(8), WG_D(9), WG_D(10),
          WG_D(11), WG_D(12), WG_D(13), WG_D(14), WG_D(15)
        : "l"(da), "l"(db), "r"(1), "n"(TA), "n"(TB));
}
#undef WG_D

template <int N, int TB>
__device__ __forceinline__ void wg_mma(float (*d)[4], const u32* a, u64 desc) {
    static_assert(N == 64 || N == 32, "wgmma instantiated for N = 32, 64");
    if constexpr (N == 64)
        wg_mma_n64<TB>(d, a, desc);
    else
        wg_mma_n32<TB>(d, a, desc);
}

// The two products of the kernels, on mma.sync (WG false: the warp's 16 rows, T a padded tile) or
// on wgmma (the warpgroup's 64 rows, T a core-matrix tile).
// acc[16 x FA_BN] = A[16 x HD] · Tᵀ.
template <int HD, bool WG>
__device__ __forceinline__ void fa_abt(float (*acc)[4], const u32 (*a)[4], const bf16_t* t, int lane) {
    if constexpr (WG) {
#pragma unroll
        for (int n = 0; n < FA_BN / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
        wg_pin(acc, FA_BN / 8);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) wg_mma<FA_BN, 0>(acc, a[kk], wg_desc(t + kk * 16 * FA_BN, FA_BN * 16, 128));
        wg_commit();
        wg_wait0();
        wg_pin(acc, FA_BN / 8);
    } else {
        fa_mm_abt<HD>(acc, a, t, lane);
    }
}

// acc[16 x HD] += P[16 x FA_BN] · T, P held as C fragments (rounded to bf16 here).
template <int HD, bool WG>
__device__ __forceinline__ void fa_pt(float (*acc)[4], const float (*p)[4], const bf16_t* t, int lane) {
    if constexpr (WG) {
        constexpr u32 LBO = 128, SBO = FA_BN * 16;  // reduction along rows, output along columns
        u32 a[FA_BN / 16][4];
#pragma unroll
        for (int j = 0; j < FA_BN / 16; ++j) {
            a[j][0] = pack_bf16x2(p[2 * j][0], p[2 * j][1]);
            a[j][1] = pack_bf16x2(p[2 * j][2], p[2 * j][3]);
            a[j][2] = pack_bf16x2(p[2 * j + 1][0], p[2 * j + 1][1]);
            a[j][3] = pack_bf16x2(p[2 * j + 1][2], p[2 * j + 1][3]);
        }
        wg_pin(a, FA_BN / 16);
        wg_pin(acc, HD / 8);
        wg_fence();
#pragma unroll
        for (int j = 0; j < FA_BN / 16; ++j) wg_mma<HD, 1>(acc, a[j], wg_desc(t + j * 128, LBO, SBO));
        wg_commit();
        wg_wait0();
        wg_pin(acc, HD / 8);
    } else {
        fa_mm_pt<HD>(acc, p, t, lane);
    }
}

// A streamed tile in the layout its products read (padded rows for ldmatrix, core matrices for
// wgmma); after the wait for it, wgmma readers need the proxy fence before the barrier.
template <int HD, bool WG>
__device__ __forceinline__ void fa_load_tile(bf16_t* dst, const bf16_t* src, u32 t0, int nt, int stride, int col) {
    if constexpr (WG)
        fa_load_cm<HD>(dst, src, t0, nt, stride, col);
    else
        fa_load<HD, FA_BN>(dst, src, t0, nt, stride, col);
}
template <bool WG>
__device__ __forceinline__ void fa_visible() {
    if constexpr (WG) fa_fence_async();
    __syncthreads();
}

// Min and max position of each tile of `tile` rows (tile table `off` as built by attn_tiles);
// one warp per tile. The attention kernels skip streamed tiles with these before loading them.
extern "C" __global__ void attn_tile_range(const u32* cu, const u32* pos, const int* off, int num_seqs, int tile,
                                           u32* range) {
    const int b = blockIdx.x;
    if (b >= off[num_seqs]) return;
    const int s = att_find_seg(off, num_seqs, b);
    const u32 r0 = cu[s] + (u32)(b - off[s]) * tile, r1 = min(r0 + (u32)tile, cu[s + 1]);
    u32 mn = U32_MAX, mx = 0u;
    for (u32 i = r0 + threadIdx.x; i < r1; i += 32) {
        mn = min(mn, pos[i]);
        mx = max(mx, pos[i]);
    }
    mn = warp_min_u32(mn);
    mx = warp_max_u32(mx);
    if (threadIdx.x == 0) {
        range[2 * b] = mn;
        range[2 * b + 1] = mx;
    }
}

// Min and max over the block of its threads' own minima / maxima.
template <int WARPS>
__device__ __forceinline__ void fa_block_minmax(u32 lmn, u32 lmx, u32* red, u32& mn, u32& mx) {
    const u32 a = warp_min_u32(lmn);
    const u32 b = warp_max_u32(lmx);
    if ((threadIdx.x & 31) == 0) {
        red[threadIdx.x >> 5] = a;
        red[WARPS + (threadIdx.x >> 5)] = b;
    }
    __syncthreads();
    mn = U32_MAX;
    mx = 0u;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        mn = min(mn, red[w]);
        mx = max(mx, red[WARPS + w]);
    }
}

// Min and max over the block of the positions its threads own (p0, p1 valid when v0, v1).
template <int WARPS>
__device__ __forceinline__ void fa_block_range(u32 p0, bool v0, u32 p1, bool v1, u32* red, u32& mn, u32& mx) {
    fa_block_minmax<WARPS>(min(v0 ? p0 : U32_MAX, v1 ? p1 : U32_MAX), max(v0 ? p0 : 0u, v1 ? p1 : 0u), red, mn, mx);
}

// Next streamed tile at or after t (of n) whose smallest position is at most `maxp`.
__device__ __forceinline__ int fa_next_tile(const u32* range, int base, int t, int n, u32 maxp) {
    while (t < n && range[2 * (base + t)] > maxp) ++t;
    return t;
}


// A forward / dq block: its query tile (last tile first: under a causal mask it has the most keys,
// so the lightest blocks form the tail of the grid), head, and the key tiles of its segment.
template <int BM>
struct FaQueryBlock {
    int s, h, kh, nq, kt0, nkt;
    u32 q0, ka, kb;
    __device__ FaQueryBlock(int b, int head, const u32* cu_q, const u32* cu_k, const int* qoff, const int* koff,
                            int num_seqs, int heads, int kv_heads) {
        s = att_find_seg(qoff, num_seqs, b);
        h = head;
        kh = h / (heads / kv_heads);
        q0 = cu_q[s] + (u32)(qoff[s + 1] - 1 - b) * BM;
        nq = (int)min((u32)BM, cu_q[s + 1] - q0);
        ka = cu_k[s];
        kb = cu_k[s + 1];
        kt0 = koff[s];
        nkt = koff[s + 1] - koff[s];
    }
    __device__ u32 tile_start(int t) const { return ka + (u32)t * FA_BN; }
    __device__ int tile_rows(int t) const { return (int)min((u32)FA_BN, kb - tile_start(t)); }
};

// Asynchronously load key tile t of a query block (k and v rows of kv head column `col`, and the
// key positions) into buffer `buf` of the double-buffered K, V and P tiles.
template <int HD, bool WG, int BM>
__device__ __forceinline__ void fa_issue_kv(bf16_t* Ks, bf16_t* Vs, u32* Pk, int buf, const FaQueryBlock<BM>& qb, int t,
                                            const bf16_t* k, const bf16_t* v, const u32* pos_k, int ks, int col) {
    const u32 t0 = qb.tile_start(t);
    const int nt = qb.tile_rows(t);
    fa_load_tile<HD, WG>(Ks + buf * FA_BN * (HD + FA_PAD), k, t0, nt, ks, col);
    fa_load_tile<HD, WG>(Vs + buf * FA_BN * (HD + FA_PAD), v, t0, nt, ks, col);
    fa_load_col(Pk + buf * FA_BN, pos_k, t0, nt, 1);
}

// The online softmax of one 16-row score tile (m16n8 fragments over FA_BN keys): masks (MASKED:
// keys from nt on, or at positions after the row's pq), scales to log2, updates the running max m
// and sum l, leaves P = exp2(S - m) in sc and the correction of the previous O in c (fa_rescale).
// Masked and unmasked tiles are separate instantiations: with the mask test inside the loop ptxas
// branched around every element's position load, on the unmasked tiles too.
template <bool MASKED, int NG = FA_BN / 8>
__device__ __forceinline__ void fa_softmax_tile(float (*sc)[4], float* m, float* l, float* c, int nt, const u32* pk,
                                                const u32* pq, float sl2, int tq) {
    float mx0 = F_NINF, mx1 = F_NINF;
#pragma unroll
    for (int n = 0; n < NG; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float x = sc[n][e] * sl2;
            if constexpr (MASKED) {
                const int col = n * 8 + 2 * tq + (e & 1);
                if (col >= nt || pk[col] > pq[e >> 1]) x = F_NINF;
            }
            sc[n][e] = x;
        }
        mx0 = fmaxf(mx0, fmaxf(sc[n][0], sc[n][1]));
        mx1 = fmaxf(mx1, fmaxf(sc[n][2], sc[n][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 2));
    const float n0 = fmaxf(m[0], mx0), n1 = fmaxf(m[1], mx1);
    // A row with nothing visible yet keeps m = -inf; subtract 0 then (exp2(-inf) = 0, no NaN).
    const float s0 = n0 == F_NINF ? 0.f : n0, s1 = n1 == F_NINF ? 0.f : n1;
    c[0] = fa_exp2(m[0] - s0);
    c[1] = fa_exp2(m[1] - s1);
    l[0] *= c[0];
    l[1] *= c[1];
#pragma unroll
    for (int n = 0; n < NG; ++n) {
        sc[n][0] = fa_exp2_group(sc[n][0] - s0, n);
        sc[n][1] = fa_exp2_group(sc[n][1] - s0, n);
        sc[n][2] = fa_exp2_group(sc[n][2] - s1, n);
        sc[n][3] = fa_exp2_group(sc[n][3] - s1, n);
        l[0] += sc[n][0] + sc[n][1];
        l[1] += sc[n][2] + sc[n][3];
    }
    m[0] = n0;
    m[1] = n1;
}

// fa_softmax_tile on a tile that needs the mask or not.
template <int NG = FA_BN / 8>
__device__ __forceinline__ void fa_softmax_tile(bool masked, float (*sc)[4], float* m, float* l, float* c, int nt,
                                                const u32* pk, const u32* pq, float sl2, int tq) {
    if (masked)
        fa_softmax_tile<true, NG>(sc, m, l, c, nt, pk, pq, sl2, tq);
    else
        fa_softmax_tile<false, NG>(sc, m, l, c, nt, pk, pq, sl2, tq);
}

// O rows scaled by the softmax's correction c (16 rows x HD of m16n8 fragments).
template <int HD>
__device__ __forceinline__ void fa_rescale(float (*o)[4], const float* c) {
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        o[n][0] *= c[0];
        o[n][1] *= c[0];
        o[n][2] *= c[1];
        o[n][3] *= c[1];
    }
}

// Each warp owns MT row tiles of 16 queries (rows warp·16·MT + 16·mt ..), so every K / V fragment
// it loads from shared memory feeds MT matrix products.
template <int HD, int WARPS, int MT, bool WG>
__device__ void fa_fwd_impl(void* out, int out_bf16, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                            const u32* cu_q, const u32* cu_k, const u32* pos_q, const u32* pos_k, const int* qoff,
                            const int* koff, const u32* krange, int num_seqs, int heads, int kv_heads, float scale) {
    constexpr int BM = 16 * MT * WARPS, LD = HD + FA_PAD;
    static_assert(!WG || (MT == 1 && WARPS % 4 == 0), "wgmma: whole warpgroups of one row tile per warp");
    extern __shared__ __align__(16) unsigned char fa_sh[];
    bf16_t* Qs = (bf16_t*)fa_sh;          // [BM][LD]
    bf16_t* Ks = Qs + BM * LD;            // [2][FA_BN][LD]
    bf16_t* Vs = Ks + 2 * FA_BN * LD;     // [2][FA_BN][LD]
    u32* Pk = (u32*)(Vs + 2 * FA_BN * LD);  // [2][FA_BN]
    __shared__ u32 red[2 * WARPS];
    if ((int)blockIdx.x >= qoff[num_seqs]) return;
    const FaQueryBlock<BM> qb(blockIdx.x, blockIdx.y, cu_q, cu_k, qoff, koff, num_seqs, heads, kv_heads);
    const int h = qb.h, kh = qb.kh, nq = qb.nq, kt0 = qb.kt0, nkt = qb.nkt;
    const u32 q0 = qb.q0;
    const int lane = threadIdx.x & 31, wrow = (threadIdx.x >> 5) * 16 * MT, g = lane >> 2, tq = lane & 3;
    const int qs = heads * HD, ks = kv_heads * HD;

    fa_load<HD, BM>(Qs, q, q0, nq, qs, h * HD);
    fa_commit();
    // Rows r[mt][0] = wrow + 16 mt + g and r[mt][1] = that + 8, with their positions.
    int r[MT][2];
    u32 pq[MT][2];
    u32 lmn = U32_MAX, lmx = 0u;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            r[mt][i] = wrow + 16 * mt + g + 8 * i;
            pq[mt][i] = r[mt][i] < nq ? pos_q[q0 + r[mt][i]] : 0u;
            if (r[mt][i] < nq) {
                lmn = min(lmn, pq[mt][i]);
                lmx = max(lmx, pq[mt][i]);
            }
        }
    u32 minpq, maxpq;
    fa_block_minmax<WARPS>(lmn, lmx, red, minpq, maxpq);

    int t = fa_next_tile(krange, kt0, 0, nkt, maxpq);
    if (t < nkt) fa_issue_kv<HD, WG>(Ks, Vs, Pk, 0, qb, t, k, v, pos_k, ks, kh * HD);
    fa_commit();
    fa_wait<1>();
    __syncthreads();
    u32 qa[MT][HD / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) fa_frag_a<HD>(qa[mt], Qs, wrow + 16 * mt, lane);

    float o[MT][HD / 8][4];
    float m[MT][2], l[MT][2];  // running max (log2 domain) and sum per row
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
        m[mt][0] = m[mt][1] = F_NINF;
        l[mt][0] = l[mt][1] = 0.f;
    }
    const float sl2 = scale * LOG2E_F;
    for (int buf = 0; t < nkt; buf ^= 1) {
        const int tn = fa_next_tile(krange, kt0, t + 1, nkt, maxpq);
        if (tn < nkt) fa_issue_kv<HD, WG>(Ks, Vs, Pk, buf ^ 1, qb, tn, k, v, pos_k, ks, kh * HD);
        fa_commit();
        fa_wait<1>();
        fa_visible<WG>();
        const int nt = qb.tile_rows(t);
        const bool masked = !(krange[2 * (kt0 + t) + 1] <= minpq && nt == FA_BN);
        const u32* P = Pk + buf * FA_BN;
        float sc[MT][FA_BN / 8][4];
        if constexpr (WG) {
            u32 qt[HD / 16][4];
            fa_frag_a<HD>(qt, Qs, wrow, lane);
            fa_abt<HD, true>(sc[0], qt, Ks + buf * FA_BN * LD, lane);
        } else
            fa_mm_abt_mt<HD, MT>(sc, qa, Ks + buf * FA_BN * LD, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float c[2];
            fa_softmax_tile(masked, sc[mt], m[mt], l[mt], c, nt, P, pq[mt], sl2, tq);
            fa_rescale<HD>(o[mt], c);
        }
        if constexpr (WG)
            fa_pt<HD, true>(o[0], sc[0], Vs + buf * FA_BN * LD, lane);
        else
            fa_mm_pt_mt<HD, MT>(o, sc, Vs + buf * FA_BN * LD, lane);
        __syncthreads();  // this buffer is refilled two tiles from now
        t = tn;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float inv[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            l[mt][i] += __shfl_xor_sync(FULL_MASK, l[mt][i], 1);
            l[mt][i] += __shfl_xor_sync(FULL_MASK, l[mt][i], 2);
            inv[i] = l[mt][i] > 0.f ? 1.f / l[mt][i] : 0.f;
        }
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            const int d = h * HD + n * 8 + 2 * tq;
#pragma unroll
            for (int i = 0; i < 2; ++i)
                if (r[mt][i] < nq)
                    fa_put2(out, (i64)(q0 + r[mt][i]) * qs + d, o[mt][n][2 * i] * inv[i], o[mt][n][2 * i + 1] * inv[i],
                            out_bf16, false);
        }
        if (tq == 0)
#pragma unroll
            for (int i = 0; i < 2; ++i)
                if (r[mt][i] < nq)
                    lse[(i64)(q0 + r[mt][i]) * heads + h] = l[mt][i] > 0.f ? (m[mt][i] + log2f(l[mt][i])) * LN2_F : F_INF;
    }
}

// dq += scale * Σ_keys dS·k with dS = P ⊙ (dout·vᵀ - delta); blocks over query tiles.
template <int HD, int WARPS, bool WG>
__device__ void fa_bwd_dq_impl(void* dq, int dq_bf16, const bf16_t* dout, const float* lse, const float* delta, const bf16_t* q,
                               const bf16_t* k, const bf16_t* v, const u32* cu_q, const u32* cu_k, const u32* pos_q,
                               const u32* pos_k, const int* qoff, const int* koff, const u32* krange, int num_seqs,
                               int heads, int kv_heads, float scale) {
    constexpr int BM = 16 * WARPS, LD = HD + FA_PAD;
    static_assert(BM <= 2 * FA_BN, "q and dout are staged in the two K (V) buffers");
    static_assert(!WG || WARPS % 4 == 0, "wgmma: whole warpgroups");
    extern __shared__ __align__(16) unsigned char fa_sh[];
    bf16_t* Ks = (bf16_t*)fa_sh;          // [2][FA_BN][LD]
    bf16_t* Vs = Ks + 2 * FA_BN * LD;     // [2][FA_BN][LD]
    u32* Pk = (u32*)(Vs + 2 * FA_BN * LD);  // [2][FA_BN]
    // q and dout: staged through the K and V buffers (mma.sync: fragments kept in registers), or
    // (wgmma) in their own tiles, reloaded per streamed tile.
    bf16_t* Qst = WG ? (bf16_t*)(Pk + 2 * FA_BN) : Ks;  // [BM][LD]
    bf16_t* Gst = WG ? Qst + BM * LD : Vs;             // [BM][LD]
    __shared__ u32 red[2 * WARPS];
    if ((int)blockIdx.x >= qoff[num_seqs]) return;
    const FaQueryBlock<BM> qb(blockIdx.x, blockIdx.y, cu_q, cu_k, qoff, koff, num_seqs, heads, kv_heads);
    const int h = qb.h, kh = qb.kh, nq = qb.nq, kt0 = qb.kt0, nkt = qb.nkt;
    const u32 q0 = qb.q0;
    const int lane = threadIdx.x & 31, w16 = (threadIdx.x >> 5) * 16, g = lane >> 2, tq = lane & 3;
    const int qs = heads * HD, ks = kv_heads * HD;
    const int r0 = w16 + g, r1 = r0 + 8;

    fa_load<HD, BM>(Qst, q, q0, nq, qs, h * HD);
    fa_load<HD, BM>(Gst, dout, q0, nq, qs, h * HD);
    fa_commit();
    const u32 pq0 = r0 < nq ? pos_q[q0 + r0] : 0u, pq1 = r1 < nq ? pos_q[q0 + r1] : 0u;
    const float L0 = r0 < nq ? lse[(i64)(q0 + r0) * heads + h] * LOG2E_F : F_INF;
    const float L1 = r1 < nq ? lse[(i64)(q0 + r1) * heads + h] * LOG2E_F : F_INF;
    const float D0 = r0 < nq ? delta[(i64)(q0 + r0) * heads + h] : 0.f;
    const float D1 = r1 < nq ? delta[(i64)(q0 + r1) * heads + h] : 0.f;
    u32 minpq, maxpq;
    fa_block_range<WARPS>(pq0, r0 < nq, pq1, r1 < nq, red, minpq, maxpq);
    fa_wait<0>();
    __syncthreads();
    u32 qa[HD / 16][4], ga[HD / 16][4];
    fa_frag_a<HD>(qa, Qst, w16, lane);
    fa_frag_a<HD>(ga, Gst, w16, lane);
    __syncthreads();  // the staging buffers are refilled below

    int t = fa_next_tile(krange, kt0, 0, nkt, maxpq);
    if (t < nkt) fa_issue_kv<HD, WG>(Ks, Vs, Pk, 0, qb, t, k, v, pos_k, ks, kh * HD);
    fa_commit();

    float acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const float sl2 = scale * LOG2E_F;
    for (int buf = 0; t < nkt; buf ^= 1) {
        const int tn = fa_next_tile(krange, kt0, t + 1, nkt, maxpq);
        if (tn < nkt) fa_issue_kv<HD, WG>(Ks, Vs, Pk, buf ^ 1, qb, tn, k, v, pos_k, ks, kh * HD);
        fa_commit();
        fa_wait<1>();
        fa_visible<WG>();
        const int nt = qb.tile_rows(t);
        const bool masked = !(krange[2 * (kt0 + t) + 1] <= minpq && nt == FA_BN);
        const u32* P = Pk + buf * FA_BN;
        float p[FA_BN / 8][4], dp[FA_BN / 8][4];
        if constexpr (WG) {
            fa_frag_a<HD>(qa, Qst, w16, lane);
            fa_frag_a<HD>(ga, Gst, w16, lane);
        }
        fa_abt<HD, WG>(p, qa, Ks + buf * FA_BN * LD, lane);
        fa_abt<HD, WG>(dp, ga, Vs + buf * FA_BN * LD, lane);
#pragma unroll
        for (int n = 0; n < FA_BN / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool hi = e >= 2;
                const int c = n * 8 + 2 * tq + (e & 1);
                float x = fa_exp2(p[n][e] * sl2 - (hi ? L1 : L0));
                if (masked && (c >= nt || P[c] > (hi ? pq1 : pq0))) x = 0.f;
                p[n][e] = x * (dp[n][e] - (hi ? D1 : D0));  // dS
            }
        }
        fa_pt<HD, WG>(acc, p, Ks + buf * FA_BN * LD, lane);
        __syncthreads();
        t = tn;
    }
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        const int d = h * HD + n * 8 + 2 * tq;
        if (r0 < nq) fa_put2(dq, (i64)(q0 + r0) * qs + d, scale * acc[n][0], scale * acc[n][1], dq_bf16, true);
        if (r1 < nq) fa_put2(dq, (i64)(q0 + r1) * qs + d, scale * acc[n][2], scale * acc[n][3], dq_bf16, true);
    }
}

// acc[16 x NC] += A[16 x KD] · T[:, c0 .. c0 + NC], A a row-major shared tile (rows row0.., row
// stride KD + FA_PAD), T a shared [KD][HD] tile (row stride HD + FA_PAD) read transposed.
template <int HD, int KD, int NC>
__device__ __forceinline__ void fa_mm_st(float (*acc)[4], const bf16_t* a, int row0, const bf16_t* t, int c0, int lane) {
#pragma unroll
    for (int j = 0; j < KD / 16; ++j) {
        u32 af[4];
        fa_ldsm(af, a + (row0 + (lane & 15)) * (KD + FA_PAD) + j * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int dp = 0; dp < NC / 16; ++dp) {
            u32 b[4];
            fa_ldsm_t(b, t + (j * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * (HD + FA_PAD) + c0 + dp * 16 + (lane >> 4) * 8);
            fa_mma(acc[2 * dp], af, b[0], b[1]);
            fa_mma(acc[2 * dp + 1], af, b[2], b[3]);
        }
    }
}

// Two f32 added to global memory at p (8-byte aligned) by one vector reduction (sm_90).
__device__ __forceinline__ void fa_red2(float* p, float a, float b) {
    asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
}

// The backward kernels' `kv_flags`: dk / dv are bf16 (else f32); they are overwritten (else added
// to). Every key row has one owning block, which reaches its epilogue even when no query sees it.
#define FA_KV_BF16 1
#define FA_KV_SET 2

// Add (or store, FA_KV_SET) a warp's dk (times scale) and dv rows r0, r1 (of the block's keys from
// k0; rows from nk on are past the segment) into dk / dv at kv head kh.
template <int HD>
__device__ __forceinline__ void fa_add_dkdv(void* dk, void* dv, int kv_flags, const float (*dka)[4], const float (*dva)[4],
                                            u32 k0, int r0, int r1, int nk, int ks, int kh, int tq, float scale) {
    const int bf = kv_flags & FA_KV_BF16;
    const bool acc = !(kv_flags & FA_KV_SET);
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        const int d = kh * HD + n * 8 + 2 * tq;
        if (r0 < nk) {
            fa_put2(dk, (i64)(k0 + r0) * ks + d, scale * dka[n][0], scale * dka[n][1], bf, acc);
            fa_put2(dv, (i64)(k0 + r0) * ks + d, dva[n][0], dva[n][1], bf, acc);
        }
        if (r1 < nk) {
            fa_put2(dk, (i64)(k0 + r1) * ks + d, scale * dka[n][2], scale * dka[n][3], bf, acc);
            fa_put2(dv, (i64)(k0 + r1) * ks + d, dva[n][2], dva[n][3], bf, acc);
        }
    }
}

// dv += Σ_queries Pᵀ·dout, dk += scale * Σ_queries dSᵀ·q over the heads of kv head blockIdx.y;
// blocks over key tiles. Transposed products: warp rows are keys, tile columns are queries. The
// stream is the (query tile, head) pairs of the segment, query tiles outermost.
// DQ (the fused backward, mma.sync only): the block also adds its keys' share of dq, scale ·
// dS·k, to the f32 workspace dq_acc with float atomics, so the dq pass (which recomputes S and
// dP) is not needed: 5 products instead of 7, but dq's summation order depends on scheduling.
template <int HD, int WARPS, bool WG, bool DQ>
__device__ void fa_bwd_dkdv_impl(void* dk, void* dv, int kv_flags, float* dq_acc, const bf16_t* dout, const float* lse,
                                 const float* delta, const bf16_t* q, const bf16_t* k, const bf16_t* v, const u32* cu_q,
                                 const u32* cu_k, const u32* pos_q, const u32* pos_k, const int* koff, const int* qoff,
                                 const u32* qrange, int num_seqs, int heads, int kv_heads, float scale) {
    constexpr int BM = 16 * WARPS, LD = HD + FA_PAD;
    static_assert(BM <= 2 * FA_BN, "k and v are staged in the two q (dout) buffers");
    static_assert(!WG || WARPS % 4 == 0, "wgmma: whole warpgroups");
    static_assert(!DQ || (!WG && WARPS % 4 == 0 && FA_BN == 64), "fused dq: mma.sync, 4 row groups of 16 queries");
    extern __shared__ __align__(16) unsigned char fa_sh[];
    bf16_t* Qs = (bf16_t*)fa_sh;            // [2][FA_BN][LD]
    bf16_t* Gs = Qs + 2 * FA_BN * LD;       // [2][FA_BN][LD] (dout)
    u32* Pq = (u32*)(Gs + 2 * FA_BN * LD);  // [2][FA_BN]
    float* Lq = (float*)(Pq + 2 * FA_BN);   // [2][FA_BN] lse (natural log, scaled below)
    float* Dq = Lq + 2 * FA_BN;             // [2][FA_BN]
    // k and v: staged through the q and dout buffers, or (wgmma) their own tiles (as in dq). The
    // fused dq keeps k in its own tile (the B operand of dS·k) and dS of the current query tile.
    bf16_t* Kst = (WG || DQ) ? (bf16_t*)(Dq + 2 * FA_BN) : Qs;  // [BM][LD]
    bf16_t* Vst = WG ? Kst + BM * LD : Gs;                     // [BM][LD]
    bf16_t* Ss = Kst + BM * LD;                                // DQ: [FA_BN][BM + FA_PAD], queries x keys
    __shared__ u32 red[2 * WARPS];
    const int b = blockIdx.x;
    if (b >= koff[num_seqs]) return;
    const int s = att_find_seg(koff, num_seqs, b);
    const int kh = blockIdx.y, group = heads / kv_heads;
    const int lane = threadIdx.x & 31, w16 = (threadIdx.x >> 5) * 16, g = lane >> 2, tq = lane & 3;
    const u32 k0 = cu_k[s] + (u32)(b - koff[s]) * BM;
    const int nk = (int)min((u32)BM, cu_k[s + 1] - k0);
    const int qs = heads * HD, ks = kv_heads * HD;
    const int r0 = w16 + g, r1 = r0 + 8;
    const u32 qa_ = cu_q[s], qb = cu_q[s + 1];
    const int qt0 = qoff[s], nqt = qoff[s + 1] - qoff[s];

    fa_load<HD, BM>(Kst, k, k0, nk, ks, kh * HD);
    fa_load<HD, BM>(Vst, v, k0, nk, ks, kh * HD);
    fa_commit();
    const u32 pk0 = r0 < nk ? pos_k[k0 + r0] : U32_MAX, pk1 = r1 < nk ? pos_k[k0 + r1] : U32_MAX;
    u32 minpk, maxpk;
    fa_block_range<WARPS>(pk0, r0 < nk, pk1, r1 < nk, red, minpk, maxpk);
    fa_wait<0>();
    __syncthreads();
    u32 ka[HD / 16][4], va[HD / 16][4];
    fa_frag_a<HD>(ka, Kst, w16, lane);
    fa_frag_a<HD>(va, Vst, w16, lane);
    __syncthreads();

    // Stream position `it` = query tile it / group, head kh * group + it % group. A query tile is
    // skipped when its largest position precedes every key of the block.
    const int nit = nqt * group;
    auto next = [&](int it) {
        if (it >= nit || it % group != 0) return it;
        int t = it / group;
        while (t < nqt && qrange[2 * (qt0 + t) + 1] < minpk) ++t;
        return t * group;
    };
    auto issue = [&](int it, int buf) {
        const int t = it / group, h = kh * group + it % group;
        const u32 t0 = qa_ + (u32)t * FA_BN;
        const int nt = (int)min((u32)FA_BN, qb - t0);
        fa_load_tile<HD, WG>(Qs + buf * FA_BN * LD, q, t0, nt, qs, h * HD);
        fa_load_tile<HD, WG>(Gs + buf * FA_BN * LD, dout, t0, nt, qs, h * HD);
        fa_load_col(Pq + buf * FA_BN, pos_q, t0, nt, 1);
        fa_load_col(Lq + buf * FA_BN, lse + h, t0, nt, heads);
        fa_load_col(Dq + buf * FA_BN, delta + h, t0, nt, heads);
    };
    int it = next(0);
    if (it < nit) issue(it, 0);
    fa_commit();

    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        dka[n][0] = dka[n][1] = dka[n][2] = dka[n][3] = 0.f;
        dva[n][0] = dva[n][1] = dva[n][2] = dva[n][3] = 0.f;
    }
    const float sl2 = scale * LOG2E_F;
    for (int buf = 0; it < nit; buf ^= 1) {
        const int itn = next(it + 1);
        if (itn < nit) issue(itn, buf ^ 1);
        fa_commit();
        fa_wait<1>();
        fa_visible<WG>();
        const int t = it / group;
        const int nt = (int)min((u32)FA_BN, qb - (qa_ + (u32)t * FA_BN));
        const bool masked = !(maxpk <= qrange[2 * (qt0 + t)] && nt == FA_BN);
        const u32* P = Pq + buf * FA_BN;
        const float* L = Lq + buf * FA_BN;
        const float* D = Dq + buf * FA_BN;
        float p[FA_BN / 8][4], dp[FA_BN / 8][4];
        if constexpr (WG) {
            fa_frag_a<HD>(ka, Kst, w16, lane);
            fa_frag_a<HD>(va, Vst, w16, lane);
        }
        fa_abt<HD, WG>(p, ka, Qs + buf * FA_BN * LD, lane);   // Sᵀ: keys x queries
        fa_abt<HD, WG>(dp, va, Gs + buf * FA_BN * LD, lane);  // dPᵀ = v · doutᵀ
#pragma unroll
        for (int n = 0; n < FA_BN / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = n * 8 + 2 * tq + (e & 1);
                float x = fa_exp2(p[n][e] * sl2 - L[c] * LOG2E_F);
                if (masked && (c >= nt || (e < 2 ? pk0 : pk1) > P[c])) x = 0.f;
                p[n][e] = x;
                dp[n][e] = x * (dp[n][e] - D[c]);  // dSᵀ
            }
        }
        fa_pt<HD, WG>(dva, p, Gs + buf * FA_BN * LD, lane);
        fa_pt<HD, WG>(dka, dp, Qs + buf * FA_BN * LD, lane);
        if constexpr (DQ) {
            // dS (rounded to bf16 as the dk product rounds it) to shared memory as [query][key];
            // then warp w computes dq rows 16·(w % 4).. and columns NC·(w / 4).. over the BM keys.
#pragma unroll
            for (int n = 0; n < FA_BN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    Ss[(n * 8 + 2 * tq + (e & 1)) * (BM + FA_PAD) + w16 + g + 8 * (e >> 1)] =
                        (bf16_t)(pack_bf16x2(dp[n][e], 0.f) & 0xffffu);
            __syncthreads();
            constexpr int NC = HD / (WARPS / 4);
            const int wq = ((threadIdx.x >> 5) & 3) * 16, c0 = (threadIdx.x >> 7) * NC;
            float dqa[NC / 8][4];
#pragma unroll
            for (int n = 0; n < NC / 8; ++n) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.f;
            fa_mm_st<HD, BM, NC>(dqa, Ss, wq, Kst, c0, lane);
            const int h = kh * group + it % group;
            const u32 t0 = qa_ + (u32)t * FA_BN;
#pragma unroll
            for (int n = 0; n < NC / 8; ++n) {
                const int d = h * HD + c0 + n * 8 + 2 * tq;
#pragma unroll
                for (int i = 0; i < 2; ++i)
                    if (wq + g + 8 * i < nt)
                        fa_red2(dq_acc + (i64)(t0 + wq + g + 8 * i) * qs + d, scale * dqa[n][2 * i], scale * dqa[n][2 * i + 1]);
            }
        }
        __syncthreads();
        it = itn;
    }
    fa_add_dkdv<HD>(dk, dv, kv_flags, dka, dva, k0, r0, r1, nk, ks, kh, tq, scale);
}

// Instantiations: head dim HD, W warps per block, and SUF naming the product path: mM = mma.sync
// with M row tiles of 16 per warp (the forward also M = 2: 16·W·M rows per block), wg = wgmma
// (W / 4 warpgroups). The host picks the configuration per kernel (FlashConfig in mod.rs).
#define INST_FA_FWD(HD, W, M, WG, SUF)                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * W) attn_fwd_bf16_d##HD##_w##W##_##SUF(                         \
        void* out, int out_bf16, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v, const u32* cu_q,     \
        const u32* cu_k, const u32* pos_q, const u32* pos_k, const int* qoff, const int* koff, const u32* krange,    \
        int num_seqs, int heads, int kv_heads, float scale) {                                                        \
        fa_fwd_impl<HD, W, M, WG>(out, out_bf16, lse, q, k, v, cu_q, cu_k, pos_q, pos_k, qoff, koff, krange,         \
                                  num_seqs, heads, kv_heads, scale);                                                 \
    }
#define INST_FA_BWD(HD, W, WG, SUF)                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * W) attn_bwd_dq_bf16_d##HD##_w##W##_##SUF(                      \
        void* dq, int dq_bf16, const bf16_t* dout, const float* lse, const float* delta, const bf16_t* q,            \
        const bf16_t* k, const bf16_t* v, const u32* cu_q, const u32* cu_k, const u32* pos_q, const u32* pos_k,      \
        const int* qoff, const int* koff, const u32* krange, int num_seqs, int heads, int kv_heads, float scale) {   \
        fa_bwd_dq_impl<HD, W, WG>(dq, dq_bf16, dout, lse, delta, q, k, v, cu_q, cu_k, pos_q, pos_k, qoff, koff,      \
                                  krange, num_seqs, heads, kv_heads, scale);                                         \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * W) attn_bwd_dkdv_bf16_d##HD##_w##W##_##SUF(                    \
        void* dk, void* dv, int kv_flags, const bf16_t* dout, const float* lse, const float* delta, const bf16_t* q,  \
        const bf16_t* k, const bf16_t* v, const u32* cu_q, const u32* cu_k, const u32* pos_q, const u32* pos_k,      \
        const int* koff, const int* qoff, const u32* qrange, int num_seqs, int heads, int kv_heads, float scale) {   \
        fa_bwd_dkdv_impl<HD, W, WG, false>(dk, dv, kv_flags, nullptr, dout, lse, delta, q, k, v, cu_q, cu_k, pos_q,   \
                                           pos_k, koff, qoff, qrange, num_seqs, heads, kv_heads, scale);             \
    }
// The fused backward (dk, dv and dq by atomics into the f32 workspace dq_acc; mma.sync).
#define INST_FA_BWD_FUSED(HD, W)                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * W) attn_bwd_fused_bf16_d##HD##_w##W##_m1(                      \
        void* dk, void* dv, int kv_flags, float* dq_acc, const bf16_t* dout, const float* lse, const float* delta,    \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const u32* cu_q, const u32* cu_k, const u32* pos_q,       \
        const u32* pos_k, const int* koff, const int* qoff, const u32* qrange, int num_seqs, int heads, int kv_heads, \
        float scale) {                                                                                               \
        fa_bwd_dkdv_impl<HD, W, false, true>(dk, dv, kv_flags, dq_acc, dout, lse, delta, q, k, v, cu_q, cu_k, pos_q,  \
                                             pos_k, koff, qoff, qrange, num_seqs, heads, kv_heads, scale);           \
    }

INST_FA_FWD(32, 4, 1, false, m1)
INST_FA_FWD(32, 8, 1, false, m1)
INST_FA_FWD(32, 4, 2, false, m2)
INST_FA_FWD(64, 4, 1, false, m1)
INST_FA_FWD(64, 8, 1, false, m1)
INST_FA_FWD(64, 4, 2, false, m2)
INST_FA_FWD(32, 4, 1, true, wg)
INST_FA_FWD(32, 8, 1, true, wg)
INST_FA_FWD(64, 4, 1, true, wg)
INST_FA_FWD(64, 8, 1, true, wg)
INST_FA_BWD(32, 4, false, m1)
INST_FA_BWD(32, 8, false, m1)
INST_FA_BWD(64, 4, false, m1)
INST_FA_BWD(64, 8, false, m1)
INST_FA_BWD(32, 4, true, wg)
INST_FA_BWD(32, 8, true, wg)
INST_FA_BWD(64, 4, true, wg)
INST_FA_BWD(64, 8, true, wg)
INST_FA_BWD_FUSED(32, 4)
INST_FA_BWD_FUSED(32, 8)
INST_FA_BWD_FUSED(64, 4)
INST_FA_BWD_FUSED(64, 8)

// dq = the inverse rotary embedding of dq_acc (the fused backward's f32 workspace), overwritten:
// the conversion, the zero fill before the backward and rope_bwd on dq in one pass (the rotation
// on the f32 sums, one rounding). One thread per (row, pair j < hd/2), as rows.cu's rope; the
// heads in batches of FA_ROPE_HEADS whose loads are issued before the angle's FP64 work. dq's rows
// are `ld` elements apart (heads * hd, or wider: its columns of a packed q/k/v gradient).
#define FA_ROPE_HEADS 8
extern "C" __global__ void attn_dq_from_acc_rope(void* dq, int dq_bf16, const float* acc, const u32* pos,
                                                 const __grid_constant__ RopeFreqs fq, int n, int heads, int hd,
                                                 int ld) {
    const int half = hd / 2;
    GRID_STRIDE(e, (i64)n * half) {
        const int r = (int)(e / half), j = (int)(e % half);
        const u32 p = pos[r];
        float cf = 0.f, sf = 0.f;
        for (int h0 = 0; h0 < heads; h0 += FA_ROPE_HEADS) {
            float x1[FA_ROPE_HEADS], x2[FA_ROPE_HEADS];
#pragma unroll
            for (int u = 0; u < FA_ROPE_HEADS; ++u)
                if (h0 + u < heads) {
                    const i64 i1 = ((i64)r * heads + h0 + u) * hd + j;
                    x1[u] = acc[i1];
                    x2[u] = acc[i1 + half];
                }
            if (h0 == 0) rope_cs(p, fq.f[j], -1.f, cf, sf);
#pragma unroll
            for (int u = 0; u < FA_ROPE_HEADS; ++u)
                if (h0 + u < heads) {
                    const i64 i1 = (i64)r * ld + (h0 + u) * hd + j, i2 = i1 + half;
                    const float y1 = x1[u] * cf - x2[u] * sf, y2 = x2[u] * cf + x1[u] * sf;
                    if (dq_bf16) {
                        ((bf16*)dq)[i1] = from_f<bf16>(y1);
                        ((bf16*)dq)[i2] = from_f<bf16>(y2);
                    } else {
                        ((float*)dq)[i1] = y1;
                        ((float*)dq)[i2] = y2;
                    }
                }
        }
    }
}

// The key/value gradients of a layer packed for its projections' backward, in bf16: row r of
// `out` (rows `ld` apart) gets dk (f32, through the inverse rotary embedding of the key positions)
// in columns [0, kvd) and dv in [kvd, 2 kvd), kvd = kv_heads * hd; one rounding each, as rope_bwd
// on dk then the conversion. One thread per (row, pair j < hd/2), the angle once for every head.
extern "C" __global__ void attn_pack_kv_rope(bf16* out, int ld, const float* dk, const float* dv, const u32* pos,
                                             const __grid_constant__ RopeFreqs fq, int n, int kv_heads, int hd) {
    const int half = hd / 2, kvd = kv_heads * hd;
    GRID_STRIDE(e, (i64)n * half) {
        const int r = (int)(e / half), j = (int)(e % half);
        float cf, sf;
        rope_cs(pos[r], fq.f[j], -1.f, cf, sf);
        bf16* o = out + (i64)r * ld;
        const i64 src = (i64)r * kvd;
        for (int h = 0; h < kv_heads; ++h) {
            const int c1 = h * hd + j, c2 = c1 + half;
            const float x1 = dk[src + c1], x2 = dk[src + c2];
            o[c1] = from_f<bf16>(x1 * cf - x2 * sf);
            o[c2] = from_f<bf16>(x2 * cf + x1 * sf);
            o[kvd + c1] = from_f<bf16>(dv[src + c1]);
            o[kvd + c2] = from_f<bf16>(dv[src + c2]);
        }
    }
}

// dq += dq_acc (the fused backward's f32 workspace) for an f32 or bf16 dq; n even.
extern "C" __global__ void attn_dq_from_acc(void* dq, int dq_bf16, const float* acc, i64 n) {
    for (i64 i = 2 * ((i64)blockIdx.x * blockDim.x + threadIdx.x); i < n; i += 2 * (i64)gridDim.x * blockDim.x) {
        const float2 a = *(const float2*)(acc + i);
        fa_put2(dq, i, a.x, a.y, dq_bf16, true);
    }
}

// A check of the wgmma building blocks (cuda_parity --wg-probe): one warpgroup, a [64][HD] and
// b [FA_BN][HD] bf16 row-major. mode < HD/16: out[64][FA_BN] = a[:, 16·mode..+16] · b[:, same]ᵀ
// (one k-step); mode = HD/16: out = a · bᵀ (fa_abt); mode = HD/16 + 1: out[64][HD] = bf16(a · bᵀ) · b
// (fa_abt then fa_pt). The b tile starts `shift` bytes (a multiple of 16) past a 1024-byte boundary.
template <int HD>
__device__ void wg_probe(float* out, const bf16_t* a, const bf16_t* b, int mode, int shift) {
    __shared__ __align__(128) bf16_t As[64 * (HD + FA_PAD)];
    __shared__ __align__(1024) bf16_t Bbuf[3 * FA_BN * (HD + FA_PAD) + 512];
    bf16_t* Bs = Bbuf + shift / 2;
    const int lane = threadIdx.x & 31, w16 = (threadIdx.x >> 5) * 16, g = lane >> 2, tq = lane & 3;
    fa_load<HD, 64>(As, a, 0, 64, HD, 0);
    fa_load_cm<HD>(Bs, b, 0, FA_BN, HD, 0);
    fa_commit();
    fa_wait<0>();
    fa_visible<true>();
    u32 af[HD / 16][4];
    fa_frag_a<HD>(af, As, w16, lane);
    float s[FA_BN / 8][4];
    if (mode < HD / 16) {
#pragma unroll
        for (int n = 0; n < FA_BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        wg_pin(s, FA_BN / 8);
        wg_fence();
        wg_mma<FA_BN, 0>(s, af[mode], wg_desc(Bs + mode * 16 * FA_BN, FA_BN * 16, 128));
        wg_commit();
        wg_wait0();
        wg_pin(s, FA_BN / 8);
    } else {
        fa_abt<HD, true>(s, af, Bs, lane);
    }
    if (mode <= HD / 16) {
#pragma unroll
        for (int n = 0; n < FA_BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) out[(w16 + g + 8 * (e >> 1)) * FA_BN + n * 8 + 2 * tq + (e & 1)] = s[n][e];
        return;
    }
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    fa_pt<HD, true>(o, s, Bs, lane);
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) out[(w16 + g + 8 * (e >> 1)) * HD + n * 8 + 2 * tq + (e & 1)] = o[n][e];
}
// ---- TMA and shared-memory-operand wgmma (building blocks of the Hopper kernels) ---------------
// cuda_parity --tma-probe checks them on one tile: a warpgroup loads a [64][64] bf16 tile of a and
// one of b by TMA (2-d tensor maps with 128-byte swizzle, rows a0.. and b0.., rows past the tensor
// read as zero) into 1024-byte aligned shared memory, waits on an mbarrier for the bytes, and
// computes s[64][64] = a · bᵀ with both wgmma operands read from shared memory (K-major,
// SWIZZLE_128B descriptors; the 16-deep k-steps advance the start address by 32 bytes). mode 0
// writes s; mode 1 writes bf16(s) · b, the forward's P·V: s as register A fragments and the b tile
// as an MN-major B (its rows the reduction) with 128-byte swizzle, descriptor strides lbo / sbo
// (verified on the H200: sbo = 1024 between 8-row groups of the reduction, lbo unused at 64
// columns; a k-step of 16 rows advances the start by 2048 bytes).
// CUtensorMap is an opaque 128-byte, 128-aligned parameter (cuTensorMapEncodeTiled on the host).
struct __align__(64) TmaMap {
    unsigned long long opaque[16];
};

__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(fa_smem(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(fa_smem(bar)), "r"(bytes) : "memory");
}
// The transaction bytes alone (no arrival).
__device__ __forceinline__ void mbar_expect_tx_only(u64* bar, u32 bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(fa_smem(bar)), "r"(bytes) : "memory");
}
// This thread's arrival, made once its cp.async copies issued so far have landed (counts as one of
// the barrier's expected arrivals).
__device__ __forceinline__ void cp_async_mbar_arrive(u64* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(fa_smem(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(fa_smem(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* bar, u32 phase) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(fa_smem(bar)),
        "r"(phase)
        : "memory");
}
// Named barrier `id` (1..15; 0 is __syncthreads) over THREADS threads of the block.
template <int THREADS>
__device__ __forceinline__ void fa_bar_sync(int id) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(THREADS) : "memory");
}
// A producer / consumer ring of `stages` buffers: `full[i]` completes on `full_count` arrivals and
// the bytes announced with them, `empty[i]` on the 8 consumer warps' releases; `once` (count 1)
// guards a one-off load. Thread 0 initialises; the caller's __syncthreads publishes them.
__device__ __forceinline__ void tma_ring_init(u64* full, u32 full_count, u64* empty, int stages, u64* once) {
    if (threadIdx.x == 0) {
        for (int i = 0; i < stages; ++i) {
            mbar_init(&full[i], full_count);
            mbar_init(&empty[i], 8);
        }
        mbar_init(once, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
}
// Rows row.. (64 by the map's box) and columns col.. of the map's tensor into dst, completing on bar.
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaMap* map, int col, int row, u64* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            fa_smem(dst)),
        "l"(map), "r"(col), "r"(row), "r"(fa_smem(bar))
        : "memory");
}
// Operand in a 128-byte-swizzled tile (rows of 128 bytes, 8-row atoms of 1024 bytes); K-major:
// lbo unused (1), sbo = 1024 (from one 8-row group to the next).
__device__ __forceinline__ u64 wg_desc_sw128(const void* p, u32 lbo = 16, u32 sbo = 1024) {
    return (u64)((fa_smem(p) & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) | ((u64)1 << 62);
}
extern "C" __global__ void __launch_bounds__(128)
    tma_probe_d64(const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb, float* out, int a0, int b0,
                  int mode, int lbo, int sbo) {
    __shared__ __align__(1024) bf16_t As[64 * 64];
    __shared__ __align__(1024) bf16_t Bs[64 * 64];
    __shared__ __align__(8) u64 bar;
    const int lane = threadIdx.x & 31, w16 = (threadIdx.x >> 5) * 16, g = lane >> 2, tq = lane & 3;
    if (threadIdx.x == 0) {
        mbar_init(&bar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_expect_tx(&bar, 2 * 64 * 64 * 2);
        tma_load_2d(As, &ta, 0, a0, &bar);
        tma_load_2d(Bs, &tb, 0, b0, &bar);
    }
    mbar_wait(&bar, 0);
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    wg_pin(s, 8);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wg_mma_ss_n64(s, wg_desc_sw128(As + kk * 16), wg_desc_sw128(Bs + kk * 16));
    wg_commit();
    wg_wait0();
    wg_pin(s, 8);
    if (mode == 1) {
        u32 a[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            a[j][0] = pack_bf16x2(s[2 * j][0], s[2 * j][1]);
            a[j][1] = pack_bf16x2(s[2 * j][2], s[2 * j][3]);
            a[j][2] = pack_bf16x2(s[2 * j + 1][0], s[2 * j + 1][1]);
            a[j][3] = pack_bf16x2(s[2 * j + 1][2], s[2 * j + 1][3]);
        }
#pragma unroll
        for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        wg_pin(a, 4);
        wg_pin(s, 8);
        wg_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) wg_mma_n64<1>(s, a[j], wg_desc_sw128(Bs + j * 16 * 64, lbo, sbo));
        wg_commit();
        wg_wait0();
        wg_pin(s, 8);
    }
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) out[(w16 + g + 8 * (e >> 1)) * 64 + n * 8 + 2 * tq + (e & 1)] = s[n][e];
}

// ---- Forward with TMA and warp specialisation (hd 64; the default forward: `tmapp`) ------------
// Block = 3 warpgroups, 128 query rows, key tiles of TMA_BN = 128 (setmaxnreg: the producer
// warpgroup keeps 24 registers, the consumers take 240):
//  - warpgroup 0 produces: thread 0 loads the block's Q (two 64-row tiles) once, then the K and V
//    tiles (two 64-row boxes each) of every visible key tile into a ring of TMA_STAGES buffers,
//    with the tile's index (and whether it needs the mask) in `stage_tile`, so the consumers read
//    no tables from global memory in their loop (that cost 0.63 -> 0.44 ms); `full[s]` completes
//    on the tiles' bytes, `empty[s]` when the 8 consumer warps have finished with the buffer.
//  - warpgroups 1 and 2 consume 64 query rows each: S = Q·Kᵀ with both operands in shared memory,
//    the online softmax (fa_softmax_tile) in registers, O += P·V with P from registers and the V
//    tile as an MN-major operand.
// Schedules (template flags; MOR_FLASH_WARPS=tma|tmap|tmapp,fused,4): PIPE (`tmap`) is
// FlashAttention-3's overlap inside a warpgroup — the next tile's S and the previous tile's P·V in
// flight together, the softmax under P·V (wait_group 1), O rescaled after it completes; PP
// (`tmapp`, with PIPE) adds the ping-pong of the two consumer warpgroups (tma_turn_wait / _pass).
// H200, 360M shape (8 x 2048 causal, 15/5 heads): tma 0.311 ms, tmap 0.301, tmapp 0.290 (64-key
// tiles: 0.368, 0.330, 0.318); the mma.sync forward 0.396.
// Key rows past the segment (TMA reads the next segment's, or zeros past the tensor) are masked by
// the tile's row count as in fa_fwd_impl; their positions are read from global memory on the
// partly visible tiles only.

// Cycle counts of the TMA forward's phases, summed over blocks (kernel experiments: the marks exist
// only under MOR_NVRTC_DEFINES=FA_TRACE; `cuda_parity --flash-sweep` prints them; the phases are the
// serial `tma` kernel's, the overlapped ones count their whole loop as P·V).
// Forward, consumer thread 128 (first of warpgroup 1) of every block: 0 Q wait, 1 full waits, 2 S,
// 3 softmax, 4 P·V, 5 epilogue, 6 block total, 7 tiles, 8 blocks; producer thread 0: 9 empty waits,
// 10 total. Backward (fa_bwd_tma), consumer thread 128: 16 full waits, 17 Sᵀ / dPᵀ, 18 P / dS,
// 19 dV / dK / dQ (with the barriers before), 20 dQ staging and its reduction's issue, 21 stream
// positions, 22 blocks, 25 block total; producer lane 0: 26 from the previous stage to the empty
// wait (the next position found), 23 empty waits, 27 filling the stage (the columns' copies and the
// TMA issued), 24 total.
__device__ unsigned long long fa_trace[32];
extern "C" __global__ void fa_trace_take(u32* out) {
    const int i = threadIdx.x;
    if (i < 32) {
        out[2 * i] = (u32)fa_trace[i];
        out[2 * i + 1] = (u32)(fa_trace[i] >> 32);
        fa_trace[i] = 0;
    }
}
#ifdef FA_TRACE
#define FA_MARK(cond, slot, t0)                                       \
    if (cond) {                                                       \
        const long long now_ = clock64();                             \
        atomicAdd(&fa_trace[slot], (unsigned long long)(now_ - (t0))); \
        t0 = now_;                                                    \
    }
#define FA_COUNT(cond, slot) \
    if (cond) atomicAdd(&fa_trace[slot], 1ull);
#define FA_RESTART(t0) t0 = clock64();
#define FA_FROM(t, t0) t = t0;
// The clocks of a TMA kernel's trace, started after its set-up; thread 128 marks the consumers.
#define FA_TRACE_BEGIN                \
    long long tr = clock64();         \
    const long long tr0 = tr;         \
    const bool trc = threadIdx.x == 128;
#else
#define FA_TRACE_BEGIN
#define FA_RESTART(t0)
#define FA_FROM(t, t0)
#define FA_MARK(cond, slot, t0)
#define FA_COUNT(cond, slot)
#endif
#ifndef TMA_STAGES
#define TMA_STAGES 4
#endif
#define TMA_MASKED (1 << 30)
#define TMA_TILE (64 * 64)
// Keys per tile of the TMA forward: two 64-row TMA boxes (the key tables' tiles) per stage.
#define TMA_BN 128
// Registers per thread after the role split of the 384-thread TMA kernels (setmaxnreg; they start
// at 168): 128·24 + 256·240 = 64512. The backward's consumers hold Sᵀ and dPᵀ (128) besides dK and
// dV (64; a 40 / 232 split spilled there), the forward's S (64), O (32) and P (32).
#define TMA_PRODUCER_REGS 24
#define TMA_CONSUMER_REGS 240

// Issue S = Q·Kᵀ for a warpgroup's 64 rows and a TMA_BN-key tile (both operands swizzled tiles in
// shared memory).
__device__ __forceinline__ void tma_scores(float (*sc)[4], const bf16_t* Qw, const bf16_t* Kt) {
#pragma unroll
    for (int n = 0; n < TMA_BN / 8; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
    wg_pin(sc, TMA_BN / 8);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wg_mma_ss_n128(sc, wg_desc_sw128(Qw + kk * 16), wg_desc_sw128(Kt + kk * 16));
}

// Issue O += P·V (P as register A fragments, V an MN-major swizzled tile of TMA_BN rows); the
// caller fences.
__device__ __forceinline__ void tma_pv(float (*o)[4], const u32 (*a)[4], const bf16_t* Vt) {
#pragma unroll
    for (int j = 0; j < TMA_BN / 16; ++j) wg_mma_n64<1>(o, a[j], wg_desc_sw128(Vt + j * 16 * 64, 16, 1024));
}

// bf16 A fragments of NJ 16-column k-steps from an accumulator of 8-column groups.
template <int NJ>
__device__ __forceinline__ void tma_pack(u32 (*a)[4], const float (*sc)[4]) {
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        a[j][0] = pack_bf16x2(sc[2 * j][0], sc[2 * j][1]);
        a[j][1] = pack_bf16x2(sc[2 * j][2], sc[2 * j][3]);
        a[j][2] = pack_bf16x2(sc[2 * j + 1][0], sc[2 * j + 1][1]);
        a[j][3] = pack_bf16x2(sc[2 * j + 1][2], sc[2 * j + 1][3]);
    }
}

// Named barriers 1 and 2 order the two consumer warpgroups' products (ping-pong, as FlashAttention-3's
// warp scheduler barriers): warpgroup cw waits on barrier 1 + cw before issuing its products and
// arrives on the other's after, so the tensor cores alternate between them and one warpgroup's
// softmax runs under the other's products.
__device__ __forceinline__ void tma_turn_wait(int cw) { fa_bar_sync<256>(1 + cw); }
__device__ __forceinline__ void tma_turn_pass(int cw) {
    asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - cw) : "memory");
}

// Minimum and maximum of pos[row0 + i] over the block's first n (≤ blockDim.x) rows; every thread
// of the 12-warp block takes part.
__device__ __forceinline__ void tma_block_pos_range(const u32* pos, u32 row0, int n, u32* red, u32& mn, u32& mx) {
    const bool has = (int)threadIdx.x < n;
    const u32 p = has ? pos[row0 + threadIdx.x] : 0u;
    fa_block_minmax<12>(has ? p : U32_MAX, has ? p : 0u, red, mn, mx);
}

// Smallest (x) and largest (y) position of 128-row stream tile t, from a range table of 64-row
// tiles (`range[2 (base + i)]`, min then max; the segment has n of them): its one or two tiles.
__device__ __forceinline__ uint2 tma_tile_pair_range(const u32* range, int base, int t, int n) {
    const int a = base + 2 * t;
    uint2 r = make_uint2(range[2 * a], range[2 * a + 1]);
    if (2 * t + 1 < n) {
        r.x = min(r.x, range[2 * a + 2]);
        r.y = max(r.y, range[2 * a + 3]);
    }
    return r;
}

// This warp is done with a stage's K and V.
__device__ __forceinline__ void tma_release(u64* bar, int lane) {
    if (lane == 0) mbar_arrive(bar);
}

template <bool PIPE, bool PP>
__device__ void fa_fwd_tma(const TmaMap* tmq, const TmaMap* tmk, const TmaMap* tmv, void* out, int out_bf16, u32* out_act, float* lse,
                           const u32* cu_q, const u32* cu_k, const u32* pos_q, const u32* pos_k, const int* qoff,
                           const int* koff, const u32* krange, const int* order, int num_seqs, int heads, int kv_heads,
                           float scale) {
    constexpr int HD = 64, BM = 128;
    extern __shared__ __align__(16) unsigned char tma_sh[];
    // Swizzled tiles need 1024-byte alignment (the host adds 1024 bytes of slack).
    unsigned char* base = tma_sh + ((1024u - (fa_smem(tma_sh) & 1023u)) & 1023u);
    constexpr int KT = 2 * TMA_TILE;         // a stage's K (or V) tile: TMA_BN rows, two TMA boxes
    bf16_t* Qs = (bf16_t*)base;               // [2][64][64]
    bf16_t* Ks = Qs + 2 * TMA_TILE;           // [TMA_STAGES][TMA_BN][64]
    bf16_t* Vs = Ks + TMA_STAGES * KT;        // [TMA_STAGES][TMA_BN][64]
    u64* full = (u64*)(Vs + TMA_STAGES * KT);
    u64* empty = full + TMA_STAGES;
    u64* qbar = empty + TMA_STAGES;
    __shared__ u32 red[2 * 12];
    // Per stage, from the producer: the key tile it holds (TMA_MASKED when partly visible), or -1
    // after the last one; published by the stage's full barrier (release / acquire).
    __shared__ int stage_tile[TMA_STAGES];
    // Grid (heads, query blocks in rank-major order: attn_rank_order).
    if ((int)blockIdx.y >= qoff[num_seqs]) return;
    const FaQueryBlock<BM> qb(order[blockIdx.y], blockIdx.x, cu_q, cu_k, qoff, koff, num_seqs, heads, kv_heads);
    // krange holds the position range of each 64-row key tile; a stream tile is two of them.
    const int h = qb.h, kh = qb.kh, nq = qb.nq, kt0 = qb.kt0, nkt = qb.nkt, nkt2 = (nkt + 1) / 2;
    const u32 q0 = qb.q0;
    auto tile_start = [&](int t) { return qb.ka + (u32)t * TMA_BN; };
    auto tile_rows = [&](int t) { return (int)min((u32)TMA_BN, qb.kb - tile_start(t)); };
    const int wg = threadIdx.x >> 7, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    // The block's query position range (the producer needs the maximum to skip invisible key
    // tiles in the consumers' order).
    u32 minpq, maxpq;
    tma_block_pos_range(pos_q, q0, min(BM, nq), red, minpq, maxpq);
    tma_ring_init(full, 1, empty, TMA_STAGES, qbar);
    __syncthreads();
    FA_TRACE_BEGIN

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(TMA_PRODUCER_REGS));
        if (threadIdx.x != 0) return;
        mbar_expect_tx(qbar, 2 * TMA_TILE * 2);
        tma_load_2d(Qs, tmq, h * HD, (int)q0, qbar);
        tma_load_2d(Qs + TMA_TILE, tmq, h * HD, (int)q0 + 64, qbar);
        auto krange2 = [&](int t) { return tma_tile_pair_range(krange, kt0, t, nkt); };
        // A key tile is skipped when its smallest position follows every query of the block.
        auto next = [&](int t) {
            while (t < nkt2 && krange2(t).x > maxpq) ++t;
            return t;
        };
        int i = 0;
        for (int t = next(0);; t = next(t + 1), ++i) {
            const int st = i % TMA_STAGES;
            // Read before the wait for the free stage, so the read's latency overlaps it.
            const bool masked = t < nkt2 && !(krange2(t).y <= minpq && tile_rows(t) == TMA_BN);
            FA_RESTART(tr)
            if (i >= TMA_STAGES) mbar_wait(&empty[st], ((i / TMA_STAGES) - 1) & 1);
            FA_MARK(true, 9, tr)
            if (t >= nkt2) {
                stage_tile[st] = -1;
                mbar_arrive(&full[st]);
                break;
            }
            stage_tile[st] = t | (masked ? TMA_MASKED : 0);
            mbar_expect_tx(&full[st], 2 * KT * 2);
            const int row = (int)tile_start(t);
            for (int j = 0; j < 2; ++j) {
                tma_load_2d(Ks + st * KT + j * TMA_TILE, tmk, kh * HD, row + 64 * j, &full[st]);
                tma_load_2d(Vs + st * KT + j * TMA_TILE, tmv, kh * HD, row + 64 * j, &full[st]);
            }
        }
        FA_FROM(tr, tr0)
        FA_MARK(true, 10, tr)
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(TMA_CONSUMER_REGS));
    // Consumers: warpgroup cw = wg - 1 owns rows 64·cw ..; warp w16 its 16 of them.
    const int cw = wg - 1, w16 = ((threadIdx.x >> 5) & 3) * 16;
    int r[2];
    u32 pq[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        r[i] = 64 * cw + w16 + g + 8 * i;
        pq[i] = r[i] < nq ? pos_q[q0 + r[i]] : 0u;
    }
    float o[HD / 8][4];
    float m[2] = {F_NINF, F_NINF}, l[2] = {0.f, 0.f}, c[2];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    const float sl2 = scale * LOG2E_F;
    const bf16_t* Qw = Qs + cw * TMA_TILE;
    mbar_wait(qbar, 0);
    FA_MARK(trc, 0, tr)
    float sc[TMA_BN / 8][4];
    u32 a[TMA_BN / 16][4];
    // The key tile of stage st once it is full (with TMA_MASKED), -1 after the last.
    auto wait_tile = [&](int i) {
        mbar_wait(&full[i % TMA_STAGES], (i / TMA_STAGES) & 1);
        return stage_tile[i % TMA_STAGES];
    };
    // The softmax of tile tm (the tile index with its TMA_MASKED flag); key positions from global
    // memory on partly visible tiles only.
    auto softmax = [&](int tm) {
        const int t = tm & ~TMA_MASKED;
        fa_softmax_tile<TMA_BN / 8>(tm & TMA_MASKED, sc, m, l, c, tile_rows(t), pos_k + tile_start(t), pq, sl2, tq);
    };
    // Ping-pong: warpgroup 0 takes the first turn; each turn is passed once per issue, and warpgroup 0
    // takes the one left over at the end (every bar.arrive matched by a bar.sync).
    if (PP && cw == 1) tma_turn_pass(cw);
    if constexpr (!PIPE) {
        for (int i = 0;; ++i) {
            const int st = i % TMA_STAGES, t = wait_tile(i);
            if (t < 0) break;
            FA_MARK(trc, 1, tr)
            if (PP) tma_turn_wait(cw);
            tma_scores(sc, Qw, Ks + st * KT);
            wg_commit();
            if (PP) tma_turn_pass(cw);
            wg_wait0();
            wg_pin(sc, TMA_BN / 8);
            FA_MARK(trc, 2, tr)
            softmax(t);
            fa_rescale<HD>(o, c);
            tma_pack<TMA_BN / 16>(a, sc);
            wg_pin(a, TMA_BN / 16);
            wg_pin(o, HD / 8);
            FA_MARK(trc, 3, tr)
            wg_fence();
            tma_pv(o, a, Vs + st * KT);
            wg_commit();
            wg_wait0();
            wg_pin(o, HD / 8);
            tma_release(&empty[st], lane);
            FA_MARK(trc, 4, tr)
            FA_COUNT(trc, 7)
        }
    } else {
        // The first tile alone; then per tile the next S and the previous P·V in flight together
        // (no branch around a wgmma: ptxas serialises wgmma on divergent paths).
        int t = wait_tile(0);
        if (t >= 0) {
            if (PP) tma_turn_wait(cw);
            tma_scores(sc, Qw, Ks);
            wg_commit();
            if (PP) tma_turn_pass(cw);
            wg_wait0();
            wg_pin(sc, TMA_BN / 8);
            softmax(t);
            tma_pack<TMA_BN / 16>(a, sc);
            int prev = 0, i = 1;
            for (;; ++i) {
                const int st = i % TMA_STAGES;
                t = wait_tile(i);
                if (t < 0) break;
                FA_COUNT(trc, 7)
                if (PP) tma_turn_wait(cw);
                tma_scores(sc, Qw, Ks + st * KT);
                wg_commit();  // group: S
                tma_pv(o, a, Vs + prev * KT);
                wg_commit();  // group: the previous P·V
                if (PP) tma_turn_pass(cw);
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // S is ready
                wg_pin(sc, TMA_BN / 8);
                softmax(t);
                wg_wait0();  // the previous P·V has run
                wg_pin(o, HD / 8);
                wg_pin(a, TMA_BN / 16);  // its P stayed live until here
                tma_release(&empty[prev], lane);
                fa_rescale<HD>(o, c);
                tma_pack<TMA_BN / 16>(a, sc);
                prev = st;
            }
            wg_pin(a, TMA_BN / 16);
            wg_pin(o, HD / 8);
            wg_fence();
            tma_pv(o, a, Vs + prev * KT);
            wg_commit();
            wg_wait0();
            wg_pin(o, HD / 8);
            tma_release(&empty[prev], lane);
        }
    }
    if (PP && cw == 0) tma_turn_wait(cw);
    FA_MARK(trc, 4, tr)
    const int qs = heads * HD;
    float inv[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        l[k] += __shfl_xor_sync(FULL_MASK, l[k], 1);
        l[k] += __shfl_xor_sync(FULL_MASK, l[k], 2);
        inv[k] = l[k] > 0.f ? 1.f / l[k] : 0.f;
    }
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        const int d = h * HD + n * 8 + 2 * tq;
#pragma unroll
        for (int k = 0; k < 2; ++k)
            if (r[k] < nq) {
                const i64 i = (i64)(q0 + r[k]) * qs + d;
                const float a = o[n][2 * k] * inv[k], b = o[n][2 * k + 1] * inv[k];
                fa_put2(out, i, a, b, out_bf16, false);
                // The bf16 copy of an f32 output (the output projection's operand), if asked for.
                if (out_act) out_act[i >> 1] = pack_bf16x2(a, b);
            }
    }
    if (tq == 0)
#pragma unroll
        for (int k = 0; k < 2; ++k)
            if (r[k] < nq) lse[(i64)(q0 + r[k]) * heads + h] = l[k] > 0.f ? (m[k] + log2f(l[k])) * LN2_F : F_INF;
    FA_MARK(trc, 5, tr)
    FA_FROM(tr, tr0)
    FA_MARK(trc, 6, tr)
    FA_COUNT(trc, 8)
}

#define INST_FA_FWD_TMA(PIPE, PP, SUF)                                                                                  \
    extern "C" __global__ void __launch_bounds__(384, 1) attn_fwd_bf16_d64_w12_##SUF(                                \
        const __grid_constant__ TmaMap tmq, const __grid_constant__ TmaMap tmk, const __grid_constant__ TmaMap tmv, \
        void* out, int out_bf16, u32* out_act, float* lse, const u32* cu_q, const u32* cu_k, const u32* pos_q,        \
        const u32* pos_k, const int* qoff, const int* koff, const u32* krange, const int* order, int num_seqs,        \
        int heads, int kv_heads, float scale) {                                                                      \
        fa_fwd_tma<PIPE, PP>(&tmq, &tmk, &tmv, out, out_bf16, out_act, lse, cu_q, cu_k, pos_q, pos_k, qoff, koff,     \
                             krange, order, num_seqs, heads, kv_heads, scale);                                       \
    }
INST_FA_FWD_TMA(false, false, tma)
INST_FA_FWD_TMA(true, false, tmap)
INST_FA_FWD_TMA(true, true, tmapp)

// ---- Backward with TMA and warp specialisation (hd 64; the default fused backward: `tmapp,fused,tma`) -
// The fused backward (dk, dv, and dq reduced into the f32 workspace) on the TMA / wgmma blocks of
// the forward, in FlashAttention-3's 128 x 128 shape. Block = 3 warpgroups over 128 keys (key block
// order[blockIdx.y]) of kv head blockIdx.x; consumer warpgroup c owns keys 64c.. of the block. The
// stream is the mma.sync fused kernel's with 128-query tiles: (query tile, head of the group)
// positions, query tiles outermost, tiles no key of the block can see skipped.
//  - producer (warp 0 of warpgroup 0; setmaxnreg gives the warpgroup's registers to the
//    consumers): K and V of the block once by TMA, then per stream position a ring stage: the Q
//    and dout tiles (two 64-row boxes each) by TMA, the tile's query positions, lse (+inf past the
//    segment, so those columns get P = 0) and D by the lanes' cp.async (each lane's arrival on
//    `full` made when its copies land; lane 0 adds the TMA bytes); `bstage` = position |
//    TMA_MASKED, -1 after the last.
//  - consumers: Sᵀ = K·Qᵀ and dPᵀ = V·doutᵀ (SS wgmma, 64 keys x 128 queries, K-major),
//    Pᵀ = exp2(Sᵀ·scale·log2 e - lse), dSᵀ = Pᵀ ⊙ (dPᵀ - D); dV += Pᵀ·dout and dK += dSᵀ·Q (RS
//    wgmma, the tiles as MN-major B); dSᵀ to the swizzled [key][query] buffer (two of them), then,
//    once both warpgroups' halves are there, dQ = dS·K over the block's 128 keys (SS wgmma, both
//    operands MN-major) for queries 64c.. — so each dQ value is reduced into the workspace once
//    per 128 keys. 128 queries per position halve the positions (and their waits, barriers and
//    reduction issues) of the 64-query version: 0.824 -> 0.685 ms at the 360M shape.
#ifndef TMA_BWD_STAGES
#define TMA_BWD_STAGES 2
#endif

// Pᵀ and dSᵀ of a 64-key x (8·NG)-query tile from Sᵀ (in p) and dPᵀ (in dp), in place; key
// positions per row (pk0 rows g, pk1 rows g + 8), query positions / lse (natural log) / D per
// column from shared memory.
template <int NG, bool MASKED>
__device__ __forceinline__ void fa_bwd_tile_p(float (*p)[4], float (*dp)[4], const u32* pq, const float* L,
                                              const float* D, u32 pk0, u32 pk1, float sl2, int tq) {
#pragma unroll
    for (int n = 0; n < NG; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = n * 8 + 2 * tq + (e & 1);
            float x = fa_exp2(p[n][e] * sl2 - L[c] * LOG2E_F);
            if constexpr (MASKED)
                if ((e < 2 ? pk0 : pk1) > pq[c]) x = 0.f;
            p[n][e] = x;
            dp[n][e] = x * (dp[n][e] - D[c]);
        }
}

// Byte `col` of row r of a 128-byte-swizzled tile (1024-byte aligned, rows of 128 bytes): the
// 16-byte chunk index is XORed with the row's index in its 8-row group, as TMA and wgmma read it.
__device__ __forceinline__ unsigned char* sw128_at(void* tile, int r, int col) {
    return (unsigned char*)tile + r * 128 + (((col >> 4) ^ (r & 7)) << 4) + (col & 15);
}

// dQ partials are reduced into the f32 workspace by TMA (cp.reduce.async.bulk.tensor, add): a
// warpgroup writes its [64][64] part into its swizzled staging buffer (two [64][32] boxes of the
// map), one thread issues the reductions; the buffer is written again one stream position later,
// after `wait_group.read 0`. Per-thread red.global.add of the same values stalled the consumers
// (~2500 cycles per position; 0.907 ms with them, 0.579 without, at the 360M shape).
__device__ __forceinline__ void tma_reduce_add_2d(const float* src, const TmaMap* map, int col, int row) {
    asm volatile(
        "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(map),
        "r"(col), "r"(row), "r"(fa_smem(src))
        : "memory");
}

// lse of the columns past a segment (+inf): P = exp2(S·scale·log2 e - inf) = 0.
__device__ const u32 fa_lse_pad = 0x7f800000u;

__device__ void fa_bwd_tma(const TmaMap* tmq, const TmaMap* tmg, const TmaMap* tmk, const TmaMap* tmv,
                           const TmaMap* tmacc, void* dk, void* dv, int kv_flags, const float* lse, const float* delta,
                           const u32* cu_q, const u32* cu_k, const u32* pos_q, const u32* pos_k, const int* koff, const int* qoff,
                           const u32* qrange, const int* order, int num_seqs, int heads, int kv_heads, float scale) {
    constexpr int HD = 64, BM = 128, BQ = 128, ST = TMA_BWD_STAGES;
    constexpr int QT = 2 * TMA_TILE;  // a stage's Q (or dout) tile: 128 rows, two TMA boxes
    extern __shared__ __align__(16) unsigned char tmb_sh[];
    unsigned char* base = tmb_sh + ((1024u - (fa_smem(tmb_sh) & 1023u)) & 1023u);
    bf16_t* Ks = (bf16_t*)base;        // [128 keys][64]
    bf16_t* Vs = Ks + 2 * TMA_TILE;    // [128 keys][64]
    bf16_t* Qs = Vs + 2 * TMA_TILE;    // [ST][128 queries][64]
    bf16_t* Gs = Qs + ST * QT;         // [ST][128 queries][64] dout
    bf16_t* Ds = Gs + ST * QT;         // [2 buffers][2 query halves][128 keys][64 queries] dSᵀ
    float* Qacc = (float*)(Ds + 8 * TMA_TILE);  // [2 warpgroups][2 column halves][64][32] dQ
    u64* full = (u64*)(Qacc + 2 * 64 * 64);
    u64* empty = full + ST;
    u64* kvbar = empty + ST;
    __shared__ u32 red[2 * 12];
    __shared__ int bstage[ST];
    __shared__ u32 spq[ST][BQ];
    __shared__ float slse[ST][BQ], sdel[ST][BQ];
    // Grid (kv heads, key blocks in rank-major order: attn_rank_order).
    if ((int)blockIdx.y >= koff[num_seqs]) return;
    const int b = order[blockIdx.y];
    const int s = att_find_seg(koff, num_seqs, b);
    const int kh = blockIdx.x, group = heads / kv_heads;
    const int wg = threadIdx.x >> 7, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const u32 k0 = cu_k[s] + (u32)(b - koff[s]) * BM;
    const int nk = (int)min((u32)BM, cu_k[s + 1] - k0);
    const u32 qa_ = cu_q[s], qb = cu_q[s + 1];
    // qrange holds the position range of each 64-row query tile; a stream tile is two of them.
    const int qt0 = qoff[s], nqt = qoff[s + 1] - qoff[s], nqt2 = (nqt + 1) / 2, nit = nqt2 * group;
    // The block's key position range.
    u32 minpk, maxpk;
    tma_block_pos_range(pos_k, k0, nk, red, minpk, maxpk);
    tma_ring_init(full, 32, empty, ST, kvbar);
    __syncthreads();
    FA_TRACE_BEGIN

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(TMA_PRODUCER_REGS));
        if (threadIdx.x >= 32) return;
        if (lane == 0) {
            mbar_expect_tx(kvbar, 4 * TMA_TILE * 2);
            for (int j = 0; j < 2; ++j) {
                tma_load_2d(Ks + j * TMA_TILE, tmk, kh * HD, (int)k0 + 64 * j, kvbar);
                tma_load_2d(Vs + j * TMA_TILE, tmv, kh * HD, (int)k0 + 64 * j, kvbar);
            }
        }
        auto qrange2 = [&](int t) { return tma_tile_pair_range(qrange, qt0, t, nqt); };
        // A query tile is skipped when its largest position precedes every key of the block.
        auto next = [&](int it) {
            if (it >= nit || it % group != 0) return it;
            int t = it / group;
            while (t < nqt2 && qrange2(t).y < minpk) ++t;
            return t * group;
        };
        int i = 0;
        for (int it = next(0);; it = next(it + 1), ++i) {
            const int st = i % ST;
            const int t = it / group, h = kh * group + it % group;
            const u32 t0 = qa_ + (u32)t * BQ;
            const int nt = it < nit ? (int)min((u32)BQ, qb - t0) : 0;
            // Keys past the segment (rows of the next one) need the mask on every tile.
            const bool masked = it < nit && (nk < BM || !(maxpk <= qrange2(t).x));
            FA_MARK(lane == 0, 26, tr)
            if (i >= ST) mbar_wait(&empty[st], ((i / ST) - 1) & 1);
            FA_MARK(lane == 0, 23, tr)
            if (it >= nit) {
                if (lane == 0) bstage[st] = -1;
                mbar_arrive(&full[st]);
                break;
            }
            // The columns by cp.async, each lane's arrival on `full` made when its copies land (the
            // warp does not wait for the reads; loaded through registers they held the producer
            // ~3200 cycles per position). Columns past the segment: lse +inf (P = 0), D and the
            // position 0.
#pragma unroll
            for (int k = 0; k < BQ / 32; ++k) {
                const int j = lane + 32 * k;
                const bool in = j < nt;
                const i64 r = (i64)(t0 + (in ? j : 0)) * heads + h;
                fa_cp4(&spq[st][j], pos_q + t0 + (in ? j : 0), in);
                fa_cp4(&slse[st][j], in ? (const void*)(lse + r) : (const void*)&fa_lse_pad, true);
                fa_cp4(&sdel[st][j], delta + r, in);
            }
            if (lane == 0) {
                bstage[st] = it | (masked ? TMA_MASKED : 0);
                mbar_expect_tx_only(&full[st], 2 * QT * 2);
                for (int j = 0; j < 2; ++j) {
                    tma_load_2d(Qs + st * QT + j * TMA_TILE, tmq, h * HD, (int)t0 + 64 * j, &full[st]);
                    tma_load_2d(Gs + st * QT + j * TMA_TILE, tmg, h * HD, (int)t0 + 64 * j, &full[st]);
                }
            }
            cp_async_mbar_arrive(&full[st]);
            FA_MARK(lane == 0, 27, tr)
        }
        FA_FROM(tr, tr0)
        FA_MARK(lane == 0, 24, tr)
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(TMA_CONSUMER_REGS));
    // Consumers: warpgroup cw owns keys 64·cw.. of the block; warp w16 its 16 of them.
    const int cw = wg - 1, w16 = ((threadIdx.x >> 5) & 3) * 16;
    const int r0 = 64 * cw + w16 + g, r1 = r0 + 8;
    const u32 pk0 = r0 < nk ? pos_k[k0 + r0] : U32_MAX, pk1 = r1 < nk ? pos_k[k0 + r1] : U32_MAX;
    const bf16_t* Kw = Ks + cw * TMA_TILE;
    const bf16_t* Vw = Vs + cw * TMA_TILE;
    float* Bq = Qacc + cw * 64 * 64;  // this warpgroup's dQ staging
    const int ks = kv_heads * HD;
    const float sl2 = scale * LOG2E_F;
    float dka[8][4], dva[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
        dka[n][0] = dka[n][1] = dka[n][2] = dka[n][3] = 0.f;
        dva[n][0] = dva[n][1] = dva[n][2] = dva[n][3] = 0.f;
    }
    mbar_wait(kvbar, 0);
    for (int i = 0;; ++i) {
        const int st = i % ST;
        mbar_wait(&full[st], (i / ST) & 1);
        const int info = bstage[st];
        if (info < 0) break;
        FA_MARK(trc, 16, tr)
        FA_COUNT(trc, 21)
        const int it = info & ~TMA_MASKED;
        const bf16_t* Qt = Qs + st * QT;
        const bf16_t* Gt = Gs + st * QT;
        float p[BQ / 8][4], dp[BQ / 8][4];
#pragma unroll
        for (int n = 0; n < BQ / 8; ++n) {
            p[n][0] = p[n][1] = p[n][2] = p[n][3] = 0.f;
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
        }
        wg_pin(p, BQ / 8);
        wg_pin(dp, BQ / 8);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wg_mma_ss_n128(p, wg_desc_sw128(Kw + kk * 16), wg_desc_sw128(Qt + kk * 16));
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wg_mma_ss_n128(dp, wg_desc_sw128(Vw + kk * 16), wg_desc_sw128(Gt + kk * 16));
        wg_commit();
        wg_wait0();
        wg_pin(p, BQ / 8);
        wg_pin(dp, BQ / 8);
        FA_MARK(trc, 17, tr)
        if (info & TMA_MASKED)
            fa_bwd_tile_p<BQ / 8, true>(p, dp, spq[st], slse[st], sdel[st], pk0, pk1, sl2, tq);
        else
            fa_bwd_tile_p<BQ / 8, false>(p, dp, spq[st], slse[st], sdel[st], pk0, pk1, sl2, tq);
        u32 pa[BQ / 16][4], dsa[BQ / 16][4];
        tma_pack<BQ / 16>(pa, p);
        tma_pack<BQ / 16>(dsa, dp);
        // dSᵀ rows r0 (+ 8), query columns 16j + 2tq (+ 1, + 8), into the query half's tile as the
        // dq product's A.
        bf16_t* Db = Ds + (i & 1) * 4 * TMA_TILE;
#pragma unroll
        for (int j = 0; j < BQ / 16; ++j) {
            bf16_t* Dh = Db + (j >> 2) * 2 * TMA_TILE;
            const int c = 16 * (j & 3) + 2 * tq;
            *(u32*)sw128_at(Dh, r0, 2 * c) = dsa[j][0];
            *(u32*)sw128_at(Dh, r1, 2 * c) = dsa[j][1];
            *(u32*)sw128_at(Dh, r0, 2 * (c + 8)) = dsa[j][2];
            *(u32*)sw128_at(Dh, r1, 2 * (c + 8)) = dsa[j][3];
        }
        float dq[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
        wg_pin(pa, BQ / 16);
        wg_pin(dsa, BQ / 16);
        wg_pin(dva, 8);
        wg_pin(dka, 8);
        wg_pin(dq, 8);
        FA_MARK(trc, 18, tr)
        // dV and dK (this warpgroup's registers only) in flight while the warpgroups meet.
        fa_fence_async();
        wg_fence();
#pragma unroll
        for (int j = 0; j < BQ / 16; ++j) wg_mma_n64<1>(dva, pa[j], wg_desc_sw128(Gt + j * 16 * 64, 16, 1024));
#pragma unroll
        for (int j = 0; j < BQ / 16; ++j) wg_mma_n64<1>(dka, dsa[j], wg_desc_sw128(Qt + j * 16 * 64, 16, 1024));
        wg_commit();
        // Both warpgroups' dSᵀ halves stored (and visible to the tensor cores' async proxy); this
        // warpgroup's previous dQ reduction done reading its staging buffer.
        if (threadIdx.x % 128 == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
        fa_bar_sync<256>(3);
        // dQ[64cw.., :] over the 128 keys, 16 keys per step.
#pragma unroll
        for (int j = 0; j < BM / 16; ++j)
            wg_mma_ss_n64<1, 1>(dq, wg_desc_sw128(Db + cw * 2 * TMA_TILE + j * 16 * 64, 16, 1024),
                                wg_desc_sw128(Ks + j * 16 * 64, 16, 1024));
        wg_commit();
        wg_wait0();
        wg_pin(pa, BQ / 16);
        wg_pin(dsa, BQ / 16);
        wg_pin(dq, 8);
        wg_pin(dva, 8);
        wg_pin(dka, 8);
        FA_MARK(trc, 19, tr)
        tma_release(&empty[st], lane);
        const int t = it / group, h = kh * group + it % group;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int k = 0; k < 2; ++k)
                *(float2*)sw128_at(Bq + (n >> 2) * 64 * 32, w16 + g + 8 * k, 4 * ((n & 3) * 8 + 2 * tq)) =
                    make_float2(scale * dq[n][2 * k], scale * dq[n][2 * k + 1]);
        fa_fence_async();
        fa_bar_sync<128>(4 + cw);
        if (threadIdx.x % 128 == 0) {
            // Rows past the segment hold zeros (their dS is 0): adding them changes nothing.
            const int row = (int)(qa_ + (u32)t * BQ) + 64 * cw;
            tma_reduce_add_2d(Bq, tmacc, h * HD, row);
            tma_reduce_add_2d(Bq + 64 * 32, tmacc, h * HD + 32, row);
            asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        }
        FA_MARK(trc, 20, tr)
    }
    if (threadIdx.x % 128 == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    FA_FROM(tr, tr0)
    FA_MARK(trc, 25, tr)
    FA_COUNT(trc, 22)
    fa_add_dkdv<HD>(dk, dv, kv_flags, dka, dva, k0, r0, r1, nk, ks, kh, tq, scale);
}

extern "C" __global__ void __launch_bounds__(384, 1) attn_bwd_fused_bf16_d64_w12_tma(
    const __grid_constant__ TmaMap tmq, const __grid_constant__ TmaMap tmg, const __grid_constant__ TmaMap tmk,
    const __grid_constant__ TmaMap tmv, const __grid_constant__ TmaMap tmacc, void* dk, void* dv, int kv_flags,
    const float* lse, const float* delta, const u32* cu_q, const u32* cu_k, const u32* pos_q, const u32* pos_k,
    const int* koff, const int* qoff, const u32* qrange, const int* order, int num_seqs, int heads, int kv_heads,
    float scale) {
    fa_bwd_tma(&tmq, &tmg, &tmk, &tmv, &tmacc, dk, dv, kv_flags, lse, delta, cu_q, cu_k, pos_q, pos_k, koff, qoff, qrange,
               order, num_seqs, heads, kv_heads, scale);
}

extern "C" __global__ void __launch_bounds__(128)
    wg_probe_d32(float* out, const bf16_t* a, const bf16_t* b, int mode, int shift) {
    wg_probe<32>(out, a, b, mode, shift);
}
extern "C" __global__ void __launch_bounds__(128)
    wg_probe_d64(float* out, const bf16_t* a, const bf16_t* b, int mode, int shift) {
    wg_probe<64>(out, a, b, mode, shift);
}
