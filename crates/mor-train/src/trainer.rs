//! The training loop, top to bottom: for each optimizer step, accumulate gradients over
//! micro-batches, clip, AdamW-update each parameter group, update router state, log, and
//! checkpoint atomically. Resuming restores parameters, optimizer moments, router state and the
//! data position, so a resumed run reproduces the uninterrupted one bit for bit on CPU.

use crate::checkpoint::{checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint};
use crate::metrics::{truncate_metrics, MetricsWriter};
use crate::optim::{AdamW, AdamWConfig};
use crate::plot::{plot_metrics_file, PlotOptions};
use crate::progress::Progress;
use crate::schedule::LrSchedule;
use anyhow::{bail, Context, Result};
use mor_config::RunConfig;
use mor_engine::Backend;
use mor_model::{Batch, Model, Stats};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One micro-batch of token rows.
pub struct TokenBatch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch: usize,
    pub seq_len: usize,
    /// Per row, offsets where documents start (used when document masking is on).
    pub doc_starts: Vec<Vec<u32>>,
}

/// Where training tokens come from. The position must be exactly restorable.
pub trait BatchSource {
    fn next_batch(&mut self, batch: usize, seq_len: usize) -> Result<TokenBatch>;
    fn state(&self) -> Value;
    fn restore(&mut self, state: &Value) -> Result<()>;
}

pub struct TrainOptions {
    pub run_dir: PathBuf,
    /// Continue from the checkpoint in `run_dir` if there is one.
    pub resume: bool,
    pub quiet: bool,
    /// Stop (as if killed) after this many optimizer steps of this invocation (tests, time-boxed runs).
    pub stop_after: Option<usize>,
    /// Seed of the model initialisation (defaults to `train.seed`).
    pub init_seed: Option<u64>,
    /// Wall-time budget of this call, counted from its start: after each step, training stops
    /// when one more step as long as the last would overrun it, and then writes the checkpoint,
    /// metrics and loss curve as at a normal end. At least one step runs.
    pub time_limit: Option<Duration>,
    /// With `time_limit`: shorten `train.steps` to the steps that fit in the time (mean step
    /// time of this call, its first step left out as warm-up), re-estimated after every step
    /// until the LR starts to depend on the total (WSD: the cool-down), so the warm-up and
    /// cool-down complete inside the budget. Never lengthens the run.
    pub fit_schedule: bool,
    /// Run each micro-step's forward and backward as a CUDA graph where the backend and the
    /// model allow it ([`crate::StepRunner`]); otherwise (and on the CPU) eagerly.
    pub cuda_graph: bool,
    /// For tests of `time_limit` and `fit_schedule`: every step counts as this long instead of
    /// the wall time it took, so the stopping and fitting decisions do not depend on the
    /// machine's load.
    pub step_time_override: Option<Duration>,
}

impl TrainOptions {
    /// Options for a fresh run in `run_dir` with nothing else set.
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        TrainOptions {
            run_dir: run_dir.into(),
            resume: false,
            quiet: false,
            stop_after: None,
            init_seed: None,
            time_limit: None,
            fit_schedule: false,
            cuda_graph: false,
            step_time_override: None,
        }
    }
}

/// The total step count that fits the time left: the current `step` plus as many steps of
/// `mean_step_s` seconds as fit in `remaining_s` (with 1 % slack for jitter), at most `cap`.
pub fn steps_fitting(step: usize, remaining_s: f64, mean_step_s: f64, cap: usize) -> usize {
    if mean_step_s.is_nan() || mean_step_s <= 0.0 || !remaining_s.is_finite() {
        return cap.max(step);
    }
    let more = (remaining_s.max(0.0) * 0.99 / mean_step_s).floor();
    let total = if more >= (cap as f64) { cap } else { step + more as usize };
    total.min(cap).max(step)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub ce: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// The loss of a model as it stands (see [`Evaluator`]).
pub type EvalFn<'a, B> = Box<dyn FnMut(&B, &mut Model<B>) -> Result<f64> + 'a>;

/// An evaluation run during training (e.g. the validation loss), logged as `val_loss` in the
/// metrics (the loss curve draws it) after every `every` optimizer steps and after the last step.
pub struct Evaluator<'a, B: Backend> {
    /// Evaluate after every this many optimizer steps; 0 = only after the last one.
    pub every: usize,
    /// The loss of `model` as it stands (must not touch its parameters or router state).
    pub eval: EvalFn<'a, B>,
}

