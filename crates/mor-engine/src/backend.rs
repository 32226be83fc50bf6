//! The op interface every backend implements. Each op is a forward/backward pair over buffers the
//! caller allocated; shapes are passed explicitly and ops touch only the leading elements they
//! describe, so one preallocated buffer can serve varying token counts.
//!
//! Conventions (all backends):
//! * Row-major layouts; a `[n, d]` matrix is `n` rows of `d` contiguous values.
//! * Linear weights use the PyTorch / Hugging Face layout `[out, in]`: `y = x · Wᵀ`.
//! * Forward ops overwrite their outputs unless the name says `acc`/`add`.
//! * **Backward ops accumulate** (`+=`) into every gradient they produce, so fan-out in the
//!   graph (residual streams, shared weights, shared K/V) needs no special handling; callers
//!   zero gradient buffers before a backward pass.
//! * Index buffers hold `u32`. Scalars cross the interface as `f32`; host reads use `to_f32`.

/// Attention over packed variable-length token sets.
///
/// Queries and keys are concatenated over `num_seqs` segments; segment `s` owns query rows
/// `cu_q[s]..cu_q[s+1]` and key rows `cu_k[s]..cu_k[s+1]`. A query attends to a key of the same
/// segment iff `pos_k[key] <= pos_q[query]`. Positions are original token positions, so one
/// kernel serves vanilla attention, compacted recursion steps (subsets of tokens), KV sharing
/// (queries = active subset, keys = all tokens of recursion 1) and document masking (segments =
/// documents), and decoding (one query against a cache).
pub struct AttnShape<'a, I> {
    pub cu_q: &'a I,
    pub cu_k: &'a I,
    pub pos_q: &'a I,
    pub pos_k: &'a I,
    pub num_seqs: usize,
    /// Total query rows (`cu_q[num_seqs]`).
    pub nq: usize,
    /// Total key rows (`cu_k[num_seqs]`).
    pub nk: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl<I> AttnShape<'_, I> {
    /// No query or no key (or no head, no dimension, no segment): attention has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.nq == 0 || self.nk == 0 || self.heads == 0 || self.head_dim == 0 || self.num_seqs == 0
    }
}

/// A device-to-host read in flight ([`Backend::to_f64_prefix_async`], [`Backend::idx_prefix_async`]):
/// the copy runs in stream order behind the work queued before it, without the host waiting for
/// that work; [`Readback::wait`] blocks until the copy has landed (on the CPU it already has).
pub struct Readback<T>(Box<dyn FnOnce() -> Vec<T>>);

impl<T: 'static> Readback<T> {
    /// A read whose values are already on the host.
    pub fn ready(values: Vec<T>) -> Self {
        Readback(Box::new(move || values))
    }

    /// A read that `finish` completes (blocking until the copy has landed).
    pub fn pending(finish: impl FnOnce() -> Vec<T> + 'static) -> Self {
        Readback(Box::new(finish))
    }

    pub fn wait(self) -> Vec<T> {
        (self.0)()
    }
}

/// The scalar block of an optimizer step on the device ([`Backend::clip_scalars`],
/// [`Backend::adamw_many_dev`]): a [`Backend::zeros`] buffer of `LEN` values at these indices
/// (kernels/optim.cu's `OPT_*`). The host stages LR, STEP and the step's AdamW scalars (rounded to
/// the buffer's precision, as the kernels' arguments would be); the clip writes the rest.
pub mod opt_scalars {
    /// Written by the clip (the first `CLIP_LEN`).
    pub const GSCALE: usize = 0;
    pub const FINITE: usize = 1;
    pub const NORM_HI: usize = 2;
    pub const NORM_LO: usize = 3;
    pub const CLIPPED: usize = 4;
    pub const CLIP_LEN: usize = 5;
    /// Staged by the host.
    pub const LR: usize = 5;
    pub const STEP: usize = 6;
    pub const STEP_SIZE: usize = 7;
    pub const BC2_SQRT: usize = 8;
    pub const OB1: usize = 9;
    pub const OB2: usize = 10;
    pub const LEN: usize = 11;
}

/// Device work recorded between [`Backend::capture_begin`] and [`Backend::capture_end`] (a CUDA
/// graph), replayed by `launch` on the same buffers.
pub trait StepGraph {
    /// Queue one replay; an error when the backend's buffers it uses changed since the capture
    /// (then capture again).
    fn launch(&self) -> Result<(), String>;
}

/// One weight of [`Backend::matmul_bwd_many`]: `dw += doutᵀ · x` and `w`'s share of `dx`.
pub struct MatmulGrad<'a, B: Backend + ?Sized> {
    pub dw: &'a mut B::Buf,
    pub dout: &'a B::Buf,
    pub w: &'a B::Buf,
    /// Output width of this weight (`w` is `[m, k]`).
    pub m: usize,
}

/// One tensor of [`Backend::adamw_many`]: its first `n` elements are updated with its own
/// weight decay.
pub struct AdamWItem<'a, B: Backend + ?Sized> {
    pub param: &'a mut B::Buf,
    /// Read only: the step multiplies it by `grad_scale` on the fly and leaves it as it was.
    pub grad: &'a B::Buf,
    pub m: &'a mut B::Buf,
    pub v: &'a mut B::Buf,
    pub n: usize,
    pub weight_decay: f32,
}

