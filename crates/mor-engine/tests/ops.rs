//! Op semantics against hand-computed values and naive references: top-k selection, gather /
//! scatter round trips, AdamW, cross-entropy ignore index, erf/GELU accuracy, RoPE, RMSNorm,
//! matmul layout, and that ops touch only the leading elements they are told about.

mod common;

use common::*;
use mor_engine::cpu::math;
use mor_engine::{Backend, Cpu};
use rand::Rng;

#[test]
fn erf_and_gelu_match_reference_values() {
    // (x, erf(x), erfc(x)) from a correctly rounded libm.
    let table: &[(f64, f64, f64)] = &[
        (0.0, 0.0, 1.0),
        (1e-08, 1.1283791670955126e-08, 0.9999999887162083),
        (0.1, 0.1124629160182849, 0.8875370839817152),
        (0.5, 0.5204998778130465, 0.4795001221869535),
        (1.0, 0.8427007929497149, 0.15729920705028513),
        (1.7, 0.9837904585907745, 0.016209541409225436),
        (2.4999, 0.9995928300996666, 0.0004071699003334514),
        (2.5, 0.999593047982555, 0.0004069520174449589),
        (3.0, 0.9999779095030014, 2.2090496998585438e-05),
        (4.5, 0.9999999998033839, 1.9661604415428873e-10),
        (6.0, 1.0, 2.1519736712498916e-17),
        (-0.3, -0.3286267594591274, 1.3286267594591274),
        (-2.6, -0.9997639655834707, 1.9997639655834707),
        (-5.0, -0.9999999999984626, 1.9999999999984626),
    ];
    for &(x, e, ec) in table {
        assert!((math::erf(x) - e).abs() <= 1e-15, "erf({x}) = {} vs {e}", math::erf(x));
        assert!((math::erfc(x) - ec).abs() <= 1e-15 + 1e-13 * ec, "erfc({x}) = {} vs {ec}", math::erfc(x));
        assert_eq!(math::erf(-x), -math::erf(x));
    }
    let gel: &[(f64, f64)] = &[
        (1.0, 0.8413447460685429),
        (-1.0, -0.15865525393145707),
        (0.5, 0.34573123063700656),
        (-3.0, -0.004049694094890287),
        (3.0, 2.99595030590511),
        (-8.0, -4.9767684594174555e-15),
        (10.0, 10.0),
    ];
    let b = Cpu::<f64>::new();
    let x: Vec<f64> = gel.iter().map(|p| p.0).collect();
    let mut out = vec![0.0; x.len()];
    b.gelu_fwd(&mut out, &x, x.len());
    for (&(x, e), &o) in gel.iter().zip(&out) {
        assert!(
            (o - e).abs() <= 1e-14 * (1.0 + e.abs()) && (o - e).abs() <= 1e-13 * e.abs().max(1e-2),
            "gelu({x}) = {o} vs {e}"
        );
    }
}

fn topk_reference(scores: &[f32], a: usize, b: usize, k: usize) -> Vec<u32> {
    let mut ids: Vec<usize> = (a..b).collect();
    ids.sort_by(|&i, &j| scores[j].partial_cmp(&scores[i]).unwrap().then(i.cmp(&j)));
    let mut top: Vec<u32> = ids[..k].iter().map(|&i| i as u32).collect();
    top.sort();
    top
}

#[test]
fn topk_segments_properties() {
    let b = Cpu::<f32>::new();
    let mut r = rng(1);
    for trial in 0..50 {
        let num_seqs = r.gen_range(1..5);
        let lens: Vec<usize> = (0..num_seqs).map(|_| r.gen_range(1..40)).collect();
        let k = r.gen_range(1..=*lens.iter().min().unwrap());
        let total: usize = lens.iter().sum();
        // Few distinct values so that ties are common.
        let scores: Vec<f32> = (0..total).map(|_| r.gen_range(0..6) as f32 * 0.5 - 1.0).collect();
        let mut cu = vec![0u32];
        for l in &lens {
            cu.push(cu.last().unwrap() + *l as u32);
        }
        let mut out = b.idx_from(&vec![u32::MAX; num_seqs * k + 3]);
        b.topk_segments(&mut out, &b.from_f32(&scores), &b.idx_from(&cu), num_seqs, k);
        for s in 0..num_seqs {
            let (a, e) = (cu[s] as usize, cu[s + 1] as usize);
            let got = &out[s * k..(s + 1) * k];
            assert!(got.windows(2).all(|w| w[0] < w[1]), "trial {trial}: not ascending {got:?}");
            assert!(got.iter().all(|&i| (a..e).contains(&(i as usize))), "trial {trial}: outside segment");
            assert_eq!(got, &topk_reference(&scores, a, e, k)[..], "trial {trial} seg {s}");
            // Every chosen score >= every unchosen one; among equal scores, chosen indices are lower.
            for i in a..e {
                if got.contains(&(i as u32)) {
                    continue;
                }
                for &c in got {
                    let c = c as usize;
                    assert!(scores[c] > scores[i] || (scores[c] == scores[i] && c < i));
                }
            }
        }
        assert!(out[num_seqs * k..].iter().all(|&x| x == u32::MAX), "wrote past num_seqs*k");
    }
    // All equal: the lowest indices win. k = segment length: everything.
    let mut out = vec![0u32; 5];
    b.topk_segments(&mut out, &vec![1.0; 7], &vec![0, 4, 7], 2, 2);
    assert_eq!(out[..4], [0, 1, 4, 5]);
    b.topk_segments(&mut out, &vec![3.0, 1.0, 2.0], &vec![0, 3], 1, 3);
    assert_eq!(out[..3], [0, 1, 2]);
    b.topk_segments(&mut out, &vec![0.1, 0.9, 0.5, 0.9], &vec![0, 4], 1, 2);
    assert_eq!(out[..2], [1, 3]);
}

