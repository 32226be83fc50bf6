//! `mor params CONFIG [--json]`: unique parameter counts (MOR_SPEC 1.2, 3.2, 10.1).

use super::{si, thousands};
use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Preset name (see `mor presets`) or path to a TOML config.
    pub config: String,
    /// Print a JSON object {non_embedding, embedding, router, total}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = super::load_config(&args.config)?;
    let map = cfg.model.sharing_map().context("invalid layer layout")?;
    let c = mor_config::accounting::param_counts(&cfg.model, &map);
    if args.json {
        // {"non_embedding", "embedding", "router", "total"}, all integers.
        return super::print_json(&c);
    }
    let name = if cfg.name.is_empty() { args.config.as_str() } else { cfg.name.as_str() };
    let mut text = format!(
        "{name}: {} layer positions, {} parameter sets, {} recursion(s) of {} layer(s)\n",
        map.num_layers,
        map.num_param_sets(),
        map.num_recursions,
        map.base_depth
    );
    for (label, v) in [
        ("non-embedding", c.non_embedding),
        ("embedding", c.embedding),
        ("router", c.router),
        ("total", c.total),
    ] {
        text.push_str(&format!("  {label:<14} {:>15}  ({})\n", thousands(v), si(v as f64)));
    }
    super::print(&text)
}
