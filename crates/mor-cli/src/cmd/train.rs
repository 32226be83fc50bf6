//! `mor train [CONFIG]`: train a model on CPU or (`--device cuda`) on the GPU (the default: a tiny
//! MoR on the built-in corpus), with a progress bar, JSONL metrics, a loss-curve PNG and an atomic
//! checkpoint under `--out`; then print a generated sample with each token's recursion depth.
//! `--dry-run` prints the memory estimate of the run and exits. `--time-limit` bounds the wall
//! time (optionally fitting the LR schedule into it); `--val-rows` reports the validation NLL of
//! the trained model on the data folder's `val` split, on the training device (`--val-every`:
//! also during training, drawn in the loss curve).

use super::device::{self, Device, DeviceOptions, Gemm, OnBackend};
use anyhow::{bail, Context, Result};
use mor_data::{LoaderState, ShardSource, SyntheticSource, TokenSource, Tokenizer};
use mor_engine::Backend;
use mor_model::Sampler;
use mor_eval::nll::{routing_name, validation_nll, NllOptions};
use mor_train::{BatchSource, Evaluator, TokenBatch, TrainOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Preset name (see `mor presets`) or path to a TOML config.
    #[arg(default_value = "tiny-mor-ec3")]
    pub config: String,
    /// Training data: `builtin` (small default corpus, prepared and cached on first use),
    /// `synthetic` (generated tokens), or a shard folder from `mor data prepare`.
    /// Overrides `[data] train` of the config.
    #[arg(long)]
    pub data: Option<String>,
    /// Run directory for checkpoint, metrics and plot (default `runs/<config name>`); on CUDA also
    /// `gemm_algos.json`, the GEMM algorithms picked by timing (reused by later runs in it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override `train.steps`.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Continue from the checkpoint in the run directory.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Prompt of the sample printed after training ("" for none).
    #[arg(long, default_value = "Call me")]
    pub prompt: String,
    /// Tokens to generate for the sample.
    #[arg(long, default_value_t = 40)]
    pub sample_tokens: usize,
    /// Backend: `cpu` or `cuda` (binaries built with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// GEMM precision on CUDA: `f32` or `bf16` (bf16 operands, fp32 accumulation and weights).
    #[arg(long, value_enum, default_value = "f32")]
    pub gemm: Gemm,
    /// CUDA: bit-reproducible kernels (two-pass attention backward, heuristic GEMM algorithms)
    /// instead of the fastest (also `MOR_DETERMINISTIC=1`); the CPU is always reproducible.
    #[arg(long)]
    pub deterministic: bool,
    /// Print parameter, optimizer, activation and peak memory estimates, then exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Wall-time budget in minutes, counted from the command's start: training stops after the
    /// step past which one more would overrun it, then writes the checkpoint, metrics and loss
    /// curve as at a normal end (the final validation and the sample come after it).
    #[arg(long, value_name = "MINUTES")]
    pub time_limit: Option<f64>,
    /// With --time-limit: shorten train.steps to what fits in the time, measured while training
    /// (until the LR schedule's cool-down starts), so warm-up and cool-down complete in it.
    #[arg(long, requires = "time_limit")]
    pub fit_schedule: bool,
    /// CUDA: each micro-step's forward and backward as a CUDA graph, recorded at the second step
    /// of a batch shape and replayed (bf16 GEMMs; vanilla, recursive and expert-choice models
    /// with a learned router, no document masks; other steps run eagerly).
    #[arg(long)]
    pub cuda_graph: bool,
    /// Validation loss after training: the NLL over this many rows of train.seq_len tokens of
    /// the data folder's `val` split (fewer if the split is shorter), on the training device,
    /// with top-k routing like the training loss and MOR_SPEC 8.1; logged as `val_loss` (drawn
    /// in loss.png), printed, and written to `val.json` in the run directory.
    #[arg(long, default_value_t = 0)]
    pub val_rows: usize,
    /// With --val-rows: also evaluate every N optimizer steps (the time counts in --time-limit).
    #[arg(long, default_value_t = 0, requires = "val_rows")]
    pub val_every: usize,
}

/// Adapts a data-crate token source to the trainer's interface.
struct Source(Box<dyn TokenSource>);

impl BatchSource for Source {
    fn next_batch(&mut self, batch: usize, seq_len: usize) -> Result<TokenBatch> {
        let b = self.0.next_batch(batch, seq_len)?;
        Ok(TokenBatch { inputs: b.inputs, targets: b.targets, batch: b.batch, seq_len: b.seq_len, doc_starts: b.doc_starts })
    }
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(self.0.state()).expect("loader state serialises")
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: LoaderState = serde_json::from_value(state.clone()).context("checkpoint: malformed data position")?;
        self.0.restore(&s)
    }
}

