//! Whole-model parity of the CUDA backend against the CPU reference: for every tiny preset
//! (`tiny-*`: vanilla, recursive with each sharing strategy, expert-choice MoR with and without KV
//! sharing, token-choice MoR), the 135M vanilla / recursive / MoR-E (with and without KV sharing) /
//! MoR-T presets, and every variant of the model test suite (MLP / tanh / identity
//! routers, aux router, untied attention, replace combine, random router, loss-free balancing,
//! document masking), the same weights and batch on `Cpu<f32>` and `Cuda`:
//!
//! * loss and cross-entropy of a training forward,
//! * the token selections of every recursion (expert-choice) / depths (token-choice), exactly,
//! * every parameter gradient after the backward,
//! * then one AdamW step (clipping included) on both, and the loss of a second forward.
//!
//! ```text
//! cargo build --release --features cuda -p mor-train --example model_parity
//! model_parity [--bf16] [--only NAME,...]
//! ```
//! Errors: scalars `|gpu - cpu| / |cpu|`; a gradient tensor norm-wise, `||gpu - cpu|| / ||cpu||`,
//! and element-wise as in `cuda_parity`, `max_i |gpu_i - cpu_i| / (|cpu_i| + mean_j |cpu_j|)`;
//! `G err` (printed, not a bar) the norm-wise error of the whole gradient vector, every parameter
//! together (docs/design/bf16-gradient-error.md measures the bf16 mode by it).
//!
//! Pass (fp32): loss, CE, aux losses and the gradient norm within 1e-4; every gradient within 1e-4
//! norm-wise and 2e-4 element-wise (the op-level bound for long reductions: GEMMs and attention
//! sum in another order than the CPU); identical selections; loss after the AdamW step within
//! 1e-3 (Adam normalises each gradient entry, so entries whose gradient is ~0 may move either way).
//!
//! `--bf16` runs the bf16 GEMM path (`GemmPrecision::Bf16`) against the fp32 CPU reference. Its bar
//! is a smoke test against layout and precision-plumbing bugs (those give errors of order 1), not
//! an accuracy claim: loss within 1e-2, gradient norm within 5e-2 (bf16 activations: the 2-layer
//! `test:` models reach 2.5e-2), gradients within 0.2 norm-wise, loss after the step within 0.1. A case whose selections differ there (near-ties under bf16 rounding) is
//! reported and not compared further. Exits non-zero if any check fails.

#[path = "../../mor-model/tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

#[path = "shared/batch_tokens.rs"]
mod batch_tokens;

use batch_tokens::tokens;
use mor_config::ModelConfig;
use mor_engine::cuda::{CudaOptions, GemmPrecision};
use mor_engine::{Backend, Cpu, Cuda, ParamGroup};
use mor_model::{Batch, Model, Routing};
use mor_train::{AdamW, AdamWConfig};
use std::time::Instant;

struct Case {
    name: String,
    cfg: ModelConfig,
    batch: usize,
    seq_len: usize,
    docs: Option<Vec<Vec<u32>>>,
    /// Smaller LM-head chunks (exercises the chunked head on the device).
    head_rows: Option<usize>,
    /// Hold gradients to the element-wise bar too. Off for the 135M presets: their tied
    /// 49152 x 576 embedding gradient is mostly LM-head sums of signed terms that nearly cancel,
    /// where fp32 summation order alone moves entries near zero by ~1e-3 of the mean magnitude
    /// (measured: norm-wise 2-3e-6, element-wise 0.7-1.7e-3); the norm-wise bar still applies.
    elementwise: bool,
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let mean = b.iter().map(|x| x.abs() as f64).sum::<f64>() / b.len().max(1) as f64;
    let mut worst = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            if x.to_bits() != y.to_bits() {
                return f64::INFINITY;
            }
            continue;
        }
        worst = worst.max((x as f64 - y as f64).abs() / (y.abs() as f64 + mean + 1e-30));
    }
    worst
}

/// `||a - b|| / ||b||` (informational).
fn norm_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

fn scalar_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for name in mor_config::preset_names().into_iter().filter(|n| n.starts_with("tiny-")) {
        let cfg = mor_config::load(name).expect("preset loads").model;
        out.push(Case { name: name.to_string(), cfg, batch: 4, seq_len: 64, docs: None, head_rows: Some(100), elementwise: true });
    }
    let cfg = mor_config::load("tiny-mor-ec3").unwrap().model;
    let docs = vec![vec![10, 40], vec![], vec![63], vec![1, 2, 3]];
    out.push(Case { name: "tiny-mor-ec3+docmask".into(), cfg, batch: 4, seq_len: 64, docs: Some(docs), head_rows: None, elementwise: true });
    for (name, cfg) in common::variants() {
        out.push(Case { name: format!("test:{name}"), cfg, batch: 3, seq_len: 16, docs: None, head_rows: Some(7), elementwise: true });
    }
    // The paper's smallest size (d 576, 9/3 heads, vocab 49152) of each family, at 2 x 128 tokens.
    for name in ["135m-vanilla", "135m-rec3-mcycle", "135m-mor-ec3", "135m-mor-ec3-share", "135m-mor-tc3"] {
        let cfg = mor_config::load(name).expect("preset loads").model;
        out.push(Case { name: name.to_string(), cfg, batch: 2, seq_len: 128, docs: None, head_rows: Some(64), elementwise: false });
    }
    out
}

