//! The MoR model family over the engine's ops: vanilla Llama, recursive transformers with the
//! four sharing strategies, and Mixture-of-Recursions with expert- or token-choice routing,
//! recursion-wise KV caching or recursive KV sharing (MOR_SPEC sections 1–5).

pub mod generate;
pub mod layer;
pub mod memory;
pub mod model;
pub mod router;
pub mod tokens;
pub mod weights;

pub use generate::{Generation, Sampler};
pub use memory::MemoryEstimate;
pub use model::{default_head_chunk_elems, Batch, CapturedStep, Model, Reads, RecursionStats, RouterState, Routing, Stats, DEFAULT_HEAD_CHUNK_ELEMS};
