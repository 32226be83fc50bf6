//! Token sets: which rows of the flattened `[batch * seq_len]` residual stream a layer runs on,
//! at which original positions, and how they split into attention segments.
//!
//! Attention segments are the (row, document) pieces of the full batch — whole rows unless
//! document masking is on. Every token set of a batch uses the same segment list (segments may
//! be empty in a subset), so a subset's queries can attend to another set's keys segment by
//! segment (KV sharing).

use mor_engine::{AttnShape, Backend};

/// The segment structure of one batch.
#[derive(Debug, Clone)]
pub struct Segments {
    pub batch: usize,
    pub seq_len: usize,
    /// Segment id of every token of the batch (non-decreasing).
    pub seg_of: Vec<u32>,
    pub num_segments: usize,
}

impl Segments {
    /// One segment per row, or per document when `doc_starts` is given (offsets within each row
    /// where a new document begins; offset 0 is implied).
    pub fn new(batch: usize, seq_len: usize, doc_starts: Option<&[Vec<u32>]>) -> Self {
        let mut seg_of = Vec::with_capacity(batch * seq_len);
        let mut next = 0u32;
        for b in 0..batch {
            let starts: &[u32] = doc_starts.map_or(&[], |d| d[b].as_slice());
            for t in 0..seq_len {
                if t > 0 && starts.contains(&(t as u32)) {
                    next += 1;
                }
                seg_of.push(next);
            }
            next += 1;
        }
        Segments { batch, seq_len, seg_of, num_segments: next as usize }
    }
}

/// What a set's device buffers hold, so that the next batch of the same shape can reuse them
/// instead of allocating and uploading (a training step then only queues device work, the
/// condition for capturing it in a CUDA graph: docs/design/cuda-graphs.md C2, C4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Every token of `batch` rows of `seq_len`, one segment per row: the same contents for
    /// every batch of that shape.
    Full { batch: usize, seq_len: usize },
    /// `k` members per row composed on the device ([`TokenSet::compose_rows`]): fixed segment
    /// offsets, indices rewritten per batch.
    Rows { batch: usize, seq_len: usize, k: usize },
    /// Uploaded from host indices (document masks, selections made on the host).
    Host,
}

/// A set of tokens, on the device and (once known there) on the host.
pub struct TokenSet<B: Backend> {
    origin: Origin,
    len: usize,
    /// Host copies; `None` for a set composed on the device ([`TokenSet::compose_rows`]) until
    /// [`TokenSet::fill_host`] runs.
    host: Option<TokenHost>,
    pub idx: B::Idx,
    pub pos: B::Idx,
    pub cu: B::Idx,
    pub num_segments: usize,
}

/// A token set's indices on the host.
pub struct TokenHost {
    /// Global row indices (into `batch * seq_len`), grouped by batch row, ascending.
    pub idx: Vec<u32>,
    pub pos: Vec<u32>,
    /// Attention segment offsets (`num_segments + 1` entries).
    pub cu: Vec<u32>,
    /// Offsets of each batch row's tokens (`batch + 1` entries), for per-sequence top-k.
    pub row_cu: Vec<u32>,
}

impl TokenHost {
    fn new(segs: &Segments, idx: Vec<u32>) -> Self {
        let pos: Vec<u32> = idx.iter().map(|&i| i % segs.seq_len as u32).collect();
        let mut cu = vec![0u32; segs.num_segments + 1];
        let mut row_cu = vec![0u32; segs.batch + 1];
        for &i in &idx {
            cu[segs.seg_of[i as usize] as usize + 1] += 1;
            row_cu[i as usize / segs.seq_len + 1] += 1;
        }
        for s in 0..segs.num_segments {
            cu[s + 1] += cu[s];
        }
        for b in 0..segs.batch {
            row_cu[b + 1] += row_cu[b];
        }
        TokenHost { idx, pos, cu, row_cu }
    }

    /// The members at local positions `local` (ascending) as a set of their own.
    fn subset(&self, segs: &Segments, local: &[u32]) -> Self {
        TokenHost::new(segs, local.iter().map(|&l| self.idx[l as usize]).collect())
    }
}

