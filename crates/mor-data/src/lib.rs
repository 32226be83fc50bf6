//! mor-data: tokenizers, corpus preparation and the training data loader.
//!
//! * [`tokenizer`]: [`Tokenizer`] wraps the HF `tokenizers` crate: load a `tokenizer.json`,
//!   build one from a GGUF file (the SmolLM tokenizer), train a byte-level BPE.
//! * [`prepare`]: text / JSONL / Parquet files -> fixed-width token shards + `manifest.json`.
//! * [`loader`]: the [`TokenSource`] trait, [`ShardSource`] (memory-mapped shards) and
//!   [`SyntheticSource`]; packed rows, seeded order, exact resumable [`LoaderState`].
//! * [`builtin`]: the small default corpus, tokenizer and shards, cached for the first run.
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