pub struct TrainOutcome<B: Backend> {
    pub model: Model<B>,
    pub log: Vec<StepLog>,
    /// `(step, val_loss)` of each evaluation of this call.
    pub val_log: Vec<(usize, f64)>,
    pub steps_done: usize,
    pub checkpoint: PathBuf,
    pub metrics: PathBuf,
    pub plot: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    step: usize,
    config: RunConfig,
    router: mor_model::RouterState,
    data: Value,
}

/// Router statistics as flat metric fields (`r1_selected`, `r1_sampling_acc`, ...).
fn stats_fields(s: &Stats) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("ce".into(), json!(s.ce));
    if s.aux_bce > 0.0 {
        m.insert("aux_bce".into(), json!(s.aux_bce));
    }
    if s.aux_router_bce > 0.0 {
        m.insert("aux_router_bce".into(), json!(s.aux_router_bce));
    }
    if s.z_loss > 0.0 {
        m.insert("z_loss".into(), json!(s.z_loss));
    }
    if s.balance_loss > 0.0 {
        m.insert("balance_loss".into(), json!(s.balance_loss));
    }
    for (r, rs) in s.recursions.iter().enumerate() {
        m.insert(format!("r{}_selected", r + 1), json!(rs.selected_fraction));
        if let Some(a) = rs.sampling_accuracy {
            m.insert(format!("r{}_sampling_acc", r + 1), json!(a));
        }
    }
    for (k, v) in [("dead_token_ratio", s.dead_token_ratio), ("max_vio", s.max_vio), ("entropy", s.entropy)] {
        if let Some(v) = v {
            m.insert(k.into(), json!(v));
        }
    }
    m
}

/// Train `cfg` on `data`, writing the checkpoint, metrics and loss curve under `opts.run_dir`.
pub fn train<B: Backend>(backend: &B, cfg: &RunConfig, data: &mut dyn BatchSource, opts: &TrainOptions) -> Result<TrainOutcome<B>> {
    train_with_eval(backend, cfg, data, opts, None)
}

