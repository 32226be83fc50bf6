//! Learning-rate schedules (MOR_SPEC 7.2 and invariant 25).
//!
//! A schedule maps the **0-based optimizer step index** `s` (the index of the update about to be
//! applied; it advances once per optimizer step, not per micro-batch) to a factor in `[0, 1]`;
//! the learning rate of that update is `peak_lr * factor(s)`. This is how Hugging Face's
//! `LambdaLR`-based schedulers behave: the first update uses `factor(0)`, and
//! `scheduler.step()` after each optimizer step moves to the next index.
//!
//! ```
//! use mor_train::schedule::LrSchedule;
//! let sched = LrSchedule::wsd(3e-3, 9438, 57, 0.2);
//! assert_eq!(sched.decay_steps, 1888);
//! assert_eq!(sched.lr(0), 0.0);                    // the very first update uses LR 0
//! assert_eq!(sched.lr(57), 3e-3);                  // stable phase
//! assert!((sched.lr(9437) - 3e-3 / 1888.0).abs() < 1e-15); // last update: 3e-3 / D, not 0
//! ```

use mor_config::{Schedule, TrainConfig};

/// A learning-rate schedule; build it with [`LrSchedule::from_config`] or one of the
/// constructors, then ask [`LrSchedule::lr`] for each optimizer step index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: Schedule,
    /// Peak learning rate (`train.lr`).
    pub peak_lr: f64,
    /// Total number of optimizer steps of the run (`train.steps`).
    pub total_steps: usize,
    /// `W`: linear warm-up from 0 over this many steps (all schedules).
    pub warmup_steps: usize,
    /// `D`: WSD linear cool-down length (0 for the other schedules). See [`wsd_decay_steps`].
    pub decay_steps: usize,
    /// Cosine: final factor (`train.min_lr_ratio`). Unused by WSD (always decays to 0, as the
    /// released configs) and by constant.
    pub min_lr_ratio: f64,
}

/// WSD cool-down length `D` for `total` steps: `round(decay_fraction * total)`, rounding to the
/// nearest integer (halves away from zero). This reproduces the released configs, e.g.
/// `0.2 * 9438 = 1887.6 -> 1888` (truncation would give 1887). Clamped to `total`.
pub fn wsd_decay_steps(total: usize, decay_fraction: f64) -> usize {
    let d = (decay_fraction * total as f64).round();
    if d <= 0.0 {
        0
    } else {
        (d as usize).min(total)
    }
}

impl LrSchedule {
    /// The schedule a [`TrainConfig`] describes (`schedule`, `lr`, `steps`, `warmup_steps`,
    /// `decay_fraction`, `min_lr_ratio`).
    pub fn from_config(cfg: &TrainConfig) -> Self {
        match cfg.schedule {
            Schedule::Wsd => Self::wsd(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.decay_fraction),
            Schedule::Cosine => Self::cosine(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio),
            Schedule::Constant => Self::constant(cfg.lr, cfg.steps, cfg.warmup_steps),
        }
    }

    /// Warmup–stable–decay (HF `warmup_stable_decay`, linear warm-up, linear decay,
    /// `min_lr_ratio 0`), MOR_SPEC invariant 25:
    /// `s/W` for `s < W`; 1 for `W <= s < W+S`; `1 - (s-W-S)/D` for `W+S <= s < W+S+D`; 0 after,
    /// with `D = wsd_decay_steps(total, decay_fraction)` and `S = total - W - D`.
    /// If `W + D > total`, `D` is shortened to `total - W` (so `S = 0`).
    pub fn wsd(peak_lr: f64, total_steps: usize, warmup_steps: usize, decay_fraction: f64) -> Self {
        let warmup_steps = warmup_steps.min(total_steps);
        let decay_steps = wsd_decay_steps(total_steps, decay_fraction).min(total_steps - warmup_steps);
        LrSchedule {
            kind: Schedule::Wsd,
            peak_lr,
            total_steps,
            warmup_steps,
            decay_steps,
            min_lr_ratio: 0.0,
        }
    }

    /// Linear warm-up over `W` steps, then half-cosine from 1 at `s = W` to `min_lr_ratio` at
    /// `s = total` (HF `cosine_with_min_lr`, one half cycle); stays at `min_lr_ratio` after.
    pub fn cosine(peak_lr: f64, total_steps: usize, warmup_steps: usize, min_lr_ratio: f64) -> Self {
        LrSchedule {
            kind: Schedule::Cosine,
            peak_lr,
            total_steps,
            warmup_steps: warmup_steps.min(total_steps),
            decay_steps: 0,
            min_lr_ratio,
        }
    }

    /// Linear warm-up over `W` steps, then constant 1 (HF `constant_with_warmup`).
    pub fn constant(peak_lr: f64, total_steps: usize, warmup_steps: usize) -> Self {
        LrSchedule {
            kind: Schedule::Constant,
            peak_lr,
            total_steps,
            warmup_steps: warmup_steps.min(total_steps),
            decay_steps: 0,
            min_lr_ratio: 0.0,
        }
    }

    /// WSD stable length `S = total - W - D` (0 for other schedules).
    pub fn stable_steps(&self) -> usize {
        match self.kind {
            Schedule::Wsd => self.total_steps - self.warmup_steps - self.decay_steps,
            _ => 0,
        }
    }

    /// Step index at which the WSD cool-down starts (`W + S`); `None` for other schedules.
    /// Weights saved just before this index are the "stable-phase" weights of MOR_SPEC 7.2.
    pub fn decay_start(&self) -> Option<usize> {
        match self.kind {
            Schedule::Wsd => Some(self.warmup_steps + self.stable_steps()),
            _ => None,
        }
    }

    /// The first step index whose factor depends on `total_steps` (WSD: the cool-down start;
    /// cosine: the end of warm-up; constant: never, so `total_steps`). Changing the total before
    /// this index (keeping it at least the warm-up) changes no LR already used: that is what lets
    /// a time-limited run fit its schedule to the steps that fit in the time.
    pub fn total_independent_until(&self) -> usize {
        match self.kind {
            Schedule::Wsd => self.warmup_steps + self.stable_steps(),
            Schedule::Cosine => self.warmup_steps,
            Schedule::Constant => self.total_steps,
        }
    }

    /// LR factor of the update with 0-based optimizer step index `s`.
    pub fn factor(&self, s: usize) -> f64 {
        let w = self.warmup_steps;
        if s < w {
            return s as f64 / w as f64;
        }
        match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Wsd => {
                let p = w + self.stable_steps();
                if s < p {
                    1.0
                } else if s < p + self.decay_steps {
                    1.0 - (s - p) as f64 / self.decay_steps as f64
                } else {
                    0.0
                }
            }
            Schedule::Cosine => {
                let span = self.total_steps.saturating_sub(w).max(1);
                let progress = ((s - w) as f64 / span as f64).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                (cos * (1.0 - self.min_lr_ratio) + self.min_lr_ratio).max(0.0)
            }
        }
    }

    /// Learning rate of the update with 0-based optimizer step index `s`: `peak_lr * factor(s)`.
    pub fn lr(&self, s: usize) -> f64 {
        self.peak_lr * self.factor(s)
    }
}
