//! Memory estimate of a training run, from the config alone (`mor train --dry-run`).
//!
//! The counts mirror the model's own allocations element for element: parameters and their
//! gradients ([`crate::weights::Weights::build`]), the AdamW moments (two per parameter), and the
//! [`crate::model::Workspace`] of one micro-batch: every unrolled layer application keeps its
//! saved activations for the whole batch (`LayerAct`, sized for all `n = batch · seq_len` tokens
//! even when a recursion step runs on a subset), one set of layer-backward scratch, per-recursion
//! router/combine buffers, the residual-stream buffers, and one LM-head chunk of logits and their
//! gradient. A test checks the workspace figure against the buffers a training step really
//! allocates. Not counted: index buffers (a few `u32` per token), backend scratch (attention
//! row statistics, sort buffers, bf16 GEMM operand copies on CUDA) and the CUDA context itself.

use crate::layer::Dims;
use mor_config::{ModelConfig, RouterKind, Sampling};
use serde::Serialize;

/// Element counts (f32 values) of one training configuration; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Parameter values.
    pub params: usize,
    /// Parameter gradients.
    pub grads: usize,
    /// AdamW first and second moments.
    pub optimizer: usize,
    /// Saved activations of every layer application (`LayerAct`).
    pub layer_activations: usize,
    /// Everything else in the workspace: backward scratch, residual buffers, recursion-step and
    /// router buffers, LM-head chunk (logits and their gradient).
    pub workspace_other: usize,
    /// The LM-head share of `workspace_other`.
    pub head_chunk: usize,
    /// Tokens per micro-batch.
    pub tokens: usize,
}

impl MemoryEstimate {
    /// Bytes per element (every buffer is f32).
    pub const BYTES: usize = 4;

    /// All activations and workspace buffers.
    pub fn activations(&self) -> usize {
        self.layer_activations + self.workspace_other
    }

    /// Everything resident during a training step.
    pub fn total(&self) -> usize {
        self.params + self.grads + self.optimizer + self.activations()
    }
}

/// Estimate for training `cfg` on micro-batches of `batch × seq_len` tokens with an LM-head chunk
/// of `head_chunk_elems` logits ([`crate::Model::head_chunk_elems`]).
pub fn estimate(cfg: &ModelConfig, batch: usize, seq_len: usize, head_chunk_elems: usize) -> anyhow::Result<MemoryEstimate> {
    let map = cfg.sharing_map()?;
    let counts = cfg.param_counts()?;
    let params = counts.total as usize;
    let dims = Dims::new(cfg);
    let n = batch * seq_len;
    let (d, f, qd, kvd, heads) = (dims.d, dims.f, dims.qd(), dims.kvd(), dims.heads);
    // LayerAct: x, xn1, a, xn2 (d); q, att (qd); k, v, dk, dv (kvd); gate, up, act (f); lse
    // (heads); rstd1, rstd2.
    let per_app = 4 * d + 2 * qd + 4 * kvd + 3 * f + heads + 2;
    let layer_activations = map.num_layers * n * per_app;
    // LayerScratch: da, dxn (d); dact, dgate, dup (f); datt, dq (qd).
    let scratch = n * (2 * d + 3 * f + 2 * qd);
    // Residual buffers h, h1, tx, hn, dh, dhn, dtx, g1, g2; rstd; ce_all.
    let residual = n * (9 * d + 2);
    let vocab = cfg.vocab_size;
    let head_rows = (head_chunk_elems / vocab).clamp(1, n);
    // head_x, head_dx, logits, dlogits, ce (one chunk).
    let head_chunk = head_rows * (2 * d + 2 * vocab + 1);
    // Recursion-step buffers (routed models: one per recursion) and router activations.
    let mut steps = 0;
    let mut routers = 0;
    if let Some(rc) = cfg.router.as_ref() {
        let n_r = map.num_recursions;
        // StepBuf: x, y, ye, dy, dyin, dx (d); g, gk, targets, bce, dgk, dg.
        steps = n_r * n * (6 * d + 6);
        if !rc.random {
            let (count, out) = match rc.kind {
                RouterKind::Expert => (n_r, 1),
                RouterKind::Token => (1, n_r),
            };
            let h = rc.arch.hidden(d).unwrap_or(0).max(1);
            // RouterAct: pre, hid, dpre, dhid (h); logits, dlogits (out).
            let one = n * (4 * h + 2 * out);
            let sets = if rc.kind == RouterKind::Expert && rc.sampling == Sampling::AuxRouter { 2 } else { 1 };
            routers = sets * count * one;
        }
    }
    Ok(MemoryEstimate {
        params,
        grads: params,
        optimizer: 2 * params,
        layer_activations,
        workspace_other: scratch + residual + head_chunk + steps + routers,
        head_chunk,
        tokens: n,
    })
}
