//! The TOML schema. A run file has three tables: `[model]` (architecture), `[train]`
//! (optimisation and schedule) and `[data]` (where tokens come from). Unknown keys are errors,
//! and every validation error names the offending field by its dotted path.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// A configuration error that names the field at fault (`model.router.alpha: must be > 0`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("cannot parse config {source_name}: {message}")]
    Parse { source_name: String, message: String },
    #[error("cannot read config {path}: {message}")]
    Io { path: String, message: String },
    /// `mor_config::load` got a name that is neither a preset nor an existing file.
    #[error("{}", unknown_preset_message(name, suggestions))]
    UnknownPreset { name: String, suggestions: Vec<String> },
}

fn unknown_preset_message(name: &str, suggestions: &[String]) -> String {
    let mut msg = format!("unknown preset `{name}` (and no such file)");
    if !suggestions.is_empty() {
        msg.push_str(&format!("; did you mean {}?", suggestions.join(", ")));
    } else {
        msg.push('.');
    }
    msg.push_str(" Run `mor presets` to list the presets, or pass a path to a TOML file.");
    msg
}

/// Turn a TOML (syntax or schema) error into one that names the dotted field path, e.g.
/// `model.router.foo: unknown field `foo`, expected one of ... (line 31, column 1)`.
fn parse_error(text: &str, source_name: &str, err: &toml::de::Error) -> ConfigError {
    let message = match err.span() {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            let what = err.message().trim_end();
            match field_path_at(text, span.start) {
                Some(path) => format!("{path}: {what} (line {line}, column {column})"),
                None => format!("{what} (line {line}, column {column})"),
            }
        }
        None => err.to_string().trim_end().to_string(),
    };
    ConfigError::Parse { source_name: source_name.to_string(), message }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The dotted path of the key (or table header) on the line containing `offset`.
fn field_path_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let header = |line: &str| -> Option<String> {
        let l = line.split('#').next()?.trim();
        let inner = l.strip_prefix("[[").and_then(|l| l.strip_suffix("]]"))
            .or_else(|| l.strip_prefix('[').and_then(|l| l.strip_suffix(']')))?;
        Some(clean_key(inner))
    };
    let line = &text[line_start..line_end];
    if let Some(h) = header(line) {
        return Some(h);
    }
    let table = text[..line_start].lines().rev().find_map(header);
    let key = line.split_once('=').map(|(k, _)| clean_key(k)).filter(|k| !k.is_empty());
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

fn clean_key(key: &str) -> String {
    key.split('.').map(|p| p.trim().trim_matches('"').trim_matches('\'')).collect::<Vec<_>>().join(".")
}

pub fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.to_string(), message: message.into() }
}

/// Parameter-sharing strategy across the unrolled layer positions (MOR_SPEC 2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    Cycle,
    Sequence,
    MiddleCycle,
    MiddleSequence,
}

impl Sharing {
    /// Middle variants keep the first and last layer positions unique.
    pub fn is_middle(self) -> bool {
        matches!(self, Sharing::MiddleCycle | Sharing::MiddleSequence)
    }
}