#[test]
fn gather_scatter_round_trips() {
    let b = Cpu::<f64>::new();
    let (rows, d) = (9usize, 4usize);
    let mut r = rng(2);
    let x = uniform64(&mut r, rows * d, 1.0);
    let idx = vec![7u32, 2, 0, 5];
    let m = idx.len();
    // gather then scatter_rows into a copy with those rows wiped gives back x.
    let mut g = vec![0.0; m * d];
    b.gather_rows(&mut g, &x, &idx, m, d);
    for (i, &row) in idx.iter().enumerate() {
        assert_eq!(g[i * d..(i + 1) * d], x[row as usize * d..(row as usize + 1) * d]);
    }
    let mut y = x.clone();
    b.index_fill(&mut y, &(0..rows as u32 * d as u32).collect(), rows * d, -1.0);
    assert!(y.iter().all(|&v| v == -1.0));
    let mut y = x.clone();
    for &row in &idx {
        y[row as usize * d..(row as usize + 1) * d].iter_mut().for_each(|v| *v = 0.0);
    }
    let mut back = y.clone();
    b.scatter_rows(&mut back, &g, &idx, m, d);
    assert_eq!(back, x);
    // scatter_add_rows of the gathered rows onto the wiped copy also restores x.
    let mut back = y.clone();
    b.scatter_add_rows(&mut back, &g, &idx, m, d);
    assert_eq!(back, x);
    // scatter_add_scaled with scale 1 is scatter_add_rows; with scale 0 a no-op.
    let mut back = y.clone();
    b.scatter_add_scaled(&mut back, &g, &vec![1.0; m], &idx, m, d);
    assert_eq!(back, x);
    let mut same = y.clone();
    b.scatter_add_scaled(&mut same, &g, &vec![0.0; m], &idx, m, d);
    assert_eq!(same, y);
    // scatter_rows_bwd moves the gradient of replaced rows to dy and zeroes them in dx.
    let mut dx = x.clone();
    let mut dy = vec![1.0; m * d];
    b.scatter_rows_bwd(&mut dy, &mut dx, &idx, m, d);
    for (i, &row) in idx.iter().enumerate() {
        let row = row as usize;
        assert!(dx[row * d..(row + 1) * d].iter().all(|&v| v == 0.0));
        for e in 0..d {
            assert_eq!(dy[i * d + e], 1.0 + x[row * d + e]);
        }
    }
    for row in (0..rows).filter(|r| !idx.contains(&(*r as u32))) {
        assert_eq!(dx[row * d..(row + 1) * d], x[row * d..(row + 1) * d]);
    }
    // index_fill on scalars.
    let mut s = vec![0.0; 6];
    b.index_fill(&mut s, &vec![4, 1, 9], 2, 2.5);
    assert_eq!(s, vec![0.0, 2.5, 0.0, 0.0, 2.5, 0.0]);
}

#[test]
fn scatter_add_rows_sums_repeated_rows_in_order() {
    let b = Cpu::<f32>::new();
    let d = 3;
    let idx = vec![1u32, 1, 0, 1];
    let dout: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let mut dx = vec![10.0f32; 2 * d];
    b.scatter_add_rows(&mut dx, &dout, &idx, 4, d);
    assert_eq!(dx, vec![16.0, 17.0, 18.0, 10.0 + 0.0 + 3.0 + 9.0, 10.0 + 1.0 + 4.0 + 10.0, 10.0 + 2.0 + 5.0 + 11.0]);
}

/// AdamW in f64 with the textbook formula.
#[allow(clippy::too_many_arguments)]
fn adamw_ref(p: f64, g: f64, m: f64, v: f64, lr: f64, b1: f64, b2: f64, eps: f64, wd: f64, t: i32) -> (f64, f64, f64) {
    let p = p * (1.0 - lr * wd);
    let m = b1 * m + (1.0 - b1) * g;
    let v = b2 * v + (1.0 - b2) * g * g;
    let mh = m / (1.0 - b1.powi(t));
    let vh = v / (1.0 - b2.powi(t));
    (p - lr * mh / (vh.sqrt() + eps), m, v)
}