/// Elementwise router activation `g = alpha * f(x)` (MOR_SPEC 3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateFn {
    Sigmoid,
    Tanh,
    /// `g = x` (alpha is ignored, as in the released code).
    Identity,
}

/// Input precision of the GEMMs ([`Backend::set_matmul_precision`]). Outputs, accumulation,
/// parameters, gradients and optimizer state stay f32 (or the backend's float type) either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// Full-precision operands (fp32 SGEMM on CUDA): the parity reference.
    F32,
    /// Operands rounded to bf16 (round to nearest even), fp32 accumulation (tensor cores).
    Bf16,
}

pub trait Backend {
    /// A float buffer on the device.
    type Buf;
    /// A `u32` buffer on the device.
    type Idx;

    fn name(&self) -> &'static str;

    // ---- device control (defaults suit synchronous host backends) -------------------------
    /// Wait until all queued work has finished (a no-op on synchronous backends). Timing code
    /// calls this before reading the clock.
    fn synchronize(&self) {}
    /// `(used, total)` bytes of device memory where the backend can tell (`None` on the CPU).
    fn memory_info(&self) -> Option<(usize, usize)> {
        None
    }
    /// Per-op timings accumulated since the last call, `(op, seconds, calls)`, when the backend
    /// profiles ([`Backend::set_profiling`]; CUDA with `MOR_PROFILE=1`); empty otherwise. Resets
    /// the counters.
    fn take_profile(&self) -> Vec<(String, f64, u64)> {
        Vec::new()
    }
    /// Turn per-op timing on or off; returns false when the backend cannot profile.
    fn set_profiling(&self, _on: bool) -> bool {
        false
    }
    /// Input precision of `matmul_fwd` / `matmul_bwd` from now on; returns false (and changes
    /// nothing) when the backend does not support `p`. Every backend supports
    /// [`MatmulPrecision::F32`], the default.
    fn set_matmul_precision(&self, p: MatmulPrecision) -> bool {
        p == MatmulPrecision::F32
    }

    /// Start recording the ops queued from now on instead of running them (a CUDA graph);
    /// backends that cannot record say so. Between this and [`Backend::capture_end`] nothing may
    /// allocate, transfer or wait: the recorded stretch must have run once eagerly at the same
    /// shapes (docs/design/cuda-graphs.md).
    fn capture_begin(&self) -> Result<(), String> {
        Err(format!("the {} backend cannot capture device work", self.name()))
    }
    /// Stop recording; the recorded work has not run yet (its first launch runs it).
    fn capture_end(&self) -> Result<Box<dyn StepGraph>, String> {
        Err(format!("the {} backend cannot capture device work", self.name()))
    }

