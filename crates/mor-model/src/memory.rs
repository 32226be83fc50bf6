//! Memory estimate of a training run, from the config alone (`mor train --dry-run`).
//!
//! The counts mirror the model's own allocations element for element: parameters and their
//! gradients ([`crate::weights::Weights::build`]), the AdamW moments (two per parameter), and the
//! [`crate::model::Workspace`] of one micro-batch: every unrolled layer application keeps its
//! saved activations (`LayerAct`) for the tokens it can see — `batch · k_r` at an expert-choice
//! recursion step, all `n = batch · seq_len` everywhere else —, one set of layer-backward
//! scratch, per-recursion router/combine buffers (sized the same way), the residual-stream
//! buffers, and one LM-head chunk of logits and their gradient. Sizes are those of the first
//! training step of a fresh run: with capacity warm-up that step runs at capacity 1, the most the
//! run ever allocates. A test checks the workspace figure against the buffers a training step
//! really allocates. Not counted: index buffers (a few `u32` per token), backend scratch
//! (attention row statistics, sort buffers, bf16 GEMM operand copies on CUDA) and the CUDA
//! context itself.

use crate::layer::Dims;
use crate::model::{blocks_contiguous, expert_k};
use mor_config::{KvMode, ModelConfig, RouterKind, Sampling};
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
    /// Token rows those activations are sized for, summed over the layer applications
    /// (`num_layers · tokens` without expert-choice routing).
    pub layer_rows: usize,
    /// Everything else in the workspace: backward scratch, residual buffers, recursion-step and
    /// router buffers, LM-head chunk (logits and their gradient).
    pub workspace_other: usize,
    /// The LM-head share of `workspace_other`.
    pub head_chunk: usize,
    /// Tokens per micro-batch.
    pub tokens: usize,
    /// Elements of `layer_activations` in activation buffers (`Backend::zeros_act`), which a
    /// bf16 backend stores in 2 bytes instead of 4.
    pub layer_act_buffers: usize,
    /// Elements of `workspace_other` in activation buffers.
    pub other_act_buffers: usize,
}

/// A share of a [`MemoryEstimate`], for [`MemoryEstimate::bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Total,
    Activations,
    LayerActivations,
    WorkspaceOther,
}

impl MemoryEstimate {
    /// Bytes per element of a full-precision buffer.
    pub const BYTES: usize = 4;

    /// Bytes of a share with activation buffers stored in `act_bytes` bytes per element (4 on
    /// the CPU and in CUDA's fp32 mode, 2 in its bf16 mode).
    pub fn bytes(&self, part: Part, act_bytes: usize) -> usize {
        let (elems, act) = match part {
            Part::Total => (self.total(), self.layer_act_buffers + self.other_act_buffers),
            Part::Activations => (self.activations(), self.layer_act_buffers + self.other_act_buffers),
            Part::LayerActivations => (self.layer_activations, self.layer_act_buffers),
            Part::WorkspaceOther => (self.workspace_other, self.other_act_buffers),
        };
        elems * Self::BYTES - act * (Self::BYTES - act_bytes)
    }

    /// Bf16 weight copies the bf16 mode keeps (`act_bytes == 2`; CUDA caches a bf16 copy of every
    /// weight it multiplies, refreshed after each optimizer step): one element per parameter,
    /// 2 bytes each (stacked gate/up and q/k/v copies not counted). 0 otherwise.
    pub fn weight_copies(&self, act_bytes: usize) -> usize {
        if act_bytes == 2 {
            self.params
        } else {
            0
        }
    }

