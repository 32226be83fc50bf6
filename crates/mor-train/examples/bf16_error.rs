//! Where the gradient error of the CUDA bf16 mode comes from, on the CPU: the 135M presets (the
//! weights and batch of `model_parity`: seed 7, 2 x 128 tokens, LM head in chunks of 64 rows) run
//! forward + backward on `Cpu<f32>` exactly and under emulated roundings (`mor_engine::cpu`'s
//! precision emulation, which rounds operands exactly as the GPU does), and every configuration is
//! compared with the exact run: loss, global gradient norm (`|g| err`), all gradients as one vector
//! (`G err`: `||G - G_ref|| / ||G_ref||`), and every parameter gradient norm-wise,
//! `||g - g_ref|| / ||g_ref||` (`max grad`, the worst; the acceptance bar of the CUDA issue: 1e-2).
//!
//! ```text
//! cargo run --release -p mor-train --example bf16_error -- [--presets a,b] [--batch 2] [--seq-len 128]
//!     [--study sites,remedies] [--config SPEC]... [--detail SPEC]... [--f64] [--bf16-weights]
//!     [--data-seed 11] [--reference SPEC] [--train-steps N]
//! ```
//! `--presets` also takes `test:NAME`, the small models of the model tests (`model_parity`'s
//! `test:` cases; run them with `--batch 3 --seq-len 16`).
//! `--train-steps N` first trains the model exactly for N AdamW steps (lr 1e-3) on a structured
//! task (random ids below 512, each row repeated twice) and measures on a batch of that task, so
//! the errors are not those of initialisation only.
//! `--reference SPEC` compares against that configuration instead of the exact run (`f32`).
//! `--data-seed S` draws the batch from seeds S (inputs) and S + 1 (targets), 11 as `model_parity`.
//! MoR's routing is discontinuous: a configuration whose selections (expert-choice) or depths
//! (token-choice) differ from the exact run's is marked `DIFFER` in the `sel` column, and its
//! gradient errors measure the different routing, not the precision. `--bf16-weights` rounds every
//! parameter to bf16 once, before all runs (the reference included).
//! A configuration SPEC is a base and assignments, separated by spaces:
//! * base `f32` (nothing rounded) or `bf16` (the GPU's bf16 mode: every GEMM operand bf16 and
//!   the flash-attention roundings);
//! * `flash=on|off`: the flash-attention roundings (q, k, v, dout, P, dS in bf16, `D` from the f32
//!   dout) or none; `flash=FMT`: every attention operand in FMT, `D`'s dout included (its out
//!   stays f32);
//!   `flash.qk=FMT`, `flash.v=FMT`, `flash.dout=FMT`, `flash.p=FMT`, `flash.ds=FMT`: the format of
//!   one operand group alone; `flash.delta=FMT`: the dout that `D = <dout, out>` reads (f32 in the
//!   kernels; `bf16` makes it the dout of `dP`, so the rows of dS sum to zero again);
//!   `flash.delta_out=FMT`: the out that `D` reads (bf16 when activations are stored in bf16);
//! * `logits=FMT`: the LM head's logits stored in FMT before the cross-entropy (`bf16`: CUDA's bf16
//!   mode since session 10);
//! * `weights=bf16` / `weights=noise:EPS`: run at perturbed weights (every parameter rounded to
//!   bf16, or multiplied by `1 + EPS·u`, `u` uniform in [-1, 1]), restored afterwards: how much
//!   the exact gradient itself moves when the weights move by a rounding;
//! * `SITE[.PRODUCT]=FMT[/FMT]`: the operand formats of the GEMMs of a site — `head` (LM head,
//!   `m == vocab`), `attn` (q/k/v/o projections), `mlp` (gate/up/down), `router`, `layers`
//!   (attn + mlp + router), `all` — and product — `fwd` (operands x, W), `dx` (dy, W), `dw` (dy, x);
//!   all three when left out. FMT: `f32` (unchanged), `bf16`, `x2` (split bf16 hi + lo: two bf16
//!   GEMMs), `tf32` (round to nearest), `tf32z` (truncated, as tensor cores read raw f32); one FMT
//!   sets both operands.
//!
//! The `extra` column (GEMM cost) is the GEMM time of the configuration over that of all-bf16
//! GEMMs, minus 1, on a tensor-core GPU: a GEMM costs 1 with bf16 operands, 2 with one split
//! operand, 3 with both split (hi·hi + hi·lo + lo·hi), 2 with TF32 (half the bf16 rate) and 15
//! with an fp32 operand (SGEMM on CUDA cores: ~1/15 of the bf16 tensor-core rate on H100/H200),
//! weighted by the FLOPs of each GEMM of the run ("-" for configurations on the `f32` base).
//! Attention is not counted.
//!
//! `--detail SPEC` prints every parameter's error for that configuration, worst first. `--f64`
//! also runs the full bf16 configuration with f64 accumulation (`Cpu<f64>`, operands rounded the
//! same way) and the exact model in f64: what a different summation order / accumulator changes.

