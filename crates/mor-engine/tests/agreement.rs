//! Backend agreement and reproducibility: every op run on `Cpu<f32>` and `Cpu<f64>` from the same
//! f32 inputs must agree to ~1e-5 relative, and running the same ops again — also on rayon pools
//! of other sizes — must give bit-identical results. `perf_report` (ignored) prints timings.

mod common;

use common::*;
use mor_engine::{Backend, Cpu, GateFn};
use rand::Rng;

struct Sizes {
    /// matmul n, k, m
    mm: (usize, usize, usize),
    /// rows and width of row ops
    rows: usize,
    d: usize,
    /// elementwise length
    ew: usize,
    vocab: usize,
    /// tokens per segment of the extra causal attention case
    attn_len: u32,
}

const SMALL: Sizes = Sizes { mm: (37, 64, 29), rows: 70, d: 48, ew: 1000, vocab: 300, attn_len: 24 };
const BIG: Sizes = Sizes { mm: (300, 256, 200), rows: 300, d: 96, ew: 40_000, vocab: 2000, attn_len: 96 };

type Out = Vec<(String, Vec<f32>)>;

fn push<B: Backend>(b: &B, outs: &mut Out, name: &str, buf: &B::Buf) {
    outs.push((name.to_string(), b.to_f32(buf)));
}

