//! Parameter counts and FLOPs, computed from a [`ModelConfig`] and its [`SharingMap`]
//! (MOR_SPEC 1.2, 3.2, 4.1, 7.3, 10.1). This is the one definition used by the CLI, the presets
//! (their iso-FLOP step counts) and the tests; nothing here is hard-coded per preset.
//!
//! **Parameters** are *unique* parameters (a shared layer is counted once):
//! * per layer: `d·q + 2·d·kv + q·d + 3·d·d_inter + 2·d` (q, k, v, o, gate/up/down, two RMSNorms),
//!   times [`SharingMap::num_param_sets`], plus the final RMSNorm `d`;
//! * `untie_attention` (released expert-choice code, MOR_SPEC 10.1): q/k/v/o of the shared pool
//!   exist once per recursion step while MLP and norms stay shared;
//! * `non_embedding` excludes the token embedding, the LM head (when untied) and the routers;
//! * `embedding` = `vocab·d`, doubled when the LM head is untied;
//! * `router`: expert-choice has one router per step (`Linear(d→1)`: `d`; MLP: `d·h + h`),
//!   token-choice one router for the stack (`Linear(d→N_r)`: `d·N_r`; MLP: `d·h + h·N_r`), all
//!   bias-free; `h = 2d` (`mlp`) or `4d` (`wide_mlp`); a random router has none; the auxiliary
//!   router (`sampling = "aux_router"`, expert-choice) adds a second router of the same
//!   architecture per step;
//! * `total` = `non_embedding + embedding + router`.
//!
//! **FLOPs** follow the forward-only model of MOR_SPEC 7.3 that reproduces the released step
//! counts: per token, summed over unrolled layer positions, LM head / embedding / routers
//! excluded, GQA ignored (k/v projections counted as `d×d`):
//! ```text
//! layer(c)        = 2·(4d² + 3·d·d_inter)·c + 2·L·d·c²   recursion-wise caching, active fraction c
//! layer_shared(c) = 2·(2d² + 3·d·d_inter)·c + 2·L·d·c    later recursions with KV sharing
//! ```
//! Unique layers and plain recursive / vanilla models have `c = 1`; MoR recursion step `r` has
//! `c = RouterConfig::capacity(r)` (token-choice assumes perfect balance, i.e. the same
//! capacities). `steps = round(budget / (FLOPs/token · tokens/step))` (rounding reproduces
//! 9,438 / 8,883 / 12,619 / 14,161 / 14,216 / 14,672 / 36,326 within one step).

use crate::config::{ConfigError, KvMode, ModelConfig, RouterConfig, RouterKind, Sampling};
use crate::sharing::SharingMap;
use serde::{Deserialize, Serialize};

/// Unique parameter counts of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamCounts {
    /// Everything except the token embedding, the untied LM head and the routers.
    pub non_embedding: u64,
    /// Token embedding (`vocab·d`), plus the LM head when untied.
    pub embedding: u64,
    /// All router parameters (including an auxiliary router set).
    pub router: u64,
    /// All unique parameters.
    pub total: u64,
}

/// q, k, v and o projections of one layer: `2·d·q + 2·d·kv`.
pub fn attention_params(model: &ModelConfig) -> u64 {
    let d = model.hidden_size as u64;
    2 * d * model.q_dim() as u64 + 2 * d * model.kv_dim() as u64
}

/// SwiGLU gate/up/down of one layer: `3·d·d_inter`.
pub fn mlp_params(model: &ModelConfig) -> u64 {
    3 * model.hidden_size as u64 * model.intermediate_size as u64
}

/// The two RMSNorm weight vectors of one layer: `2·d`.
pub fn layer_norm_params(model: &ModelConfig) -> u64 {
    2 * model.hidden_size as u64
}

/// Parameters of one decoder layer (MOR_SPEC 1.2).
pub fn layer_params(model: &ModelConfig) -> u64 {
    attention_params(model) + mlp_params(model) + layer_norm_params(model)
}

/// Router parameters of the whole model (0 without a router or for a random router).
pub fn router_params(model: &ModelConfig) -> u64 {
    let Some(router) = &model.router else { return 0 };
    if router.random {
        return 0;
    }
    let d = model.hidden_size as u64;
    let n_r = model.num_recursions() as u64;
    let one_router = |out: u64| match router.arch.hidden(model.hidden_size) {
        None => d * out,
        Some(h) => d * h as u64 + h as u64 * out,
    };
    match router.kind {
        RouterKind::Expert => {
            let sets = if router.sampling == Sampling::AuxRouter { 2 } else { 1 };
            sets * n_r * one_router(1)
        }
        RouterKind::Token => one_router(n_r),
    }
}

/// Unique parameter counts of `model` laid out by `map` (see the module docs).
pub fn param_counts(model: &ModelConfig, map: &SharingMap) -> ParamCounts {
    let d = model.hidden_size as u64;
    let mut non_embedding = map.num_param_sets() as u64 * layer_params(model) + d;
    if model.recursion.as_ref().is_some_and(|r| r.untie_attention) {
        // Each shared pool layer gets its own q/k/v/o per recursion step (MOR_SPEC 10.1).
        let extra_copies = (map.num_recursions.saturating_sub(1) * map.base_depth) as u64;
        non_embedding += extra_copies * attention_params(model);
    }
    let vocab_d = model.vocab_size as u64 * d;
    let embedding = if model.tie_embeddings { vocab_d } else { 2 * vocab_d };
    let router = router_params(model);
    ParamCounts { non_embedding, embedding, router, total: non_embedding + embedding + router }
}

