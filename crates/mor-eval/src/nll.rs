//! Validation NLL (MOR_SPEC 8.1): the mean over rows of each row's mean token cross-entropy,
//! over the first `rows` packed rows of a token stream (row `r` = stream tokens
//! `r·L .. r·L + L + 1`, inputs the first `L`, targets the last `L`; the same packing as
//! training, EOS separators inside rows, no document masking).

use anyhow::{ensure, Result};
use mor_engine::Backend;
use mor_model::{Batch, Model, Routing};
use serde::{Deserialize, Serialize};

/// A packed token stream.
pub trait TokenStream {
    fn total_tokens(&self) -> u64;
    fn read(&self, start: u64, out: &mut [u32]);
}

impl TokenStream for mor_data::ShardSource {
    fn total_tokens(&self) -> u64 {
        mor_data::ShardSource::total_tokens(self)
    }
    fn read(&self, start: u64, out: &mut [u32]) {
        self.read_tokens(start, out)
    }
}

impl TokenStream for Vec<u32> {
    fn total_tokens(&self) -> u64 {
        self.len() as u64
    }
    fn read(&self, start: u64, out: &mut [u32]) {
        out.copy_from_slice(&self[start as usize..start as usize + out.len()]);
    }
}

#[derive(Debug, Clone)]
pub struct NllOptions {
    pub rows: usize,
    pub seq_len: usize,
    pub routing: Routing,
    /// Rows per forward pass (all rows have the same length; no padding).
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NllReport {
    /// Mean over rows of the per-row mean CE (nats).
    pub nll: f64,
    pub rows: usize,
    pub seq_len: usize,
    pub tokens: usize,
    /// `threshold` (causal per-token decisions) or `topk` (sequence-level top-k).
    pub routing: String,
    /// False when expert-choice top-k routing looked at future tokens (released-code mode).
    pub causal: bool,
    pub row_nll: Vec<f64>,
}

/// Whether `routing` is causal for `model` (only expert-choice top-k is not).
pub fn routing_is_causal<B: Backend>(model: &Model<B>, routing: Routing) -> bool {
    !(routing == Routing::TopK && model.cfg.router.as_ref().is_some_and(|r| r.kind == mor_config::RouterKind::Expert))
}

pub fn routing_name(routing: Routing) -> &'static str {
    match routing {
        Routing::TopK => "topk",
        Routing::Threshold => "threshold",
    }
}

pub fn validation_nll<B: Backend>(b: &B, model: &mut Model<B>, stream: &dyn TokenStream, opts: &NllOptions) -> Result<NllReport> {
    let l = opts.seq_len;
    ensure!(l >= 1 && opts.rows >= 1, "need at least one row of at least one token");
    ensure!(l <= model.cfg.max_seq_len, "--seq-len {l} exceeds the model's max_seq_len {}", model.cfg.max_seq_len);
    let avail = (stream.total_tokens().saturating_sub(1) / l as u64) as usize;
    ensure!(
        avail >= opts.rows,
        "the stream has {} tokens: only {avail} rows of {l} (+1) tokens, {} requested",
        stream.total_tokens(),
        opts.rows
    );
    let mut row_nll = Vec::with_capacity(opts.rows);
    let mut r = 0;
    while r < opts.rows {
        let n = opts.batch.max(1).min(opts.rows - r);
        let mut inputs = Vec::with_capacity(n * l);
        let mut targets = Vec::with_capacity(n * l);
        let mut row = vec![0u32; l + 1];
        for k in 0..n {
            stream.read(((r + k) * l) as u64, &mut row);
            inputs.extend_from_slice(&row[..l]);
            targets.extend_from_slice(&row[1..]);
        }
        let batch = Batch { inputs: &inputs, targets: &targets, batch: n, seq_len: l, doc_starts: None };
        model.forward(b, &batch, opts.routing, false, 1.0)?;
        let losses = model.token_losses();
        for k in 0..n {
            row_nll.push(losses[k * l..(k + 1) * l].iter().sum::<f64>() / l as f64);
        }
        r += n;
    }
    Ok(NllReport {
        nll: row_nll.iter().sum::<f64>() / row_nll.len() as f64,
        rows: opts.rows,
        seq_len: l,
        tokens: opts.rows * l,
        routing: routing_name(opts.routing).into(),
        causal: routing_is_causal(model, opts.routing),
        row_nll,
    })
}
