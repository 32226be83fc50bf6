// Multi-tensor kernels (cuda/optim.rs): one launch over a list of tensors, as PyTorch's
// multi_tensor_apply. The host uploads a table with one entry per tensor (pointers, length and
// the entry's first block; uploaded once per buffer set and cached) and launches one block per
// chunk of `chunk` elements of every tensor; a block finds its entry by binary search over the
// entries' first blocks. Per-element math is that of the single-tensor kernel in
// elementwise.cu, so results equal it bit for bit.

struct MtFill {
    float* x;
    i64 n;
    i64 first_block;
};

struct MtAdamW {
    float* p;
    const float* g;
    float* m;
    float* v;
    i64 n;
    i64 first_block;
    double wd;  // the f32 weight decay, widened
};

// `blocks` is what sum_squares launches for this tensor alone; its partials are
// partial[first_block .. first_block + blocks].
struct MtSumsq {
    const float* x;
    i64 n;
    i64 first_block;
    i64 blocks;
};

// The last entry whose first block is <= b (entries sorted by first block).
template <typename E>
__device__ __forceinline__ const E& mt_entry(const E* t, int count, i64 b) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (t[mid].first_block <= b) lo = mid;
        else hi = mid - 1;
    }
    return t[lo];
}

extern "C" __global__ void fill_many_f32(const MtFill* t, int count, i64 chunk, float value) {
    const MtFill& e = mt_entry(t, count, blockIdx.x);
    const i64 start = ((i64)blockIdx.x - e.first_block) * chunk;
    const i64 end = min(e.n, start + chunk);
    float* x = e.x;
    for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) x[i] = value;
}