#[path = "shared/batch_tokens.rs"]
mod batch_tokens;

#[path = "../../mor-model/tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use batch_tokens::tokens;
use mor_config::ModelConfig;
use mor_engine::cpu::precision::{AttnRounding, GemmCall, GemmProduct, GemmRule, Operand};
use mor_engine::cpu::CpuFloat;
use mor_engine::{Backend, Cpu, ParamGroup};
use mor_model::{Batch, Model, Routing};
use mor_train::{AdamW, AdamWConfig};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const PRESETS: [&str; 4] = ["135m-vanilla", "135m-rec3-mcycle", "135m-mor-ec3", "135m-mor-tc3"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    Head,
    Attn,
    Mlp,
    Router,
}

/// The assignments of a SPEC: `(sites, product or all, formats)` in order.
#[derive(Clone)]
struct Spec {
    flash: AttnRounding,
    /// Perturbed weights: `Some(0.0)` rounded to bf16, `Some(eps)` relative noise.
    weights: Option<f64>,
    base: [Operand; 2],
    rules: Vec<(Vec<Site>, Option<GemmProduct>, [Operand; 2])>,
    /// The LM head's logits stored in this format (`logits=bf16`: CUDA's bf16 mode).
    logits: Operand,
}

fn fmt(s: &str) -> Operand {
    match s {
        "f32" => Operand::F32,
        "bf16" => Operand::Bf16,
        "x2" => Operand::Bf16x2,
        "tf32" => Operand::Tf32,
        "tf32z" => Operand::Tf32Trunc,
        _ => panic!("unknown format {s:?} (f32, bf16, x2, tf32, tf32z)"),
    }
}

fn parse_spec(s: &str) -> Spec {
    let mut words = s.split_whitespace();
    let (base, flash) = match words.next() {
        Some("f32") => ([Operand::F32; 2], AttnRounding::EXACT),
        Some("bf16") => ([Operand::Bf16; 2], AttnRounding::FLASH),
        w => panic!("spec {s:?}: base must be f32 or bf16, got {w:?}"),
    };
    let mut spec = Spec { flash, base, weights: None, rules: Vec::new(), logits: Operand::F32 };
    for w in words {
        let (lhs, rhs) = w.split_once('=').unwrap_or_else(|| panic!("spec {s:?}: {w:?} is not KEY=VALUE"));
        match lhs {
            "flash" => {
                spec.flash = match rhs {
                    "on" => AttnRounding::FLASH,
                    "off" => AttnRounding::EXACT,
                    f => {
                        let f = fmt(f);
                        AttnRounding { qk: f, v: f, dout: f, delta_dout: f, delta_out: Operand::F32, p: f, ds: f }
                    }
                };
                continue;
            }
            "flash.qk" => {
                spec.flash.qk = fmt(rhs);
                continue;
            }
            "flash.v" => {
                spec.flash.v = fmt(rhs);
                continue;
            }
            "flash.dout" => {
                spec.flash.dout = fmt(rhs);
                continue;
            }
            "flash.delta" => {
                spec.flash.delta_dout = fmt(rhs);
                continue;
            }
            "flash.delta_out" => {
                spec.flash.delta_out = fmt(rhs);
                continue;
            }
            "weights" => {
                spec.weights = Some(match rhs.strip_prefix("noise:") {
                    Some(e) => e.parse().expect("weights=noise:EPS"),
                    None if rhs == "bf16" => 0.0,
                    None => panic!("weights=bf16 or weights=noise:EPS"),
                });
                continue;
            }
            "logits" => {
                spec.logits = fmt(rhs);
                continue;
            }
            "flash.p" => {
                spec.flash.p = fmt(rhs);
                continue;
            }
            "flash.ds" => {
                spec.flash.ds = fmt(rhs);
                continue;
            }
            _ => {}
        }
        let (site, product) = match lhs.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (lhs, None),
        };
        let sites = match site {
            "head" => vec![Site::Head],
            "attn" => vec![Site::Attn],
            "mlp" => vec![Site::Mlp],
            "router" => vec![Site::Router],
            "layers" => vec![Site::Attn, Site::Mlp, Site::Router],
            "all" => vec![Site::Head, Site::Attn, Site::Mlp, Site::Router],
            _ => panic!("spec {s:?}: unknown site {site:?}"),
        };
        let product = product.map(|p| match p {
            "fwd" => GemmProduct::Fwd,
            "dx" => GemmProduct::Dx,
            "dw" => GemmProduct::Dw,
            _ => panic!("spec {s:?}: unknown product {p:?}"),
        });
        let f = match rhs.split_once('/') {
            Some((a, b)) => [fmt(a), fmt(b)],
            None => [fmt(rhs); 2],
        };
        spec.rules.push((sites, product, f));
    }
    spec
}

