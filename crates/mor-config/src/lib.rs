//! Configuration of MoR models and training runs: the TOML schema, validation, presets,
//! the sharing maps and capacity schedules (one definition used by model, accounting and tests),
//! and parameter / FLOP accounting (MOR_SPEC sections 1, 2, 3.4, 7.3).

pub mod config;
pub mod sharing;

pub use config::*;
pub use sharing::*;
