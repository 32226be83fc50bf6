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
use mor_config::{RunConfig, RouterKind, Sampling};
use mor_engine::{Backend, ParamGroup};
use mor_model::{Batch, Model, Routing, Stats};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub ce: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

pub struct TrainOutcome<B: Backend> {
    pub model: Model<B>,
    pub log: Vec<StepLog>,
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
    cfg.validate()?;
    let tc = &cfg.train;
    std::fs::create_dir_all(&opts.run_dir).with_context(|| format!("cannot create run directory {}", opts.run_dir.display()))?;
    let mut model = Model::new(backend, cfg.model.clone(), opts.init_seed.unwrap_or(tc.seed))?;
    let mut main = AdamW::new(backend, &model.params, ParamGroup::Main, AdamWConfig::from_train(tc));
    let aux_mult = cfg.model.router.as_ref().filter(|r| r.kind == RouterKind::Expert && r.sampling == Sampling::AuxRouter).map(|r| r.aux_router_lr_mult);
    let mut aux = aux_mult.map(|m| AdamW::new(backend, &model.params, ParamGroup::AuxRouter, AdamWConfig::from_train(tc).with_lr_mult(m)));
    let schedule = LrSchedule::from_config(tc);
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
    let mut step = start;
    let end = opts.stop_after.map_or(tc.steps, |k| (start + k).min(tc.steps));
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
            let s = model.forward(backend, &batch, Routing::TopK, true, 1.0 / tc.grad_accum as f32)?;
            model.backward(backend)?;
            loss += s.loss / tc.grad_accum as f64;
            ce += s.ce / tc.grad_accum as f64;
            last = s;
        }
        if !loss.is_finite() {
            bail!("step {step}: loss is {loss}; stopping (the last checkpoint is intact)");
        }
        let st = main.step(backend, &mut model.params, lr);
        if let Some(a) = aux.as_mut() {
            a.step(backend, &mut model.params, lr);
        }
        model.after_optimizer_step();
        step += 1;

        let tps = tokens_per_step / t0.elapsed().as_secs_f64();
        if step % tc.log_every == 0 || step == end {
            let mut fields = stats_fields(&last);
            fields.insert("ce".into(), json!(ce));
            metrics.log_step(step as u64, loss, lr, tps, st.grad_norm, fields)?;
        }
        progress.update(step as u64, loss, tps, lr);
        log.push(StepLog { step, loss, ce, lr, grad_norm: st.grad_norm });
        if tc.checkpoint_every > 0 && step % tc.checkpoint_every == 0 && step < end {
            save(&model, &main, &aux, &*data, step)?;
            metrics.sync()?;
        }
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
    Ok(TrainOutcome { model, log, steps_done: step, checkpoint: ckpt, metrics: metrics_path, plot })
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
