//! Recursive / MoR models initialised from a vanilla model's layers, for up-training
//! (MOR_SPEC 2.1, paper Table 12; the released `sharing_strategy/llama.py`).
//!
//! Let the vanilla model have `L` layers, the target `N_r` recursions and a sharing strategy.
//! `base_depth = L / N_r` (Cycle, Sequence) or `(L − 2) / N_r` (Middle variants), rounded down.
//! When that does not divide evenly, the vanilla layers are first **sub-sampled** to
//! `L' = N_r·base_depth (+2)` positions exactly as the released code does:
//! `round(linspace(0, L−1, L'))` (Middle: first and last layer kept,
//! `round(linspace(1, L−2, L'−2))` in between), Python's round-half-to-even. The shared pool
//! (parameter sets of the [`mor_config::SharingMap`]) is then filled from those `L'`
//! positions:
//!
//! | init | pool entry `i` (`i = 0..base_depth`) |
//! |---|---|
//! | `stepwise` | position `round(linspace(0, L'−1, base_depth))[i]` (Middle: `linspace(1, L'−2, …)`) |
//! | `lower` | position `i` (Middle: `1 + i`) |
//! | `upper` | position `L' − base_depth + i` (Middle: `L' − base_depth − 1 + i`) |
//! | `average` | element-wise mean over the positions tied to entry `i` (its group in the map) |
//!
//! All four copy q/k/v/o, gate/up/down and both RMSNorm vectors (`ln_share`). Middle variants
//! copy the first and last layer to their unique sets. Embedding, final norm and LM head are
//! copied. Routers (absent in a vanilla model) keep a fresh initialisation. With untied
//! attention (expert-choice compatibility mode) every recursion's attention starts from its pool
//! entry's.

use crate::{Tensor, Tensors};
use anyhow::{bail, ensure, Result};
use mor_config::{KvMode, ModelConfig, RecursionConfig, RouterConfig, Sharing, SharingMap};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitStrategy {
    Stepwise,
    Average,
    Lower,
    Upper,
}

impl std::str::FromStr for InitStrategy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "stepwise" => InitStrategy::Stepwise,
            "average" => InitStrategy::Average,
            "lower" => InitStrategy::Lower,
            "upper" => InitStrategy::Upper,
            _ => bail!("unknown init strategy `{s}` (stepwise, average, lower, upper)"),
        })
    }
}

/// What to build from the vanilla weights.
#[derive(Debug, Clone)]
pub struct RecursiveSpec {
    pub sharing: Sharing,
    pub num_recursions: usize,
    pub init: InitStrategy,
    pub kv_mode: KvMode,
    pub untie_attention: bool,
    /// `None`: a plain recursive transformer (every token takes every recursion).
    pub router: Option<RouterConfig>,
}

/// `numpy.linspace(start, stop, num)` (endpoint included, last value exactly `stop`).
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    (0..num).map(|k| if k == num - 1 { stop } else { k as f64 * step + start }).collect()
}

/// Python's `round(x)` (half to even) of each element of `linspace`.
pub fn round_linspace(start: f64, stop: f64, num: usize) -> Vec<usize> {
    linspace(start, stop, num).into_iter().map(|x| x.round_ties_even() as usize).collect()
}

/// The vanilla layer that sits at each position of the (possibly sub-sampled) depth `L'`.
pub fn adjusted_layers(sharing: Sharing, num_layers: usize, num_recursions: usize) -> Result<Vec<usize>> {
    ensure!(num_recursions > 0, "num_recursions must be > 0");
    let l = num_layers;
    if sharing.is_middle() {
        ensure!(l >= 2 + num_recursions, "middle sharing needs at least {} layers, the source has {l}", 2 + num_recursions);
        let base = (l - 2) / num_recursions;
        let inner = base * num_recursions;
        if inner == l - 2 {
            return Ok((0..l).collect());
        }
        let mut v = vec![0];
        v.extend(round_linspace(1.0, (l - 2) as f64, inner));
        v.push(l - 1);
        Ok(v)
    } else {
        let base = l / num_recursions;
        ensure!(base > 0, "{num_recursions} recursions need at least {num_recursions} layers, the source has {l}");
        let total = base * num_recursions;
        if total == l {
            return Ok((0..l).collect());
        }
        Ok(round_linspace(0.0, (l - 1) as f64, total))
    }
}