/// Pass thresholds; see the module docs.
struct Tol {
    /// Loss, cross-entropy, aux losses.
    scalar: f64,
    grad_norm: f64,
    grad_norm_wise: f64,
    /// `None`: element-wise errors are reported only.
    grad_elem: Option<f64>,
    after_step: f64,
}

const TOL_F32: Tol = Tol { scalar: 1e-4, grad_norm: 1e-4, grad_norm_wise: 1e-4, grad_elem: Some(2e-4), after_step: 1e-3 };
const TOL_BF16: Tol = Tol { scalar: 1e-2, grad_norm: 5e-2, grad_norm_wise: 0.2, grad_elem: None, after_step: 0.1 };

struct Outcome {
    ok: bool,
    line: String,
    failures: Vec<String>,
}

fn optimizers<B: Backend>(b: &B, model: &Model<B>) -> Vec<AdamW<B>> {
    let (main, aux) = mor_train::model_optimizers(b, &model.params, &model.cfg, AdamWConfig::default());
    std::iter::once(main).chain(aux).collect()
}

fn run_case(c: &Cpu<f32>, g: &Cuda, case: &Case, t: &Tol, bf16: bool) -> Outcome {
    let tol = t.scalar;
    let mut failures = Vec::new();
    let n = case.batch * case.seq_len;
    let vocab = case.cfg.vocab_size;
    let inputs = tokens(n, vocab, 11);
    let mut targets = tokens(n, vocab, 12);
    targets[n / 3] = u32::MAX; // an ignored position
    let docs = case.docs.as_deref();
    let batch = Batch { inputs: &inputs, targets: &targets, batch: case.batch, seq_len: case.seq_len, doc_starts: docs };

    let mut mc = Model::new(c, case.cfg.clone(), 7).expect("model");
    let mut mg = Model::new(g, case.cfg.clone(), 7).expect("model");
    if let Some(r) = case.head_rows {
        mc.head_chunk_elems = r * vocab;
        mg.head_chunk_elems = r * vocab;
    }
    let sc = mc.forward(c, &batch, Routing::TopK, true, 1.0).expect("cpu forward");
    let sg = mg.forward(g, &batch, Routing::TopK, true, 1.0).expect("gpu forward");
    let (selc, selg) = (mc.selections(), mg.selections());
    let same_sel = selc == selg && mc.token_depths() == mg.token_depths();
    let loss_err = scalar_err(sg.loss, sc.loss);
    let ce_err = scalar_err(sg.ce, sc.ce);
    if !same_sel {
        let diff: usize = selc.iter().zip(&selg).map(|(a, b)| a.iter().filter(|x| !b.contains(x)).count()).sum();
        let line = format!(
            "{:<28} loss {:.6} / {:.6} err {:.1e}  selections DIFFER ({diff} tokens){}",
            case.name,
            sc.loss,
            sg.loss,
            loss_err,
            if bf16 { " (bf16 near-tie; not compared further)" } else { "" }
        );
        if !bf16 {
            failures.push(format!("{}: selections differ", case.name));
        }
        return Outcome { ok: bf16, line, failures };
    }
    if !(loss_err <= tol) {
        failures.push(format!("{}: loss err {loss_err:.3e}", case.name));
    }
    if !(ce_err <= tol) {
        failures.push(format!("{}: ce err {ce_err:.3e}", case.name));
    }
    let aux_err = scalar_err(sg.aux_bce + sg.z_loss + sg.balance_loss, sc.aux_bce + sc.z_loss + sc.balance_loss);
    if sc.aux_bce + sc.z_loss + sc.balance_loss > 0.0 && !(aux_err <= tol) {
        failures.push(format!("{}: aux losses err {aux_err:.3e}", case.name));
    }
    mc.backward(c).expect("cpu backward");
    mg.backward(g).expect("gpu backward");
    let mut worst = (0.0f64, String::new());
    let mut worst_norm = 0.0f64;
    // The whole gradient vector: ||G_gpu - G_cpu||² and ||G_cpu||² over every parameter.
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    for (i, info) in mc.params.info.iter().enumerate() {
        let (gg, cc) = (g.to_f32(&mg.params.grads[i]), c.to_f32(&mc.params.grads[i]));
        for (a, b) in gg.iter().zip(&cc) {
            diff2 += (*a as f64 - *b as f64).powi(2);
            ref2 += (*b as f64).powi(2);
        }
        let e = rel_err(&gg, &cc);
        let en = norm_err(&gg, &cc);
        worst_norm = worst_norm.max(en);
        if !(en <= t.grad_norm_wise) {
            failures.push(format!("{}: grad {} norm-wise err {en:.3e}", case.name, info.name));
        }
        if let (Some(te), true) = (t.grad_elem, case.elementwise) {
            if !(e <= te) {
                failures.push(format!("{}: grad {} element-wise err {e:.3e}", case.name, info.name));
            }
        }
        if !(e <= worst.0) {
            worst = (e, info.name.clone());
        }
    }
    // One optimizer step on both, then the loss of the updated model.
    let lr = 1e-3;
    let mut oc = optimizers(c, &mc);
    let mut og = optimizers(g, &mg);
    let mut gn = (0.0, 0.0);
    for (a, b) in oc.iter_mut().zip(og.iter_mut()) {
        let s1 = a.step(c, &mut mc.params, lr);
        let s2 = b.step(g, &mut mg.params, lr);
        if a.group() == ParamGroup::Main {
            gn = (s1.grad_norm, s2.grad_norm);
        }
    }
    mc.after_optimizer_step();
    mg.after_optimizer_step();
    let gn_err = scalar_err(gn.1, gn.0);
    if !(gn_err <= t.grad_norm) {
        failures.push(format!("{}: grad norm err {gn_err:.3e}", case.name));
    }
    let sc2 = mc.forward(c, &batch, Routing::TopK, false, 1.0).expect("cpu forward 2");
    let sg2 = mg.forward(g, &batch, Routing::TopK, false, 1.0).expect("gpu forward 2");
    let step_err = scalar_err(sg2.loss, sc2.loss);
    if !(step_err <= t.after_step) {
        failures.push(format!("{}: loss after one AdamW step err {step_err:.3e}", case.name));
    }
    let ok = failures.is_empty();
    let line = format!(
        "{:<28} loss {:>9.6} err {:>8.1e} | grads max err {:>8.1e} (norm-wise {:>8.1e}; worst {}; G err {:>8.1e}) | |g| err {:>8.1e} | after step err {:>8.1e}  {}",
        case.name,
        sc.loss,
        loss_err,
        worst.0,
        worst_norm,
        worst.1.replace("model.", ""),
        (diff2 / ref2.max(f64::MIN_POSITIVE)).sqrt(),
        gn_err,
        step_err,
        if ok { "PASS" } else { "FAIL" }
    );
    Outcome { ok, line, failures }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bf16 = args.iter().any(|a| a == "--bf16");
    let only: Vec<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let mut opts = CudaOptions::from_env();
    opts.profile = false;
    if bf16 {
        opts.gemm = GemmPrecision::Bf16;
    }
    let t0 = Instant::now();
    let g = Cuda::with_options(0, opts).unwrap_or_else(|e| {
        eprintln!("cannot start the CUDA backend: {e}");
        std::process::exit(2);
    });
    let c = Cpu::<f32>::new();
    let tol = if bf16 { &TOL_BF16 } else { &TOL_F32 };
    println!(
        "whole-model parity, Cuda ({}, GEMMs {:?}) vs Cpu<f32>; pass: losses {:.0e}, gradient norm {:.0e}, gradients {:.0e} norm-wise{}, loss after one step {:.0e} (backend ready in {:.2}s)",
        g.device_name(),
        opts.gemm,
        tol.scalar,
        tol.grad_norm,
        tol.grad_norm_wise,
        tol.grad_elem.map_or(String::new(), |e| format!(" and {e:.0e} element-wise")),
        tol.after_step,
        t0.elapsed().as_secs_f64()
    );
    let mut all_ok = true;
    let mut failures = Vec::new();
    let mut count = 0;
    for case in cases() {
        if !only.is_empty() && !only.iter().any(|o| case.name.contains(o.as_str())) {
            continue;
        }
        count += 1;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&c, &g, &case, tol, bf16)));
        match out {
            Ok(o) => {
                println!("{}", o.line);
                all_ok &= o.ok;
                failures.extend(o.failures);
            }
            Err(_) => {
                println!("{:<28} PANICKED", case.name);
                all_ok = false;
                failures.push(format!("{}: panicked", case.name));
            }
        }
    }
    println!("{count} models, {} failures, {:.1}s", failures.len(), t0.elapsed().as_secs_f64());
    for f in failures.iter().take(40) {
        println!("FAILED: {f}");
    }
    if all_ok && failures.is_empty() {
        println!("model parity: all passed");
    } else {
        std::process::exit(1);
    }
}
