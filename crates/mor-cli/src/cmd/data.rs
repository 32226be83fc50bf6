//! `mor data`: prepare token shards, inspect them, build the built-in corpus.
//!
//!   mor data prepare -t tokenizer.json -o shards/ [--val-fraction 0.005] INPUTS...
//!   mor data inspect shards/ [--verify]
//!   mor data builtin

use anyhow::{Context, Result};
use mor_data::input::{self, TextDocs};
use mor_data::prepare::{prepare, verify_checksums, Manifest, PrepareOptions};
use mor_data::{ShardSource, TokenSource, Tokenizer};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Tokenize text / JSONL / JSON / Parquet files, folders or globs into token shards plus
    /// manifest.json. Rerun the same command to resume an interrupted run.
    Prepare {
        /// tokenizer.json or .gguf
        #[arg(short, long)]
        tokenizer: PathBuf,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
        /// JSON / Parquet field holding the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// How plain-text files split into documents: file, line or paragraph.
        #[arg(long, default_value = "file")]
        text_docs: TextDocs,
        /// Fraction of documents held out for validation (chosen by a seeded hash).
        #[arg(long, default_value_t = 0.0)]
        val_fraction: f64,
        /// Also hold out the first N documents.
        #[arg(long, default_value_t = 0)]
        val_docs: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Tokens per train shard.
        #[arg(long, default_value_t = 50_000_000)]
        shard_tokens: u64,
        /// Delete what the output folder holds and start over.
        #[arg(long)]
        force: bool,
        #[arg(short, long)]
        quiet: bool,
        #[arg(required = true)]
        inputs: Vec<String>,
    },
    /// Summarise a shard folder; --verify recomputes the checksums.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        verify: bool,
        /// Decode the first N tokens of the train split.
        #[arg(long, default_value_t = 0)]
        show: usize,
    },
    /// Build (or find in the cache) the built-in corpus, tokenizer and shards; print their paths.
    Builtin {
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// Do not try npm: use the generated corpus.
        #[arg(long)]
        offline: bool,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.cmd {
        Cmd::Prepare {
            tokenizer, output, text_field, text_docs, val_fraction, val_docs, seed,
            shard_tokens, force, quiet, inputs,
        } => {
            let tok = Tokenizer::from_path(&tokenizer)?;
            let files = input::discover(&inputs)?;
            let opts = PrepareOptions {
                text_field, text_docs, val_fraction, val_docs, seed, shard_tokens, force,
                progress: !quiet,
                ..Default::default()
            };
            let m = prepare(&files, &tok, &output, &opts)
                .with_context(|| format!("preparing {}", output.display()))?;
            summary(&output, &m)
        }
        Cmd::Inspect { dir, verify, show } => {
            let m = Manifest::load(&dir)?;
            if verify {
                verify_checksums(&dir, &m)?;
                eprintln!("all {} shard checksums match", m.train.shards.len() + m.val.shards.len());
            }
            summary(&dir, &m)?;
            if show > 0 {
                let tok = Tokenizer::from_file(dir.join("tokenizer.json"))?;
                let src = ShardSource::open(&dir, "train", &Default::default())?;
                let mut ids = vec![0u32; show.min(src.total_tokens() as usize)];
                src.read_tokens(0, &mut ids);
                super::print(&format!("{}\n", tok.decode(&ids)?))?;
            }
            Ok(())
        }
        Cmd::Builtin { vocab_size, offline } => {
            let opts = mor_data::builtin::BuiltinOptions {
                vocab_size,
                use_npm: !offline && mor_data::builtin::BuiltinOptions::default().use_npm,
                ..Default::default()
            };
            let b = mor_data::builtin::ensure(&opts)?;
            let src = ShardSource::open(&b.shards, "train", &Default::default())?;
            let _ = src.vocab_size();
            super::print_json(&b)
        }
    }
}

fn summary(dir: &std::path::Path, m: &Manifest) -> Result<()> {
    super::print_json(&serde_json::json!({
        "folder": dir.display().to_string(),
        "complete": m.complete,
        "dtype": m.dtype,
        "vocab_size": m.vocab_size,
        "eot_id": m.eot_id,
        "tokenizer_hash": m.tokenizer_hash,
        "inputs": m.inputs.len(),
        "train": {"tokens": m.train.tokens, "docs": m.train.docs, "shards": m.train.shards.len()},
        "val": {"tokens": m.val.tokens, "docs": m.val.docs, "shards": m.val.shards.len()},
        "empty_docs_skipped": m.cursor.empty_docs,
        "text_bytes": m.cursor.text_bytes,
    }))
}