#[test]
fn adamw_matches_hand_computed_steps() {
    // Step 1 by hand: p=1, g=0.5, lr=0.1, wd=0.01, b1=0.9, b2=0.999, eps=1e-8:
    // p ← 0.999; m = 0.05, v = 0.00025; m̂ = 0.5, v̂ = 0.25; p ← 0.999 - 0.1·0.5/(0.5+1e-8).
    let b = Cpu::<f64>::new();
    let (mut p, g, mut m, mut v) = (vec![1.0], vec![0.5], vec![0.0], vec![0.0]);
    b.adamw(&mut p, &g, &mut m, &mut v, 1, 0.1, 0.9, 0.999, 1e-8, 0.01, 1);
    let expect = 0.999 - 0.1 * 0.5 / (0.5 + 1e-8);
    // Hyper-parameters cross the interface as f32 (0.1f32 != 0.1), hence the 1e-8 tolerance.
    assert!((p[0] - expect).abs() < 1e-8, "{} vs {expect}", p[0]);
    assert!((m[0] / 0.05 - 1.0).abs() < 1e-6 && (v[0] / 0.00025 - 1.0).abs() < 1e-4, "{m:?} {v:?}");

    // Several steps on a vector, against the f64 formula with the f32-rounded hyper-parameters.
    let (lr, b1, b2, eps, wd) = (3e-3f32, 0.9f32, 0.95f32, 1e-8f32, 0.1f32);
    let mut r = rng(3);
    let n = 40_000; // several parallel chunks
    let mut p64 = uniform64(&mut r, n, 1.0);
    let mut p32: Vec<f32> = p64.iter().map(|&x| x as f32).collect();
    p64 = p32.iter().map(|&x| x as f64).collect();
    let mut pr = p64.clone();
    let (mut m64, mut v64, mut mr, mut vr) = (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let (mut m32, mut v32) = (vec![0.0f32; n], vec![0.0f32; n]);
    let b32 = Cpu::<f32>::new();
    for t in 1..=3u64 {
        let g32 = uniform(&mut r, n, 2.0);
        let g64: Vec<f64> = g32.iter().map(|&x| x as f64).collect();
        b.adamw(&mut p64, &g64, &mut m64, &mut v64, n, lr, b1, b2, eps, wd, t);
        b32.adamw(&mut p32, &g32, &mut m32, &mut v32, n, lr, b1, b2, eps, wd, t);
        for i in 0..n {
            let (p, m, v) = adamw_ref(
                pr[i], g64[i], mr[i], vr[i], lr as f64, b1 as f64, b2 as f64, eps as f64, wd as f64, t as i32,
            );
            pr[i] = p;
            mr[i] = m;
            vr[i] = v;
        }
    }
    for i in 0..n {
        assert!((p64[i] - pr[i]).abs() <= 1e-13, "p64[{i}] {} vs {}", p64[i], pr[i]);
        assert!((m64[i] - mr[i]).abs() <= 1e-14 && (v64[i] - vr[i]).abs() <= 1e-14);
        assert!((p32[i] as f64 - pr[i]).abs() <= 1e-6, "p32[{i}] {} vs {}", p32[i], pr[i]);
    }
    // Only the first n entries are touched.
    let mut p = vec![1.0f32; 4];
    let (mut m, mut v) = (vec![0.0f32; 4], vec![0.0f32; 4]);
    b32.adamw(&mut p, &vec![1.0; 4], &mut m, &mut v, 2, 0.1, 0.9, 0.999, 1e-8, 0.0, 1);
    assert!(p[0] < 1.0 && p[1] < 1.0 && p[2] == 1.0 && p[3] == 1.0 && m[2] == 0.0);
}

/// Multi-tensor AdamW state: per tensor (param, m, v).
#[derive(Clone)]
struct AdamWCase<T> {
    p: Vec<Vec<T>>,
    m: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
}

/// `adamw_many` (the CPU override and the trait's default, `adamw_each`) against what the
/// optimizer did before it existed, per tensor `scale(g, grad_scale)` then `adamw`: bit-identical
/// parameters and moments, gradients left as they were, tails beyond `n` untouched. Tensors of
/// odd sizes (one spanning several parallel chunks), mixed decay, with and without clipping.
fn adamw_many_matches_per_tensor_path<T: mor_engine::cpu::CpuFloat + std::fmt::Debug>() {
    use mor_engine::backend::adamw_each;
    use mor_engine::AdamWItem;
    let b = Cpu::<T>::new();
    let sizes = [1usize, 7, 40_001, 33, 2];
    let decay = [0.0f32, 0.1, 0.1, 0.0, 0.1];
    let (lr, b1, b2, eps) = (3e-3f32, 0.9f32, 0.95f32, 1e-8f32);
    let mut r = rng(11);
    let pad = 3;
    let start = AdamWCase {
        p: sizes.iter().map(|&n| b.from_f32(&uniform(&mut r, n + pad, 1.0))).collect(),
        m: sizes.iter().map(|&n| b.from_f32(&uniform(&mut r, n + pad, 0.01))).collect(),
        v: sizes.iter().map(|&n| b.from_f32(&uniform(&mut r, n + pad, 1e-4).iter().map(|x| x.abs()).collect::<Vec<_>>())).collect(),
    };
    let (mut old, mut fused, mut each) = (start.clone(), start.clone(), start);
    // Steps 1-4: clipped (two different coefficients), unclipped, clipped.
    for (step, grad_scale) in [(1u64, 0.37f32), (2, 1.0), (3, 0.0123), (4, 0.9)] {
        let grads: Vec<Vec<T>> = sizes.iter().map(|&n| b.from_f32(&uniform(&mut r, n + pad, 2.0))).collect();
        for (k, &n) in sizes.iter().enumerate() {
            let mut g = grads[k].clone();
            if grad_scale != 1.0 {
                b.scale(&mut g, grad_scale, n);
            }
            b.adamw(&mut old.p[k], &g, &mut old.m[k], &mut old.v[k], n, lr, b1, b2, eps, decay[k], step);
        }
        for (case, default) in [(&mut fused, false), (&mut each, true)] {
            let mut items: Vec<AdamWItem<'_, Cpu<T>>> = case
                .p
                .iter_mut()
                .zip(case.m.iter_mut())
                .zip(case.v.iter_mut())
                .zip(&grads)
                .enumerate()
                .map(|(k, (((param, m), v), grad))| AdamWItem { param, grad, m, v, n: sizes[k], weight_decay: decay[k] })
                .collect();
            let before: Vec<Vec<T>> = grads.clone();
            if default {
                adamw_each(&b, &mut items, lr, b1, b2, eps, step, grad_scale);
            } else {
                b.adamw_many(&mut items, lr, b1, b2, eps, step, grad_scale);
            }
            drop(items);
            assert!(grads.iter().zip(&before).all(|(a, c)| a.iter().zip(c).all(|(x, y)| x.as_f64().to_bits() == y.as_f64().to_bits())));
        }
        for (name, case) in [("adamw_many", &fused), ("adamw_each", &each)] {
            for k in 0..sizes.len() {
                for (what, got, want) in [("param", &case.p[k], &old.p[k]), ("m", &case.m[k], &old.m[k]), ("v", &case.v[k], &old.v[k])] {
                    let diff = got.iter().zip(want).filter(|(x, y)| x.as_f64().to_bits() != y.as_f64().to_bits()).count();
                    assert_eq!(diff, 0, "{name} step {step} (grad_scale {grad_scale}) tensor {k} {what}: {diff} values differ");
                }
            }
        }
    }
}

#[test]
fn adamw_many_matches_scale_then_adamw_bit_for_bit() {
    adamw_many_matches_per_tensor_path::<f32>();
    adamw_many_matches_per_tensor_path::<f64>();
}

#[test]
fn fill_many_fills_the_leading_elements() {
    let b = Cpu::<f32>::new();
    let (mut x, mut y, mut z) = (vec![1.0f32; 5], vec![2.0f32; 3], vec![3.0f32; 2]);
    b.fill_many(&mut [(&mut x, 4), (&mut y, 0), (&mut z, 2)], 0.0);
    assert_eq!((x, y, z), (vec![0.0, 0.0, 0.0, 0.0, 1.0], vec![2.0; 3], vec![0.0; 2]));
}

#[test]
fn cross_entropy_values_and_ignore_index() {
    let b = Cpu::<f64>::new();
    let (n, v) = (4usize, 6usize);
    let mut r = rng(4);
    let logits = uniform64(&mut r, n * v, 5.0);
    let targets = vec![2u32, u32::MAX, 5, 0];
    let mut loss = vec![f64::NAN; n];
    b.cross_entropy_fwd(&mut loss, &logits, &targets, n, v);
    for i in 0..n {
        let row = &logits[i * v..(i + 1) * v];
        if targets[i] == u32::MAX {
            assert_eq!(loss[i], 0.0);
        } else {
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            assert!((loss[i] - (lse - row[targets[i] as usize])).abs() < 1e-12);
        }
    }
    // Uniform logits: loss = ln(vocab); huge logits stay finite (stable logsumexp).
    let mut l = vec![0.0f32; 2];
    let b32 = Cpu::<f32>::new();
    b32.cross_entropy_fwd(&mut l, &[vec![0.0f32; 8], vec![1000.0f32; 8]].concat(), &vec![3, 7], 2, 8);
    assert!((l[0] - 8f32.ln()).abs() < 1e-6 && (l[1] - 8f32.ln()).abs() < 1e-4, "{l:?}");
    // Backward: ignored rows untouched, other rows sum to zero (softmax - onehot).
    let mut d = vec![0.5; n * v];
    b.cross_entropy_bwd(&mut d, &logits, &targets, 2.0, n, v);
    assert!(d[v..2 * v].iter().all(|&x| x == 0.5));
    for i in [0, 2, 3] {
        let s: f64 = d[i * v..(i + 1) * v].iter().map(|x| x - 0.5).sum();
        assert!(s.abs() < 1e-12);
        assert!(d[i * v + targets[i] as usize] < 0.5);
    }
}

/// `cross_entropy_fwd_bwd` on `b`: the losses and the gradient (dlogits starts as garbage, the op
/// sets it) equal `cross_entropy_fwd`, `fill(0)`, `cross_entropy_bwd` bit for bit.
fn check_ce_fwd_bwd<B: Backend<Idx = Vec<u32>>>(b: &B, logits: &[f32], targets: &[u32], n: usize, v: usize, scale: f32) {
    let x = b.from_f32(logits);
    let (mut l0, mut d0) = (b.from_f32(&vec![7.0; n]), b.from_f32(&vec![3.0; n * v]));
    b.cross_entropy_fwd(&mut l0, &x, &targets.to_vec(), n, v);
    b.fill(&mut d0, n * v, 0.0);
    b.cross_entropy_bwd(&mut d0, &x, &targets.to_vec(), scale, n, v);
    let (mut l1, mut d1) = (b.from_f32(&vec![-1.0; n]), b.from_f32(&vec![0.25; n * v]));
    b.cross_entropy_fwd_bwd(&mut l1, &mut d1, &x, &targets.to_vec(), scale, n, v);
    let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
    assert_eq!(bits(b.to_f64_prefix(&l1, n)), bits(b.to_f64_prefix(&l0, n)), "losses");
    assert_eq!(bits(b.to_f64_prefix(&d1, n * v)), bits(b.to_f64_prefix(&d0, n * v)), "dlogits");
    // Ignored rows: loss 0 and a zero gradient row (set, not left as it was).
    for (i, &t) in targets.iter().enumerate() {
        if t == u32::MAX {
            assert_eq!(b.to_f64_prefix(&l1, n)[i], 0.0);
            assert!(b.to_f64_prefix(&d1, n * v)[i * v..(i + 1) * v].iter().all(|&g| g == 0.0));
        }
    }
}

#[test]
fn cross_entropy_fwd_bwd_equals_fwd_fill_bwd() {
    let mut r = rng(41);
    for (n, v) in [(1usize, 1usize), (5, 7), (6, 48), (3, 1000)] {
        let logits = uniform(&mut r, n * v, 6.0);
        let targets: Vec<u32> = (0..n).map(|i| if i % 3 == 1 { u32::MAX } else { ((i * 7 + 3) % v) as u32 }).collect();
        for scale in [1.0 / n as f32, 0.37, -2.0] {
            check_ce_fwd_bwd(&Cpu::<f32>::new(), &logits, &targets, n, v, scale);
            check_ce_fwd_bwd(&Cpu::<f64>::new(), &logits, &targets, n, v, scale);
        }
    }
    // All rows ignored.
    check_ce_fwd_bwd(&Cpu::<f32>::new(), &[1.0, 2.0, 3.0, 4.0], &[u32::MAX, u32::MAX], 2, 2, 0.5);
    // An out-of-range target fails as in cross_entropy_fwd / _bwd (the CPU checks; CUDA poisons the
    // loss with NaN and writes a zero gradient row).
    fn out_of_range<B: Backend<Idx = Vec<u32>> + std::panic::RefUnwindSafe>(b: &B) {
        let err = std::panic::catch_unwind(|| {
            let (mut l, mut d, x) = (b.zeros(2), b.zeros(8), b.from_f32(&[0.5; 8]));
            b.cross_entropy_fwd_bwd(&mut l, &mut d, &x, &vec![1, 4], 1.0, 2, 4);
        })
        .expect_err("out-of-range target must panic");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("target 4 >= vocab 4"), "{msg}");
    }
    out_of_range(&Cpu::<f32>::new());
    out_of_range(&Cpu::<f64>::new());
}

