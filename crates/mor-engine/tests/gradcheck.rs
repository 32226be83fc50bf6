//! Gradient checks in f64 for every op with a backward: the backward, run with `dout = r` onto
//! random initial gradients (backward ops accumulate), must match central finite differences of
//! `L = Σ r ⊙ forward(inputs)`. Attention has its own file (`attention.rs`).

mod common;

use common::*;
use mor_engine::{Backend, Cpu, GateFn};

const EPS: f64 = 1e-6;
const RTOL: f64 = 1e-6;

fn be() -> Cpu<f64> {
    Cpu::<f64>::new()
}

/// Check the accumulated gradients `after[w] - before[w]` for each input `w` in `wrt`.
fn check_all(
    name: &str,
    inputs: &[Vec<f64>],
    r: &[f64],
    fwd: &dyn Fn(&[Vec<f64>]) -> Vec<f64>,
    grads: &[(usize, Vec<f64>)],
) {
    for (w, g) in grads {
        let num = numgrad(inputs, *w, r, fwd, EPS);
        assert_grad_close(&format!("{name} d{w}"), g, &num, RTOL);
    }
}

#[test]
fn matmul_grad() {
    let b = be();
    for &(n, k, m) in &[(5usize, 7usize, 4usize), (3, 1, 9), (17, 12, 10)] {
        let mut r = rng(1 + n as u64);
        let inputs = vec![uniform64(&mut r, n * k, 1.0), uniform64(&mut r, m * k, 1.0)];
        let rr = uniform64(&mut r, n * m, 1.0);
        let fwd = |x: &[Vec<f64>]| {
            let mut out = vec![0.0; n * m];
            b.matmul_fwd(&mut out, &x[0], &x[1], n, k, m);
            out
        };
        let dx0 = uniform64(&mut r, n * k, 1.0);
        let dw0 = uniform64(&mut r, m * k, 1.0);
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        b.matmul_bwd(Some(&mut dx), &mut dw, &rr, &inputs[0], &inputs[1], n, k, m);
        check_all("matmul", &inputs, &rr, &fwd, &[(0, delta(&dx, &dx0)), (1, delta(&dw, &dw0))]);
        // dx = None: dw alone, identical.
        let mut dw2 = dw0.clone();
        b.matmul_bwd(None, &mut dw2, &rr, &inputs[0], &inputs[1], n, k, m);
        assert_eq!(dw, dw2);
    }
}

