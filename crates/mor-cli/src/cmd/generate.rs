//! `mor generate --model PATH --prompt TEXT [--max-tokens N] [--greedy]`: print the
//! continuation of a prompt (only the continuation, on stdout). PATH is a mor run or checkpoint
//! directory, a GGUF file, a Hugging Face Llama folder or a mor export; the tokenizer comes from
//! the GGUF metadata or `tokenizer.json` next to the weights. Generation stops at the model's
//! end-of-sequence token (unless `--ignore-eos`) or after N tokens.

use anyhow::{Context, Result};
use mor_engine::Cpu;
use mor_model::Sampler;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: mor run/checkpoint directory, .gguf file, Hugging Face folder or mor export.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Greedy decoding (argmax); otherwise temperature / top-p sampling.
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

pub fn run(args: Args) -> Result<()> {
    let backend = Cpu::<f32>::new();
    let mut loaded = mor_interop::load::load_any(&backend, &args.model)?;
    let tok = loaded.tokenizer.take().with_context(|| {
        format!("{}: no tokenizer found (GGUF metadata, or tokenizer.json next to the weights)", args.model.display())
    })?;
    let ids = tok.encode(&args.prompt)?;
    anyhow::ensure!(!ids.is_empty(), "the prompt encodes to no tokens");
    let sampler = if args.greedy {
        Sampler::Greedy
    } else {
        Sampler::Sample { temperature: args.temperature, top_p: args.top_p, seed: args.seed }
    };
    let stop = if args.ignore_eos { None } else { loaded.eos };
    let g = loaded.model.generate(&backend, &ids, args.max_tokens, sampler, stop, |_| {})?;
    let mut out = g.ids;
    if stop.is_some() && out.last() == stop.as_ref() {
        out.pop();
    }
    super::print(&format!("{}\n", tok.decode(&out)?))
}
