//! `mor bench train PRESET [--device cuda] [--micro-batch B] [--seq-len L] [--steps N]`:
//! training throughput of a config on random tokens: full steps (forward, backward, AdamW with
//! clipping), timed after `--warmup` steps with a device synchronisation before each clock read;
//! prints the median tokens/s, the MFU and the peak device memory, optionally a JSON line and a
//! per-op time breakdown (`--profile-steps`, CUDA only). `--gemm f32,bf16` measures both GEMM
//! precisions one after the other on the same model (one initialisation).
//!
//! MFU = tokens/s × training FLOPs per token / peak. Training FLOPs per token are
//! `mor_config::accounting::train_flops_per_token` (3 × the recursion-aware forward count of
//! MOR_SPEC 7.3 plus the LM head: the 6·N rule with causal attention `2·L·d` per layer and token
//! in the forward, active fractions for MoR steps). The default peak is 989 TFLOP/s, the H100/H200
//! SXM dense bf16 tensor-core figure, also for our fp32 kernels, so numbers compare directly with
//! bf16 PyTorch runs.

use super::device::{self, Device, DeviceOptions, Gemm, OnBackend};
use anyhow::{ensure, Context, Result};
use mor_config::{accounting, RunConfig};
use mor_engine::{Backend, MatmulPrecision};
use mor_model::{Batch, Model};
use mor_train::{model_optimizers, AdamW, AdamWConfig, OptimizerRunner, StepRunner};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Training steps per second of a config (forward, backward, optimizer).
    Train(TrainArgs),
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Preset name (see `mor presets`) or path to a TOML config.
    pub config: String,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Sequences per step [default: train.micro_batch of the config].
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Tokens per sequence [default: train.seq_len of the config].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (kernel compilation, allocations, cuBLAS heuristics).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// GEMM precision(s) on CUDA, measured in turn: `f32`, `bf16` or `f32,bf16`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32")]
    pub gemm: Vec<Gemm>,
    /// CUDA: bit-reproducible kernels (two-pass attention backward, heuristic GEMM algorithms)
    /// instead of the fastest (also `MOR_DETERMINISTIC=1`).
    #[arg(long)]
    pub deterministic: bool,
    /// Peak FLOP/s for the MFU, in TFLOP/s (default: 989, dense bf16 of an H100/H200 SXM).
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    /// Logits per LM-head chunk [default: 192M on CUDA, 16M on CPU].
    #[arg(long)]
    pub head_chunk: Option<usize>,
    /// After the timed steps, this many more steps with every op timed (CUDA: GPU time from
    /// events around each op, and bf16 GEMMs by shape; not part of the throughput); prints the
    /// share of each op and op category and how long the GPU waits between ops.
    #[arg(long, default_value_t = 0)]
    pub profile_steps: usize,
    /// CUDA: the forward and backward of each step after the first warm-up step as one CUDA
    /// graph, recorded in the second warm-up step and replayed (needs --warmup >= 2, bf16
    /// GEMMs, and a step whose shapes do not depend on the data: no token-choice or random
    /// router, no capacity warm-up left).
    #[arg(long)]
    pub cuda_graph: bool,
    /// Check the CUDA graph first: this many steps on two copies of the model, one eager and
    /// one replaying the graph, on the same batches; prints the largest loss and parameter
    /// differences (bit-identical with --deterministic).
    #[arg(long, default_value_t = 0)]
    pub graph_check: usize,
    /// Append the result as one JSON line to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Label of the JSON record (default: the config name).
    #[arg(long)]
    pub label: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Train(a) => train(a),
    }
}