#[test]
fn rope_rmsnorm_softmax_bce_known_values() {
    let b = Cpu::<f64>::new();
    // RoPE with head_dim 2 rotates (x1, x2) by pos·1 radians; position 0 is the identity.
    let mut x = vec![1.0, 2.0, 3.0, -1.0];
    b.rope_fwd(&mut x, &vec![1, 0], 2, 1, 2, 10000.0);
    let (s, c) = 1f64.sin_cos();
    assert!((x[0] - (c - 2.0 * s)).abs() < 1e-15 && (x[1] - (2.0 * c + s)).abs() < 1e-15);
    assert_eq!(x[2..], [3.0, -1.0]);
    // head_dim 4: frequencies 1 and theta^(-1/2).
    let mut x = vec![1.0, 0.0, 0.0, 0.0];
    b.rope_fwd(&mut x, &vec![3], 1, 1, 4, 100.0);
    assert!((x[0] - 3f64.cos()).abs() < 1e-15 && (x[2] - 3f64.sin()).abs() < 1e-15 && x[1] == 0.0);
    let mut x = vec![0.0, 1.0, 0.0, 0.0];
    b.rope_fwd(&mut x, &vec![3], 1, 1, 4, 100.0);
    assert!((x[1] - 0.3f64.cos()).abs() < 1e-15 && (x[3] - 0.3f64.sin()).abs() < 1e-15);
    // rope_bwd inverts rope_fwd and rotations preserve the norm.
    let mut r = rng(5);
    let x0 = uniform64(&mut r, 3 * 2 * 8, 1.0);
    let pos = vec![5, 17, 1023];
    let mut x = x0.clone();
    b.rope_fwd(&mut x, &pos, 3, 2, 8, 10000.0);
    let n0: f64 = x0.iter().map(|v| v * v).sum();
    let n1: f64 = x.iter().map(|v| v * v).sum();
    assert!((n0 - n1).abs() < 1e-12);
    b.rope_bwd(&mut x, &pos, 3, 2, 8, 10000.0);
    assert!(x.iter().zip(&x0).all(|(a, b)| (a - b).abs() < 1e-14));

    // RMSNorm: x = [3, 4], w = [1, 2], eps = 0 → rms = sqrt(12.5).
    let (mut out, mut rstd) = (vec![0.0; 2], vec![0.0; 1]);
    b.rmsnorm_fwd(&mut out, &mut rstd, &vec![3.0, 4.0], &vec![1.0, 2.0], 1, 2, 0.0);
    let rs = 1.0 / 12.5f64.sqrt();
    assert!((rstd[0] - rs).abs() < 1e-15 && (out[0] - 3.0 * rs).abs() < 1e-15 && (out[1] - 8.0 * rs).abs() < 1e-15);

    // Softmax rows sum to one, stable for large inputs.
    let mut o = vec![0.0f32; 6];
    Cpu::<f32>::new().softmax_fwd(&mut o, &vec![1000.0, 1000.0, 999.0, -5.0, 0.0, 5.0], 2, 3);
    assert!(o.iter().all(|v| v.is_finite()));
    assert!((o[0..3].iter().sum::<f32>() - 1.0).abs() < 1e-6 && (o[0] - o[1]).abs() < 1e-7);

    // BCE with logits: log(2) at x = 0; stable at |x| = 100.
    let mut l = vec![0.0; 3];
    b.bce_logits_fwd(&mut l, &vec![0.0, 100.0, -100.0], &vec![1.0, 0.0, 0.0], 3);
    assert!((l[0] - 2f64.ln()).abs() < 1e-15 && (l[1] - 100.0).abs() < 1e-12 && l[2] < 1e-40);
}

