//! Log-likelihood requests, as lm-evaluation-harness defines them.
//!
//! A request is `(context, continuation)`. Tokenisation follows the harness' `_encode_pair`:
//! trailing whitespace of the context moves to the front of the continuation, then
//! `whole = encode(context + continuation)`, `context_ids = encode(context)` and the
//! continuation ids are `whole[len(context_ids)..]`; an empty context becomes the prefix token
//! (end-of-text; SmolLM has no BOS). The model reads `(context_ids + continuation_ids)`
//! truncated on the left to `max_len + 1` tokens, minus the last; the result is the summed
//! log-probability of the continuation ids and whether each of them is the argmax
//! (`is_greedy`).

use anyhow::{ensure, Result};
use mor_engine::Backend;
use mor_model::{Batch, Model, Routing};

/// Turns text into token ids.
pub trait TextEncoder {
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Token that stands in for an empty context (the harness' `prefix_token_id`).
    fn prefix_token(&self) -> u32;
}

impl TextEncoder for mor_data::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        mor_data::Tokenizer::encode(self, text)
    }
    fn prefix_token(&self) -> u32 {
        self.eot_id().unwrap_or(0)
    }
}

/// A tokenised request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// The harness' `_encode_pair` (plus its empty-context rule).
pub fn encode_pair(enc: &dyn TextEncoder, context: &str, continuation: &str) -> Result<TokenRequest> {
    if context.is_empty() {
        return Ok(TokenRequest { context: vec![enc.prefix_token()], continuation: enc.encode(continuation)? });
    }
    let trimmed = context.trim_end();
    let (context, continuation) = if trimmed.len() < context.len() {
        (trimmed.to_string(), format!("{}{}", &context[trimmed.len()..], continuation))
    } else {
        (context.to_string(), continuation.to_string())
    };
    let whole = enc.encode(&format!("{context}{continuation}"))?;
    let ctx = if context.is_empty() { vec![enc.prefix_token()] } else { enc.encode(&context)? };
    let cont = whole.get(ctx.len()..).unwrap_or(&[]).to_vec();
    Ok(TokenRequest { context: ctx, continuation: cont })
}

/// Result of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlResult {
    /// Sum of the continuation tokens' log-probabilities (nats).
    pub ll: f64,
    /// Every continuation token is the argmax of its position's distribution.
    pub is_greedy: bool,
}

/// Anything that scores requests (the model, or a table in tests).
pub trait Scorer {
    fn score(&mut self, reqs: &[TokenRequest]) -> Result<Vec<LlResult>>;
}

/// `argmax` with the first maximum winning (numpy's rule).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// True when every target is the argmax of its logits row (`rows` = `targets.len()` rows of
/// `vocab` logits): the LAMBADA criterion, the whole target word predicted greedily.
pub fn greedy_match(logits: &[f32], vocab: usize, targets: &[u32]) -> bool {
    targets.iter().enumerate().all(|(i, &t)| argmax(&logits[i * vocab..(i + 1) * vocab]) == t as usize)
}

/// Scores requests with a mor model. Requests are sorted by length (longest first, as the
/// harness does) and run `batch_size` at a time, right-padded; padded positions have no
/// target. With causal routing (`Routing::Threshold`, and every vanilla / recursive /
/// token-choice model) padding cannot change any score. `Routing::TopK` (the released code's
/// sequence-level expert-choice top-k) is non-causal: then every request runs alone, unpadded.
pub struct ModelScorer<'a, B: Backend> {
    pub backend: &'a B,
    pub model: &'a mut Model<B>,
    pub routing: Routing,
    pub batch_size: usize,
    /// Longest model input (defaults to the model's `max_seq_len`).
    pub max_len: usize,
    /// Called with (requests done, total) after every batch.
    pub progress: Option<Box<dyn FnMut(usize, usize) + 'a>>,
}

impl<'a, B: Backend> ModelScorer<'a, B> {
    pub fn new(backend: &'a B, model: &'a mut Model<B>, routing: Routing, batch_size: usize) -> Self {
        let max_len = model.cfg.max_seq_len;
        ModelScorer { backend, model, routing, batch_size: batch_size.max(1), max_len, progress: None }
    }
}

/// Model input and target positions of one request.
fn layout(r: &TokenRequest, max_len: usize) -> Result<(Vec<u32>, usize)> {
    ensure!(!r.continuation.is_empty(), "a request has an empty continuation (nothing to score)");
    ensure!(
        r.continuation.len() <= max_len,
        "a continuation of {} tokens does not fit the model's {max_len}-token window",
        r.continuation.len()
    );
    let mut seq: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
    if seq.len() > max_len + 1 {
        seq.drain(..seq.len() - (max_len + 1));
    }
    seq.pop();
    Ok((seq, r.continuation.len()))
}

impl<B: Backend> Scorer for ModelScorer<'_, B> {
    fn score(&mut self, reqs: &[TokenRequest]) -> Result<Vec<LlResult>> {
        let layouts = reqs.iter().map(|r| layout(r, self.max_len)).collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(layouts[i].0.len()), i));
        let bs = if self.routing == Routing::TopK { 1 } else { self.batch_size };
        let vocab = self.model.cfg.vocab_size;
        let mut out = vec![LlResult { ll: 0.0, is_greedy: false }; reqs.len()];
        let mut done = 0;
        for chunk in order.chunks(bs) {
            let len = chunk.iter().map(|&i| layouts[i].0.len()).max().unwrap();
            let rows = chunk.len();
            let mut inputs = vec![0u32; rows * len];
            let mut targets = vec![u32::MAX; rows * len];
            let mut positions = Vec::new();
            for (row, &i) in chunk.iter().enumerate() {
                let (inp, nc) = &layouts[i];
                inputs[row * len..row * len + inp.len()].copy_from_slice(inp);
                let first = inp.len() - nc;
                for (j, &t) in reqs[i].continuation.iter().enumerate() {
                    targets[row * len + first + j] = t;
                    positions.push(row * len + first + j);
                }
            }
            let batch = Batch { inputs: &inputs, targets: &targets, batch: rows, seq_len: len, doc_starts: None };
            self.model.forward(self.backend, &batch, self.routing, false, 1.0)?;
            let losses = self.model.token_losses().to_vec();
            let logits = self.model.logits_at(self.backend, &positions);
            let mut k = 0;
            for &i in chunk {
                let nc = reqs[i].continuation.len();
                let pos = &positions[k..k + nc];
                let ll = -pos.iter().map(|&p| losses[p]).sum::<f64>();
                let is_greedy = greedy_match(&logits[k * vocab..(k + nc) * vocab], vocab, &reqs[i].continuation);
                out[i] = LlResult { ll, is_greedy };
                k += nc;
            }
            done += rows;
            if let Some(p) = self.progress.as_mut() {
                p(done, reqs.len());
            }
        }
        Ok(out)
    }
}
