//! Token sets: an expert-choice subset composed on the device (`TokenSet::compose_rows`, host
//! copies filled in later) is the subset the host builds from the same selection.

use mor_engine::{Backend, Cpu};
use mor_model::tokens::{Segments, TokenSet};

type Be = Cpu<f32>;

/// Local indices of `k` members per batch row of a set with `per_row` members per row.
fn selection(rows: usize, per_row: usize, k: usize, seed: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for r in 0..rows {
        // k distinct members of the row, ascending: every `per_row / k`-th from a row-dependent start.
        let mut picks: Vec<usize> = (0..k).map(|i| (i * per_row / k + (r + seed) % (per_row / k)) % per_row).collect();
        picks.sort_unstable();
        picks.dedup();
        assert_eq!(picks.len(), k);
        out.extend(picks.into_iter().map(|j| (r * per_row + j) as u32));
    }
    out
}

fn assert_same(be: &Be, composed: &TokenSet<Be>, host: &TokenSet<Be>) {
    assert_eq!(composed.len(), host.len());
    assert_eq!(be.idx_to_vec(&composed.idx), be.idx_to_vec(&host.idx), "idx");
    assert_eq!(be.idx_to_vec(&composed.pos), be.idx_to_vec(&host.pos), "pos");
    assert_eq!(be.idx_to_vec(&composed.cu), be.idx_to_vec(&host.cu), "cu");
    let (c, h) = (composed.host(), host.host());
    assert_eq!((&c.idx, &c.pos, &c.cu, &c.row_cu), (&h.idx, &h.pos, &h.cu, &h.row_cu), "host copies");
}

#[test]
fn composed_subsets_match_host_subsets_over_two_recursions() {
    let be = Be::new();
    let (rows, len) = (3, 16);
    let segs = Segments::new(rows, len, None);
    let full = TokenSet::full(&be, &segs, None);

    let (k1, k2) = (8, 3);
    let sel1 = selection(rows, len, k1, 0);
    let mut composed1 = TokenSet::compose_rows(&be, &segs, &full, &be.idx_from(&sel1), k1, None);
    assert!(!composed1.has_host(), "a composed set has no host copy before fill_host");
    composed1.fill_host(&segs, full.host(), &sel1);
    let host1 = full.subset(&be, &segs, &sel1);
    assert_same(&be, &composed1, &host1);

    // The next recursion selects from the composed set (its local indices are into that set).
    let sel2 = selection(rows, k1, k2, 1);
    let mut composed2 = TokenSet::compose_rows(&be, &segs, &composed1, &be.idx_from(&sel2), k2, None);
    composed2.fill_host(&segs, composed1.host(), &sel2);
    assert_same(&be, &composed2, &host1.subset(&be, &segs, &sel2));
}

#[test]
fn readbacks_return_the_prefix() {
    let be = Be::new();
    let idx = be.idx_from(&[5, 4, 3, 2, 1]);
    assert_eq!(be.idx_prefix_async(&idx, 3).wait(), vec![5, 4, 3]);
    let buf = be.from_f32(&[0.5, -1.25, 2.0]);
    assert_eq!(be.to_f64_prefix_async(&buf, 2).wait(), vec![0.5, -1.25]);
}