#[test]
fn matmul_cat_equals_one_matmul_per_weight_side_by_side() {
    let b = Cpu::<f64>::new();
    let (n, k, ms) = (6usize, 5usize, [3usize, 4]);
    let total: usize = ms.iter().sum();
    let mut r = rng(16);
    let x = uniform64(&mut r, n * k, 1.0);
    let ws: Vec<Vec<f64>> = ms.iter().map(|&m| uniform64(&mut r, m * k, 1.0)).collect();
    let mut out = vec![7.0; n * total + 3];
    b.matmul_fwd_cat(&mut out, &x, n, k, &[(&ws[0], ms[0]), (&ws[1], ms[1])]);
    let mut col = 0;
    for (w, &m) in ws.iter().zip(&ms) {
        let mut o = vec![0.0; n * m];
        b.matmul_fwd(&mut o, &x, w, n, k, m);
        for i in 0..n {
            assert_eq!(out[i * total + col..i * total + col + m], o[i * m..(i + 1) * m], "row {i}, weight at column {col}");
        }
        col += m;
    }
    assert_eq!(out[n * total..], [7.0; 3]);
    // Backward: dx overwritten (dx_set) with Σ dout_i · w_i, each dw accumulated.
    let dout = uniform64(&mut r, n * total, 1.0);
    let mut dx = vec![3.0; n * k];
    let mut dws: Vec<Vec<f64>> = ms.iter().map(|&m| vec![-1.0; m * k]).collect();
    let [dw0, dw1] = &mut dws[..] else { unreachable!() };
    b.matmul_bwd_cat(Some(&mut dx), true, &x, &dout, n, k, &mut [(dw0, &ws[0], ms[0]), (dw1, &ws[1], ms[1])]);
    let mut dx_ref = vec![0.0; n * k];
    let mut col = 0;
    for (i, (w, &m)) in ws.iter().zip(&ms).enumerate() {
        let d: Vec<f64> = (0..n).flat_map(|row| dout[row * total + col..row * total + col + m].to_vec()).collect();
        let mut dw_ref = vec![-1.0; m * k];
        b.matmul_bwd(Some(&mut dx_ref), &mut dw_ref, &d, &x, w, n, k, m);
        let err = dws[i].iter().zip(&dw_ref).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "dw of weight {i}: {err}");
        col += m;
    }
    let err = dx.iter().zip(&dx_ref).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(err < 1e-12, "dx: {err}");
}