fn train(args: TrainArgs) -> Result<()> {
    device::check(args.device)?;
    let mut cfg = super::load_config(&args.config)?;
    if cfg.name.is_empty() {
        cfg.name = args.config.clone();
    }
    if let Some(b) = args.micro_batch {
        cfg.train.micro_batch = b;
    }
    if let Some(l) = args.seq_len {
        cfg.train.seq_len = l;
    }
    cfg.train.grad_accum = 1;
    ensure!(cfg.train.micro_batch > 0 && cfg.train.seq_len > 0, "--micro-batch and --seq-len must be > 0");
    ensure!(
        cfg.train.seq_len <= cfg.model.max_seq_len,
        "--seq-len {} exceeds model.max_seq_len {}",
        cfg.train.seq_len,
        cfg.model.max_seq_len
    );
    ensure!(args.steps > 0, "--steps must be > 0");
    cfg.validate().with_context(|| format!("invalid config `{}`", args.config))?;
    if args.device == Device::Cpu && args.gemm.iter().any(|g| *g != Gemm::F32) {
        anyhow::bail!("--gemm bf16 needs --device cuda");
    }
    let opts = DeviceOptions { deterministic: args.deterministic, ..DeviceOptions::default() };
    device::dispatch(args.device, opts, Bench { cfg, args })
}

struct Bench {
    cfg: RunConfig,
    args: TrainArgs,
}

impl OnBackend for Bench {
    type Output = ();
    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        bench_train(backend, &self.cfg, &self.args)
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Op category of a backend op name, for the profile summary.
fn category(op: &str) -> &'static str {
    match op {
        "matmul_fwd" | "matmul_bwd" => "GEMM (linear layers, LM head)",
        "attention_fwd" | "attention_bwd" => "attention",
        "rmsnorm_fwd" | "rmsnorm_bwd" => "RMSNorm",
        "rope_fwd" | "rope_bwd" => "RoPE",
        "swiglu_fwd" | "swiglu_bwd" | "gelu_fwd" | "gelu_bwd" => "activations",
        "cross_entropy_fwd" | "cross_entropy_bwd" | "cross_entropy_fwd_bwd" | "bce_logits_fwd" | "bce_logits_bwd" => "losses",
        "topk_segments" | "gate_fwd" | "gate_bwd" | "softmax_fwd" | "softmax_bwd" | "index_fill" => "routing",
        "gather_rows" | "scatter_add_rows" | "scatter_add_scaled" | "scatter_add_scaled_bwd" | "scatter_rows"
        | "scatter_rows_bwd" | "embedding_fwd" | "embedding_bwd" => "gather/scatter/embedding",
        "fill" | "fill_many" | "copy" | "axpy" | "scale" => "elementwise (fill/copy/axpy)",
        "adamw" | "adamw_many" | "sum_squares" => "optimizer (AdamW, grad norm)",
        op if op.starts_with("detail: ") => "detail (inside an op above)",
        _ => "transfers and allocation",
    }
}

/// AdamW for the main parameters, and for the aux routers where the config trains them.
fn optimizers<B: Backend>(b: &B, model: &Model<B>, cfg: &RunConfig) -> (AdamW<B>, Option<AdamW<B>>) {
    model_optimizers(b, &model.params, &cfg.model, AdamWConfig::from_train(&cfg.train))
}

/// How a bench step runs: each part eager or by CUDA graphs.
struct Runners {
    micro: StepRunner,
    optimizer: OptimizerRunner,
}

impl Runners {
    fn new(graphs: bool) -> Self {
        Runners { micro: StepRunner::new(graphs), optimizer: OptimizerRunner::new(graphs) }
    }
}

/// One optimizer step of `model` on `batch`: zeroed gradients, forward and backward, AdamW
/// (`runners`: eager or by CUDA graphs).
fn train_step<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    main: &mut AdamW<B>,
    aux: &mut Option<AdamW<B>>,
    batch: &Batch,
    lr: f64,
    runners: &mut Runners,
) -> Result<mor_model::Stats> {
    model.params.zero_grads(b);
    let stats = runners.micro.step(b, model, batch, 1.0)?;
    runners.optimizer.step(b, &mut model.params, main, aux.as_mut(), lr)?;
    model.after_optimizer_step();
    Ok(stats)
}

