//! Integration tests of the `mor` binary: presets, params, flops, and error handling.

use std::path::PathBuf;
use std::process::{Command, Output};

fn mor(args: &[&str]) -> Output {
    // Run from a directory without configs/ to check the presets are embedded.
    Command::new(env!("CARGO_BIN_EXE_mor")).args(args).current_dir(std::env::temp_dir()).output().unwrap()
}

fn stdout_ok(args: &[&str]) -> String {
    let out = mor(args);
    assert!(out.status.success(), "mor {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&stdout_ok(args)).unwrap()
}

fn int(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not an integer in {v}"))
}

/// A scratch file under the system temp dir, removed on drop.
struct TempToml(PathBuf);

impl TempToml {
    fn new(tag: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("mor-cli-test-{}-{tag}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempToml(path)
    }
    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempToml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tiny_preset_text() -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny-mor-ec3.toml"))
        .unwrap()
}

#[test]
fn presets_lists_110_names() {
    let text = stdout_ok(&["presets"]);
    let names: Vec<&str> = text.lines().collect();
    assert_eq!(names.len(), 110);
    for n in [
        "360m-vanilla",
        "360m-mor-ec3",
        "135m-mor-ec3-share",
        "1.7b-mor-tc2",
        "tiny-rec4-mseq",
        "730m-rec3-cycle",
    ] {
        assert!(names.contains(&n), "missing {n}");
    }
}

#[test]
fn params_json_vanilla_360m() {
    let v = json(&["params", "360m-vanilla", "--json"]);
    assert_eq!(int(&v, "non_embedding"), 314_635_200);
    assert_eq!(int(&v, "embedding"), 47_185_920);
    assert_eq!(int(&v, "router"), 0);
    assert_eq!(int(&v, "total"), 361_821_120);
}

#[test]
fn params_json_mor() {
    let v = json(&["params", "360m-mor-ec3", "--json"]);
    assert_eq!(int(&v, "non_embedding"), 117_988_800);
    assert_eq!(int(&v, "router"), 2_880);
    assert_eq!(int(&v, "total"), 117_988_800 + 47_185_920 + 2_880);
    assert_eq!(int(&json(&["params", "360m-mor-ec4", "--json"]), "non_embedding"), 98_324_160);
    assert_eq!(int(&json(&["params", "360m-rec2-mcycle", "--json"]), "non_embedding"), 167_150_400);
    assert_eq!(int(&json(&["params", "135m-vanilla", "--json"]), "non_embedding"), 106_203_456);
    assert_eq!(int(&json(&["params", "1.7b-mor-ec2", "--json"]), "non_embedding"), 872_470_528);
}

#[test]
fn params_human_table() {
    let text = stdout_ok(&["params", "360m-vanilla"]);
    assert!(text.contains("314,635,200") && text.contains("361,821,120"), "{text}");
}

#[test]
fn params_accepts_a_path() {
    let f = TempToml::new("ok", &tiny_preset_text());
    let by_path = json(&["params", f.arg(), "--json"]);
    assert_eq!(by_path, json(&["params", "tiny-mor-ec3", "--json"]));
}

#[test]
fn flops_step_counts() {
    for (name, released) in [
        ("360m-vanilla", 9_438u64),
        ("360m-rec3-mcycle", 9_438),
        ("360m-rec4-mcycle", 8_883),
        ("360m-mor-ec2", 12_619),
        ("360m-mor-ec3", 14_161),
        ("360m-mor-ec4", 14_216),
        ("360m-mor-tc3", 14_161),
        ("360m-mor-ec3-share", 14_672),
        ("135m-mor-ec3", 36_326),
    ] {
        let v = json(&["flops", name, "--budget", "16.5e18", "--tokens-per-step", "2097152", "--json"]);
        let steps = int(&v, "steps");
        assert!(steps.abs_diff(released) <= 3, "{name}: {steps} vs {released}");
        assert_eq!(int(&v, "tokens"), steps * 2_097_152, "{name}");
        assert!(v["flops_per_token"].as_f64().unwrap() > 0.0);
    }
    let v = json(&["flops", "360m-vanilla", "--budget", "16.5e18", "--tokens-per-step", "2097152", "--json"]);
    assert_eq!(v["flops_per_token"].as_f64().unwrap(), 833_617_920.0);
    assert_eq!(int(&v, "steps"), 9_438);
}

#[test]
fn flops_defaults_and_human_output() {
    // Defaults: budget 16.5e18, tokens per step from the config (16 × 64 × 2048).
    let v = json(&["flops", "360m-mor-ec2", "--json"]);
    assert_eq!(int(&v, "tokens_per_step"), 2_097_152);
    assert_eq!(int(&v, "steps"), 12_619);
    let text = stdout_ok(&["flops", "360m-vanilla", "--budget", "16.5e18", "--tokens-per-step", "2097152"]);
    assert!(
        text.contains("flops_per_token")
            && text.contains("steps")
            && text.contains("9,438")
            && text.contains("tokens"),
        "{text}"
    );
}

fn assert_clean_failure(out: &Output) -> String {
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

#[test]
fn unknown_preset_is_a_clean_error() {
    let stderr = assert_clean_failure(&mor(&["params", "360m-mor-e3"]));
    assert!(stderr.contains("unknown preset") && stderr.contains("360m-mor-ec3"), "{stderr}");
    assert!(stderr.contains("mor presets"), "{stderr}");
    assert_clean_failure(&mor(&["flops", "nothing-like-it", "--json"]));
}

#[test]
fn bad_value_names_the_field() {
    let f = TempToml::new("kv", &tiny_preset_text().replace("num_kv_heads = 2", "num_kv_heads = 3"));
    let stderr = assert_clean_failure(&mor(&["params", f.arg(), "--json"]));
    assert!(stderr.contains("model.num_kv_heads"), "{stderr}");
}

#[test]
fn unknown_key_names_the_field() {
    let f =
        TempToml::new("key", &tiny_preset_text().replace("[model.router]", "[model.router]\nalpah = 0.3"));
    let stderr = assert_clean_failure(&mor(&["flops", f.arg()]));
    assert!(stderr.contains("model.router.alpah") && stderr.contains("unknown field"), "{stderr}");
}

#[test]
fn missing_file_and_bad_flags_are_clean_errors() {
    assert_clean_failure(&mor(&["params", "/definitely/not/here.toml"]));
    assert_clean_failure(&mor(&["flops", "tiny-vanilla", "--budget", "lots"]));
    assert_clean_failure(&mor(&["flops", "tiny-vanilla", "--tokens-per-step", "0"]));
    assert_clean_failure(&mor(&["frobnicate"]));
}

/// A corrupt checkpoint: `mor train --resume` reports the file, exits non-zero, no panic.
#[test]
fn train_resume_with_corrupt_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_mor"))
        .args(["train", "tiny-mor-ec3", "--data", "synthetic", "--steps", "1", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let model = out.join("checkpoint").join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 3]).unwrap();
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_mor"))
        .args(["train", "tiny-mor-ec3", "--data", "synthetic", "--steps", "2", "--quiet", "--resume", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("model.safetensors") && !err.contains("panicked"), "{err}");
}

/// Missing data folder: a clear error naming it.
#[test]
fn train_with_missing_data_folder_is_a_clear_error() {
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_mor"))
        .args(["train", "tiny-mor-ec3", "--data", "/nonexistent/shards", "--steps", "1", "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/shards") && !err.contains("panicked"), "{err}");
}

/// `--time-limit` far below what `--steps` needs: the run stops early and still writes the
/// checkpoint, metrics (last step included) and loss curve; `--val-rows` then reports the
/// validation NLL of the `val` split into `val.json`.
#[test]
fn train_time_limit_stops_cleanly_and_val_rows_reports_nll() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..400).map(|i| format!("line {i}: the cat sat on the mat and the dog sat on the log\n")).collect();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, &text).unwrap();
    let tok_opts = mor_data::TrainOptions { vocab_size: 300, min_frequency: 1, show_progress: false, ..Default::default() };
    let tok = mor_data::Tokenizer::train_bpe(text.lines(), &tok_opts).unwrap();
    let files = mor_data::input::discover(&[corpus.to_str().unwrap()]).unwrap();
    let opts = mor_data::PrepareOptions { val_docs: 60, progress: false, text_docs: mor_data::input::TextDocs::Line, ..Default::default() };
    let shards = dir.path().join("shards");
    mor_data::prepare::prepare(&files, &tok, &shards, &opts).unwrap();

    let run = dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_mor"))
        .args(["train", "tiny-mor-ec3", "--steps", "1000000", "--time-limit", "0.02", "--fit-schedule", "--val-rows", "50", "--val-every", "1"])
        .args(["--prompt", "", "--data", shards.to_str().unwrap(), "--out", run.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("at most 0.02 min of wall time"), "{err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let steps = last["step"].as_u64().unwrap();
    assert!((1..1_000_000).contains(&steps), "{steps} steps");
    assert!(run.join("checkpoint").join("model.safetensors").is_file() && run.join("loss.png").is_file());
    assert!(last["val_loss"].as_f64().is_some_and(f64::is_finite), "{last}");
    let val: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("val.json")).unwrap()).unwrap();
    assert!(val["val_nll"].as_f64().unwrap().is_finite(), "{val}");
    assert_eq!(val["step"].as_u64(), Some(steps));
    let rows = val["rows"].as_u64().unwrap();
    assert!((1..50).contains(&rows), "the val split holds fewer than 50 rows of 128: {rows}");
    assert!(err.contains("val NLL"), "{err}");
}

#[test]
fn train_time_limit_and_val_rows_bad_input_are_clean_errors() {
    for (args, needle) in [
        (&["--time-limit", "0"][..], "positive number of minutes"),
        (&["--time-limit=-3"][..], "positive number of minutes"),
        (&["--time-limit", "soon"][..], "soon"),
        (&["--fit-schedule"][..], "--time-limit"),
        (&["--val-rows", "4"][..], "no validation split"),
        (&["--val-every", "4"][..], "--val-rows"),
    ] {
        let out = mor(&[&["train", "tiny-mor-ec3", "--data", "synthetic", "--steps", "1", "--quiet"][..], args].concat());
        let err = assert_clean_failure(&out);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// scripts/gpu-train-135m.toml trains exactly the 135m-mor-ec3 model (only `[train]` differs).
#[test]
fn gpu_train_135m_config_is_the_preset_model() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/gpu-train-135m.toml");
    let cfg = mor_config::load(path).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.model, mor_config::load("135m-mor-ec3").unwrap().model);
}