    /// Bytes resident during a training step: [`Part::Total`] plus the bf16 weight copies.
    pub fn peak_bytes(&self, act_bytes: usize) -> usize {
        self.bytes(Part::Total, act_bytes) + 2 * self.weight_copies(act_bytes)
    }

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
    // Rows of each layer application (index = layer position) and, per recursion step, of the
    // router input (candidates) and of the tokens that run the block (selected); see `Workspace`.
    let mut app_rows = vec![n; map.num_layers];
    let mut cand_rows = Vec::new();
    let mut sel_rows = Vec::new();
    if let Some(rc) = cfg.router.as_ref() {
        let n_r = map.num_recursions;
        for r in 0..n_r {
            let sel = match rc.kind {
                // Forward call 0: the largest capacity of the run.
                RouterKind::Expert => batch * expert_k(rc, r, n_r, seq_len, 0),
                RouterKind::Token => n,
            };
            cand_rows.push(sel_rows.last().copied().unwrap_or(n));
            sel_rows.push(sel);
            app_rows[map.step_positions(r)].iter_mut().for_each(|a| *a = sel);
        }
    }
    // LayerAct: x, xn1, a, xn2 (d); q, att, att_act (qd); k, v (kvd, only where the
    // application owns its keys/values: with KV sharing, recursions after the first borrow them)
    // and dk, dv (kvd, only for the first recursion of KV-sharing models, whose keys/values the
    // later recursions borrow and add gradients to);
    // gate_up (2f); lse (heads); rstd1, rstd2.
    let per_app = 4 * d + 3 * qd + 2 * f + heads + 2;
    // Of those, activation buffers: xn1, xn2, q, att_act, gate_up; and k, v.
    let per_app_act = 2 * d + 2 * qd + 2 * f;
    let mut kv_rows: usize = app_rows.iter().sum();
    if cfg.kv_mode() == KvMode::Share && blocks_contiguous(&map) {
        kv_rows -= (1..map.num_recursions).flat_map(|r| map.step_positions(r)).map(|pos| app_rows[pos]).sum::<usize>();
    }
    let kv_grad_rows = if cfg.kv_mode() == KvMode::Share { map.step_positions(0).map(|pos| app_rows[pos]).sum() } else { 0 };
    let layer_rows: usize = app_rows.iter().sum();
    let layer_activations = layer_rows * per_app + kv_rows * 2 * kvd + kv_grad_rows * 2 * kvd;
    let layer_act_buffers = layer_rows * per_app_act + kv_rows * 2 * kvd;
    // LayerScratch: dxn, dres (d); act, dact (f), dgate_up (2f); datt, dq (qd); dkvq (2 kvd + qd);
    // dk, dv (kvd); all but dxn, dk, dv are activation buffers.
    let scratch = n * (2 * d + 4 * f + 3 * qd + 4 * kvd);
    let scratch_act = n * (d + 4 * f + 3 * qd + 2 * kvd);
    // Residual buffers h, h1, tx, hn, dh, dhn, dtx; rstd; ce_all.
    let residual = n * (7 * d + 2);
    let vocab = cfg.vocab_size;
    let head_rows = (head_chunk_elems / vocab).clamp(1, n);
    // head_x, head_dx, logits, dlogits, ce (one chunk); logits and dlogits are activation buffers.
    let head_chunk = head_rows * (2 * d + 2 * vocab + 1);
    let head_act = 2 * head_rows * vocab;
    // Recursion-step buffers (routed models: one per recursion) and router activations.
    let mut steps = 0;
    let mut routers = 0;
    if let Some(rc) = cfg.router.as_ref() {
        // StepBuf: x, dx (d) and g, targets, bce, dg per candidate; y, ye, dy, dyin (d) and gk,
        // dgk per selected token.
        let (cand, sel): (usize, usize) = (cand_rows.iter().sum(), sel_rows.iter().sum());
        steps = cand * (2 * d + 4) + sel * (4 * d + 2);
        if !rc.random {
            // Expert-choice: one router per step on its candidates; token-choice: one on all
            // tokens with one output per recursion.
            let (rows, out) = match rc.kind {
                RouterKind::Expert => (cand, 1),
                RouterKind::Token => (n, map.num_recursions),
            };
            let h = rc.arch.hidden(d).unwrap_or(0).max(1);
            // RouterAct: pre, hid, dpre, dhid (h); logits, dlogits (out).
            let sets = if rc.kind == RouterKind::Expert && rc.sampling == Sampling::AuxRouter { 2 } else { 1 };
            routers = sets * rows * (4 * h + 2 * out);
        }
    }
    Ok(MemoryEstimate {
        params,
        grads: params,
        optimizer: 2 * params,
        layer_activations,
        layer_rows,
        workspace_other: scratch + residual + head_chunk + steps + routers,
        head_chunk,
        tokens: n,
        layer_act_buffers,
        other_act_buffers: scratch_act + head_act,
    })
}
