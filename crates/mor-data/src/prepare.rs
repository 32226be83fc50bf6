//! `mor data prepare`: documents -> token shards.
//!
//! Output folder layout:
//! ```text
//! OUT/manifest.json        what is below, how it was made, per-shard token counts and SHA-256
//! OUT/tokenizer.json       the tokenizer used (the folder is self-contained)
//! OUT/train-000000.bin     little-endian u16 (vocab <= 65536) or u32 token ids, no header
//! OUT/val-000000.bin       held-out documents, same format
//! ```
//! Every document's tokens are followed by the end-of-text id. Documents go to validation by
//! a seeded hash of their index (`val_fraction`) and/or by being among the first `val_docs`.
//!
//! Pipeline: a reader thread walks the inputs in sorted order and sends batches of pieces
//! (bounded channel, about `batch_bytes` of text each); the calling thread tokenizes each batch
//! in parallel (rayon) and appends the ids, in input order, to the open shards. When the open
//! train shard reaches `shard_tokens` (at a piece boundary), both open shards are closed:
//! written under a temporary name, fsynced, renamed, and the manifest is rewritten with the
//! input position reached. A rerun over the same inputs, tokenizer and options resumes from
//! that position; a folder made with another tokenizer is refused. Memory: a few batches of
//! text plus their ids, whatever the corpus size.

use crate::input::{self, InputFile, Piece, ReadOptions, TextDocs};
use crate::tokenizer::{hex, Tokenizer};
use crate::util::{temp_path, write_atomic};
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "mor-tokens-v1";

/// Options of [`prepare`].
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub text_field: String,
    pub text_docs: TextDocs,
    /// Fraction of documents (by seeded hash of the document index) held out for validation.
    pub val_fraction: f64,
    /// The first `val_docs` documents are held out too.
    pub val_docs: u64,
    pub seed: u64,
    /// Train shards close at the first piece boundary at or past this many tokens.
    pub shard_tokens: u64,
    /// Text per parallel work batch.
    pub batch_bytes: usize,
    pub progress: bool,
    /// Delete whatever the output folder holds and start over.
    pub force: bool,
    /// Testing hook: return an error after closing this many shards (simulates an interrupt).
    pub stop_after_shards: Option<usize>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            text_field: "text".into(),
            text_docs: TextDocs::File,
            val_fraction: 0.0,
            val_docs: 0,
            seed: 0,
            shard_tokens: 50_000_000,
            batch_bytes: 4 << 20,
            progress: true,
            force: false,
            stop_after_shards: None,
        }
    }
}

/// The settings that define the token stream; a resumed run must use the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamSettings {
    pub text_field: String,
    pub text_docs: TextDocs,
    pub val_fraction: f64,
    pub val_docs: u64,
    pub seed: u64,
    pub shard_tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputRecord {
    pub path: String,
    pub format: input::Format,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// File name inside the folder.
    pub file: String,
    pub tokens: u64,
    /// Documents that end in this shard.
    pub docs: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitRecord {
    pub tokens: u64,
    pub docs: u64,
    pub shards: Vec<ShardRecord>,
}

/// Where in the inputs the committed shards end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// Index into `inputs` of the file being read.
    pub file: usize,
    /// Pieces of that file already consumed.
    pub piece: u64,
    /// Documents started so far (the index the next document gets).
    pub docs_seen: u64,
    /// The document in progress (cut across pieces) goes to validation.
    pub in_val_doc: bool,
    /// Bytes of text consumed so far.
    pub text_bytes: u64,
    /// Empty documents skipped so far.
    pub empty_docs: u64,
}

/// `manifest.json` of a shard folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// False while preparation is under way or was interrupted.
    pub complete: bool,
    pub tokenizer_hash: String,
    pub vocab_size: usize,
    pub eot_id: u32,
    /// "u16" or "u32".
    pub dtype: String,
    pub settings: StreamSettings,
    pub inputs: Vec<InputRecord>,
    pub train: SplitRecord,
    pub val: SplitRecord,
    pub cursor: Cursor,
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let s = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let m: Manifest =
            serde_json::from_str(&s).with_context(|| format!("parsing {}", p.display()))?;
        ensure!(
            m.format == FORMAT,
            "{}: format {:?}, expected {FORMAT:?}",
            p.display(),
            m.format
        );
        Ok(m)
    }
    fn save(&self, dir: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(self)?;
        write_atomic(&dir.join(MANIFEST), s.as_bytes())
    }
    /// Bytes per token (2 or 4).
    pub fn token_bytes(&self) -> usize {
        if self.dtype == "u16" {
            2
        } else {
            4
        }
    }
    pub fn split(&self, name: &str) -> Result<&SplitRecord> {
        match name {
            "train" => Ok(&self.train),
            "val" | "validation" => Ok(&self.val),
            _ => bail!("unknown split {name:?} (train, val)"),
        }
    }
}