/// `matmul_bwd_dx` is `matmul_bwd`'s dx alone: overwritten (over NaN garbage) or added to, bit
/// for bit; `matmul_bwd` without dx then gives the same weight gradient.
#[test]
fn matmul_bwd_dx_is_the_input_gradient_of_matmul_bwd() {
    let b = Cpu::<f32>::new();
    let (n, k, m) = (7usize, 5usize, 3usize);
    let mut r = rng(17);
    let (x, w, dout) = (uniform(&mut r, n * k, 1.0), uniform(&mut r, m * k, 1.0), uniform(&mut r, n * m, 1.0));
    let dx0 = uniform(&mut r, n * k, 1.0);
    let (mut dx_ref, mut dw_ref) = (dx0.clone(), vec![0.5; m * k]);
    b.matmul_bwd(Some(&mut dx_ref), &mut dw_ref, &dout, &x, &w, n, k, m);
    let mut dx = dx0.clone();
    b.matmul_bwd_dx(&mut dx, false, &dout, &w, n, k, m);
    assert_eq!(dx, dx_ref, "added");
    let mut dw = vec![0.5; m * k];
    b.matmul_bwd(None, &mut dw, &dout, &x, &w, n, k, m);
    assert_eq!(dw, dw_ref, "dw without dx");
    let mut set = vec![f32::NAN; n * k];
    b.matmul_bwd_dx(&mut set, true, &dout, &w, n, k, m);
    let mut from_zero = vec![0.0; n * k];
    b.matmul_bwd_dx(&mut from_zero, false, &dout, &w, n, k, m);
    assert_eq!(set, from_zero, "overwritten");
}

