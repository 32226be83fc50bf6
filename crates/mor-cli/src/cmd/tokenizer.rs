//! `mor tokenizer`: build, train and try tokenizers.
//!
//!   mor tokenizer from-gguf MODEL.gguf -o tokenizer.json
//!   mor tokenizer train --vocab-size 4096 -o tokenizer.json FILES/FOLDERS/GLOBS...
//!   mor tokenizer encode -t tokenizer.json "some text"      (ids, one line)
//!   mor tokenizer decode -t tokenizer.json 19556 905 17
//!   mor tokenizer info tokenizer.json

use anyhow::{bail, Context, Result};
use mor_data::input::{self, ReadOptions, TextDocs};
use mor_data::{Tokenizer, TrainOptions};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Write the tokenizer stored in a GGUF file's metadata as a tokenizer.json.
    FromGguf {
        /// A .gguf file (the extension selects the GGUF reader).
        gguf: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Train a byte-level BPE (GPT-2 bytes, digits split, `<|endoftext|>` = 0) on local text:
    /// plain text, JSONL, JSON or Parquet files, folders or globs.
    Train {
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        #[arg(short, long)]
        output: PathBuf,
        /// JSON / Parquet field holding the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// How plain-text files split into documents: file, line or paragraph.
        #[arg(long, default_value = "file")]
        text_docs: TextDocs,
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// Train on at most this many bytes of text (the first ones, in input order).
        #[arg(long)]
        max_bytes: Option<u64>,
        #[arg(required = true)]
        inputs: Vec<String>,
    },
    /// Print the ids of TEXT (special-token strings stay text unless --special).
    Encode {
        /// tokenizer.json or .gguf
        #[arg(short, long)]
        tokenizer: PathBuf,
        #[arg(long)]
        special: bool,
        text: String,
    },
    /// Print the text of IDS.
    Decode {
        #[arg(short, long)]
        tokenizer: PathBuf,
        ids: Vec<u32>,
    },
    /// Vocabulary size, end-of-text id, hash.
    Info { tokenizer: PathBuf },
}

pub fn run(args: Args) -> Result<()> {
    match args.cmd {
        Cmd::FromGguf { gguf, output } => {
            let tok = Tokenizer::from_path(&gguf)?;
            tok.save(&output)?;
            eprintln!(
                "wrote {} (vocab {}, end-of-text id {:?})",
                output.display(),
                tok.vocab_size(),
                tok.eot_id()
            );
            Ok(())
        }
        Cmd::Train { vocab_size, output, text_field, text_docs, min_frequency, max_bytes, inputs } => {
            let files = input::discover(&inputs)?;
            let t0 = std::time::Instant::now();
            let mut it = input::PieceIter::new(&files, ReadOptions { text_field, text_docs });
            it.max_bytes = max_bytes;
            let opts = TrainOptions { vocab_size, min_frequency, ..Default::default() };
            let tok = Tokenizer::train_bpe((&mut it).map(|p| p.text), &opts);
            if let Some(e) = it.error.take() {
                return Err(e).context("reading the training text");
            }
            let tok = tok?;
            tok.save(&output)?;
            eprintln!(
                "trained a {}-token byte-level BPE on {:.1} MB of text from {} files in {:.1}s -> {}",
                tok.vocab_size(),
                it.bytes as f64 / 1e6,
                files.len(),
                t0.elapsed().as_secs_f64(),
                output.display()
            );
            Ok(())
        }
        Cmd::Encode { tokenizer, special, text } => {
            let tok = Tokenizer::from_path(&tokenizer)?;
            let ids = if special { tok.encode_with_special(&text)? } else { tok.encode(&text)? };
            let s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            super::print(&format!("{}\n", s.join(" ")))
        }
        Cmd::Decode { tokenizer, ids } => {
            let tok = Tokenizer::from_path(&tokenizer)?;
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
                bail!("id {bad} is outside the vocabulary ({})", tok.vocab_size());
            }
            super::print(&format!("{}\n", tok.decode(&ids)?))
        }
        Cmd::Info { tokenizer } => {
            let tok = Tokenizer::from_path(&tokenizer)?;
            super::print_json(&serde_json::json!({
                "vocab_size": tok.vocab_size(),
                "eot_id": tok.eot_id(),
                "hash": tok.hash(),
                "fast_path": tok.has_fast_path(),
            }))
        }
    }
}