/// Run every op (forward and backward) from inputs drawn with a fixed seed; return all outputs.
fn scenario<B: Backend>(b: &B, sz: &Sizes) -> Out {
    let mut r = rng(1234);
    let mut outs = Out::new();
    let up = |r: &mut rand_chacha::ChaCha8Rng, n: usize, s: f32| b.from_f32(&uniform(r, n, s));

    // matmul
    let (n, k, m) = sz.mm;
    let (x, w, dout) = (up(&mut r, n * k, 1.0), up(&mut r, m * k, 1.0), up(&mut r, n * m, 1.0));
    let mut out = b.zeros(n * m);
    b.matmul_fwd(&mut out, &x, &w, n, k, m);
    push(b, &mut outs, "matmul_fwd", &out);
    let (mut dx, mut dw) = (up(&mut r, n * k, 1.0), up(&mut r, m * k, 1.0));
    b.matmul_bwd(Some(&mut dx), &mut dw, &dout, &x, &w, n, k, m);
    push(b, &mut outs, "matmul_bwd dx", &dx);
    push(b, &mut outs, "matmul_bwd dw", &dw);

    // rmsnorm
    let (n, d) = (sz.rows, sz.d);
    let (x, w, dout) = (up(&mut r, n * d, 2.0), up(&mut r, d, 1.5), up(&mut r, n * d, 1.0));
    let (mut out, mut rstd) = (b.zeros(n * d), b.zeros(n));
    b.rmsnorm_fwd(&mut out, &mut rstd, &x, &w, n, d, 1e-5);
    push(b, &mut outs, "rmsnorm_fwd", &out);
    push(b, &mut outs, "rmsnorm_fwd rstd", &rstd);
    let (mut dx, mut dw) = (up(&mut r, n * d, 1.0), up(&mut r, d, 1.0));
    b.rmsnorm_bwd(&mut dx, &mut dw, &dout, &x, &w, &rstd, n, d);
    push(b, &mut outs, "rmsnorm_bwd dx", &dx);
    push(b, &mut outs, "rmsnorm_bwd dw", &dw);

    // rope (d = heads * head_dim)
    let (heads, hd) = (d / 16, 16);
    let pos: Vec<u32> = (0..n as u32).map(|i| i * 37 % 2048).collect();
    let pos = b.idx_from(&pos);
    let mut y = up(&mut r, n * d, 1.0);
    b.rope_fwd(&mut y, &pos, n, heads, hd, 10000.0);
    push(b, &mut outs, "rope_fwd", &y);
    b.rope_bwd(&mut y, &pos, n, heads, hd, 10000.0);
    push(b, &mut outs, "rope_bwd", &y);

    // attention
    let mut cases = attn_cases();
    let l = sz.attn_len;
    let all = |n: u32| (0..n).collect::<Vec<u32>>();
    let sub: Vec<u32> = (0..l).filter(|p| p % 3 != 1).collect();
    cases.push(AttnCase::new("big", &[(all(l), all(l)), (sub, all(l)), (all(l / 2), all(l / 2))], 4, 2, 32));
    for c in &cases {
        let (q, k, v) = (up(&mut r, c.q_len(), 1.5), up(&mut r, c.k_len(), 1.5), up(&mut r, c.k_len(), 1.0));
        let idx = c.idx(b);
        let shape = c.shape(&idx);
        let (mut out, mut lse) = (b.zeros(c.q_len()), b.zeros(c.nq() * c.heads));
        b.attention_fwd(&mut out, &mut lse, &q, &k, &v, &shape);
        push(b, &mut outs, &format!("attention_fwd {}", c.name), &out);
        push(b, &mut outs, &format!("attention_fwd lse {}", c.name), &lse);
        let dout = up(&mut r, c.q_len(), 1.0);
        let (mut dq, mut dk, mut dv) =
            (up(&mut r, c.q_len(), 1.0), up(&mut r, c.k_len(), 1.0), up(&mut r, c.k_len(), 1.0));
        b.attention_bwd(&mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, &shape);
        push(b, &mut outs, &format!("attention_bwd dq {}", c.name), &dq);
        push(b, &mut outs, &format!("attention_bwd dk {}", c.name), &dk);
        push(b, &mut outs, &format!("attention_bwd dv {}", c.name), &dv);
    }

    // elementwise
    let e = sz.ew;
    let (g, dout) = (up(&mut r, e, 5.0), up(&mut r, e, 1.0));
    let mut out = b.zeros(e);
    // g as gate_up: rows of gate and up, 8 each.
    let (rows, f) = (e / 16, 8);
    b.swiglu_fwd(&mut out, &g, rows, f);
    push(b, &mut outs, "swiglu_fwd", &out);
    let mut dg = up(&mut r, e, 1.0);
    b.swiglu_bwd(&mut dg, &dout, &g, rows, f);
    push(b, &mut outs, "swiglu_bwd dgate_up", &dg);
    b.gelu_fwd(&mut out, &g, e);
    push(b, &mut outs, "gelu_fwd", &out);
    b.gelu_bwd(&mut dg, &dout, &g, e);
    push(b, &mut outs, "gelu_bwd", &dg);
    for f in [GateFn::Sigmoid, GateFn::Tanh, GateFn::Identity] {
        b.gate_fwd(&mut out, &g, f, 0.5, e);
        push(b, &mut outs, &format!("gate_fwd {f:?}"), &out);
        b.gate_bwd(&mut dg, &dout, &g, f, 0.5, e);
        push(b, &mut outs, &format!("gate_bwd {f:?}"), &dg);
    }
    let t: Vec<f32> = (0..e).map(|i| [0.0, 1.0, 0.25][i % 3]).collect();
    let t = b.from_f32(&t);
    b.bce_logits_fwd(&mut out, &g, &t, e);
    push(b, &mut outs, "bce_fwd", &out);
    b.bce_logits_bwd(&mut dg, &g, &t, 0.3, e);
    push(b, &mut outs, "bce_bwd", &dg);
    b.axpy(&mut dg, &g, -0.7, e);
    b.scale(&mut dg, 1.3, e);
    push(b, &mut outs, "axpy+scale", &dg);
    let ss = b.sum_squares(&g, e);
    // Relative agreement at f32 level, plus the f64 bits for the determinism test.
    outs.push(("sum_squares".into(), vec![ss as f32]));
    let bits = ss.to_bits();
    outs.push(("sum_squares bits".into(), (0..4).map(|i| ((bits >> (16 * i)) & 0xffff) as f32).collect()));

    // softmax and cross-entropy
    let (n, c) = (sz.rows / 2, sz.vocab);
    let logits = up(&mut r, n * c, 6.0);
    let mut sm = b.zeros(n * c);
    b.softmax_fwd(&mut sm, &logits, n, c);
    push(b, &mut outs, "softmax_fwd", &sm);
    let (dout, mut dl) = (up(&mut r, n * c, 1.0), up(&mut r, n * c, 1.0));
    b.softmax_bwd(&mut dl, &dout, &sm, n, c);
    push(b, &mut outs, "softmax_bwd", &dl);
    let targets: Vec<u32> = (0..n).map(|i| if i % 5 == 3 { u32::MAX } else { r.gen_range(0..c as u32) }).collect();
    let targets = b.idx_from(&targets);
    let mut loss = b.zeros(n);
    b.cross_entropy_fwd(&mut loss, &logits, &targets, n, c);
    push(b, &mut outs, "cross_entropy_fwd", &loss);
    b.cross_entropy_bwd(&mut dl, &logits, &targets, 0.01, n, c);
    push(b, &mut outs, "cross_entropy_bwd", &dl);

    // token subsets
    let (rows, d) = (sz.rows, sz.d);
    let m = rows / 3;
    let mut perm: Vec<u32> = (0..rows as u32).collect();
    for i in (1..rows).rev() {
        perm.swap(i, r.gen_range(0..=i));
    }
    let uniq = b.idx_from(&perm[..m]);
    let dup: Vec<u32> = (0..m).map(|_| r.gen_range(0..rows as u32)).collect();
    let dup = b.idx_from(&dup);
    let (h, y, sc) = (up(&mut r, rows * d, 1.0), up(&mut r, m * d, 1.0), up(&mut r, m, 1.0));
    let mut gth = b.zeros(m * d);
    b.gather_rows(&mut gth, &h, &dup, m, d);
    push(b, &mut outs, "gather_rows", &gth);
    b.embedding_fwd(&mut gth, &h, &uniq, m, d);
    push(b, &mut outs, "embedding_fwd", &gth);
    let mut acc = up(&mut r, rows * d, 1.0);
    b.scatter_add_rows(&mut acc, &y, &dup, m, d);
    push(b, &mut outs, "scatter_add_rows", &acc);
    b.embedding_bwd(&mut acc, &y, &dup, m, d);
    push(b, &mut outs, "embedding_bwd", &acc);
    b.scatter_add_scaled(&mut acc, &y, &sc, &dup, m, d);
    push(b, &mut outs, "scatter_add_scaled", &acc);
    let (mut dy, mut ds) = (up(&mut r, m * d, 1.0), up(&mut r, m, 1.0));
    b.scatter_add_scaled_bwd(&mut dy, &mut ds, &acc, &y, &sc, &dup, m, d);
    push(b, &mut outs, "scatter_add_scaled_bwd dy", &dy);
    push(b, &mut outs, "scatter_add_scaled_bwd dscale", &ds);
    b.scatter_rows(&mut acc, &y, &uniq, m, d);
    push(b, &mut outs, "scatter_rows", &acc);
    b.scatter_rows_bwd(&mut dy, &mut acc, &uniq, m, d);
    push(b, &mut outs, "scatter_rows_bwd dy", &dy);
    push(b, &mut outs, "scatter_rows_bwd dx", &acc);
    let scores: Vec<f32> = (0..rows).map(|_| r.gen_range(0..20) as f32 * 0.1).collect();
    let cu = b.idx_from(&[0, rows as u32 / 3, rows as u32]);
    let mut top = b.idx_from(&vec![0; 2 * (rows / 4)]);
    b.topk_segments(&mut top, &b.from_f32(&scores), &cu, 2, rows / 4);
    outs.push(("topk_segments".into(), b.idx_to_vec(&top).iter().map(|&i| i as f32).collect()));

    // optimiser
    let e = sz.ew;
    let mut p = up(&mut r, e, 1.0);
    let (mut mo, mut vo) = (b.zeros(e), b.zeros(e));
    for step in 1..=3 {
        let grad = up(&mut r, e, 1.0);
        b.adamw(&mut p, &grad, &mut mo, &mut vo, e, 1e-3, 0.9, 0.95, 1e-8, 0.1, step);
    }
    push(b, &mut outs, "adamw p", &p);
    push(b, &mut outs, "adamw m", &mo);
    push(b, &mut outs, "adamw v", &vo);
    outs
}

