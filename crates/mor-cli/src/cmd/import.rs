//! `mor import --model SRC -o DIR [--recursions N --sharing S --init I --router R]`: read Llama
//! weights (GGUF or Hugging Face folder) and write a mor checkpoint directory (model.safetensors,
//! state.json, config.toml, tokenizer.json) that every `--model` option accepts. With
//! `--recursions`, the vanilla layers initialise a recursive / MoR model for up-training
//! (MOR_SPEC 2.1, paper Table 12): `--init stepwise|average|lower|upper`; routers are freshly
//! initialised (`--seed`).

use anyhow::{bail, Result};
use mor_config::{KvMode, RouterConfig, RouterKind, Sharing};
use mor_engine::Cpu;
use mor_interop::init::{recursive_from_vanilla, InitStrategy, RecursiveSpec};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source weights: a Llama .gguf file or a Hugging Face folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Output checkpoint directory.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Number of recursions (absent: keep the vanilla model).
    #[arg(long)]
    pub recursions: Option<usize>,
    /// Sharing strategy: cycle, sequence, middle_cycle, middle_sequence.
    #[arg(long, default_value = "middle_cycle")]
    pub sharing: String,
    /// Initialisation of the shared layers: stepwise, average, lower, upper.
    #[arg(long, default_value = "stepwise")]
    pub init: String,
    /// Router: none (recursive transformer), expert, token.
    #[arg(long, default_value = "none")]
    pub router: String,
    /// KV mode: recursion_wise or share.
    #[arg(long, default_value = "recursion_wise")]
    pub kv_mode: String,
    /// Seed of the fresh router weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run name stored in config.toml (default: the output folder's name).
    #[arg(long)]
    pub name: Option<String>,
}

fn parse_sharing(s: &str) -> Result<Sharing> {
    Ok(match s {
        "cycle" => Sharing::Cycle,
        "sequence" => Sharing::Sequence,
        "middle_cycle" => Sharing::MiddleCycle,
        "middle_sequence" => Sharing::MiddleSequence,
        _ => bail!("--sharing {s}: expected cycle, sequence, middle_cycle or middle_sequence"),
    })
}

fn router_config(kind: RouterKind) -> RouterConfig {
    // Defaults of the config schema (MOR_SPEC 3/4) via serde, so they stay in one place.
    let kind = match kind {
        RouterKind::Expert => "expert",
        RouterKind::Token => "token",
    };
    serde_json::from_value(serde_json::json!({ "kind": kind })).expect("router defaults")
}

pub fn run(args: Args) -> Result<()> {
    let backend = Cpu::<f32>::new();
    let imp = mor_interop::load::read_foreign(&args.model)?;
    let name = args.name.clone().unwrap_or_else(|| args.out.file_name().map_or("imported".into(), |n| n.to_string_lossy().into_owned()));
    let (cfg, tensors, what) = match args.recursions {
        None => (imp.config.clone(), imp.tensors, "vanilla".to_string()),
        Some(n) => {
            let router = match args.router.as_str() {
                "none" => None,
                "expert" => Some(router_config(RouterKind::Expert)),
                "token" => Some(router_config(RouterKind::Token)),
                r => bail!("--router {r}: expected none, expert or token"),
            };
            let kv_mode = match args.kv_mode.as_str() {
                "recursion_wise" => KvMode::RecursionWise,
                "share" => KvMode::Share,
                k => bail!("--kv-mode {k}: expected recursion_wise or share"),
            };
            let spec = RecursiveSpec {
                sharing: parse_sharing(&args.sharing)?,
                num_recursions: n,
                init: args.init.parse::<InitStrategy>()?,
                kv_mode,
                untie_attention: false,
                router,
            };
            let (cfg, t) = recursive_from_vanilla(&imp.config, &imp.tensors, &spec)?;
            let what = format!(
                "{} layers ({} sharing, {n} recursions, {} init, router {}) from {} source layers",
                cfg.num_layers, args.sharing, args.init, args.router, imp.config.num_layers
            );
            (cfg, t, what)
        }
    };
    let model = mor_interop::build_model(&backend, cfg, &tensors, mor_interop::FRESH_PREFIXES, args.seed)?;
    mor_interop::load::save_mor_checkpoint(&backend, &model, imp.tokenizer.as_ref(), &name, &args.out)?;
    eprintln!("imported {} as a {what} mor model into {}", imp.source, args.out.display());
    Ok(())
}
