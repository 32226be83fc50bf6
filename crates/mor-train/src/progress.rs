//! Terminal progress bar for training: step/total, loss, tokens/s, LR, elapsed and ETA.
//! Hidden (all calls become no-ops, [`Progress::println`] falls back to plain stderr lines) when
//! stderr is not a terminal or when constructed with `quiet = true`.
//!
//! ```no_run
//! use mor_train::progress::Progress;
//! let bar = Progress::new(1000, 0, false);
//! for step in 1..=1000u64 {
//!     // ... train ...
//!     bar.update(step, 3.21, 45_000.0, 3e-3);
//! }
//! bar.finish();
//! ```

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: ProgressBar,
    quiet: bool,
}

/// `12.3k`, `4.56M` style formatting for rates.
pub fn human_rate(x: f64) -> String {
    if !x.is_finite() {
        return "-".to_string();
    }
    let a = x.abs();
    if a >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.1}")
    }
}

/// The bar's message for one step: `loss 3.2100 | 45.0k tok/s | lr 3.00e-3`.
pub fn format_status(loss: f64, tokens_per_s: f64, lr: f64) -> String {
    format!("loss {loss:.4} | {} tok/s | lr {lr:.2e}", human_rate(tokens_per_s))
}

impl Progress {
    /// A bar over `total_steps` optimizer steps, starting at `start_step` (non-zero on resume; the
    /// ETA counts only steps done by this process). `quiet` hides it unconditionally.
    pub fn new(total_steps: u64, start_step: u64, quiet: bool) -> Self {
        let visible = !quiet && std::io::stderr().is_terminal();
        let bar = if visible {
            ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr_with_hz(4))
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} steps | {msg} | ETA {eta_precise}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_position(start_step);
        bar.reset_eta();
        Progress { bar, quiet }
    }

    /// True when nothing is drawn.
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Change the total step count (a time-limited run fitting its schedule).
    pub fn set_total(&self, total_steps: u64) {
        self.bar.set_length(total_steps);
    }

    /// Set the completed step count and the status line.
    pub fn update(&self, step: u64, loss: f64, tokens_per_s: f64, lr: f64) {
        self.bar.set_position(step);
        self.bar.set_message(format_status(loss, tokens_per_s, lr));
    }

    /// Print a line above the bar (or to stderr when the bar is hidden because stderr is not a
    /// terminal; nothing when `quiet`).
    pub fn println(&self, msg: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{}", msg.as_ref());
        } else {
            self.bar.println(msg.as_ref());
        }
    }

    /// Leave the bar (final state) on screen.
    pub fn finish(&self) {
        self.bar.finish();
    }
}