impl<B: Backend> TokenSet<B> {
    /// Build from ascending global indices.
    pub fn from_indices(backend: &B, segs: &Segments, idx_host: Vec<u32>) -> Self {
        Self::from_host(backend, segs, TokenHost::new(segs, idx_host))
    }

    /// Uploads host indices.
    fn from_host(backend: &B, segs: &Segments, host: TokenHost) -> Self {
        TokenSet {
            origin: Origin::Host,
            len: host.idx.len(),
            idx: backend.idx_from(&host.idx),
            pos: backend.idx_from(&host.pos),
            cu: backend.idx_from(&host.cu),
            host: Some(host),
            num_segments: segs.num_segments,
        }
    }

    /// Every token of the batch; `reuse` (the previous batch's full set) is taken as it is when
    /// it holds the same contents (same shape, segments = rows), instead of uploading.
    pub fn full(backend: &B, segs: &Segments, reuse: Option<Self>) -> Self {
        let origin = if segs.num_segments == segs.batch { Origin::Full { batch: segs.batch, seq_len: segs.seq_len } } else { Origin::Host };
        if let Some(set) = reuse.filter(|s| origin != Origin::Host && s.origin == origin) {
            return set;
        }
        let mut set = Self::from_indices(backend, segs, (0..(segs.batch * segs.seq_len) as u32).collect());
        set.origin = origin;
        set
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host copies.
    ///
    /// # Panics
    /// For a set composed on the device whose copies were not filled in yet.
    pub fn host(&self) -> &TokenHost {
        self.host.as_ref().expect("token set: the host copy of a device-composed set is not filled in yet")
    }

    /// Whether the host copies exist (a device-composed set before [`TokenSet::fill_host`]: no).
    pub fn has_host(&self) -> bool {
        self.host.is_some()
    }

    /// The subset made of this set's members at local positions `local` (ascending).
    pub fn subset(&self, backend: &B, segs: &Segments, local: &[u32]) -> Self {
        Self::from_host(backend, segs, self.host().subset(segs, local))
    }

    /// The subset of `k` members per batch row at the local positions `local` (ascending within
    /// each row, `batch * k` entries; a device top-k's output), composed on the device: the host
    /// does not wait for the selection. Segments must be the batch rows (no document masks), so
    /// the segment offsets are `[0, k, 2k, ..]`. `reuse` (the same recursion's set of the previous
    /// batch) gives its buffers when composed alike: no allocation or upload then.
    pub fn compose_rows(backend: &B, segs: &Segments, parent: &Self, local: &B::Idx, k: usize, reuse: Option<Self>) -> Self {
        assert_eq!(segs.num_segments, segs.batch, "compose_rows: segments must be the batch rows");
        let m = segs.batch * k;
        let origin = Origin::Rows { batch: segs.batch, seq_len: segs.seq_len, k };
        let mut set = match reuse.filter(|s| s.origin == origin) {
            Some(set) => TokenSet { host: None, ..set },
            None => {
                let cu: Vec<u32> = (0..=segs.batch as u32).map(|b| b * k as u32).collect();
                let (idx, pos) = (backend.idx_from(&vec![0; m]), backend.idx_from(&vec![0; m]));
                TokenSet { origin, len: m, host: None, idx, pos, cu: backend.idx_from(&cu), num_segments: segs.num_segments }
            }
        };
        backend.subset_rows(&mut set.idx, &mut set.pos, &parent.idx, local, m, segs.seq_len);
        set
    }

    /// Fill in the host copies of a set composed from `parent` at local positions `local` (the
    /// selection, read back).
    pub fn fill_host(&mut self, segs: &Segments, parent: &TokenHost, local: &[u32]) {
        assert_eq!(local.len(), self.len, "fill_host: selection size");
        self.host = Some(parent.subset(segs, local));
    }

    /// Attention shape for queries of `self` against keys of `keys`.
    pub fn attn_shape<'a>(
        &'a self,
        keys: &'a TokenSet<B>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> AttnShape<'a, B::Idx> {
        AttnShape {
            cu_q: &self.cu,
            cu_k: &keys.cu,
            pos_q: &self.pos,
            pos_k: &keys.pos,
            num_seqs: self.num_segments,
            nq: self.len(),
            nk: keys.len(),
            heads,
            kv_heads,
            head_dim,
        }
    }
}
