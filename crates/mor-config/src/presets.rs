//! Built-in presets (`configs/<size>-<arch>.toml`, embedded at compile time by `build.rs`), the
//! loader that accepts a preset name or a TOML path, and the generator that writes the preset
//! files (`cargo run -p mor-config --example gen_presets`).

use crate::accounting::{forward_flops_per_token, iso_flop_steps};
use crate::config::*;
use std::path::Path;

include!(concat!(env!("OUT_DIR"), "/presets_table.rs"));

/// Names of all embedded presets, sorted.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|(name, _)| *name).collect()
}

/// The TOML text of an embedded preset.
pub fn preset_toml(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
}

/// Load a run configuration from a preset name (see [`preset_names`]) or from a path to a TOML
/// file. The result is validated. Unknown names give [`ConfigError::UnknownPreset`] with close
/// matches.
pub fn load(name_or_path: &str) -> Result<RunConfig, ConfigError> {
    if let Some(text) = preset_toml(name_or_path) {
        return RunConfig::from_toml_str(text, &format!("preset {name_or_path}"));
    }
    let path = Path::new(name_or_path);
    let looks_like_path = name_or_path.contains('/')
        || name_or_path.contains(std::path::MAIN_SEPARATOR)
        || name_or_path.ends_with(".toml");
    if looks_like_path || path.exists() {
        return RunConfig::from_path(path);
    }
    Err(ConfigError::UnknownPreset {
        name: name_or_path.to_string(),
        suggestions: close_matches(name_or_path),
    })
}

/// Up to five preset names close to `name` (edit distance, or containing it), closest first.
pub fn close_matches(name: &str) -> Vec<String> {
    let query = name.to_ascii_lowercase();
    let limit = (query.chars().count() / 3).max(2);
    let mut scored: Vec<(usize, &str)> = PRESETS
        .iter()
        .filter_map(|(n, _)| {
            let dist = levenshtein(&query, n);
            let contains = query.len() >= 3 && n.contains(query.as_str());
            (dist <= limit || contains).then_some((if contains { dist.min(limit) } else { dist }, *n))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(5).map(|(_, n)| n.to_string()).collect()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ------------------------------------------------------------------------------------------------
// Generator
// ------------------------------------------------------------------------------------------------

/// The paper's iso-FLOP budget used for the preset step counts (forward FLOPs, MOR_SPEC 7.3).
pub const PRESET_BUDGET: f64 = 16.5e18;
/// Budget whose 5 % of steps gives the warm-up length (MOR_SPEC 7.2).
pub const WARMUP_BUDGET: f64 = 2e18;

/// Dimensions of a preset size (MOR_SPEC 1.2; `tiny` is a CPU-sized model for quick runs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PresetSize {
    pub name: &'static str,
    /// Layer count of the vanilla model; recursive variants pad it (see [`padded_layers`]).
    pub base_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub tiny: bool,
}

pub const PRESET_SIZES: [PresetSize; 5] = [
    PresetSize {
        name: "135m",
        base_layers: 30,
        hidden_size: 576,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        intermediate_size: 1536,
        vocab_size: 49152,
        max_seq_len: 2048,
        tiny: false,
    },
    PresetSize {
        name: "360m",
        base_layers: 32,
        hidden_size: 960,
        num_heads: 15,
        num_kv_heads: 5,
        head_dim: 64,
        intermediate_size: 2560,
        vocab_size: 49152,
        max_seq_len: 2048,
        tiny: false,
    },
    PresetSize {
        name: "730m",
        base_layers: 26,
        hidden_size: 1536,
        num_heads: 24,
        num_kv_heads: 8,
        head_dim: 64,
        intermediate_size: 4096,
        vocab_size: 49152,
        max_seq_len: 2048,
        tiny: false,
    },
    PresetSize {
        name: "1.7b",
        base_layers: 24,
        hidden_size: 2048,
        num_heads: 32,
        num_kv_heads: 32,
        head_dim: 64,
        intermediate_size: 8192,
        vocab_size: 49152,
        max_seq_len: 2048,
        tiny: false,
    },
    PresetSize {
        name: "tiny",
        base_layers: 8,
        hidden_size: 128,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        intermediate_size: 384,
        vocab_size: 4096,
        max_seq_len: 256,
        tiny: true,
    },
];

/// Architecture part of a preset name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresetArch {
    /// `vanilla`
    Vanilla,
    /// `rec<N>-cycle` / `-seq` / `-mcycle` / `-mseq`: recursive transformer, no router.
    Recursive { n: usize, sharing: Sharing },
    /// `mor-ec<N>` (recursion-wise cache) / `mor-ec<N>-share` (KV sharing): expert-choice MoR,
    /// middle-cycle.
    Expert { n: usize, kv_share: bool },
    /// `mor-tc<N>`: token-choice MoR, middle-cycle, recursion-wise cache.
    Token { n: usize },
}

impl PresetArch {
    /// All 22 architectures, in a fixed order.
    pub fn all() -> Vec<PresetArch> {
        let mut v = vec![PresetArch::Vanilla];
        for n in 2..=4 {
            for sharing in [Sharing::Cycle, Sharing::Sequence, Sharing::MiddleCycle, Sharing::MiddleSequence]
            {
                v.push(PresetArch::Recursive { n, sharing });
            }
            v.push(PresetArch::Expert { n, kv_share: false });
            v.push(PresetArch::Expert { n, kv_share: true });
            v.push(PresetArch::Token { n });
        }
        v
    }

    pub fn name(self) -> String {
        match self {
            PresetArch::Vanilla => "vanilla".into(),
            PresetArch::Recursive { n, sharing } => {
                let s = match sharing {
                    Sharing::Cycle => "cycle",
                    Sharing::Sequence => "seq",
                    Sharing::MiddleCycle => "mcycle",
                    Sharing::MiddleSequence => "mseq",
                };
                format!("rec{n}-{s}")
            }
            PresetArch::Expert { n, kv_share: false } => format!("mor-ec{n}"),
            PresetArch::Expert { n, kv_share: true } => format!("mor-ec{n}-share"),
            PresetArch::Token { n } => format!("mor-tc{n}"),
        }
    }

    fn describe(self) -> String {
        match self {
            PresetArch::Vanilla => "vanilla Llama-style transformer".into(),
            PresetArch::Recursive { n, sharing } => {
                format!("recursive transformer, N_r={n}, {} sharing, no router", sharing_str(sharing))
            }
            PresetArch::Expert { n, kv_share } => format!(
                "MoR expert-choice, N_r={n}, middle_cycle sharing, {}",
                if kv_share { "recursive KV sharing" } else { "recursion-wise KV cache" }
            ),
            PresetArch::Token { n } => {
                format!("MoR token-choice, N_r={n}, middle_cycle sharing, recursion-wise KV cache")
            }
        }
    }

    fn is_mor(self) -> bool {
        matches!(self, PresetArch::Expert { .. } | PresetArch::Token { .. })
    }
}

/// Layer count for `n` recursions of a `base`-layer model: Middle variants
/// `1 + n·ceil((base−2)/n) + 1`, Cycle/Sequence `n·ceil(base/n)` (MOR_SPEC 1.3: the main runs
/// add layers when the division is not exact).
pub fn padded_layers(base: usize, sharing: Sharing, n: usize) -> usize {
    if sharing.is_middle() {
        2 + n * (base - 2).div_ceil(n)
    } else {
        n * base.div_ceil(n)
    }
}

fn sharing_str(s: Sharing) -> &'static str {
    match s {
        Sharing::Cycle => "cycle",
        Sharing::Sequence => "sequence",
        Sharing::MiddleCycle => "middle_cycle",
        Sharing::MiddleSequence => "middle_sequence",
    }
}

