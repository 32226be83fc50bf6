//! Fixtures for checking mor's Hugging Face export against `transformers`
//! (`scripts/reference/hf_logits_check.py`): random vanilla models exported by mor, with mor's
//! logits and greedy continuations for fixed token ids.
//!
//!     cargo run --release -p mor-interop --example hf_fixture -- OUT_DIR
//!
//! Writes `OUT_DIR/<name>/{config.json, model.safetensors, mor_logits.json}` per model.

use mor_config::ModelConfig;
use mor_engine::Cpu;
use mor_model::{Batch, Model, Routing, Sampler};
use serde_json::json;

fn cfg(vocab: usize, d: usize, layers: usize, heads: usize, kv: usize, hd: usize, ffn: usize, theta: f64, tied: bool) -> ModelConfig {
    serde_json::from_value(json!({
        "vocab_size": vocab, "hidden_size": d, "num_layers": layers, "num_heads": heads, "num_kv_heads": kv,
        "head_dim": hd, "intermediate_size": ffn, "rope_theta": theta, "rms_norm_eps": 1e-5,
        "max_seq_len": 256, "tie_embeddings": tied, "init_std": 0.05
    }))
    .unwrap()
}

fn main() -> anyhow::Result<()> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: hf_fixture OUT_DIR"));
    let models = [
        // SmolLM2-135M's layer shape (GQA 9/3, head_dim 64, theta 1e5, tied), 2 layers, small vocab.
        ("smollm2_shape", cfg(2048, 576, 2, 9, 3, 64, 1536, 1e5, true), 1u64),
        // Untied head, MHA, theta 1e4, odd sizes.
        ("untied_mha", cfg(301, 96, 3, 3, 3, 32, 160, 1e4, false), 2),
        // Grouped 4/2 heads, head_dim 16, tied.
        ("tiny_gqa", cfg(128, 64, 4, 4, 2, 16, 96, 5e5, true), 3),
    ];
    let be = Cpu::<f32>::new();
    for (name, c, seed) in models {
        let mut m = Model::new(&be, c.clone(), seed)?;
        let dir = out.join(name);
        mor_interop::export::export(&be, &m, None, None, &dir)?;
        let v = c.vocab_size as u32;
        let seqs: Vec<Vec<u32>> = (0..3u32).map(|s| (0..(20 + 7 * s)).map(|i| (i * 31 + s * 17 + 5) % v).collect()).collect();
        let mut logits = Vec::new();
        for ids in &seqs {
            let targets = vec![u32::MAX; ids.len()];
            let b = Batch { inputs: ids, targets: &targets, batch: 1, seq_len: ids.len(), doc_starts: None };
            m.forward(&be, &b, Routing::Threshold, false, 1.0)?;
            let rows: Vec<usize> = (0..ids.len()).collect();
            logits.push(m.logits_at(&be, &rows));
        }
        let prompt = &seqs[0][..8];
        let greedy = m.generate(&be, prompt, 12, Sampler::Greedy, None, |_| {})?.ids;
        let j = json!({ "ids": seqs, "vocab": c.vocab_size, "logits": logits, "greedy_prompt": prompt, "greedy_ids": greedy });
        std::fs::write(dir.join("mor_logits.json"), serde_json::to_string(&j)?)?;
        eprintln!("{name}: {} parameters -> {}", m.params.count(|_| true), dir.display());
    }
    Ok(())
}
