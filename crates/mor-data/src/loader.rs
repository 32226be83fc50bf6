//! The training data loader.
//!
//! Packing (the paper's, §7.1 of the spec): documents are concatenated, each followed by the
//! end-of-text id, into one token stream (all shards of a split, in order). The stream is cut
//! into rows of `seq_len + 1` tokens with stride `seq_len` — row `r` is
//! `stream[r*L .. r*L + L + 1]` — so consecutive rows share one token and every token after
//! the first is a target exactly once per epoch. `inputs = row[..L]`, `targets = row[1..]`.
//! There are `(T - 1) / L` rows in a stream of `T` tokens; the tail is dropped.
//!
//! Order: [`Order::Sequential`] reads rows in stream order (the paper's order);
//! [`Order::Shuffle`] visits the rows of each epoch in a permutation drawn from a ChaCha8 RNG
//! seeded by `(seed, epoch)`. Either way the order is a pure function of the seed, so
//! [`TokenSource::state`] — a small serde struct (epoch, rows consumed, seed, order, a
//! fingerprint of the data) — is an exact position: after [`TokenSource::restore`] the next
//! batch is the one that would have come next, nothing is replayed or skipped.
//!
//! Document boundaries: [`Batch::doc_starts`] holds, per row, the offsets `i` in `0..L` at which
//! a document starts in `inputs` (always `0`, then every `i` with `inputs[i-1] == eot`), for
//! models that mask attention across documents. The paper does not mask; ignore it then.
//!
//! Data parallelism: [`LoaderOptions::rank`] / [`LoaderOptions::world`] give each rank every
//! `world`-th row of the common order.
//!
//! ```no_run
//! use mor_data::{ShardSource, TokenSource, loader::LoaderOptions};
//! let mut src = ShardSource::open("data/shards", "train", &LoaderOptions::default())?;
//! let b = src.next_batch(8, 256)?;            // b.inputs.len() == 8 * 256
//! let saved = serde_json::to_string(&src.state())?;  // store in the checkpoint
//! // ... later, in a new process:
//! let mut src = ShardSource::open("data/shards", "train", &LoaderOptions::default())?;
//! src.restore(&serde_json::from_str(&saved)?)?;
//! # Ok::<(), anyhow::Error>(())
//! ```

use crate::prepare::Manifest;
use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// A batch of packed rows, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `batch * seq_len` input ids.
    pub inputs: Vec<u32>,
    /// `batch * seq_len` target ids (inputs shifted left by one).
    pub targets: Vec<u32>,
    pub batch: usize,
    pub seq_len: usize,
    /// Per row, the offsets in `0..seq_len` where a document starts (always including 0).
    pub doc_starts: Vec<Vec<u32>>,
}

impl Batch {
    /// Assemble from `batch` rows of `seq_len + 1` tokens each.
    pub fn from_rows(rows: &[u32], batch: usize, seq_len: usize, eot: Option<u32>) -> Batch {
        assert_eq!(rows.len(), batch * (seq_len + 1));
        let mut inputs = Vec::with_capacity(batch * seq_len);
        let mut targets = Vec::with_capacity(batch * seq_len);
        let mut doc_starts = Vec::with_capacity(batch);
        for row in rows.chunks_exact(seq_len + 1) {
            inputs.extend_from_slice(&row[..seq_len]);
            targets.extend_from_slice(&row[1..]);
            let mut starts = vec![0u32];
            if let Some(e) = eot {
                starts.extend(
                    (1..seq_len)
                        .filter(|&i| row[i - 1] == e)
                        .map(|i| i as u32),
                );
            }
            doc_starts.push(starts);
        }
        Batch {
            inputs,
            targets,
            batch,
            seq_len,
            doc_starts,
        }
    }
    pub fn row_inputs(&self, b: usize) -> &[u32] {
        &self.inputs[b * self.seq_len..(b + 1) * self.seq_len]
    }
    pub fn row_targets(&self, b: usize) -> &[u32] {
        &self.targets[b * self.seq_len..(b + 1) * self.seq_len]
    }
}

/// Row order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Stream order, as the paper reads FineWeb-Edu.
    #[default]
    Sequential,
    /// A fresh seeded permutation of the rows each epoch.
    Shuffle,
}