/// The model of `size` with architecture `arch`.
pub fn preset_model(size: &PresetSize, arch: PresetArch) -> ModelConfig {
    let (num_layers, recursion, router) = match arch {
        PresetArch::Vanilla => (size.base_layers, None, None),
        PresetArch::Recursive { n, sharing } => (
            padded_layers(size.base_layers, sharing, n),
            Some(RecursionConfig {
                sharing,
                num_recursions: n,
                kv_mode: KvMode::RecursionWise,
                untie_attention: false,
            }),
            None,
        ),
        PresetArch::Expert { n, kv_share } => (
            padded_layers(size.base_layers, Sharing::MiddleCycle, n),
            Some(RecursionConfig {
                sharing: Sharing::MiddleCycle,
                num_recursions: n,
                kv_mode: if kv_share { KvMode::Share } else { KvMode::RecursionWise },
                untie_attention: false,
            }),
            Some(router(RouterKind::Expert)),
        ),
        PresetArch::Token { n } => (
            padded_layers(size.base_layers, Sharing::MiddleCycle, n),
            Some(RecursionConfig {
                sharing: Sharing::MiddleCycle,
                num_recursions: n,
                kv_mode: KvMode::RecursionWise,
                untie_attention: false,
            }),
            Some(router(RouterKind::Token)),
        ),
    };
    ModelConfig {
        vocab_size: size.vocab_size,
        hidden_size: size.hidden_size,
        num_layers,
        num_heads: size.num_heads,
        num_kv_heads: size.num_kv_heads,
        head_dim: size.head_dim,
        intermediate_size: size.intermediate_size,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_seq_len: size.max_seq_len,
        tie_embeddings: true,
        init_std: 0.02,
        recursion,
        router,
    }
}

