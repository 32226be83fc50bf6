//! Loss, aux losses, routing decisions and logits of one training-mode forward of a mor
//! checkpoint on a given batch, as JSON: the mor side of `scripts/reference/torch_parity.py`
//! (which compares them with the independent PyTorch reference `scripts/reference/mor_torch.py`).
//!
//! ```text
//! cargo run --release -p mor-train --example dump_logits -- CHECKPOINT IDS.json [--out OUT.json]
//!     [--logits LOGITS.f32] [--device cpu|cuda]
//! ```
//! * `CHECKPOINT`: a run directory or checkpoint directory written by `mor train` / `mor import`
//!   (`state.json` + `model.safetensors`).
//! * `IDS.json`: `{"ids": [[t0, t1, ..., tL], ...]}`, `B` rows of `L + 1` token ids each; the
//!   model reads `row[..L]` and predicts `row[1..]`.
//! * `--logits FILE`: also write the logits of every position as raw little-endian f32,
//!   row-major `[B * L, vocab]` (position `b * L + t`).
//! * `--device cuda`: the CUDA backend (build with `--features cuda`; fp32 GEMMs unless
//!   `MOR_GEMM`-style options in the environment say otherwise, see `CudaOptions::from_env`).
//!
//! The forward is the one `mor train` runs (`Routing::TopK`, `grad = true`, capacity warm-up
//! read from the checkpoint's router state); no backward, no parameter changes.
//!
//! JSON output: `loss` (the training objective), `ce`, `aux_bce` (expert-choice BCE summed over
//! steps, unweighted), `aux_router_bce`, `z_loss`, `balance_loss` (unweighted), `token_ce`
//! (`[B * L]`), `depths` (`[B * L]` recursions per position), `selections` (per recursion step, the
//! flat positions `b * L + t` selected (expert-choice) / active (token-choice)), plus the config
//! name, device and shapes.

use anyhow::{bail, Context, Result};
use mor_engine::{Backend, Cpu};
use mor_model::{Batch, Routing};
use serde_json::{json, Value};
use std::path::PathBuf;

struct Args {
    ckpt: PathBuf,
    ids: PathBuf,
    out: Option<PathBuf>,
    logits: Option<PathBuf>,
    device: String,
}

const USAGE: &str = "usage: dump_logits CHECKPOINT IDS.json [--out OUT.json] [--logits LOGITS.f32] [--device cpu|cuda]";

fn parse_args() -> Result<Args> {
    let mut pos = Vec::new();
    let (mut out, mut logits, mut device) = (None, None, "cpu".to_string());
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--logits" => logits = Some(PathBuf::from(value("--logits")?)),
            "--device" => device = value("--device")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with("--") => bail!("unknown option {s}\n{USAGE}"),
            _ => pos.push(PathBuf::from(a)),
        }
    }
    if pos.len() != 2 {
        bail!("expected CHECKPOINT and IDS.json\n{USAGE}");
    }
    if device != "cpu" && device != "cuda" {
        bail!("--device {device}: expected cpu or cuda");
    }
    let ids = pos.pop().unwrap();
    let ckpt = pos.pop().unwrap();
    Ok(Args { ckpt, ids, out, logits, device })
}

/// `B` rows of `L + 1` ids from `{"ids": [[...], ...]}`.
fn read_ids(path: &PathBuf) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let rows = v.get("ids").and_then(Value::as_array).with_context(|| format!("{}: expected an object with an array \"ids\"", path.display()))?;
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let r = r.as_array().with_context(|| format!("{}: ids[{i}] is not an array", path.display()))?;
        let row = r
            .iter()
            .map(|x| x.as_u64().filter(|&t| t < u32::MAX as u64).map(|t| t as u32))
            .collect::<Option<Vec<u32>>>()
            .with_context(|| format!("{}: ids[{i}] holds something other than token ids", path.display()))?;
        out.push(row);
    }
    if out.is_empty() || out[0].len() < 2 {
        bail!("{}: need at least one row of at least 2 ids", path.display());
    }
    if out.iter().any(|r| r.len() != out[0].len()) {
        bail!("{}: rows of different lengths", path.display());
    }
    Ok(out)
}

fn run<B: Backend>(b: &B, args: &Args, device: &str) -> Result<Value> {
    let (mut model, cfg) = mor_train::load_model(b, &args.ckpt).with_context(|| format!("loading {}", args.ckpt.display()))?;
    let rows = read_ids(&args.ids)?;
    let (bsz, len) = (rows.len(), rows[0].len() - 1);
    let inputs: Vec<u32> = rows.iter().flat_map(|r| r[..len].iter().copied()).collect();
    let targets: Vec<u32> = rows.iter().flat_map(|r| r[1..].iter().copied()).collect();
    let batch = Batch { inputs: &inputs, targets: &targets, batch: bsz, seq_len: len, doc_starts: None };
    let forward_calls = model.router_state.forward_calls;
    let s = model.forward(b, &batch, Routing::TopK, true, 1.0)?;
    let n = bsz * len;
    if let Some(path) = &args.logits {
        let all: Vec<usize> = (0..n).collect();
        let logits = model.logits_at(b, &all);
        let mut bytes = Vec::with_capacity(logits.len() * 4);
        for x in logits {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(json!({
        "config": cfg.name,
        "device": device,
        "batch": bsz,
        "seq_len": len,
        "vocab": model.cfg.vocab_size,
        "forward_calls": forward_calls,
        "loss": s.loss,
        "ce": s.ce,
        "aux_bce": s.aux_bce,
        "aux_router_bce": s.aux_router_bce,
        "z_loss": s.z_loss,
        "balance_loss": s.balance_loss,
        "token_ce": model.token_losses(),
        "depths": model.token_depths(),
        "selections": model.selections(),
        "logits_file": args.logits.as_ref().map(|p| p.display().to_string()),
    }))
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &Args) -> Result<Value> {
    let opts = mor_engine::cuda::CudaOptions::from_env();
    let g = mor_engine::Cuda::with_options(0, opts).map_err(|e| anyhow::anyhow!("cannot start the CUDA backend: {e}"))?;
    let name = format!("cuda ({}, GEMMs {:?})", g.device_name(), opts.gemm);
    run(&g, args, &name)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_args: &Args) -> Result<Value> {
    bail!("this binary was built without CUDA support; rebuild with --features cuda")
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let v = if args.device == "cuda" { run_cuda(&args)? } else { run(&Cpu::<f32>::new(), &args, "cpu")? };
    let text = serde_json::to_string(&v)? + "\n";
    match &args.out {
        Some(p) => std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}