    // ---- memory ---------------------------------------------------------------------------
    fn zeros(&self, n: usize) -> Self::Buf;
    /// A zeroed buffer for activations (layer outputs the model saves for the backward, and
    /// their gradients). A backend may store it at lower precision (CUDA's bf16 mode: bf16); ops
    /// that accept such buffers say so, the rest take [`Backend::zeros`] buffers. Parameters,
    /// gradients, the residual stream and anything accumulated over many steps use `zeros`.
    fn zeros_act(&self, n: usize) -> Self::Buf {
        self.zeros(n)
    }
    fn from_f32(&self, data: &[f32]) -> Self::Buf;
    fn to_f32(&self, buf: &Self::Buf) -> Vec<f32>;
    /// Read the first `n` values.
    fn to_f32_prefix(&self, buf: &Self::Buf, n: usize) -> Vec<f32>;
    /// Read the first `n` values at the buffer's own precision (exact for f64 buffers), for
    /// host-side loss sums and statistics.
    fn to_f64_prefix(&self, buf: &Self::Buf, n: usize) -> Vec<f64> {
        self.to_f32_prefix(buf, n).into_iter().map(f64::from).collect()
    }
    /// [`Backend::to_f64_prefix`] without waiting for the queued work: read later, e.g. router
    /// statistics taken while the device runs the next layers.
    fn to_f64_prefix_async(&self, buf: &Self::Buf, n: usize) -> Readback<f64> {
        Readback::ready(self.to_f64_prefix(buf, n))
    }
    fn len(&self, buf: &Self::Buf) -> usize;
    fn idx_from(&self, data: &[u32]) -> Self::Idx;
    fn idx_to_vec(&self, idx: &Self::Idx) -> Vec<u32>;
    /// The first `n` entries of an index buffer, read without waiting for the queued work.
    fn idx_prefix_async(&self, idx: &Self::Idx, n: usize) -> Readback<u32> {
        let mut v = self.idx_to_vec(idx);
        v.truncate(n);
        Readback::ready(v)
    }
    /// Overwrite the first `data.len()` entries of an index buffer.
    fn idx_write(&self, idx: &mut Self::Idx, data: &[u32]);
    /// Overwrite the first `data.len()` entries of a float buffer.
    fn write_f32(&self, buf: &mut Self::Buf, data: &[f32]);
    /// Upload host values computed in double precision (exact for f64 buffers).
    fn from_f64(&self, data: &[f64]) -> Self::Buf {
        self.from_f32(&data.iter().map(|&x| x as f32).collect::<Vec<_>>())
    }
    /// Overwrite the first `data.len()` entries from double-precision host values.
    fn write_f64(&self, buf: &mut Self::Buf, data: &[f64]) {
        self.write_f32(buf, &data.iter().map(|&x| x as f32).collect::<Vec<_>>())
    }
    fn fill(&self, buf: &mut Self::Buf, n: usize, value: f32);
    /// [`Backend::fill`] of several buffers, `buf[..n] = value` for each `(buf, n)` (one launch
    /// on devices: zeroing all gradients).
    fn fill_many(&self, bufs: &mut [(&mut Self::Buf, usize)], value: f32) {
        for (buf, n) in bufs.iter_mut() {
            self.fill(buf, *n, value);
        }
    }
    /// `dst[..n] = src[..n]`.
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf, n: usize);
    /// Columns `[col, col + cols)` of `rows` rows of `dst` (rows `ld` apart) = `src[rows, cols]`
    /// (packing side by side; either buffer may be an activation buffer).
    fn copy_cols(&self, dst: &mut Self::Buf, ld: usize, col: usize, src: &Self::Buf, rows: usize, cols: usize);

    // ---- elementwise ----------------------------------------------------------------------
    /// `y[..n] += alpha * x[..n]`.
    fn axpy(&self, y: &mut Self::Buf, x: &Self::Buf, alpha: f32, n: usize);
    /// `x[..n] *= alpha`.
    fn scale(&self, x: &mut Self::Buf, alpha: f32, n: usize);
    /// `Σ x[..n]²` in double precision.
    fn sum_squares(&self, x: &Self::Buf, n: usize) -> f64;
    /// The global gradient norm over `xs` and PyTorch `clip_grad_norm_`'s scale into the scalar
    /// block `sc` ([`opt_scalars`]) without a host read: the sums of squares of
    /// [`Backend::sum_squares_many`] added in order in f64, `norm = sqrt`, GSCALE = `max_norm /
    /// (norm + 1e-6)` rounded to f32 when `max_norm > 0`, the norm is finite and that is < 1
    /// (CLIPPED = 1) else 1, FINITE, and the norm as NORM_HI + NORM_LO. The same f64 operations as
    /// the host's, so an optimizer step from these scalars equals one from the host's.
    fn clip_scalars(&self, xs: &[(&Self::Buf, usize)], max_norm: f64, sc: &mut Self::Buf) {
        let norm = self.sum_squares_many(xs).into_iter().sum::<f64>().sqrt();
        let mut v = [0.0f64; opt_scalars::CLIP_LEN];
        let finite = norm.is_finite();
        let coef = if max_norm > 0.0 && finite { max_norm / (norm + 1e-6) } else { 1.0 };
        let clipped = coef < 1.0;
        let hi = norm as f32;
        v[opt_scalars::GSCALE] = if clipped { coef as f32 as f64 } else { 1.0 };
        v[opt_scalars::CLIPPED] = clipped as u8 as f64;
        v[opt_scalars::FINITE] = finite as u8 as f64;
        v[opt_scalars::NORM_HI] = hi as f64;
        v[opt_scalars::NORM_LO] = if finite { (norm - hi as f64) as f32 as f64 } else { 0.0 };
        self.write_f64(sc, &v);
    }
    /// [`Backend::adamw_many`] with lr, the clip scale, the step and its scalars taken from the
    /// block `sc` ([`opt_scalars`], staged by the host and [`Backend::clip_scalars`]): an
    /// optimizer step with no host read or per-step argument (recordable in a CUDA graph).
    /// Nothing when `skip_nonfinite` and FINITE is 0.
    #[allow(clippy::too_many_arguments)]
    fn adamw_many_dev(&self, items: &mut [AdamWItem<'_, Self>], beta1: f32, beta2: f32, eps: f32, skip_nonfinite: bool, sc: &Self::Buf) {
        let v = self.to_f64_prefix(sc, opt_scalars::LEN);
        if skip_nonfinite && v[opt_scalars::FINITE] == 0.0 {
            return;
        }
        self.adamw_many(items, v[opt_scalars::LR] as f32, beta1, beta2, eps, v[opt_scalars::STEP] as u64, v[opt_scalars::GSCALE] as f32);
    }
    /// [`Backend::sum_squares`] of several buffers at once (one host read on devices); each
    /// result equals the single call's.
    fn sum_squares_many(&self, xs: &[(&Self::Buf, usize)]) -> Vec<f64> {
        xs.iter().map(|&(x, n)| self.sum_squares(x, n)).collect()
    }

    // ---- embedding ------------------------------------------------------------------------
    /// `out[i] = table[ids[i]]`, rows of `d`.
    fn embedding_fwd(&self, out: &mut Self::Buf, table: &Self::Buf, ids: &Self::Idx, n: usize, d: usize);
    fn embedding_bwd(&self, dtable: &mut Self::Buf, dout: &Self::Buf, ids: &Self::Idx, n: usize, d: usize);

    // ---- linear ---------------------------------------------------------------------------
    /// `out[n, m] = x[n, k] · w[m, k]ᵀ`.
    fn matmul_fwd(&self, out: &mut Self::Buf, x: &Self::Buf, w: &Self::Buf, n: usize, k: usize, m: usize);
    /// `dx += dout · w` (skipped when `dx` is `None`), `dw += doutᵀ · x`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_bwd(
        &self,
        dx: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        k: usize,
        m: usize,
    );
    /// The input gradient of [`Backend::matmul_fwd`] alone: `dx[n, k] = dout · w`, overwritten
    /// when `dx_set`, else added to. For a backward whose weight-gradient operand is made from
    /// `dx` (the MLP recomputes its SwiGLU output while differentiating it); the weight gradient
    /// then comes from [`Backend::matmul_bwd`] with no `dx`. The same GEMM as `matmul_bwd`'s `dx`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_bwd_dx(&self, dx: &mut Self::Buf, dx_set: bool, dout: &Self::Buf, w: &Self::Buf, n: usize, k: usize, m: usize);
    /// `out[n, m] = x[n, k] · w[m, k]ᵀ + res[n, m]` (a projection added to the residual stream;
    /// `out` and `res` are distinct). Backends with GEMM epilogues fuse the add.
    #[allow(clippy::too_many_arguments)]
    fn matmul_fwd_residual(&self, out: &mut Self::Buf, x: &Self::Buf, w: &Self::Buf, res: &Self::Buf, n: usize, k: usize, m: usize) {
        matmul_fwd_residual_unfused(self, out, x, w, res, n, k, m);
    }
    /// [`Backend::matmul_fwd`] of several weights on one input (q/k/v, gate/up): `out_i[n, m_i] =
    /// x · w_iᵀ` for each `(out_i, w_i, m_i)`. Backends that convert operands (bf16 GEMMs)
    /// convert `x` once.
    fn matmul_fwd_many(&self, x: &Self::Buf, n: usize, k: usize, outs: &mut [(&mut Self::Buf, &Self::Buf, usize)]) {
        matmul_fwd_each(self, x, n, k, outs);
    }
    /// [`Backend::matmul_bwd`] of several weights on one input `x[n, k]`: `dw_i += dout_iᵀ · x`
    /// and, when `dx` is given, `dx = Σ_i dout_i · w_i` — overwritten when `dx_set` (a first
    /// contribution then needs no zero fill), else added to. The `dx` sum runs in item order.
    fn matmul_bwd_many(&self, dx: Option<&mut Self::Buf>, dx_set: bool, x: &Self::Buf, n: usize, k: usize, items: &mut [MatmulGrad<'_, Self>]) {
        matmul_bwd_each(self, dx, dx_set, x, n, k, items);
    }

    /// The outputs of several weights on one input side by side (the MLP's gate and up):
    /// `out[n, Σm]` with columns `[o_i, o_i + m_i)` = `x · w_iᵀ` for each `(w_i, m_i)`, `o_i` the
    /// widths before. Backends with GEMM libraries run one GEMM on the weights stacked by rows.
    fn matmul_fwd_cat(&self, out: &mut Self::Buf, x: &Self::Buf, n: usize, k: usize, ws: &[(&Self::Buf, usize)]);
    /// Backward of [`Backend::matmul_fwd_cat`] given `dout[n, Σm]`: `dw_i += dout[:, o_i..o_i + m_i]ᵀ
    /// · x` for each `(dw_i, w_i, m_i)` and, when `dx` is given, `dx = Σ_i dout[:, o_i..] · w_i`
    /// (overwritten when `dx_set`, else added to; one GEMM over `k = Σm` on GEMM backends).
    #[allow(clippy::too_many_arguments)]
    fn matmul_bwd_cat(
        &self,
        dx: Option<&mut Self::Buf>,
        dx_set: bool,
        x: &Self::Buf,
        dout: &Self::Buf,
        n: usize,
        k: usize,
        items: &mut [(&mut Self::Buf, &Self::Buf, usize)],
    );

    // ---- normalisation --------------------------------------------------------------------
    /// `out = w ⊙ x / sqrt(mean(x²) + eps)` per row; saves `rstd[n]`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_fwd(&self, out: &mut Self::Buf, rstd: &mut Self::Buf, x: &Self::Buf, w: &Self::Buf, n: usize, d: usize, eps: f32);
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        d: usize,
    );
    /// [`Backend::rmsnorm_bwd`], and the updated `dx` also stored in `dx_act`, an activation
    /// buffer ([`Backend::zeros_act`]): the next backward GEMM's operand without a conversion pass.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd_mirrored(
        &self,
        dx: &mut Self::Buf,
        dx_act: &mut Self::Buf,
        dw: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        d: usize,
    ) {
        self.rmsnorm_bwd(dx, dw, dout, x, w, rstd, n, d);
        self.copy(dx_act, dx, n * d);
    }

    // ---- rotary embedding -----------------------------------------------------------------
    /// In place on `x[n, heads, head_dim]`, non-interleaved halves ("rotate_half"), angle
    /// `pos[i] * theta^(-2j/head_dim)`, cos/sin computed in f32 or better.
    fn rope_fwd(&self, x: &mut Self::Buf, pos: &Self::Idx, n: usize, heads: usize, head_dim: usize, theta: f32);
    /// In place on a gradient: applies the inverse rotation (the transpose of the forward).
    fn rope_bwd(&self, dx: &mut Self::Buf, pos: &Self::Idx, n: usize, heads: usize, head_dim: usize, theta: f32);
    /// [`Backend::rope_fwd`] of a layer's queries `q[n, heads, head_dim]` and keys `k[n, kv_heads,
    /// head_dim]` at the same positions (CUDA: one launch, the angles computed once).
    #[allow(clippy::too_many_arguments)]
    fn rope_fwd_qk(&self, q: &mut Self::Buf, k: &mut Self::Buf, pos: &Self::Idx, n: usize, heads: usize, kv_heads: usize, head_dim: usize, theta: f32) {
        self.rope_fwd(q, pos, n, heads, head_dim, theta);
        self.rope_fwd(k, pos, n, kv_heads, head_dim, theta);
    }

    // ---- attention ------------------------------------------------------------------------
    /// `out[nq, heads*head_dim]`, `lse[nq*heads]` (log-sum-exp of the scaled scores, saved for
    /// the backward). Scale `1/sqrt(head_dim)`; GQA maps query head `h` to kv head
    /// `h / (heads / kv_heads)`. A query with no visible key gets zero output.
    fn attention_fwd(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: &AttnShape<'_, Self::Idx>,
    );
    /// [`Backend::attention_fwd`], and the output also stored in `out_act`, an activation buffer
    /// ([`Backend::zeros_act`]): converted once for the output projection's forward and backward
    /// GEMMs. (CUDA: the TMA forward stores the copy from its epilogue, 0.309 ms against 0.289 +
    /// 0.028 for a separate pass on the H200; the mma.sync forward measured 0.19 ms slower per call
    /// that way, so it keeps the pass.)
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd_mirrored(
        &self,
        out: &mut Self::Buf,
        out_act: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: &AttnShape<'_, Self::Idx>,
    ) {
        self.attention_fwd(out, lse, q, k, v, shape);
        self.copy(out_act, out, shape.nq * shape.heads * shape.head_dim);
    }
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: &AttnShape<'_, Self::Idx>,
    );
    /// The backward of attention followed by RoPE on the queries: `dq` is overwritten with
    /// `rope_bwd(∂L/∂q)` at the queries' positions (`shape.pos_q`, base `theta`); `dk` and `dv`
    /// are overwritten when `kv_set`, else accumulate as in [`Backend::attention_bwd`]. (CUDA: one
    /// pass over dq instead of a zero fill, the workspace conversion and rope_bwd; dk and dv
    /// stored by the kernel, with no zero fill before it and no read in it, when `kv_set`.)
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd_rope_dq(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: &AttnShape<'_, Self::Idx>,
        theta: f32,
        kv_set: bool,
    ) {
        if kv_set {
            let nk = shape.nk * shape.kv_heads * shape.head_dim;
            self.fill(dk, nk, 0.0);
            self.fill(dv, nk, 0.0);
        }
        self.fill(dq, shape.nq * shape.heads * shape.head_dim, 0.0);
        self.attention_bwd(dq, dk, dv, dout, out, lse, q, k, v, shape);
        self.rope_bwd(dq, shape.pos_q, shape.nq, shape.heads, shape.head_dim, theta);
    }
    /// The attention backward of a layer over its own keys (queries and keys one token set,
    /// nothing else attending to them), its gradients packed for the q/k/v projections'
    /// backward ([`Backend::matmul_bwd_cat`]): row r of `dkvq` (`[n, 2 kvd + qd]`) holds
    /// `rope_bwd(∂L/∂k)` | `∂L/∂v` | `rope_bwd(∂L/∂q)`. `dq`, `dk`, `dv` are scratch of the
    /// unpacked gradients (their contents are left unspecified). The default runs
    /// [`Backend::attention_bwd_rope_dq`], `rope_bwd` on dk and three [`Backend::copy_cols`]; CUDA
    /// writes dq into its columns and packs dk / dv in one pass.
    fn attention_bwd_packed(&self, dkvq: &mut Self::Buf, scratch: AttnGrads<'_, Self>, inputs: &AttnBwdInputs<'_, Self>, theta: f32) {
        attention_bwd_packed_unfused(self, dkvq, scratch, inputs, theta);
    }

    // ---- activations ----------------------------------------------------------------------
    /// `out = silu(gate) * up` on `rows` rows of width `f`, gate and up side by side in
    /// `gate_up[rows, 2f]` (row r: gate in columns `[0, f)`, up in `[f, 2f)`; the layout
    /// [`Backend::matmul_fwd_cat`] writes).
    fn swiglu_fwd(&self, out: &mut Self::Buf, gate_up: &Self::Buf, rows: usize, f: usize);
    /// `dgate_up[rows, 2f] += ∂(silu(gate) * up)/∂(gate, up) · dout` in the same layout.
    fn swiglu_bwd(&self, dgate_up: &mut Self::Buf, dout: &Self::Buf, gate_up: &Self::Buf, rows: usize, f: usize);
    /// [`Backend::swiglu_bwd`] that overwrites `dgate_up` instead of adding to it.
    fn swiglu_bwd_set(&self, dgate_up: &mut Self::Buf, dout: &Self::Buf, gate_up: &Self::Buf, rows: usize, f: usize) {
        self.fill(dgate_up, 2 * rows * f, 0.0);
        self.swiglu_bwd(dgate_up, dout, gate_up, rows, f);
    }
    /// [`Backend::swiglu_bwd_set`] that also writes the forward's `out` again, bit for bit as
    /// [`Backend::swiglu_fwd`]: a layer keeps `gate_up` and recomputes its SwiGLU output in the
    /// backward instead of keeping it (one write where keeping it costs `rows · f` elements per
    /// layer application). Backends fuse the two passes.
    #[allow(clippy::too_many_arguments)]
    fn swiglu_bwd_recompute(&self, dgate_up: &mut Self::Buf, out: &mut Self::Buf, dout: &Self::Buf, gate_up: &Self::Buf, rows: usize, f: usize) {
        self.swiglu_fwd(out, gate_up, rows, f);
        self.swiglu_bwd_set(dgate_up, dout, gate_up, rows, f);
    }
    /// Exact (erf) GELU, as `torch.nn.GELU()`.
    fn gelu_fwd(&self, out: &mut Self::Buf, x: &Self::Buf, n: usize);
    fn gelu_bwd(&self, dx: &mut Self::Buf, dout: &Self::Buf, x: &Self::Buf, n: usize);
    /// `out = alpha * f(x)` elementwise.
    fn gate_fwd(&self, out: &mut Self::Buf, x: &Self::Buf, f: GateFn, alpha: f32, n: usize);
    fn gate_bwd(&self, dx: &mut Self::Buf, dout: &Self::Buf, x: &Self::Buf, f: GateFn, alpha: f32, n: usize);
    /// Row softmax of `x[n, c]`.
    fn softmax_fwd(&self, out: &mut Self::Buf, x: &Self::Buf, n: usize, c: usize);
    fn softmax_bwd(&self, dx: &mut Self::Buf, dout: &Self::Buf, out: &Self::Buf, n: usize, c: usize);

    // ---- token subsets --------------------------------------------------------------------
    /// `out[i] = x[idx[i]]` for `i < m`, rows of `d`.
    fn gather_rows(&self, out: &mut Self::Buf, x: &Self::Buf, idx: &Self::Idx, m: usize, d: usize);
    /// `dx[idx[i]] += dout[i]` (the backward of `gather_rows`); repeated rows add in index order.
    fn scatter_add_rows(&self, dx: &mut Self::Buf, dout: &Self::Buf, idx: &Self::Idx, m: usize, d: usize);
    /// [`Backend::scatter_add_rows`] for distinct rows `idx[..m]` (a token set's rows, the
    /// backward of gathering a set): no two sources meet, so a device needs no grouping pass. The
    /// same result; with repeated rows the result is unspecified.
    fn scatter_add_rows_distinct(&self, dx: &mut Self::Buf, dout: &Self::Buf, idx: &Self::Idx, m: usize, d: usize) {
        self.scatter_add_rows(dx, dout, idx, m, d);
    }
    /// `h[idx[i]] += scale[i] * y[i]` (the MoR combine step).
    fn scatter_add_scaled(&self, h: &mut Self::Buf, y: &Self::Buf, scale: &Self::Buf, idx: &Self::Idx, m: usize, d: usize);
    /// [`Backend::scatter_add_scaled`] for distinct rows (see [`Backend::scatter_add_rows_distinct`]).
    fn scatter_add_scaled_distinct(&self, h: &mut Self::Buf, y: &Self::Buf, scale: &Self::Buf, idx: &Self::Idx, m: usize, d: usize) {
        self.scatter_add_scaled(h, y, scale, idx, m, d);
    }
    /// Backward of `scatter_add_scaled`: `dy[i] += scale[i] * dh[idx[i]]`,
    /// `dscale[i] += <dh[idx[i]], y[i]>`. `dh` itself passes through unchanged.
    #[allow(clippy::too_many_arguments)]
    fn scatter_add_scaled_bwd(
        &self,
        dy: &mut Self::Buf,
        dscale: &mut Self::Buf,
        dh: &Self::Buf,
        y: &Self::Buf,
        scale: &Self::Buf,
        idx: &Self::Idx,
        m: usize,
        d: usize,
    );
    /// `x[idx[i]] = y[i]` (rows replaced; of repeated rows the last source).
    fn scatter_rows(&self, x: &mut Self::Buf, y: &Self::Buf, idx: &Self::Idx, m: usize, d: usize);
    /// [`Backend::scatter_rows`] for distinct rows (see [`Backend::scatter_add_rows_distinct`]).
    fn scatter_rows_distinct(&self, x: &mut Self::Buf, y: &Self::Buf, idx: &Self::Idx, m: usize, d: usize) {
        self.scatter_rows(x, y, idx, m, d);
    }
    /// Backward of `scatter_rows`: `dy[i] += dx[idx[i]]`, then `dx[idx[i]] = 0`.
    fn scatter_rows_bwd(&self, dy: &mut Self::Buf, dx: &mut Self::Buf, idx: &Self::Idx, m: usize, d: usize);
    /// `x[idx[i]] = value` for scalars (`d = 1`), `i < m`.
    fn index_fill(&self, x: &mut Self::Buf, idx: &Self::Idx, m: usize, value: f32);
    /// Per segment `s` (scores `cu[s]..cu[s+1]`), the indices of its `k` largest scores, in
    /// ascending index order, written to `out[s*k .. (s+1)*k]` as global indices into `scores`.
    /// Ties are broken towards the lower index. Requires `k <= segment length`.
    fn topk_segments(&self, out: &mut Self::Idx, scores: &Self::Buf, cu: &Self::Idx, num_seqs: usize, k: usize);
    /// Members `local[..m]` of a token set (global row indices `parent`) as a new set:
    /// `idx[i] = parent[local[i]]`, `pos[i] = idx[i] % seq_len`. Expert-choice subsets are built
    /// on the device this way, so the host need not read the selection before the block runs.
    fn subset_rows(&self, idx: &mut Self::Idx, pos: &mut Self::Idx, parent: &Self::Idx, local: &Self::Idx, m: usize, seq_len: usize);

    // ---- losses ---------------------------------------------------------------------------
    /// Per-row cross-entropy `loss[i] = logsumexp(logits[i]) - logits[i, target[i]]`; rows whose
    /// target is `u32::MAX` are ignored (loss 0). `logits` may be an activation buffer
    /// ([`Backend::zeros_act`]: the LM head's output), the losses are a [`Backend::zeros`] buffer.
    fn cross_entropy_fwd(&self, loss: &mut Self::Buf, logits: &Self::Buf, targets: &Self::Idx, n: usize, vocab: usize);
    /// `dlogits[i] += scale * (softmax(logits[i]) - onehot(target[i]))` for non-ignored rows.
    fn cross_entropy_bwd(&self, dlogits: &mut Self::Buf, logits: &Self::Buf, targets: &Self::Idx, scale: f32, n: usize, vocab: usize);
    /// [`Backend::cross_entropy_fwd`] and the gradient in one op: writes `loss[..n]` as the
    /// forward does and SETS `dlogits[i] = scale * (softmax(logits[i]) - onehot(target[i]))`
    /// (no accumulation); rows with an ignored (`u32::MAX`) or out-of-range target get a zero
    /// gradient row (the forward's loss for an out-of-range target is NaN, or a panic where the
    /// backend checks). `logits` and `dlogits` may be activation buffers ([`Backend::zeros_act`];
    /// with activation-precision logits so is `dlogits`), the losses are a [`Backend::zeros`]
    /// buffer. The default is
    /// `cross_entropy_fwd`, `fill(dlogits, 0)`, `cross_entropy_bwd`; a device fuses them into one
    /// pass pair over the logits (the LM head's memory traffic).
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_fwd_bwd(
        &self,
        loss: &mut Self::Buf,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Idx,
        scale: f32,
        n: usize,
        vocab: usize,
    ) {
        self.cross_entropy_fwd(loss, logits, targets, n, vocab);
        self.fill(dlogits, n * vocab, 0.0);
        self.cross_entropy_bwd(dlogits, logits, targets, scale, n, vocab);
    }
    /// Elementwise `BCEWithLogits(x, t)`.
    fn bce_logits_fwd(&self, loss: &mut Self::Buf, x: &Self::Buf, targets: &Self::Buf, n: usize);
    /// `dx += scale * (sigmoid(x) - t)`.
    fn bce_logits_bwd(&self, dx: &mut Self::Buf, x: &Self::Buf, targets: &Self::Buf, scale: f32, n: usize);

    // ---- optimiser ------------------------------------------------------------------------
    /// One AdamW update (PyTorch semantics: decoupled decay `p -= lr*wd*p` before the Adam
    /// step; bias corrections with 1-based `step`).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        n: usize,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        step: u64,
    );
    /// [`Backend::adamw`] of several tensors at once (one launch on devices), each with its own
    /// weight decay, every gradient multiplied by `grad_scale` first (the clipping coefficient,
    /// 1 for none). Bit for bit the same as [`Backend::scale`] of each gradient by `grad_scale`
    /// followed by [`Backend::adamw`], except that the gradients are left as they were.
    #[allow(clippy::too_many_arguments)]
    fn adamw_many(&self, items: &mut [AdamWItem<'_, Self>], lr: f32, beta1: f32, beta2: f32, eps: f32, step: u64, grad_scale: f32) {
        adamw_each(self, items, lr, beta1, beta2, eps, step, grad_scale);
    }
}