#[test]
fn rmsnorm_grad() {
    let b = be();
    // n = 70 spans several fixed row blocks of the dw reduction.
    for &(n, d) in &[(6usize, 13usize), (70, 5)] {
        let mut r = rng(2 + n as u64);
        let inputs = vec![uniform64(&mut r, n * d, 2.0), uniform64(&mut r, d, 1.5)];
        let rr = uniform64(&mut r, n * d, 1.0);
        let fwd = |x: &[Vec<f64>]| {
            let (mut out, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
            b.rmsnorm_fwd(&mut out, &mut rstd, &x[0], &x[1], n, d, 1e-5);
            out
        };
        let (mut out, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
        b.rmsnorm_fwd(&mut out, &mut rstd, &inputs[0], &inputs[1], n, d, 1e-5);
        let dx0 = uniform64(&mut r, n * d, 1.0);
        let dw0 = uniform64(&mut r, d, 1.0);
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        b.rmsnorm_bwd(&mut dx, &mut dw, &rr, &inputs[0], &inputs[1], &rstd, n, d);
        check_all("rmsnorm", &inputs, &rr, &fwd, &[(0, delta(&dx, &dx0)), (1, delta(&dw, &dw0))]);
    }
}

#[test]
fn rope_grad() {
    let b = be();
    let (n, heads, hd) = (5usize, 3usize, 8usize);
    let pos = b.idx_from(&[0, 7, 3, 100, 2]);
    let mut r = rng(3);
    let inputs = vec![uniform64(&mut r, n * heads * hd, 1.0)];
    let rr = uniform64(&mut r, n * heads * hd, 1.0);
    let fwd = |x: &[Vec<f64>]| {
        let mut y = x[0].clone();
        b.rope_fwd(&mut y, &pos, n, heads, hd, 10000.0);
        y
    };
    // rope_bwd works in place on the incoming gradient (it is the transpose, not an accumulation).
    let mut g = rr.clone();
    b.rope_bwd(&mut g, &pos, n, heads, hd, 10000.0);
    check_all("rope", &inputs, &rr, &fwd, &[(0, g)]);
}

#[test]
fn swiglu_grad() {
    // gate and up side by side per row: [rows, 2f].
    let b = be();
    let (rows, f) = (5, 8);
    let n = rows * f;
    let mut r = rng(4);
    let inputs = vec![uniform64(&mut r, 2 * n, 4.0)];
    let rr = uniform64(&mut r, n, 1.0);
    let fwd = |x: &[Vec<f64>]| {
        let mut o = vec![0.0; n];
        b.swiglu_fwd(&mut o, &x[0], rows, f);
        o
    };
    let gu0 = uniform64(&mut r, 2 * n, 1.0);
    let mut dgu = gu0.clone();
    b.swiglu_bwd(&mut dgu, &rr, &inputs[0], rows, f);
    check_all("swiglu", &inputs, &rr, &fwd, &[(0, delta(&dgu, &gu0))]);
}

#[test]
fn gelu_grad() {
    let b = be();
    let mut r = rng(5);
    // Random values plus points around the erf/erfc switch (|x|/√2 = 2.5) and in the tails.
    let mut x = uniform64(&mut r, 40, 6.0);
    x.extend_from_slice(&[3.5355, 3.5356, -3.5355, -3.5356, 0.0, 1e-3, -7.5, 9.0]);
    let n = x.len();
    let inputs = vec![x];
    let rr = uniform64(&mut r, n, 1.0);
    let fwd = |x: &[Vec<f64>]| {
        let mut o = vec![0.0; n];
        b.gelu_fwd(&mut o, &x[0], n);
        o
    };
    let g0 = uniform64(&mut r, n, 1.0);
    let mut dx = g0.clone();
    b.gelu_bwd(&mut dx, &rr, &inputs[0], n);
    check_all("gelu", &inputs, &rr, &fwd, &[(0, delta(&dx, &g0))]);
}

#[test]
fn gate_grad() {
    let b = be();
    let n = 30;
    for f in [GateFn::Sigmoid, GateFn::Tanh, GateFn::Identity] {
        let mut r = rng(6);
        let inputs = vec![uniform64(&mut r, n, 4.0)];
        let rr = uniform64(&mut r, n, 1.0);
        let fwd = |x: &[Vec<f64>]| {
            let mut o = vec![0.0; n];
            b.gate_fwd(&mut o, &x[0], f, 0.7, n);
            o
        };
        let g0 = uniform64(&mut r, n, 1.0);
        let mut dx = g0.clone();
        b.gate_bwd(&mut dx, &rr, &inputs[0], f, 0.7, n);
        check_all(&format!("gate {f:?}"), &inputs, &rr, &fwd, &[(0, delta(&dx, &g0))]);
    }
}

#[test]
fn softmax_grad() {
    let b = be();
    let (n, c) = (4usize, 9usize);
    let mut r = rng(7);
    let inputs = vec![uniform64(&mut r, n * c, 3.0)];
    let rr = uniform64(&mut r, n * c, 1.0);
    let fwd = |x: &[Vec<f64>]| {
        let mut o = vec![0.0; n * c];
        b.softmax_fwd(&mut o, &x[0], n, c);
        o
    };
    let out = fwd(&inputs);
    let g0 = uniform64(&mut r, n * c, 1.0);
    let mut dx = g0.clone();
    b.softmax_bwd(&mut dx, &rr, &out, n, c);
    check_all("softmax", &inputs, &rr, &fwd, &[(0, delta(&dx, &g0))]);
}

#[test]
fn gather_and_embedding_grad() {
    let b = be();
    let (rows, d, m) = (6usize, 5usize, 9usize);
    // Repeated rows: the backward must sum their gradients.
    let ids = b.idx_from(&[3, 0, 3, 5, 1, 3, 0, 2, 5]);
    let mut r = rng(8);
    let inputs = vec![uniform64(&mut r, rows * d, 1.0)];
    let rr = uniform64(&mut r, m * d, 1.0);
    let g0 = uniform64(&mut r, rows * d, 1.0);
    // gather_rows / scatter_add_rows
    let fwd = |x: &[Vec<f64>]| {
        let mut o = vec![0.0; m * d];
        b.gather_rows(&mut o, &x[0], &ids, m, d);
        o
    };
    let mut dx = g0.clone();
    b.scatter_add_rows(&mut dx, &rr, &ids, m, d);
    check_all("gather_rows", &inputs, &rr, &fwd, &[(0, delta(&dx, &g0))]);
    // embedding
    let fwd = |x: &[Vec<f64>]| {
        let mut o = vec![0.0; m * d];
        b.embedding_fwd(&mut o, &x[0], &ids, m, d);
        o
    };
    let mut dt = g0.clone();
    b.embedding_bwd(&mut dt, &rr, &ids, m, d);
    check_all("embedding", &inputs, &rr, &fwd, &[(0, delta(&dt, &g0))]);
}

#[test]
fn scatter_add_scaled_grad() {
    let b = be();
    let (rows, d, m) = (7usize, 4usize, 5usize);
    let idx = b.idx_from(&[6, 1, 4, 1, 0]);
    let mut r = rng(9);
    let inputs = vec![uniform64(&mut r, rows * d, 1.0), uniform64(&mut r, m * d, 1.0), uniform64(&mut r, m, 1.0)];
    let rr = uniform64(&mut r, rows * d, 1.0);
    let fwd = |x: &[Vec<f64>]| {
        let mut h = x[0].clone();
        b.scatter_add_scaled(&mut h, &x[1], &x[2], &idx, m, d);
        h
    };
    let (dy0, ds0) = (uniform64(&mut r, m * d, 1.0), uniform64(&mut r, m, 1.0));
    let (mut dy, mut ds) = (dy0.clone(), ds0.clone());
    b.scatter_add_scaled_bwd(&mut dy, &mut ds, &rr, &inputs[1], &inputs[2], &idx, m, d);
    // dh passes through unchanged: the gradient with respect to h is r itself.
    check_all(
        "scatter_add_scaled",
        &inputs,
        &rr,
        &fwd,
        &[(0, rr.clone()), (1, delta(&dy, &dy0)), (2, delta(&ds, &ds0))],
    );
}

#[test]
fn scatter_rows_grad() {
    let b = be();
    let (rows, d, m) = (7usize, 3usize, 4usize);
    let idx = b.idx_from(&[5, 0, 2, 6]);
    let mut r = rng(10);
    let inputs = vec![uniform64(&mut r, rows * d, 1.0), uniform64(&mut r, m * d, 1.0)];
    let rr = uniform64(&mut r, rows * d, 1.0);
    let fwd = |x: &[Vec<f64>]| {
        let mut h = x[0].clone();
        b.scatter_rows(&mut h, &x[1], &idx, m, d);
        h
    };
    let dy0 = uniform64(&mut r, m * d, 1.0);
    let mut dy = dy0.clone();
    let mut dx = rr.clone();
    b.scatter_rows_bwd(&mut dy, &mut dx, &idx, m, d);
    check_all("scatter_rows", &inputs, &rr, &fwd, &[(0, dx), (1, delta(&dy, &dy0))]);
}

#[test]
fn cross_entropy_grad() {
    let b = be();
    let (n, v) = (5usize, 11usize);
    let targets = b.idx_from(&[3, u32::MAX, 0, 10, u32::MAX]);
    let mut r = rng(11);
    let inputs = vec![uniform64(&mut r, n * v, 4.0)];
    let scale = 0.37f32;
    // The backward takes one scale for all rows, so L = scale * Σ loss.
    let rr = vec![scale as f64; n];
    let fwd = |x: &[Vec<f64>]| {
        let mut loss = vec![0.0; n];
        b.cross_entropy_fwd(&mut loss, &x[0], &targets, n, v);
        loss
    };
    let g0 = uniform64(&mut r, n * v, 1.0);
    let mut dl = g0.clone();
    b.cross_entropy_bwd(&mut dl, &inputs[0], &targets, scale, n, v);
    let g = delta(&dl, &g0);
    // Ignored rows get exactly nothing.
    assert!(g[v..2 * v].iter().chain(&g[4 * v..]).all(|&x| x == 0.0));
    check_all("cross_entropy", &inputs, &rr, &fwd, &[(0, g)]);
}

#[test]
fn bce_logits_grad() {
    let b = be();
    let n = 25;
    let mut r = rng(12);
    let mut x = uniform64(&mut r, n - 3, 6.0);
    x.extend_from_slice(&[0.0, 30.0, -30.0]);
    let t: Vec<f64> = (0..n).map(|i| [0.0, 1.0, 0.3][i % 3]).collect();
    let inputs = vec![x];
    let scale = 1.7f32;
    let rr = vec![scale as f64; n];
    let fwd = |x: &[Vec<f64>]| {
        let mut loss = vec![0.0; n];
        b.bce_logits_fwd(&mut loss, &x[0], &t, n);
        loss
    };
    let g0 = uniform64(&mut r, n, 1.0);
    let mut dx = g0.clone();
    b.bce_logits_bwd(&mut dx, &inputs[0], &t, scale, n);
    check_all("bce_logits", &inputs, &rr, &fwd, &[(0, delta(&dx, &g0))]);
}