/// Forward FLOPs per token of one layer with recursion-wise caching and active fraction `c`:
/// `2·(4d² + 3·d·d_inter)·c + 2·L·d·c²`.
pub fn layer_flops(d: f64, d_inter: f64, seq_len: f64, c: f64) -> f64 {
    2.0 * (4.0 * d * d + 3.0 * d * d_inter) * c + 2.0 * seq_len * d * c * c
}

/// Forward FLOPs per token of a later-recursion layer that reuses the recursion-1 K/V:
/// `2·(2d² + 3·d·d_inter)·c + 2·L·d·c`.
pub fn layer_shared_flops(d: f64, d_inter: f64, seq_len: f64, c: f64) -> f64 {
    2.0 * (2.0 * d * d + 3.0 * d * d_inter) * c + 2.0 * seq_len * d * c
}

/// How one unrolled layer position is executed, for the FLOP model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositionCost {
    /// Fraction of the tokens that run this position.
    pub capacity: f64,
    /// True when the position reuses the recursion-1 keys/values (KV sharing, step ≥ 2).
    pub kv_shared: bool,
}

/// Per-position active fraction and K/V mode (length `map.num_layers`).
pub fn position_costs(model: &ModelConfig, map: &SharingMap) -> Vec<PositionCost> {
    let mut costs = vec![PositionCost { capacity: 1.0, kv_shared: false }; map.num_layers];
    let contiguous = matches!(
        map.strategy,
        Some(crate::config::Sharing::Cycle) | Some(crate::config::Sharing::MiddleCycle)
    );
    if !contiguous {
        return costs;
    }
    let share = model.kv_mode() == KvMode::Share;
    for r in 0..map.num_recursions {
        let capacity =
            model.router.as_ref().map_or(1.0, |rc: &RouterConfig| rc.capacity(r, map.num_recursions));
        for pos in map.step_positions(r) {
            costs[pos] = PositionCost { capacity, kv_shared: share && r > 0 };
        }
    }
    costs
}

/// Forward FLOPs per token (MOR_SPEC 7.3) for sequences of `seq_len` tokens.
pub fn forward_flops_per_token(model: &ModelConfig, map: &SharingMap, seq_len: usize) -> f64 {
    let d = model.hidden_size as f64;
    let di = model.intermediate_size as f64;
    let l = seq_len as f64;
    position_costs(model, map)
        .iter()
        .map(|p| {
            if p.kv_shared {
                layer_shared_flops(d, di, l, p.capacity)
            } else {
                layer_flops(d, di, l, p.capacity)
            }
        })
        .sum()
}

/// Forward FLOPs per token of the LM head: `2·d·vocab` (excluded from the iso-FLOP model).
pub fn lm_head_flops_per_token(model: &ModelConfig) -> f64 {
    2.0 * model.hidden_size as f64 * model.vocab_size as f64
}

/// Training FLOPs per token, for MFU: `3 × (forward FLOPs incl. the LM head)` — the usual
/// "6·N" rule (forward 2·N, backward 4·N) applied to the recursion-aware forward count of
/// [`forward_flops_per_token`] plus the LM head. Routers and the embedding gather are ignored,
/// GQA is ignored as in MOR_SPEC 7.3 (slightly overestimates k/v projection work).
pub fn train_flops_per_token(model: &ModelConfig, map: &SharingMap, seq_len: usize) -> f64 {
    3.0 * (forward_flops_per_token(model, map, seq_len) + lm_head_flops_per_token(model))
}

/// Optimiser steps that spend `budget` forward FLOPs at `tokens_per_step` tokens per step.
pub fn iso_flop_steps(flops_per_token: f64, budget: f64, tokens_per_step: u64) -> u64 {
    (budget / (flops_per_token * tokens_per_step as f64)).round() as u64
}

/// Result of an iso-FLOP computation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IsoFlop {
    /// Forward FLOPs per token (MOR_SPEC 7.3).
    pub flops_per_token: f64,
    /// Optimiser steps for the budget.
    pub steps: u64,
    /// `steps · tokens_per_step`.
    pub tokens: u64,
}

/// Steps and tokens for a forward-FLOP `budget` (the paper's 16.5e18 etc.).
pub fn iso_flop(
    model: &ModelConfig,
    map: &SharingMap,
    seq_len: usize,
    budget: f64,
    tokens_per_step: u64,
) -> IsoFlop {
    let flops_per_token = forward_flops_per_token(model, map, seq_len);
    let steps = iso_flop_steps(flops_per_token, budget, tokens_per_step);
    IsoFlop { flops_per_token, steps, tokens: steps * tokens_per_step }
}

impl ModelConfig {
    /// Unique parameter counts (see [`param_counts`]).
    pub fn param_counts(&self) -> Result<ParamCounts, ConfigError> {
        Ok(param_counts(self, &self.sharing_map()?))
    }

    /// Forward FLOPs per token at `seq_len` (see [`forward_flops_per_token`]).
    pub fn forward_flops_per_token(&self, seq_len: usize) -> Result<f64, ConfigError> {
        Ok(forward_flops_per_token(self, &self.sharing_map()?, seq_len))
    }
}
