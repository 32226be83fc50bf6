//! AdamW: PyTorch-exact update on a toy, decay only where `decay == true`, clipping, groups,
//! LR multiplier, state save/restore.

mod common;
use common::*;
use mor_engine::{Backend, ParamStore};
use mor_engine::ParamGroup::{AuxRouter, Main};
use mor_train::optim::{AdamW, AdamWConfig};

fn cfg(weight_decay: f64, grad_clip: f64) -> AdamWConfig {
    AdamWConfig { weight_decay, grad_clip, ..AdamWConfig::default() }
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

/// Reference values: `torch.optim.AdamW` (`_single_tensor_adamw`: `p *= 1 - lr*wd`;
/// `m.lerp_(g, 1-β1)`; `v = β2 v + (1-β2) g²`; `p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + ε)`)
/// evaluated by hand in float64 for lr 0.01, β (0.9, 0.95), ε 1e-8; `w` has wd 0.1, `n` none.
#[test]
fn matches_pytorch_adamw_three_steps() {
    let b = backend();
    let mut ps = store(&b, &[("w", &[2], true, Main, &[1.0, -2.0]), ("n", &[1], false, Main, &[0.5])]);
    let mut opt = AdamW::new(&b, &ps, Main, cfg(0.1, 0.0));
    let grads: [([f32; 2], [f32; 1]); 3] = [([0.1, -0.3], [0.2]), ([-0.05, 0.4], [0.0]), ([0.02, 0.01], [-0.7])];
    let want_w = [
        [0.9890000009999999, -1.9880000003333334],
        [0.9853273068602668, -1.987940330060924],
        [0.9811291292455975, -1.9875909657862265],
    ];
    let want_n = [0.4900000005, 0.4832135235180417, 0.4878361803076613];
    for (t, (gw, gn)) in grads.iter().enumerate() {
        set_grad(&b, &mut ps, "w", gw);
        set_grad(&b, &mut ps, "n", gn);
        let stats = opt.step(&b, &mut ps, 0.01);
        assert!(!stats.skipped && !stats.clipped);
        assert_eq!(stats.lr, 0.01);
        assert_eq!(opt.steps_taken(), t as u64 + 1);
        assert_close(&value(&b, &ps, "w"), &want_w[t], 2e-6, &format!("w after step {}", t + 1));
        assert_close(&value(&b, &ps, "n"), &[want_n[t]], 2e-6, &format!("n after step {}", t + 1));
    }
    // Moments after three steps.
    let st = opt.state_tensors(&b, &ps);
    let names: Vec<&str> = st.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["w.exp_avg", "w.exp_avg_sq", "n.exp_avg", "n.exp_avg_sq"]);
    assert_close(&st[0].data, &[0.0056, 0.0127], 1e-7, "m(w)");
    assert_close(&st[1].data, &[0.00059, 0.01166625], 1e-8, "v(w)");
    assert_close(&st[2].data, &[-0.0538], 1e-7, "m(n)");
    assert_close(&st[3].data, &[0.026305], 1e-7, "v(n)");
}

#[test]
fn weight_decay_only_on_decay_tensors() {
    let b = backend();
    let mut ps = store(&b, &[("mat", &[2, 2], true, Main, &[1.0, -2.0, 3.0, 0.5]), ("norm", &[2], false, Main, &[1.0, 0.25])]);
    let mut opt = AdamW::new(&b, &ps, Main, cfg(0.1, 1.0));
    // Zero gradients: the Adam part is exactly 0, only decoupled decay moves weights.
    let before_norm = value(&b, &ps, "norm");
    let stats = opt.step(&b, &mut ps, 0.1);
    assert_eq!(stats.grad_norm, 0.0);
    assert_close(&value(&b, &ps, "mat"), &[0.99, -1.98, 2.97, 0.495], 1e-6, "decayed");
    assert_eq!(value(&b, &ps, "norm"), before_norm, "norm weights must not decay (bit-exact)");
}