/// [`Backend::matmul_fwd_residual`] as [`Backend::matmul_fwd`] then [`Backend::axpy`] (the
/// default, and the fp32 path of backends that override it).
#[allow(clippy::too_many_arguments)]
pub fn matmul_fwd_residual_unfused<B: Backend + ?Sized>(b: &B, out: &mut B::Buf, x: &B::Buf, w: &B::Buf, res: &B::Buf, n: usize, k: usize, m: usize) {
    b.matmul_fwd(out, x, w, n, k, m);
    b.axpy(out, res, 1.0, n * m);
}

/// What an attention backward reads: the output's gradient, the forward's output and log-sum-exp,
/// its queries, keys, values and shape.
pub struct AttnBwdInputs<'a, B: Backend + ?Sized> {
    pub dout: &'a B::Buf,
    pub out: &'a B::Buf,
    pub lse: &'a B::Buf,
    pub q: &'a B::Buf,
    pub k: &'a B::Buf,
    pub v: &'a B::Buf,
    pub shape: &'a AttnShape<'a, B::Idx>,
}

/// The gradients of an attention's queries, keys and values.
pub struct AttnGrads<'a, B: Backend + ?Sized> {
    pub dq: &'a mut B::Buf,
    pub dk: &'a mut B::Buf,
    pub dv: &'a mut B::Buf,
}