/// GEMM site from the linear layer's shape.
fn site(cfg: &ModelConfig, c: &GemmCall) -> Site {
    if c.m == cfg.vocab_size {
        Site::Head
    } else if c.m == cfg.intermediate_size || c.k == cfg.intermediate_size {
        Site::Mlp
    } else if c.m < 16 {
        Site::Router
    } else {
        Site::Attn
    }
}

/// Tensor-core GEMM time of one call relative to plain bf16 (see the module docs).
fn cost_factor(f: [Operand; 2]) -> f64 {
    if f.contains(&Operand::F32) {
        15.0
    } else if f.contains(&Operand::Tf32) || f.contains(&Operand::Tf32Trunc) {
        2.0
    } else {
        1.0 + f.iter().filter(|&&x| x == Operand::Bf16x2).count() as f64
    }
}

/// FLOPs `(all GEMMs, weighted by cost, LM head)` of the calls seen.
type Flops = Arc<Mutex<[f64; 3]>>;

fn rule(spec: &Spec, cfg: &ModelConfig, flops: Flops) -> GemmRule {
    let (spec, cfg) = (spec.clone(), cfg.clone());
    Arc::new(move |c: &GemmCall| {
        let s = site(&cfg, c);
        let mut f = spec.base;
        for (sites, product, fs) in &spec.rules {
            if sites.contains(&s) && product.is_none_or(|p| p == c.product) {
                f = *fs;
            }
        }
        let fl = 2.0 * (c.n * c.k * c.m) as f64;
        let mut a = flops.lock().unwrap();
        a[0] += fl;
        a[1] += fl * cost_factor(f);
        if s == Site::Head {
            a[2] += fl;
        }
        f
    })
}

/// A structured task (`--train-steps`): each row is a random sequence of ids below 512 followed by
/// its repetition (next-token targets), so a model can learn token statistics and copying.
fn repeat_task(bsz: usize, seq: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let half = seq / 2 + 1;
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for r in 0..bsz {
        let base = tokens(half, 512, seed.wrapping_mul(7919).wrapping_add(r as u64));
        let row: Vec<u32> = base.iter().chain(base.iter()).copied().take(seq + 1).collect();
        inputs.extend_from_slice(&row[..seq]);
        targets.extend_from_slice(&row[1..seq + 1]);
    }
    (inputs, targets)
}

/// `steps` exact AdamW steps (lr 1e-3, the trainer's defaults otherwise) on fresh batches of the
/// repeat task, so the measurement is not at initialisation.
fn train(c: &Cpu<f32>, model: &mut Model<Cpu<f32>>, bsz: usize, seq: usize, steps: usize, seed: u64) {
    let mut opts: Vec<AdamW<Cpu<f32>>> = vec![AdamW::new(c, &model.params, ParamGroup::Main, AdamWConfig::default())];
    if model.params.info.iter().any(|i| i.group == ParamGroup::AuxRouter) {
        opts.push(AdamW::new(c, &model.params, ParamGroup::AuxRouter, AdamWConfig::default()));
    }
    for step in 0..steps {
        let (inputs, targets) = repeat_task(bsz, seq, seed + 1000 + step as u64);
        let batch = Batch { inputs: &inputs, targets: &targets, batch: bsz, seq_len: seq, doc_starts: None };
        model.params.zero_grads(c);
        let stats = model.forward(c, &batch, Routing::TopK, true, 1.0).expect("forward");
        model.backward(c).expect("backward");
        for o in opts.iter_mut() {
            o.step(c, &mut model.params, 1e-3);
        }
        model.after_optimizer_step();
        if step % 10 == 0 || step + 1 == steps {
            eprintln!("train step {step}: loss {:.4}", stats.loss);
        }
    }
}