#[test]
fn clipping_scales_group_grads_and_reports_preclip_norm() {
    let b = backend();
    let mut ps = store(&b, &[("a", &[2], true, Main, &[0.0, 0.0]), ("c", &[1], true, Main, &[0.0]), ("r", &[1], true, AuxRouter, &[0.0])]);
    let opt = AdamW::new(&b, &ps, Main, cfg(0.1, 1.0));
    set_grad(&b, &mut ps, "a", &[3.0, 0.0]);
    set_grad(&b, &mut ps, "c", &[-4.0]);
    set_grad(&b, &mut ps, "r", &[100.0]); // other group: not part of the main norm, untouched
    assert!((opt.grad_norm(&b, &ps) - 5.0).abs() < 1e-12);
    let (norm, clipped) = opt.clip_grad_norm(&b, &mut ps);
    assert!((norm - 5.0).abs() < 1e-12 && clipped);
    let coef = 1.0 / (5.0 + 1e-6);
    assert_close(&grad(&b, &ps, "a"), &[3.0 * coef, 0.0], 1e-6, "clipped a");
    assert_close(&grad(&b, &ps, "c"), &[-4.0 * coef], 1e-6, "clipped c");
    assert_eq!(grad(&b, &ps, "r"), vec![100.0]);
    assert!((opt.grad_norm(&b, &ps) - 1.0).abs() < 1e-5);

    // Below the threshold: untouched.
    set_grad(&b, &mut ps, "a", &[0.3, 0.0]);
    set_grad(&b, &mut ps, "c", &[-0.4]);
    let (norm, clipped) = opt.clip_grad_norm(&b, &mut ps);
    assert!((norm - 0.5).abs() < 1e-6 && !clipped);
    assert_eq!(grad(&b, &ps, "a"), vec![0.3, 0.0]);

    // grad_clip 0 disables clipping.
    let off = AdamW::new(&b, &ps, Main, cfg(0.1, 0.0));
    set_grad(&b, &mut ps, "a", &[30.0, 40.0]);
    let (norm, clipped) = off.clip_grad_norm(&b, &mut ps);
    assert!((norm - (2500.0f64 + 0.16).sqrt()).abs() < 1e-4 && !clipped);
    assert_eq!(grad(&b, &ps, "a"), vec![30.0, 40.0]);
}

#[test]
fn step_clips_before_update() {
    // With clipping, the moments see the clipped gradient: m = (1-β1) * g_clipped.
    let b = backend();
    let mut ps = store(&b, &[("a", &[2], false, Main, &[0.0, 0.0])]);
    let mut opt = AdamW::new(&b, &ps, Main, cfg(0.0, 1.0));
    set_grad(&b, &mut ps, "a", &[6.0, 8.0]);
    let stats = opt.step(&b, &mut ps, 1e-3);
    assert!((stats.grad_norm - 10.0).abs() < 1e-9 && stats.clipped);
    let st = opt.state_tensors(&b, &ps);
    assert_close(&st[0].data, &[0.1 * 0.6, 0.1 * 0.8], 1e-6, "m from clipped grads");
}

