//! Task documents, few-shot contexts, requests and per-document metrics.
//!
//! Three document shapes cover the paper's suite (and any JSONL task of the same family):
//!
//! * [`Doc::Choice`] — multiple choice scored as continuations: request `i` is
//!   `(prefix + query, delimiter + choices[i])`. HellaSwag, PIQA, ARC, MMLU-continuation.
//! * [`Doc::Partial`] — WinoGrande's *partial scoring*: the options differ in the context
//!   (`prefix + contexts[i]`) and only the shared continuation `delimiter + continuation` is
//!   scored.
//! * [`Doc::Greedy`] — one continuation: `acc` = every continuation token is the argmax
//!   (LAMBADA: the whole target word predicted greedily).
//!
//! Metrics (lm-evaluation-harness `multiple_choice`): `acc` = argmax of the summed
//! log-likelihoods is the gold index; `acc_norm` = argmax of `ll_i / len(choice_i)` where the
//! length is the choice string's length in characters (Python `len`, the harness' code; the
//! harness docs call it "byte length": identical for ASCII); `acc_norm_bytes` divides by the
//! UTF-8 byte length instead. For `Partial` the "choices" are the option contexts, as in the
//! harness. Ties go to the lowest index (numpy `argmax`).

use crate::scorer::{encode_pair, LlResult, TextEncoder, TokenRequest};
use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Doc {
    Choice { query: String, choices: Vec<String>, gold: usize, delimiter: String },
    Partial { contexts: Vec<String>, continuation: String, gold: usize, delimiter: String },
    Greedy { context: String, continuation: String },
}

impl Doc {
    /// The `(context, continuation)` requests of this document after `prefix` (description and
    /// few-shot examples).
    pub fn requests(&self, prefix: &str) -> Vec<(String, String)> {
        match self {
            Doc::Choice { query, choices, delimiter, .. } => {
                choices.iter().map(|c| (format!("{prefix}{query}"), format!("{delimiter}{c}"))).collect()
            }
            Doc::Partial { contexts, continuation, delimiter, .. } => {
                contexts.iter().map(|c| (format!("{prefix}{c}"), format!("{delimiter}{continuation}"))).collect()
            }
            Doc::Greedy { context, continuation } => vec![(format!("{prefix}{context}"), continuation.clone())],
        }
    }

    /// The document as a solved few-shot example.
    pub fn render_example(&self) -> String {
        match self {
            Doc::Choice { query, choices, gold, delimiter } => format!("{query}{delimiter}{}", choices[*gold]),
            Doc::Partial { contexts, continuation, gold, delimiter } => format!("{}{delimiter}{continuation}", contexts[*gold]),
            Doc::Greedy { context, continuation } => format!("{context}{continuation}"),
        }
    }

    pub fn gold(&self) -> Option<usize> {
        match self {
            Doc::Choice { gold, .. } | Doc::Partial { gold, .. } => Some(*gold),
            Doc::Greedy { .. } => None,
        }
    }

    /// Check indices and non-empty fields.
    pub fn validate(&self) -> Result<()> {
        match self {
            Doc::Choice { choices, gold, .. } => {
                anyhow::ensure!(choices.len() >= 2, "a multiple-choice document needs at least 2 choices");
                anyhow::ensure!(*gold < choices.len(), "gold index {gold} out of range ({} choices)", choices.len());
            }
            Doc::Partial { contexts, gold, continuation, .. } => {
                anyhow::ensure!(contexts.len() >= 2, "a partial-scoring document needs at least 2 contexts");
                anyhow::ensure!(*gold < contexts.len(), "gold index {gold} out of range ({} contexts)", contexts.len());
                anyhow::ensure!(!continuation.is_empty(), "a partial-scoring document needs a continuation");
            }
            Doc::Greedy { continuation, .. } => anyhow::ensure!(!continuation.is_empty(), "empty continuation"),
        }
        Ok(())
    }
}

/// Where few-shot examples come from.
#[derive(Debug, Clone)]
pub enum Fewshot {
    /// Sampled (seeded) from the task's own documents of the same group, never the document
    /// being evaluated (no training split ships offline).
    SampleSelf,
    /// The first k documents of a dedicated split (MMLU: `dev`, the harness' `first_n`).
    FirstN(Vec<Doc>),
}

/// A set of documents sharing a description and a few-shot source (MMLU: one per subject).
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    /// Prepended to every context (MMLU: "The following are questions (with answers) about …").
    pub description: String,
    pub fewshot: Fewshot,
}

/// Which metric a task reports in the paper's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Acc,
    AccNorm,
}

/// An evaluation task: documents in evaluation order.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub docs: Vec<Doc>,
    /// Group of each document (index into `groups`).
    pub group_of: Vec<usize>,
    pub groups: Vec<Group>,
    pub primary: Metric,
    /// Where the documents came from.
    pub source: String,
}

impl Task {
    pub fn single(name: &str, docs: Vec<Doc>, primary: Metric, source: String) -> Task {
        let n = docs.len();
        Task {
            name: name.into(),
            docs,
            group_of: vec![0; n],
            groups: vec![Group { name: name.into(), description: String::new(), fewshot: Fewshot::SampleSelf }],
            primary,
            source,
        }
    }

