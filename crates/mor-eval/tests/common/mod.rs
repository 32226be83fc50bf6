//! Shared test helpers: locating downloaded assets (same rules as mor-data's tests).
#![allow(dead_code)]
use std::path::PathBuf;

/// Folder that `scripts/fetch-test-assets.sh` and `scripts/fetch-eval-data.sh` fill.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("MOR_ASSETS_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.assets"),
    }
}

/// The asset at `rel`, or None (with a loud message) when it is absent and
/// `MOR_REQUIRE_ASSETS` is unset. With `MOR_REQUIRE_ASSETS` set, an absent asset fails the test.
pub fn asset(rel: &str, script: &str) -> Option<PathBuf> {
    let p = assets_dir().join(rel);
    if p.exists() {
        return Some(p);
    }
    let msg = format!("test asset {} is missing: run {script}", p.display());
    if std::env::var_os("MOR_REQUIRE_ASSETS").is_some_and(|v| !v.is_empty()) {
        panic!("{msg} (MOR_REQUIRE_ASSETS is set)");
    }
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED: {msg}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
    None
}

pub fn smollm2_gguf() -> Option<PathBuf> {
    asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "scripts/fetch-test-assets.sh")
}

/// `$MOR_EVAL_DATA` when set, else `<assets>/eval` (what scripts/fetch-eval-data.sh fills).
pub fn eval_data() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MOR_EVAL_DATA").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        if d.join(".complete").exists() {
            return Some(d);
        }
    }
    asset("eval/.complete", "scripts/fetch-eval-data.sh").map(|p| p.parent().unwrap().to_path_buf())
}