#[test]
fn step_equals_clip_in_place_then_per_tensor_adamw_and_leaves_grads_unclipped() {
    // `step` folds the clipping coefficient into one adamw_many; the update must be the one of
    // the old path (clip_grad_norm scaling the gradients in place, then adamw per tensor) bit for
    // bit, so runs and checkpoints resume exactly as before, and the gradients stay unclipped.
    let b = backend();
    let specs: Vec<(String, Vec<usize>, bool, mor_engine::ParamGroup)> = vec![
        ("emb".into(), vec![50, 3], true, Main),
        ("norm".into(), vec![3], false, Main),
        ("router".into(), vec![3], false, AuxRouter),
        ("w".into(), vec![7, 5], true, Main),
        ("tiny".into(), vec![1], false, Main),
    ];
    let init: Vec<Vec<f32>> = specs.iter().enumerate().map(|(k, s)| pseudo_random(s.1.iter().product(), 1 + k as u32)).collect();
    let mk = || {
        let sp: Vec<Spec<'_>> = specs.iter().zip(&init).map(|(s, v)| (s.0.as_str(), s.1.as_slice(), s.2, s.3, v.as_slice())).collect();
        store(&b, &sp)
    };
    let (mut ps, mut old) = (mk(), mk());
    let c = AdamWConfig::default();
    let mut opt = AdamW::new(&b, &ps, Main, c);
    let clip = AdamW::new(&b, &old, Main, c); // the old path: clip_grad_norm, then adamw per tensor
    let ids = opt.param_ids().to_vec();
    let mut moments: Vec<(Vec<f32>, Vec<f32>)> = ids.iter().map(|id| (vec![0.0; old.info[id.0].numel()], vec![0.0; old.info[id.0].numel()])).collect();
    // Gradient scales: clipped (norm >> 1), not clipped (norm < 1), clipped.
    for (t, amp) in [(0u32, 3.0f32), (1, 0.01), (2, 0.7)] {
        for (k, (name, shape, ..)) in specs.iter().enumerate() {
            let g: Vec<f32> = pseudo_random(shape.iter().product(), 100 + 10 * t + k as u32).iter().map(|x| x * amp).collect();
            set_grad(&b, &mut ps, name, &g);
            set_grad(&b, &mut old, name, &g);
        }
        let grads_before = ps.grads.clone();
        let stats = opt.step(&b, &mut ps, 1e-2);
        assert_eq!(stats.clipped, t != 1, "step {t}");

        let (norm, clipped) = clip.clip_grad_norm(&b, &mut old);
        assert_eq!((norm, clipped), (stats.grad_norm, stats.clipped));
        let ParamStore { info, values, grads } = &mut old;
        for (id, (m, v)) in ids.iter().zip(moments.iter_mut()) {
            let wd = if info[id.0].decay { c.weight_decay as f32 } else { 0.0 };
            let hp = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
            b.adamw(&mut values[id.0], &grads[id.0], m, v, info[id.0].numel(), 1e-2, hp.0, hp.1, hp.2, wd, t as u64 + 1);
        }

        assert_eq!(ps.values, old.values, "parameters after step {t}");
        let st = opt.state_tensors(&b, &ps);
        for (k, (m, v)) in moments.iter().enumerate() {
            assert_eq!((&st[2 * k].data, &st[2 * k + 1].data), (m, v), "moments of tensor {k} after step {t}");
        }
        assert_eq!(ps.grads, grads_before, "step must leave the gradients unclipped");
    }
    // zero_grads of a group zeroes that group only; ParamStore::zero_grads all.
    opt.zero_grads(&b, &mut ps);
    assert_eq!(grad(&b, &ps, "router"), pseudo_random(3, 100 + 20 + 2).iter().map(|x| x * 0.7).collect::<Vec<_>>());
    assert!(["emb", "norm", "w", "tiny"].iter().all(|n| grad(&b, &ps, n).iter().all(|&x| x == 0.0)));
    ps.zero_grads(&b);
    assert!(ps.grads.iter().all(|g| g.iter().all(|&x| x == 0.0)));
}

#[test]
fn groups_are_separate_and_aux_gets_lr_mult() {
    let b = backend();
    let mut ps = store(&b, &[("w", &[1], true, Main, &[1.0]), ("router", &[1], false, AuxRouter, &[1.0])]);
    let mut main = AdamW::new(&b, &ps, Main, cfg(0.0, 1.0));
    let mut aux = AdamW::new(&b, &ps, AuxRouter, cfg(0.0, 1.0).with_lr_mult(10.0));
    assert_eq!(main.param_ids(), &[id(&ps, "w")]);
    assert_eq!(aux.param_ids(), &[id(&ps, "router")]);
    set_grad(&b, &mut ps, "w", &[0.5]);
    set_grad(&b, &mut ps, "router", &[0.5]);
    let s1 = main.step(&b, &mut ps, 1e-3);
    let s2 = aux.step(&b, &mut ps, 1e-3);
    assert_eq!(s1.lr, 1e-3);
    assert!((s2.lr - 1e-2).abs() < 1e-15);
    // First Adam step moves by ≈ lr·sign(g).
    assert_close(&value(&b, &ps, "w"), &[1.0 - 1e-3], 1e-6, "main");
    assert_close(&value(&b, &ps, "router"), &[1.0 - 1e-2], 1e-6, "aux");
}

#[test]
fn nonfinite_gradient_skips_step() {
    let b = backend();
    let mut ps = store(&b, &[("w", &[2], true, Main, &[1.0, 2.0])]);
    let mut opt = AdamW::new(&b, &ps, Main, AdamWConfig::default());
    set_grad(&b, &mut ps, "w", &[f32::NAN, 1.0]);
    let stats = opt.step(&b, &mut ps, 1e-3);
    assert!(stats.skipped && stats.grad_norm.is_nan());
    assert_eq!(opt.steps_taken(), 0);
    assert_eq!(value(&b, &ps, "w"), vec![1.0, 2.0]);
}