/// A hash of `x` into [0, 1) (SplitMix64).
pub fn unit_hash(seed: u64, x: u64) -> f64 {
    let mut z = seed ^ x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Tokenize `inputs` into the shard folder `out`. Returns the final manifest.
pub fn prepare(
    inputs: &[InputFile],
    tok: &Tokenizer,
    out: &Path,
    opts: &PrepareOptions,
) -> Result<Manifest> {
    ensure!(
        (0.0..1.0).contains(&opts.val_fraction),
        "val fraction {} is not in [0, 1)",
        opts.val_fraction
    );
    ensure!(opts.shard_tokens > 0, "shard size must be positive");
    let eot = tok
        .eot_id()
        .context("the tokenizer has no end-of-text token (<|endoftext|>)")?;
    let vocab = tok.vocab_size();
    let dtype = if vocab <= 1 << 16 { "u16" } else { "u32" };
    let settings = StreamSettings {
        text_field: opts.text_field.clone(),
        text_docs: opts.text_docs,
        val_fraction: opts.val_fraction,
        val_docs: opts.val_docs,
        seed: opts.seed,
        shard_tokens: opts.shard_tokens,
    };
    let records: Vec<InputRecord> = inputs
        .iter()
        .map(|f| InputRecord {
            path: f.path.display().to_string(),
            format: f.format,
            size: f.size,
        })
        .collect();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    // --- start or resume --------------------------------------------------------------------
    let mut m = match out.join(MANIFEST).exists() && !opts.force {
        true => {
            let m = Manifest::load(out)?;
            ensure!(
                m.tokenizer_hash == tok.hash(),
                "{} was prepared with another tokenizer (hash {}…, this one {}…); refusing to mix \
                 token ids: use another output folder, or --force to start over",
                out.display(),
                &m.tokenizer_hash[..12],
                &tok.hash()[..12]
            );
            ensure!(
                m.inputs == records && m.settings == settings,
                "{} holds a preparation of other inputs or settings; use another output folder, \
                 or --force to start over",
                out.display()
            );
            verify_committed(out, &m)?;
            m
        }
        false => {
            if opts.force {
                remove_prepared(out)?;
            }
            Manifest {
                format: FORMAT.into(),
                complete: false,
                tokenizer_hash: tok.hash().to_string(),
                vocab_size: vocab,
                eot_id: eot,
                dtype: dtype.into(),
                settings: settings.clone(),
                inputs: records,
                train: SplitRecord::default(),
                val: SplitRecord::default(),
                cursor: Cursor::default(),
            }
        }
    };
    if m.complete {
        return Ok(m);
    }
    // Leftovers of an interrupted run: temp files and shards the manifest does not list.
    clean_uncommitted(out, &m)?;
    write_atomic(&out.join("tokenizer.json"), tok.hf().to_string(true).map_err(|e| anyhow::anyhow!("{e}"))?.as_bytes())?;
    m.save(out)?;

    // --- the pipeline -----------------------------------------------------------------------
    let total_bytes: u64 = inputs.iter().map(|f| f.size).sum();
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total_bytes);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
            )
            .unwrap(),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let read_opts = ReadOptions {
        text_field: opts.text_field.clone(),
        text_docs: opts.text_docs,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<WorkBatch>>(2);
    let reader_inputs = inputs.to_vec();
    let start_cursor = m.cursor.clone();
    let batch_bytes = opts.batch_bytes.max(1);
    let reader = std::thread::spawn(move || {
        read_batches(&reader_inputs, &read_opts, &start_cursor, batch_bytes, &tx)
    });

    let width = m.token_bytes();
    let mut train = ShardWriter::new(out, "train", m.train.shards.len(), width);
    let mut val = ShardWriter::new(out, "val", m.val.shards.len(), width);
    let mut cursor = m.cursor.clone();
    let t0 = Instant::now();
    let mut bytes_this_run = 0u64;
    let mut shards_closed = 0usize;
    let result = (|| -> Result<()> {
        for batch in rx.iter() {
            let batch = batch?;
            let ids: Vec<Vec<u32>> = batch
                .pieces
                .par_iter()
                .map(|p| tok.encode(&p.piece.text))
                .collect::<Result<_>>()?;
            for (p, ids) in batch.pieces.iter().zip(ids) {
                let piece = &p.piece;
                let empty_doc = piece.doc_start && piece.doc_end && piece.text.trim().is_empty();
                if empty_doc {
                    cursor.empty_docs += 1;
                } else {
                    if piece.doc_start {
                        let d = cursor.docs_seen;
                        cursor.docs_seen += 1;
                        cursor.in_val_doc = d < opts.val_docs
                            || (opts.val_fraction > 0.0
                                && unit_hash(opts.seed, d) < opts.val_fraction);
                    }
                    let w = if cursor.in_val_doc { &mut val } else { &mut train };
                    w.push(&ids)?;
                    if piece.doc_end {
                        w.push(&[eot])?;
                        w.docs += 1;
                    }
                }
                cursor.text_bytes += piece.text.len() as u64;
                bytes_this_run += piece.text.len() as u64;
                cursor.file = p.file;
                cursor.piece = p.index + 1;
                if train.tokens >= opts.shard_tokens {
                    commit(out, &mut m, &mut train, &mut val, &cursor)?;
                    shards_closed += 1;
                    if opts.stop_after_shards == Some(shards_closed) {
                        bail!("stopped after {shards_closed} shards (testing hook)");
                    }
                }
            }
            bar.set_position(batch.progress_bytes);
            bar.set_message(format!(
                "{} docs, {} tokens",
                cursor.docs_seen,
                m.train.tokens + m.val.tokens + train.tokens + val.tokens
            ));
        }
        // The reader finished: the whole input is consumed.
        cursor.file = inputs.len();
        cursor.piece = 0;
        if train.tokens > 0 || val.tokens > 0 {
            commit(out, &mut m, &mut train, &mut val, &cursor)?;
        }
        m.cursor = cursor.clone();
        m.complete = true;
        m.save(out)?;
        Ok(())
    })();
    drop(rx);
    let reader_result = reader.join();
    bar.finish_and_clear();
    if let Err(e) = result {
        train.discard();
        val.discard();
        return Err(e);
    }
    match reader_result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!("the input reader thread panicked"),
    }
    let secs = t0.elapsed().as_secs_f64();
    if opts.progress {
        eprintln!(
            "prepared {}: {} train tokens in {} shards, {} val tokens, {} docs ({} empty skipped); {:.1} MB of text in {:.1}s ({:.1} MB/s)",
            out.display(),
            m.train.tokens,
            m.train.shards.len(),
            m.val.tokens,
            m.train.docs + m.val.docs,
            m.cursor.empty_docs,
            bytes_this_run as f64 / 1e6,
            secs,
            bytes_this_run as f64 / 1e6 / secs.max(1e-9)
        );
    }
    Ok(m)
}

