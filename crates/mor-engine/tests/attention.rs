//! Attention: forward against a dense masked-softmax reference, gradient checks in f64 against
//! finite differences, and the no-visible-key case, over packed layouts that cover GQA, several
//! segments, non-contiguous query subsets, keys longer than queries (KV sharing) and decoding.

mod common;

use common::*;
use mor_engine::{Backend, Cpu};

fn fwd64(b: &Cpu<f64>, c: &AttnCase, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let idx = c.idx(b);
    let shape = c.shape(&idx);
    let mut out = vec![f64::NAN; c.q_len()];
    let mut lse = vec![f64::NAN; c.nq() * c.heads];
    b.attention_fwd(&mut out, &mut lse, &q.to_vec(), &k.to_vec(), &v.to_vec(), &shape);
    (out, lse)
}

#[test]
fn attention_forward_matches_dense_reference() {
    let b = Cpu::<f64>::new();
    for (ci, c) in attn_cases().iter().enumerate() {
        let mut r = rng(100 + ci as u64);
        let q = uniform64(&mut r, c.q_len(), 1.5);
        let k = uniform64(&mut r, c.k_len(), 1.5);
        let v = uniform64(&mut r, c.k_len(), 1.0);
        let (out, lse) = fwd64(&b, c, &q, &k, &v);
        let (ro, rl) = dense_attention(c, &q, &k, &v);
        for (i, (a, e)) in out.iter().zip(&ro).enumerate() {
            assert!((a - e).abs() <= 1e-12 * (1.0 + e.abs()), "{} out[{i}]: {a} vs {e}", c.name);
        }
        for (i, (a, e)) in lse.iter().zip(&rl).enumerate() {
            if e.is_infinite() {
                assert_eq!(a, e, "{} lse[{i}]", c.name);
            } else {
                assert!((a - e).abs() <= 1e-12 * (1.0 + e.abs()), "{} lse[{i}]: {a} vs {e}", c.name);
            }
        }
    }
}

#[test]
fn attention_gradients_match_finite_differences() {
    let b = Cpu::<f64>::new();
    for (ci, c) in attn_cases().iter().enumerate() {
        let mut r = rng(200 + ci as u64);
        let inputs = vec![
            uniform64(&mut r, c.q_len(), 1.0),
            uniform64(&mut r, c.k_len(), 1.0),
            uniform64(&mut r, c.k_len(), 1.0),
        ];
        let proj_r = uniform64(&mut r, c.q_len(), 1.0);
        let fwd = |x: &[Vec<f64>]| fwd64(&b, c, &x[0], &x[1], &x[2]).0;
        let (out, lse) = fwd64(&b, c, &inputs[0], &inputs[1], &inputs[2]);
        // Backward onto random initial gradients: it must accumulate.
        let g0: Vec<Vec<f64>> = inputs.iter().map(|x| uniform64(&mut r, x.len(), 1.0)).collect();
        let (mut dq, mut dk, mut dv) = (g0[0].clone(), g0[1].clone(), g0[2].clone());
        let idx = c.idx(&b);
        let shape = c.shape(&idx);
        b.attention_bwd(&mut dq, &mut dk, &mut dv, &proj_r, &out, &lse, &inputs[0], &inputs[1], &inputs[2], &shape);
        for (w, (after, name)) in [(&dq, "dq"), (&dk, "dk"), (&dv, "dv")].into_iter().enumerate() {
            let num = numgrad(&inputs, w, &proj_r, &fwd, 1e-6);
            assert_grad_close(&format!("{} {name}", c.name), &delta(after, &g0[w]), &num, 1e-6);
        }
    }
}

#[test]
fn query_without_visible_key_gets_zero_output_and_gradient() {
    let b = Cpu::<f64>::new();
    let c = &attn_cases()[1]; // kv_sharing_subset: query 6 (position 1) of the last segment sees no key
    let (h, hd) = (c.heads, c.head_dim);
    let lonely = c.cu_q[2] as usize;
    assert_eq!(c.pos_q[lonely], 1);
    let mut r = rng(7);
    let q = uniform64(&mut r, c.q_len(), 1.0);
    let k = uniform64(&mut r, c.k_len(), 1.0);
    let v = uniform64(&mut r, c.k_len(), 1.0);
    let (out, lse) = fwd64(&b, c, &q, &k, &v);
    assert!(out[lonely * h * hd..(lonely + 1) * h * hd].iter().all(|&x| x == 0.0));
    assert!(lse[lonely * h..(lonely + 1) * h].iter().all(|&x| x == f64::INFINITY));
    // Other queries of that segment do see keys.
    assert!(out[(lonely + 1) * h * hd..(lonely + 2) * h * hd].iter().any(|&x| x != 0.0));
    // A gradient only on the lonely query's output changes nothing.
    let mut dout = vec![0.0; c.q_len()];
    dout[lonely * h * hd..(lonely + 1) * h * hd].iter_mut().for_each(|x| *x = 1.0);
    let (mut dq, mut dk, mut dv) = (vec![0.0; c.q_len()], vec![0.0; c.k_len()], vec![0.0; c.k_len()]);
    let idx = c.idx(&b);
    let shape = c.shape(&idx);
    b.attention_bwd(&mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, &shape);
    assert!(dq.iter().chain(&dk).chain(&dv).all(|&x| x == 0.0));
    // With a full random dout the lonely query's dq row is still exactly zero.
    let dout = uniform64(&mut r, c.q_len(), 1.0);
    let mut dq = vec![0.0; c.q_len()];
    b.attention_bwd(&mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, &shape);
    assert!(dq[lonely * h * hd..(lonely + 1) * h * hd].iter().all(|&x| x == 0.0));
    assert!(dq.iter().any(|&x| x != 0.0));
}

#[test]
fn keys_of_other_segments_and_future_keys_are_invisible() {
    // Changing a key that no query may see must not change any output.
    let b = Cpu::<f64>::new();
    let c = &attn_cases()[0];
    let mut r = rng(9);
    let q = uniform64(&mut r, c.q_len(), 1.0);
    let mut k = uniform64(&mut r, c.k_len(), 1.0);
    let mut v = uniform64(&mut r, c.k_len(), 1.0);
    let (out, _) = fwd64(&b, c, &q, &k, &v);
    // The last key of the first segment (position 4) is visible only to the last query of that
    // segment (query row 4).
    let row = 4 * c.kv_heads * c.head_dim;
    for x in &mut k[row..row + c.kv_heads * c.head_dim] {
        *x += 3.0;
    }
    for x in &mut v[row..row + c.kv_heads * c.head_dim] {
        *x -= 2.0;
    }
    let (out2, _) = fwd64(&b, c, &q, &k, &v);
    let qrow = c.heads * c.head_dim;
    for i in 0..c.nq() {
        let same = out[i * qrow..(i + 1) * qrow] == out2[i * qrow..(i + 1) * qrow];
        assert_eq!(same, i != 4, "query {i}");
    }
}