/// One forward + backward: loss, every gradient (f32), selections.
struct Run {
    loss: f64,
    grads: Vec<Vec<f32>>,
    selections: Vec<Vec<u32>>,
    depths: Vec<u8>,
    secs: f64,
}

fn run<T: CpuFloat>(c: &Cpu<T>, model: &mut Model<Cpu<T>>, batch: &Batch) -> Run {
    let t0 = Instant::now();
    model.params.zero_grads(c);
    let stats = model.forward(c, batch, Routing::TopK, true, 1.0).expect("forward");
    let (selections, depths) = (model.selections(), model.token_depths().to_vec());
    model.backward(c).expect("backward");
    let grads = model.params.grads.iter().map(|g| c.to_f32(g)).collect();
    Run { loss: stats.loss, grads, selections, depths, secs: t0.elapsed().as_secs_f64() }
}

/// Replace every parameter by a perturbed copy (`eps == 0`: rounded to bf16); returns the originals.
fn perturb(c: &Cpu<f32>, model: &mut Model<Cpu<f32>>, eps: f64) -> Vec<Vec<f32>> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut originals = Vec::new();
    for v in model.params.values.iter_mut() {
        let orig = c.to_f32(v);
        let new: Vec<f32> = orig
            .iter()
            .map(|&w| {
                if eps == 0.0 {
                    return Operand::Bf16.round(w);
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                (w as f64 * (1.0 + eps * u)) as f32
            })
            .collect();
        c.write_f32(v, &new);
        originals.push(orig);
    }
    originals
}

fn restore(c: &Cpu<f32>, model: &mut Model<Cpu<f32>>, originals: &[Vec<f32>]) {
    for (v, o) in model.params.values.iter_mut().zip(originals) {
        c.write_f32(v, o);
    }
}

/// [`run`] under a configuration; also returns its GEMM FLOPs ([`Flops`]).
fn run_spec(c: &Cpu<f32>, model: &mut Model<Cpu<f32>>, batch: &Batch, spec: &Spec, cfg: &ModelConfig) -> (Run, [f64; 3]) {
    let flops: Flops = Arc::new(Mutex::new([0.0; 3]));
    c.set_gemm_rule(Some(rule(spec, cfg, flops.clone())));
    let (vocab, logits) = (cfg.vocab_size, spec.logits);
    c.set_gemm_output_rule(Some(Arc::new(move |g: &GemmCall| if g.m == vocab { logits } else { Operand::F32 })));
    c.set_attention_rounding(spec.flash);
    let saved = spec.weights.map(|eps| perturb(c, model, eps));
    let r = run(c, model, batch);
    if let Some(o) = saved {
        restore(c, model, &o);
    }
    c.set_gemm_rule(None);
    c.set_gemm_output_rule(None);
    c.set_attention_rounding(AttnRounding::EXACT);
    let fl = *flops.lock().unwrap();
    (r, fl)
}

fn norm_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

fn global_norm(g: &[Vec<f32>]) -> f64 {
    g.iter().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

/// A configuration's errors against a reference run.
struct Cmp {
    loss: f64,
    gnorm: f64,
    /// `||G - G_ref|| / ||G_ref||` over all tensors together.
    global: f64,
    /// `(error, parameter)`, worst first.
    per_param: Vec<(f64, String)>,
    sel_diff: usize,
}

fn compare(names: &[String], a: &Run, r: &Run) -> Cmp {
    let mut per_param: Vec<(f64, String)> = a.grads.iter().zip(&r.grads).zip(names).map(|((x, y), n)| (norm_err(x, y), n.clone())).collect();
    per_param.sort_by(|x, y| y.0.total_cmp(&x.0));
    let sel_diff = a.selections.iter().zip(&r.selections).map(|(x, y)| x.iter().filter(|t| !y.contains(t)).count()).sum::<usize>()
        + a.depths.iter().zip(&r.depths).filter(|(x, y)| x != y).count();
    Cmp {
        loss: (a.loss - r.loss).abs() / r.loss.abs(),
        gnorm: (global_norm(&a.grads) - global_norm(&r.grads)).abs() / global_norm(&r.grads),
        global: a.grads.iter().zip(&r.grads).flat_map(|(x, y)| x.iter().zip(y)).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt()
            / global_norm(&r.grads),
        per_param,
        sel_diff,
    }
}

fn short(name: &str) -> String {
    name.replace("model.", "")
}

/// One rounding site at a time (everything else exact), and the weights perturbed by a rounding.
fn sites_study() -> Vec<&'static str> {
    vec![
        "bf16",
        "f32 weights=bf16",
        "f32 weights=noise:0.0002",
        "f32 all=bf16",
        "f32 all.fwd=bf16",
        "f32 all.fwd=bf16/f32",
        "f32 all.fwd=f32/bf16",
        "f32 all.dx=bf16",
        "f32 all.dw=bf16",
        "f32 flash=on",
        "f32 flash.qk=bf16",
        "f32 flash.v=bf16",
        "f32 flash.dout=bf16",
        "f32 flash.dout=bf16 flash.delta=bf16",
        "f32 flash.delta_out=bf16",
        "f32 flash.dout=bf16 flash.delta=bf16 flash.delta_out=bf16",
        "f32 flash.p=bf16",
        "f32 flash.ds=bf16",
        "f32 head=bf16",
        "f32 head.fwd=bf16",
        "f32 head.dx=bf16",
        "f32 head.dw=bf16",
        "f32 attn=bf16",
        "f32 mlp=bf16",
        "f32 router=bf16",
        "bf16 head=f32",
    ]
}