/// The token source, (when known) its tokenizer, and the shard folder (none for synthetic data).
type OpenedData = (Box<dyn TokenSource>, Option<PathBuf>, Option<PathBuf>);

fn open_data(spec: &str, vocab: usize, seed: u64, quiet: bool) -> Result<OpenedData> {
    match spec {
        "synthetic" => Ok((Box::new(SyntheticSource::new(vocab, seed)), None, None)),
        "builtin" => {
            let opts = mor_data::builtin::BuiltinOptions { vocab_size: vocab.min(4096), progress: !quiet, ..Default::default() };
            let b = mor_data::builtin::ensure(&opts).context("preparing the built-in corpus")?;
            let src = ShardSource::open(&b.shards, "train", &Default::default())?;
            Ok((Box::new(src), Some(b.tokenizer), Some(b.shards)))
        }
        path => {
            let dir = Path::new(path);
            if !dir.is_dir() {
                bail!("data `{path}`: not a shard folder (expected `builtin`, `synthetic` or a folder from `mor data prepare`)");
            }
            let src = ShardSource::open(dir, "train", &Default::default())?;
            let tok = dir.join("tokenizer.json");
            Ok((Box::new(src), tok.is_file().then_some(tok), Some(dir.to_path_buf())))
        }
    }
}

/// The `val` split for `--val-rows`, opened before training so a missing split fails at once
/// rather than after the run; with the row count it holds (at most `rows`).
fn open_val(spec: &str, shards: Option<&Path>, rows: usize, seq_len: usize) -> Result<(ShardSource, usize)> {
    let Some(dir) = shards else { bail!("--val-rows: data `{spec}` has no validation split (use a folder from `mor data prepare --val-fraction`)") };
    let src = ShardSource::open(dir, "val", &Default::default()).with_context(|| format!("--val-rows: opening the val split of {}", dir.display()))?;
    let avail = (src.total_tokens().saturating_sub(1) / seq_len as u64) as usize;
    if avail == 0 {
        bail!(
            "--val-rows: the val split of {} has {} tokens, not one row of {seq_len} (+1); prepare it with a larger --val-fraction",
            dir.display(),
            src.total_tokens()
        );
    }
    Ok((src, rows.min(avail)))
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    if let Some(m) = args.time_limit {
        if !(m.is_finite() && m > 0.0) {
            bail!("--time-limit {m}: expected a positive number of minutes");
        }
    }
    let mut cfg = super::load_config(&args.config)?;
    if cfg.name.is_empty() {
        cfg.name = Path::new(&args.config).file_stem().map_or("run".into(), |s| s.to_string_lossy().into_owned());
    }
    if let Some(steps) = args.steps {
        cfg.train.steps = steps;
        cfg.train.warmup_steps = cfg.train.warmup_steps.min(steps);
    }
    cfg.validate().with_context(|| format!("invalid config `{}`", args.config))?;
    if args.dry_run {
        return super::print(&dry_run_report(&cfg, args.device, args.gemm)?);
    }
    device::check(args.device)?;
    if args.cuda_graph && (args.device != Device::Cuda || args.gemm != Gemm::Bf16) {
        bail!("--cuda-graph needs --device cuda --gemm bf16");
    }
    let spec = args.data.clone().or_else(|| cfg.data.train.clone()).unwrap_or_else(|| "synthetic".into());
    let (source, tokenizer, shards) = open_data(&spec, cfg.model.vocab_size, cfg.train.seed, args.quiet)?;
    if source.vocab_size() > cfg.model.vocab_size {
        bail!("data `{spec}` has {} token ids but model.vocab_size is {}", source.vocab_size(), cfg.model.vocab_size);
    }
    let val = match args.val_rows {
        0 => None,
        rows => Some(open_val(&spec, shards.as_deref(), rows, cfg.train.seq_len)?),
    };
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
    let counts = cfg.model.param_counts()?;
    let budget = args.time_limit.map_or(String::new(), |m| {
        format!(" (at most {m} min of wall time{})", if args.fit_schedule { ", schedule fitted to it" } else { "" })
    });
    eprintln!(
        "training {} ({} parameters, {} non-embedding) on {spec} for {} steps of {} tokens{budget}; run directory {}",
        cfg.name,
        super::si(counts.total as f64),
        super::si(counts.non_embedding as f64),
        cfg.train.steps,
        cfg.train.micro_batch * cfg.train.seq_len * cfg.train.grad_accum,
        out.display()
    );
    // The GEMM algorithms chosen by timing live with the run, so that --resume or a rerun in the
    // same directory computes with the same ones.
    let opts = DeviceOptions {
        gemm: args.gemm,
        profile: false,
        deterministic: args.deterministic,
        gemm_algos: Some(out.join("gemm_algos.json")),
    };
    device::dispatch(args.device, opts, Job { cfg, args, source, tokenizer, val, out, started })
}