/// [`Backend::attention_bwd_packed`] by the unpacked ops (the default, and CUDA's path where its
/// packed kernels do not apply).
pub fn attention_bwd_packed_unfused<B: Backend + ?Sized>(b: &B, dkvq: &mut B::Buf, g: AttnGrads<'_, B>, x: &AttnBwdInputs<'_, B>, theta: f32) {
    let shape = x.shape;
    assert_eq!(shape.nq, shape.nk, "attention_bwd_packed: queries and keys must be one token set");
    let (n, hd) = (shape.nq, shape.head_dim);
    let (qd, kvd) = (shape.heads * hd, shape.kv_heads * hd);
    b.attention_bwd_rope_dq(g.dq, g.dk, g.dv, x.dout, x.out, x.lse, x.q, x.k, x.v, shape, theta, true);
    b.rope_bwd(g.dk, shape.pos_k, n, shape.kv_heads, hd, theta);
    let ld = 2 * kvd + qd;
    b.copy_cols(dkvq, ld, 0, g.dk, n, kvd);
    b.copy_cols(dkvq, ld, kvd, g.dv, n, kvd);
    b.copy_cols(dkvq, ld, 2 * kvd, g.dq, n, qd);
}

/// [`Backend::matmul_fwd_many`] as one [`Backend::matmul_fwd`] per weight (the default, and the
/// fp32 path of backends that override it).
pub fn matmul_fwd_each<B: Backend + ?Sized>(b: &B, x: &B::Buf, n: usize, k: usize, outs: &mut [(&mut B::Buf, &B::Buf, usize)]) {
    for (out, w, m) in outs.iter_mut() {
        b.matmul_fwd(out, x, w, n, k, *m);
    }
}

