//! `mor eval nll` and `mor eval tasks`.
//!
//! * `nll --model PATH --data SHARDS [--rows 500] [--seq-len 2048] [--routing threshold|topk]`:
//!   mean over the first N validation rows of each row's mean token cross-entropy
//!   (MOR_SPEC 8.1).
//! * `tasks --model PATH --tasks lambada,hellaswag,... [--limit N] [--shots K] [--seed S]
//!   [--json] [--out FILE]`: lm-evaluation-harness style log-likelihood scoring; prints the
//!   paper's table (LD HS PQ WG ARC MMLU Avg) and per-task metrics; `--json` prints the JSON
//!   report instead, `--out` also writes it to a file.
//!
//! Routing: `threshold` (default) decides per token from its own router score (causal);
//! `topk` is the released code's sequence-level top-k, which looks at future tokens: results
//! are flagged `"causal": false`.

use anyhow::{bail, Context, Result};
use mor_engine::Cpu;
use mor_eval::nll::{routing_is_causal, routing_name, validation_nll, NllOptions};
use mor_eval::tasks::{default_data_dir, expand_task_list, load_task};
use mor_eval::{run_task, ModelScorer, PaperTable, RunOptions};
use mor_data::TokenSource;
use mor_model::Routing;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum EvalCommand {
    /// Validation NLL over packed rows of a token shard folder (`val` split).
    Nll(NllArgs),
    /// Log-likelihood tasks (LAMBADA, HellaSwag, PIQA, WinoGrande, ARC, MMLU, JSONL).
    Tasks(TasksArgs),
}

#[derive(Debug, clap::Args)]
pub struct NllArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Token shard folder (from `mor data prepare`).
    #[arg(long)]
    pub data: PathBuf,
    /// Split of the shard folder.
    #[arg(long, default_value = "val")]
    pub split: String,
    #[arg(long, default_value_t = 500)]
    pub rows: usize,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// threshold (causal, default) or topk (released code, non-causal).
    #[arg(long, default_value = "threshold")]
    pub routing: String,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct TasksArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated: lambada, hellaswag, piqa, winogrande, arc_easy, arc_challenge, mmlu,
    /// `arc` (both), `paper` (all seven), or paths of .jsonl task files.
    #[arg(long, default_value = "paper")]
    pub tasks: String,
    /// Evaluate only the first N documents of each task (MMLU: round-robin over subjects).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Few-shot examples per document.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// Seed of the few-shot sampling.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Requests per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// threshold (causal, default) or topk (released code, non-causal).
    #[arg(long, default_value = "threshold")]
    pub routing: String,
    /// Evaluation data folder (default: $MOR_EVAL_DATA or .assets/eval).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Print the JSON report on stdout (the tables go to stderr).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Include per-document log-likelihoods and predictions in the JSON.
    #[arg(long)]
    pub per_doc: bool,
}

fn parse_routing(s: &str) -> Result<Routing> {
    Ok(match s {
        "threshold" => Routing::Threshold,
        "topk" => Routing::TopK,
        _ => bail!("--routing {s}: expected threshold or topk"),
    })
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        EvalCommand::Nll(a) => nll(a),
        EvalCommand::Tasks(a) => tasks(a),
    }
}

fn nll(a: NllArgs) -> Result<()> {
    let routing = parse_routing(&a.routing)?;
    let backend = Cpu::<f32>::new();
    let mut loaded = mor_interop::load::load_any(&backend, &a.model)?;
    let src = mor_data::ShardSource::open(&a.data, &a.split, &Default::default())?;
    anyhow::ensure!(
        src.vocab_size() <= loaded.model.cfg.vocab_size,
        "{}: token ids up to {} but the model has {} embedding rows",
        a.data.display(),
        src.vocab_size(),
        loaded.model.cfg.vocab_size
    );
    let opts = NllOptions { rows: a.rows, seq_len: a.seq_len, routing, batch: a.batch };
    let r = validation_nll(&backend, &mut loaded.model, &src, &opts)?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = json!(loaded.source);
        v["data"] = json!(a.data.display().to_string());
        return super::print_json(&v);
    }
    let flag = if r.causal { "causal" } else { "NON-CAUSAL: sequence-level top-k sees future tokens" };
    super::print(&format!(
        "val NLL {:.4} nats ({} rows x {} tokens, routing {} [{flag}])\n",
        r.nll, r.rows, r.seq_len, r.routing
    ))
}

fn tasks(a: TasksArgs) -> Result<()> {
    let routing = parse_routing(&a.routing)?;
    let data = a.data.clone().unwrap_or_else(default_data_dir);
    let names = expand_task_list(&a.tasks);
    anyhow::ensure!(!names.is_empty(), "--tasks is empty");
    // Load every task first: missing data fails before the (slow) model work.
    let tasks = names.iter().map(|n| load_task(n, &data)).collect::<Result<Vec<_>>>()?;
    let backend = Cpu::<f32>::new();
    let mut loaded = mor_interop::load::load_any(&backend, &a.model)?;
    let tok = loaded
        .tokenizer
        .take()
        .with_context(|| format!("{}: no tokenizer found (GGUF metadata, or tokenizer.json next to the weights)", a.model.display()))?;
    let causal = routing_is_causal(&loaded.model, routing);
    let opts = RunOptions { shots: a.shots, seed: a.seed, limit: a.limit, per_doc: a.per_doc };
    let mut reports = Vec::new();
    for task in &tasks {
        let name = task.name.clone();
        let mut scorer = ModelScorer::new(&backend, &mut loaded.model, routing, a.batch_size);
        let t0 = std::time::Instant::now();
        scorer.progress = Some(Box::new(move |done, total| {
            eprint!("\r{name}: {done}/{total} requests ({:.0}s)", t0.elapsed().as_secs_f64());
            let _ = std::io::stderr().flush();
        }));
        let r = run_task(task, &tok, &mut scorer, &opts)?;
        eprintln!();
        reports.push(r);
    }
    let table = PaperTable::from_reports(&reports);
    let report = json!({
        "model": loaded.source,
        "routing": routing_name(routing),
        "causal": causal,
        "shots": a.shots,
        "seed": a.seed,
        "limit": a.limit,
        "data": data.display().to_string(),
        "table": table,
        "tasks": reports,
    });
    let text = serde_json::to_string_pretty(&report)? + "\n";
    if let Some(p) = &a.out {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    let mut human = String::new();
    if !causal {
        human.push_str("NOTE: routing topk is NON-CAUSAL (sequence-level expert-choice top-k sees future tokens)\n");
    }
    human.push_str(&mor_eval::harness::render_tasks(&reports));
    human.push('\n');
    human.push_str(&table.render());
    if a.json {
        eprint!("{human}");
        super::print(&text)
    } else {
        super::print(&human)
    }
}
