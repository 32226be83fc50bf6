//! The training loop: a tiny MoR expert-choice model learns, and resuming after a kill
//! reproduces the uninterrupted run bit for bit.

use anyhow::Result;
use mor_config::RunConfig;
use mor_engine::Cpu;
use mor_train::{train, BatchSource, TokenBatch, TrainOptions};
use serde_json::{json, Value};

/// A deterministic stream with learnable structure: rows follow a fixed random bigram map
/// from a random start token.
struct Motifs {
    vocab: u32,
    next_row: u64,
}

impl BatchSource for Motifs {
    fn next_batch(&mut self, batch: usize, seq_len: usize) -> Result<TokenBatch> {
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..batch {
            let mut t = (self.next_row.wrapping_mul(0x9E3779B97F4A7C15) >> 40) as u32 % self.vocab;
            let row: Vec<u32> = (0..=seq_len)
                .map(|_| {
                    let cur = t;
                    t = (cur * 37 + 11) % self.vocab;
                    cur
                })
                .collect();
            inputs.extend_from_slice(&row[..seq_len]);
            targets.extend_from_slice(&row[1..]);
            self.next_row += 1;
        }
        Ok(TokenBatch { inputs, targets, batch, seq_len, doc_starts: vec![vec![]; batch] })
    }
    fn state(&self) -> Value {
        json!({ "next_row": self.next_row })
    }
    fn restore(&mut self, state: &Value) -> Result<()> {
        self.next_row = state["next_row"].as_u64().ok_or_else(|| anyhow::anyhow!("bad data state"))?;
        Ok(())
    }
}

fn config(steps: usize) -> RunConfig {
    let mut cfg = mor_config::load("tiny-mor-ec3").unwrap();
    cfg.model.vocab_size = 64;
    cfg.model.hidden_size = 32;
    cfg.model.num_heads = 2;
    cfg.model.num_kv_heads = 1;
    cfg.model.head_dim = 16;
    cfg.model.intermediate_size = 64;
    cfg.train.seq_len = 24;
    cfg.train.micro_batch = 4;
    cfg.train.grad_accum = 2;
    cfg.train.steps = steps;
    cfg.train.warmup_steps = 3;
    cfg.train.checkpoint_every = 0;
    cfg
}

fn opts(dir: &std::path::Path, resume: bool, stop_after: Option<usize>) -> TrainOptions {
    TrainOptions { run_dir: dir.to_path_buf(), resume, quiet: true, stop_after, init_seed: None }
}

#[test]
fn tiny_mor_loss_falls() {
    let be = Cpu::<f32>::new();
    let dir = tempfile::tempdir().unwrap();
    let out = train(&be, &config(40), &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), false, None)).unwrap();
    let first: f64 = out.log[..5].iter().map(|l| l.ce).sum::<f64>() / 5.0;
    let last: f64 = out.log[35..].iter().map(|l| l.ce).sum::<f64>() / 5.0;
    assert!(last < first - 1.0, "loss did not fall: {first} -> {last}");
    assert!(out.metrics.is_file() && out.checkpoint.join("model.safetensors").is_file());
    assert!(out.plot.as_ref().is_some_and(|p| p.is_file()));
}

#[test]
fn resume_after_kill_reproduces_uninterrupted_run() {
    let be = Cpu::<f32>::new();
    let cfg = config(12);
    let full_dir = tempfile::tempdir().unwrap();
    let full = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &opts(full_dir.path(), false, None)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let first = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), false, Some(5))).unwrap();
    assert_eq!(first.steps_done, 5);
    // A fresh process: new data source at its start; the checkpoint restores the position.
    let rest = train(&be, &cfg, &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), true, None)).unwrap();
    assert_eq!(rest.steps_done, 12);
    let resumed: Vec<f64> = first.log.iter().chain(&rest.log).map(|l| l.loss).collect();
    let uninterrupted: Vec<f64> = full.log.iter().map(|l| l.loss).collect();
    assert_eq!(resumed, uninterrupted, "losses differ after resume");
    for id in full.model.params.ids() {
        assert_eq!(full.model.params.values[id.0], rest.model.params.values[id.0]);
    }
}

#[test]
fn resume_refuses_a_different_model() {
    let be = Cpu::<f32>::new();
    let dir = tempfile::tempdir().unwrap();
    train(&be, &config(3), &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), false, None)).unwrap();
    let mut other = config(6);
    other.model.intermediate_size = 96;
    let err = train(&be, &other, &mut Motifs { vocab: 64, next_row: 0 }, &opts(dir.path(), true, None)).err().unwrap();
    assert!(format!("{err:#}").contains("different model config"), "{err:#}");
}
