//! Parity of the CUDA backend against the CPU reference, op by op, forward and backward, plus a
//! few timings.
//!
//! ```text
//! cargo run --release --features cuda -p mor-engine --example cuda_parity            # full run (GPU)
//! cargo run --release --features cuda -p mor-engine --example cuda_parity -- --compile-only
//! ```
//! `--compile-only` compiles the kernels with NVRTC and exits (needs libnvrtc only, no GPU); with
//! `MOR_PTX_CACHE=file` it also writes the PTX cache that later processes load instead of compiling.
//! `--no-timings` skips the benchmarks, `--only topk,attention` runs the matching groups only,
//! `--flash-sweep "8,fused,4;8,4,4"` checks and times the tensor-core attention per block configuration,
//! `--wg-probe` checks the wgmma building blocks of those kernels on one tile, `--tma-probe` the
//! TMA loads with 128-byte swizzle and the shared-memory-operand wgmma, `--gemm-algos` times
//! cuBLASLt's heuristic algorithms for the training GEMM shapes and shows the one the backend picks,
//! `--kernel-info` lists registers / local memory (spills) / static shared memory per kernel.
//! Exits non-zero if any check fails.
//!
//! Error metric per output tensor: `max_i |gpu_i - cpu_i| / (|cpu_i| + mean_j |cpu_j|)` (relative
//! for large entries, scaled by the tensor's magnitude for entries near zero). Index outputs are
//! compared exactly (number of mismatches). Gradient buffers start from random values (backward
//! ops accumulate) and every output buffer is longer than the op's extent, so the untouched tail
//! is checked too.

use std::time::Instant;

use mor_engine::{AttnBwdInputs, AttnGrads, AttnShape, Backend, Cpu, Cuda, GateFn, MatmulPrecision};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type G = Cuda;
type C = Cpu<f32>;

const TOL: f64 = 1e-4;
/// Tolerance for long reductions with different summation orders (attention, GEMMs).
const TOL_RED: f64 = 2e-4;
/// Padding (elements) after each output region, checked to stay untouched.
const PAD: usize = 37;

struct Report {
    rows: Vec<(String, String, f64, f64, bool)>,
}

impl Report {
    fn add(&mut self, op: &str, tensor: &str, err: f64, tol: f64) {
        let ok = err.is_finite() && err <= tol;
        println!("{:<34} {:<14} {:>11.3e} {:>9.1e}  {}", op, tensor, err, tol, if ok { "PASS" } else { "FAIL" });
        self.rows.push((op.into(), tensor.into(), err, tol, ok));
    }
    fn add_exact(&mut self, op: &str, tensor: &str, mismatches: usize) {
        let ok = mismatches == 0;
        println!("{:<34} {:<14} {:>11} {:>9}  {}", op, tensor, format!("{mismatches} diff"), "exact", if ok { "PASS" } else { "FAIL" });
        self.rows.push((op.into(), tensor.into(), mismatches as f64, 0.0, ok));
    }
    fn check(&mut self, op: &str, tensor: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
        self.add(op, tensor, rel_err(gpu, cpu), tol);
    }
    /// [`Report::check`] in fp32 mode; in bf16 mode the whole-tensor error ([`rel_l2`], `base` =
    /// initial content of an accumulated gradient) against [`TOL_BF16`].
    #[allow(clippy::too_many_arguments)]
    fn check_prec(&mut self, bf16: bool, op: &str, tensor: &str, gpu: &[f32], cpu: &[f32], base: Option<&[f32]>, tol: f64) {
        if bf16 {
            self.add(op, tensor, rel_l2(gpu, cpu, base, cpu.len() - PAD), TOL_BF16);
        } else {
            self.check(op, tensor, gpu, cpu, tol);
        }
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let finite: Vec<f64> = b.iter().filter(|x| x.is_finite()).map(|x| x.abs() as f64).collect();
    let mean = finite.iter().sum::<f64>() / finite.len().max(1) as f64;
    let mut worst = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        if !y.is_finite() || !x.is_finite() {
            if x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()) && x != y {
                return f64::INFINITY;
            }
            continue;
        }
        let e = (x as f64 - y as f64).abs() / (y.abs() as f64 + mean + 1e-30);
        worst = worst.max(e);
    }
    worst
}

struct Env {
    c: C,
    g: G,
    rng: ChaCha8Rng,
}

