//! Training pieces for MoR models, small and independent so the training loop can call them:
//!
//! * [`schedule`]: learning-rate schedules (WSD per MOR_SPEC invariant 25, cosine, constant).
//! * [`optim`]: AdamW per [`mor_engine::ParamGroup`], global grad-norm clipping, state save/restore.
//! * [`checkpoint`]: atomic checkpoint directories (`model.safetensors`, `optimizer.safetensors`,
//!   `state.json`) with validating loads.
//! * [`metrics`]: append-only JSONL metrics log, reader, truncation on resume.
//! * [`plot`]: loss-curve PNG (embedded DejaVu Sans font, no system fonts needed).
//! * [`progress`]: terminal progress bar (silent when stderr is not a terminal).
//! * [`steps`]: a training micro-step and the optimizer step, eager or replaying CUDA graphs.
//! * [`trainer`]: the training loop itself, with exact resume.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod schedule;
pub mod steps;
pub mod trainer;

pub use checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint};
pub use metrics::{MetricsWriter, Record};
pub use optim::{model_optimizers, AdamW, AdamWConfig, NamedTensor, Optimizer, StepStats};
pub use plot::{plot_loss_curve, plot_metrics_file, PlotOptions};
pub use progress::Progress;
pub use schedule::LrSchedule;
pub use steps::{OptimizerRunner, StepRunner};
pub use trainer::{load_model, train, train_with_eval, BatchSource, Evaluator, TokenBatch, TrainOptions, TrainOutcome};