// adamw_f32 with the gradient times `gscale` and each tensor's own decay `1 - lr * wd`, rounded
// from double as the host rounds it for adamw_f32 (no contraction: __dmul_rn / __dsub_rn).
__device__ __forceinline__ void adamw_many_block(const MtAdamW* t, int count, i64 chunk, float lr, float gscale,
                                                 float step_size, float bc2_sqrt, float b1, float b2, float ob1,
                                                 float ob2, float eps) {
    const MtAdamW& e = mt_entry(t, count, blockIdx.x);
    const i64 start = ((i64)blockIdx.x - e.first_block) * chunk;
    const i64 end = min(e.n, start + chunk);
    const float decay = __double2float_rn(__dsub_rn(1.0, __dmul_rn((double)lr, e.wd)));
    float* p = e.p;
    const float* g = e.g;
    float* m = e.m;
    float* v = e.v;
    // float4 vectors when every array is 16-byte aligned (chunks start at multiples of 4), the
    // rest of the chunk after them element by element: the same math per element either way.
    i64 i0 = start;
    if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
        i0 = start + ((end - start) & ~(i64)3);
        for (i64 i = start + 4 * threadIdx.x; i < i0; i += 4 * blockDim.x) {
            float4 pv = *(float4*)(p + i), mv = *(float4*)(m + i), vv = *(float4*)(v + i);
            const float4 gv = *(const float4*)(g + i);
            adamw_elem(pv.x, mv.x, vv.x, __fmul_rn(gv.x, gscale), decay, step_size, bc2_sqrt, b1, b2, ob1, ob2, eps);
            adamw_elem(pv.y, mv.y, vv.y, __fmul_rn(gv.y, gscale), decay, step_size, bc2_sqrt, b1, b2, ob1, ob2, eps);
            adamw_elem(pv.z, mv.z, vv.z, __fmul_rn(gv.z, gscale), decay, step_size, bc2_sqrt, b1, b2, ob1, ob2, eps);
            adamw_elem(pv.w, mv.w, vv.w, __fmul_rn(gv.w, gscale), decay, step_size, bc2_sqrt, b1, b2, ob1, ob2, eps);
            *(float4*)(p + i) = pv;
            *(float4*)(m + i) = mv;
            *(float4*)(v + i) = vv;
        }
    }
    for (i64 i = i0 + threadIdx.x; i < end; i += blockDim.x) {
        float pi = p[i], mi = m[i], vi = v[i];
        adamw_elem(pi, mi, vi, __fmul_rn(g[i], gscale), decay, step_size, bc2_sqrt, b1, b2, ob1, ob2, eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

extern "C" __global__ void adamw_many_f32(const MtAdamW* t, int count, i64 chunk, float lr, float gscale,
                                          float step_size, float bc2_sqrt, float b1, float b2, float ob1,
                                          float ob2, float eps) {
    adamw_many_block(t, count, chunk, lr, gscale, step_size, bc2_sqrt, b1, b2, ob1, ob2, eps);
}

// The optimizer step's scalars on the device (a step recordable in a CUDA graph; cuda/optim.rs
// OPT_SCALARS): written by clip_scalars_f32 and staged by the host before the step.
#define OPT_GSCALE 0
#define OPT_FINITE 1
#define OPT_NORM_HI 2
#define OPT_NORM_LO 3
#define OPT_CLIPPED 4
#define OPT_LR 5
#define OPT_STEP_SIZE 7
#define OPT_BC2_SQRT 8
#define OPT_OB1 9
#define OPT_OB2 10

// adamw_many_f32 with lr, the clip scale and the step's scalars read from `sc`; nothing when
// `skip` and the gradient norm is not finite.
extern "C" __global__ void adamw_many_dev_f32(const MtAdamW* t, int count, i64 chunk, const float* sc, float b1,
                                              float b2, float eps, int skip) {
    if (skip && sc[OPT_FINITE] == 0.f) return;
    adamw_many_block(t, count, chunk, sc[OPT_LR], sc[OPT_GSCALE], sc[OPT_STEP_SIZE], sc[OPT_BC2_SQRT], b1, b2,
                     sc[OPT_OB1], sc[OPT_OB2], eps);
}

// The global gradient norm from the per-tensor sums of squares (sumsq_many_final's `out`), added
// in tensor order, and PyTorch clip_grad_norm_'s coefficient max_norm / (norm + 1e-6) when
// max_norm > 0, the norm is finite and the coefficient < 1 (else 1): the host's f64 operations
// (IEEE, no contraction), one thread. The norm as a float pair (hi + lo) for the host to read.
extern "C" __global__ void clip_scalars_f32(const double* sums, int count, double max_norm, float* sc) {
    double t = 0.0;
    for (int i = 0; i < count; ++i) t = __dadd_rn(t, sums[i]);
    const double norm = __dsqrt_rn(t);
    const bool finite = isfinite(norm);
    float gscale = 1.f;
    bool clipped = false;
    if (max_norm > 0.0 && finite) {
        const double coef = __ddiv_rn(max_norm, __dadd_rn(norm, 1e-6));
        clipped = coef < 1.0;
        if (clipped) gscale = __double2float_rn(coef);
    }
    const float hi = __double2float_rn(norm);
    sc[OPT_GSCALE] = gscale;
    sc[OPT_CLIPPED] = clipped ? 1.f : 0.f;
    sc[OPT_FINITE] = finite ? 1.f : 0.f;
    sc[OPT_NORM_HI] = hi;
    sc[OPT_NORM_LO] = finite ? __double2float_rn(__dsub_rn(norm, (double)hi)) : 0.f;
}

// sumsq_partial_f32 of every tensor: block `first_block + j` of an entry is block j of that
// tensor's own launch (same grid stride, same reduction tree).
extern "C" __global__ void sumsq_many_partial_f32(const MtSumsq* t, int count, double* partial) {
    __shared__ double sh[32];
    const MtSumsq& e = mt_entry(t, count, blockIdx.x);
    const double acc = sumsq_block(e.x, e.n, (i64)blockIdx.x - e.first_block, e.blocks, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// sumsq_final of every tensor: block k adds entry k's partials into out[k].
extern "C" __global__ void sumsq_many_final(const MtSumsq* t, const double* partial, double* out) {
    __shared__ double sh[32];
    const MtSumsq& e = t[blockIdx.x];
    const double* part = partial + e.first_block;
    const int parts = (int)e.blocks;
    double acc = 0.0;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) acc += part[i];
    acc = block_sum_d_to0(acc, sh);
    if (threadIdx.x == 0) out[blockIdx.x] = acc;
}
