//! `mor`: train, inspect and serve Mixture-of-Recursions models.
//!
//! Adding a subcommand: create `src/cmd/<name>.rs` with a clap `Args` struct and
//! `pub fn run(args: Args) -> anyhow::Result<()>`, declare it in `src/cmd/mod.rs`, and add one
//! variant to [`Command`] plus one arm in [`run`]. Errors returned from `run` are printed as
//! `error: <message>: <cause>: …` and the process exits with code 2.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "mor",
    version,
    about = "Mixture-of-Recursions language models: configs, accounting, training and serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the built-in config presets, one name per line.
    Presets(cmd::presets::Args),
    /// Unique parameter counts of a config (preset name or TOML path).
    Params(cmd::params::Args),
    /// Forward FLOPs per token and the iso-FLOP step count of a config.
    Flops(cmd::flops::Args),
    /// Train a model (default: a tiny MoR on the built-in corpus, on CPU).
    Train(cmd::train::Args),
    /// Tokenizers: from a GGUF file, trained on local text, encode/decode.
    Tokenizer(cmd::tokenizer::Args),
    /// Training data: prepare token shards from text/JSONL/Parquet, inspect, built-in corpus.
    Data(cmd::data::Args),
    /// Measure training throughput (tokens/s, MFU, peak memory) on CPU or CUDA.
    Bench(cmd::bench::Args),
    /// Continue a prompt (prints only the continuation).
    Generate(cmd::generate::Args),
    /// Evaluate: validation NLL, log-likelihood tasks (LAMBADA, HellaSwag, ...).
    Eval(cmd::eval::Args),
    /// Write a model as a Hugging Face folder (LlamaForCausalLM for vanilla models).
    Export(cmd::export::Args),
    /// Import Llama weights (GGUF / Hugging Face) as a mor checkpoint, optionally as a
    /// recursive / MoR model initialised from them.
    #[command(alias = "init-from")]
    Import(cmd::import::Args),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Presets(args) => cmd::presets::run(args),
        Command::Params(args) => cmd::params::run(args),
        Command::Flops(args) => cmd::flops::run(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Tokenizer(args) => cmd::tokenizer::run(args),
        Command::Data(args) => cmd::data::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Import(args) => cmd::import::run(args),
    }
}

/// Exit code for every error reported by a subcommand (clap's usage errors also use 2).
const ERROR_EXIT: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help / --version print and exit 0; usage errors print and exit 2.
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cmd::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(ERROR_EXIT)
        }
    }
}
