//! One Llama decoder layer applied to a token set: forward saves what the backward needs.
//!
//! ```text
//! a = x + O(Attn(RoPE(Q·n1), RoPE(K·n1), V·n1))      n1 = RMSNorm_1(x)
//! y = a + Down(SiLU(Gate·n2) * (Up·n2))              n2 = RMSNorm_2(a)
//! ```
//! With KV sharing the layer takes keys/values from an earlier layer application (the same
//! block offset at recursion 1) and computes only Q.

use crate::tokens::TokenSet;
use crate::weights::LayerWeights;
use mor_config::ModelConfig;
use mor_engine::{AttnBwdInputs, AttnGrads, Backend, MatmulGrad, ParamId, ParamStore};

/// Dimensions every layer shares.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub d: usize,
    pub f: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub theta: f32,
}

impl Dims {
    pub fn new(cfg: &ModelConfig) -> Self {
        Dims {
            d: cfg.hidden_size,
            f: cfg.intermediate_size,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps as f32,
            theta: cfg.rope_theta as f32,
        }
    }
    pub fn qd(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kvd(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// What a layer application does with keys/values, which decides the buffers it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvRole {
    /// Borrows them from an earlier application (KV sharing): no `k`, `v`, `dk`, `dv`.
    Borrows,
    /// Computes its own, which nothing borrows: `k`, `v`; their gradients are made and consumed
    /// inside its backward, in [`LayerScratch`].
    Owns,
    /// Computes its own, which later applications may borrow (KV-sharing models): `k`, `v` and
    /// `dk`, `dv`, where the borrowers' backwards add their share before this one's.
    Lends,
}

/// Saved activations of one layer application, sized for `cap` tokens. The residual stream
/// (`x`, `a`), the attention output, row statistics and the key/value gradients (accumulated by
/// every layer sharing them) are full-precision buffers; the rest are activation buffers ([`Backend::zeros_act`]:
/// bf16 in CUDA's bf16 mode).
pub struct LayerAct<B: Backend> {
    pub cap: usize,
    pub kv_role: KvRole,
    pub x: B::Buf,
    pub rstd1: B::Buf,
    pub xn1: B::Buf,
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    pub att: B::Buf,
    /// `att` in activation precision: the output projection's operand (forward and backward).
    pub att_act: B::Buf,
    pub lse: B::Buf,
    pub a: B::Buf,
    pub rstd2: B::Buf,
    pub xn2: B::Buf,
    /// `[rows, 2f]`: per row the gate projection, then the up projection (one GEMM writes both).
    /// Their SwiGLU output is not kept: the backward recomputes it ([`LayerScratch::act`]).
    pub gate_up: B::Buf,
    /// Gradients of `k` / `v` (post-RoPE), accumulated by this layer and by layers sharing its
    /// keys/values before this layer's own backward consumes them ([`KvRole::Lends`] only).
    pub dk: B::Buf,
    pub dv: B::Buf,
}

impl<B: Backend> LayerAct<B> {
    /// Buffers for `cap` tokens; empty ones for what `kv_role` does not keep.
    pub fn new(b: &B, dims: &Dims, cap: usize, kv_role: KvRole) -> Self {
        let (d, f, qd) = (dims.d, dims.f, dims.qd());
        let kvd = if kv_role == KvRole::Borrows { 0 } else { dims.kvd() };
        let dkvd = if kv_role == KvRole::Lends { kvd } else { 0 };
        LayerAct {
            cap,
            kv_role,
            x: b.zeros(cap * d),
            rstd1: b.zeros(cap),
            xn1: b.zeros_act(cap * d),
            q: b.zeros_act(cap * qd),
            k: b.zeros_act(cap * kvd),
            v: b.zeros_act(cap * kvd),
            // f32: the attention backward's D = <dout, att> must match P·V (a bf16 att breaks the
            // row sums of dS; docs/design/bf16-gradient-error.md).
            att: b.zeros(cap * qd),
            att_act: b.zeros_act(cap * qd),
            lse: b.zeros(cap * dims.heads),
            a: b.zeros(cap * d),
            rstd2: b.zeros(cap),
            xn2: b.zeros_act(cap * d),
            gate_up: b.zeros_act(cap * 2 * f),
            dk: b.zeros(cap * dkvd),
            dv: b.zeros(cap * dkvd),
        }
    }
}

/// Scratch gradient buffers shared by all layer backwards (sized for the largest token set);
/// `dxn` (a residual-stream gradient) is full precision, the rest activation buffers.
pub struct LayerScratch<B: Backend> {
    /// The SwiGLU output of the layer running its forward, or its backward (which recomputes
    /// it): the down projection's input. Keeping it per layer application would cost as much as
    /// a third of the layer's saved activations; recomputing it costs one extra write.
    pub act: B::Buf,
    /// The residual-stream gradient last written by a layer backward (∂L/∂a, then ∂L/∂x) in
    /// activation precision: the operand of the next backward GEMM that reads it.
    pub dres: B::Buf,
    pub dact: B::Buf,
    /// `[rows, 2f]`, laid out as [`LayerAct::gate_up`].
    pub dgate_up: B::Buf,
    pub dxn: B::Buf,
    pub datt: B::Buf,
    pub dq: B::Buf,
    /// `[rows, 2 kvd + qd]`: the key, value and query gradients side by side, as the q/k/v
    /// projections' backward reads them ([`Backend::attention_bwd_packed`]).
    pub dkvq: B::Buf,
    /// Key/value gradients of an application whose keys/values nothing borrows
    /// ([`KvRole::Owns`]; full precision, as [`LayerAct::dk`]).
    pub dk: B::Buf,
    pub dv: B::Buf,
}

impl<B: Backend> LayerScratch<B> {
    pub fn new(b: &B, dims: &Dims, cap: usize) -> Self {
        LayerScratch {
            act: b.zeros_act(cap * dims.f),
            dres: b.zeros_act(cap * dims.d),
            dact: b.zeros_act(cap * dims.f),
            dgate_up: b.zeros_act(cap * 2 * dims.f),
            dxn: b.zeros(cap * dims.d),
            datt: b.zeros_act(cap * dims.qd()),
            dq: b.zeros_act(cap * dims.qd()),
            dkvq: b.zeros_act(cap * (2 * dims.kvd() + dims.qd())),
            dk: b.zeros(cap * dims.kvd()),
            dv: b.zeros(cap * dims.kvd()),
        }
    }
}

/// Keys/values borrowed from an earlier layer application (KV sharing).
pub struct SharedKv<'a, B: Backend> {
    pub src: &'a mut LayerAct<B>,
    pub set: &'a TokenSet<B>,
}

/// Where a layer backward's key/value gradients go.
pub enum KvGrad<'a, B: Backend> {
    /// Its own keys/values, which no other application borrows: the attention backward writes
    /// `dk`/`dv` (no zero fill before it).
    Set,
    /// Its own, borrowed by later applications whose backwards already added to `dk`/`dv`.
    Add,
    /// Borrowed keys/values: added to the source's `dk`/`dv`.
    Into(SharedKv<'a, B>),
}

/// Forward of one layer on `act.x` (n = `set.len()` rows), writing `out`; `mlp_act` takes the
/// SwiGLU output ([`LayerScratch::act`]).
#[allow(clippy::too_many_arguments)]
pub fn layer_forward<B: Backend>(
    b: &B,
    dims: &Dims,
    p: &ParamStore<B>,
    w: &LayerWeights,
    act: &mut LayerAct<B>,
    set: &TokenSet<B>,
    shared: Option<SharedKv<'_, B>>,
    mlp_act: &mut B::Buf,
    out: &mut B::Buf,
) {
    let n = set.len();
    let (d, f, qd, kvd) = (dims.d, dims.f, dims.qd(), dims.kvd());
    b.rmsnorm_fwd(&mut act.xn1, &mut act.rstd1, &act.x, p.value(w.attn_norm), n, d, dims.eps);
    let (wq, wk, wv) = (p.value(w.wq), p.value(w.wk), p.value(w.wv));
    match &shared {
        None => {
            b.matmul_fwd_many(&act.xn1, n, d, &mut [(&mut act.q, wq, qd), (&mut act.k, wk, kvd), (&mut act.v, wv, kvd)]);
            b.rope_fwd_qk(&mut act.q, &mut act.k, &set.pos, n, dims.heads, dims.kv_heads, dims.head_dim, dims.theta);
            let shape = set.attn_shape(set, dims.heads, dims.kv_heads, dims.head_dim);
            b.attention_fwd_mirrored(&mut act.att, &mut act.att_act, &mut act.lse, &act.q, &act.k, &act.v, &shape);
        }
        Some(kv) => {
            b.matmul_fwd(&mut act.q, &act.xn1, wq, n, d, qd);
            b.rope_fwd(&mut act.q, &set.pos, n, dims.heads, dims.head_dim, dims.theta);
            let shape = set.attn_shape(kv.set, dims.heads, dims.kv_heads, dims.head_dim);
            b.attention_fwd_mirrored(&mut act.att, &mut act.att_act, &mut act.lse, &act.q, &kv.src.k, &kv.src.v, &shape);
        }
    }
    // a = x + O(att)
    b.matmul_fwd_residual(&mut act.a, &act.att_act, p.value(w.wo), &act.x, n, qd, d);
    b.rmsnorm_fwd(&mut act.xn2, &mut act.rstd2, &act.a, p.value(w.mlp_norm), n, d, dims.eps);
    b.matmul_fwd_cat(&mut act.gate_up, &act.xn2, n, d, &[(p.value(w.w_gate), f), (p.value(w.w_up), f)]);
    b.swiglu_fwd(mlp_act, &act.gate_up, n, f);
    // y = a + Down(act)
    b.matmul_fwd_residual(out, mlp_act, p.value(w.w_down), &act.a, n, f, d);
}

/// Backward of one layer given `dy = ∂L/∂y`; `∂L/∂x` replaces `dy` in place (a stack of layers
/// passes one buffer down, no copy per layer) and is left in `s.dres` in activation precision.
/// `dy_in_dres`: `s.dres` holds `dy` already (the layer above wrote it). Weight gradients
/// accumulate into `p.grads`; with KV sharing, key/value gradients accumulate into the source's
/// `dk`/`dv`. A layer that owns keys/values must see all its sharers' backwards before its own.
#[allow(clippy::too_many_arguments)]
pub fn layer_backward<B: Backend>(
    b: &B,
    dims: &Dims,
    p: &mut ParamStore<B>,
    w: &LayerWeights,
    act: &mut LayerAct<B>,
    set: &TokenSet<B>,
    kv: KvGrad<'_, B>,
    s: &mut LayerScratch<B>,
    dy: &mut B::Buf,
    dy_in_dres: bool,
) {
    let n = set.len();
    let (d, f, qd, kvd) = (dims.d, dims.f, dims.qd(), dims.kvd());
    let ParamStore { values, grads, .. } = p;

    // One weight's share of a backward GEMM: its gradient, the output gradient, the weight.
    fn grad<'a, B: Backend>(dw: &'a mut B::Buf, dout: &'a B::Buf, w: &'a B::Buf, m: usize) -> MatmulGrad<'a, B> {
        MatmulGrad { dw, dout, w, m }
    }
    let v = |id: ParamId| &values[id.0];
    let disjoint = "a layer's weights are distinct parameters";

    // MLP branch; da = dy + ∂(mlp)/∂a, accumulated in dy. First contributions overwrite their
    // gradient buffers.
    // The down projection's input gradient, then its input (the SwiGLU output, recomputed with
    // the SwiGLU backward), then its weight gradient.
    let dy_op = if dy_in_dres { &s.dres } else { &*dy };
    b.matmul_bwd_dx(&mut s.dact, true, dy_op, v(w.w_down), n, f, d);
    b.swiglu_bwd_recompute(&mut s.dgate_up, &mut s.act, &s.dact, &act.gate_up, n, f);
    b.matmul_bwd(None, &mut grads[w.w_down.0], dy_op, &s.act, v(w.w_down), n, f, d);
    let [g_gate, g_up] = grads.get_disjoint_mut([w.w_gate.0, w.w_up.0]).expect(disjoint);
    let items = &mut [(g_gate, v(w.w_gate), f), (g_up, v(w.w_up), f)];
    b.matmul_bwd_cat(Some(&mut s.dxn), true, &act.xn2, &s.dgate_up, n, d, items);
    b.rmsnorm_bwd_mirrored(dy, &mut s.dres, &mut grads[w.mlp_norm.0], &s.dxn, &act.a, v(w.mlp_norm), &act.rstd2, n, d);
    let da = &s.dres;

    // Attention branch: ∂L/∂x = da + ∂(attn)/∂x, built in dy (which holds da).
    b.matmul_bwd_many(Some(&mut s.datt), true, &act.att_act, n, qd, &mut [grad(&mut grads[w.wo.0], da, v(w.wo), d)]);
    // dq, dk: the gradients of the rotated queries and keys, through the inverse rotation.
    // dxn = Σ over this layer's q, k, v projections (k and v when it owns them).
    match kv {
        KvGrad::Set => {
            // Nothing else attends to these keys: the gradients come packed for one GEMM.
            let shape = set.attn_shape(set, dims.heads, dims.kv_heads, dims.head_dim);
            let inputs = AttnBwdInputs { dout: &s.datt, out: &act.att, lse: &act.lse, q: &act.q, k: &act.k, v: &act.v, shape: &shape };
            let scratch = AttnGrads { dq: &mut s.dq, dk: &mut s.dk, dv: &mut s.dv };
            b.attention_bwd_packed(&mut s.dkvq, scratch, &inputs, dims.theta);
            let [g_k, g_v, g_q] = grads.get_disjoint_mut([w.wk.0, w.wv.0, w.wq.0]).expect(disjoint);
            let items = &mut [(g_k, v(w.wk), kvd), (g_v, v(w.wv), kvd), (g_q, v(w.wq), qd)];
            b.matmul_bwd_cat(Some(&mut s.dxn), true, &act.xn1, &s.dkvq, n, d, items);
        }
        KvGrad::Add => {
            // Later layers added their share of dk / dv already.
            debug_assert_eq!(act.kv_role, KvRole::Lends);
            let shape = set.attn_shape(set, dims.heads, dims.kv_heads, dims.head_dim);
            b.attention_bwd_rope_dq(&mut s.dq, &mut act.dk, &mut act.dv, &s.datt, &act.att, &act.lse, &act.q, &act.k, &act.v, &shape, dims.theta, false);
            b.rope_bwd(&mut act.dk, &set.pos, n, dims.kv_heads, dims.head_dim, dims.theta);
            let [g_k, g_v, g_q] = grads.get_disjoint_mut([w.wk.0, w.wv.0, w.wq.0]).expect(disjoint);
            let items = &mut [grad(g_k, &act.dk, v(w.wk), kvd), grad(g_v, &act.dv, v(w.wv), kvd), grad(g_q, &s.dq, v(w.wq), qd)];
            b.matmul_bwd_many(Some(&mut s.dxn), true, &act.xn1, n, d, items);
        }
        KvGrad::Into(kv) => {
            // Borrowed keys/values: their gradients go to the source layer.
            let shape = set.attn_shape(kv.set, dims.heads, dims.kv_heads, dims.head_dim);
            let src = kv.src;
            b.attention_bwd_rope_dq(&mut s.dq, &mut src.dk, &mut src.dv, &s.datt, &act.att, &act.lse, &act.q, &src.k, &src.v, &shape, dims.theta, false);
            b.matmul_bwd_many(Some(&mut s.dxn), true, &act.xn1, n, d, &mut [grad(&mut grads[w.wq.0], &s.dq, v(w.wq), qd)]);
        }
    }
    b.rmsnorm_bwd_mirrored(dy, &mut s.dres, &mut grads[w.attn_norm.0], &s.dxn, &act.x, v(w.attn_norm), &act.rstd1, n, d);
}
