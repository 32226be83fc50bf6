//! `mor train [CONFIG]`: train a model on CPU or (`--device cuda`) on the GPU (the default: a tiny
//! MoR on the built-in corpus), with a progress bar, JSONL metrics, a loss-curve PNG and an atomic
//! checkpoint under `--out`; then print a generated sample with each token's recursion depth.
//! `--dry-run` prints the memory estimate of the run and exits.

use super::device::{self, Device, DeviceOptions, Gemm, OnBackend};
use anyhow::{bail, Context, Result};
use mor_data::{LoaderState, ShardSource, SyntheticSource, TokenSource, Tokenizer};
use mor_engine::Backend;
use mor_model::Sampler;
use mor_train::{BatchSource, TokenBatch, TrainOptions};
use std::path::{Path, PathBuf};

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
    /// Run directory for checkpoint, metrics and plot (default `runs/<config name>`).
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
    /// Print parameter, optimizer, activation and peak memory estimates, then exit.
    #[arg(long)]
    pub dry_run: bool,
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

/// The token source and (when known) its tokenizer.
fn open_data(spec: &str, vocab: usize, seed: u64, quiet: bool) -> Result<(Box<dyn TokenSource>, Option<PathBuf>)> {
    match spec {
        "synthetic" => Ok((Box::new(SyntheticSource::new(vocab, seed)), None)),
        "builtin" => {
            let opts = mor_data::builtin::BuiltinOptions { vocab_size: vocab.min(4096), progress: !quiet, ..Default::default() };
            let b = mor_data::builtin::ensure(&opts).context("preparing the built-in corpus")?;
            let src = ShardSource::open(&b.shards, "train", &Default::default())?;
            Ok((Box::new(src), Some(b.tokenizer)))
        }
        path => {
            let dir = Path::new(path);
            if !dir.is_dir() {
                bail!("data `{path}`: not a shard folder (expected `builtin`, `synthetic` or a folder from `mor data prepare`)");
            }
            let src = ShardSource::open(dir, "train", &Default::default())?;
            let tok = dir.join("tokenizer.json");
            Ok((Box::new(src), tok.is_file().then_some(tok)))
        }
    }
}

pub fn run(args: Args) -> Result<()> {
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
        return super::print(&dry_run_report(&cfg, args.device)?);
    }
    device::check(args.device)?;
    let spec = args.data.clone().or_else(|| cfg.data.train.clone()).unwrap_or_else(|| "synthetic".into());
    let (source, tokenizer) = open_data(&spec, cfg.model.vocab_size, cfg.train.seed, args.quiet)?;
    if source.vocab_size() > cfg.model.vocab_size {
        bail!("data `{spec}` has {} token ids but model.vocab_size is {}", source.vocab_size(), cfg.model.vocab_size);
    }
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
    let counts = cfg.model.param_counts()?;
    eprintln!(
        "training {} ({} parameters, {} non-embedding) on {spec} for {} steps of {} tokens; run directory {}",
        cfg.name,
        super::si(counts.total as f64),
        super::si(counts.non_embedding as f64),
        cfg.train.steps,
        cfg.train.micro_batch * cfg.train.seq_len * cfg.train.grad_accum,
        out.display()
    );
    let opts = DeviceOptions { gemm: args.gemm, profile: false };
    device::dispatch(args.device, opts, Job { cfg, args, source, tokenizer, out })
}

/// The training run proper, on whichever backend was picked.
struct Job {
    cfg: mor_config::RunConfig,
    args: Args,
    source: Box<dyn TokenSource>,
    tokenizer: Option<PathBuf>,
    out: PathBuf,
}

impl OnBackend for Job {
    type Output = ();
    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        let Job { cfg, args, source, tokenizer, out } = self;
        train_on(backend, &cfg, &args, source, tokenizer, &out)
    }
}

fn train_on<B: Backend>(
    backend: &B,
    cfg: &mor_config::RunConfig,
    args: &Args,
    source: Box<dyn TokenSource>,
    tokenizer: Option<PathBuf>,
    out: &Path,
) -> Result<()> {
    let opts = TrainOptions { run_dir: out.to_path_buf(), resume: args.resume, quiet: args.quiet, stop_after: None, init_seed: None };
    let mut data = Source(source);
    let t0 = std::time::Instant::now();
    let mut outcome = mor_train::train(backend, cfg, &mut data, &opts)?;
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
    if let (Some(tok), false) = (tokenizer, args.prompt.is_empty() || args.sample_tokens == 0) {
        std::fs::copy(&tok, out.join("tokenizer.json")).ok();
        let tok = Tokenizer::from_file(&tok)?;
        print_sample(backend, &mut outcome.model, &tok, &args.prompt, args.sample_tokens)?;
    }
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
/// one micro-batch (see `mor_model::memory`), all f32.
pub fn dry_run_report(cfg: &mor_config::RunConfig, device: Device) -> Result<String> {
    let t = &cfg.train;
    let est = mor_model::memory::estimate(&cfg.model, t.micro_batch, t.seq_len, mor_model::DEFAULT_HEAD_CHUNK_ELEMS)?;
    let counts = cfg.model.param_counts()?;
    let map = cfg.model.sharing_map()?;
    let b = mor_model::MemoryEstimate::BYTES as f64;
    let row = |what: &str, elems: usize, note: String| format!("  {what:<22} {:>12}  {:>10}  {note}\n", super::si(elems as f64), gib(elems as f64 * b));
    let mut text = format!(
        "{} (dry run, {:?}): micro-batch {} x {} = {} tokens, grad_accum {}, all buffers f32\n",
        if cfg.name.is_empty() { "run" } else { cfg.name.as_str() },
        device,
        t.micro_batch,
        t.seq_len,
        super::thousands(est.tokens as u64),
        t.grad_accum
    );
    text.push_str(&format!("  {:<22} {:>12}  {:>10}\n", "", "elements", "memory"));
    text.push_str(&row("parameters", est.params, format!("{} non-embedding", super::si(counts.non_embedding as f64))));
    text.push_str(&row("gradients", est.grads, String::new()));
    text.push_str(&row("optimizer (AdamW m, v)", est.optimizer, String::new()));
    text.push_str(&row(
        "activations",
        est.activations(),
        format!(
            "{} layer applications on {} token rows in all: {}; scratch, residual, router and LM-head chunk: {}",
            map.num_layers,
            super::thousands(est.layer_rows as u64),
            gib(est.layer_activations as f64 * b),
            gib(est.workspace_other as f64 * b)
        ),
    ));
    text.push_str(&row("peak (estimate)", est.total(), "everything above is resident during a step".into()));
    if device == Device::Cuda {
        text.push_str("  not included: the CUDA context (~0.5 GiB), index buffers and backend scratch (attention statistics, sort buffers, bf16 GEMM operand copies)\n");
    }
    Ok(text)
}
