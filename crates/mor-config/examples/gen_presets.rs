//! Writes the preset files of `configs/` (workspace root) from `mor_config::presets`.
//!
//! `cargo run -p mor-config --example gen_presets`            write / refresh the files
//! `cargo run -p mor-config --example gen_presets -- --check` only report differences (exit 1)

use std::path::PathBuf;

fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    std::fs::create_dir_all(&dir).expect("create configs/");
    let dir = dir.canonicalize().unwrap_or(dir);
    let files = mor_config::presets::generate_preset_files();
    let mut stale = 0;
    for (name, text) in &files {
        let path = dir.join(name);
        let current = std::fs::read_to_string(&path).ok();
        if current.as_deref() == Some(text.as_str()) {
            continue;
        }
        stale += 1;
        if check {
            println!("differs: {}", path.display());
        } else {
            std::fs::write(&path, text).expect("write preset");
            println!("wrote {}", path.display());
        }
    }
    // Generated-looking files that the generator no longer produces.
    let known: std::collections::HashSet<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for entry in std::fs::read_dir(&dir).expect("read configs/").flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".toml") && !known.contains(name.as_str()) {
            stale += 1;
            println!("not produced by the generator: {}", entry.path().display());
        }
    }
    println!("{} preset files, {stale} {}", files.len(), if check { "differ" } else { "changed or extra" });
    if check && stale > 0 {
        std::process::exit(1);
    }
}