/// Source positions (in the adjusted depth) of each shared-pool entry, for the selection
/// strategies; `None` for `average`.
pub fn selection_sources(init: InitStrategy, middle: bool, l_adj: usize, base_depth: usize) -> Option<Vec<usize>> {
    Some(match (init, middle) {
        (InitStrategy::Stepwise, false) => round_linspace(0.0, (l_adj - 1) as f64, base_depth),
        (InitStrategy::Stepwise, true) => round_linspace(1.0, (l_adj - 2) as f64, base_depth),
        (InitStrategy::Lower, false) => (0..base_depth).collect(),
        (InitStrategy::Lower, true) => (1..base_depth + 1).collect(),
        (InitStrategy::Upper, false) => (l_adj - base_depth..l_adj).collect(),
        (InitStrategy::Upper, true) => (l_adj - base_depth - 1..l_adj - 1).collect(),
        (InitStrategy::Average, _) => return None,
    })
}

const LAYER_PARAMS: &[&str] = &[
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

/// Config and tensors of a recursive / MoR model initialised from a vanilla model.
/// Router tensors are not produced (build with [`crate::FRESH_PREFIXES`]).
pub fn recursive_from_vanilla(src_cfg: &ModelConfig, src: &Tensors, spec: &RecursiveSpec) -> Result<(ModelConfig, Tensors)> {
    ensure!(src_cfg.recursion.is_none() && src_cfg.router.is_none(), "the source model must be vanilla (no recursion, no router)");
    let layers = adjusted_layers(spec.sharing, src_cfg.num_layers, spec.num_recursions)?;
    let l_adj = layers.len();
    let mut cfg = src_cfg.clone();
    cfg.num_layers = l_adj;
    cfg.recursion = Some(RecursionConfig {
        sharing: spec.sharing,
        num_recursions: spec.num_recursions,
        kv_mode: spec.kv_mode,
        untie_attention: spec.untie_attention,
    });
    cfg.router = spec.router.clone();
    cfg.validate()?;
    let map = SharingMap::new(spec.sharing, l_adj, spec.num_recursions)?;
    let middle = spec.sharing.is_middle();
    let get = |layer: usize, p: &str| -> Result<&Tensor> {
        let name = format!("model.layers.{layer}.{p}");
        src.get(&name).ok_or_else(|| anyhow::anyhow!("source tensor {name} is missing"))
    };
    let mut out = Tensors::new();
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
        if let Some(t) = src.get(name) {
            out.insert(name.to_string(), t.clone());
        }
    }
    let offset = usize::from(middle);
    if middle {
        for p in LAYER_PARAMS {
            out.insert(format!("model.layers.0.{p}"), get(layers[0], p)?.clone());
            out.insert(format!("model.layers.{}.{p}", map.base_depth + 1), get(layers[l_adj - 1], p)?.clone());
        }
    }
    let selection = selection_sources(spec.init, middle, l_adj, map.base_depth);
    for i in 0..map.base_depth {
        let set = i + offset;
        let group: Vec<usize> = (0..l_adj).filter(|&pos| map.param_set[pos] == set).collect();
        for p in LAYER_PARAMS {
            let t = match &selection {
                Some(sel) => get(layers[sel[i]], p)?.clone(),
                None => {
                    let mut acc = vec![0f64; get(layers[group[0]], p)?.data.len()];
                    for &pos in &group {
                        for (a, x) in acc.iter_mut().zip(&get(layers[pos], p)?.data) {
                            *a += *x as f64;
                        }
                    }
                    let n = group.len() as f64;
                    Tensor::new(get(layers[group[0]], p)?.shape.clone(), acc.into_iter().map(|a| (a / n) as f32).collect())
                }
            };
            out.insert(format!("model.layers.{set}.{p}"), t);
        }
    }
    if spec.untie_attention {
        for r in 1..spec.num_recursions {
            for j in 0..map.base_depth {
                let set = j + offset;
                for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                    let t = out[&format!("model.layers.{set}.self_attn.{p}.weight")].clone();
                    out.insert(format!("model.recursions.{r}.layers.{j}.self_attn.{p}.weight"), t);
                }
            }
        }
    }
    Ok((cfg, out))
}
