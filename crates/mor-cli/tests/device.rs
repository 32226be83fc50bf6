//! `--device`, `mor bench train` and `mor train --dry-run` (CPU builds).

use std::process::{Command, Output};

fn mor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mor")).args(args).current_dir(std::env::temp_dir()).output().unwrap()
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    for args in [
        &["train", "tiny-vanilla", "--device", "cuda", "--data", "synthetic", "--steps", "1"][..],
        &["bench", "train", "tiny-vanilla", "--device", "cuda", "--steps", "1"][..],
    ] {
        let out = mor(args);
        assert_eq!(out.status.code(), Some(2), "mor {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("this binary was built without CUDA support; rebuild with --features cuda"),
            "mor {args:?}: {err}"
        );
    }
}

#[test]
fn bench_train_reports_throughput_and_json() {
    let json = std::env::temp_dir().join(format!("mor-bench-test-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&json);
    let out = mor(&[
        "bench", "train", "tiny-mor-ec3", "--micro-batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1",
        "--json", json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tokens/s") && text.contains("MFU"), "{text}");
    let rec: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&json).unwrap().lines().next().unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    assert_eq!(rec["tokens_per_step"], 64);
    assert_eq!(rec["step_ms"].as_array().unwrap().len(), 2);
    assert!(rec["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(rec["train_flops_per_token"].as_f64().unwrap() > 0.0);
    // bf16 GEMMs are a CUDA option.
    let out = mor(&["bench", "train", "tiny-vanilla", "--gemm", "bf16", "--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    // CUDA graphs: the CPU cannot record one, and a graph needs an eager step first.
    let out = mor(&["bench", "train", "tiny-vanilla", "--cuda-graph", "--steps", "1", "--warmup", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--warmup >= 2"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = mor(&["bench", "train", "tiny-vanilla", "--cuda-graph", "--steps", "1", "--micro-batch", "1", "--seq-len", "16"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot capture"), "{err}");
    let out = mor(&["train", "tiny-vanilla", "--cuda-graph", "--data", "synthetic", "--steps", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cuda-graph needs --device cuda --gemm bf16"));
    // seq-len beyond the model's window is refused.
    let out = mor(&["bench", "train", "tiny-vanilla", "--seq-len", "100000", "--steps", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_seq_len"));
}

#[test]
fn dry_run_prints_memory_estimates() {
    let out = mor(&["train", "360m-vanilla", "--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for what in ["parameters", "gradients", "optimizer", "activations", "peak (estimate)", "361.82M", "GiB"] {
        assert!(text.contains(what), "missing {what}: {text}");
    }
    // The estimate works for a CUDA run in any binary (it allocates nothing).
    let out = mor(&["train", "tiny-mor-ec3", "--dry-run", "--device", "cuda"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // With bf16 GEMMs the activation buffers are counted at 2 bytes: a smaller peak.
    let peak = |args: &[&str]| -> f64 {
        let out = mor(args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text.lines().find(|l| l.contains("peak (estimate)")).unwrap_or_else(|| panic!("no peak line: {text}")).to_string();
        let gib = line.split_whitespace().collect::<Vec<_>>().windows(2).find(|w| w[1] == "GiB").map(|w| w[0].to_string()).unwrap();
        gib.parse().unwrap()
    };
    let f32_peak = peak(&["train", "360m-vanilla", "--dry-run", "--device", "cuda"]);
    let bf16_peak = peak(&["train", "360m-vanilla", "--dry-run", "--device", "cuda", "--gemm", "bf16"]);
    assert!(bf16_peak < f32_peak, "bf16 activations: {bf16_peak} GiB vs {f32_peak} GiB");
    let out = mor(&["train", "360m-vanilla", "--dry-run", "--device", "cuda", "--gemm", "bf16"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("bf16 weight copies"), "{}", String::from_utf8_lossy(&out.stdout));
}
