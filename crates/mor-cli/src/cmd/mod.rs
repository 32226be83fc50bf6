//! One module per subcommand (`Args` + `run`), plus helpers they share.

pub mod bench;
pub mod data;
pub mod device;
pub mod eval;
pub mod export;
pub mod flops;
pub mod generate;
pub mod import;
pub mod params;
pub mod presets;
pub mod tokenizer;
pub mod train;

use anyhow::Context;
use std::io::Write;

/// Load a run config from a preset name or a TOML path. Validation errors get the config's name
/// as context (parse, read and unknown-preset errors already name it).
pub fn load_config(name_or_path: &str) -> anyhow::Result<mor_config::RunConfig> {
    match mor_config::load(name_or_path) {
        Ok(cfg) => Ok(cfg),
        Err(e @ mor_config::ConfigError::Invalid { .. }) => {
            Err(e).with_context(|| format!("invalid config `{name_or_path}`"))
        }
        Err(e) => Err(e.into()),
    }
}

/// Write `text` to stdout (no panic when stdout is closed, e.g. `mor presets | head -1`).
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Print `value` as pretty JSON (fields in declaration order) followed by a newline.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    print(&format!("{}\n", serde_json::to_string_pretty(value)?))
}

/// True when the error is a closed stdout (not worth reporting).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `361821120` → `361.82M`.
pub fn si(x: f64) -> String {
    let (v, unit) = match x.abs() {
        a if a >= 1e12 => (x / 1e12, "T"),
        a if a >= 1e9 => (x / 1e9, "B"),
        a if a >= 1e6 => (x / 1e6, "M"),
        a if a >= 1e3 => (x / 1e3, "K"),
        _ => (x, ""),
    };
    format!("{v:.2}{unit}")
}