/// `steps` training steps of two copies of the model on the same batches, one eager and one
/// replaying a CUDA graph from its second step on: the largest relative loss difference and the
/// largest parameter difference at the end.
fn graph_check<B: Backend>(b: &B, cfg: &RunConfig, steps: usize, head_chunk: usize) -> Result<()> {
    let (bsz, len) = (cfg.train.micro_batch, cfg.train.seq_len);
    let tokens = bsz * len;
    let batch_seed = 0x9E37_79B9_7F4A_7C15 ^ cfg.train.seed;
    let vocab = cfg.model.vocab_size as u64;
    let mut runs = Vec::new();
    for graphed in [false, true] {
        let mut model = Model::new(b, cfg.model.clone(), cfg.train.seed)?;
        model.head_chunk_elems = head_chunk;
        let (mut main, mut aux) = optimizers(b, &model, cfg);
        let mut runners = Runners::new(graphed);
        let mut losses = Vec::new();
        // Both copies see the same batches.
        let mut r = Rng(batch_seed);
        for _ in 0..steps {
            let seq: Vec<u32> = (0..tokens + 1).map(|_| (r.next() % vocab) as u32).collect();
            let batch = Batch { inputs: &seq[..tokens], targets: &seq[1..], batch: bsz, seq_len: len, doc_starts: None };
            losses.push(train_step(b, &mut model, &mut main, &mut aux, &batch, 1e-4, &mut runners)?.loss);
        }
        if graphed {
            ensure!(runners.micro.replays > 0, "graph check: no step was recordable ({})", runners.micro.last_eager.clone().unwrap_or_default());
        }
        let params: Vec<Vec<f32>> = model.params.values.iter().map(|v| b.to_f32(v)).collect();
        runs.push((losses, params));
    }
    let (eager, graphed) = (&runs[0], &runs[1]);
    let loss_diff = eager.0.iter().zip(&graphed.0).map(|(a, g)| ((a - g) / a).abs()).fold(0.0, f64::max);
    let same_losses = eager.0.iter().zip(&graphed.0).all(|(a, g)| a.to_bits() == g.to_bits());
    let param_diff = eager.1.iter().flatten().zip(graphed.1.iter().flatten()).map(|(a, g)| (a - g).abs()).fold(0.0f32, f32::max);
    eprintln!(
        "graph check, {steps} steps eager vs CUDA graph: losses {} (largest relative difference {loss_diff:.3e}), largest parameter difference {param_diff:.3e}",
        if same_losses { "bit-identical" } else { "differ" }
    );
    eprintln!("  eager losses  {:?}", eager.0);
    eprintln!("  graphed losses {:?}", graphed.0);
    Ok(())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn bench_train<B: Backend>(b: &B, cfg: &RunConfig, args: &TrainArgs) -> Result<()> {
    let (bsz, len) = (cfg.train.micro_batch, cfg.train.seq_len);
    let tokens = bsz * len;
    let map = cfg.model.sharing_map()?;
    let counts = cfg.model.param_counts()?;
    let flops_per_token = accounting::train_flops_per_token(&cfg.model, &map, len);
    let label = args.label.clone().unwrap_or_else(|| cfg.name.clone());
    b.synchronize();
    let mem_base = b.memory_info().map(|m| m.0);
    let t_init = Instant::now();
    let mut model = Model::new(b, cfg.model.clone(), cfg.train.seed)?;
    let head_chunk = args.head_chunk.unwrap_or(mor_model::default_head_chunk_elems(b.name()));
    model.head_chunk_elems = head_chunk;
    let (mut main, mut aux) = optimizers(b, &model, cfg);
    b.synchronize();
    let init_s = t_init.elapsed().as_secs_f64();
    eprintln!(
        "bench {label}: {} parameters, {bsz} x {len} = {tokens} tokens per step, {} warm-up + {} timed steps on {} (model ready in {init_s:.1}s)",
        super::si(counts.total as f64),
        args.warmup,
        args.steps,
        b.name()
    );
    let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ cfg.train.seed);
    let vocab = cfg.model.vocab_size as u64;
    let mem_peak = std::cell::Cell::new(0usize);
    let lr = 1e-4;
    let mut step_no = 0usize;
    // One training step on fresh random tokens; returns (seconds, loss).
    let mut step = |model: &mut Model<B>, main: &mut AdamW<B>, aux: &mut Option<AdamW<B>>, runners: &mut Runners| -> Result<(f64, f64)> {
        let seq: Vec<u32> = (0..tokens + 1).map(|_| (rng.next() % vocab) as u32).collect();
        let (inputs, targets) = (&seq[..tokens], &seq[1..]);
        let batch = Batch { inputs, targets, batch: bsz, seq_len: len, doc_starts: None };
        b.synchronize();
        let t0 = Instant::now();
        let stats = train_step(b, model, main, aux, &batch, lr, runners)?;
        b.synchronize();
        let dt = t0.elapsed().as_secs_f64();
        if let Some((used, _)) = b.memory_info() {
            mem_peak.set(mem_peak.get().max(used));
        }
        Ok((dt, stats.loss))
    };
    for &gemm in &args.gemm {
        let prec = match gemm {
            Gemm::F32 => MatmulPrecision::F32,
            Gemm::Bf16 => MatmulPrecision::Bf16,
        };
        ensure!(b.set_matmul_precision(prec), "the {} backend has no {prec:?} GEMMs", b.name());
        // Activation buffers take the precision's element type when they are made.
        model.free_workspace();
        if args.graph_check > 0 {
            graph_check(b, cfg, args.graph_check, head_chunk)?;
        }
        ensure!(!args.cuda_graph || args.warmup >= 2, "--cuda-graph needs --warmup >= 2 (one step allocates, the next records the graph)");
        let mut runners = Runners::new(args.cuda_graph);
        let mut times = Vec::new();
        let mut losses = Vec::new();
        for i in 0..args.warmup + args.steps {
            let (dt, loss) = step(&mut model, &mut main, &mut aux, &mut runners)?;
            step_no += 1;
            losses.push(loss);
            let tag = if i < args.warmup { " (warm-up)" } else { "          " };
            eprintln!("  step {step_no:>3} {gemm:?}{tag} {:>9.1} ms  loss {loss:.4}", dt * 1e3);
            if i >= args.warmup {
                times.push(dt);
            }
        }
        let mut profile: Vec<(String, f64, u64)> = Vec::new();
        let mut prof_wall = 0.0;
        if args.profile_steps > 0 {
            if b.set_profiling(true) {
                b.take_profile();
                for _ in 0..args.profile_steps {
                    let (dt, loss) = step(&mut model, &mut main, &mut aux, &mut Runners::new(false))?;
                    step_no += 1;
                    prof_wall += dt;
                    eprintln!("  step {step_no:>3} {gemm:?} (profiled) {:>9.1} ms  loss {loss:.4}", dt * 1e3);
                }
                profile = b.take_profile();
                b.set_profiling(false);
            } else {
                eprintln!("  (the {} backend does not profile ops)", b.name());
            }
        }
        let step_s = median(&times);
        let tps = tokens as f64 / step_s;
        let achieved = tps * flops_per_token;
        let mfu = achieved / (args.peak_tflops * 1e12);
        let gib = |x: usize| x as f64 / (1u64 << 30) as f64;
        let est = mor_model::memory::estimate(&cfg.model, bsz, len, head_chunk)?;
        let est_bytes = est.peak_bytes(if gemm == Gemm::Bf16 { 2 } else { 4 });
        let gemm_name = format!("{gemm:?}").to_lowercase();
        let mut text = format!(
            "{label} on {} ({gemm_name} GEMMs): {bsz} x {len} tokens, median step {:.1} ms (min {:.1}, max {:.1}) over {} steps\n  \
             throughput      {:.0} tokens/s\n  \
             train FLOPs/tok {} (6N + causal attention, recursion-aware)\n  \
             achieved        {:.1} TFLOP/s; MFU {:.2}% of {} TFLOP/s (dense bf16 peak)\n",
            b.name(),
            step_s * 1e3,
            times.iter().cloned().fold(f64::INFINITY, f64::min) * 1e3,
            times.iter().cloned().fold(0.0, f64::max) * 1e3,
            times.len(),
            tps,
            super::si(flops_per_token),
            achieved / 1e12,
            mfu * 100.0,
            args.peak_tflops
        );
        if let Some(base) = mem_base {
            text.push_str(&format!(
                "  peak memory     {:.2} GiB device used (cuMemGetInfo, sampled after each step so far), {:.2} GiB above the {:.2} GiB before the model\n",
                gib(mem_peak.get()),
                gib(mem_peak.get().saturating_sub(base)),
                gib(base)
            ));
        }
        text.push_str(&format!("  estimate        {:.2} GiB (params, grads, AdamW, activations, weight copies; `mor train --dry-run`)\n", gib(est_bytes)));
        let mut prof_json = Vec::new();
        if !profile.is_empty() {
            let steps = args.profile_steps as f64;
            // Detail entries (GEMMs by shape) are also inside their op's time.
            let (details, profile): (Vec<_>, Vec<_>) = profile.into_iter().partition(|p| p.0.starts_with("detail: "));
            let total: f64 = profile.iter().map(|p| p.1).sum();
            let wall = prof_wall;
            let idle = (wall - total).max(0.0);
            text.push_str(&format!(
                "  profile over {} more steps, GPU time per op from CUDA events: per step {:.1} ms of ops + {:.1} ms the GPU waits (launches, host reads) = {:.1} ms wall\n",
                args.profile_steps,
                total / steps * 1e3,
                idle / steps * 1e3,
                wall / steps * 1e3
            ));
            let mut cats: Vec<(&'static str, f64, u64)> = Vec::new();
            for (op, t, c) in &profile {
                let cat = category(op);
                match cats.iter_mut().find(|x| x.0 == cat) {
                    Some(x) => {
                        x.1 += t;
                        x.2 += c;
                    }
                    None => cats.push((cat, *t, *c)),
                }
            }
            cats.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
            let row = |name: &str, t: f64, calls: Option<u64>| match calls {
                Some(c) => format!("    {name:<32} {:>8.2} {:>6.1}% {:>10.0}\n", t / steps * 1e3, 100.0 * t / wall, c as f64 / steps),
                None => format!("    {name:<32} {:>8.2} {:>6.1}%\n", t / steps * 1e3, 100.0 * t / wall),
            };
            text.push_str("    by category                      ms/step   share   calls/step\n");
            for (cat, t, c) in &cats {
                text.push_str(&row(cat, *t, Some(*c)));
            }
            text.push_str(&row("GPU waiting (launches, host)", idle, None));
            text.push_str("    by op\n");
            for (op, t, c) in profile.iter().take(24) {
                text.push_str(&row(op, *t, Some(*c)));
            }
            if !details.is_empty() {
                text.push_str("    bf16 GEMMs by shape (cuBLASLt column-major view; inside the GEMM ops above)\n");
                for (op, t, c) in details.iter().take(32) {
                    let name = op.trim_start_matches("detail: ");
                    text.push_str(&format!("      {:>8.3} ms/step {:>5.0} calls  {name}\n", t / steps * 1e3, *c as f64 / steps));
                }
            }
            for (op, t, c) in profile.iter().chain(&details) {
                prof_json.push(json!({"op": op, "category": category(op), "ms_per_step": t / steps * 1e3, "share": t / wall, "calls_per_step": *c as f64 / steps}));
            }
            prof_json.push(json!({"op": "(GPU waiting)", "category": "GPU waiting (launches, host)", "ms_per_step": idle / steps * 1e3, "share": idle / wall, "calls_per_step": 0}));
        }
        super::print(&text)?;
        if let Some(path) = &args.json {
            let rec = json!({
                "impl": "mor",
                "label": label,
                "config": cfg.name,
                "device": b.name(),
                "gemm": gemm_name,
                "micro_batch": bsz,
                "seq_len": len,
                "tokens_per_step": tokens,
                "warmup": args.warmup,
                "steps": args.steps,
                "step_ms_median": step_s * 1e3,
                "step_ms": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
                "tokens_per_s": tps,
                "train_flops_per_token": flops_per_token,
                "achieved_tflops": achieved / 1e12,
                "mfu": mfu,
                "peak_tflops": args.peak_tflops,
                "params": counts.total,
                "peak_mem_gib": mem_base.map(|_| gib(mem_peak.get())),
                "mem_before_model_gib": mem_base.map(gib),
                "estimate_gib": gib(est_bytes),
                "init_s": init_s,
                "losses": losses,
                "deterministic": args.deterministic,
                "profile_steps": args.profile_steps,
                "profile_step_ms": if args.profile_steps > 0 { prof_wall / args.profile_steps as f64 * 1e3 } else { 0.0 },
                "ops": prof_json,
            });
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            writeln!(f, "{rec}")?;
        }
    }
    Ok(())
}