/// `swiglu_bwd_recompute` = `swiglu_fwd` + `swiglu_bwd_set`, bit for bit (the layer's MLP
/// backward relies on the recomputed output equalling the forward's).
#[test]
fn swiglu_bwd_recompute_writes_the_forward_output_and_the_set_gradient() {
    let b = Cpu::<f32>::new();
    let (rows, f) = (6usize, 10usize);
    let mut r = rng(18);
    let (gate_up, dout) = (uniform(&mut r, rows * 2 * f, 4.0), uniform(&mut r, rows * f, 1.0));
    let mut out_ref = vec![0.0; rows * f];
    b.swiglu_fwd(&mut out_ref, &gate_up, rows, f);
    let mut dgu_ref = vec![f32::NAN; rows * 2 * f];
    b.swiglu_bwd_set(&mut dgu_ref, &dout, &gate_up, rows, f);
    let (mut out, mut dgu) = (vec![f32::NAN; rows * f], vec![f32::NAN; rows * 2 * f]);
    b.swiglu_bwd_recompute(&mut dgu, &mut out, &dout, &gate_up, rows, f);
    assert_eq!(out, out_ref);
    assert_eq!(dgu, dgu_ref);
}

#[test]
fn copy_cols_writes_only_its_columns() {
    let b = Cpu::<f32>::new();
    let (rows, ld, col, cols) = (3usize, 7usize, 2usize, 4usize);
    let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    let mut dst = vec![-1.0f32; rows * ld];
    b.copy_cols(&mut dst, ld, col, &src, rows, cols);
    for r in 0..rows {
        for c in 0..ld {
            let want = if (col..col + cols).contains(&c) { src[r * cols + c - col] } else { -1.0 };
            assert_eq!(dst[r * ld + c], want, "row {r} column {c}");
        }
    }
}

#[test]
fn matmul_layout_and_prefix_semantics() {
    let b = Cpu::<f32>::new();
    let (n, k, m) = (5usize, 7usize, 3usize);
    let mut r = rng(6);
    let x = uniform(&mut r, n * k, 1.0);
    let w = uniform(&mut r, m * k, 1.0);
    // Buffers larger than needed: the tail must stay untouched.
    let mut out = vec![42.0f32; n * m + 5];
    b.matmul_fwd(&mut out, &x, &w, n, k, m);
    for i in 0..n {
        for j in 0..m {
            let e: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
            assert!((out[i * m + j] - e).abs() < 1e-5, "out[{i},{j}]");
        }
    }
    assert!(out[n * m..].iter().all(|&v| v == 42.0));
    // Backward accumulates: dx += dout·w, dw += doutᵀ·x.
    let dout = uniform(&mut r, n * m, 1.0);
    let mut dx = vec![1.0f32; n * k + 2];
    let mut dw = vec![-1.0f32; m * k + 2];
    b.matmul_bwd(Some(&mut dx), &mut dw, &dout, &x, &w, n, k, m);
    for i in 0..n {
        for t in 0..k {
            let e: f32 = 1.0 + (0..m).map(|j| dout[i * m + j] * w[j * k + t]).sum::<f32>();
            assert!((dx[i * k + t] - e).abs() < 1e-5);
        }
    }
    for j in 0..m {
        for t in 0..k {
            let e: f32 = -1.0 + (0..n).map(|i| dout[i * m + j] * x[i * k + t]).sum::<f32>();
            assert!((dw[j * k + t] - e).abs() < 1e-5);
        }
    }
    assert_eq!(dx[n * k..], [1.0, 1.0]);
    assert_eq!(dw[m * k..], [-1.0, -1.0]);
    // Degenerate sizes are no-ops (k = 0 gives zeros).
    let mut o = vec![5.0f32; 4];
    b.matmul_fwd(&mut o, &vec![], &vec![], 2, 0, 2);
    assert_eq!(o, vec![0.0; 4]);
    b.matmul_fwd(&mut o, &vec![], &vec![], 0, 3, 2);

    // Memory helpers.
    let mut buf = b.zeros(6);
    b.write_f32(&mut buf, &[1.0, 2.0]);
    let mut f = vec![0.0f32; 4];
    b.fill(&mut f, 3, 9.0);
    assert_eq!(f, vec![9.0, 9.0, 9.0, 0.0]);
    assert_eq!(b.to_f32_prefix(&buf, 3), vec![1.0, 2.0, 0.0]);
    let mut dst = vec![7.0f32; 4];
    b.copy(&mut dst, &buf, 2);
    assert_eq!(dst, vec![1.0, 2.0, 7.0, 7.0]);
    b.axpy(&mut dst, &vec![1.0; 4], 0.5, 3);
    b.scale(&mut dst, 2.0, 1);
    assert_eq!(dst, vec![3.0, 2.5, 7.5, 7.0]);
    assert_eq!(b.sum_squares(&dst, 2), 9.0 + 6.25);
    let mut idx = b.idx_from(&[1, 2, 3]);
    b.idx_write(&mut idx, &[9]);
    assert_eq!(b.idx_to_vec(&idx), vec![9, 2, 3]);
    assert_eq!(b.len(&buf), 6);
    // to_f64_prefix reads at the buffer's own precision (exact for f64).
    let b64 = Cpu::<f64>::new();
    let x = vec![0.1f64, 1.0 / 3.0, 7.0];
    assert_eq!(b64.to_f64_prefix(&x, 2), vec![0.1, 1.0 / 3.0]);
    assert_eq!(b.to_f64_prefix(&vec![0.1f32, 2.0], 1), vec![0.1f32 as f64]);
}