/// Final router settings of the paper: expert = linear, sigmoid, α 0.1, BCE aux loss 0.001;
/// token = linear, softmax, α 1.0, balancing loss 0.1, z-loss 1e-5.
fn router(kind: RouterKind) -> RouterConfig {
    let expert = kind == RouterKind::Expert;
    RouterConfig {
        kind,
        arch: RouterArch::Linear,
        activation: Some(if expert { RouterActivation::Sigmoid } else { RouterActivation::Softmax }),
        alpha: Some(if expert { 0.1 } else { 1.0 }),
        temperature: 1.0,
        capacities: None,
        capacity_warmup: 0,
        sampling: Sampling::AuxLoss,
        aux_coeff: 0.001,
        aux_router_lr_mult: 10.0,
        z_coeff: Some(if expert { 0.0 } else { 1e-5 }),
        random: false,
        combine: Combine::Add,
        balancing: Balancing::Loss,
        balance_coeff: 0.1,
        bias_update_rate: 0.001,
    }
}

fn steps_for(model: &ModelConfig, seq_len: usize, budget: f64, tokens_per_step: u64) -> u64 {
    let map = model.sharing_map().expect("preset models are valid");
    iso_flop_steps(forward_flops_per_token(model, &map, seq_len), budget, tokens_per_step)
}

/// The full run configuration of preset `<size>-<arch>`.
///
/// Paper-size presets: seq 2048, micro-batch 16 × grad-accum 64 (1024 sequences = 2,097,152
/// tokens per step on one device), AdamW 3e-3 / β 0.9, 0.95 / wd 0.1 / clip 1.0, WSD with a 20 %
/// linear decay, `steps` = the 16.5e18 iso-FLOP step count of [`crate::accounting`], warm-up =
/// 5 % of the 2e18 step count of the size's vanilla model (vanilla and recursive presets) or of its
/// MoR expert-choice N_r=3 model (all MoR presets) — 57 / 86 for 360M as in the released configs.
///
/// Tiny presets: seq 128, micro-batch 8, no accumulation, 300 steps, warm-up 30, builtin data.
pub fn preset_config(size: &PresetSize, arch: PresetArch) -> RunConfig {
    let model = preset_model(size, arch);
    let (seq_len, micro_batch, grad_accum, steps, warmup_steps, data) = if size.tiny {
        (128, 8, 1, 300, 30, DataConfig { train: Some("builtin".into()), ..Default::default() })
    } else {
        let (seq_len, micro_batch, grad_accum) = (2048, 16, 64);
        let tokens_per_step = (seq_len * micro_batch * grad_accum) as u64;
        let steps = steps_for(&model, seq_len, PRESET_BUDGET, tokens_per_step);
        let reference_arch =
            if arch.is_mor() { PresetArch::Expert { n: 3, kv_share: false } } else { PresetArch::Vanilla };
        let reference = preset_model(size, reference_arch);
        let warmup_ref = steps_for(&reference, seq_len, WARMUP_BUDGET, tokens_per_step);
        let warmup = (0.05 * warmup_ref as f64).round() as usize;
        (seq_len, micro_batch, grad_accum, steps as usize, warmup, DataConfig::default())
    };
    RunConfig {
        name: format!("{}-{}", size.name, arch.name()),
        model,
        train: TrainConfig {
            seq_len,
            micro_batch,
            grad_accum,
            steps,
            lr: 3e-3,
            schedule: Schedule::Wsd,
            warmup_steps,
            decay_fraction: 0.2,
            min_lr_ratio: 0.0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            seed: 0,
            checkpoint_every: 0,
            log_every: 1,
        },
        data,
    }
}

/// Every preset as `(name, config)`, sizes × architectures (110 entries).
pub fn generate_presets() -> Vec<(String, RunConfig)> {
    let mut out = Vec::new();
    for size in &PRESET_SIZES {
        for arch in PresetArch::all() {
            let cfg = preset_config(size, arch);
            out.push((cfg.name.clone(), cfg));
        }
    }
    out
}

/// Every preset file as `(file name, TOML text)`; the content of `configs/`.
pub fn generate_preset_files() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for size in &PRESET_SIZES {
        for arch in PresetArch::all() {
            let cfg = preset_config(size, arch);
            let header = format!(
                "# {} — {}.\n# Generated by `cargo run -p mor-config --example gen_presets`; do not edit by hand.\n",
                size.name,
                arch.describe()
            );
            out.push((format!("{}.toml", cfg.name), header + &render_preset(&cfg)));
        }
    }
    out
}