/// Candidate fixes on top of the bf16 mode.
fn remedies_study() -> Vec<&'static str> {
    vec![
        "bf16",
        "bf16 flash=bf16",
        "bf16 flash=bf16 head=f32",
        "bf16 flash=bf16 head=x2",
        "bf16 flash=bf16 all.fwd=bf16/x2 all.dx=bf16/x2",
        "bf16 flash=bf16 all.fwd=x2 all.dx=bf16/x2",
        "bf16 flash=bf16 all=x2",
        "bf16 flash=bf16 all=tf32",
        "bf16 flash=bf16 all=tf32z",
        "bf16 flash=tf32 all=tf32",
        "bf16 flash=x2 all=x2",
        "bf16 flash=off all=tf32",
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let all = |name: &str| args.iter().enumerate().filter(|(_, a)| *a == name).filter_map(|(i, _)| args.get(i + 1).cloned()).collect::<Vec<_>>();
    let presets: Vec<String> = opt("--presets").map_or(PRESETS.iter().map(|s| s.to_string()).collect(), |s| s.split(',').map(str::to_string).collect());
    let bsz: usize = opt("--batch").map_or(2, |s| s.parse().expect("--batch"));
    let seq: usize = opt("--seq-len").map_or(128, |s| s.parse().expect("--seq-len"));
    let seed: u64 = opt("--data-seed").map_or(11, |s| s.parse().expect("--data-seed"));
    let mut specs: Vec<String> = Vec::new();
    for s in opt("--study").map_or(vec![], |s| s.split(',').map(str::to_string).collect()) {
        match s.as_str() {
            "sites" => specs.extend(sites_study().into_iter().map(String::from)),
            "remedies" => specs.extend(remedies_study().into_iter().map(String::from)),
            _ => panic!("--study: sites or remedies"),
        }
    }
    specs.extend(all("--config"));
    let detail = all("--detail");
    specs.extend(detail.iter().cloned());
    if specs.is_empty() {
        specs.push("bf16".into());
    }
    let mut seen = std::collections::HashSet::new();
    specs.retain(|s| seen.insert(s.clone()));
    let f64_too = args.iter().any(|a| a == "--f64");
    let bf16_weights = args.iter().any(|a| a == "--bf16-weights");
    let reference_spec = opt("--reference").unwrap_or_else(|| "f32".to_string());
    let train_steps: usize = opt("--train-steps").map_or(0, |s| s.parse().expect("--train-steps"));

    for name in &presets {
        // `test:NAME`: the small models of the model tests (model_parity runs them at 3 x 16).
        let cfg = match name.strip_prefix("test:") {
            Some(v) => common::variants().into_iter().find(|(n, _)| n == v).unwrap_or_else(|| panic!("no test model {v}")).1,
            None => mor_config::load(name).expect("preset loads").model,
        };
        let n = bsz * seq;
        let vocab = cfg.vocab_size;
        let (inputs, mut targets) = if train_steps > 0 { repeat_task(bsz, seq, seed) } else { (tokens(n, vocab, seed), tokens(n, vocab, seed + 1)) };
        targets[n / 3] = u32::MAX;
        let batch = Batch { inputs: &inputs, targets: &targets, batch: bsz, seq_len: seq, doc_starts: None };
        let c = Cpu::<f32>::new();
        let mut model = Model::new(&c, cfg.clone(), 7).expect("model");
        model.head_chunk_elems = 64 * vocab;
        if train_steps > 0 {
            train(&c, &mut model, bsz, seq, train_steps, seed);
        }
        let names: Vec<String> = model.params.info.iter().map(|i| short(&i.name)).collect();
        if bf16_weights {
            perturb(&c, &mut model, 0.0);
        }
        let (reference, _) = run_spec(&c, &mut model, &batch, &parse_spec(&reference_spec), &cfg);
        println!(
            "\n== {name}: {bsz} x {seq} tokens, loss {:.6}, |g| {:.4e}, {} tensors; reference ({reference_spec}) forward+backward {:.1}s",
            reference.loss,
            global_norm(&reference.grads),
            names.len(),
            reference.secs
        );
        println!(
            "{:<40} {:>8} {:>8} {:>8} {:>9} {:>4}  {:<34} {:>9} {:>9}  sel",
            "config", "loss err", "|g| err", "G err", "max grad", ">1e-2", "worst tensor", "2nd", "extra"
        );
        let mut bf16_run = None;
        for s in &specs {
            let (r, fl) = run_spec(&c, &mut model, &batch, &parse_spec(s), &cfg);
            let m = compare(&names, &r, &reference);
            let over = m.per_param.iter().filter(|x| x.0 > 1e-2).count();
            println!(
                "{:<40} {:>8.1e} {:>8.1e} {:>8.1e} {:>9.2e} {:>4}  {:<34} {:>9.2e} {:>9}  {}",
                s,
                m.loss,
                m.gnorm,
                m.global,
                m.per_param[0].0,
                over,
                m.per_param[0].1,
                m.per_param.get(1).map_or(0.0, |x| x.0),
                if s.starts_with("f32") { "-".to_string() } else { format!("{:.1}%", 100.0 * (fl[1] / fl[0] - 1.0)) },
                if m.sel_diff == 0 { "same".to_string() } else { format!("DIFFER ({})", m.sel_diff) }
            );
            if s == "bf16" {
                println!("{:<40} (LM head: {:.1}% of the GEMM FLOPs)", "", 100.0 * fl[2] / fl[0]);
            }
            if detail.contains(s) {
                println!("  per tensor, worst first ({s}): error, ||g_ref|| / sqrt(numel), name");
                for (e, p) in &m.per_param {
                    let i = names.iter().position(|x| x == p).unwrap();
                    let g = &reference.grads[i];
                    let rms = (g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / g.len() as f64).sqrt();
                    println!("    {e:>9.3e}  {rms:>9.3e}  {p}");
                }
            }
            if s == "bf16" {
                bf16_run = Some(r);
            }
        }
        if f64_too {
            let c64 = Cpu::<f64>::new();
            let mut m64 = Model::new(&c64, cfg.clone(), 7).expect("model f64");
            m64.head_chunk_elems = 64 * vocab;
            let exact64 = run(&c64, &mut m64, &batch);
            let m = compare(&names, &reference, &exact64);
            println!("f32 exact vs f64 exact: loss {:.1e}, |g| {:.1e}, worst {:.2e} ({})", m.loss, m.gnorm, m.per_param[0].0, m.per_param[0].1);
            let spec = parse_spec("bf16");
            let flops: Flops = Arc::new(Mutex::new([0.0; 3]));
            c64.set_gemm_rule(Some(rule(&spec, &cfg, flops)));
            c64.set_attention_bf16(true);
            let b64 = run(&c64, &mut m64, &batch);
            let m = compare(&names, &b64, &exact64);
            println!(
                "bf16 (f64 accumulation) vs f64 exact: loss {:.1e}, |g| {:.1e}, worst {:.2e} ({}), {} > 1e-2",
                m.loss,
                m.gnorm,
                m.per_param[0].0,
                m.per_param[0].1,
                m.per_param.iter().filter(|x| x.0 > 1e-2).count()
            );
            if let Some(b32) = &bf16_run {
                let m = compare(&names, &b64, b32);
                println!(
                    "bf16 (f64 accumulation) vs bf16 (f32 accumulation): loss {:.1e}, |g| {:.1e}, worst {:.2e} ({}), sel {}",
                    m.loss, m.gnorm, m.per_param[0].0, m.per_param[0].1, m.sel_diff
                );
            }
        }
    }
}