/// The device scalar block's layout is written twice, in Rust (`backend::opt_scalars`) and in
/// kernels/optim.cu (`OPT_*`): they must agree.
#[test]
fn opt_scalar_indices_match_the_kernels() {
    use mor_engine::backend::opt_scalars as o;
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda/kernels/optim.cu")).unwrap();
    let defined = |name: &str| -> usize {
        let line = src.lines().find(|l| l.split_whitespace().nth(1) == Some(name)).unwrap_or_else(|| panic!("#define {name} missing"));
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    for (name, index) in [
        ("OPT_GSCALE", o::GSCALE),
        ("OPT_FINITE", o::FINITE),
        ("OPT_NORM_HI", o::NORM_HI),
        ("OPT_NORM_LO", o::NORM_LO),
        ("OPT_CLIPPED", o::CLIPPED),
        ("OPT_LR", o::LR),
        ("OPT_STEP_SIZE", o::STEP_SIZE),
        ("OPT_BC2_SQRT", o::BC2_SQRT),
        ("OPT_OB1", o::OB1),
        ("OPT_OB2", o::OB2),
    ] {
        assert_eq!(defined(name), index, "{name}");
    }
    const { assert!(o::CLIP_LEN == o::CLIPPED + 1 && o::LEN == o::OB2 + 1 && o::STEP < o::LEN) };
}

/// Every kernel the CUDA backend loads by name at start-up (`KERNELS` in cuda/mod.rs) is an
/// `extern "C"` kernel of the sources (a missing one fails only on a GPU, at start-up).
#[test]
fn cuda_kernel_names_exist_in_the_sources() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda");
    let rust = std::fs::read_to_string(format!("{dir}/mod.rs")).unwrap();
    let list = rust.split("const KERNELS: &[&str] = &[").nth(1).expect("the KERNELS list").split("];").next().unwrap();
    let names: Vec<&str> = list.split('"').skip(1).step_by(2).collect();
    assert!(names.len() > 50, "{} names", names.len());
    let mut cuda = String::new();
    for f in std::fs::read_dir(format!("{dir}/kernels")).unwrap() {
        cuda += &std::fs::read_to_string(f.unwrap().path()).unwrap();
    }
    // Kernel names as written after `void`: literal, or templates of instantiation macros whose
    // `##PARAM##` pieces stand for identifier characters (`rmsnorm_fwd_v##V##_f32`).
    let templates: Vec<Vec<&str>> = cuda
        .split("__global__")
        .skip(1)
        .filter_map(|k| {
            let after = k.split_once("void")?.1.trim_start();
            // `__launch_bounds__(...)` may stand between `void` and the name.
            let after = match after.strip_prefix("__launch_bounds__(") {
                Some(rest) => rest.split_once(')')?.1,
                None => after,
            };
            after.split('(').next()
        })
        .map(|name| name.trim_start_matches(|c: char| c.is_whitespace() || c == '\\').trim().split("##").collect())
        .collect();
    // Template pieces alternate literal, parameter, literal, ... (a parameter: one or more
    // identifier characters).
    fn matches(pieces: &[&str], name: &str) -> bool {
        let Some((lit, rest)) = pieces.split_first() else { return name.is_empty() };
        let Some(tail) = name.strip_prefix(lit) else { return false };
        let Some((_, after)) = rest.split_first() else { return tail.is_empty() };
        (1..=tail.len()).take_while(|&i| tail.as_bytes()[i - 1].is_ascii_alphanumeric() || tail.as_bytes()[i - 1] == b'_').any(|i| matches(after, &tail[i..]))
    }
    let defined = |name: &str| templates.iter().any(|t| matches(t, name));
    let missing: Vec<&&str> = names.iter().filter(|n| !defined(n)).collect();
    assert!(missing.is_empty(), "kernels listed but not defined: {missing:?}");
}