/// How keys/values are formed at recursions after the first (MOR_SPEC 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KvMode {
    /// Each recursion attends only among the tokens active at that recursion, with its own K/V.
    #[default]
    RecursionWise,
    /// Later recursions attend to the recursion-1 keys/values of every prefix token.
    Share,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterKind {
    /// One router per recursion step picks the top-k tokens of each sequence (MOR_SPEC 3).
    Expert,
    /// One router on the recursion-1 input assigns each token a depth (MOR_SPEC 4).
    Token,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterArch {
    /// `Linear(d -> out)`.
    Linear,
    /// `Linear(d -> 2d) -> GELU -> Linear(2d -> out)`.
    Mlp,
    /// Paper: hidden 4x wider than MLP. (The released code makes it identical to `Mlp`.)
    WideMlp,
}

impl RouterArch {
    /// Hidden width of the MLP routers; `None` for linear.
    pub fn hidden(self, d: usize) -> Option<usize> {
        match self {
            RouterArch::Linear => None,
            RouterArch::Mlp => Some(2 * d),
            RouterArch::WideMlp => Some(4 * d),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterActivation {
    Sigmoid,
    Tanh,
    None,
    /// Token-choice only: softmax over depths.
    Softmax,
}

/// How expert-choice routers are taught to make causal decisions (MOR_SPEC 3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// BCE on the main router's logits (paper's final choice).
    AuxLoss,
    /// A separate stop-gradient router trained with its own optimizer.
    AuxRouter,
    /// No causal auxiliary objective.
    None,
}

/// How token-choice depths are balanced (MOR_SPEC 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancing {
    Loss,
    LossFree,
    None,
}

/// How a recursion step's output is combined into the residual stream (expert-choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// `h[S] += g * B(h[S])` (paper Eq. 2.1 and the released code).
    #[default]
    Add,
    /// Test-only: `h[S] = B(h[S])`; with capacity 1 everywhere this is the recursive baseline.
    Replace,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecursionConfig {
    pub sharing: Sharing,
    pub num_recursions: usize,
    #[serde(default)]
    pub kv_mode: KvMode,
    /// Released expert-choice code re-creates attention per recursion step (MOR_SPEC 10.1):
    /// q/k/v/o are then per recursion while MLP and norms stay shared.
    #[serde(default)]
    pub untie_attention: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub kind: RouterKind,
    #[serde(default = "default_arch")]
    pub arch: RouterArch,
    /// Default: sigmoid for expert, softmax for token.
    #[serde(default)]
    pub activation: Option<RouterActivation>,
    /// Output scale. Default: 0.1 for expert / sigmoid token, 1.0 for softmax token.
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default = "one")]
    pub temperature: f64,
    /// Expert-choice capacity per step as a fraction of the sequence length.
    /// Default `(N_r - r + 1) / N_r`.
    #[serde(default)]
    pub capacities: Option<Vec<f64>>,
    /// Expert-choice: cosine capacity warm-up over this many forward calls (0 = off).
    #[serde(default)]
    pub capacity_warmup: usize,
    #[serde(default = "default_sampling")]
    pub sampling: Sampling,
    /// Coefficient of the expert BCE aux loss, relative to the mean token cross-entropy.
    #[serde(default = "default_aux_coeff")]
    pub aux_coeff: f64,
    /// Learning-rate multiplier of the aux router's own optimizer.
    #[serde(default = "default_aux_router_lr_mult")]
    pub aux_router_lr_mult: f64,
    /// Router z-loss coefficient (0 = off). Default: 0 for expert, 1e-5 for token.
    #[serde(default)]
    pub z_coeff: Option<f64>,
    /// Random-router baseline: scores are `alpha * U(0,1)`, the router has no parameters.
    #[serde(default)]
    pub random: bool,
    #[serde(default)]
    pub combine: Combine,
    /// Token-choice balancing.
    #[serde(default = "default_balancing")]
    pub balancing: Balancing,
    #[serde(default = "default_balance_coeff")]
    pub balance_coeff: f64,
    /// Loss-free bias update rate `u`.
    #[serde(default = "default_bias_rate")]
    pub bias_update_rate: f64,
}

fn default_arch() -> RouterArch {
    RouterArch::Linear
}
fn one() -> f64 {
    1.0
}
fn default_sampling() -> Sampling {
    Sampling::AuxLoss
}
fn default_aux_coeff() -> f64 {
    0.001
}
fn default_aux_router_lr_mult() -> f64 {
    10.0
}
fn default_balancing() -> Balancing {
    Balancing::Loss
}
fn default_balance_coeff() -> f64 {
    0.1
}
fn default_bias_rate() -> f64 {
    0.001
}

