//! The `mor generate / export / import / eval` contract on a tiny model with a tiny trained
//! tokenizer (no downloaded assets).

use mor_config::ModelConfig;
use mor_data::{Tokenizer, TrainOptions};
use mor_engine::Cpu;
use mor_model::{Model, Sampler};
use std::path::Path;
use std::process::{Command, Output};

fn mor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mor")).args(args).current_dir(std::env::temp_dir()).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = mor(args);
    assert!(out.status.success(), "mor {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

const TEXT: &[&str] = &[
    "the cat sat on the mat and the dog sat on the log",
    "a bird in the hand is worth two in the bush",
    "the quick brown fox jumps over the lazy dog again and again",
    "one two three four five six seven eight nine ten",
];

fn tokenizer() -> Tokenizer {
    let opts = TrainOptions { vocab_size: 300, min_frequency: 1, show_progress: false, ..Default::default() };
    Tokenizer::train_bpe(TEXT.iter().cycle().take(40), &opts).unwrap()
}

fn tiny(vocab: usize, router: Option<&str>) -> ModelConfig {
    let mut c: ModelConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": vocab, "hidden_size": 32, "num_layers": 5, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "intermediate_size": 48, "max_seq_len": 128, "init_std": 0.2
    }))
    .unwrap();
    if let Some(kind) = router {
        c.recursion = Some(serde_json::from_value(serde_json::json!({"sharing": "middle_cycle", "num_recursions": 3})).unwrap());
        c.router = Some(serde_json::from_value(serde_json::json!({"kind": kind})).unwrap());
    }
    c
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn generate_export_import_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let be = Cpu::<f32>::new();
    let mut model = Model::new(&be, tiny(tok.vocab_size(), None), 4).unwrap();
    let ck = dir.path().join("ck");
    mor_interop::load::save_mor_checkpoint(&be, &model, Some(&tok), "tiny", &ck).unwrap();

    // Only the continuation is printed.
    let prompt = "the cat sat";
    let ids = tok.encode(prompt).unwrap();
    let want = model.generate(&be, &ids, 6, Sampler::Greedy, None, |_| {}).unwrap().ids;
    let want = format!("{}\n", tok.decode(&want).unwrap());
    let args = |m: &str| vec!["generate", "--model", m, "--prompt", prompt, "--max-tokens", "6", "--greedy", "--ignore-eos"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    let run = |m: &str| ok(&args(m).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(run(p(&ck)), want, "from the checkpoint");

    // Export as LlamaForCausalLM, then generate from the export.
    let hf = dir.path().join("hf");
    ok(&["export", "--model", p(&ck), "-o", p(&hf)]);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert!(hf.join("tokenizer.json").is_file());
    assert_eq!(run(p(&hf)), want, "from the Hugging Face export");

    // Import the export back, vanilla and as a MoR for up-training.
    let back = dir.path().join("back");
    ok(&["import", "--model", p(&hf), "-o", p(&back)]);
    assert_eq!(run(p(&back)), want, "re-imported");
    let mor_dir = dir.path().join("mor");
    ok(&["init-from", "--model", p(&hf), "-o", p(&mor_dir), "--recursions", "3", "--sharing", "middle_cycle", "--init", "average", "--router", "expert"]);
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(mor_dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["config"]["model"]["recursion"]["num_recursions"], 3);
    assert_eq!(state["config"]["model"]["router"]["kind"], "expert");
    assert!(mor_dir.join("config.toml").is_file());
    assert!(!run(p(&mor_dir)).is_empty());
    let mor_hf = dir.path().join("mor_hf");
    ok(&["export", "--model", p(&mor_dir), "-o", p(&mor_hf)]);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(mor_hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "mor");
    assert_eq!(run(p(&mor_hf)), run(p(&mor_dir)), "mor layout export loads back");

    // Errors: exit code 2 and a message naming the problem.
    let out = mor(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file or directory"));
    let out = mor(&["import", "--model", p(&hf), "-o", p(&dir.path().join("x")), "--recursions", "2", "--init", "sideways"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sideways"));
}

#[test]
fn eval_tasks_and_nll_cli() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let be = Cpu::<f32>::new();
    let model = Model::new(&be, tiny(tok.vocab_size(), Some("expert")), 4).unwrap();
    let ck = dir.path().join("ck");
    mor_interop::load::save_mor_checkpoint(&be, &model, Some(&tok), "tiny", &ck).unwrap();

    let task = dir.path().join("toy.jsonl");
    std::fs::write(
        &task,
        "{\"context\": \"the cat sat on the\", \"choices\": [\"mat\", \"log\", \"bush\"], \"gold\": 0}\n\
         {\"context\": \"one two three\", \"continuation\": \" four\"}\n",
    )
    .unwrap();
    let out = ok(&["eval", "tasks", "--model", p(&ck), "--tasks", p(&task), "--json", "--per-doc", "--shots", "1"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tasks"][0]["task"], "toy");
    assert_eq!(v["tasks"][0]["docs"], 2);
    assert_eq!(v["routing"], "threshold");
    assert_eq!(v["causal"], true);
    assert!(v["table"]["Avg"].is_null());
    let table = ok(&["eval", "tasks", "--model", p(&ck), "--tasks", p(&task), "--routing", "topk"]);
    assert!(table.contains("NON-CAUSAL") && table.contains("LD") && table.contains("MMLU"), "{table}");

    // Validation NLL over shards prepared with the same tokenizer.
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, TEXT.join("\n").repeat(20)).unwrap();
    let files = mor_data::input::discover(&[p(&corpus)]).unwrap();
    let opts = mor_data::PrepareOptions { val_docs: 1, progress: false, text_docs: mor_data::input::TextDocs::Line, ..Default::default() };
    let shards = dir.path().join("shards");
    mor_data::prepare::prepare(&files, &tok, &shards, &opts).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["eval", "nll", "--model", p(&ck), "--data", p(&shards), "--split", "train", "--rows", "3", "--seq-len", "16", "--json"])).unwrap();
    assert!(v["nll"].as_f64().unwrap().is_finite());
    assert_eq!(v["rows"], 3);
    assert_eq!(v["causal"], true);
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "eval", "nll", "--model", p(&ck), "--data", p(&shards), "--split", "train", "--rows", "3", "--seq-len", "16", "--routing", "topk", "--json",
    ]))
    .unwrap();
    assert_eq!(v["causal"], false, "expert-choice top-k is flagged");
    let out = mor(&["eval", "nll", "--model", p(&ck), "--data", p(&shards), "--split", "train", "--rows", "100000", "--seq-len", "16"]);
    assert_eq!(out.status.code(), Some(2));
}
