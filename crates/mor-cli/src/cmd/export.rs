//! `mor export --model PATH -o DIR`: write a model as a Hugging Face folder. Vanilla models
//! become `LlamaForCausalLM` (config.json + model.safetensors + tokenizer.json) that
//! `transformers` loads; recursive / MoR models use the documented mor layout (see
//! `mor_interop::export`), which `mor --model DIR` loads back.

use anyhow::Result;
use mor_engine::Cpu;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: mor run/checkpoint directory, .gguf file, Hugging Face folder or mor export.
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Plain recursive models (no router): write the unrolled LlamaForCausalLM (each layer
    /// position gets a copy of its shared parameters) instead of the mor layout.
    #[arg(long)]
    pub unroll: bool,
}

pub fn run(args: Args) -> Result<()> {
    let backend = Cpu::<f32>::new();
    let mut loaded = mor_interop::load::load_any(&backend, &args.model)?;
    if args.unroll && loaded.model.cfg.recursion.is_some() {
        loaded.model = mor_interop::export::unroll(&backend, &loaded.model)?;
    }
    let arch = mor_interop::export::export(&backend, &loaded.model, loaded.tokenizer.as_ref(), loaded.eos, &args.out)?;
    eprintln!("exported {} as {arch} to {}", loaded.source, args.out.display());
    Ok(())
}
