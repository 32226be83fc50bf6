//! Learning-rate schedules: MOR_SPEC invariant 25 (WSD) and the cosine / constant endpoints.

use mor_config::{Schedule, TrainConfig};
use mor_train::schedule::{wsd_decay_steps, LrSchedule};
use serde_json::json;

fn train_cfg(extra: serde_json::Value) -> TrainConfig {
    let mut v = json!({ "seq_len": 2048, "micro_batch": 16, "steps": 9438 });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::from_value(v).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1e-300) + 1e-18
}

#[test]
fn wsd_decay_rounding_matches_released_configs() {
    // 0.2 * 9438 = 1887.6: the configs use 1888 (nearest), not 1887 (truncation).
    assert_eq!(wsd_decay_steps(9438, 0.2), 1888);
    assert_eq!(wsd_decay_steps(14161, 0.2), 2832); // 2832.2
    assert_eq!(wsd_decay_steps(12619, 0.2), 2524); // 2523.8
    assert_eq!(wsd_decay_steps(10, 0.0), 0);
    assert_eq!(wsd_decay_steps(10, 1.0), 10);
}

#[test]
fn wsd_invariant_25_vanilla_360m() {
    let cfg = train_cfg(json!({ "warmup_steps": 57 }));
    assert_eq!(cfg.schedule, Schedule::Wsd);
    let s = LrSchedule::from_config(&cfg);
    let (w, d) = (57usize, 1888usize);
    assert_eq!((s.warmup_steps, s.decay_steps, s.total_steps), (w, d, 9438));
    assert_eq!(s.stable_steps(), 9438 - w - d);
    let stable = s.stable_steps();
    assert_eq!(s.decay_start(), Some(w + stable));

    // Warm-up: s / W, the very first update uses LR 0.
    assert_eq!(s.lr(0), 0.0);
    assert!(close(s.factor(1), 1.0 / 57.0));
    assert!(close(s.factor(56), 56.0 / 57.0));
    // Stable: exactly the peak.
    assert_eq!(s.lr(w), 3e-3);
    assert_eq!(s.lr(w + stable - 1), 3e-3);
    // Decay: 1 - (s - W - S) / D; the first decay index still has factor 1.
    assert_eq!(s.factor(w + stable), 1.0);
    assert!(close(s.factor(w + stable + 1), 1.0 - 1.0 / d as f64));
    assert!(close(s.factor(w + stable + d / 2), 0.5));
    // Last update (index total-1) uses 3e-3 / D, not 0.
    assert!(close(s.lr(9437), 3e-3 / 1888.0), "{}", s.lr(9437));
    assert!(s.lr(9437) > 0.0);
    // Past the end: 0.
    assert_eq!(s.lr(9438), 0.0);
    assert_eq!(s.lr(20_000), 0.0);

    // Shape: increasing during warm-up, flat, then strictly decreasing.
    for i in 1..w {
        assert!(s.factor(i) > s.factor(i - 1));
    }
    for i in (w + stable + 1)..9438 {
        assert!(s.factor(i) < s.factor(i - 1));
    }
}

#[test]
fn wsd_mor_360m_warmup_86() {
    let cfg = train_cfg(json!({ "steps": 14161, "warmup_steps": 86 }));
    let s = LrSchedule::from_config(&cfg);
    assert_eq!(s.decay_steps, 2832);
    assert_eq!(s.stable_steps(), 14161 - 86 - 2832);
    assert_eq!(s.factor(0), 0.0);
    assert!(close(s.factor(43), 0.5));
    assert_eq!(s.factor(86), 1.0);
    assert!(close(s.lr(14160), 3e-3 / 2832.0));
}

#[test]
fn wsd_short_run_clamps_decay() {
    // W + D > total: decay shortened so that S = 0 and the schedule still ends at the last step.
    let s = LrSchedule::wsd(1.0, 10, 8, 0.5);
    assert_eq!((s.warmup_steps, s.stable_steps(), s.decay_steps), (8, 0, 2));
    assert_eq!(s.factor(8), 1.0);
    assert_eq!(s.factor(9), 0.5);
    assert_eq!(s.factor(10), 0.0);
}

#[test]
fn cosine_endpoints() {
    let cfg = train_cfg(json!({ "schedule": "cosine", "steps": 1000, "warmup_steps": 100, "min_lr_ratio": 0.1, "lr": 1e-3 }));
    let s = LrSchedule::from_config(&cfg);
    assert_eq!(s.kind, Schedule::Cosine);
    assert_eq!(s.lr(0), 0.0);
    assert!(close(s.factor(50), 0.5));
    assert_eq!(s.factor(100), 1.0);
    assert!(close(s.factor(550), 0.55)); // half-way: (1 + min) / 2
    assert!(close(s.factor(1000), 0.1));
    assert!(close(s.factor(5000), 0.1)); // stays at the floor, never rises again
    assert!(s.factor(999) > 0.1 && s.factor(999) < 0.1001);
    for i in 101..=1000 {
        assert!(s.factor(i) <= s.factor(i - 1));
    }
    // min_lr_ratio 0 ends at exactly 0.
    let z = LrSchedule::cosine(1.0, 1000, 0, 0.0);
    assert_eq!(z.factor(0), 1.0);
    assert!(z.factor(1000).abs() < 1e-15);
}

#[test]
fn constant_with_warmup() {
    let cfg = train_cfg(json!({ "schedule": "constant", "steps": 100, "warmup_steps": 10, "lr": 2e-4 }));
    let s = LrSchedule::from_config(&cfg);
    assert_eq!(s.lr(0), 0.0);
    assert!(close(s.lr(5), 1e-4));
    for i in 10..200 {
        assert_eq!(s.lr(i), 2e-4);
    }
    // No warm-up: full LR from the first update.
    assert_eq!(LrSchedule::constant(1.0, 10, 0).factor(0), 1.0);
}
