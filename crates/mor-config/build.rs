//! Embeds the presets of `configs/*.toml` (workspace root) into the library, so the `mor` binary
//! finds them from any working directory. Generates `$OUT_DIR/presets_table.rs`:
//! `static PRESETS: &[(&str, &str)]`, sorted by name.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let dir = manifest.join("../../configs");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<(String, PathBuf)> = Vec::new();
    if let Ok(read) = std::fs::read_dir(&dir) {
        for entry in read.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
            println!("cargo:rerun-if-changed={}", path.display());
            let abs = path.canonicalize().unwrap_or(path.clone());
            entries.push((stem.to_string(), abs));
        }
    } else {
        println!("cargo:warning=no configs/ folder at {}: no presets embedded", dir.display());
    }
    entries.sort();
    let mut out = String::from("/// (name, TOML text) of every embedded preset, sorted by name.\n");
    out.push_str("static PRESETS: &[(&str, &str)] = &[\n");
    for (name, path) in &entries {
        out.push_str(&format!("    ({name:?}, include_str!({:?})),\n", path.display().to_string()));
    }
    out.push_str("];\n");
    let out_path = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("presets_table.rs");
    std::fs::write(out_path, out).unwrap();
}
