//! Running tasks and reporting: per-task aggregates and the paper's table
//! (LD, HS, PQ, WG, ARC = mean of easy/challenge, MMLU, Avg).

use crate::scorer::{Scorer, TextEncoder};
use crate::task::{doc_token_requests, score_doc, DocScore, Metric, Task};
use anyhow::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub shots: usize,
    pub seed: u64,
    pub limit: Option<usize>,
    /// Keep per-document scores in the report.
    pub per_doc: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { shots: 0, seed: 1234, limit: None, per_doc: false }
    }
}

/// One document's record in a report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocRecord {
    pub index: usize,
    #[serde(flatten)]
    pub score: DocScore,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskReport {
    pub task: String,
    pub docs: usize,
    pub requests: usize,
    pub shots: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm_stderr: Option<f64>,
    /// acc_norm with UTF-8 byte lengths instead of characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm_bytes: Option<f64>,
    /// Greedy (LAMBADA-style) tasks: `exp(-mean ll)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    pub metric: Metric,
    /// The value of `metric` (what the table shows).
    pub value: f64,
    pub seconds: f64,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_doc: Option<Vec<DocRecord>>,
}

fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (m, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    (m, (var / n).sqrt())
}

/// Evaluate one task: build every request of the selected documents, score them all in one
/// call (so the scorer can batch across documents), then aggregate.
pub fn run_task(task: &Task, enc: &dyn TextEncoder, scorer: &mut dyn Scorer, opts: &RunOptions) -> Result<TaskReport> {
    let t0 = std::time::Instant::now();
    let sel = task.selection(opts.limit);
    let mut reqs = Vec::new();
    let mut spans = Vec::with_capacity(sel.len());
    for &i in &sel {
        let prefix = task.context_prefix(i, opts.shots, opts.seed);
        let r = doc_token_requests(enc, &task.docs[i], &prefix)?;
        spans.push(reqs.len()..reqs.len() + r.len());
        reqs.extend(r);
    }
    let results = scorer.score(&reqs)?;
    let scores: Vec<DocScore> = sel.iter().zip(&spans).map(|(&i, sp)| score_doc(&task.docs[i], &results[sp.clone()])).collect();
    let accs: Vec<f64> = scores.iter().map(|s| s.acc).collect();
    let (acc, acc_stderr) = mean_stderr(&accs);
    let norms: Vec<f64> = scores.iter().filter_map(|s| s.acc_norm).collect();
    let bytes: Vec<f64> = scores.iter().filter_map(|s| s.acc_norm_bytes).collect();
    let (acc_norm, acc_norm_stderr) = if norms.len() == scores.len() && !norms.is_empty() {
        let (m, e) = mean_stderr(&norms);
        (Some(m), Some(e))
    } else {
        (None, None)
    };
    let acc_norm_bytes = (bytes.len() == scores.len() && !bytes.is_empty()).then(|| mean_stderr(&bytes).0);
    let greedy = scores.iter().all(|s| s.gold.is_none()) && !scores.is_empty();
    let perplexity = greedy.then(|| (-scores.iter().map(|s| s.lls[0]).sum::<f64>() / scores.len() as f64).exp());
    let value = match task.primary {
        Metric::AccNorm => acc_norm.unwrap_or(acc),
        Metric::Acc => acc,
    };
    Ok(TaskReport {
        task: task.name.clone(),
        docs: sel.len(),
        requests: reqs.len(),
        shots: opts.shots,
        acc,
        acc_stderr,
        acc_norm,
        acc_norm_stderr,
        acc_norm_bytes,
        perplexity,
        metric: task.primary,
        value,
        seconds: t0.elapsed().as_secs_f64(),
        source: task.source.clone(),
        per_doc: opts
            .per_doc
            .then(|| sel.iter().zip(scores).map(|(&index, score)| DocRecord { index, score }).collect()),
    })
}

/// The paper's columns (fractions in [0, 1]; `None` where the task was not run).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PaperTable {
    #[serde(rename = "LD")]
    pub ld: Option<f64>,
    #[serde(rename = "HS")]
    pub hs: Option<f64>,
    #[serde(rename = "PQ")]
    pub pq: Option<f64>,
    #[serde(rename = "WG")]
    pub wg: Option<f64>,
    #[serde(rename = "ARC")]
    pub arc: Option<f64>,
    #[serde(rename = "MMLU")]
    pub mmlu: Option<f64>,
    /// Unweighted mean of the six columns (only when all six are present).
    #[serde(rename = "Avg")]
    pub avg: Option<f64>,
}

impl PaperTable {
    pub fn from_reports(reports: &[TaskReport]) -> PaperTable {
        let get = |n: &str| reports.iter().find(|r| r.task == n).map(|r| r.value);
        let arc = match (get("arc_easy"), get("arc_challenge")) {
            (Some(e), Some(c)) => Some((e + c) / 2.0),
            _ => None,
        };
        let mut t = PaperTable { ld: get("lambada"), hs: get("hellaswag"), pq: get("piqa"), wg: get("winogrande"), arc, mmlu: get("mmlu"), avg: None };
        let cols = [t.ld, t.hs, t.pq, t.wg, t.arc, t.mmlu];
        if cols.iter().all(Option::is_some) {
            t.avg = Some(cols.iter().map(|c| c.unwrap()).sum::<f64>() / 6.0);
        }
        t
    }

    /// Two text lines (header, values in percent with one decimal, `-` for missing).
    pub fn render(&self) -> String {
        let cols = [("LD", self.ld), ("HS", self.hs), ("PQ", self.pq), ("WG", self.wg), ("ARC", self.arc), ("MMLU", self.mmlu), ("Avg", self.avg)];
        let head: Vec<String> = cols.iter().map(|(n, _)| format!("{n:>6}")).collect();
        let vals: Vec<String> = cols.iter().map(|(_, v)| v.map_or(format!("{:>6}", "-"), |x| format!("{:>6.1}", 100.0 * x))).collect();
        format!("{}\n{}\n", head.join(""), vals.join(""))
    }
}

/// A per-task text table: task, docs, acc, acc_norm, metric value.
pub fn render_tasks(reports: &[TaskReport]) -> String {
    let mut s = format!("{:<16}{:>7}{:>9}{:>10}{:>9}{:>9}\n", "task", "docs", "acc", "acc_norm", "metric", "sec");
    for r in reports {
        let norm = r.acc_norm.map_or("-".to_string(), |x| format!("{:.4}", x));
        let metric = match r.metric {
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
        };
        s.push_str(&format!("{:<16}{:>7}{:>9.4}{:>10}{:>9}{:>9.1}\n", r.task, r.docs, r.acc, norm, metric, r.seconds));
    }
    s
}