#[test]
fn f32_and_f64_backends_agree() {
    let o32 = scenario(&Cpu::<f32>::new(), &SMALL);
    let o64 = scenario(&Cpu::<f64>::new(), &SMALL);
    assert_eq!(o32.len(), o64.len());
    for ((name, a), (_, b)) in o32.iter().zip(&o64) {
        if name.ends_with(" bits") {
            continue;
        }
        assert_close_f32(name, a, b, 1e-5);
    }
}

fn assert_bit_identical(a: &Out, b: &Out, what: &str) {
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let same = x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{what}: {name} differs");
    }
}

#[test]
fn ops_are_bit_for_bit_deterministic() {
    let b = Cpu::<f32>::new();
    let first = scenario(&b, &BIG);
    let again = scenario(&b, &BIG);
    assert_bit_identical(&first, &again, "second run");
    // Results do not depend on how rayon schedules the work.
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let other = pool.install(|| scenario(&b, &BIG));
        assert_bit_identical(&first, &other, &format!("{threads}-thread pool"));
    }
    // Same for f64 on the small sizes.
    let b64 = Cpu::<f64>::new();
    assert_bit_identical(&scenario(&b64, &SMALL), &scenario(&b64, &SMALL), "f64 second run");
}

/// `cargo test -p mor-engine --release --test agreement -- --ignored --nocapture perf_report`
#[test]
#[ignore]
fn perf_report() {
    use std::time::Instant;
    fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
        f();
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() / reps as f64 * 1e3
    }
    let b = Cpu::<f32>::new();
    let mut r = rng(1);
    let n = 256;
    let (x, w) = (b.from_f32(&uniform(&mut r, n * n, 1.0)), b.from_f32(&uniform(&mut r, n * n, 1.0)));
    let mut out = b.zeros(n * n);
    let ms = time(50, || b.matmul_fwd(&mut out, &x, &w, n, n, n));
    println!("matmul 256x256x256 f32: {ms:.3} ms ({:.1} GFLOP/s)", 2.0 * (n * n * n) as f64 / ms / 1e6);
    let (mut dx, mut dw) = (b.zeros(n * n), b.zeros(n * n));
    let ms = time(20, || b.matmul_bwd(Some(&mut dx), &mut dw, &out, &x, &w, n, n, n));
    println!("matmul_bwd 256x256x256 f32: {ms:.3} ms");

    for (heads, kvh, len, hd) in [(4usize, 4usize, 256u32, 64usize), (9, 3, 1024, 64)] {
        let all: Vec<u32> = (0..len).collect();
        let c = AttnCase::new("perf", &[(all.clone(), all)], heads, kvh, hd);
        let (q, k, v) = (
            b.from_f32(&uniform(&mut r, c.q_len(), 1.0)),
            b.from_f32(&uniform(&mut r, c.k_len(), 1.0)),
            b.from_f32(&uniform(&mut r, c.k_len(), 1.0)),
        );
        let idx = c.idx(&b);
        let shape = c.shape(&idx);
        let (mut o, mut lse) = (b.zeros(c.q_len()), b.zeros(c.nq() * heads));
        let reps = if len > 512 { 3 } else { 20 };
        let ms = time(reps, || b.attention_fwd(&mut o, &mut lse, &q, &k, &v, &shape));
        println!("attention_fwd causal {heads}h/{kvh}kv x {len} tok x hd {hd} f32: {ms:.3} ms");
        let (mut dq, mut dk, mut dv) = (b.zeros(c.q_len()), b.zeros(c.k_len()), b.zeros(c.k_len()));
        let ms = time(reps, || b.attention_bwd(&mut dq, &mut dk, &mut dv, &o, &o, &lse, &q, &k, &v, &shape));
        println!("attention_bwd causal {heads}h/{kvh}kv x {len} tok x hd {hd} f32: {ms:.3} ms");
    }
    let (rows, d) = (2048, 576);
    let (x, w) = (b.from_f32(&uniform(&mut r, rows * d, 1.0)), b.from_f32(&vec![1.0; d]));
    let (mut o, mut rs) = (b.zeros(rows * d), b.zeros(rows));
    let ms = time(20, || b.rmsnorm_fwd(&mut o, &mut rs, &x, &w, rows, d, 1e-5));
    println!("rmsnorm_fwd 2048x576: {ms:.3} ms");
    let (mut dx, mut dw) = (b.zeros(rows * d), b.zeros(d));
    let ms = time(20, || b.rmsnorm_bwd(&mut dx, &mut dw, &o, &x, &w, &rs, rows, d));
    println!("rmsnorm_bwd 2048x576: {ms:.3} ms");
    let (rows, vocab) = (256, 49152);
    let logits = b.from_f32(&uniform(&mut r, rows * vocab, 5.0));
    let t = b.idx_from(&(0..rows as u32).collect::<Vec<_>>());
    let mut loss = b.zeros(rows);
    let ms = time(5, || b.cross_entropy_fwd(&mut loss, &logits, &t, rows, vocab));
    println!("cross_entropy_fwd 256x49152: {ms:.3} ms");
}