/// The exact position of a [`TokenSource`]; save it in checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoaderState {
    /// Identifies the data (shard checksums, or the synthetic generator's parameters).
    pub fingerprint: String,
    pub order: Order,
    pub seed: u64,
    /// Row length the position refers to (0 before the first batch).
    pub seq_len: usize,
    pub epoch: u64,
    /// Rows of this rank consumed in the current epoch.
    pub row: u64,
    /// Rows consumed in total, all epochs.
    pub rows_total: u64,
}

/// Anything that yields training batches.
pub trait TokenSource: Send {
    /// The next `batch` rows of `seq_len` inputs (+1 target) each.
    fn next_batch(&mut self, batch: usize, seq_len: usize) -> Result<Batch>;
    /// The current position.
    fn state(&self) -> LoaderState;
    /// Continue from a saved position (same data, order and seed).
    fn restore(&mut self, s: &LoaderState) -> Result<()>;
    /// Size of the id space (embedding rows needed).
    fn vocab_size(&self) -> usize;
    /// The document separator id, if any.
    fn eot_id(&self) -> Option<u32>;
}

/// Options of [`ShardSource::open`].
#[derive(Clone, Debug)]
pub struct LoaderOptions {
    pub order: Order,
    pub seed: u64,
    /// This process's index among `world` data-parallel ranks.
    pub rank: usize,
    pub world: usize,
    /// Recompute shard checksums on open (reads everything once).
    pub verify_checksums: bool,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            order: Order::Sequential,
            seed: 0,
            rank: 0,
            world: 1,
            verify_checksums: false,
        }
    }
}

struct Shard {
    map: memmap2::Mmap,
    /// First stream position of this shard.
    start: u64,
    tokens: u64,
}

/// Rows from a folder of token shards made by [`crate::prepare::prepare`].
pub struct ShardSource {
    shards: Vec<Shard>,
    width: usize,
    total: u64,
    vocab: usize,
    eot: u32,
    opts: LoaderOptions,
    state: LoaderState,
    perm: Option<(u64, usize, Vec<u64>)>, // (epoch, seq_len, permutation)
    manifest: Manifest,
}

