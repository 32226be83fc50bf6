//! The CPU emulation of the CUDA bf16 mode (`cpu::precision`): the bf16 conversion bit for bit,
//! GEMMs whose operands are rounded (a bf16-sized difference from f32 on general inputs, none on
//! bf16-representable ones, exactly the f32 GEMM of the rounded operands), per-product rules, the
//! flash-attention roundings, and that switching back restores the exact reference.

mod common;

use common::*;
use mor_engine::cpu::precision::{round_bf16, GemmProduct, Operand};
use mor_engine::{Backend, Cpu, MatmulPrecision};
use std::sync::Arc;

/// `||a - b|| / ||b||`.
fn norm_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn bf16_all(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| round_bf16(v)).collect()
}

#[test]
fn bf16_rounding_is_round_to_nearest_even() {
    let e = |x: f32| round_bf16(x);
    assert_eq!(e(1.0), 1.0);
    // ulp(1) in bf16 is 2^-7: the midpoint 1 + 2^-8 ties to the even 1.0, 1 + 3·2^-8 to 1 + 2^-6.
    assert_eq!(e(1.0 + 2f32.powi(-8)), 1.0);
    assert_eq!(e(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
    assert_eq!(e(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 1.0 + 2f32.powi(-7));
    assert_eq!(e(-1.0 - 2f32.powi(-8) - 2f32.powi(-20)), -1.0 - 2f32.powi(-7));
    assert_eq!(e(f32::INFINITY), f32::INFINITY);
    assert_eq!(e(f32::MAX), f32::INFINITY);
    assert!(e(f32::NAN).is_nan());
    assert_eq!(e(0.1), f32::from_bits(0x3dcd_0000));
    // Relative error at most half an ulp: 2^-8 (8 significant bits), 2^-16 split, 2^-11 TF32;
    // truncated TF32 at most one ulp, towards zero.
    let mut r = rng(1);
    for x in uniform(&mut r, 10_000, 100.0) {
        assert!((e(x) - x).abs() <= x.abs() * 2f32.powi(-8));
        assert_eq!(e(e(x)), e(x));
        assert_eq!(Operand::Bf16.round(x), e(x));
        let s = Operand::Bf16x2.round(x);
        assert!((s - x).abs() <= x.abs() * 2f32.powi(-16));
        assert!((Operand::Tf32.round(x) - x).abs() <= x.abs() * 2f32.powi(-11));
        let t = Operand::Tf32Trunc.round(x);
        assert!(t.abs() <= x.abs() && (t - x).abs() <= x.abs() * 2f32.powi(-10));
    }
}

#[test]
fn bf16_gemm_rounds_operands_and_accumulates_in_f32() {
    let (n, k, m) = (13, 70, 11);
    let mut r = rng(2);
    let (x, w, dy) = (uniform(&mut r, n * k, 1.0), uniform(&mut r, m * k, 1.0), uniform(&mut r, n * m, 1.0));
    let (dx0, dw0) = (uniform(&mut r, n * k, 1.0), uniform(&mut r, m * k, 1.0));
    let b = Cpu::<f32>::new();
    let run = |b: &Cpu<f32>, x: &[f32], w: &[f32], dy: &[f32]| {
        let mut y = vec![0.0; n * m];
        b.matmul_fwd(&mut y, &x.to_vec(), &w.to_vec(), n, k, m);
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        b.matmul_bwd(Some(&mut dx), &mut dw, &dy.to_vec(), &x.to_vec(), &w.to_vec(), n, k, m);
        // What the backward added (the accumulation onto dx0 / dw0 is exact f32 addition).
        (y, dx, dw)
    };
    let exact = run(&b, &x, &w, &dy);
    assert!(b.set_matmul_precision(MatmulPrecision::Bf16));
    let emul = run(&b, &x, &w, &dy);
    // bf16-sized: operands off by up to 2^-9 relative each, so outputs ~1e-3 norm-wise.
    for (name, a, e) in [("y", &emul.0, &exact.0), ("dx", &emul.1, &exact.1), ("dw", &emul.2, &exact.2)] {
        let err = norm_err(a, e);
        assert!((1e-4..1e-2).contains(&err), "{name}: bf16 vs f32 norm-wise {err:e}");
    }
    // Exactly the f32 GEMM of the rounded operands.
    let (xr, wr, dyr) = (bf16_all(&x), bf16_all(&w), bf16_all(&dy));
    b.set_matmul_precision(MatmulPrecision::F32);
    let of_rounded = run(&b, &xr, &wr, &dyr);
    assert_eq!(bits(&emul.0), bits(&of_rounded.0));
    assert_eq!(bits(&emul.1), bits(&of_rounded.1));
    assert_eq!(bits(&emul.2), bits(&of_rounded.2));
    // On bf16-representable inputs the emulation equals f32 bit for bit.
    b.set_matmul_precision(MatmulPrecision::Bf16);
    let emul_r = run(&b, &xr, &wr, &dyr);
    assert_eq!(bits(&emul_r.0), bits(&of_rounded.0));
    assert_eq!(bits(&emul_r.1), bits(&of_rounded.1));
    assert_eq!(bits(&emul_r.2), bits(&of_rounded.2));
    // Back to F32: the reference again, bit for bit.
    b.set_matmul_precision(MatmulPrecision::F32);
    let again = run(&b, &x, &w, &dy);
    assert_eq!(bits(&again.0), bits(&exact.0));
    assert_eq!(bits(&again.1), bits(&exact.1));
    assert_eq!(bits(&again.2), bits(&exact.2));
    // A clone carries the setting.
    b.set_matmul_precision(MatmulPrecision::Bf16);
    assert_eq!(bits(&run(&b.clone(), &x, &w, &dy).0), bits(&emul.0));
}

#[test]
fn gemm_rule_picks_formats_per_product() {
    let (n, k, m) = (9, 40, 7);
    let mut r = rng(3);
    let (x, w, dy) = (uniform(&mut r, n * k, 1.0), uniform(&mut r, m * k, 1.0), uniform(&mut r, n * m, 1.0));
    let b = Cpu::<f32>::new();
    // Only dW = dyᵀ·x rounded (dy only): y and dx stay exact, dW is the GEMM of bf16(dy) and x.
    b.set_gemm_rule(Some(Arc::new(|c| match c.product {
        GemmProduct::Dw => [Operand::Bf16, Operand::F32],
        _ => [Operand::F32, Operand::F32],
    })));
    let mut y = vec![0.0; n * m];
    b.matmul_fwd(&mut y, &x, &w, n, k, m);
    let (mut dx, mut dw) = (vec![0.0; n * k], vec![0.0; m * k]);
    b.matmul_bwd(Some(&mut dx), &mut dw, &dy, &x, &w, n, k, m);
    let e = Cpu::<f32>::new();
    let mut ye = vec![0.0; n * m];
    e.matmul_fwd(&mut ye, &x, &w, n, k, m);
    let (mut dxe, mut dwe) = (vec![0.0; n * k], vec![0.0; m * k]);
    e.matmul_bwd(Some(&mut dxe), &mut dwe, &bf16_all(&dy), &x, &w, n, k, m);
    let (mut dx_exact, mut dw_exact) = (vec![0.0; n * k], vec![0.0; m * k]);
    e.matmul_bwd(Some(&mut dx_exact), &mut dw_exact, &dy, &x, &w, n, k, m);
    assert_eq!(bits(&y), bits(&ye));
    assert_eq!(bits(&dx), bits(&dx_exact));
    assert_eq!(bits(&dw), bits(&dwe));
}

#[test]
fn attention_bf16_rounds_like_the_flash_kernels_and_switches_off() {
    let b = Cpu::<f32>::new();
    for (ci, c) in attn_cases().iter().enumerate() {
        let mut r = rng(40 + ci as u64);
        let (q, k, v, dout) =
            (uniform(&mut r, c.q_len(), 1.5), uniform(&mut r, c.k_len(), 1.5), uniform(&mut r, c.k_len(), 1.0), uniform(&mut r, c.q_len(), 1.0));
        let idx = c.idx(&b);
        let shape = c.shape(&idx);
        let run = |b: &Cpu<f32>| {
            let mut out = vec![0.0; c.q_len()];
            let mut lse = vec![0.0; c.nq() * c.heads];
            b.attention_fwd(&mut out, &mut lse, &q, &k, &v, &shape);
            let (mut dq, mut dk, mut dv) = (vec![0.0; c.q_len()], vec![0.0; c.k_len()], vec![0.0; c.k_len()]);
            b.attention_bwd(&mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, &shape);
            [out, lse, dq, dk, dv]
        };
        let exact = run(&b);
        b.set_attention_bf16(true);
        let emul = run(&b);
        b.set_attention_bf16(false);
        let again = run(&b);
        for (i, name) in ["out", "lse", "dq", "dk", "dv"].iter().enumerate() {
            assert_eq!(bits(&again[i]), bits(&exact[i]), "{} {name}: not restored", c.name);
            let fin = |x: &[f32]| x.iter().map(|&v| if v.is_finite() { v } else { 0.0 }).collect::<Vec<_>>();
            let err = norm_err(&fin(&emul[i]), &fin(&exact[i]));
            assert!((1e-5..2e-2).contains(&err), "{} {name}: bf16 vs f32 norm-wise {err:e}", c.name);
        }
    }
}
