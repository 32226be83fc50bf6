//! Configuration of MoR models and training runs: the TOML schema, validation, presets,
//! the sharing maps and capacity schedules (one definition used by model, accounting and tests),
//! and parameter / FLOP accounting (MOR_SPEC sections 1, 2, 3.4, 7.3).
//!
//! * [`load`] takes a preset name ([`preset_names`]) or a path to a TOML file.
//! * [`accounting`] computes parameter counts and FLOPs from a [`ModelConfig`] + [`SharingMap`].

pub mod accounting;
pub mod config;
pub mod presets;
pub mod sharing;

pub use accounting::{IsoFlop, ParamCounts};
pub use config::*;
pub use presets::{load, preset_names, preset_toml};
pub use sharing::*;