/// The training run proper, on whichever backend was picked.
struct Job {
    cfg: mor_config::RunConfig,
    args: Args,
    source: Box<dyn TokenSource>,
    tokenizer: Option<PathBuf>,
    /// `--val-rows`: the val split and the rows to evaluate.
    val: Option<(ShardSource, usize)>,
    out: PathBuf,
    /// When the command started (`--time-limit` counts from here, backend start-up included).
    started: Instant,
}

impl OnBackend for Job {
    type Output = ();
    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        let Job { cfg, args, source, tokenizer, val, out, started } = self;
        train_on(backend, &cfg, &args, source, tokenizer, val, &out, started)
    }
}

#[allow(clippy::too_many_arguments)]
fn train_on<B: Backend>(
    backend: &B,
    cfg: &mor_config::RunConfig,
    args: &Args,
    source: Box<dyn TokenSource>,
    tokenizer: Option<PathBuf>,
    val: Option<(ShardSource, usize)>,
    out: &Path,
    started: Instant,
) -> Result<()> {
    let time_limit = args.time_limit.map(|m| Duration::from_secs_f64(m * 60.0).saturating_sub(started.elapsed()));
    let opts = TrainOptions {
        resume: args.resume,
        quiet: args.quiet,
        time_limit,
        fit_schedule: args.fit_schedule,
        cuda_graph: args.cuda_graph,
        ..TrainOptions::new(out)
    };
    let mut data = Source(source);
    let val_opts = val.as_ref().map(|&(_, rows)| NllOptions {
        rows,
        seq_len: cfg.train.seq_len,
        // Top-k like the training loss (and the paper's validation NLL), so the curves compare.
        routing: mor_model::Routing::TopK,
        batch: cfg.train.micro_batch,
    });
    let evaluator = val.as_ref().zip(val_opts.clone()).map(|((src, _), o)| Evaluator::<B> {
        every: args.val_every,
        eval: Box::new(move |b: &B, m: &mut mor_model::Model<B>| Ok(validation_nll(b, m, src, &o)?.nll)),
    });
    let t0 = std::time::Instant::now();
    let mut outcome = mor_train::train_with_eval(backend, cfg, &mut data, &opts, evaluator)?;
    let last = outcome.log.last();
    eprintln!(
        "done in {:.0}s: step {}, loss {}; checkpoint {}, metrics {}{}",
        t0.elapsed().as_secs_f64(),
        outcome.steps_done,
        last.map_or("-".into(), |l| format!("{:.4}", l.loss)),
        outcome.checkpoint.display(),
        outcome.metrics.display(),
        outcome.plot.as_ref().map_or(String::new(), |p| format!(", loss curve {}", p.display()))
    );
    if let (Some(o), Some(&(step, nll))) = (val_opts, outcome.val_log.last()) {
        write_val(&o, step, nll, out)?;
    }
    if let (Some(tok), false) = (tokenizer, args.prompt.is_empty() || args.sample_tokens == 0) {
        std::fs::copy(&tok, out.join("tokenizer.json")).ok();
        let tok = Tokenizer::from_file(&tok)?;
        print_sample(backend, &mut outcome.model, &tok, &args.prompt, args.sample_tokens)?;
    }
    Ok(())
}

/// `--val-rows`: print the final validation NLL and write it to `<run>/val.json`.
fn write_val(o: &NllOptions, step: usize, nll: f64, out: &Path) -> Result<()> {
    let v = serde_json::json!({
        "step": step, "val_nll": nll, "val_ppl": nll.exp(), "rows": o.rows, "seq_len": o.seq_len,
        "tokens": o.rows * o.seq_len, "routing": routing_name(o.routing),
    });
    let path = out.join("val.json");
    std::fs::write(&path, format!("{}\n", serde_json::to_string_pretty(&v)?)).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "val NLL {nll:.4} nats (ppl {:.1}) after step {step}: {} rows x {} tokens, routing {}; {}",
        nll.exp(),
        o.rows,
        o.seq_len,
        routing_name(o.routing),
        path.display()
    );
    Ok(())
}