/// [`train`] with an [`Evaluator`] run during training.
pub fn train_with_eval<B: Backend>(
    backend: &B,
    cfg: &RunConfig,
    data: &mut dyn BatchSource,
    opts: &TrainOptions,
    mut evaluator: Option<Evaluator<'_, B>>,
) -> Result<TrainOutcome<B>> {
    let t_call = Instant::now();
    cfg.validate()?;
    let tc = &cfg.train;
    std::fs::create_dir_all(&opts.run_dir).with_context(|| format!("cannot create run directory {}", opts.run_dir.display()))?;
    let mut model = Model::new(backend, cfg.model.clone(), opts.init_seed.unwrap_or(tc.seed))?;
    let (mut main, mut aux) = crate::optim::model_optimizers(backend, &model.params, &cfg.model, AdamWConfig::from_train(tc));
    let mut schedule = LrSchedule::from_config(tc);
    let ckpt = checkpoint_dir(&opts.run_dir);
    let metrics_path = opts.run_dir.join("metrics.jsonl");

    let mut start = 0usize;
    if opts.resume {
        if let Some(dir) = latest_checkpoint(&opts.run_dir) {
            let saved: SavedState = serde_json::from_value(crate::checkpoint::read_state(&dir)?)
                .with_context(|| format!("checkpoint {}: state.json is malformed", dir.display()))?;
            if saved.config.model != cfg.model {
                bail!("checkpoint {} was trained with a different model config; refusing to resume", dir.display());
            }
            let mut optims: Vec<&mut AdamW<B>> = vec![&mut main];
            if let Some(a) = aux.as_mut() {
                optims.push(a);
            }
            load_checkpoint(&dir, backend, &mut model.params, &mut optims)?;
            model.router_state = saved.router;
            data.restore(&saved.data)?;
            start = saved.step;
            truncate_metrics(&metrics_path, start as u64).ok();
        }
    }
    let mut metrics = if start > 0 { MetricsWriter::resume(&metrics_path, start as u64)? } else { MetricsWriter::create(&metrics_path)? };

    let save = |model: &Model<B>, main: &AdamW<B>, aux: &Option<AdamW<B>>, data: &dyn BatchSource, step: usize| -> Result<()> {
        let mut optims = vec![main];
        if let Some(a) = aux {
            optims.push(a);
        }
        let state = SavedState { step, config: cfg.clone(), router: model.router_state.clone(), data: data.state() };
        save_checkpoint(&ckpt, backend, &model.params, &optims, &serde_json::to_value(&state)?)
    };

    let progress = Progress::new(tc.steps as u64, start as u64, opts.quiet);
    let tokens_per_step = (tc.micro_batch * tc.seq_len * tc.grad_accum) as f64;
    let mut log = Vec::new();
    let mut val_log = Vec::new();
    let mut step = start;
    let mut end = opts.stop_after.map_or(tc.steps, |k| (start + k).min(tc.steps));
    let mut fitting = opts.fit_schedule && opts.time_limit.is_some();
    let (mut timed_steps, mut timed_s) = (0usize, 0.0f64);
    let mut steps = crate::StepRunner::new(opts.cuda_graph);
    let mut optimizer = crate::OptimizerRunner::new(opts.cuda_graph);
    while step < end {
        let t0 = Instant::now();
        let lr = schedule.lr(step);
        model.params.zero_grads(backend);
        let mut loss = 0.0;
        let mut ce = 0.0;
        let mut last = Stats::default();
        for _ in 0..tc.grad_accum {
            let b = data.next_batch(tc.micro_batch, tc.seq_len)?;
            let docs = cfg.data.document_mask.then_some(b.doc_starts.as_slice());
            let batch = Batch { inputs: &b.inputs, targets: &b.targets, batch: b.batch, seq_len: b.seq_len, doc_starts: docs };
            let s = steps.step(backend, &mut model, &batch, 1.0 / tc.grad_accum as f32)?;
            loss += s.loss / tc.grad_accum as f64;
            ce += s.ce / tc.grad_accum as f64;
            last = s;
        }
        if !loss.is_finite() {
            bail!("step {step}: loss is {loss}; stopping (the last checkpoint is intact)");
        }
        let (st, _) = optimizer.step(backend, &mut model.params, &mut main, aux.as_mut(), lr)?;
        model.after_optimizer_step();
        step += 1;
        let tps = tokens_per_step / t0.elapsed().as_secs_f64();

        // Periodic evaluations count in the step time, so a time limit budgets for them.
        let mut val = None;
        if let Some(ev) = evaluator.as_mut().filter(|e| e.every > 0 && step.is_multiple_of(e.every)) {
            val = Some((ev.eval)(backend, &mut model).with_context(|| format!("evaluation after step {step}"))?);
        }
        // Seconds of this step and of this call as the time limit counts them.
        let step_s = opts.step_time_override.map_or_else(|| t0.elapsed().as_secs_f64(), |d| d.as_secs_f64());
        let call_s = opts.step_time_override.map_or_else(|| t_call.elapsed().as_secs_f64(), |d| d.as_secs_f64() * (step - start) as f64);
        let mut out_of_time = false;
        if let Some(limit) = opts.time_limit {
            if step > start + 1 {
                timed_steps += 1;
                timed_s += step_s;
            }
            let remaining = limit.as_secs_f64() - call_s;
            if fitting && timed_steps > 0 {
                if step >= schedule.total_independent_until() {
                    // The next LR depends on the total: keep the fitted schedule from here on.
                    fitting = false;
                    progress.println(format!(
                        "time limit: LR schedule fitted to {} steps ({:.2} s a step)",
                        schedule.total_steps,
                        timed_s / timed_steps as f64
                    ));
                } else {
                    let total = steps_fitting(step, remaining, timed_s / timed_steps as f64, tc.steps);
                    if total != schedule.total_steps {
                        schedule = LrSchedule::from_config(&mor_config::TrainConfig { steps: total, ..tc.clone() });
                        progress.set_total(total as u64);
                    }
                    end = opts.stop_after.map_or(total, |k| (start + k).min(total));
                }
            }
            out_of_time = step < end && remaining < step_s;
            if out_of_time {
                progress.println(format!(
                    "time limit: stopping after step {step} ({call_s:.0} s of {:.0} s used; a step takes {step_s:.1} s)",
                    limit.as_secs_f64()
                ));
            }
        }
        let last_step = step == end || out_of_time;
        if let (Some(ev), true, None) = (evaluator.as_mut(), last_step, val) {
            val = Some((ev.eval)(backend, &mut model).with_context(|| format!("evaluation after step {step}"))?);
        }
        if let Some(v) = val {
            val_log.push((step, v));
            progress.println(format!("step {step}: loss {loss:.4}, val loss {v:.4} ({:.0} s)", t_call.elapsed().as_secs_f64()));
        }
        if step % tc.log_every == 0 || last_step || val.is_some() {
            let mut fields = stats_fields(&last);
            fields.insert("ce".into(), json!(ce));
            if let Some(v) = val {
                fields.insert("val_loss".into(), json!(v));
            }
            metrics.log_step(step as u64, loss, lr, tps, st.grad_norm, fields)?;
        }
        progress.update(step as u64, loss, tps, lr);
        log.push(StepLog { step, loss, ce, lr, grad_norm: st.grad_norm });
        if out_of_time {
            break;
        }
        if tc.checkpoint_every > 0 && step % tc.checkpoint_every == 0 && step < end {
            save(&model, &main, &aux, &*data, step)?;
            metrics.sync()?;
        }
    }
    if opts.cuda_graph {
        // Steps that could not be recorded (token-choice, document masks, the capacity warm-up)
        // ran eagerly: say how many replayed.
        progress.println(format!(
            "CUDA graphs: {} micro-step recording(s), {} micro-steps replayed{}",
            steps.captures,
            steps.replays,
            steps.last_eager.as_ref().map_or(String::new(), |why| format!(" (the last ran eagerly: {why})"))
        ));
    }
    progress.finish();
    save(&model, &main, &aux, &*data, step)?;
    metrics.sync()?;
    let png = opts.run_dir.join("loss.png");
    let plot = match plot_metrics_file(&metrics_path, &png, &PlotOptions { title: format!("{} training loss", cfg.name), ..Default::default() }) {
        Ok(()) => Some(png),
        Err(e) => {
            progress.println(format!("warning: no loss curve: {e:#}"));
            None
        }
    };
    Ok(TrainOutcome { model, log, val_log, steps_done: step, checkpoint: ckpt, metrics: metrics_path, plot })
}

/// Load a trained model from a run directory or a checkpoint directory.
pub fn load_model<B: Backend>(backend: &B, path: &Path) -> Result<(Model<B>, RunConfig)> {
    let dir = if path.join(crate::checkpoint::STATE_FILE).is_file() {
        path.to_path_buf()
    } else {
        latest_checkpoint(path).with_context(|| format!("no checkpoint in {}", path.display()))?
    };
    let state = crate::checkpoint::read_state(&dir)?;
    let saved: SavedState = serde_json::from_value(state).with_context(|| format!("checkpoint {}: state.json is malformed", dir.display()))?;
    let mut model = Model::new(backend, saved.config.model.clone(), 0)?;
    crate::checkpoint::load_model_weights(&dir.join(crate::checkpoint::MODEL_FILE), backend, &mut model.params)?;
    model.router_state = saved.router;
    Ok((model, saved.config))
}