impl Env {
    fn uniform(&mut self, n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.gen_range(-s..=s)).collect()
    }
    fn up(&self, v: &[f32]) -> (Vec<f32>, <G as Backend>::Buf) {
        (self.c.from_f32(v), self.g.from_f32(v))
    }
    fn upi(&self, v: &[u32]) -> (Vec<u32>, <G as Backend>::Idx) {
        (self.c.idx_from(v), self.g.idx_from(v))
    }
    /// Random buffer of n + PAD values on both backends.
    fn rnd(&mut self, n: usize, s: f32) -> (Vec<f32>, <G as Backend>::Buf) {
        let v = self.uniform(n + PAD, s);
        self.up(&v)
    }
    /// [`Env::rnd`] as a bf16 activation buffer on the GPU (`zeros_act` in bf16 mode), the CPU
    /// copy holding the same bf16-rounded values.
    fn rnd_act(&mut self, n: usize, s: f32) -> (Vec<f32>, <G as Backend>::Buf) {
        let v: Vec<f32> = self.uniform(n + PAD, s).into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect();
        let mut g = self.zeros_bf16(v.len());
        self.g.write_f32(&mut g, &v);
        (self.c.from_f32(&v), g)
    }
    /// [`Env::rnd_act`] when `act`, else [`Env::rnd`].
    /// A zeroed bf16 buffer (an activation buffer of the bf16 mode).
    fn zeros_bf16(&self, n: usize) -> <G as Backend>::Buf {
        let was = self.g.options().gemm;
        self.g.set_matmul_precision(MatmulPrecision::Bf16);
        let g = self.g.zeros_act(n);
        self.g.set_matmul_precision(if was == mor_engine::cuda::GemmPrecision::Bf16 { MatmulPrecision::Bf16 } else { MatmulPrecision::F32 });
        assert_eq!(g.dtype(), mor_engine::cuda::Dtype::Bf16);
        g
    }
    fn rnd_as(&mut self, act: bool, n: usize, s: f32) -> (Vec<f32>, <G as Backend>::Buf) {
        if act {
            self.rnd_act(n, s)
        } else {
            self.rnd(n, s)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--compile-only") {
        let t = Instant::now();
        match mor_engine::cuda::compile_kernels() {
            Ok(ptx) => {
                let src = ptx.to_src();
                println!(
                    "NVRTC: compiled {} bytes of CUDA C into {} bytes of PTX in {:.2}s",
                    mor_engine::cuda::KERNEL_SOURCE.len(),
                    src.len(),
                    t.elapsed().as_secs_f64()
                );
                if let Ok(path) = std::env::var("MOR_PTX_OUT") {
                    std::fs::write(&path, src).expect("write PTX");
                    println!("PTX written to {path}");
                }
                if let Ok(path) = std::env::var("MOR_PTX_CACHE") {
                    match mor_engine::cuda::ensure_ptx_cache() {
                        Ok(_) => println!("PTX cache {path} up to date"),
                        Err(e) => {
                            eprintln!("{e}");
                            std::process::exit(1);
                        }
                    }
                }
                return;
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    if args.iter().any(|a| a == "--gemm-algos") {
        gemm_algos();
        return;
    }
    if args.iter().any(|a| a == "--wg-debug") {
        wg_debug();
        return;
    }
    if args.iter().any(|a| a == "--wg-probe") {
        wg_probe();
        return;
    }
    if args.iter().any(|a| a == "--tma-probe") {
        tma_probe();
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--flash-sweep") {
        flash_sweep(args.get(i + 1).map_or("tmapp,fused,tma;8,fused,4;8,4,4;8g,4g,4g", String::as_str));
        return;
    }
    let timings = !args.iter().any(|a| a == "--no-timings");

    let t0 = Instant::now();
    let g = open_gpu();
    println!("device: {} (backend ready in {:.2}s, NVRTC included)", g.device_name(), t0.elapsed().as_secs_f64());
    let mut env = Env { c: Cpu::<f32>::new(), g, rng: ChaCha8Rng::seed_from_u64(0x5eed) };
    let mut rep = Report { rows: Vec::new() };
    println!("{:<34} {:<14} {:>11} {:>9}  result", "op", "tensor", "max err", "tol");
    println!("{}", "-".repeat(80));

    // `--only a,b` runs the groups whose names contain one of the given strings.
    let only: Vec<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    type Group = fn(&mut Env, &mut Report);
    let groups: [(&str, Group); 16] = [
        ("memory", memory_ops),
        ("elementwise", elementwise_ops),
        ("embedding", embedding_ops),
        ("matmul", matmul_ops),
        ("gemm-bf16", gemm_bf16_ops),
        ("rmsnorm", rmsnorm_ops),
        ("rope", rope_ops),
        ("softmax", softmax_ops),
        ("subset", subset_ops),
        ("topk", topk_ops),
        ("loss", loss_ops),
        ("adamw", adamw_ops),
        ("adamw-many", multi_tensor_ops),
        ("attention", attention_ops),
        ("bf16-activations", bf16_act_ops),
        ("determinism", determinism),
    ];
    for (name, f) in groups {
        if only.is_empty() || only.iter().any(|o| name.contains(o.as_str())) {
            f(&mut env, &mut rep);
        }
    }

    let failed: Vec<_> = rep.rows.iter().filter(|r| !r.4).collect();
    println!("{}", "-".repeat(80));
    println!("{} checks, {} passed, {} failed", rep.rows.len(), rep.rows.len() - failed.len(), failed.len());
    for f in &failed {
        println!("FAILED: {} / {} (err {:.3e}, tol {:.1e})", f.0, f.1, f.2, f.3);
    }

    if args.iter().any(|a| a == "--kernel-info") {
        println!();
        println!("{:<28} {:>6} {:>10} {:>10}", "kernel", "regs", "local B", "static smem");
        for (name, regs, local, smem) in env.g.kernel_info() {
            println!("{name:<28} {regs:>6} {local:>10} {smem:>10}");
        }
    }
    if timings {
        bench(&env.g);
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
}

// ---- memory / elementwise ------------------------------------------------------------------

fn memory_ops(e: &mut Env, r: &mut Report) {
    let n = 10_001;
    let (mut c, mut g) = e.rnd(n, 1.0);
    e.c.fill(&mut c, n, 0.5);
    e.g.fill(&mut g, n, 0.5);
    r.check("fill(0.5)", "x", &e.g.to_f32(&g), &c, 0.0);
    e.c.fill(&mut c, n - 3, 0.0);
    e.g.fill(&mut g, n - 3, 0.0);
    r.check("fill(0)", "x", &e.g.to_f32(&g), &c, 0.0);
    let (sc, sg) = e.rnd(n, 1.0);
    e.c.copy(&mut c, &sc, n - 5);
    e.g.copy(&mut g, &sg, n - 5);
    r.check("copy", "dst", &e.g.to_f32(&g), &c, 0.0);
    let data = e.uniform(100, 2.0);
    e.c.write_f32(&mut c, &data);
    e.g.write_f32(&mut g, &data);
    r.check("write_f32", "buf", &e.g.to_f32(&g), &c, 0.0);
    r.check("to_f32_prefix", "buf", &e.g.to_f32_prefix(&g, 50), &e.c.to_f32_prefix(&c, 50), 0.0);
    let (mut ic, mut ig) = e.upi(&(0..500u32).collect::<Vec<_>>());
    let w: Vec<u32> = (0..100).map(|i| i * 7 + 3).collect();
    e.c.idx_write(&mut ic, &w);
    e.g.idx_write(&mut ig, &w);
    let mism = e.g.idx_to_vec(&ig).iter().zip(&e.c.idx_to_vec(&ic)).filter(|(a, b)| a != b).count();
    r.add_exact("idx_write/idx_to_vec", "idx", mism);
    r.add_exact("len", "buf", (e.g.len(&g) != e.c.len(&c)) as usize);
}

fn elementwise_ops(e: &mut Env, r: &mut Report) {
    let n = 512 * 256 + 7;
    let (mut yc, mut yg) = e.rnd(n, 1.0);
    let (xc, xg) = e.rnd(n, 1.0);
    e.c.axpy(&mut yc, &xc, -0.37, n);
    e.g.axpy(&mut yg, &xg, -0.37, n);
    r.check("axpy", "y", &e.g.to_f32(&yg), &yc, TOL);
    e.c.scale(&mut yc, 1.7, n);
    e.g.scale(&mut yg, 1.7, n);
    r.check("scale", "x", &e.g.to_f32(&yg), &yc, TOL);
    for nn in [1usize, 1000, 1_234_567] {
        let (c, g) = e.rnd(nn, 3.0);
        let (sc, sg) = (e.c.sum_squares(&c, nn), e.g.sum_squares(&g, nn));
        r.add(&format!("sum_squares(n={nn})"), "scalar", ((sg - sc) / sc.abs().max(1e-30)).abs(), 1e-10);
    }

    // activations: inputs spread wide enough to reach the tails.
    // gate_up as rows of 2 x 64 (n / 64 rows).
    let (rows, f) = (n / 64, 64);
    let (guc, gug) = e.rnd(2 * rows * f, 4.0);
    let (mut oc, mut og) = e.rnd(n, 1.0);
    e.c.swiglu_fwd(&mut oc, &guc, rows, f);
    e.g.swiglu_fwd(&mut og, &gug, rows, f);
    r.check("swiglu_fwd", "out", &e.g.to_f32(&og), &oc, TOL);
    let (doc, dog) = e.rnd(n, 1.0);
    let (mut dc, mut dg) = e.rnd(2 * rows * f, 1.0);
    e.c.swiglu_bwd(&mut dc, &doc, &guc, rows, f);
    e.g.swiglu_bwd(&mut dg, &dog, &gug, rows, f);
    r.check("swiglu_bwd", "dgate_up", &e.g.to_f32(&dg), &dc, TOL);
    // The overwriting variant: start from other values, expect the same gradients as from zero.
    let (_, mut dg2) = e.rnd(2 * rows * f, 1.0);
    let mut dc0 = vec![0.0f32; 2 * rows * f + PAD];
    e.c.swiglu_bwd(&mut dc0, &doc, &guc, rows, f);
    e.g.swiglu_bwd_set(&mut dg2, &dog, &gug, rows, f);
    r.check("swiglu_bwd_set", "dgate_up", &e.g.to_f32(&dg2)[..2 * rows * f], &dc0[..2 * rows * f], TOL);

    swiglu_small(e, r, false);

    let (gc, gg) = e.rnd(n, 6.0);
    e.c.gelu_fwd(&mut oc, &gc, n);
    e.g.gelu_fwd(&mut og, &gg, n);
    r.check("gelu_fwd", "out", &e.g.to_f32(&og), &oc, TOL);
    let (mut dxc, mut dxg) = e.rnd(n, 1.0);
    e.c.gelu_bwd(&mut dxc, &doc, &gc, n);
    e.g.gelu_bwd(&mut dxg, &dog, &gg, n);
    r.check("gelu_bwd", "dx", &e.g.to_f32(&dxg), &dxc, TOL);

    for (f, name) in [(GateFn::Sigmoid, "sigmoid"), (GateFn::Tanh, "tanh"), (GateFn::Identity, "identity")] {
        e.c.gate_fwd(&mut oc, &gc, f, 0.8, n);
        e.g.gate_fwd(&mut og, &gg, f, 0.8, n);
        r.check(&format!("gate_fwd({name})"), "out", &e.g.to_f32(&og), &oc, TOL);
        e.c.gate_bwd(&mut dxc, &doc, &gc, f, 0.8, n);
        e.g.gate_bwd(&mut dxg, &dog, &gg, f, 0.8, n);
        r.check(&format!("gate_bwd({name})"), "dx", &e.g.to_f32(&dxg), &dxc, TOL);
    }

    let tv: Vec<f32> = (0..n + PAD).map(|_| e.rng.gen_range(0.0..=1.0)).collect();
    let (tc, tg) = e.up(&tv);
    e.c.bce_logits_fwd(&mut oc, &gc, &tc, n);
    e.g.bce_logits_fwd(&mut og, &gg, &tg, n);
    r.check("bce_logits_fwd", "loss", &e.g.to_f32(&og), &oc, TOL);
    e.c.bce_logits_bwd(&mut dxc, &gc, &tc, 0.25, n);
    e.g.bce_logits_bwd(&mut dxg, &gg, &tg, 0.25, n);
    r.check("bce_logits_bwd", "dx", &e.g.to_f32(&dxg), &dxc, TOL);
}

// ---- embedding / matmul / norm / rope / softmax ------------------------------------------------

fn embedding_ops(e: &mut Env, r: &mut Report) {
    let (vocab, d, n) = (1000usize, 256usize, 512usize);
    let (tc, tg) = e.rnd(vocab * d, 1.0);
    // Many repeats (ids in 0..60) plus a few spread ones.
    let ids: Vec<u32> = (0..n + 5).map(|i| if i % 3 == 0 { e.rng.gen_range(0..vocab as u32) } else { e.rng.gen_range(0..60) }).collect();
    let (ic, ig) = e.upi(&ids);
    let (mut oc, mut og) = e.rnd(n * d, 1.0);
    e.c.embedding_fwd(&mut oc, &tc, &ic, n, d);
    e.g.embedding_fwd(&mut og, &tg, &ig, n, d);
    r.check("embedding_fwd", "out", &e.g.to_f32(&og), &oc, 0.0);
    let (doc, dog) = e.rnd(n * d, 1.0);
    let (mut dtc, mut dtg) = e.rnd(vocab * d, 1.0);
    e.c.embedding_bwd(&mut dtc, &doc, &ic, n, d);
    e.g.embedding_bwd(&mut dtg, &dog, &ig, n, d);
    r.check("embedding_bwd (repeated ids)", "dtable", &e.g.to_f32(&dtg), &dtc, TOL);
}

fn matmul_ops(e: &mut Env, r: &mut Report) {
    for (n, k, m) in [(512usize, 256usize, 384usize), (100, 70, 33), (1, 256, 1000)] {
        let tag = format!("matmul n{n} k{k} m{m}");
        let (xc, xg) = e.rnd(n * k, 1.0);
        let (wc, wg) = e.rnd(m * k, 0.1);
        let (mut oc, mut og) = e.rnd(n * m, 1.0);
        e.c.matmul_fwd(&mut oc, &xc, &wc, n, k, m);
        e.g.matmul_fwd(&mut og, &xg, &wg, n, k, m);
        r.check(&format!("{tag} fwd"), "out", &e.g.to_f32(&og), &oc, TOL_RED);
        let (resc, resg) = e.rnd(n * m, 1.0);
        e.c.matmul_fwd_residual(&mut oc, &xc, &wc, &resc, n, k, m);
        e.g.matmul_fwd_residual(&mut og, &xg, &wg, &resg, n, k, m);
        r.check(&format!("{tag} fwd_residual"), "out", &e.g.to_f32(&og), &oc, TOL_RED);
        let (doc, dog) = e.rnd(n * m, 1.0);
        let (mut dxc, mut dxg) = e.rnd(n * k, 1.0);
        let (mut dwc, mut dwg) = e.rnd(m * k, 1.0);
        e.c.matmul_bwd(Some(&mut dxc), &mut dwc, &doc, &xc, &wc, n, k, m);
        e.g.matmul_bwd(Some(&mut dxg), &mut dwg, &dog, &xg, &wg, n, k, m);
        r.check(&format!("{tag} bwd"), "dx", &e.g.to_f32(&dxg), &dxc, TOL_RED);
        r.check(&format!("{tag} bwd"), "dw", &e.g.to_f32(&dwg), &dwc, TOL_RED);
        e.c.matmul_bwd(None, &mut dwc, &doc, &xc, &wc, n, k, m);
        e.g.matmul_bwd(None, &mut dwg, &dog, &xg, &wg, n, k, m);
        r.check(&format!("{tag} bwd(dx=None)"), "dw", &e.g.to_f32(&dwg), &dwc, TOL_RED);
        // dx alone: added to, then overwritten (over NaN on the GPU).
        e.c.matmul_bwd_dx(&mut dxc, false, &doc, &wc, n, k, m);
        e.g.matmul_bwd_dx(&mut dxg, false, &dog, &wg, n, k, m);
        r.check(&format!("{tag} bwd_dx"), "dx", &e.g.to_f32(&dxg), &dxc, TOL_RED);
        e.g.fill(&mut dxg, n * k, f32::NAN);
        e.c.matmul_bwd_dx(&mut dxc, true, &doc, &wc, n, k, m);
        e.g.matmul_bwd_dx(&mut dxg, true, &dog, &wg, n, k, m);
        r.check(&format!("{tag} bwd_dx set"), "dx", &e.g.to_f32(&dxg), &dxc, TOL_RED);
    }
    matmul_many_ops(e, r);
}

/// `matmul_fwd_many` / `matmul_bwd_many` (one input, three weights; dx overwritten) against
/// separate CPU products, in fp32 and in bf16 mode (whole-tensor error, bf16 bar).
fn matmul_many_ops(e: &mut Env, r: &mut Report) {
    // n = 1500: the bf16 backward runs the three weights as one GEMM on stacked weights (skinny outputs).
    for n in [300usize, 1500] {
        matmul_many_case(e, r, n);
    }
    for (n, k, ms) in [(300usize, 192usize, [256usize, 256]), (77, 40, [24, 40])] {
        matmul_cat_case(e, r, n, k, ms);
    }
}

/// `matmul_fwd_cat` / `matmul_bwd_cat` (the MLP's gate and up side by side) against the CPU's,
/// fp32 and bf16 mode, dx overwritten and added to.
fn matmul_cat_case(e: &mut Env, r: &mut Report, n: usize, k: usize, ms: [usize; 2]) {
    let total = ms[0] + ms[1];
    let (xc, xg) = e.rnd(n * k, 1.0);
    let ws: Vec<_> = ms.iter().map(|&m| e.rnd(m * k, 0.1)).collect();
    let (doc, dog) = e.rnd(n * total, 1.0);
    for bf16 in [false, true] {
        e.g.set_matmul_precision(if bf16 { MatmulPrecision::Bf16 } else { MatmulPrecision::F32 });
        let tag = format!("matmul_cat{} n{n} k{k} m{ms:?}", if bf16 { " bf16" } else { "" });
        let (mut oc, mut og) = e.rnd(n * total, 1.0);
        e.c.matmul_fwd_cat(&mut oc, &xc, n, k, &[(&ws[0].0, ms[0]), (&ws[1].0, ms[1])]);
        e.g.matmul_fwd_cat(&mut og, &xg, n, k, &[(&ws[0].1, ms[0]), (&ws[1].1, ms[1])]);
        r.check_prec(bf16, &format!("{tag} fwd"), "out", &e.g.to_f32(&og), &oc, None, TOL_RED);
        for dx_set in [true, false] {
            let (mut dxc, mut dxg) = e.rnd(n * k, 1.0);
            let dx0 = dxc.clone();
            let (mut d0c, mut d0g) = e.rnd(ms[0] * k, 1.0);
            let (mut d1c, mut d1g) = e.rnd(ms[1] * k, 1.0);
            let (dw0, dw1) = (d0c.clone(), d1c.clone());
            e.c.matmul_bwd_cat(Some(&mut dxc), dx_set, &xc, &doc, n, k, &mut [(&mut d0c, &ws[0].0, ms[0]), (&mut d1c, &ws[1].0, ms[1])]);
            e.g.matmul_bwd_cat(Some(&mut dxg), dx_set, &xg, &dog, n, k, &mut [(&mut d0g, &ws[0].1, ms[0]), (&mut d1g, &ws[1].1, ms[1])]);
            let t = format!("{tag} bwd dx_set={dx_set}");
            r.check_prec(bf16, &t, "dw0", &e.g.to_f32(&d0g), &d0c, Some(&dw0), TOL_RED);
            r.check_prec(bf16, &t, "dw1", &e.g.to_f32(&d1g), &d1c, Some(&dw1), TOL_RED);
            r.check_prec(bf16, &t, "dx", &e.g.to_f32(&dxg), &dxc, (!dx_set).then_some(&dx0[..]), TOL_RED);
        }
    }
    e.g.set_matmul_precision(MatmulPrecision::F32);
}

fn matmul_many_case(e: &mut Env, r: &mut Report, n: usize) {
    use mor_engine::MatmulGrad;
    let (k, ms) = (192usize, [256usize, 64, 64]);
    let (xc, xg) = e.rnd(n * k, 1.0);
    let ws: Vec<_> = ms.iter().map(|&m| e.rnd(m * k, 0.1)).collect();
    let douts: Vec<_> = ms.iter().map(|&m| e.rnd(n * m, 1.0)).collect();
    for bf16 in [false, true] {
        e.g.set_matmul_precision(if bf16 { MatmulPrecision::Bf16 } else { MatmulPrecision::F32 });
        let tag = format!("matmul_many{} n{n} k{k} m{ms:?}", if bf16 { " bf16" } else { "" });
        let mut outs: Vec<_> = ms.iter().map(|&m| e.rnd(n * m, 1.0)).collect();
        {
            let mut items: Vec<_> = outs.iter_mut().zip(&ws).zip(ms).map(|((o, w), m)| (&mut o.1, &w.1, m)).collect();
            e.g.matmul_fwd_many(&xg, n, k, &mut items);
        }
        for (i, &m) in ms.iter().enumerate() {
            let mut oc = outs[i].0.clone();
            e.c.matmul_fwd(&mut oc, &xc, &ws[i].0, n, k, m);
            r.check_prec(bf16, &format!("{tag} fwd"), &format!("out{i}"), &e.g.to_f32(&outs[i].1), &oc, None, TOL_RED);
        }
        // dx starts from garbage (overwritten); dw from random values (accumulated).
        let (mut dxc, mut dxg) = e.rnd(n * k, 1.0);
        dxc[..n * k].fill(0.0); // the CPU side accumulates onto zeros; the padding must survive
        let mut dws: Vec<_> = ms.iter().map(|&m| e.rnd(m * k, 1.0)).collect();
        let dw0: Vec<Vec<f32>> = dws.iter().map(|d| d.0.clone()).collect();
        {
            let mut items: Vec<MatmulGrad<'_, G>> = dws
                .iter_mut()
                .zip(&douts)
                .zip(&ws)
                .zip(ms)
                .map(|(((dw, dout), w), m)| MatmulGrad { dw: &mut dw.1, dout: &dout.1, w: &w.1, m })
                .collect();
            e.g.matmul_bwd_many(Some(&mut dxg), true, &xg, n, k, &mut items);
        }
        for (i, &m) in ms.iter().enumerate() {
            e.c.matmul_bwd(Some(&mut dxc), &mut dws[i].0, &douts[i].0, &xc, &ws[i].0, n, k, m);
            r.check_prec(bf16, &format!("{tag} bwd"), &format!("dw{i}"), &e.g.to_f32(&dws[i].1), &dws[i].0, Some(&dw0[i]), TOL_RED);
        }
        r.check_prec(bf16, &format!("{tag} bwd"), "dx (set)", &e.g.to_f32(&dxg), &dxc, None, TOL_RED);
    }
    e.g.set_matmul_precision(MatmulPrecision::F32);
}

/// The backend's bf16 GEMM (cuBLASLt, algorithm as `MOR_GEMM_SELECT` says) against a host
/// reference (f64 sums of the same bf16 operands), for each transpose combination the layers use
/// (TN forward, NN input gradient, NT weight gradient), β 0 and 1, f32 and bf16 C, on dense and
/// padded leading dimensions (the gaps between columns must stay untouched). f32 C: element-wise
/// bar; bf16 C: whole-tensor bar (the output is rounded to bf16).
fn gemm_bf16_ops(e: &mut Env, r: &mut Report) {
    use mor_engine::cuda::{Dtype, GemmAdd, GemmShape};
    for (m, n, k, pad) in [(192usize, 160usize, 96usize, 0usize), (100, 70, 33, 8)] {
        for (ta, tb) in [(true, false), (false, false), (false, true)] {
            for add in [GemmAdd::Zero, GemmAdd::Accumulate] {
                for out in [Dtype::F32, Dtype::Bf16] {
                    let (ar, ac) = if ta { (k, m) } else { (m, k) };
                    let (br, bc) = if tb { (n, k) } else { (k, n) };
                    let (lda, ldb, ldc) = (ar + pad, br + pad, m + pad);
                    let shape = GemmShape::new(ta, tb, m, n, k, out, add).with_ld(lda, ldb, ldc);
                    let (a, ag) = e.rnd_act(lda * ac, 1.0);
                    let (b, bg) = e.rnd_act(ldb * bc, 1.0);
                    let (c0, mut cg) = e.rnd_as(out == Dtype::Bf16, ldc * n, 1.0);
                    e.g.gemm_bf16_buf(shape, &ag, &bg, None, &mut cg);
                    let mut want = c0.clone();
                    for j in 0..n {
                        for i in 0..m {
                            let mut s = if add == GemmAdd::Accumulate { c0[i + j * ldc] as f64 } else { 0.0 };
                            for p in 0..k {
                                let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                                let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                                s += av as f64 * bv as f64;
                            }
                            want[i + j * ldc] = s as f32;
                        }
                    }
                    let op = |t: bool| if t { 'T' } else { 'N' };
                    let beta = if add == GemmAdd::Zero { 0 } else { 1 };
                    let ld = if pad > 0 { " ld+8" } else { "" };
                    let tag = format!("gemm_bf16 {}{} m{m} n{n} k{k}{ld} beta{beta} C {:?}", op(ta), op(tb), out);
                    let got = e.g.to_f32(&cg);
                    if out == Dtype::F32 {
                        r.check(&tag, "D", &got, &want, TOL_RED);
                    } else {
                        let base = (add == GemmAdd::Accumulate).then_some(&c0[..]);
                        r.add(&tag, "D", rel_l2(&got, &want, base, ldc * n), TOL_BF16);
                    }
                }
            }
        }
    }
}

fn rmsnorm_ops(e: &mut Env, r: &mut Report) {
    // Warp-per-row kernels for d % 4 == 0 up to 2048 (V = 2, 8, 8, 16, 4, 8 groups per lane; n not
    // a multiple of the rows per block), the block-per-row ones for odd or longer rows.
    for (n, d) in [(512usize, 256usize), (77, 1000), (130, 960), (19, 2048), (200, 512), (1000, 576), (61, 1001), (45, 7), (3, 4096)] {
        let tag = format!("rmsnorm n{n} d{d}");
        let (xc, xg) = e.rnd(n * d, 2.0);
        let wv: Vec<f32> = (0..d + PAD).map(|_| e.rng.gen_range(0.5..1.5)).collect();
        let (wc, wg) = e.up(&wv);
        let (mut oc, mut og) = e.rnd(n * d, 1.0);
        let (mut rc, mut rg) = e.rnd(n, 1.0);
        e.c.rmsnorm_fwd(&mut oc, &mut rc, &xc, &wc, n, d, 1e-5);
        e.g.rmsnorm_fwd(&mut og, &mut rg, &xg, &wg, n, d, 1e-5);
        r.check(&format!("{tag} fwd"), "out", &e.g.to_f32(&og), &oc, TOL);
        r.check(&format!("{tag} fwd"), "rstd", &e.g.to_f32(&rg), &rc, TOL);
        let (doc, dog) = e.rnd(n * d, 1.0);
        let (mut dxc, mut dxg) = e.rnd(n * d, 1.0);
        let (mut dwc, mut dwg) = e.rnd(d, 1.0);
        e.c.rmsnorm_bwd(&mut dxc, &mut dwc, &doc, &xc, &wc, &rc, n, d);
        e.g.rmsnorm_bwd(&mut dxg, &mut dwg, &dog, &xg, &wg, &rg, n, d);
        r.check(&format!("{tag} bwd"), "dx", &e.g.to_f32(&dxg), &dxc, TOL);
        r.check(&format!("{tag} bwd"), "dw", &e.g.to_f32(&dwg), &dwc, TOL_RED);
    }
}

fn rope_ops(e: &mut Env, r: &mut Report) {
    // Head counts below, at and past a batch of the kernel's loads (ROPE_HEADS = 8).
    for (n, heads, hd) in [(512usize, 8usize, 64usize), (100, 5, 128), (33, 3, 96), (64, 15, 64)] {
        let tag = format!("rope n{n} h{heads} hd{hd}");
        let pos: Vec<u32> = (0..n).map(|_| e.rng.gen_range(0..8192)).collect();
        let (pc, pg) = e.upi(&pos);
        let (mut xc, mut xg) = e.rnd(n * heads * hd, 1.0);
        e.c.rope_fwd(&mut xc, &pc, n, heads, hd, 10000.0);
        e.g.rope_fwd(&mut xg, &pg, n, heads, hd, 10000.0);
        r.check(&format!("{tag} fwd"), "x", &e.g.to_f32(&xg), &xc, TOL);
        e.c.rope_bwd(&mut xc, &pc, n, heads, hd, 10000.0);
        e.g.rope_bwd(&mut xg, &pg, n, heads, hd, 10000.0);
        r.check(&format!("{tag} bwd"), "dx", &e.g.to_f32(&xg), &xc, TOL);
    }
    // The kernels' other paths without random draws (the later groups' inputs stay as they were):
    // half a head not a whole 16-byte vector (hd 6: the per-pair kernel), and bf16 buffers (the
    // vector kernel on 8-element vectors) against the CPU on the same rounded values.
    for (n, heads, hd, bf16) in [(40usize, 4usize, 6usize, false), (77, 15, 64, true), (9, 3, 128, true)] {
        let tag = format!("rope{} n{n} h{heads} hd{hd}", if bf16 { " bf16" } else { "" });
        let pos: Vec<u32> = (0..n as u32).map(|i| (i * 977) % 8192).collect();
        let (pc, pg) = e.upi(&pos);
        let v: Vec<f32> = (0..n * heads * hd + PAD).map(|i| half::bf16::from_f32(((i * 7919) % 2001) as f32 / 1000.0 - 1.0).to_f32()).collect();
        let mut xc = e.c.from_f32(&v);
        let mut xg = if bf16 { e.zeros_bf16(v.len()) } else { e.g.zeros(v.len()) };
        e.g.write_f32(&mut xg, &v);
        e.c.rope_fwd(&mut xc, &pc, n, heads, hd, 10000.0);
        e.g.rope_fwd(&mut xg, &pg, n, heads, hd, 10000.0);
        r.check_prec(bf16, &format!("{tag} fwd"), "x", &e.g.to_f32(&xg), &xc, None, TOL);
        e.c.rope_bwd(&mut xc, &pc, n, heads, hd, 10000.0);
        e.g.rope_bwd(&mut xg, &pg, n, heads, hd, 10000.0);
        r.check_prec(bf16, &format!("{tag} bwd"), "dx", &e.g.to_f32(&xg), &xc, None, TOL);
    }
    // Queries and keys in one launch: the bits of two rope_fwd calls (the vector kernel, and the
    // per-pair fallback at hd 6), f32 and bf16.
    for (n, heads, kvh, hd, bf16) in [(77usize, 15usize, 5usize, 64usize, true), (50, 4, 2, 32, false), (20, 3, 1, 6, false), (9, 8, 8, 128, true)] {
        let tag = format!("rope_fwd_qk{} n{n} h{heads}/{kvh} hd{hd}", if bf16 { " bf16" } else { "" });
        let pos: Vec<u32> = (0..n as u32).map(|i| (i * 613) % 8192).collect();
        let (_, pg) = e.upi(&pos);
        let input = |e: &mut Env, len: usize| {
            let v: Vec<f32> = (0..len).map(|_| half::bf16::from_f32(e.rng.gen_range(-1.0f32..1.0)).to_f32()).collect();
            let mut a = if bf16 { e.zeros_bf16(len) } else { e.g.zeros(len) };
            let mut b = if bf16 { e.zeros_bf16(len) } else { e.g.zeros(len) };
            e.g.write_f32(&mut a, &v);
            e.g.write_f32(&mut b, &v);
            (a, b)
        };
        let ((mut q1, mut q2), (mut k1, mut k2)) = (input(e, n * heads * hd), input(e, n * kvh * hd));
        e.g.rope_fwd_qk(&mut q1, &mut k1, &pg, n, heads, kvh, hd, 10000.0);
        e.g.rope_fwd(&mut q2, &pg, n, heads, hd, 10000.0);
        e.g.rope_fwd(&mut k2, &pg, n, kvh, hd, 10000.0);
        r.add_exact(&tag, "q", bit_diffs(&e.g.to_f32(&q1), &e.g.to_f32(&q2)));
        r.add_exact(&tag, "k", bit_diffs(&e.g.to_f32(&k1), &e.g.to_f32(&k2)));
    }
}

fn softmax_ops(e: &mut Env, r: &mut Report) {
    for (n, c) in [(512usize, 3usize), (64, 1000), (5, 5000)] {
        let tag = format!("softmax n{n} c{c}");
        let (xc, xg) = e.rnd(n * c, 4.0);
        let (mut oc, mut og) = e.rnd(n * c, 1.0);
        e.c.softmax_fwd(&mut oc, &xc, n, c);
        e.g.softmax_fwd(&mut og, &xg, n, c);
        r.check(&format!("{tag} fwd"), "out", &e.g.to_f32(&og), &oc, TOL);
        let (doc, dog) = e.rnd(n * c, 1.0);
        let (mut dxc, mut dxg) = e.rnd(n * c, 1.0);
        e.c.softmax_bwd(&mut dxc, &doc, &oc, n, c);
        e.g.softmax_bwd(&mut dxg, &dog, &og, n, c);
        r.check(&format!("{tag} bwd"), "dx", &e.g.to_f32(&dxg), &dxc, TOL);
    }
}

// ---- token subsets ---------------------------------------------------------------------------

fn subset_ops(e: &mut Env, r: &mut Report) {
    let (rows, d, m) = (512usize, 256usize, 300usize);
    // Unique sorted subset and an index list with repeats.
    let mut uniq: Vec<u32> = (0..rows as u32).filter(|_| e.rng.gen_bool(0.6)).collect();
    uniq.truncate(m);
    let m_u = uniq.len();
    let rep: Vec<u32> = (0..m).map(|_| e.rng.gen_range(0..40)).collect();
    for (name, idx) in [("unique", uniq.clone()), ("repeated", rep.clone())] {
        let mm = idx.len();
        let (ic, ig) = e.upi(&idx);
        let (xc, xg) = e.rnd(rows * d, 1.0);
        let (mut oc, mut og) = e.rnd(mm * d, 1.0);
        e.c.gather_rows(&mut oc, &xc, &ic, mm, d);
        e.g.gather_rows(&mut og, &xg, &ig, mm, d);
        r.check(&format!("gather_rows ({name})"), "out", &e.g.to_f32(&og), &oc, 0.0);

        let (yc, yg) = e.rnd(mm * d, 1.0);
        let (mut hc, mut hg) = e.rnd(rows * d, 1.0);
        let h0 = e.g.to_f32(&hg);
        e.c.scatter_add_rows(&mut hc, &yc, &ic, mm, d);
        e.g.scatter_add_rows(&mut hg, &yg, &ig, mm, d);
        r.check(&format!("scatter_add_rows ({name})"), "dx", &e.g.to_f32(&hg), &hc, TOL);
        if name == "unique" {
            // The distinct-rows kernel against the grouped one, also at d = 1: the same bits for
            // the add and the copy; the scaled add the same expression (checked to rounding).
            let (_, sg1) = e.rnd(mm, 1.0);
            for dd in [d, 1] {
                let fresh = |e: &Env| e.g.from_f32(&h0);
                let (mut a1, mut a2, mut s1, mut s2, mut c1, mut c2) = (fresh(e), fresh(e), fresh(e), fresh(e), fresh(e), fresh(e));
                e.g.scatter_add_rows_distinct(&mut a1, &yg, &ig, mm, dd);
                e.g.scatter_add_rows(&mut a2, &yg, &ig, mm, dd);
                e.g.scatter_add_scaled_distinct(&mut s1, &yg, &sg1, &ig, mm, dd);
                e.g.scatter_add_scaled(&mut s2, &yg, &sg1, &ig, mm, dd);
                e.g.scatter_rows_distinct(&mut c1, &yg, &ig, mm, dd);
                e.g.scatter_rows(&mut c2, &yg, &ig, mm, dd);
                r.add_exact(&format!("scatter_add_rows_distinct d={dd}"), "dx", bit_diffs(&e.g.to_f32(&a1), &e.g.to_f32(&a2)));
                r.check(&format!("scatter_add_scaled_distinct d={dd}"), "h", &e.g.to_f32(&s1), &e.g.to_f32(&s2), 1e-6);
                r.add_exact(&format!("scatter_rows_distinct d={dd}"), "x", bit_diffs(&e.g.to_f32(&c1), &e.g.to_f32(&c2)));
            }
        }

        let (sc, sg) = e.rnd(mm, 1.0);
        e.c.scatter_add_scaled(&mut hc, &yc, &sc, &ic, mm, d);
        e.g.scatter_add_scaled(&mut hg, &yg, &sg, &ig, mm, d);
        r.check(&format!("scatter_add_scaled ({name})"), "h", &e.g.to_f32(&hg), &hc, TOL);

        let (mut dyc, mut dyg) = e.rnd(mm * d, 1.0);
        let (mut dsc, mut dsg) = e.rnd(mm, 1.0);
        e.c.scatter_add_scaled_bwd(&mut dyc, &mut dsc, &hc, &yc, &sc, &ic, mm, d);
        e.g.scatter_add_scaled_bwd(&mut dyg, &mut dsg, &hg, &yg, &sg, &ig, mm, d);
        r.check(&format!("scatter_add_scaled_bwd ({name})"), "dy", &e.g.to_f32(&dyg), &dyc, TOL);
        r.check(&format!("scatter_add_scaled_bwd ({name})"), "dscale", &e.g.to_f32(&dsg), &dsc, TOL_RED);

        e.c.scatter_rows(&mut hc, &yc, &ic, mm, d);
        e.g.scatter_rows(&mut hg, &yg, &ig, mm, d);
        r.check(&format!("scatter_rows ({name})"), "x", &e.g.to_f32(&hg), &hc, 0.0);

        let (mut dyc, mut dyg) = e.rnd(mm * d, 1.0);
        let (mut dxc, mut dxg) = e.rnd(rows * d, 1.0);
        e.c.scatter_rows_bwd(&mut dyc, &mut dxc, &ic, mm, d);
        e.g.scatter_rows_bwd(&mut dyg, &mut dxg, &ig, mm, d);
        r.check(&format!("scatter_rows_bwd ({name})"), "dy", &e.g.to_f32(&dyg), &dyc, TOL);
        r.check(&format!("scatter_rows_bwd ({name})"), "dx", &e.g.to_f32(&dxg), &dxc, 0.0);

        let (mut fc, mut fg) = e.rnd(rows, 1.0);
        e.c.index_fill(&mut fc, &ic, mm, -3.5);
        e.g.index_fill(&mut fg, &ig, mm, -3.5);
        r.check(&format!("index_fill ({name})"), "x", &e.g.to_f32(&fg), &fc, 0.0);
    }
    let _ = m_u;
}

fn topk_case(e: &mut Env, r: &mut Report, name: &str, scores: &[f32], seg_lens: &[usize], k: usize) {
    let mut cu = vec![0u32];
    for &l in seg_lens {
        cu.push(cu.last().unwrap() + l as u32);
    }
    let ns = seg_lens.len();
    let (sc, sg) = e.up(scores);
    let (cc, cg) = e.upi(&cu);
    let init = vec![u32::MAX - 1; ns * k + PAD];
    let (mut oc, mut og) = e.upi(&init);
    e.c.topk_segments(&mut oc, &sc, &cc, ns, k);
    e.g.topk_segments(&mut og, &sg, &cg, ns, k);
    let a = e.g.idx_to_vec(&og);
    let b = e.c.idx_to_vec(&oc);
    let mism = a.iter().zip(&b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len());
    if mism > 0 {
        // Compare the selected sets, not only the positions, and show a few differences.
        let (sa, sb): (std::collections::BTreeSet<u32>, std::collections::BTreeSet<u32>) =
            (a[..ns * k].iter().copied().collect(), b[..ns * k].iter().copied().collect());
        let only_g: Vec<_> = sa.difference(&sb).take(5).map(|&i| (i, scores.get(i as usize).copied())).collect();
        let only_c: Vec<_> = sb.difference(&sa).take(5).map(|&i| (i, scores.get(i as usize).copied())).collect();
        println!("    topk {name}: only on GPU (idx, score) {only_g:?}; only on CPU {only_c:?}");
    }
    r.add_exact(&format!("topk_segments ({name})"), "indices", mism);
}

fn topk_ops(e: &mut Env, r: &mut Report) {
    // 4 x 2048 with many ties (scores quantised to 1/8), k = half.
    let s: Vec<f32> = (0..4 * 2048).map(|_| (e.rng.gen_range(-2.0f32..2.0) * 8.0).round() / 8.0).collect();
    topk_case(e, r, "4x2048 ties k1024", &s, &[2048; 4], 1024);
    // Ragged segments.
    let lens = [300usize, 517, 1000, 150];
    let s: Vec<f32> = (0..lens.iter().sum::<usize>()).map(|_| e.rng.gen_range(-1.0f32..1.0)).collect();
    topk_case(e, r, "ragged k150", &s, &lens, 150);
    // NaN, ±0, ±inf.
    let mut s: Vec<f32> = (0..64).map(|i| [0.0f32, -0.0, 1.0, -1.0][i % 4]).collect();
    s[5] = f32::NAN;
    s[9] = f32::INFINITY;
    s[11] = f32::NEG_INFINITY;
    s[40] = f32::NAN;
    topk_case(e, r, "nan/zero/inf k40", &s, &[64], 40);
    topk_case(e, r, "k = len", &s, &[32, 32], 32);
    // Long segment: sorted in global memory (padded length > shared-memory capacity).
    let s: Vec<f32> = (0..20_000).map(|_| (e.rng.gen_range(-4.0f32..4.0) * 64.0).round() / 64.0).collect();
    topk_case(e, r, "1x20000 k5000", &s, &[20_000], 5000);
    // subset_rows (no random draws: the later groups' inputs stay as they were).
    let parent: Vec<u32> = (0..5000u32).map(|i| i * 3 + 7).collect();
    let local: Vec<u32> = (0..1200u32).map(|i| (i * 37) % 5000).collect();
    let ((pc, pg), (lc, lg)) = (e.upi(&parent), e.upi(&local));
    let ((mut ic, mut ig), (mut qc, mut qg)) = (e.upi(&[0; 1200]), e.upi(&[0; 1200]));
    e.c.subset_rows(&mut ic, &mut qc, &pc, &lc, 1200, 2048);
    e.g.subset_rows(&mut ig, &mut qg, &pg, &lg, 1200, 2048);
    let diffs = |g: &[u32], c: &[u32]| g.iter().zip(c).filter(|(a, b)| a != b).count();
    r.add_exact("subset_rows m1200", "idx", diffs(&e.g.idx_to_vec(&ig), &e.c.idx_to_vec(&ic)));
    r.add_exact("subset_rows m1200", "pos", diffs(&e.g.idx_to_vec(&qg), &e.c.idx_to_vec(&qc)));
}

// ---- losses / optimiser ------------------------------------------------------------------------

fn loss_ops(e: &mut Env, r: &mut Report) {
    for (n, vocab) in [(512usize, 1000usize), (16, 50_257)] {
        let tag = format!("cross_entropy n{n} V{vocab}");
        let (xc, xg) = e.rnd(n * vocab, 5.0);
        let t: Vec<u32> = (0..n).map(|i| if i % 7 == 3 { u32::MAX } else { e.rng.gen_range(0..vocab as u32) }).collect();
        let (tc, tg) = e.upi(&t);
        let (mut lc, mut lg) = e.rnd(n, 1.0);
        e.c.cross_entropy_fwd(&mut lc, &xc, &tc, n, vocab);
        e.g.cross_entropy_fwd(&mut lg, &xg, &tg, n, vocab);
        r.check(&format!("{tag} fwd"), "loss", &e.g.to_f32(&lg), &lc, TOL);
        let (mut dc, mut dg) = e.rnd(n * vocab, 1e-3);
        e.c.cross_entropy_bwd(&mut dc, &xc, &tc, 1.0 / n as f32, n, vocab);
        e.g.cross_entropy_bwd(&mut dg, &xg, &tg, 1.0 / n as f32, n, vocab);
        r.check(&format!("{tag} bwd"), "dlogits", &e.g.to_f32(&dg), &dc, TOL);
    }
    // The fused forward + backward (the LM head in training) against the CPU's fwd, fill 0, bwd:
    // f32 dlogits (to rounding) and a bf16 activation buffer of them (whole-tensor error); dlogits
    // start as garbage (the op sets them). Odd vocabularies take the scalar loops, multiples of 4
    // the 16-byte ones.
    for (n, vocab) in [(512usize, 1000usize), (16, 50_257), (64, 49_152), (8, 12), (8, 6)] {
        let (xc, xg) = e.rnd(n * vocab, 5.0);
        let t: Vec<u32> = (0..n).map(|i| if i % 7 == 3 { u32::MAX } else { e.rng.gen_range(0..vocab as u32) }).collect();
        let (tc, tg) = e.upi(&t);
        let scale = 1.0 / n as f32;
        for bf16 in [false, true] {
            let tag = format!("ce_fwd_bwd n{n} V{vocab}{}", if bf16 { " bf16" } else { "" });
            let (mut lc, mut lg) = e.rnd(n, 1.0);
            let (mut dc, mut dg) = e.rnd_as(bf16, n * vocab, 1.0);
            e.c.cross_entropy_fwd_bwd(&mut lc, &mut dc, &xc, &tc, scale, n, vocab);
            e.g.cross_entropy_fwd_bwd(&mut lg, &mut dg, &xg, &tg, scale, n, vocab);
            r.check(&tag, "loss", &e.g.to_f32(&lg), &lc, TOL);
            r.check_prec(bf16, &tag, "dlogits", &e.g.to_f32(&dg), &dc, None, TOL);
        }
        // bf16 logits (the bf16 mode's LM head output) with bf16 dlogits, and the forward alone,
        // against the CPU on the same bf16-rounded logits.
        let tag = format!("ce bf16 logits n{n} V{vocab}");
        let (xc, xg) = e.rnd_act(n * vocab, 5.0);
        let (mut lc, mut lg) = e.rnd(n, 1.0);
        let (mut dc, mut dg) = e.rnd_act(n * vocab, 1.0);
        e.c.cross_entropy_fwd_bwd(&mut lc, &mut dc, &xc, &tc, scale, n, vocab);
        e.g.cross_entropy_fwd_bwd(&mut lg, &mut dg, &xg, &tg, scale, n, vocab);
        r.check(&format!("{tag} fwd_bwd"), "loss", &e.g.to_f32(&lg), &lc, TOL);
        r.check_prec(true, &format!("{tag} fwd_bwd"), "dlogits", &e.g.to_f32(&dg), &dc, None, TOL);
        // The same loss buffer (its padding equals the CPU's), its losses cleared first.
        e.g.fill(&mut lg, n, 0.0);
        e.g.cross_entropy_fwd(&mut lg, &xg, &tg, n, vocab);
        r.check(&format!("{tag} fwd"), "loss", &e.g.to_f32(&lg), &lc, TOL);
    }
    // Out-of-range targets (the CPU panics on them): against the GPU's own fwd (NaN loss) and
    // fill + bwd (the row skipped: zero), ignored rows zero as well.
    {
        let (n, vocab) = (6usize, 1000usize);
        let (_, xg) = e.rnd(n * vocab, 5.0);
        let t = [3u32, vocab as u32, u32::MAX, 999, vocab as u32 + 5, 0];
        let (_, tg) = e.upi(&t);
        let (_, mut l0) = e.rnd(n, 1.0);
        let (_, mut d0) = e.rnd(n * vocab, 1.0);
        e.g.cross_entropy_fwd(&mut l0, &xg, &tg, n, vocab);
        e.g.fill(&mut d0, n * vocab, 0.0);
        e.g.cross_entropy_bwd(&mut d0, &xg, &tg, 0.5, n, vocab);
        for bf16 in [false, true] {
            let tag = format!("ce_fwd_bwd out-of-range{}", if bf16 { " bf16" } else { "" });
            let (_, mut l1) = e.rnd(n, 1.0);
            let (_, mut d1) = e.rnd_as(bf16, n * vocab, 1.0);
            e.g.cross_entropy_fwd_bwd(&mut l1, &mut d1, &xg, &tg, 0.5, n, vocab);
            let (l0v, l1v) = (e.g.to_f32_prefix(&l0, n), e.g.to_f32_prefix(&l1, n));
            let nan_ok = [1usize, 4].iter().all(|&i| l1v[i].is_nan()) && l1v[2] == 0.0;
            r.add(&tag, "loss NaN/0", if nan_ok { 0.0 } else { f64::INFINITY }, TOL);
            r.check(&tag, "loss", &l1v, &l0v, TOL);
            let (d0v, d1v) = (e.g.to_f32_prefix(&d0, n * vocab), e.g.to_f32_prefix(&d1, n * vocab));
            let zero_rows = [1usize, 2, 4].iter().all(|&i| d1v[i * vocab..(i + 1) * vocab].iter().all(|&g| g == 0.0));
            r.add(&tag, "zero rows", if zero_rows { 0.0 } else { f64::INFINITY }, TOL);
            if bf16 {
                r.add(&tag, "dlogits", rel_l2(&d1v, &d0v, None, d0v.len()), TOL_BF16);
            } else {
                r.check(&tag, "dlogits", &d1v, &d0v, TOL);
            }
        }
    }
}

fn adamw_ops(e: &mut Env, r: &mut Report) {
    let n = 100_003;
    let (mut pc, mut pg) = e.rnd(n, 1.0);
    let (mut mc, mut mg) = e.rnd(n, 0.01);
    let vv: Vec<f32> = (0..n + PAD).map(|_| e.rng.gen_range(0.0..1e-4)).collect();
    let (mut vc, mut vg) = e.up(&vv);
    for step in [1u64, 2, 10] {
        let (gc, gg) = e.rnd(n, 0.1);
        e.c.adamw(&mut pc, &gc, &mut mc, &mut vc, n, 3e-4, 0.9, 0.95, 1e-8, 0.1, step);
        e.g.adamw(&mut pg, &gg, &mut mg, &mut vg, n, 3e-4, 0.9, 0.95, 1e-8, 0.1, step);
    }
    r.check("adamw x3 steps", "param", &e.g.to_f32(&pg), &pc, TOL);
    r.check("adamw x3 steps", "m", &e.g.to_f32(&mg), &mc, TOL);
    r.check("adamw x3 steps", "v", &e.g.to_f32(&vg), &vc, TOL);
}

// ---- multi-tensor optimizer ops ------------------------------------------------------------

/// The CUDA backend on device 0 (options from the environment), or exit 2 saying why not.
fn open_gpu() -> Cuda {
    Cuda::new(0).unwrap_or_else(|e| {
        eprintln!("cannot start the CUDA backend: {e}");
        std::process::exit(2);
    })
}

/// Bit mismatches between two equally long vectors (a length difference counts as all).
fn bit_diffs(a: &[f32], b: &[f32]) -> usize {
    if a.len() != b.len() {
        return a.len().max(b.len());
    }
    a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count()
}

/// The optimizer's one-launch ops (cuda/optim.rs): `sum_squares_many` (exact against the
/// per-tensor `sum_squares`), `adamw_many` with clipping folded in (against `Cpu<f32>`, and exact
/// against the per-tensor CUDA path it replaces: scale, then adamw), `fill_many`, and that a
/// parameter updated by `adamw_many` reaches the bf16 GEMMs (its version stamp is bumped).
fn multi_tensor_ops(e: &mut Env, r: &mut Report) {
    use mor_engine::AdamWItem;
    // Tiny (norm-like), around the 16384-element chunk, one over 1M, an empty one.
    let sizes = [1usize, 7, 960, 16_383, 16_385, 1_234_567, 0, 33];
    let decay = [0.0f32, 0.1, 0.0, 0.1, 0.0, 0.1, 0.1, 0.0];
    let (lr, b1, b2, eps) = (3e-4f32, 0.9f32, 0.95f32, 1e-8f32);
    let mut p = Vec::new();
    let mut m = Vec::new();
    let mut v = Vec::new();
    for &n in &sizes {
        p.push(e.rnd(n, 1.0));
        m.push(e.rnd(n, 0.01));
        let vv: Vec<f32> = (0..n + PAD).map(|_| e.rng.gen_range(0.0..1e-4)).collect();
        v.push(e.up(&vv));
    }
    // The per-tensor CUDA path on copies of the same state.
    let copy = |e: &Env, xs: &[(Vec<f32>, <G as Backend>::Buf)]| -> Vec<<G as Backend>::Buf> { xs.iter().map(|x| e.g.from_f32(&x.0)).collect() };
    let (mut p1, mut m1, mut v1) = (copy(e, &p), copy(e, &m), copy(e, &v));
    // The device-scalar path (clip_scalars + adamw_many_dev, what a CUDA graph records).
    let (mut p2, mut m2, mut v2) = (copy(e, &p), copy(e, &m), copy(e, &v));
    let mut scal = e.g.zeros(mor_engine::backend::opt_scalars::LEN);
    let (mut dev_scalar_diffs, mut dev_norm_err) = (0usize, 0.0f64);
    let (mut sum_diffs, mut sum_err, mut grad_diffs, mut each_diffs) = (0usize, 0.0f64, 0usize, 0usize);
    // Steps 1 and 3 clip to norm 1 (grad_scale 1/(norm + 1e-6)), step 2 passes grad_scale 1.
    for (step, amp, clip) in [(1u64, 0.1f32, true), (2, 0.01, false), (3, 0.1, true)] {
        let grads: Vec<(Vec<f32>, <G as Backend>::Buf)> = sizes.iter().map(|&n| e.rnd(n, amp)).collect();
        let xs_c: Vec<(&Vec<f32>, usize)> = grads.iter().zip(&sizes).map(|(g, &n)| (&g.0, n)).collect();
        let xs_g: Vec<(&<G as Backend>::Buf, usize)> = grads.iter().zip(&sizes).map(|(g, &n)| (&g.1, n)).collect();
        let (sc, sg) = (e.c.sum_squares_many(&xs_c), e.g.sum_squares_many(&xs_g));
        let each: Vec<f64> = xs_g.iter().map(|&(x, n)| e.g.sum_squares(x, n)).collect();
        sum_diffs += sg.iter().zip(&each).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        sum_err = sc.iter().zip(&sg).fold(sum_err, |w, (c, g)| w.max((g - c).abs() / (c.abs() + 1e-30)));
        // The GPU's sums (the device clip adds those): the scale both GPU paths must use.
        let norm = sg.iter().sum::<f64>().sqrt();
        let grad_scale = if clip { (1.0 / (norm + 1e-6)) as f32 } else { 1.0 };
        assert!(grad_scale <= 1.0 && (clip == (grad_scale < 1.0)), "step {step}: norm {norm}");

        let mut items_c: Vec<AdamWItem<'_, C>> = Vec::new();
        let mut items_g: Vec<AdamWItem<'_, G>> = Vec::new();
        for (k, (((pk, mk), vk), gk)) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(&grads).enumerate() {
            let (n, weight_decay) = (sizes[k], decay[k]);
            items_c.push(AdamWItem { param: &mut pk.0, grad: &gk.0, m: &mut mk.0, v: &mut vk.0, n, weight_decay });
            items_g.push(AdamWItem { param: &mut pk.1, grad: &gk.1, m: &mut mk.1, v: &mut vk.1, n, weight_decay });
        }
        e.c.adamw_many(&mut items_c, lr, b1, b2, eps, step, grad_scale);
        e.g.adamw_many(&mut items_g, lr, b1, b2, eps, step, grad_scale);
        drop((items_c, items_g));
        grad_diffs += grads.iter().map(|g| bit_diffs(&e.g.to_f32(&g.1), &g.0)).sum::<usize>();

        for (k, &n) in sizes.iter().enumerate() {
            let mut gk = e.g.zeros(n + PAD);
            e.g.copy(&mut gk, &grads[k].1, n + PAD);
            if grad_scale != 1.0 {
                e.g.scale(&mut gk, grad_scale, n);
            }
            e.g.adamw(&mut p1[k], &gk, &mut m1[k], &mut v1[k], n, lr, b1, b2, eps, decay[k], step);
        }

        {
            use mor_engine::backend::{opt_scalars as o, AdamStepScalars};
            let s = AdamStepScalars::new(lr, b1, b2, step);
            let mut staged = [0.0f64; o::LEN];
            (staged[o::LR], staged[o::STEP], staged[o::STEP_SIZE], staged[o::BC2_SQRT], staged[o::OB1], staged[o::OB2]) =
                (lr as f64, step as f64, s.step_size, s.bc2_sqrt, s.ob1, s.ob2);
            e.g.write_f64(&mut scal, &staged);
            e.g.clip_scalars(&xs_g, if clip { 1.0 } else { 0.0 }, &mut scal);
            let got = e.g.to_f64_prefix(&scal, o::LEN);
            dev_scalar_diffs += (got[o::GSCALE] as f32).to_bits().abs_diff(grad_scale.to_bits()) as usize + (got[o::CLIPPED] != clip as u8 as f64) as usize;
            dev_norm_err = dev_norm_err.max(((got[o::NORM_HI] + got[o::NORM_LO]) - norm).abs() / norm);
            let mut items: Vec<AdamWItem<'_, G>> = Vec::new();
            for (k, ((pk, mk), vk)) in p2.iter_mut().zip(m2.iter_mut()).zip(v2.iter_mut()).enumerate() {
                items.push(AdamWItem { param: pk, grad: &grads[k].1, m: mk, v: vk, n: sizes[k], weight_decay: decay[k] });
            }
            e.g.adamw_many_dev(&mut items, b1, b2, eps, true, &scal);
        }
    }
    let dev_diffs: usize = (0..sizes.len())
        .map(|k| bit_diffs(&e.g.to_f32(&p2[k]), &e.g.to_f32(&p[k].1)) + bit_diffs(&e.g.to_f32(&m2[k]), &e.g.to_f32(&m[k].1)) + bit_diffs(&e.g.to_f32(&v2[k]), &e.g.to_f32(&v[k].1)))
        .sum();
    r.add_exact("clip_scalars vs host clip", "scale bits, clipped", dev_scalar_diffs);
    r.add("clip_scalars norm (hi + lo vs host f64)", "relative", dev_norm_err, 1e-12);
    r.add_exact("adamw_many_dev vs adamw_many", "p, m, v bits", dev_diffs);
    r.add_exact("sum_squares_many vs sum_squares", "bits", sum_diffs);
    r.add("sum_squares_many x3 (vs cpu)", "sums", sum_err, TOL);
    for (k, &n) in sizes.iter().enumerate() {
        let op = format!("adamw_many x3 clip n={n}");
        r.check(&op, "param", &e.g.to_f32(&p[k].1), &p[k].0, TOL);
        r.check(&op, "m", &e.g.to_f32(&m[k].1), &m[k].0, TOL);
        r.check(&op, "v", &e.g.to_f32(&v[k].1), &v[k].0, TOL);
        each_diffs += bit_diffs(&e.g.to_f32(&p[k].1), &e.g.to_f32(&p1[k]))
            + bit_diffs(&e.g.to_f32(&m[k].1), &e.g.to_f32(&m1[k]))
            + bit_diffs(&e.g.to_f32(&v[k].1), &e.g.to_f32(&v1[k]));
    }
    r.add_exact("adamw_many vs scale+adamw (gpu)", "p, m, v bits", each_diffs);
    r.add_exact("adamw_many leaves grads", "bits", grad_diffs);

    // A weight updated by adamw_many is seen by the bf16 GEMMs (stale bf16 copy not reused).
    let was = e.g.options().gemm;
    e.g.set_matmul_precision(MatmulPrecision::Bf16);
    let (rows, k, out) = (64usize, 96usize, 80usize);
    let (_, x) = e.rnd(rows * k, 1.0);
    let (_, mut w) = e.rnd(out * k, 0.05);
    let (_, gw) = e.rnd(out * k, 1.0);
    let (mut mw, mut vw) = (e.g.zeros(out * k), e.g.zeros(out * k));
    let (mut y0, mut y1, mut y2) = (e.g.zeros(rows * out), e.g.zeros(rows * out), e.g.zeros(rows * out));
    e.g.matmul_fwd(&mut y0, &x, &w, rows, k, out);
    let mut items = [AdamWItem { param: &mut w, grad: &gw, m: &mut mw, v: &mut vw, n: out * k, weight_decay: 0.1 }];
    e.g.adamw_many(&mut items, 0.05, b1, b2, eps, 1, 0.5);
    e.g.matmul_fwd(&mut y1, &x, &w, rows, k, out);
    let fresh = e.g.from_f32(&e.g.to_f32(&w));
    e.g.matmul_fwd(&mut y2, &x, &fresh, rows, k, out);
    let (y0, y1, y2) = (e.g.to_f32(&y0), e.g.to_f32(&y1), e.g.to_f32(&y2));
    r.add_exact("adamw_many then bf16 matmul", "vs fresh copy", bit_diffs(&y1, &y2) + if y0 == y1 { 1 } else { 0 });
    e.g.set_matmul_precision(if was == mor_engine::cuda::GemmPrecision::Bf16 { MatmulPrecision::Bf16 } else { MatmulPrecision::F32 });

    // fill_many over f32 buffers of odd sizes and a bf16 activation buffer (through fill).
    let fsizes = [5usize, 16_385, 1, 0, 70_000];
    let mut bufs: Vec<(Vec<f32>, <G as Backend>::Buf)> = fsizes.iter().map(|&n| e.rnd(n, 1.0)).collect();
    bufs.push(e.rnd_act(3000, 1.0));
    let lens: Vec<usize> = fsizes.iter().copied().chain([2999]).collect();
    for value in [0.0f32, 0.5] {
        let mut bc: Vec<(&mut Vec<f32>, usize)> = bufs.iter_mut().zip(&lens).map(|(b, &n)| (&mut b.0, n)).collect();
        e.c.fill_many(&mut bc, value);
        let mut bg: Vec<(&mut <G as Backend>::Buf, usize)> = bufs.iter_mut().zip(&lens).map(|(b, &n)| (&mut b.1, n)).collect();
        e.g.fill_many(&mut bg, value);
        let diffs: usize = bufs.iter().map(|b| bit_diffs(&e.g.to_f32(&b.1), &b.0)).sum();
        r.add_exact(&format!("fill_many({value}) 6 buffers"), "bits", diffs);
    }
}

// ---- attention -------------------------------------------------------------------------------

/// One attention problem: per segment, query and key positions.
struct AttnCase {
    name: String,
    segs: Vec<(Vec<u32>, Vec<u32>)>,
    heads: usize,
    kv_heads: usize,
    hd: usize,
}

fn sorted_subset(rng: &mut ChaCha8Rng, from: &[u32], p: f64) -> Vec<u32> {
    let mut v: Vec<u32> = from.iter().copied().filter(|_| rng.gen_bool(p)).collect();
    if v.is_empty() {
        v.push(from[from.len() / 2]);
    }
    v
}

fn attention_cases(rng: &mut ChaCha8Rng) -> Vec<AttnCase> {
    let mut cases = Vec::new();
    // Vanilla causal, several documents (lengths not multiples of the tile).
    let lens = [200u32, 250, 61, 1];
    let segs = lens.iter().map(|&l| ((0..l).collect::<Vec<_>>(), (0..l).collect::<Vec<_>>())).collect();
    cases.push(AttnCase { name: "vanilla 4 docs".into(), segs, heads: 8, kv_heads: 4, hd: 64 });
    // Compacted recursion step: queries = keys = a subset with non-contiguous positions.
    let segs = [256u32, 256]
        .iter()
        .map(|&l| {
            let all: Vec<u32> = (0..l).collect();
            let sub = sorted_subset(rng, &all, 0.5);
            (sub.clone(), sub)
        })
        .collect();
    cases.push(AttnCase { name: "subset q=k".into(), segs, heads: 8, kv_heads: 4, hd: 64 });
    // KV sharing: queries = subset, keys = every token of the segment; plus a segment whose
    // first query precedes every key (no visible key: lse = +inf, output 0), and an empty one.
    let mut segs: Vec<(Vec<u32>, Vec<u32>)> = [300u32, 212]
        .iter()
        .map(|&l| {
            let all: Vec<u32> = (0..l).collect();
            (sorted_subset(rng, &all, 0.3), all)
        })
        .collect();
    segs.push((vec![2, 7, 30, 31], (5..40).collect()));
    segs.push((vec![], vec![]));
    cases.push(AttnCase { name: "kv-share q!=k".into(), segs: segs.clone(), heads: 8, kv_heads: 4, hd: 64 });
    cases.push(AttnCase { name: "kv-share hd128 mha".into(), segs: segs.clone(), heads: 4, kv_heads: 4, hd: 128 });
    cases.push(AttnCase { name: "kv-share hd96 mqa".into(), segs: segs.clone(), heads: 6, kv_heads: 1, hd: 96 });
    cases.push(AttnCase { name: "kv-share hd32".into(), segs, heads: 4, kv_heads: 2, hd: 32 });
    // Unsorted positions inside a segment (decode-like: one query against a cache).
    let keys: Vec<u32> = (0..100).rev().collect();
    cases.push(AttnCase { name: "decode 1q, reversed keys".into(), segs: vec![(vec![99], keys.clone()), (vec![50], keys)], heads: 8, kv_heads: 4, hd: 64 });
    // Long documents (many full 64-row tiles, one length a multiple of 64), 15/5 heads as in 360M.
    let lens = [640u32, 333];
    let segs = lens.iter().map(|&l| ((0..l).collect::<Vec<_>>(), (0..l).collect::<Vec<_>>())).collect();
    cases.push(AttnCase { name: "vanilla long 15/5".into(), segs, heads: 15, kv_heads: 5, hd: 64 });
    cases
}

/// Whole-tensor relative error `‖a - b‖ / ‖b - base‖` over the op's extent, for the bf16 kernels
/// (whose rounding makes the element-wise metric meaningless near zero); `base` is the initial
/// content of an accumulated gradient (zero for outputs). The padding after the extent must stay
/// bit-identical. Non-finite values must match exactly (e.g. lse = +inf).
fn rel_l2(a: &[f32], b: &[f32], base: Option<&[f32]>, extent: usize) -> f64 {
    if a.len() != b.len() || a[extent..].iter().zip(&b[extent..]).any(|(x, y)| x.to_bits() != y.to_bits()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&x, &y)) in a[..extent].iter().zip(&b[..extent]).enumerate() {
        if !x.is_finite() || !y.is_finite() {
            if x != y {
                return f64::INFINITY;
            }
            continue;
        }
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64 - base.map_or(0.0, |b| b[i] as f64)).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

/// Tolerance of the bf16 (tensor-core) attention kernels, whole-tensor relative error.
const TOL_BF16: f64 = 1e-2;

fn attention_ops(e: &mut Env, r: &mut Report) {
    let cases = attention_cases(&mut e.rng);
    for bf16 in [false, true] {
        e.g.set_matmul_precision(if bf16 { MatmulPrecision::Bf16 } else { MatmulPrecision::F32 });
        for case in &cases {
            if !bf16 || matches!(case.hd, 32 | 64) {
                attention_case(e, r, case, bf16, false);
            }
        }
    }
    e.g.set_matmul_precision(MatmulPrecision::F32);
}

/// One attention case; with `act` the activations (q, k, v, out, dout, dq) are bf16 buffers, as
/// the bf16 mode's model stores them (dk, dv stay f32: they accumulate over KV-sharing layers).
fn attention_case(e: &mut Env, r: &mut Report, case: &AttnCase, bf16: bool, act: bool) {
    {
        let (heads, kvh, hd) = (case.heads, case.kv_heads, case.hd);
        let mut cu_q = vec![0u32];
        let mut cu_k = vec![0u32];
        let (mut pos_q, mut pos_k) = (Vec::new(), Vec::new());
        for (q, k) in &case.segs {
            cu_q.push(cu_q.last().unwrap() + q.len() as u32);
            cu_k.push(cu_k.last().unwrap() + k.len() as u32);
            pos_q.extend_from_slice(q);
            pos_k.extend_from_slice(k);
        }
        let (nq, nk, ns) = (pos_q.len(), pos_k.len(), case.segs.len());
        let (cqc, cqg) = e.upi(&cu_q);
        let (ckc, ckg) = e.upi(&cu_k);
        let (pqc, pqg) = e.upi(&pos_q);
        let (pkc, pkg) = e.upi(&pos_k);
        let sc = AttnShape { cu_q: &cqc, cu_k: &ckc, pos_q: &pqc, pos_k: &pkc, num_seqs: ns, nq, nk, heads, kv_heads: kvh, head_dim: hd };
        let sg = AttnShape { cu_q: &cqg, cu_k: &ckg, pos_q: &pqg, pos_k: &pkg, num_seqs: ns, nq, nk, heads, kv_heads: kvh, head_dim: hd };
        let (qc, qg) = e.rnd_as(act, nq * heads * hd, 1.0);
        let (kc, kg) = e.rnd_as(act, nk * kvh * hd, 1.0);
        let (vc, vg) = e.rnd_as(act, nk * kvh * hd, 1.0);
        let (mut oc, mut og) = e.rnd_as(act, nq * heads * hd, 1.0);
        let (mut lc, mut lg) = e.rnd(nq * heads, 1.0);
        e.c.attention_fwd(&mut oc, &mut lc, &qc, &kc, &vc, &sc);
        e.g.attention_fwd(&mut og, &mut lg, &qg, &kg, &vg, &sg);
        if act {
            // The GPU output is stored in bf16: compare against the rounded reference, and feed
            // the backward the same rounded output on both sides.
            oc.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        }
        let mode = if act { " bf16-act" } else if bf16 { " bf16" } else { "" };
        let tag = format!("attention{mode} {} (nq{nq} nk{nk})", case.name);
        r.check_prec(bf16, &format!("{tag} fwd"), "out", &e.g.to_f32(&og), &oc, None, TOL_RED);
        r.check_prec(bf16, &format!("{tag} fwd"), "lse", &e.g.to_f32(&lg), &lc, None, TOL);
        if bf16 && !act {
            // The model's form: f32 output plus its bf16 copy for the output projection.
            let (_, mut og2) = e.rnd(nq * heads * hd, 1.0);
            let (_, mut copy) = e.rnd_act(nq * heads * hd, 1.0);
            let (_, mut lg2) = e.rnd(nq * heads, 1.0);
            e.g.attention_fwd_mirrored(&mut og2, &mut copy, &mut lg2, &qg, &kg, &vg, &sg);
            let (o1, o2) = (e.g.to_f32(&og), e.g.to_f32(&og2));
            let ext = nq * heads * hd;
            r.add_exact(&format!("{tag} fwd mirrored"), "out", bit_diffs(&o2[..ext], &o1[..ext]));
            let rounded: Vec<f32> = o1[..ext].iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
            r.add_exact(&format!("{tag} fwd mirrored"), "bf16 copy", bit_diffs(&e.g.to_f32(&copy)[..ext], &rounded));
        }
        let (doc, dog) = e.rnd_as(act, nq * heads * hd, 1.0);
        let (mut dqc, mut dqg) = e.rnd_as(act, nq * heads * hd, 1.0);
        if act {
            // A bf16 gradient holds its sum in bf16: start it from zero as the model does (from
            // random values the rounding of the sum would swamp the gradient being checked).
            e.c.fill(&mut dqc, nq * heads * hd, 0.0);
            e.g.fill(&mut dqg, nq * heads * hd, 0.0);
        }
        let (mut dkc, mut dkg) = e.rnd(nk * kvh * hd, 1.0);
        let (mut dvc, mut dvg) = e.rnd(nk * kvh * hd, 1.0);
        let (dq0, dk0, dv0) = (dqc.clone(), dkc.clone(), dvc.clone());
        e.c.attention_bwd(&mut dqc, &mut dkc, &mut dvc, &doc, &oc, &lc, &qc, &kc, &vc, &sc);
        e.g.attention_bwd(&mut dqg, &mut dkg, &mut dvg, &dog, &og, &lg, &qg, &kg, &vg, &sg);
        r.check_prec(bf16, &format!("{tag} bwd"), "dq", &e.g.to_f32(&dqg), &dqc, Some(&dq0), TOL_RED);
        r.check_prec(bf16, &format!("{tag} bwd"), "dk", &e.g.to_f32(&dkg), &dkc, Some(&dk0), TOL_RED);
        r.check_prec(bf16, &format!("{tag} bwd"), "dv", &e.g.to_f32(&dvg), &dvc, Some(&dv0), TOL_RED);
        // The layer's form: dq overwritten and through the inverse RoPE (the fused kernel rotates
        // its f32 workspace; the CPU composes fill, backward and rope_bwd).
        // dk / dv added to (random) or overwritten (random before: every row must be stored).
        for kv_set in [false, true] {
            let (mut dqc, mut dqg) = e.rnd_as(act, nq * heads * hd, 1.0);
            let (mut dkc, mut dkg) = e.rnd(nk * kvh * hd, 1.0);
            let (mut dvc, mut dvg) = e.rnd(nk * kvh * hd, 1.0);
            let (dk0, dv0) = (dkc.clone(), dvc.clone());
            e.c.attention_bwd_rope_dq(&mut dqc, &mut dkc, &mut dvc, &doc, &oc, &lc, &qc, &kc, &vc, &sc, 10000.0, kv_set);
            e.g.attention_bwd_rope_dq(&mut dqg, &mut dkg, &mut dvg, &dog, &og, &lg, &qg, &kg, &vg, &sg, 10000.0, kv_set);
            let op = format!("{tag} bwd rope dq{}", if kv_set { " kv set" } else { "" });
            r.check_prec(bf16, &op, "dq", &e.g.to_f32(&dqg), &dqc, None, TOL_RED);
            let (dk0, dv0): (Option<&[f32]>, Option<&[f32]>) = if kv_set { (None, None) } else { (Some(&dk0), Some(&dv0)) };
            r.check_prec(bf16, &op, "dk", &e.g.to_f32(&dkg), &dkc, dk0, TOL_RED);
            r.check_prec(bf16, &op, "dv", &e.g.to_f32(&dvg), &dvc, dv0, TOL_RED);
        }
        // A layer over its own keys: the gradients packed [dk | dv | dq] per row (bf16 in the
        // bf16-act mode, as the model's scratch), dk / dv scratch f32; starts from garbage.
        if nq == nk {
            let ld = 2 * kvh * hd + heads * hd;
            let (mut pc, mut pg) = e.rnd_as(act, nq * ld, 1.0);
            let (mut qsc, mut qsg) = e.rnd_as(act, nq * heads * hd, 1.0);
            let (mut ksc, mut ksg) = e.rnd(nk * kvh * hd, 1.0);
            let (mut vsc, mut vsg) = e.rnd(nk * kvh * hd, 1.0);
            let xc = AttnBwdInputs { dout: &doc, out: &oc, lse: &lc, q: &qc, k: &kc, v: &vc, shape: &sc };
            let xg = AttnBwdInputs { dout: &dog, out: &og, lse: &lg, q: &qg, k: &kg, v: &vg, shape: &sg };
            e.c.attention_bwd_packed(&mut pc, AttnGrads { dq: &mut qsc, dk: &mut ksc, dv: &mut vsc }, &xc, 10000.0);
            e.g.attention_bwd_packed(&mut pg, AttnGrads { dq: &mut qsg, dk: &mut ksg, dv: &mut vsg }, &xg, 10000.0);
            let (pg, pc) = (e.g.to_f32(&pg), pc);
            let cols = |v: &[f32], a: usize, b: usize| -> Vec<f32> { (0..nq).flat_map(|i| v[i * ld + a..i * ld + b].to_vec()).chain(vec![0.0; PAD]).collect() };
            let kvd = kvh * hd;
            for (name, a, b) in [("dk", 0, kvd), ("dv", kvd, 2 * kvd), ("dq", 2 * kvd, ld)] {
                r.check_prec(bf16, &format!("{tag} bwd packed"), name, &cols(&pg, a, b), &cols(&pc, a, b), None, TOL_RED);
            }
        }
    }
}

/// SwiGLU forward and backward (accumulating and overwriting) on lengths around the 16-byte vector
/// width: all scalar tail (5), one vector and a tail (11), vectors and a tail (4099).
fn swiglu_small(e: &mut Env, r: &mut Report, bf16: bool) {
    let p = if bf16 { "bf16 " } else { "" };
    // Widths off and on the 16-byte vector (f = 8 for bf16, 4 for f32), row counts with tails.
    for (rows, f) in [(5usize, 1usize), (11, 3), (7, 8), (4099, 16), (33, 200)] {
        let n = rows * f;
        let (guc, gug) = e.rnd_as(bf16, 2 * n, 4.0);
        let (mut oc, mut og) = e.rnd_as(bf16, n, 1.0);
        e.c.swiglu_fwd(&mut oc, &guc, rows, f);
        e.g.swiglu_fwd(&mut og, &gug, rows, f);
        let tag = format!("{p}swiglu_fwd rows={rows} f={f}");
        r.check_prec(bf16, &tag, "out", &e.g.to_f32(&og), &oc, None, TOL);
        let (doc, dog) = e.rnd_as(bf16, n, 1.0);
        let (mut dc, mut dg) = e.rnd_as(bf16, 2 * n, 1.0);
        let d0 = dc.clone();
        e.c.swiglu_bwd(&mut dc, &doc, &guc, rows, f);
        e.g.swiglu_bwd(&mut dg, &dog, &gug, rows, f);
        // bf16 buffers round the sum, so the error is measured against it, not the increment (at
        // n = 5 an increment small against the buffer's value failed a 1e-2 bar by chance).
        let d0: Option<&[f32]> = if bf16 { None } else { Some(&d0) };
        let tag = format!("{p}swiglu_bwd rows={rows} f={f}");
        r.check_prec(bf16, &tag, "dgate_up", &e.g.to_f32(&dg), &dc, d0, TOL);
        // Overwriting: from zero on the CPU, the tail past 2n untouched on both.
        let mut dc0 = dc.clone();
        dc0[..2 * n].fill(0.0);
        e.c.swiglu_bwd(&mut dc0, &doc, &guc, rows, f);
        e.g.swiglu_bwd_set(&mut dg, &dog, &gug, rows, f);
        let tag = format!("{p}swiglu_bwd_set rows={rows} f={f}");
        r.check_prec(bf16, &tag, "dgate_up", &e.g.to_f32(&dg), &dc0, None, TOL);
        // With the output recomputed: both bit-identical to the separate kernels' (over NaN).
        let (_, mut dg2) = e.rnd_as(bf16, 2 * n, 1.0);
        let (_, mut og2) = e.rnd_as(bf16, n, 1.0);
        e.g.fill(&mut dg2, 2 * n, f32::NAN);
        e.g.fill(&mut og2, n, f32::NAN);
        e.g.swiglu_bwd_recompute(&mut dg2, &mut og2, &dog, &gug, rows, f);
        let tag = format!("{p}swiglu_bwd_recompute rows={rows} f={f}");
        let exact = |a: &[f32], b: &[f32]| if a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()) { 0.0 } else { f64::INFINITY };
        r.add(&tag, "out (exact)", exact(&e.g.to_f32_prefix(&og2, n), &e.g.to_f32_prefix(&og, n)), TOL);
        r.add(&tag, "dgate_up (exact)", exact(&e.g.to_f32_prefix(&dg2, 2 * n), &e.g.to_f32_prefix(&dg, 2 * n)), TOL);
    }
}

// ---- bf16 activation buffers -------------------------------------------------------------------

/// The ops the bf16 mode's model runs on bf16 activation buffers (`zeros_act`), against the CPU on
/// the same bf16-rounded inputs (whole-tensor bar), plus conversions and the cached bf16 weights.
fn bf16_act_ops(e: &mut Env, r: &mut Report) {
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
    e.g.set_matmul_precision(MatmulPrecision::Bf16);
    // Host round trip, fills, copies between element types (exact: the values are bf16).
    let n = 10_001;
    let (mut c, mut g) = e.rnd_act(n, 1.0);
    r.check("bf16 write_f32/to_f32", "x", &e.g.to_f32(&g), &c, 0.0);
    e.c.fill(&mut c, n, 0.5);
    e.g.fill(&mut g, n, 0.5);
    r.check("bf16 fill(0.5)", "x", &e.g.to_f32(&g), &c, 0.0);
    e.c.fill(&mut c, n - 3, 0.0);
    e.g.fill(&mut g, n - 3, 0.0);
    r.check("bf16 fill(0)", "x", &e.g.to_f32(&g), &c, 0.0);
    let (sc, sg) = e.rnd(n, 1.0);
    e.c.copy(&mut c, &round(&sc), n - 5);
    e.g.copy(&mut g, &sg, n - 5);
    r.check("copy f32 -> bf16 (rounds)", "dst", &e.g.to_f32(&g), &c, 0.0);
    let (mut fc, mut fg) = e.rnd(n, 1.0);
    e.c.copy(&mut fc, &c, n - 7);
    e.g.copy(&mut fg, &g, n - 7);
    r.check("copy bf16 -> f32", "dst", &e.g.to_f32(&fg), &fc, 0.0);

    // SwiGLU, all bf16, a grid of many waves (gate and up side by side per row).
    let (rows, f) = (520usize, 264usize);
    let n = rows * f;
    let (guc, gug) = e.rnd_act(2 * n, 4.0);
    let (mut oc, mut og) = e.rnd_act(n, 1.0);
    e.c.swiglu_fwd(&mut oc, &guc, rows, f);
    e.g.swiglu_fwd(&mut og, &gug, rows, f);
    r.check_prec(true, "bf16 swiglu_fwd", "out", &e.g.to_f32(&og), &oc, None, TOL);
    let (doc, dog) = e.rnd_act(n, 1.0);
    let (mut dc, mut dg) = e.rnd_act(2 * n, 1.0);
    let d0 = dc.clone();
    e.c.swiglu_bwd(&mut dc, &doc, &guc, rows, f);
    e.g.swiglu_bwd(&mut dg, &dog, &gug, rows, f);
    r.check_prec(true, "bf16 swiglu_bwd", "dgate_up", &e.g.to_f32(&dg), &dc, Some(&d0), TOL);
    let mut dc0 = vec![0.0f32; 2 * n + PAD];
    dc0[2 * n..].copy_from_slice(&dc[2 * n..]);
    e.c.swiglu_bwd(&mut dc0, &doc, &guc, rows, f);
    e.g.swiglu_bwd_set(&mut dg, &dog, &gug, rows, f);
    r.check_prec(true, "bf16 swiglu_bwd_set", "dgate_up", &e.g.to_f32(&dg), &dc0, None, TOL);

    swiglu_small(e, r, true);

    // The input gradient alone (the MLP's down projection): bf16 output gradient and weight
    // operands, into a bf16 or an f32 dx, added to and overwritten.
    for dx_act in [false, true] {
        let (n, k, m) = (300usize, 264usize, 96usize);
        let (doc, dog) = e.rnd_act(n * m, 1.0);
        let (wc, wg) = e.rnd(m * k, 0.1);
        let (mut dxc, mut dxg) = e.rnd_as(dx_act, n * k, 1.0);
        let tag = format!("bf16 matmul_bwd_dx ({} dx)", if dx_act { "bf16" } else { "f32" });
        e.c.matmul_bwd_dx(&mut dxc, false, &doc, &wc, n, k, m);
        e.g.matmul_bwd_dx(&mut dxg, false, &dog, &wg, n, k, m);
        r.check_prec(true, &tag, "dx added", &e.g.to_f32(&dxg), &dxc, None, TOL);
        e.g.fill(&mut dxg, n * k, f32::NAN);
        e.c.matmul_bwd_dx(&mut dxc, true, &doc, &wc, n, k, m);
        e.g.matmul_bwd_dx(&mut dxg, true, &dog, &wg, n, k, m);
        r.check_prec(true, &tag, "dx set", &e.g.to_f32(&dxg), &dxc, None, TOL);
    }

    // RMSNorm of an f32 residual into a bf16 activation (warp-per-row kernels for d % 4 == 0, the
    // block-per-row one for 1001 and 7).
    for (n, d) in [(77usize, 1000usize), (130, 960), (61, 1001), (45, 7)] {
        let (xc, xg) = e.rnd(n * d, 2.0);
        let wv: Vec<f32> = (0..d + PAD).map(|_| e.rng.gen_range(0.5..1.5)).collect();
        let (wc, wg) = e.up(&wv);
        let (mut oc, mut og) = e.rnd_act(n * d, 1.0);
        let (mut rc, mut rg) = e.rnd(n, 1.0);
        e.c.rmsnorm_fwd(&mut oc, &mut rc, &xc, &wc, n, d, 1e-5);
        e.g.rmsnorm_fwd(&mut og, &mut rg, &xg, &wg, n, d, 1e-5);
        let tag = if d == 1000 { "bf16 rmsnorm_fwd (f32 in)".to_string() } else { format!("bf16 rmsnorm_fwd (f32 in) d{d}") };
        r.check_prec(true, &tag, "out", &e.g.to_f32(&og), &oc, None, TOL);
        r.check(&tag, "rstd", &e.g.to_f32(&rg), &rc, TOL);
    }

    // RMSNorm backward with the bf16 copy of dx (warp-per-row kernel for 960, block-per-row and a
    // conversion for 1001): dx as the plain backward's, the copy its exact rounding.
    for (n, d) in [(130usize, 960usize), (61, 1001)] {
        let tag = format!("rmsnorm_bwd_mirrored d{d}");
        let (_, xg) = e.rnd(n * d, 2.0);
        let wv: Vec<f32> = (0..d + PAD).map(|_| e.rng.gen_range(0.5..1.5)).collect();
        let (_, wg) = e.up(&wv);
        let (_, rg) = e.rnd(n, 1.0);
        let (_, dog) = e.rnd(n * d, 1.0);
        let (_, mut dx_plain) = e.rnd(n * d, 1.0);
        let mut dx = e.g.zeros(n * d + PAD);
        e.g.copy(&mut dx, &dx_plain, n * d + PAD);
        let (_, mut dw) = e.rnd(d, 1.0);
        let mut dwm = e.g.zeros(d + PAD);
        e.g.copy(&mut dwm, &dw, d + PAD);
        let (_, mut mirror) = e.rnd_act(n * d, 1.0);
        e.g.rmsnorm_bwd(&mut dx_plain, &mut dw, &dog, &xg, &wg, &rg, n, d);
        e.g.rmsnorm_bwd_mirrored(&mut dx, &mut mirror, &mut dwm, &dog, &xg, &wg, &rg, n, d);
        let dx_host = e.g.to_f32(&dx);
        r.add_exact(&tag, "dx", bit_diffs(&dx_host[..n * d], &e.g.to_f32(&dx_plain)[..n * d]));
        r.add_exact(&tag, "dw", bit_diffs(&e.g.to_f32(&dwm)[..d], &e.g.to_f32(&dw)[..d]));
        r.add_exact(&tag, "bf16 copy", bit_diffs(&e.g.to_f32(&mirror)[..n * d], &round(&dx_host[..n * d])));
    }

    // RoPE in place on bf16 q.
    let (n, heads, hd) = (512usize, 8usize, 64usize);
    let pos: Vec<u32> = (0..n).map(|_| e.rng.gen_range(0..8192)).collect();
    let (pc, pg) = e.upi(&pos);
    let (mut xc, mut xg) = e.rnd_act(n * heads * hd, 1.0);
    e.c.rope_fwd(&mut xc, &pc, n, heads, hd, 10000.0);
    e.g.rope_fwd(&mut xg, &pg, n, heads, hd, 10000.0);
    r.check_prec(true, "bf16 rope_fwd", "x", &e.g.to_f32(&xg), &xc, None, TOL);
    e.c.rope_bwd(&mut xc, &pc, n, heads, hd, 10000.0);
    e.g.rope_bwd(&mut xg, &pg, n, heads, hd, 10000.0);
    r.check_prec(true, "bf16 rope_bwd", "x", &e.g.to_f32(&xg), &xc, None, TOL);

    // GEMMs on bf16 activations: the layer's shapes of use (bf16 x and outputs, f32 and bf16
    // output gradients, f32 and bf16 dx).
    use mor_engine::MatmulGrad;
    let (n, k, ms) = (1500usize, 192usize, [256usize, 64]); // fused backward (skinny second output)
    let (xc, xg) = e.rnd_act(n * k, 1.0);
    let ws: Vec<_> = ms.iter().map(|&m| e.rnd(m * k, 0.1)).collect();
    let mut outs = vec![e.rnd_act(n * ms[0], 1.0), e.rnd_act(n * ms[1], 1.0)];
    {
        let mut items: Vec<_> = outs.iter_mut().zip(&ws).zip(ms).map(|((o, w), m)| (&mut o.1, &w.1, m)).collect();
        e.g.matmul_fwd_many(&xg, n, k, &mut items);
    }
    for (i, &m) in ms.iter().enumerate() {
        let mut oc = outs[i].0.clone();
        e.c.matmul_fwd(&mut oc, &xc, &ws[i].0, n, k, m);
        r.check_prec(true, "bf16 matmul_fwd_many (bf16 x)", &format!("out{i}"), &e.g.to_f32(&outs[i].1), &oc, None, TOL);
    }
    let douts = vec![e.rnd(n * ms[0], 1.0), e.rnd_act(n * ms[1], 1.0)];
    for dx_act in [false, true] {
        let (mut dxc, mut dxg) = e.rnd_as(dx_act, n * k, 1.0);
        dxc[..n * k].fill(0.0);
        let mut dws: Vec<_> = ms.iter().map(|&m| e.rnd(m * k, 1.0)).collect();
        let dw0: Vec<Vec<f32>> = dws.iter().map(|d| d.0.clone()).collect();
        {
            let mut items: Vec<MatmulGrad<'_, G>> =
                dws.iter_mut().zip(&douts).zip(&ws).zip(ms).map(|(((dw, dout), w), m)| MatmulGrad { dw: &mut dw.1, dout: &dout.1, w: &w.1, m }).collect();
            e.g.matmul_bwd_many(Some(&mut dxg), true, &xg, n, k, &mut items);
        }
        let tag = format!("bf16 matmul_bwd_many (bf16 x, {} dx)", if dx_act { "bf16" } else { "f32" });
        for (i, &m) in ms.iter().enumerate() {
            e.c.matmul_bwd(Some(&mut dxc), &mut dws[i].0, &douts[i].0, &xc, &ws[i].0, n, k, m);
            r.check_prec(true, &tag, &format!("dw{i}"), &e.g.to_f32(&dws[i].1), &dws[i].0, Some(&dw0[i]), TOL);
        }
        r.check_prec(true, &tag, "dx", &e.g.to_f32(&dxg), &dxc, None, TOL);
    }

    // A projection added to the residual stream in the GEMM epilogue (bf16 x, f32 residual).
    for (n, k, m) in [(300usize, 192usize, 256usize), (1500, 256, 96)] {
        let (xc, xg) = e.rnd_act(n * k, 1.0);
        let (wc, wg) = e.rnd(m * k, 0.1);
        let (rc, rg) = e.rnd(n * m, 1.0);
        let (mut oc, mut og) = e.rnd(n * m, 1.0);
        e.c.matmul_fwd_residual(&mut oc, &xc, &wc, &rc, n, k, m);
        e.g.matmul_fwd_residual(&mut og, &xg, &wg, &rg, n, k, m);
        r.check_prec(true, &format!("bf16 matmul_fwd_residual n{n} k{k} m{m}"), "out", &e.g.to_f32(&og), &oc, None, TOL);
    }

    // The cached bf16 copy of a weight follows every change of the weight: a write, an AdamW step.
    let (n, k, m) = (64usize, 128usize, 96usize);
    let (xc, xg) = e.rnd_act(n * k, 1.0);
    let (mut wc, mut wg) = e.rnd(m * k, 0.1);
    let (mut oc, mut og) = e.rnd(n * m, 1.0);
    e.g.matmul_fwd(&mut og, &xg, &wg, n, k, m);
    let fresh = e.uniform(m * k, 0.1);
    e.c.write_f32(&mut wc, &fresh);
    e.g.write_f32(&mut wg, &fresh);
    e.c.matmul_fwd(&mut oc, &xc, &wc, n, k, m);
    e.g.matmul_fwd(&mut og, &xg, &wg, n, k, m);
    r.check_prec(true, "bf16 weight copy after write_f32", "out", &e.g.to_f32(&og), &oc, None, TOL);
    let (gc, gg) = e.rnd(m * k, 1.0);
    let (mut mc, mut mg) = e.rnd(m * k, 0.0);
    let (mut vc, mut vg) = e.rnd(m * k, 0.0);
    e.c.adamw(&mut wc, &gc, &mut mc, &mut vc, m * k, 0.05, 0.9, 0.95, 1e-8, 0.1, 1);
    e.g.adamw(&mut wg, &gg, &mut mg, &mut vg, m * k, 0.05, 0.9, 0.95, 1e-8, 0.1, 1);
    e.c.matmul_fwd(&mut oc, &xc, &wc, n, k, m);
    e.g.matmul_fwd(&mut og, &xg, &wg, n, k, m);
    r.check_prec(true, "bf16 weight copy after adamw", "out", &e.g.to_f32(&og), &oc, None, TOL);

    // Attention on bf16 activations: tensor-core kernels (hd 32/64) and, for other head dims,
    // the exact kernels on widened copies.
    for case in &attention_cases(&mut e.rng) {
        attention_case(e, r, case, true, true);
    }
    e.g.set_matmul_precision(MatmulPrecision::F32);
}

// ---- determinism -----------------------------------------------------------------------------

fn determinism(e: &mut Env, r: &mut Report) {
    let g = &e.g;
    let (vocab, d, n) = (500usize, 128usize, 4096usize);
    let ids: Vec<u32> = (0..n).map(|_| e.rng.gen_range(0..20)).collect();
    let ig = g.idx_from(&ids);
    let dout = g.from_f32(&(0..n * d).map(|_| e.rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>());
    let run = || {
        let mut t = g.zeros(vocab * d);
        g.embedding_bwd(&mut t, &dout, &ig, n, d);
        g.to_f32(&t)
    };
    let (a, b) = (run(), run());
    r.add_exact("determinism embedding_bwd x2", "bits", bit_diffs(&a, &b));
    let x = g.from_f32(&(0..n * d).map(|_| e.rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>());
    let w = g.from_f32(&vec![1.0f32; d]);
    let mut rs = g.zeros(n);
    let mut o = g.zeros(n * d);
    g.rmsnorm_fwd(&mut o, &mut rs, &x, &w, n, d, 1e-5);
    let run = || {
        let mut dx = g.zeros(n * d);
        let mut dw = g.zeros(d);
        g.rmsnorm_bwd(&mut dx, &mut dw, &dout, &x, &w, &rs, n, d);
        g.to_f32(&dw)
    };
    let (a, b) = (run(), run());
    r.add_exact("determinism rmsnorm_bwd dw x2", "bits", bit_diffs(&a, &b));
    let (s1, s2) = (g.sum_squares(&x, n * d), g.sum_squares(&x, n * d));
    r.add_exact("determinism sum_squares x2", "bits", (s1.to_bits() != s2.to_bits()) as usize);
    attention_determinism(e, r);
}

/// The bf16 attention backward twice per mode: deterministic mode (two passes) gives the same bits;
/// the fused kernel gives the same dk / dv bits (one owner per row) and a dq (float atomics) equal
/// to the two-pass one up to summation order.
fn attention_determinism(e: &mut Env, r: &mut Report) {
    let (ns, len, heads, kvh, hd) = (2usize, 700usize, 15usize, 5usize, 64usize);
    let n = ns * len;
    let cu: Vec<u32> = (0..=ns as u32).map(|i| i * len as u32).collect();
    let pos: Vec<u32> = (0..ns).flat_map(|_| 0..len as u32).collect();
    let (_, cug) = e.upi(&cu);
    let (_, posg) = e.upi(&pos);
    let shape = AttnShape { cu_q: &cug, cu_k: &cug, pos_q: &posg, pos_k: &posg, num_seqs: ns, nq: n, nk: n, heads, kv_heads: kvh, head_dim: hd };
    e.g.set_matmul_precision(MatmulPrecision::Bf16);
    let (_, q) = e.rnd_as(true, n * heads * hd, 1.0);
    let (_, k) = e.rnd_as(true, n * kvh * hd, 1.0);
    let (_, v) = e.rnd_as(true, n * kvh * hd, 1.0);
    let (_, dout) = e.rnd_as(true, n * heads * hd, 1.0);
    let (_, mut out) = e.rnd_as(true, n * heads * hd, 1.0);
    let (_, mut lse) = e.rnd(n * heads, 1.0);
    let g = &e.g;
    g.attention_fwd(&mut out, &mut lse, &q, &k, &v, &shape);
    let run = |deterministic: bool| -> [Vec<f32>; 3] {
        g.set_deterministic(deterministic);
        let (mut dq, mut dk, mut dv) = (g.zeros(n * heads * hd), g.zeros(n * kvh * hd), g.zeros(n * kvh * hd));
        g.attention_bwd(&mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, &shape);
        [g.to_f32(&dq), g.to_f32(&dk), g.to_f32(&dv)]
    };
    let (d1, d2, f1, f2) = (run(true), run(true), run(false), run(false));
    g.set_deterministic(false);
    g.set_matmul_precision(MatmulPrecision::F32);
    for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
        r.add_exact("determinism attention_bwd two-pass x2", name, bit_diffs(&d1[i], &d2[i]));
    }
    r.add_exact("determinism attention_bwd fused x2", "dk", bit_diffs(&f1[1], &f2[1]));
    r.add_exact("determinism attention_bwd fused x2", "dv", bit_diffs(&f1[2], &f2[2]));
    r.add("attention_bwd fused vs two-pass", "dq", rel_l2(&f1[0], &d1[0], None, n * heads * hd), 1e-5);
}

// ---- timings ---------------------------------------------------------------------------------

fn time_ms(g: &Cuda, iters: usize, mut f: impl FnMut()) -> f64 {
    use cudarc::driver::sys::CUevent_flags;
    f(); // warm-up
    g.synchronize();
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let a = g.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        f();
        let b = g.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        ms.push(a.elapsed_ms(&b).unwrap() as f64);
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ms[ms.len() / 2]
}

/// The optimizer of a 360M model (290 tensors, 64 of them norm weights of 960): clipping and
/// AdamW per tensor against `adamw_many`, zeroing per tensor against `fill_many`, and the
/// gradient norm (`sum_squares_many`, one read).
fn bench_optimizer(g: &Cuda) {
    use mor_engine::AdamWItem;
    let (d, kv, f, layers, vocab) = (960usize, 320usize, 2560usize, 32usize, 49152usize);
    let mut sizes = vec![vocab * d, d];
    for _ in 0..layers {
        sizes.extend([d * d, kv * d, kv * d, d * d, f * d, f * d, d * f, d, d]);
    }
    let decay: Vec<f32> = sizes.iter().map(|&n| if n == d { 0.0 } else { 0.1 }).collect();
    let total: usize = sizes.iter().sum();
    let mk = || sizes.iter().map(|&n| g.zeros(n)).collect::<Vec<_>>();
    let (mut ps, mut grads, mut ms, mut vs) = (mk(), mk(), mk(), mk());
    for (gr, &n) in grads.iter_mut().zip(&sizes) {
        g.fill(gr, n, 1e-3);
    }
    let each = time_ms(g, 10, || {
        for (k, &n) in sizes.iter().enumerate() {
            g.scale(&mut grads[k], 0.999, n);
            g.adamw(&mut ps[k], &grads[k], &mut ms[k], &mut vs[k], n, 1e-3, 0.9, 0.95, 1e-8, decay[k], 3);
        }
    });
    let many = time_ms(g, 10, || {
        let mut items: Vec<AdamWItem<'_, G>> = ps
            .iter_mut()
            .zip(&grads)
            .zip(ms.iter_mut())
            .zip(vs.iter_mut())
            .enumerate()
            .map(|(k, (((param, grad), m), v))| AdamWItem { param, grad, m, v, n: sizes[k], weight_decay: decay[k] })
            .collect();
        g.adamw_many(&mut items, 1e-3, 0.9, 0.95, 1e-8, 3, 0.999);
    });
    let xs: Vec<(&<G as Backend>::Buf, usize)> = grads.iter().zip(&sizes).map(|(x, &n)| (x, n)).collect();
    let norm = time_ms(g, 10, || {
        g.sum_squares_many(&xs);
    });
    drop(xs);
    let zero_each = time_ms(g, 10, || {
        for (gr, &n) in grads.iter_mut().zip(&sizes) {
            g.fill(gr, n, 0.0);
        }
    });
    let zero_many = time_ms(g, 10, || {
        let mut bufs: Vec<(&mut <G as Backend>::Buf, usize)> = grads.iter_mut().zip(&sizes).map(|(x, &n)| (x, n)).collect();
        g.fill_many(&mut bufs, 0.0);
    });
    println!(
        "  optimizer 360M ({} tensors, {:.0}M params): scale+adamw per tensor {each:.3} ms, adamw_many {many:.3} ms ({:.0} GB/s); sum_squares_many {norm:.3} ms; zero grads: fill per tensor {zero_each:.3} ms, fill_many {zero_many:.3} ms",
        sizes.len(),
        total as f64 / 1e6,
        (7 * total * 4) as f64 / many / 1e6
    );
}

/// attention_fwd and attention_bwd at the 360M training shape (8 documents x 2048 tokens, causal,
/// 15 / 5 heads, hd 64) in the backend's current precision, random inputs; with `act`, q, k, v,
/// dout and dq are activation buffers as the model stores them (bf16 in bf16 mode), else f32.
/// Returns (forward ms, backward ms, forward FLOPs): causal FLOPs are 2 matmuls of L x L/2 x hd
/// per head forward and 2.5x that backward (the FlashAttention papers' convention, as
/// scripts/reference/sdpa_bench.py).
fn time_attention_360m(g: &Cuda, act: bool) -> (f64, f64, f64) {
    let (docs, len, heads, kvh, hd) = (8usize, 2048usize, 15usize, 5usize, 64usize);
    let n = docs * len;
    let cu: Vec<u32> = (0..=docs as u32).map(|s| s * len as u32).collect();
    let pos: Vec<u32> = (0..n as u32).map(|i| i % len as u32).collect();
    let (cu, pos) = (g.idx_from(&cu), g.idx_from(&pos));
    let shape = AttnShape { cu_q: &cu, cu_k: &cu, pos_q: &pos, pos_k: &pos, num_seqs: docs, nq: n, nk: n, heads, kv_heads: kvh, head_dim: hd };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut input = |len: usize| {
        let mut b = if act { g.zeros_act(len) } else { g.zeros(len) };
        g.write_f32(&mut b, &(0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>());
        b
    };
    let (q, k, v, dout) = (input(n * heads * hd), input(n * kvh * hd), input(n * kvh * hd), input(n * heads * hd));
    let mut dq = if act { g.zeros_act(n * heads * hd) } else { g.zeros(n * heads * hd) };
    let (mut o, mut lse) = (g.zeros(n * heads * hd), g.zeros(n * heads));
    let (mut dk, mut dv) = (g.zeros(n * kvh * hd), g.zeros(n * kvh * hd));
    let fwd = time_ms(g, 10, || g.attention_fwd(&mut o, &mut lse, &q, &k, &v, &shape));
    let bwd = time_ms(g, 10, || g.attention_bwd(&mut dq, &mut dk, &mut dv, &dout, &o, &lse, &q, &k, &v, &shape));
    let f_fwd = docs as f64 * 4.0 * (len as f64) * (len as f64) / 2.0 * hd as f64 * heads as f64;
    if act {
        // As a layer runs them: the forward with the output's bf16 copy, the backward with RoPE
        // on dq and dk / dv overwritten (a layer nobody borrows keys from) or added to.
        let mut copy = g.zeros_act(n * heads * hd);
        let mirrored = time_ms(g, 10, || g.attention_fwd_mirrored(&mut o, &mut copy, &mut lse, &q, &k, &v, &shape));
        let mut bwd_rope = |kv_set| time_ms(g, 10, || g.attention_bwd_rope_dq(&mut dq, &mut dk, &mut dv, &dout, &o, &lse, &q, &k, &v, &shape, 1e4, kv_set));
        let (set, add) = (bwd_rope(true), bwd_rope(false));
        let ld = 2 * kvh * hd + heads * hd;
        let mut packed = g.zeros_act(n * ld);
        let x = AttnBwdInputs { dout: &dout, out: &o, lse: &lse, q: &q, k: &k, v: &v, shape: &shape };
        let pk = time_ms(g, 10, || g.attention_bwd_packed(&mut packed, AttnGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv }, &x, 1e4));
        println!("  layer form: fwd_mirrored {mirrored:.3} ms (fwd {fwd:.3}); bwd_rope_dq kv set {set:.3} ms, kv add {add:.3}; bwd packed (with dk's RoPE and the packing) {pk:.3} ms");
    }
    (fwd, bwd, f_fwd)
}

fn bench(g: &Cuda) {
    println!();
    println!("timings (median of 10, CUDA events, after a warm-up)");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut rnd = |n: usize, s: f32| g.from_f32(&(0..n).map(|_| rng.gen_range(-s..s)).collect::<Vec<_>>());

    let nn = 4096usize;
    let x = rnd(nn * nn, 1.0);
    let w = rnd(nn * nn, 0.02);
    let mut out = g.zeros(nn * nn);
    let ms = time_ms(g, 10, || g.matmul_fwd(&mut out, &x, &w, nn, nn, nn));
    let flops = 2.0 * (nn as f64).powi(3);
    println!("  matmul_fwd fp32 4096^3 (cuBLAS SGEMM, no TF32): {:.3} ms, {:.1} TFLOP/s", ms, flops / ms / 1e9);
    let mut dx = g.zeros(nn * nn);
    let mut dw = g.zeros(nn * nn);
    let ms = time_ms(g, 10, || g.matmul_bwd(Some(&mut dx), &mut dw, &out, &x, &w, nn, nn, nn));
    println!("  matmul_bwd fp32 4096^3 (dx and dw):            {:.3} ms, {:.1} TFLOP/s", ms, 2.0 * flops / ms / 1e9);
    drop((x, w, out, dx, dw));

    // GEMMs at the shapes of a 360M step (16384 tokens): q/o, k/v, gate/up, down, an LM-head chunk.
    // (cuBLAS's CUBLAS_COMPUTE_32F_FAST_16BF on the fp32 operands, tried instead of our conversion
    // pass, was 10-40% slower at every shape: docs/benchmarks/gpu-phase3.md.)
    for (label, p) in [("f32", MatmulPrecision::F32), ("bf16 (conversion pass + bf16 GEMM)", MatmulPrecision::Bf16)] {
        g.set_matmul_precision(p);
        println!("  matmul {label}, fwd / bwd (dx + dw):");
        for (n, k, m) in [(16384usize, 960usize, 960usize), (16384, 960, 320), (16384, 960, 2560), (16384, 2560, 960), (2048, 960, 49152)] {
            let x = rnd(n * k, 1.0);
            let w = rnd(m * k, 0.05);
            let mut out = g.zeros(n * m);
            let mut dx = g.zeros(n * k);
            let mut dw = g.zeros(m * k);
            let f = time_ms(g, 10, || g.matmul_fwd(&mut out, &x, &w, n, k, m));
            let b = time_ms(g, 10, || g.matmul_bwd(Some(&mut dx), &mut dw, &out, &x, &w, n, k, m));
            let fl = 2.0 * (n * k * m) as f64;
            println!("    {n:>5} x {k:>4} -> {m:>5}: fwd {f:.3} ms {:.0} TFLOP/s; bwd {b:.3} ms {:.0} TFLOP/s", fl / f / 1e9, 2.0 * fl / b / 1e9);
        }
    }
    // The q/k/v projections of a 360M layer as the bf16 model runs them: bf16 input and outputs,
    // one matmul_fwd_many / matmul_bwd_many (dq bf16, dk/dv f32), against three separate GEMMs.
    {
        use mor_engine::MatmulGrad;
        g.set_matmul_precision(MatmulPrecision::Bf16);
        let (n, k, ms) = (16384usize, 960usize, [960usize, 320, 320]);
        let x = g.zeros_act(n * k);
        let ws: Vec<_> = ms.iter().map(|&m| rnd(m * k, 0.05)).collect();
        let mut outs: Vec<_> = ms.iter().map(|&m| g.zeros_act(n * m)).collect();
        let douts = [g.zeros_act(n * ms[0]), g.zeros(n * ms[1]), g.zeros(n * ms[2])];
        let mut dws: Vec<_> = ms.iter().map(|&m| g.zeros(m * k)).collect();
        let mut dx = g.zeros(n * k);
        let fl = 2.0 * (n * k * ms.iter().sum::<usize>()) as f64;
        let many = time_ms(g, 10, || {
            let mut items: Vec<_> = outs.iter_mut().zip(&ws).zip(ms).map(|((o, w), m)| (o, w, m)).collect();
            g.matmul_fwd_many(&x, n, k, &mut items);
        });
        let each = time_ms(g, 10, || {
            for ((o, w), m) in outs.iter_mut().zip(&ws).zip(ms) {
                g.matmul_fwd(o, &x, w, n, k, m);
            }
        });
        let many_b = time_ms(g, 10, || {
            let mut items: Vec<MatmulGrad<'_, G>> = dws.iter_mut().zip(&douts).zip(&ws).zip(ms).map(|(((dw, dout), w), m)| MatmulGrad { dw, dout, w, m }).collect();
            g.matmul_bwd_many(Some(&mut dx), true, &x, n, k, &mut items);
        });
        let each_b = time_ms(g, 10, || {
            for (((dw, dout), w), m) in dws.iter_mut().zip(&douts).zip(&ws).zip(ms) {
                g.matmul_bwd(Some(&mut dx), dw, dout, &x, w, n, k, m);
            }
        });
        println!("  q/k/v 16384 x 960 -> 960+320+320, bf16 activations: matmul_fwd_many {many:.3} ms ({:.0} TFLOP/s) vs 3 GEMMs {each:.3} ms; matmul_bwd_many {many_b:.3} ms ({:.0} TFLOP/s) vs 3 {each_b:.3} ms", fl / many / 1e9, 2.0 * fl / many_b / 1e9);
        // Gate and up of a 360M MLP: side by side in one [n, 2f] buffer (matmul_*_cat, as the
        // model runs them) against two separate outputs (matmul_*_many).
        let (f, total) = (2560usize, 5120usize);
        let (wg, wu) = (rnd(f * k, 0.05), rnd(f * k, 0.05));
        let mut gu = g.zeros_act(n * total);
        let (mut o1, mut o2) = (g.zeros_act(n * f), g.zeros_act(n * f));
        let (mut dwg, mut dwu) = (g.zeros(f * k), g.zeros(f * k));
        let fl = 2.0 * (n * k * total) as f64;
        let cat = time_ms(g, 10, || g.matmul_fwd_cat(&mut gu, &x, n, k, &[(&wg, f), (&wu, f)]));
        let two = time_ms(g, 10, || g.matmul_fwd_many(&x, n, k, &mut [(&mut o1, &wg, f), (&mut o2, &wu, f)]));
        let cat_b = time_ms(g, 10, || g.matmul_bwd_cat(Some(&mut dx), true, &x, &gu, n, k, &mut [(&mut dwg, &wg, f), (&mut dwu, &wu, f)]));
        let two_b = time_ms(g, 10, || {
            let items = &mut [MatmulGrad { dw: &mut dwg, dout: &o1, w: &wg, m: f }, MatmulGrad { dw: &mut dwu, dout: &o2, w: &wu, m: f }];
            g.matmul_bwd_many(Some(&mut dx), true, &x, n, k, items);
        });
        println!("  gate/up 16384 x 960 -> 2 x 2560, bf16 activations: matmul_fwd_cat {cat:.3} ms ({:.0} TFLOP/s) vs 2 GEMMs {two:.3} ms; matmul_bwd_cat {cat_b:.3} ms ({:.0} TFLOP/s) vs 2 x 2 {two_b:.3} ms", fl / cat / 1e9, 2.0 * fl / cat_b / 1e9);
    }
    g.set_matmul_precision(MatmulPrecision::F32);

    for (label, p) in [("f32 exact", MatmulPrecision::F32), ("bf16 tensor-core", MatmulPrecision::Bf16)] {
        g.set_matmul_precision(p);
        let (fwd, bwd, f_fwd) = time_attention_360m(g, false);
        println!("  attention {label}, 8x2048 causal, 15/5 heads, hd 64:");
        println!("    fwd {:.3} ms, {:.1} TFLOP/s; bwd {:.3} ms, {:.1} TFLOP/s; fwd+bwd {:.3} ms, {:.1} TFLOP/s",
            fwd, f_fwd / fwd / 1e9, bwd, 2.5 * f_fwd / bwd / 1e9, fwd + bwd, 3.5 * f_fwd / (fwd + bwd) / 1e9);
    }
    g.set_matmul_precision(MatmulPrecision::F32);

    // Memory-bound ops at training sizes: 16384 tokens x 960.
    let (n, d) = (16384usize, 960usize);
    let x = rnd(n * d, 1.0);
    let wn = rnd(d, 1.0);
    let mut y = g.zeros(n * d);
    let mut rs = g.zeros(n);
    let ms = time_ms(g, 10, || g.rmsnorm_fwd(&mut y, &mut rs, &x, &wn, n, d, 1e-5));
    println!("  rmsnorm_fwd 16384x960:                          {:.3} ms, {:.0} GB/s", ms, (2 * n * d * 4) as f64 / ms / 1e6);
    let (mut dxn, mut dwn) = (g.zeros(n * d), g.zeros(d));
    let ms = time_ms(g, 10, || g.rmsnorm_bwd(&mut dxn, &mut dwn, &y, &x, &wn, &rs, n, d));
    // Bytes that must move: dout and x read, dx read and written (all f32, as in both modes).
    println!("  rmsnorm_bwd 16384x960:                          {:.3} ms, {:.0} GB/s", ms, (4 * n * d * 4) as f64 / ms / 1e6);
    // The bf16 mode's forward: f32 residual in, bf16 activation out; and SwiGLU on the bf16
    // activations of a 360M MLP (16384 x 2560), the backward as training runs it (overwriting).
    {
        g.set_matmul_precision(MatmulPrecision::Bf16);
        let mut yb = g.zeros_act(n * d);
        let ms = time_ms(g, 10, || g.rmsnorm_fwd(&mut yb, &mut rs, &x, &wn, n, d, 1e-5));
        println!("  rmsnorm_fwd 16384x960 (bf16 out):               {:.3} ms, {:.0} GB/s", ms, (n * d * (4 + 2)) as f64 / ms / 1e6);
        // RoPE on a 360M layer's bf16 queries (15 heads) and keys (5), in place.
        let pos: Vec<u32> = (0..n as u32).map(|i| i % 2048).collect();
        let pos = g.idx_from(&pos);
        for heads in [15usize, 5] {
            let mut xb = g.zeros_act(n * heads * 64);
            let ms = time_ms(g, 10, || g.rope_fwd(&mut xb, &pos, n, heads, 64, 1e4));
            println!("  rope_fwd 16384 x {heads:>2} heads x 64 bf16:          {:.3} ms, {:.0} GB/s", ms, (n * heads * 64 * 4) as f64 / ms / 1e6);
        }
        let (mut qb, mut kb) = (g.zeros_act(n * 15 * 64), g.zeros_act(n * 5 * 64));
        let ms = time_ms(g, 10, || g.rope_fwd_qk(&mut qb, &mut kb, &pos, n, 15, 5, 64, 1e4));
        println!("  rope_fwd_qk 16384 x 15 + 5 heads x 64 bf16:     {:.3} ms, {:.0} GB/s", ms, (n * 20 * 64 * 4) as f64 / ms / 1e6);
        let (rows, f) = (n, 2560usize);
        let nf = rows * f;
        let mut act = |len: usize, s: f32| {
            let (src, mut b) = (rnd(len, s), g.zeros_act(len));
            g.copy(&mut b, &src, len);
            b
        };
        let (gate_up, dact) = (act(2 * nf, 4.0), act(nf, 1.0));
        let (mut out, mut dgate_up) = (g.zeros_act(nf), g.zeros_act(2 * nf));
        let ms = time_ms(g, 10, || g.swiglu_fwd(&mut out, &gate_up, rows, f));
        println!("  swiglu_fwd 16384x2560 bf16:                     {:.3} ms, {:.0} GB/s", ms, (3 * nf * 2) as f64 / ms / 1e6);
        let ms = time_ms(g, 10, || g.swiglu_bwd_set(&mut dgate_up, &dact, &gate_up, rows, f));
        println!("  swiglu_bwd_set 16384x2560 bf16:                 {:.3} ms, {:.0} GB/s", ms, (5 * nf * 2) as f64 / ms / 1e6);
        let ms = time_ms(g, 10, || g.swiglu_bwd(&mut dgate_up, &dact, &gate_up, rows, f));
        println!("  swiglu_bwd 16384x2560 bf16 (accumulating):      {:.3} ms, {:.0} GB/s", ms, (7 * nf * 2) as f64 / ms / 1e6);
        g.set_matmul_precision(MatmulPrecision::F32);
    }
    let (vn, vocab) = (4096usize, 49152usize);
    let logits = rnd(vn * vocab, 3.0);
    let t: Vec<u32> = (0..vn as u32).map(|i| (i * 31) % vocab as u32).collect();
    let t = g.idx_from(&t);
    let mut loss = g.zeros(vn);
    let ms = time_ms(g, 10, || g.cross_entropy_fwd(&mut loss, &logits, &t, vn, vocab));
    println!("  cross_entropy_fwd 4096x49152:                   {:.3} ms, {:.0} GB/s", ms, (vn * vocab * 4) as f64 / ms / 1e6);
    let mut dl = g.zeros(vn * vocab);
    let ms = time_ms(g, 10, || g.cross_entropy_bwd(&mut dl, &logits, &t, 1.0, vn, vocab));
    println!("  cross_entropy_bwd 4096x49152:                   {:.3} ms, {:.0} GB/s", ms, (3 * vn * vocab * 4) as f64 / ms / 1e6);
    // Fused forward + backward as training runs it (replacing fwd, fill 0 and bwd): logits read
    // twice, dlogits written once (f32, or bf16 in the bf16 mode).
    let ms = time_ms(g, 10, || g.cross_entropy_fwd_bwd(&mut loss, &mut dl, &logits, &t, 1.0, vn, vocab));
    println!("  cross_entropy_fwd_bwd 4096x49152 (f32 dlogits): {:.3} ms, {:.0} GB/s", ms, (3 * vn * vocab * 4) as f64 / ms / 1e6);
    let ms = time_ms(g, 10, || {
        g.cross_entropy_fwd(&mut loss, &logits, &t, vn, vocab);
        g.fill(&mut dl, vn * vocab, 0.0);
        g.cross_entropy_bwd(&mut dl, &logits, &t, 1.0, vn, vocab);
    });
    println!("  cross_entropy fwd+fill+bwd 4096x49152 (before): {:.3} ms", ms);
    drop(dl);
    {
        g.set_matmul_precision(MatmulPrecision::Bf16);
        let mut dlb = g.zeros_act(vn * vocab);
        let ms = time_ms(g, 10, || g.cross_entropy_fwd_bwd(&mut loss, &mut dlb, &logits, &t, 1.0, vn, vocab));
        println!("  cross_entropy_fwd_bwd 4096x49152 (bf16 dlogits): {:.3} ms, {:.0} GB/s", ms, (vn * vocab * (2 * 4 + 2)) as f64 / ms / 1e6);
        // As the bf16 mode runs it: bf16 logits from the head GEMM.
        let mut lb = g.zeros_act(vn * vocab);
        g.copy(&mut lb, &logits, vn * vocab);
        let ms = time_ms(g, 10, || g.cross_entropy_fwd_bwd(&mut loss, &mut dlb, &lb, &t, 1.0, vn, vocab));
        println!("  cross_entropy_fwd_bwd 4096x49152 (bf16 logits and dlogits): {:.3} ms, {:.0} GB/s", ms, (vn * vocab * (2 * 2 + 2)) as f64 / ms / 1e6);
        g.set_matmul_precision(MatmulPrecision::F32);
    }
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % vocab as u32).collect();
    let ids = g.idx_from(&ids);
    let mut table = g.zeros(vocab * d);
    let ms = time_ms(g, 10, || g.embedding_bwd(&mut table, &x, &ids, n, d));
    println!("  embedding_bwd 16384 ids x 960, V 49152:         {:.3} ms", ms);
    let np = 360_000_000usize / 4;
    let mut pm = rnd(np, 1.0);
    let gr = rnd(np, 1.0);
    let mut m1 = g.zeros(np);
    let mut v1 = g.zeros(np);
    let ms = time_ms(g, 10, || g.adamw(&mut pm, &gr, &mut m1, &mut v1, np, 1e-3, 0.9, 0.95, 1e-8, 0.1, 3));
    println!("  adamw 90M params:                               {:.3} ms, {:.0} GB/s", ms, (7 * np * 4) as f64 / ms / 1e6);
    drop((pm, gr, m1, v1));
    bench_optimizer(g);
    let scores = rnd(n, 1.0);
    let cu: Vec<u32> = (0..=8u32).map(|s| s * 2048).collect();
    let cu = g.idx_from(&cu);
    let mut sel = g.idx_from(&vec![0u32; 8 * 1024]);
    let ms = time_ms(g, 10, || g.topk_segments(&mut sel, &scores, &cu, 8, 1024));
    println!("  topk_segments 8x2048 k1024:                     {:.3} ms", ms);
}

// ---- flash-attention configurations ------------------------------------------------------------

/// The TMA kernels' cycles per phase (kernels compiled with `MOR_NVRTC_DEFINES=FA_TRACE`; slots as
/// `fa_trace` in kernels/flash_attention.cu), per streamed tile and per block of the timed calls.
fn print_flash_trace(t: &[u64; 32]) {
    type Phases = &'static [(&'static str, usize)];
    // (kernel, streamed unit, its count's slot, the blocks' slot, phases per unit, phases per block)
    let kernels: [(&str, &str, usize, usize, Phases, Phases); 2] = [
        (
            "fwd",
            "key tile",
            7,
            8,
            &[("full wait", 1), ("S", 2), ("softmax", 3), ("P·V", 4)],
            &[("Q wait", 0), ("epilogue", 5), ("total", 6), ("producer empty waits", 9), ("producer total", 10)],
        ),
        (
            "bwd",
            "stream position",
            21,
            22,
            &[("full wait", 16), ("Sᵀ/dPᵀ", 17), ("P/dS", 18), ("dV/dK/dQ", 19), ("dQ staging", 20)],
            &[("total", 25), ("producer empty waits", 23), ("producer to the wait", 26), ("producer fill", 27), ("producer total", 24)],
        ),
    ];
    for (kernel, unit, units, blocks, per_unit, per_block) in kernels {
        let (n, nb) = (t[units], t[blocks]);
        if n == 0 || nb == 0 {
            continue;
        }
        let cycles = |phases: Phases, per: u64| {
            phases.iter().map(|&(name, slot)| format!("{name} {:.0}", t[slot] as f64 / per as f64)).collect::<Vec<_>>().join(", ")
        };
        println!(
            "  trace {kernel}: {nb} blocks, {:.1} {unit}s/block | cycles per {unit}: {} | per block: {}",
            n as f64 / nb as f64,
            cycles(per_unit, n),
            cycles(per_block, nb)
        );
    }
}

/// `--flash-sweep [fwd,dq,dkdv;...]`: for each block configuration (`MOR_FLASH_WARPS` syntax,
/// e.g. `8,4,4;8g,4g,4g`), a fresh backend runs the tensor-core attention checks (f32 and bf16
/// activation buffers) and times the 360M shape (8 x 2048 causal, 15/5 heads, hd 64) on bf16
/// activations as the model stores them. One line per configuration; exit 1 if any check failed.
fn flash_sweep(configs: &str) {
    let mut failed_any = false;
    for cfg in configs.split(';').filter(|c| !c.trim().is_empty()) {
        std::env::set_var("MOR_FLASH_WARPS", cfg.trim());
        let g = open_gpu();
        g.set_matmul_precision(MatmulPrecision::Bf16);
        let mut env = Env { c: Cpu::<f32>::new(), g, rng: ChaCha8Rng::seed_from_u64(0x5eed) };
        let mut rep = Report { rows: Vec::new() };
        let cases = attention_cases(&mut env.rng);
        for act in [false, true] {
            for case in cases.iter().filter(|c| matches!(c.hd, 32 | 64)) {
                attention_case(&mut env, &mut rep, case, true, act);
            }
        }
        let failed: Vec<_> = rep.rows.iter().filter(|r| !r.4).collect();
        let worst = rep.rows.iter().map(|r| r.2).fold(0.0f64, f64::max);
        env.g.take_flash_trace();
        let (fwd, bwd, f_fwd) = time_attention_360m(&env.g, true);
        print_flash_trace(&env.g.take_flash_trace());
        println!(
            "flash {cfg:<14} checks {}/{} (worst {worst:.1e}) | fwd {fwd:.3} ms {:.1} TFLOP/s | bwd {bwd:.3} ms {:.1} | fwd+bwd {:.3} ms {:.1} TFLOP/s",
            rep.rows.len() - failed.len(),
            rep.rows.len(),
            f_fwd / fwd / 1e9,
            2.5 * f_fwd / bwd / 1e9,
            fwd + bwd,
            3.5 * f_fwd / (fwd + bwd) / 1e9
        );
        for f in &failed {
            println!("  FAILED: {} / {} (err {:.3e}, tol {:.1e})", f.0, f.1, f.2, f.3);
        }
        failed_any |= !failed.is_empty();
    }
    if failed_any {
        std::process::exit(1);
    }
}

/// `--wg-probe`: the wgmma building blocks on one tile against the CPU (see `Cuda::wgmma_probe`).
/// A failing single k-step is matched against every choice of source column groups (8 wide) of a
/// and b, to show which data the tensor cores read instead.
fn wg_probe() {
    let g = open_gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    let mut failed = false;
    for hd in [32usize, 64] {
        let a: Vec<f32> = (0..64 * hd).map(|_| bf(rng.gen_range(-1.0f32..1.0))).collect();
        let b: Vec<f32> = (0..64 * hd).map(|_| bf(rng.gen_range(-1.0f32..1.0))).collect();
        // Product of a's column groups (ca0, ca1) with b's (cb0, cb1): [64][64].
        let part = |ca: [usize; 2], cb: [usize; 2]| -> Vec<f32> {
            let mut o = vec![0.0f32; 64 * 64];
            for i in 0..64 {
                for j in 0..64 {
                    let mut s = 0.0f32;
                    for h in 0..2 {
                        for e in 0..8 {
                            s += a[i * hd + ca[h] * 8 + e] * b[j * hd + cb[h] * 8 + e];
                        }
                    }
                    o[i * 64 + j] = s;
                }
            }
            o
        };
        let err = |x: &[f32], y: &[f32]| rel_l2(x, y, None, y.len());
        let full: Vec<f32> = {
            let mut o = vec![0.0f32; 64 * 64];
            for kk in 0..hd / 16 {
                for (x, y) in o.iter_mut().zip(part([2 * kk, 2 * kk + 1], [2 * kk, 2 * kk + 1])) {
                    *x += y;
                }
            }
            o
        };
        for (mode, shift) in (0..hd / 16 + 2).map(|m| (m, 0)).chain([16, 528, 2 * (hd + 8) * 64, 4 * (hd + 8) * 64, 4 * (hd + 8) * 64 + 528].into_iter().map(|s| (hd / 16 + 1, s as i32))) {
            let out = g.wgmma_probe(hd, mode as i32, shift, &a, &b);
            let (what, e) = if mode < hd / 16 {
                let r = part([2 * mode, 2 * mode + 1], [2 * mode, 2 * mode + 1]);
                (format!("k-step {mode}"), err(&out, &r))
            } else if mode == hd / 16 {
                ("a·bᵀ".to_string(), err(&out, &full))
            } else {
                let mut r = vec![0.0f32; 64 * hd];
                for i in 0..64 {
                    for j in 0..64 {
                        let p = bf(full[i * 64 + j]);
                        for d in 0..hd {
                            r[i * hd + d] += p * b[j * hd + d];
                        }
                    }
                }
                ("bf16(a·bᵀ)·b".to_string(), err(&out[..64 * hd], &r))
            };
            println!("wg-probe hd{hd} {what:<14} shift {shift:>4} rel err {e:.2e} {}", if e < 1e-2 { "PASS" } else { "FAIL" });
            if e >= 1e-2 {
                failed = true;
                if mode < hd / 16 {
                    let groups = hd / 8;
                    let mut best = (f64::INFINITY, [0; 4]);
                    for c in 0..groups.pow(4) {
                        let s = [c % groups, c / groups % groups, c / groups.pow(2) % groups, c / groups.pow(3)];
                        let e = err(&out, &part([s[0], s[1]], [s[2], s[3]]));
                        if e < best.0 {
                            best = (e, s);
                        }
                    }
                    let s = best.1;
                    println!("  best match: a groups ({}, {}) x b groups ({}, {}): rel err {:.2e}", s[0], s[1], s[2], s[3], best.0);
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}

/// `--tma-probe`: a · bᵀ of one 64 x 64 tile pair loaded by TMA (128-byte swizzle) and multiplied
/// with both wgmma operands in shared memory (see `Cuda::tma_probe`), at row offsets that are not
/// multiples of the tile (a packed sequence's tiles start anywhere) and past the end (zero rows).
fn tma_probe() {
    let g = open_gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    let (rows_a, rows_b) = (200usize, 150usize);
    let a: Vec<f32> = (0..rows_a * 64).map(|_| bf(rng.gen_range(-1.0f32..1.0))).collect();
    let b: Vec<f32> = (0..rows_b * 64).map(|_| bf(rng.gen_range(-1.0f32..1.0))).collect();
    let row = |m: &[f32], rows: usize, r: usize| -> Vec<f32> { if r < rows { m[r * 64..(r + 1) * 64].to_vec() } else { vec![0.0; 64] } };
    let mut failed = false;
    for (a0, b0) in [(0usize, 0usize), (64, 0), (37, 101), (199, 149), (136, 120)] {
        let mut s = vec![0.0f32; 64 * 64];
        for i in 0..64 {
            let ai = row(&a, rows_a, a0 + i);
            for j in 0..64 {
                let bj = row(&b, rows_b, b0 + j);
                s[i * 64 + j] = ai.iter().zip(&bj).map(|(x, y)| x * y).sum();
            }
        }
        let e = rel_l2(&g.tma_probe(&a, &b, a0, b0, 0, 16, 1024), &s, None, s.len());
        let ok = e < 1e-5;
        failed |= !ok;
        println!("tma-probe a·bᵀ      a rows {a0}.. b rows {b0}.. rel err {e:.2e} {}", if ok { "PASS" } else { "FAIL" });
        // P·V: bf16(s) times the b tile read as an MN-major operand. Its descriptor's SBO is the
        // stride between 8-row groups along the reduction (1024 bytes); LBO, the stride between
        // 64-column atoms, is unused at 64 columns. (Tried on the H200: SBO 16 reads the wrong
        // rows, 8192 past the tile.)
        let mut pv = vec![0.0f32; 64 * 64];
        for i in 0..64 {
            for j in 0..64 {
                let p = bf(s[i * 64 + j]);
                for (d, v) in row(&b, rows_b, b0 + j).iter().enumerate() {
                    pv[i * 64 + d] += p * v;
                }
            }
        }
        let e = rel_l2(&g.tma_probe(&a, &b, a0, b0, 1, 16, 1024), &pv, None, pv.len());
        let ok = e < 1e-2;
        failed |= !ok;
        println!("tma-probe bf16(s)·b a rows {a0}.. b rows {b0}.. rel err {e:.2e} {}", if ok { "PASS" } else { "FAIL" });
    }
    if failed {
        std::process::exit(1);
    }
}

/// `--wg-debug`: the forward with every key visible and v = identity on one key tile (zero on the
/// others), so the output is that tile's probabilities P; S = ln P + lse is compared with q·kᵀ·scale
/// (per head), for several key-tile counts and head layouts. Prints the error per case and, where
/// it fails, the largest error per 8 x 8 block (query groups x key groups).
fn wg_debug() {
    let cfg = std::env::var("MOR_FLASH_WARPS").unwrap_or_default();
    let g = open_gpu();
    g.set_matmul_precision(MatmulPrecision::Bf16);
    let hd = 64usize;
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    // (key tiles, identity tile, heads, kv heads, queries)
    for (tiles, id_tile, heads, kvh, nq) in [(1usize, 0usize, 1usize, 1usize, 64usize), (2, 0, 1, 1, 64), (2, 1, 1, 1, 64), (3, 2, 1, 1, 64), (1, 0, 2, 1, 64), (1, 0, 4, 2, 64), (1, 0, 1, 1, 128), (2, 1, 1, 1, 128)] {
        let nk = 64 * tiles;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let q: Vec<f32> = (0..nq * heads * hd).map(|_| bf(rng.gen_range(-2.0f32..2.0))).collect();
        let k: Vec<f32> = (0..nk * kvh * hd).map(|_| bf(rng.gen_range(-2.0f32..2.0))).collect();
        let v: Vec<f32> = (0..nk * kvh * hd).map(|i| {
            let (j, d) = (i / (kvh * hd), i % hd);
            if j / 64 == id_tile && j % 64 == d { 1.0 } else { 0.0 }
        }).collect();
        let cu = g.idx_from(&[0u32, nq as u32]);
        let cuk = g.idx_from(&[0u32, nk as u32]);
        let pq = g.idx_from(&vec![100_000u32; nq]);
        let pk = g.idx_from(&(0..nk as u32).collect::<Vec<_>>());
        let shape = AttnShape { cu_q: &cu, cu_k: &cuk, pos_q: &pq, pos_k: &pk, num_seqs: 1, nq, nk, heads, kv_heads: kvh, head_dim: hd };
        let (qg, kg, vg) = (g.from_f32(&q), g.from_f32(&k), g.from_f32(&v));
        let (mut o, mut lse) = (g.zeros(nq * heads * hd), g.zeros(nq * heads));
        g.attention_fwd(&mut o, &mut lse, &qg, &kg, &vg, &shape);
        let (o, lse) = (g.to_f32(&o), g.to_f32(&lse));
        let scale = 1.0 / (hd as f32).sqrt();
        for h in 0..heads {
            let kh = h / (heads / kvh);
            let s_gpu: Vec<f32> = (0..nq * 64).map(|x| (o[(x / 64 * heads + h) * hd + x % 64].max(1e-30).ln() + lse[x / 64 * heads + h]) / scale).collect();
            let s_ref: Vec<f32> = (0..nq * 64)
                .map(|x| {
                    let (i, j) = (x / 64, id_tile * 64 + x % 64);
                    (0..hd).map(|d| q[(i * heads + h) * hd + d] * k[(j * kvh + kh) * hd + d]).sum()
                })
                .collect();
            let e = rel_l2(&s_gpu, &s_ref, None, s_ref.len());
            println!("wg-debug {cfg}: {tiles} key tiles (identity in {id_tile}), {nq} queries, head {h} of {heads}/{kvh}: S rel err {e:.2e}");
            if e > 1e-2 {
                for rb in 0..nq / 8 {
                    let row: Vec<String> = (0..8)
                        .map(|cb| {
                            let m = (0..64).map(|x| (rb * 8 + x / 8) * 64 + cb * 8 + x % 8).map(|i| (s_gpu[i] - s_ref[i]).abs()).fold(0.0f32, f32::max);
                            format!("{m:7.2}")
                        })
                        .collect();
                    println!("   {}", row.join(" "));
                }
            }
        }
    }
}

/// `--gemm-algos`: for the GEMMs of a 360M training step (forward, input gradient and weight
/// gradient of each kind of linear layer, as the backend lays them out), the time of each of
/// cuBLASLt's first 8 heuristic algorithms on scratch operands, and the algorithm the backend's
/// tuner picks for the shape (the heuristic's first with `MOR_GEMM_SELECT=heuristic`; with
/// `MOR_GEMM_ALGOS=file` the stored one when the file has the shape).
fn gemm_algos() {
    use mor_engine::cuda::{Dtype, GemmAdd, GemmShape};
    let g = open_gpu();
    println!(
        "cuBLASLt algorithms of the 360M training GEMMs on {}: bf16 operands, fp32 accumulation; column-major m x n x k, #i = the heuristic's i-th; selection {:?}",
        g.device_name(),
        g.options().gemm_select
    );
    let (bf, f32) = (Dtype::Bf16, Dtype::F32);
    // Forward outᵀ[out, rows] = W-as-[in, out]ᵀ · xᵀ (TN), input gradient dxᵀ[in, rows] =
    // W-as-[in, out] · doutᵀ (NN), weight gradient dWᵀ[in, out] += xᵀ · dout (NT, f32).
    let fwd = |out, inp, rows, ot, add| GemmShape::new(true, false, out, rows, inp, ot, add);
    let dx = |out, inp, rows| GemmShape::new(false, false, inp, rows, out, bf, GemmAdd::Zero);
    let dw = |out, inp, rows| GemmShape::new(false, true, inp, out, rows, f32, GemmAdd::Accumulate);
    let n = 16384usize;
    let shapes = [
        ("q fwd", fwd(960usize, 960usize, n, bf, GemmAdd::Zero)),
        ("o fwd + residual", fwd(960, 960, n, f32, GemmAdd::Residual)),
        ("q/o dx", dx(960, 960, n)),
        ("q/o dW", dw(960, 960, n)),
        ("k/v fwd", fwd(320, 960, n, bf, GemmAdd::Zero)),
        ("k/v dx", dx(320, 960, n)),
        ("k/v dW", dw(320, 960, n)),
        ("gate/up fwd", fwd(2560, 960, n, bf, GemmAdd::Zero)),
        ("gate/up dx", dx(2560, 960, n)),
        ("gate/up dW", dw(2560, 960, n)),
        ("down fwd + residual", fwd(960, 2560, n, f32, GemmAdd::Residual)),
        ("down dx", dx(960, 2560, n)),
        ("down dW", dw(960, 2560, n)),
        ("LM head fwd (4096 rows)", fwd(49152, 960, 4096, f32, GemmAdd::Zero)),
        ("LM head dx", dx(49152, 960, 4096)),
        ("LM head dW", dw(49152, 960, 4096)),
    ];
    let (mut sum_first, mut sum_best, mut sum_picked) = (0.0, 0.0, 0.0);
    for (label, shape) in shapes {
        let t = g.gemm_algo_times(shape, 8, 10);
        if t.is_empty() {
            println!("  {label:<24} {shape}: no memory for the timing scratch");
            continue;
        }
        let (best_i, best) = t.iter().enumerate().fold((0, f64::INFINITY), |b, (i, &x)| if x < b.1 { (i, x) } else { b });
        let choice = g.gemm_algo_choice(shape);
        let picked = choice.rank.and_then(|r| t.get(r).copied());
        let tf = |ms: f64| shape.flops() / ms / 1e9;
        let all: Vec<String> = t.iter().map(|x| format!("{x:.3}")).collect();
        println!("  {label:<24} {shape}");
        println!(
            "  {:<24} heuristic's first {:.3} ms ({:.0} TFLOP/s), best #{best_i} {best:.3} ms ({:.0} TFLOP/s); all [{}]",
            "",
            t[0],
            tf(t[0]),
            tf(best),
            all.join(", ")
        );
        println!(
            "  {:<24} picked: {} ({:?}, {}){}",
            "",
            choice.rank.map_or("not in the list".to_string(), |r| format!("#{r}")),
            choice.source,
            choice.config,
            picked.map_or(String::new(), |p| format!(", {p:.3} ms here ({:+.1}% vs the heuristic's first)", 100.0 * (p / t[0] - 1.0)))
        );
        sum_first += t[0];
        sum_best += best;
        sum_picked += picked.unwrap_or(t[0]);
    }
    println!(
        "sum over the shapes: heuristic's first {sum_first:.3} ms, best {sum_best:.3} ms, picked {sum_picked:.3} ms ({:+.1}% vs the heuristic's first)",
        100.0 * (sum_picked / sum_first - 1.0)
    );
    if let Some(path) = g.gemm_algos_file() {
        println!("algorithm table: {}", path.display());
    }
}
