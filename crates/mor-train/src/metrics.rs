//! Append-only JSONL metrics log: one JSON object per line, one line per logged step, written
//! with a single `write` and flushed to the OS per line (a crash loses at most a torn last line,
//! which the reader skips).
//!
//! Step convention: `step` is the number of optimizer steps completed when the record is logged
//! (1 after the first update), the same number a checkpoint saved at that moment stores. On
//! resume from a checkpoint at step `S`, [`MetricsWriter::resume`] drops every record with
//! `step > S`, so the resumed run does not duplicate steps.
//!
//! ```no_run
//! use mor_train::metrics::{MetricsWriter, Record};
//! # fn main() -> anyhow::Result<()> {
//! let mut log = MetricsWriter::create("run/metrics.jsonl".as_ref())?;
//! log.log(&Record::train(1, 10.9, 0.0, 12_345.0, 3.2).with("aux_loss", 0.69))?;
//! log.log(&Record::new(1).with("val_loss", 10.8))?;
//! # Ok(()) }
//! ```

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of the log: the step and any fields. Standard training fields are `loss`, `lr`,
/// `tokens_per_s`, `grad_norm`; validation uses `val_loss`. Non-finite floats are stored as `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: u64,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Record {
    /// A record with no fields.
    pub fn new(step: u64) -> Self {
        Record { step, fields: Map::new() }
    }

    /// The standard training-step record.
    pub fn train(step: u64, loss: f64, lr: f64, tokens_per_s: f64, grad_norm: f64) -> Self {
        Record::new(step)
            .with("loss", loss)
            .with("lr", lr)
            .with("tokens_per_s", tokens_per_s)
            .with("grad_norm", grad_norm)
    }

    /// Add (or overwrite) a field. The key `step` is reserved and ignored.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        if key != "step" {
            self.fields.insert(key.to_string(), value.into());
        }
        self
    }

    /// Add every field of `extra` (except `step`).
    pub fn extend(mut self, extra: Map<String, Value>) -> Self {
        for (k, v) in extra {
            if k != "step" {
                self.fields.insert(k, v);
            }
        }
        self
    }

    /// A numeric field, if present and a number.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.fields.get(key).and_then(Value::as_f64)
    }
}

/// Writer of a JSONL metrics file.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Start a new log at `path` (parent folders created; an existing file is emptied).
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let file = File::create(path).with_context(|| format!("cannot create metrics log {}", path.display()))?;
        Ok(MetricsWriter { path: path.to_path_buf(), file })
    }

    /// Append to `path` as it is (created if missing).
    pub fn append(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open metrics log {}", path.display()))?;
        Ok(MetricsWriter { path: path.to_path_buf(), file })
    }

    /// Resume a run restored at `resumed_step`: drop records with `step > resumed_step` (and torn
    /// lines), then append.
    pub fn resume(path: &Path, resumed_step: u64) -> Result<Self> {
        truncate_metrics(path, resumed_step)?;
        Self::append(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one record as one line and flush it.
    pub fn log(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record).context("cannot serialise a metrics record")?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("cannot write metrics log {}", self.path.display()))
    }

    /// Shorthand for a training step with extra fields.
    pub fn log_step(
        &mut self,
        step: u64,
        loss: f64,
        lr: f64,
        tokens_per_s: f64,
        grad_norm: f64,
        extra: Map<String, Value>,
    ) -> Result<()> {
        self.log(&Record::train(step, loss, lr, tokens_per_s, grad_norm).extend(extra))
    }

    /// fsync the log (e.g. right after saving a checkpoint).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().with_context(|| format!("cannot fsync {}", self.path.display()))
    }
}

fn parse_line(line: &str) -> Option<Record> {
    serde_json::from_str::<Record>(line).ok()
}

/// All records of a log in file order. Blank and unparsable lines (e.g. a line torn by a crash)
/// are skipped. A missing file is an error.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read metrics log {}", path.display()))?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).filter_map(parse_line).collect())
}

/// Rewrite the log keeping only records with `step <= resumed_step` (lines kept byte-for-byte;
/// unparsable lines dropped). Atomic (temp file + rename). Returns how many lines were dropped.
/// A missing file is not an error (nothing to truncate).
pub fn truncate_metrics(path: &Path, resumed_step: u64) -> Result<usize> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read metrics log {}", path.display())),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Some(r) if r.step <= resumed_step => {
                kept.push_str(line);
                kept.push('\n');
            }
            _ => dropped += 1,
        }
    }
    if dropped == 0 && text.ends_with('\n') {
        return Ok(0);
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(kept.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(dropped)
}

/// `(step, value)` pairs of a numeric field, in file order, non-finite / missing values skipped
/// (input for [`crate::plot::plot_loss_curve`]).
pub fn series(records: &[Record], key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| r.get_f64(key).filter(|v| v.is_finite()).map(|v| (r.step as f64, v)))
        .collect()
}