impl RouterConfig {
    pub fn activation(&self) -> RouterActivation {
        self.activation.unwrap_or(match self.kind {
            RouterKind::Expert => RouterActivation::Sigmoid,
            RouterKind::Token => RouterActivation::Softmax,
        })
    }
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(match (self.kind, self.activation()) {
            (RouterKind::Token, RouterActivation::Softmax) => 1.0,
            _ => 0.1,
        })
    }
    pub fn z_coeff(&self) -> f64 {
        self.z_coeff.unwrap_or(match self.kind {
            RouterKind::Expert => 0.0,
            RouterKind::Token => 1e-5,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Unrolled layer positions (e.g. 32 for 360M MoR N_r=3: 1 + 10x3 + 1).
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_seq")]
    pub max_seq_len: usize,
    #[serde(default = "yes")]
    pub tie_embeddings: bool,
    #[serde(default = "default_init_std")]
    pub init_std: f64,
    /// Absent: vanilla (every position has its own parameters).
    #[serde(default)]
    pub recursion: Option<RecursionConfig>,
    /// Absent: plain recursive transformer (every token takes every recursion).
    #[serde(default)]
    pub router: Option<RouterConfig>,
}

fn default_head_dim() -> usize {
    64
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_seq() -> usize {
    2048
}
fn yes() -> bool {
    true
}
fn default_init_std() -> f64 {
    0.02
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Warmup-stable-decay ("trapezoid"), linear decay over the last `decay_fraction` of steps.
    Wsd,
    Cosine,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub seq_len: usize,
    pub micro_batch: usize,
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    pub steps: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: usize,
    /// WSD: fraction of total steps used for the linear cool-down.
    #[serde(default = "default_decay_fraction")]
    pub decay_fraction: f64,
    /// Cosine: final LR as a fraction of the peak.
    #[serde(default)]
    pub min_lr_ratio: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_adam_eps")]
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value (0 = off).
    #[serde(default = "one")]
    pub grad_clip: f64,
    #[serde(default)]
    pub seed: u64,
    /// Save a checkpoint every this many optimizer steps (0 = only at the end).
    #[serde(default)]
    pub checkpoint_every: usize,
    #[serde(default = "default_log_every")]
    pub log_every: usize,
}

fn one_usize() -> usize {
    1
}
fn default_lr() -> f64 {
    3e-3
}
fn default_schedule() -> Schedule {
    Schedule::Wsd
}
fn default_decay_fraction() -> f64 {
    0.2
}
fn default_wd() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_adam_eps() -> f64 {
    1e-8
}
fn default_log_every() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Token shard folder (from `mor data prepare`), or "builtin" for the bundled default corpus,
    /// or "synthetic" for a deterministic generated stream (tests).
    #[serde(default)]
    pub train: Option<String>,
    #[serde(default)]
    pub val: Option<String>,
    /// Mask attention at document boundaries (the released code lets attention cross them).
    #[serde(default)]
    pub document_mask: bool,
}

/// A whole run file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub name: String,
    pub model: ModelConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub data: DataConfig,
}

impl RunConfig {
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let cfg: RunConfig = toml::from_str(text).map_err(|e| parse_error(text, source_name, &e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_path(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.train.validate(&self.model)
    }
}

impl ModelConfig {
    pub fn num_recursions(&self) -> usize {
        self.recursion.as_ref().map_or(1, |r| r.num_recursions)
    }

    pub fn kv_mode(&self) -> KvMode {
        self.recursion.as_ref().map_or(KvMode::RecursionWise, |r| r.kv_mode)
    }

    /// The sharing map of this model: [`SharingMap::vanilla`] without a `[model.recursion]` table.
    pub fn sharing_map(&self) -> Result<crate::sharing::SharingMap, ConfigError> {
        match &self.recursion {
            None => Ok(crate::sharing::SharingMap::vanilla(self.num_layers)),
            Some(rec) => crate::sharing::SharingMap::new(rec.sharing, self.num_layers, rec.num_recursions),
        }
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("model.vocab_size", self.vocab_size),
            ("model.hidden_size", self.hidden_size),
            ("model.num_layers", self.num_layers),
            ("model.num_heads", self.num_heads),
            ("model.num_kv_heads", self.num_kv_heads),
            ("model.head_dim", self.head_dim),
            ("model.intermediate_size", self.intermediate_size),
            ("model.max_seq_len", self.max_seq_len),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be > 0"));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(invalid(
                "model.num_kv_heads",
                format!("must divide model.num_heads ({})", self.num_heads),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(invalid("model.head_dim", "must be even (RoPE rotates halves)"));
        }
        if !(self.rms_norm_eps > 0.0) {
            return Err(invalid("model.rms_norm_eps", "must be > 0"));
        }
        if !(self.rope_theta > 0.0) {
            return Err(invalid("model.rope_theta", "must be > 0"));
        }
        if !(self.init_std > 0.0) {
            return Err(invalid("model.init_std", "must be > 0"));
        }
        if let Some(rec) = &self.recursion {
            crate::sharing::SharingMap::new(rec.sharing, self.num_layers, rec.num_recursions)?;
            if rec.kv_mode == KvMode::Share && !matches!(rec.sharing, Sharing::Cycle | Sharing::MiddleCycle) {
                return Err(invalid(
                    "model.recursion.kv_mode",
                    "KV sharing needs cycle or middle_cycle sharing (the recursion-1 block is reused by later steps)",
                ));
            }
            if rec.untie_attention && self.router.as_ref().map(|r| r.kind) != Some(RouterKind::Expert) {
                return Err(invalid(
                    "model.recursion.untie_attention",
                    "only the expert-choice router supports untied attention",
                ));
            }
        }
        if let Some(router) = &self.router {
            let Some(rec) = &self.recursion else {
                return Err(invalid("model.router", "a router needs a [model.recursion] table"));
            };
            if !matches!(rec.sharing, Sharing::Cycle | Sharing::MiddleCycle) {
                return Err(invalid(
                    "model.recursion.sharing",
                    "MoR routers need cycle or middle_cycle sharing (recursion blocks must be contiguous)",
                ));
            }
            router.validate(rec.num_recursions)?;
        }
        Ok(())
    }
}

impl RouterConfig {
    pub fn validate(&self, num_recursions: usize) -> Result<(), ConfigError> {
        let act = self.activation();
        match self.kind {
            RouterKind::Expert if act == RouterActivation::Softmax => {
                return Err(invalid(
                    "model.router.activation",
                    "softmax is for token-choice; expert-choice uses sigmoid, tanh or none",
                ))
            }
            RouterKind::Token if !matches!(act, RouterActivation::Softmax | RouterActivation::Sigmoid) => {
                return Err(invalid("model.router.activation", "token-choice uses softmax or sigmoid"))
            }
            _ => {}
        }
        if !(self.alpha() > 0.0) {
            return Err(invalid("model.router.alpha", "must be > 0"));
        }
        if !(self.temperature > 0.0) {
            return Err(invalid("model.router.temperature", "must be > 0"));
        }
        for (field, v) in [
            ("model.router.aux_coeff", self.aux_coeff),
            ("model.router.balance_coeff", self.balance_coeff),
            ("model.router.bias_update_rate", self.bias_update_rate),
            ("model.router.z_coeff", self.z_coeff()),
        ] {
            if !(v >= 0.0) || !v.is_finite() {
                return Err(invalid(field, "must be a finite number >= 0"));
            }
        }
        if !(self.aux_router_lr_mult > 0.0) {
            return Err(invalid("model.router.aux_router_lr_mult", "must be > 0"));
        }
        if let Some(caps) = &self.capacities {
            if caps.len() != num_recursions {
                return Err(invalid(
                    "model.router.capacities",
                    format!("needs one entry per recursion ({num_recursions}), got {}", caps.len()),
                ));
            }
            for (i, c) in caps.iter().enumerate() {
                if !(*c > 0.0 && *c <= 1.0) {
                    return Err(invalid("model.router.capacities", format!("entry {i} must be in (0, 1]")));
                }
                if i > 0 && *c > caps[i - 1] {
                    return Err(invalid("model.router.capacities", "must be non-increasing"));
                }
            }
        }
        if self.kind == RouterKind::Token && self.combine != Combine::Add {
            return Err(invalid("model.router.combine", "only expert-choice supports 'replace'"));
        }
        Ok(())
    }

    /// Capacity fraction of step `r` (0-based), before warm-up.
    pub fn capacity(&self, r: usize, num_recursions: usize) -> f64 {
        match &self.capacities {
            Some(c) => c[r],
            None => (num_recursions - r) as f64 / num_recursions as f64,
        }
    }
}

/// Tokens selected per sequence at an expert-choice step: `max(1, floor(c * L))` (MOR_SPEC 3.4).
pub fn capacity_tokens(capacity: f64, seq_len: usize) -> usize {
    // A small tolerance so that e.g. 2/3 * 2048 = 1365.33 and 1.0 * L are not hurt by rounding.
    ((capacity * seq_len as f64 + 1e-9).floor() as usize).clamp(1, seq_len)
}

/// Cosine capacity warm-up: starts at 1 and decays to `c` over `warmup` forward calls.
pub fn warmed_capacity(c: f64, call: usize, warmup: usize) -> f64 {
    if warmup == 0 {
        return c;
    }
    let t = (call as f64 / warmup as f64).min(1.0);
    c + (1.0 - c) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

impl TrainConfig {
    pub fn validate(&self, model: &ModelConfig) -> Result<(), ConfigError> {
        for (field, v) in [
            ("train.seq_len", self.seq_len),
            ("train.micro_batch", self.micro_batch),
            ("train.grad_accum", self.grad_accum),
            ("train.steps", self.steps),
            ("train.log_every", self.log_every),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be > 0"));
            }
        }
        if self.seq_len > model.max_seq_len {
            return Err(invalid(
                "train.seq_len",
                format!("exceeds model.max_seq_len ({})", model.max_seq_len),
            ));
        }
        if !(self.lr > 0.0) || !self.lr.is_finite() {
            return Err(invalid("train.lr", "must be a finite number > 0"));
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return Err(invalid("train.beta1", "must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return Err(invalid("train.beta2", "must be in [0, 1)"));
        }
        if !(self.adam_eps > 0.0) {
            return Err(invalid("train.adam_eps", "must be > 0"));
        }
        if !(self.weight_decay >= 0.0) {
            return Err(invalid("train.weight_decay", "must be >= 0"));
        }
        if !(self.grad_clip >= 0.0) {
            return Err(invalid("train.grad_clip", "must be >= 0"));
        }
        if !(0.0..=1.0).contains(&self.decay_fraction) {
            return Err(invalid("train.decay_fraction", "must be in [0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(invalid("train.min_lr_ratio", "must be in [0, 1]"));
        }
        if self.warmup_steps > self.steps {
            return Err(invalid("train.warmup_steps", "must not exceed train.steps"));
        }
        Ok(())
    }
}
