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

/// A set of tokens, on the host and on the device.
pub struct TokenSet<B: Backend> {
    /// Global row indices (into `batch * seq_len`), grouped by batch row, ascending.
    pub idx_host: Vec<u32>,
    pub pos_host: Vec<u32>,
    /// Attention segment offsets (`num_segments + 1` entries).
    pub cu_host: Vec<u32>,
    /// Offsets of each batch row's tokens (`batch + 1` entries), for per-sequence top-k.
    pub row_cu_host: Vec<u32>,
    pub idx: B::Idx,
    pub pos: B::Idx,
    pub cu: B::Idx,
    pub num_segments: usize,
}

impl<B: Backend> TokenSet<B> {
    /// Build from ascending global indices.
    pub fn from_indices(backend: &B, segs: &Segments, idx_host: Vec<u32>) -> Self {
        let pos_host: Vec<u32> = idx_host.iter().map(|&i| i % segs.seq_len as u32).collect();
        let mut cu_host = vec![0u32; segs.num_segments + 1];
        let mut row_cu_host = vec![0u32; segs.batch + 1];
        for &i in &idx_host {
            cu_host[segs.seg_of[i as usize] as usize + 1] += 1;
            row_cu_host[i as usize / segs.seq_len + 1] += 1;
        }
        for s in 0..segs.num_segments {
            cu_host[s + 1] += cu_host[s];
        }
        for b in 0..segs.batch {
            row_cu_host[b + 1] += row_cu_host[b];
        }
        TokenSet {
            idx: backend.idx_from(&idx_host),
            pos: backend.idx_from(&pos_host),
            cu: backend.idx_from(&cu_host),
            idx_host,
            pos_host,
            cu_host,
            row_cu_host,
            num_segments: segs.num_segments,
        }
    }

    pub fn full(backend: &B, segs: &Segments) -> Self {
        Self::from_indices(backend, segs, (0..(segs.batch * segs.seq_len) as u32).collect())
    }

    pub fn len(&self) -> usize {
        self.idx_host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.idx_host.is_empty()
    }

    /// The subset made of this set's members at local positions `local` (ascending).
    pub fn subset(&self, backend: &B, segs: &Segments, local: &[u32]) -> Self {
        Self::from_indices(backend, segs, local.iter().map(|&l| self.idx_host[l as usize]).collect())
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