/// Generate from `prompt` and print each token with its recursion depth as a subscript
/// (coloured by depth on a terminal).
pub fn print_sample<B: Backend>(backend: &B, model: &mut mor_model::Model<B>, tok: &Tokenizer, prompt: &str, n: usize) -> Result<()> {
    let ids = tok.encode(prompt)?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let sampler = Sampler::Sample { temperature: 0.8, top_p: 0.95, seed: 1 };
    let g = model.generate(backend, &ids, n, sampler, tok.eot_id(), |_| {})?;
    let all: Vec<u32> = ids.iter().chain(&g.ids).copied().collect();
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let sub = ['₀', '₁', '₂', '₃', '₄', '₅', '₆', '₇', '₈', '₉'];
    let mut text = String::new();
    for (i, &id) in all.iter().enumerate() {
        let piece = tok.decode(&[id])?;
        let d = g.depths[i] as usize;
        let mark: String = d.to_string().chars().map(|c| sub[c.to_digit(10).unwrap() as usize]).collect();
        if colour {
            let code = [90, 37, 36, 33, 31][d.min(4)];
            text.push_str(&format!("\x1b[{code}m{piece}{mark}\x1b[0m"));
        } else {
            text.push_str(&format!("{piece}{mark}"));
        }
    }
    super::print(&format!(
        "sample (subscript = recursions each token took, of {}):\n{text}\n",
        model.map.num_recursions
    ))
}

/// `GiB` with two decimals.
pub fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

/// The `--dry-run` report: memory of parameters, gradients, AdamW state and the activations of
/// one micro-batch (see `mor_model::memory`); with bf16 GEMMs on CUDA the activation buffers are
/// bf16, everything else f32.
pub fn dry_run_report(cfg: &mor_config::RunConfig, device: Device, gemm: Gemm) -> Result<String> {
    use mor_model::memory::Part;
    let t = &cfg.train;
    let head_chunk = mor_model::default_head_chunk_elems(if device == Device::Cuda { "cuda" } else { "cpu" });
    let est = mor_model::memory::estimate(&cfg.model, t.micro_batch, t.seq_len, head_chunk)?;
    let counts = cfg.model.param_counts()?;
    let map = cfg.model.sharing_map()?;
    let act_bytes = if device == Device::Cuda && gemm == Gemm::Bf16 { 2 } else { 4 };
    let b = mor_model::MemoryEstimate::BYTES as f64;
    let row = |what: &str, elems: usize, bytes: usize, note: String| format!("  {what:<22} {:>12}  {:>10}  {note}\n", super::si(elems as f64), gib(bytes as f64));
    let mut text = format!(
        "{} (dry run, {:?}): micro-batch {} x {} = {} tokens, grad_accum {}, {}\n",
        if cfg.name.is_empty() { "run" } else { cfg.name.as_str() },
        device,
        t.micro_batch,
        t.seq_len,
        super::thousands(est.tokens as u64),
        t.grad_accum,
        if act_bytes == 2 { "activations bf16, everything else f32" } else { "all buffers f32" }
    );
    text.push_str(&format!("  {:<22} {:>12}  {:>10}\n", "", "elements", "memory"));
    let full = |elems: usize| (elems as f64 * b) as usize;
    text.push_str(&row("parameters", est.params, full(est.params), format!("{} non-embedding", super::si(counts.non_embedding as f64))));
    text.push_str(&row("gradients", est.grads, full(est.grads), String::new()));
    text.push_str(&row("optimizer (AdamW m, v)", est.optimizer, full(est.optimizer), String::new()));
    text.push_str(&row(
        "activations",
        est.activations(),
        est.bytes(Part::Activations, act_bytes),
        format!(
            "{} layer applications on {} token rows in all: {}; scratch, residual, router and LM-head chunk: {}",
            map.num_layers,
            super::thousands(est.layer_rows as u64),
            gib(est.bytes(Part::LayerActivations, act_bytes) as f64),
            gib(est.bytes(Part::WorkspaceOther, act_bytes) as f64)
        ),
    ));
    let copies = est.weight_copies(act_bytes);
    if copies > 0 {
        text.push_str(&row("bf16 weight copies", copies, copies * 2, "the GEMMs' cached operands (without the stacked gate/up and q/k/v copies)".into()));
    }
    text.push_str(&row("peak (estimate)", est.total() + copies, est.peak_bytes(act_bytes), "everything above is resident during a step".into()));
    if device == Device::Cuda {
        text.push_str("  not included: the CUDA context (~0.5 GiB), index buffers and backend scratch (attention statistics, sort buffers, bf16 copies of f32 GEMM operands)\n");
    }
    Ok(text)
}
