// Top-k per segment: one block per segment, bitonic sort of 64-bit keys.
//
// Key = (~ord(score) << 32) | index, so an ascending sort puts the largest score first and breaks
// ties towards the lower index; NaN sorts last (below -inf), -0 equals +0 (as the CPU reference's
// partial_cmp). The k best keys are then re-keyed by index alone and sorted again, giving the
// ascending index order the interface asks for. The sort runs in dynamic shared memory when the
// padded segment fits (`smem_keys` keys), else in a global scratch at offset 2*cu[s] (segments are
// disjoint and a padded length is < 2x the segment, so the host sizes it 2*cu[num_seqs]).

// Integer tests only: a float `if (f == 0.f) f = 0.f` canonicalisation of -0 is an identity for
// an optimiser that ignores the sign of zero (the first GPU run ranked -0 below +0 with it).
__device__ __forceinline__ u32 topk_ord(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN: lowest
    if (u == 0x80000000u) u = 0u;                     // -0 -> +0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ u32 next_pow2(u32 x) {
    u32 p = 1;
    while (p < x) p <<= 1;
    return p;
}

__device__ void bitonic_sort_u64(u64* buf, u32 p) {
    for (u32 k = 2; k <= p; k <<= 1) {
        for (u32 j = k >> 1; j > 0; j >>= 1) {
            for (u32 e = threadIdx.x; e < p; e += blockDim.x) {
                const u32 ixj = e ^ j;
                if (ixj > e) {
                    const u64 a = buf[e], b = buf[ixj];
                    const bool asc = (e & k) == 0;
                    if ((a > b) == asc) {
                        buf[e] = b;
                        buf[ixj] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
}

extern "C" __global__ void topk_segments_f32(u32* out, const float* scores, const u32* cu, int k,
                                             u64* gscratch, int smem_keys) {
    extern __shared__ u64 topk_sh[];
    const int s = blockIdx.x;
    const u32 a = cu[s], b = cu[s + 1];
    const u32 len = b - a;
    if (k <= 0 || len == 0) return;
    const u32 p = next_pow2(len);
    u64* buf = p <= (u32)smem_keys ? topk_sh : gscratch + 2ull * a;
    for (u32 e = threadIdx.x; e < p; e += blockDim.x) {
        u64 key = U64_MAX;
        if (e < len) key = ((u64)(~topk_ord(scores[a + e])) << 32) | (u64)(a + e);
        buf[e] = key;
    }
    __syncthreads();
    bitonic_sort_u64(buf, p);
    const u32 kk = min((u32)k, len);
    const u32 p2 = next_pow2(kk);
    for (u32 e = threadIdx.x; e < p2; e += blockDim.x) buf[e] = e < kk ? (buf[e] & 0xffffffffull) : U64_MAX;
    __syncthreads();
    bitonic_sort_u64(buf, p2);
    for (u32 e = threadIdx.x; e < kk; e += blockDim.x) out[(i64)s * k + e] = (u32)buf[e];
}

// Backend::subset_rows: members local[i] of a token set (global rows `parent`) and their positions.
extern "C" __global__ void subset_rows_u32(u32* idx, u32* pos, const u32* parent, const u32* local, i64 m, u32 seq_len) {
    GRID_STRIDE(i, m) {
        const u32 g = parent[local[i]];
        idx[i] = g;
        pos[i] = g % seq_len;
    }
}