/// [`Backend::matmul_bwd_many`] as a zero fill (when `dx_set`) and one accumulating
/// [`Backend::matmul_bwd`] per weight (the default, and the fp32 path of backends that override it).
pub fn matmul_bwd_each<B: Backend + ?Sized>(b: &B, mut dx: Option<&mut B::Buf>, dx_set: bool, x: &B::Buf, n: usize, k: usize, items: &mut [MatmulGrad<'_, B>]) {
    if dx_set {
        if let Some(dx) = dx.as_deref_mut() {
            b.fill(dx, n * k, 0.0);
        }
    }
    for it in items.iter_mut() {
        b.matmul_bwd(dx.as_deref_mut(), it.dw, it.dout, x, it.w, n, k, it.m);
    }
}

/// The per-step scalars of AdamW, computed in f64 from the f32 hyper-parameters (as PyTorch does
/// with Python floats) and rounded once to each backend's element type: every backend's update
/// uses these, so they agree bit for bit.
#[derive(Debug, Clone, Copy)]
pub struct AdamStepScalars {
    /// `lr / (1 - beta1^step)`.
    pub step_size: f64,
    /// `sqrt(1 - beta2^step)`.
    pub bc2_sqrt: f64,
    /// `1 - beta1`, `1 - beta2`.
    pub ob1: f64,
    pub ob2: f64,
}

impl AdamStepScalars {
    pub fn new(lr: f32, beta1: f32, beta2: f32, step: u64) -> Self {
        let (lr64, b1, b2) = (lr as f64, beta1 as f64, beta2 as f64);
        let t = step.min(i32::MAX as u64) as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        AdamStepScalars { step_size: lr64 / bc1, bc2_sqrt: bc2.sqrt(), ob1: 1.0 - b1, ob2: 1.0 - b2 }
    }
}

/// [`Backend::adamw_many`] as one [`Backend::adamw`] per tensor, a scaled gradient going through a
/// temporary copy ([`Backend::copy`], [`Backend::scale`]) so the caller's stays unscaled (the
/// default, and the reference the fused forms are tested against).
#[allow(clippy::too_many_arguments)]
pub fn adamw_each<B: Backend + ?Sized>(b: &B, items: &mut [AdamWItem<'_, B>], lr: f32, beta1: f32, beta2: f32, eps: f32, step: u64, grad_scale: f32) {
    for it in items.iter_mut() {
        if grad_scale == 1.0 {
            b.adamw(it.param, it.grad, it.m, it.v, it.n, lr, beta1, beta2, eps, it.weight_decay, step);
        } else {
            let mut g = b.zeros(it.n);
            b.copy(&mut g, it.grad, it.n);
            b.scale(&mut g, grad_scale, it.n);
            b.adamw(it.param, &g, it.m, it.v, it.n, lr, beta1, beta2, eps, it.weight_decay, step);
        }
    }
}