#[test]
fn state_round_trip_and_validation() {
    let b = backend();
    let init = pseudo_random(6, 1);
    let mut ps = store(&b, &[("x", &[2, 3], true, Main, &init), ("y", &[3], false, Main, &init[..3])]);
    let mut opt = AdamW::new(&b, &ps, Main, AdamWConfig::default());
    for t in 0..3 {
        set_grad(&b, &mut ps, "x", &pseudo_random(6, 10 + t));
        set_grad(&b, &mut ps, "y", &pseudo_random(3, 20 + t));
        opt.step(&b, &mut ps, 1e-2);
    }
    let saved = opt.state_tensors(&b, &ps);
    let mut fresh = AdamW::new(&b, &ps, Main, AdamWConfig::default());
    fresh.load_state(&b, &ps, opt.steps_taken(), &saved).unwrap();
    assert_eq!(fresh.steps_taken(), 3);
    assert_eq!(fresh.state_tensors(&b, &ps), saved);

    // Same next step from both → identical parameters.
    let vals = (value(&b, &ps, "x"), value(&b, &ps, "y"));
    set_grad(&b, &mut ps, "x", &pseudo_random(6, 99));
    set_grad(&b, &mut ps, "y", &pseudo_random(3, 98));
    opt.step(&b, &mut ps, 1e-2);
    let after_a = (value(&b, &ps, "x"), value(&b, &ps, "y"));
    let (ix, iy) = (id(&ps, "x").0, id(&ps, "y").0);
    b.write_f32(&mut ps.values[ix], &vals.0);
    b.write_f32(&mut ps.values[iy], &vals.1);
    // (`step` leaves the gradients unclipped; set them again all the same.)
    set_grad(&b, &mut ps, "x", &pseudo_random(6, 99));
    set_grad(&b, &mut ps, "y", &pseudo_random(3, 98));
    fresh.step(&b, &mut ps, 1e-2);
    assert_eq!((value(&b, &ps, "x"), value(&b, &ps, "y")), after_a);

    // Missing tensor / wrong shape / extra tensor → error naming it, nothing changed.
    let mut broken = saved.clone();
    broken.retain(|t| t.name != "y.exp_avg_sq");
    let err = fresh.load_state(&b, &ps, 7, &broken).unwrap_err().to_string();
    assert!(err.contains("y.exp_avg_sq") && err.contains("missing"), "{err}");
    assert_eq!(fresh.steps_taken(), 4);
    let mut broken = saved.clone();
    broken[0].shape = vec![3, 2];
    let err = fresh.load_state(&b, &ps, 7, &broken).unwrap_err().to_string();
    assert!(err.contains("x.exp_avg") && err.contains("shape"), "{err}");
    let mut broken = saved.clone();
    broken.push(mor_train::NamedTensor { name: "z.exp_avg".into(), shape: vec![1], data: vec![0.0] });
    let err = fresh.load_state(&b, &ps, 7, &broken).unwrap_err().to_string();
    assert!(err.contains("z.exp_avg") && err.contains("unexpected"), "{err}");
}

#[test]
fn config_from_train_config() {
    let tc: mor_config::TrainConfig =
        serde_json::from_value(serde_json::json!({ "seq_len": 16, "micro_batch": 1, "steps": 10 })).unwrap();
    let c = AdamWConfig::from_train(&tc);
    assert_eq!((c.beta1, c.beta2, c.eps, c.weight_decay, c.grad_clip, c.lr_mult), (0.9, 0.95, 1e-8, 0.1, 1.0, 1.0));
}