    /// Indices of the documents to evaluate: all, or the first `limit` — for multi-group tasks
    /// (MMLU) taken round-robin over the groups so every group is represented.
    pub fn selection(&self, limit: Option<usize>) -> Vec<usize> {
        let n = self.docs.len();
        let Some(limit) = limit.filter(|&l| l < n) else { return (0..n).collect() };
        if self.groups.len() <= 1 {
            return (0..limit).collect();
        }
        let mut per: Vec<Vec<usize>> = vec![Vec::new(); self.groups.len()];
        for (i, &g) in self.group_of.iter().enumerate() {
            per[g].push(i);
        }
        let mut out = Vec::with_capacity(limit);
        let mut k = 0;
        while out.len() < limit {
            for p in &per {
                if let Some(&i) = p.get(k) {
                    if out.len() < limit {
                        out.push(i);
                    }
                }
            }
            k += 1;
        }
        out.sort_unstable();
        out
    }

    /// Few-shot example indices for document `doc` (into the group's pool: the task's documents
    /// of that group for [`Fewshot::SampleSelf`], the dedicated list for [`Fewshot::FirstN`]).
    pub fn fewshot_examples(&self, doc: usize, shots: usize, seed: u64) -> Vec<Doc> {
        if shots == 0 {
            return Vec::new();
        }
        let g = self.group_of[doc];
        match &self.groups[g].fewshot {
            Fewshot::FirstN(pool) => pool.iter().take(shots).cloned().collect(),
            Fewshot::SampleSelf => {
                let pool: Vec<usize> = (0..self.docs.len()).filter(|&i| self.group_of[i] == g).collect();
                let me = pool.iter().position(|&i| i == doc);
                sample_fewshot(pool.len(), shots, me, seed, doc as u64).into_iter().map(|j| self.docs[pool[j]].clone()).collect()
            }
        }
    }

    /// Description plus few-shot examples, each followed by a blank line (the harness'
    /// `fewshot_delimiter` "\n\n").
    pub fn context_prefix(&self, doc: usize, shots: usize, seed: u64) -> String {
        let mut s = self.groups[self.group_of[doc]].description.clone();
        for ex in self.fewshot_examples(doc, shots, seed) {
            s.push_str(&ex.render_example());
            s.push_str("\n\n");
        }
        s
    }
}

/// Deterministic few-shot sampling: `k` distinct indices of a pool of `n`, never `exclude`,
/// from a ChaCha8 stream seeded by `(seed, doc_key)`: independent of evaluation order, batch
/// size and `--limit`. Like the harness, `k + 1` candidates are drawn and the document itself
/// dropped.
pub fn sample_fewshot(n: usize, k: usize, exclude: Option<usize>, seed: u64, doc_key: u64) -> Vec<usize> {
    let avail = n - usize::from(exclude.is_some_and(|e| e < n));
    let k = k.min(avail);
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ doc_key.wrapping_add(0x632B_E59B_D9B4_E019));
    let draw = (k + 1).min(n);
    let mut idx: Vec<usize> = rand::seq::index::sample(&mut rng, n, draw).into_vec();
    idx.retain(|&i| Some(i) != exclude);
    idx.truncate(k);
    idx
}

/// Scores of one document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocScore {
    /// Log-likelihood of each request.
    pub lls: Vec<f64>,
    pub is_greedy: Vec<bool>,
    pub gold: Option<usize>,
    pub pred: Option<usize>,
    pub pred_norm: Option<usize>,
    pub acc: f64,
    pub acc_norm: Option<f64>,
    pub acc_norm_bytes: Option<f64>,
}

fn argmax_f64(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Metrics of one document from its requests' results (in [`Doc::requests`] order).
pub fn score_doc(doc: &Doc, results: &[LlResult]) -> DocScore {
    let lls: Vec<f64> = results.iter().map(|r| r.ll).collect();
    let is_greedy: Vec<bool> = results.iter().map(|r| r.is_greedy).collect();
    let normed = |strings: &[String], bytes: bool| -> usize {
        let v: Vec<f64> = lls
            .iter()
            .zip(strings)
            .map(|(ll, s)| ll / (if bytes { s.len() } else { s.chars().count() }).max(1) as f64)
            .collect();
        argmax_f64(&v)
    };
    match doc {
        Doc::Greedy { .. } => DocScore {
            acc: f64::from(u8::from(is_greedy[0])),
            lls,
            is_greedy,
            gold: None,
            pred: None,
            pred_norm: None,
            acc_norm: None,
            acc_norm_bytes: None,
        },
        Doc::Choice { choices: strings, gold, .. } | Doc::Partial { contexts: strings, gold, .. } => {
            let pred = argmax_f64(&lls);
            let pred_norm = normed(strings, false);
            let pred_bytes = normed(strings, true);
            let hit = |p: usize| f64::from(u8::from(p == *gold));
            DocScore {
                acc: hit(pred),
                acc_norm: Some(hit(pred_norm)),
                acc_norm_bytes: Some(hit(pred_bytes)),
                pred: Some(pred),
                pred_norm: Some(pred_norm),
                gold: Some(*gold),
                lls,
                is_greedy,
            }
        }
    }
}

/// Tokenised requests of `doc` after `prefix`.
pub fn doc_token_requests(enc: &dyn TextEncoder, doc: &Doc, prefix: &str) -> Result<Vec<TokenRequest>> {
    doc.requests(prefix).iter().map(|(c, x)| encode_pair(enc, c, x)).collect()
}
