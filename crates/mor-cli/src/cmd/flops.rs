//! `mor flops CONFIG [--budget F] [--tokens-per-step N] [--json]`: forward FLOPs per token and
//! the iso-FLOP step count (MOR_SPEC 7.3).

use super::{si, thousands};
use anyhow::{ensure, Context};
use mor_config::accounting;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Preset name (see `mor presets`) or path to a TOML config.
    pub config: String,
    /// Forward-FLOP budget (the paper's iso-FLOP budgets are forward-only, e.g. 16.5e18).
    #[arg(long, default_value_t = 16.5e18)]
    pub budget: f64,
    /// Tokens per optimiser step [default: train.micro_batch × grad_accum × seq_len].
    #[arg(long)]
    pub tokens_per_step: Option<u64>,
    /// Sequence length L of the attention term [default: train.seq_len].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Print a JSON object {flops_per_token, steps, tokens, ...}.
    #[arg(long)]
    pub json: bool,
}

/// JSON output of `mor flops --json`.
#[derive(serde::Serialize)]
struct FlopsJson {
    /// Forward FLOPs per token (MOR_SPEC 7.3).
    flops_per_token: f64,
    steps: u64,
    tokens: u64,
    budget: f64,
    tokens_per_step: u64,
    seq_len: usize,
    /// 3 × (forward + LM head), for MFU.
    train_flops_per_token: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = super::load_config(&args.config)?;
    let map = cfg.model.sharing_map().context("invalid layer layout")?;
    ensure!(args.budget.is_finite() && args.budget > 0.0, "--budget must be a finite number > 0");
    let t = &cfg.train;
    let tokens_per_step = args.tokens_per_step.unwrap_or((t.micro_batch * t.grad_accum * t.seq_len) as u64);
    ensure!(tokens_per_step > 0, "--tokens-per-step must be > 0");
    let seq_len = args.seq_len.unwrap_or(t.seq_len);
    ensure!(seq_len > 0, "--seq-len must be > 0");
    let iso = accounting::iso_flop(&cfg.model, &map, seq_len, args.budget, tokens_per_step);
    let train = accounting::train_flops_per_token(&cfg.model, &map, seq_len);
    if args.json {
        return super::print_json(&FlopsJson {
            flops_per_token: iso.flops_per_token,
            steps: iso.steps,
            tokens: iso.tokens,
            budget: args.budget,
            tokens_per_step,
            seq_len,
            train_flops_per_token: train,
        });
    }
    let name = if cfg.name.is_empty() { args.config.as_str() } else { cfg.name.as_str() };
    let text = format!(
        "{name} (L = {seq_len})\n  \
         flops_per_token  {} (forward, LM head excluded)\n  \
         budget           {:e} FLOPs\n  \
         tokens_per_step  {}\n  \
         steps            {}\n  \
         tokens           {} ({})\n  \
         train FLOPs/tok  {} (3 x forward incl. LM head, for MFU)\n",
        si(iso.flops_per_token),
        args.budget,
        thousands(tokens_per_step),
        thousands(iso.steps),
        thousands(iso.tokens),
        si(iso.tokens as f64),
        si(train),
    );
    super::print(&text)
}