/// Render a preset config as compact TOML (fields the presets set; everything else is the
/// schema default). `RunConfig::from_toml_str(render_preset(c)) == c` for generated presets.
pub fn render_preset(cfg: &RunConfig) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let m = &cfg.model;
    let _ = writeln!(s, "name = {:?}\n", cfg.name);
    let _ = writeln!(s, "[model]");
    let _ = writeln!(s, "vocab_size = {}", m.vocab_size);
    let _ = writeln!(s, "hidden_size = {}", m.hidden_size);
    let _ = writeln!(s, "num_layers = {}", m.num_layers);
    let _ = writeln!(s, "num_heads = {}", m.num_heads);
    let _ = writeln!(s, "num_kv_heads = {}", m.num_kv_heads);
    let _ = writeln!(s, "head_dim = {}", m.head_dim);
    let _ = writeln!(s, "intermediate_size = {}", m.intermediate_size);
    let _ = writeln!(s, "rms_norm_eps = {:?}", m.rms_norm_eps);
    let _ = writeln!(s, "rope_theta = {:?}", m.rope_theta);
    let _ = writeln!(s, "max_seq_len = {}", m.max_seq_len);
    let _ = writeln!(s, "tie_embeddings = {}", m.tie_embeddings);
    let _ = writeln!(s, "init_std = {:?}", m.init_std);
    if let Some(rec) = &m.recursion {
        let _ = writeln!(s, "\n[model.recursion]");
        let _ = writeln!(s, "sharing = {:?}", sharing_str(rec.sharing));
        let _ = writeln!(s, "num_recursions = {}", rec.num_recursions);
        let kv = match rec.kv_mode {
            KvMode::RecursionWise => "recursion_wise",
            KvMode::Share => "share",
        };
        let _ = writeln!(s, "kv_mode = {kv:?}");
        let _ = writeln!(s, "untie_attention = {}", rec.untie_attention);
    }
    if let Some(r) = &m.router {
        let _ = writeln!(s, "\n[model.router]");
        let arch = match r.arch {
            RouterArch::Linear => "linear",
            RouterArch::Mlp => "mlp",
            RouterArch::WideMlp => "wide_mlp",
        };
        let act = match r.activation() {
            RouterActivation::Sigmoid => "sigmoid",
            RouterActivation::Tanh => "tanh",
            RouterActivation::None => "none",
            RouterActivation::Softmax => "softmax",
        };
        match r.kind {
            RouterKind::Expert => {
                let _ = writeln!(s, "kind = \"expert\"");
                let _ = writeln!(s, "arch = {arch:?}");
                let _ = writeln!(s, "activation = {act:?}");
                let _ = writeln!(s, "alpha = {:?}", r.alpha());
                let _ = writeln!(s, "sampling = \"aux_loss\"");
                let _ = writeln!(s, "aux_coeff = {:?}", r.aux_coeff);
                let _ = writeln!(s, "z_coeff = {:?}", r.z_coeff());
            }
            RouterKind::Token => {
                let _ = writeln!(s, "kind = \"token\"");
                let _ = writeln!(s, "arch = {arch:?}");
                let _ = writeln!(s, "activation = {act:?}");
                let _ = writeln!(s, "alpha = {:?}", r.alpha());
                let _ = writeln!(s, "balancing = \"loss\"");
                let _ = writeln!(s, "balance_coeff = {:?}", r.balance_coeff);
                let _ = writeln!(s, "z_coeff = {:?}", r.z_coeff());
            }
        }
    }
    let t = &cfg.train;
    let _ = writeln!(s, "\n[train]");
    let _ = writeln!(s, "seq_len = {}", t.seq_len);
    let _ = writeln!(s, "micro_batch = {}", t.micro_batch);
    let _ = writeln!(s, "grad_accum = {}", t.grad_accum);
    let _ = writeln!(s, "steps = {}", t.steps);
    let _ = writeln!(s, "lr = {:?}", t.lr);
    let _ = writeln!(s, "schedule = \"wsd\"");
    let _ = writeln!(s, "warmup_steps = {}", t.warmup_steps);
    let _ = writeln!(s, "decay_fraction = {:?}", t.decay_fraction);
    let _ = writeln!(s, "weight_decay = {:?}", t.weight_decay);
    let _ = writeln!(s, "beta1 = {:?}", t.beta1);
    let _ = writeln!(s, "beta2 = {:?}", t.beta2);
    let _ = writeln!(s, "grad_clip = {:?}", t.grad_clip);
    if let Some(train) = &cfg.data.train {
        let _ = writeln!(s, "\n[data]");
        let _ = writeln!(s, "train = {train:?}");
    }
    s
}