/// Close both open shards and record the position reached.
fn commit(
    out: &Path,
    m: &mut Manifest,
    train: &mut ShardWriter,
    val: &mut ShardWriter,
    cursor: &Cursor,
) -> Result<()> {
    for (w, split) in [(train, &mut m.train), (val, &mut m.val)] {
        if let Some(rec) = w.finish()? {
            split.tokens += rec.tokens;
            split.docs += rec.docs;
            split.shards.push(rec);
        }
    }
    m.cursor = cursor.clone();
    m.save(out)
}

/// Check that the shards a manifest lists are there with the right sizes.
pub fn verify_committed(dir: &Path, m: &Manifest) -> Result<()> {
    for s in m.train.shards.iter().chain(&m.val.shards) {
        let p = dir.join(&s.file);
        let len = std::fs::metadata(&p)
            .with_context(|| format!("shard {} listed in the manifest is missing", p.display()))?
            .len();
        ensure!(
            len == s.tokens * m.token_bytes() as u64,
            "shard {} has {len} bytes, the manifest says {} tokens of {}",
            p.display(),
            s.tokens,
            m.dtype
        );
    }
    Ok(())
}

/// Recompute every shard's SHA-256 and compare with the manifest.
pub fn verify_checksums(dir: &Path, m: &Manifest) -> Result<()> {
    verify_committed(dir, m)?;
    for s in m.train.shards.iter().chain(&m.val.shards) {
        let p = dir.join(&s.file);
        let mut h = Sha256::new();
        let mut f = std::fs::File::open(&p)?;
        std::io::copy(&mut f, &mut h)?;
        let got = hex(&h.finalize());
        ensure!(got == s.sha256, "shard {} is corrupt (checksum mismatch)", p.display());
    }
    Ok(())
}

fn is_ours(name: &str) -> bool {
    (name.starts_with("train-") || name.starts_with("val-")) && name.contains(".bin")
        || name.starts_with("manifest.json")
        || name.starts_with("tokenizer.json")
}