/// `stage` + `update` + `finish` (the device-scalar step a CUDA graph records) equals `step`
/// bit for bit: clipped, unclipped, no clipping configured, the aux group's LR multiplier, and a
/// non-finite gradient with and without skipping.
#[test]
fn staged_step_equals_step() {
    let b = backend();
    let specs: [Spec<'_>; 4] = [
        ("emb", &[50, 3], true, Main, &[0.5; 150]),
        ("norm", &[3], false, Main, &[1.0; 3]),
        ("router", &[3], false, AuxRouter, &[0.2; 3]),
        ("w", &[7, 5], true, Main, &[-0.3; 35]),
    ];
    for (grad_clip, lr_mult, skip) in [(1.0, 1.0, true), (0.0, 1.0, true), (1.0, 10.0, true), (1.0, 1.0, false)] {
        let c = AdamWConfig { grad_clip, lr_mult, skip_nonfinite: skip, weight_decay: 0.1, ..AdamWConfig::default() };
        let (mut pa, mut pb) = (store(&b, &specs), store(&b, &specs));
        let group = if lr_mult == 1.0 { Main } else { AuxRouter };
        let (mut oa, mut ob) = (AdamW::new(&b, &pa, group, c), AdamW::new(&b, &pb, group, c));
        // Gradient scales: clipped (norm >> 1), not clipped, non-finite, clipped again.
        for (t, amp) in [(0u32, 3.0f32), (1, 0.01), (2, f32::NAN), (3, 0.7)] {
            for (k, (name, shape, ..)) in specs.iter().enumerate() {
                let mut g: Vec<f32> = pseudo_random(shape.iter().product(), 100 + 10 * t + k as u32).iter().map(|x| x * amp.min(1e3)).collect();
                if amp.is_nan() && k == 0 {
                    g[1] = f32::NAN;
                }
                set_grad(&b, &mut pa, name, &g);
                set_grad(&b, &mut pb, name, &g);
            }
            let lr = 1e-2 * (t + 1) as f64;
            let sa = oa.step(&b, &mut pa, lr);
            ob.stage(&b, lr);
            ob.update(&b, &mut pb);
            let sb = ob.finish(&b);
            let at = format!("grad_clip {grad_clip}, lr_mult {lr_mult}, skip {skip}, step {t}");
            assert_eq!((sa.clipped, sa.skipped, sa.lr), (sb.clipped, sb.skipped, sb.lr), "{at}");
            let same_norm = sa.grad_norm == sb.grad_norm || (sa.grad_norm.is_nan() && sb.grad_norm.is_nan()) || (sa.grad_norm - sb.grad_norm).abs() <= 1e-12 * sa.grad_norm.abs();
            assert!(same_norm, "{at}: norm {} vs {}", sa.grad_norm, sb.grad_norm);
            assert_eq!(oa.steps_taken(), ob.steps_taken(), "{at}");
            let bits = |ps: &ParamStore<B>| ps.values.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&pa), bits(&pb), "{at}: parameters");
            let (ta, tb) = (oa.state_tensors(&b, &pa), ob.state_tensors(&b, &pb));
            for (x, y) in ta.iter().zip(&tb) {
                assert_eq!(x.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), y.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{at}: {}", x.name);
            }
        }
    }
}

/// The optimizer runner: eager it is `step`; with graphs its first step runs the staged update
/// eagerly (bit-identical), the second records, which the CPU refuses with its reason.
#[test]
fn optimizer_runner_first_step_is_eager_and_the_cpu_cannot_record() {
    let b = backend();
    let specs: [Spec<'_>; 2] = [("w", &[7, 5], true, Main, &[-0.3; 35]), ("r", &[3], false, AuxRouter, &[0.2; 3])];
    let (mut pa, mut pb) = (store(&b, &specs), store(&b, &specs));
    let c = AdamWConfig { grad_clip: 0.5, ..AdamWConfig::default() };
    let (mut ma, mut mb) = (AdamW::new(&b, &pa, Main, c), AdamW::new(&b, &pb, Main, c));
    let aux_c = c.with_lr_mult(10.0);
    let (mut aa, mut ab) = (AdamW::new(&b, &pa, AuxRouter, aux_c), AdamW::new(&b, &pb, AuxRouter, aux_c));
    for (name, shape, ..) in specs.iter() {
        let g = pseudo_random(shape.iter().product(), 7);
        set_grad(&b, &mut pa, name, &g);
        set_grad(&b, &mut pb, name, &g);
    }
    let mut runner = mor_train::OptimizerRunner::new(true);
    let (sa, xa) = (ma.step(&b, &mut pa, 1e-2), aa.step(&b, &mut pa, 1e-2));
    let (sb, xb) = runner.step(&b, &mut pb, &mut mb, Some(&mut ab), 1e-2).unwrap();
    assert_eq!((sa.clipped, sa.lr, xa.lr), (sb.clipped, sb.lr, xb.unwrap().lr));
    assert_eq!(pa.values, pb.values);
    let err = runner.step(&b, &mut pb, &mut mb, Some(&mut ab), 1e-2).expect_err("the CPU records no graphs");
    assert!(format!("{err:#}").contains("cannot capture device work"), "{err:#}");
}