impl ShardSource {
    /// Open split `split` ("train" or "val") of the shard folder `dir`.
    pub fn open(dir: impl AsRef<Path>, split: &str, opts: &LoaderOptions) -> Result<Self> {
        let dir = dir.as_ref();
        ensure!(opts.world >= 1 && opts.rank < opts.world, "rank {} of world {}", opts.rank, opts.world);
        let m = Manifest::load(dir)?;
        ensure!(
            m.complete,
            "{} is not completely prepared (interrupted?): rerun `mor data prepare` with the same arguments to finish it",
            dir.display()
        );
        crate::prepare::verify_committed(dir, &m)?;
        if opts.verify_checksums {
            crate::prepare::verify_checksums(dir, &m)?;
        }
        let rec = m.split(split)?;
        ensure!(rec.tokens > 0, "{}: split {split:?} has no tokens", dir.display());
        let width = m.token_bytes();
        let mut shards = Vec::new();
        let mut start = 0;
        let mut h = Sha256::new();
        h.update(m.tokenizer_hash.as_bytes());
        for s in &rec.shards {
            let p = dir.join(&s.file);
            let f = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
            // SAFETY: shards are written once (temp + rename) and never modified in place.
            let map = unsafe { memmap2::Mmap::map(&f) }
                .with_context(|| format!("memory-mapping {}", p.display()))?;
            h.update(s.sha256.as_bytes());
            shards.push(Shard { map, start, tokens: s.tokens });
            start += s.tokens;
        }
        let fingerprint = format!("shards:{split}:{}", &crate::tokenizer::hex(&h.finalize())[..32]);
        let state = LoaderState {
            fingerprint,
            order: opts.order,
            seed: opts.seed,
            ..Default::default()
        };
        Ok(ShardSource {
            shards,
            width,
            total: start,
            vocab: m.vocab_size,
            eot: m.eot_id,
            opts: opts.clone(),
            state,
            perm: None,
            manifest: m,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// Tokens in the split's stream.
    pub fn total_tokens(&self) -> u64 {
        self.total
    }
    /// Rows of all ranks per epoch at this row length.
    pub fn rows_per_epoch(&self, seq_len: usize) -> u64 {
        (self.total.saturating_sub(1)) / seq_len as u64
    }
    /// Rows of this rank per epoch.
    pub fn rank_rows_per_epoch(&self, seq_len: usize) -> u64 {
        self.rows_per_epoch(seq_len) / self.opts.world as u64
    }

    /// Copy stream tokens `[start, start + out.len())` into `out`.
    pub fn read_tokens(&self, start: u64, out: &mut [u32]) {
        let mut pos = start;
        let mut o = 0;
        let mut si = self.shards.partition_point(|s| s.start + s.tokens <= pos);
        while o < out.len() {
            let s = &self.shards[si];
            let off = (pos - s.start) as usize;
            let n = ((s.tokens as usize) - off).min(out.len() - o);
            let bytes = &s.map[off * self.width..(off + n) * self.width];
            if self.width == 2 {
                for (d, c) in out[o..o + n].iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = u16::from_le_bytes([c[0], c[1]]) as u32;
                }
            } else {
                for (d, c) in out[o..o + n].iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = u32::from_le_bytes(c.try_into().unwrap());
                }
            }
            o += n;
            pos += n as u64;
            si += 1;
        }
    }

    /// Stream row index of this rank's `j`-th row in `epoch`.
    fn row_index(&mut self, epoch: u64, j: u64, seq_len: usize) -> u64 {
        let g = j * self.opts.world as u64 + self.opts.rank as u64;
        match self.state.order {
            Order::Sequential => g,
            Order::Shuffle => {
                let fresh = !matches!(&self.perm, Some((e, l, _)) if *e == epoch && *l == seq_len);
                if fresh {
                    let n = self.rows_per_epoch(seq_len);
                    let mut p: Vec<u64> = (0..n).collect();
                    let mut rng = ChaCha8Rng::seed_from_u64(mix(self.state.seed, epoch));
                    p.shuffle(&mut rng);
                    self.perm = Some((epoch, seq_len, p));
                }
                self.perm.as_ref().unwrap().2[g as usize]
            }
        }
    }
}

fn mix(seed: u64, epoch: u64) -> u64 {
    seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Common position logic: adopt `seq_len` on first use; convert or refuse a change.
fn check_seq_len(state: &mut LoaderState, seq_len: usize) -> Result<()> {
    ensure!(seq_len > 0, "seq_len must be positive");
    if state.seq_len == seq_len {
        return Ok(());
    }
    if state.seq_len == 0 || (state.row == 0 && state.epoch == 0) {
        state.seq_len = seq_len;
        return Ok(());
    }
    match state.order {
        Order::Sequential => {
            // Same tokens consumed, counted in rows of the new length (rounded up: no replay).
            let tokens = state.row * state.seq_len as u64;
            state.row = tokens.div_ceil(seq_len as u64);
            state.seq_len = seq_len;
            Ok(())
        }
        Order::Shuffle => bail!(
            "seq_len changed from {} to {seq_len} in the middle of a shuffled epoch; the row \
             order depends on it (finish the epoch or use sequential order)",
            state.seq_len
        ),
    }
}

fn check_restore(mine: &LoaderState, s: &LoaderState) -> Result<()> {
    ensure!(
        s.fingerprint == mine.fingerprint,
        "the saved loader position is for other data ({}), this source is {}",
        s.fingerprint,
        mine.fingerprint
    );
    ensure!(
        s.order == mine.order && s.seed == mine.seed,
        "the saved loader position uses order {:?} seed {}, this source {:?} seed {}",
        s.order,
        s.seed,
        mine.order,
        mine.seed
    );
    Ok(())
}

impl TokenSource for ShardSource {
    fn next_batch(&mut self, batch: usize, seq_len: usize) -> Result<Batch> {
        check_seq_len(&mut self.state, seq_len)?;
        let per_epoch = self.rank_rows_per_epoch(seq_len);
        ensure!(
            per_epoch > 0,
            "the data ({} tokens) is too small for one row of {seq_len}+1 tokens per rank",
            self.total
        );
        let mut rows = vec![0u32; batch * (seq_len + 1)];
        for b in 0..batch {
            if self.state.row >= per_epoch {
                self.state.epoch += 1;
                self.state.row = 0;
            }
            let r = self.row_index(self.state.epoch, self.state.row, seq_len);
            let buf = &mut rows[b * (seq_len + 1)..(b + 1) * (seq_len + 1)];
            self.read_tokens(r * seq_len as u64, buf);
            self.state.row += 1;
            self.state.rows_total += 1;
        }
        Ok(Batch::from_rows(&rows, batch, seq_len, Some(self.eot)))
    }
    fn state(&self) -> LoaderState {
        self.state.clone()
    }
    fn restore(&mut self, s: &LoaderState) -> Result<()> {
        check_restore(&self.state, s)?;
        self.state = s.clone();
        Ok(())
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn eot_id(&self) -> Option<u32> {
        Some(self.eot)
    }
}

/// Deterministic generated tokens with learnable structure, for tests and smoke runs.
///
/// Id 0 is the end-of-text separator. Documents are walks of a fixed random Markov chain over
/// ids `1..vocab` (each id has 4 successors with probabilities 1/2, 1/4, 1/8, 1/8: about 1.2
/// nats of entropy per token against ln(vocab) for a model that knows nothing); half the
/// documents then repeat their walk once (copyable by attention). Each row is generated from
/// `(seed, row number)` alone, so the position is just a row counter. Rows are sequential
/// ("epochs" never end); `order` in the state is always `Sequential`.
#[derive(Clone, Debug)]
pub struct SyntheticSource {
    vocab: usize,
    succ: Vec<u32>,
    state: LoaderState,
}

impl SyntheticSource {
    pub const BRANCHING: usize = 4;

    pub fn new(vocab: usize, seed: u64) -> Self {
        assert!(vocab >= 8, "synthetic vocab must be at least 8");
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_CAFE);
        let succ = (0..vocab * Self::BRANCHING)
            .map(|_| rng.gen_range(1..vocab as u32))
            .collect();
        SyntheticSource {
            vocab,
            succ,
            state: LoaderState {
                fingerprint: format!("synthetic:v1:vocab={vocab}:seed={seed}"),
                order: Order::Sequential,
                seed,
                ..Default::default()
            },
        }
    }

    fn step(&self, cur: u32, rng: &mut ChaCha8Rng) -> u32 {
        let u: u32 = rng.gen_range(0..8);
        let k = match u {
            0..=3 => 0,
            4..=5 => 1,
            6 => 2,
            _ => 3,
        };
        self.succ[cur as usize * Self::BRANCHING + k]
    }

    /// Row number `r` (`seq_len + 1` tokens) into `out`.
    pub fn gen_row(&self, r: u64, out: &mut [u32]) {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.state.seed, r));
        let mut i = 0;
        while i < out.len() {
            let m: usize = rng.gen_range(8..=64);
            let mut walk = Vec::with_capacity(m);
            let mut cur = rng.gen_range(1..self.vocab as u32);
            for _ in 0..m {
                walk.push(cur);
                cur = self.step(cur, &mut rng);
            }
            let reps = if rng.gen_bool(0.5) { 2 } else { 1 };
            for _ in 0..reps {
                for &t in &walk {
                    if i < out.len() {
                        out[i] = t;
                        i += 1;
                    }
                }
            }
            if i < out.len() {
                out[i] = 0;
                i += 1;
            }
        }
    }
}

impl TokenSource for SyntheticSource {
    fn next_batch(&mut self, batch: usize, seq_len: usize) -> Result<Batch> {
        ensure!(seq_len > 0, "seq_len must be positive");
        self.state.seq_len = seq_len;
        let mut rows = vec![0u32; batch * (seq_len + 1)];
        for b in 0..batch {
            let r = self.state.rows_total;
            self.gen_row(r, &mut rows[b * (seq_len + 1)..(b + 1) * (seq_len + 1)]);
            self.state.rows_total += 1;
            self.state.row += 1;
        }
        Ok(Batch::from_rows(&rows, batch, seq_len, Some(0)))
    }
    fn state(&self) -> LoaderState {
        self.state.clone()
    }
    fn restore(&mut self, s: &LoaderState) -> Result<()> {
        check_restore(&self.state, s)?;
        self.state = s.clone();
        Ok(())
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn eot_id(&self) -> Option<u32> {
        Some(0)
    }
}