fn clean_uncommitted(out: &Path, m: &Manifest) -> Result<()> {
    let keep: std::collections::HashSet<&str> = m
        .train
        .shards
        .iter()
        .chain(&m.val.shards)
        .map(|s| s.file.as_str())
        .chain(["manifest.json", "tokenizer.json"])
        .collect();
    for e in std::fs::read_dir(out)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_ours(&name) && !keep.contains(name.as_str()) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing stale {}", e.path().display()))?;
        }
    }
    Ok(())
}

fn remove_prepared(out: &Path) -> Result<()> {
    for e in std::fs::read_dir(out)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_ours(&name) {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// Appends ids to `<split>-NNNNNN.bin` under a temporary name.
struct ShardWriter {
    dir: PathBuf,
    split: &'static str,
    next_index: usize,
    width: usize,
    file: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
    hash: Sha256,
    tokens: u64,
    docs: u64,
    buf: Vec<u8>,
}

impl ShardWriter {
    fn new(dir: &Path, split: &'static str, next_index: usize, width: usize) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            split,
            next_index,
            width,
            file: None,
            hash: Sha256::new(),
            tokens: 0,
            docs: 0,
            buf: Vec::new(),
        }
    }
    fn name(&self) -> String {
        format!("{}-{:06}.bin", self.split, self.next_index)
    }
    fn push(&mut self, ids: &[u32]) -> Result<()> {
        if self.file.is_none() {
            let tmp = temp_path(&self.dir.join(self.name()));
            let f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            self.file = Some((tmp, std::io::BufWriter::with_capacity(1 << 20, f)));
        }
        self.buf.clear();
        if self.width == 2 {
            for &t in ids {
                self.buf.extend_from_slice(&(t as u16).to_le_bytes());
            }
        } else {
            for &t in ids {
                self.buf.extend_from_slice(&t.to_le_bytes());
            }
        }
        self.hash.update(&self.buf);
        let (p, w) = self.file.as_mut().unwrap();
        w.write_all(&self.buf)
            .with_context(|| format!("writing {}", p.display()))?;
        self.tokens += ids.len() as u64;
        Ok(())
    }
    /// Rename the open shard to its final name; None if nothing was written.
    fn finish(&mut self) -> Result<Option<ShardRecord>> {
        let Some((tmp, w)) = self.file.take() else {
            self.docs = 0;
            return Ok(None);
        };
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        let name = self.name();
        std::fs::rename(&tmp, self.dir.join(&name))
            .with_context(|| format!("renaming {}", tmp.display()))?;
        let h = std::mem::replace(&mut self.hash, Sha256::new());
        let rec = ShardRecord {
            file: name,
            tokens: self.tokens,
            docs: self.docs,
            sha256: hex(&h.finalize()),
        };
        self.tokens = 0;
        self.docs = 0;
        self.next_index += 1;
        Ok(Some(rec))
    }
    fn discard(&mut self) {
        if let Some((tmp, w)) = self.file.take() {
            drop(w);
            std::fs::remove_file(tmp).ok();
        }
    }
}

struct TaggedPiece {
    file: usize,
    index: u64,
    piece: Piece,
}

struct WorkBatch {
    pieces: Vec<TaggedPiece>,
    /// Estimated input bytes consumed after this batch (for the progress bar).
    progress_bytes: u64,
}

fn read_batches(
    inputs: &[InputFile],
    opts: &ReadOptions,
    start: &Cursor,
    batch_bytes: usize,
    tx: &std::sync::mpsc::SyncSender<Result<WorkBatch>>,
) -> Result<()> {
    let mut done_bytes: u64 = inputs[..start.file.min(inputs.len())].iter().map(|f| f.size).sum();
    let mut cur = Vec::new();
    let mut cur_bytes = 0usize;
    for (fi, f) in inputs.iter().enumerate().skip(start.file) {
        let mut r = match input::open(f, opts) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e));
                return Ok(());
            }
        };
        let skip = if fi == start.file { start.piece } else { 0 };
        let mut index = 0u64;
        loop {
            let p = match r.next_piece() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Ok(());
                }
            };
            index += 1;
            if index <= skip {
                continue;
            }
            cur_bytes += p.text.len();
            cur.push(TaggedPiece { file: fi, index: index - 1, piece: p });
            if cur_bytes >= batch_bytes {
                let progress_bytes = done_bytes + (r.progress() * f.size as f64) as u64;
                let b = WorkBatch { pieces: std::mem::take(&mut cur), progress_bytes };
                cur_bytes = 0;
                if tx.send(Ok(b)).is_err() {
                    return Ok(()); // the consumer stopped
                }
            }
        }
        done_bytes += f.size;
    }
    if !cur.is_empty() {
        let _ = tx.send(Ok(WorkBatch { pieces: cur, progress_bytes: done_bytes }));
    }
    Ok(())
}
