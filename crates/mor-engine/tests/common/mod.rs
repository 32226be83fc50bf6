//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use mor_engine::{AttnShape, Backend};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform values in `[-scale, scale]`.
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..=scale)).collect()
}

pub fn uniform64(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-scale..=scale)).collect()
}

pub fn proj(out: &[f64], r: &[f64]) -> f64 {
    assert_eq!(out.len(), r.len());
    out.iter().zip(r).map(|(a, b)| a * b).sum()
}

/// Central finite differences of `L(inputs) = Σ r ⊙ fwd(inputs)` with respect to `inputs[which]`.
pub fn numgrad(
    inputs: &[Vec<f64>],
    which: usize,
    r: &[f64],
    fwd: &dyn Fn(&[Vec<f64>]) -> Vec<f64>,
    eps: f64,
) -> Vec<f64> {
    let mut x = inputs.to_vec();
    let n = x[which].len();
    let mut g = vec![0.0; n];
    for e in 0..n {
        let orig = x[which][e];
        x[which][e] = orig + eps;
        let lp = proj(&fwd(&x), r);
        x[which][e] = orig - eps;
        let lm = proj(&fwd(&x), r);
        x[which][e] = orig;
        g[e] = (lp - lm) / (2.0 * eps);
    }
    g
}

/// Elementwise `|a - n| <= rtol * max(|a|, |n|) + atol`, with `atol = rtol * 1e-2 * max|n|`
/// (so entries that should be ~0 are compared on the scale of the whole gradient).
pub fn assert_grad_close(name: &str, analytic: &[f64], numeric: &[f64], rtol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{name}: length");
    let scale = numeric.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let atol = rtol * 1e-2 * scale + 1e-12;
    let mut worst = 0.0f64;
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a - n).abs();
        let tol = rtol * a.abs().max(n.abs()) + atol;
        assert!(
            err <= tol,
            "{name}[{i}]: analytic {a:e} vs numeric {n:e} (err {err:e} > tol {tol:e}, grad scale {scale:e})"
        );
        worst = worst.max(err / tol);
    }
    assert!(scale > 0.0 || analytic.iter().all(|&a| a == 0.0), "{name}: gradient all zero");
}

/// `after - before`: what a backward op accumulated onto a random initial gradient.
pub fn delta(after: &[f64], before: &[f64]) -> Vec<f64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// `|a - b| <= rtol * (|b| + mean|b|)` elementwise.
pub fn assert_close_f32(name: &str, a: &[f32], b: &[f32], rtol: f32) {
    assert_eq!(a.len(), b.len(), "{name}: length");
    let mean = b.iter().map(|x| x.abs() as f64).sum::<f64>() / b.len().max(1) as f64;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite() == y.is_finite(), "{name}[{i}]: {x} vs {y}");
        if !y.is_finite() {
            assert_eq!(x, y, "{name}[{i}]");
            continue;
        }
        let err = (x - y).abs() as f64;
        let tol = rtol as f64 * (y.abs() as f64 + mean) + 1e-30;
        assert!(err <= tol, "{name}[{i}]: {x:e} vs {y:e} (err {err:e} > tol {tol:e})");
    }
}

/// A packed attention layout (see `AttnShape`).
#[derive(Clone, Debug)]
pub struct AttnCase {
    pub name: &'static str,
    pub cu_q: Vec<u32>,
    pub cu_k: Vec<u32>,
    pub pos_q: Vec<u32>,
    pub pos_k: Vec<u32>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnCase {
    /// Build from per-segment (query positions, key positions).
    pub fn new(
        name: &'static str,
        segs: &[(Vec<u32>, Vec<u32>)],
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let (mut cu_q, mut cu_k, mut pos_q, mut pos_k) = (vec![0u32], vec![0u32], vec![], vec![]);
        for (pq, pk) in segs {
            pos_q.extend_from_slice(pq);
            pos_k.extend_from_slice(pk);
            cu_q.push(pos_q.len() as u32);
            cu_k.push(pos_k.len() as u32);
        }
        AttnCase { name, cu_q, cu_k, pos_q, pos_k, heads, kv_heads, head_dim }
    }
    pub fn num_seqs(&self) -> usize {
        self.cu_q.len() - 1
    }
    pub fn nq(&self) -> usize {
        self.pos_q.len()
    }
    pub fn nk(&self) -> usize {
        self.pos_k.len()
    }
    pub fn q_len(&self) -> usize {
        self.nq() * self.heads * self.head_dim
    }
    pub fn k_len(&self) -> usize {
        self.nk() * self.kv_heads * self.head_dim
    }
    /// Device index buffers for a backend.
    pub fn idx<B: Backend>(&self, b: &B) -> [B::Idx; 4] {
        [b.idx_from(&self.cu_q), b.idx_from(&self.cu_k), b.idx_from(&self.pos_q), b.idx_from(&self.pos_k)]
    }
    pub fn shape<'a, I>(&self, idx: &'a [I; 4]) -> AttnShape<'a, I> {
        AttnShape {
            cu_q: &idx[0],
            cu_k: &idx[1],
            pos_q: &idx[2],
            pos_k: &idx[3],
            num_seqs: self.num_seqs(),
            nq: self.nq(),
            nk: self.nk(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// The attention layouts every attention test covers.
pub fn attn_cases() -> Vec<AttnCase> {
    let all = |n: u32| (0..n).collect::<Vec<u32>>();
    vec![
        // Vanilla causal attention, several documents of different lengths, GQA 4/2.
        AttnCase::new("causal_segments_gqa", &[(all(5), all(5)), (all(1), all(1)), (all(7), all(7))], 4, 2, 8),
        // KV sharing: queries are a non-contiguous subset of positions, keys are all positions;
        // the last segment has a query (position 1) that sees no key (keys start at 3).
        AttnCase::new(
            "kv_sharing_subset",
            &[(vec![1, 4, 5, 8], all(10)), (vec![0, 6], all(7)), (vec![1, 4, 6], vec![3, 5, 6])],
            4,
            2,
            8,
        ),
        // Compacted recursion step: queries = keys = the same non-contiguous subset; a segment
        // with keys but no queries; an empty segment.
        AttnCase::new(
            "compacted_subset",
            &[
                (vec![0, 2, 3, 7, 9], vec![0, 2, 3, 7, 9]),
                (vec![], vec![0, 1, 2]),
                (vec![], vec![]),
                (vec![4, 11, 12], vec![4, 11, 12]),
            ],
            4,
            2,
            8,
        ),
        // Multi-query attention (one kv head) and decoding (one query against a cache).
        AttnCase::new("mqa_decode", &[(vec![11], all(12)), (vec![3, 4], all(5))], 4, 1, 8),
        // Plain multi-head attention, head_dim not a multiple of 8.
        AttnCase::new("mha_odd_dim", &[(all(6), all(6)), (vec![2, 5], all(6))], 2, 2, 6),
    ]
}

/// Dense reference attention in f64: explicit masked score matrix and softmax per
/// (segment, head). Returns `(out[nq, heads*hd], lse[nq, heads])`, `lse = +inf` and zero output
/// for a query with no visible key.
pub fn dense_attention(c: &AttnCase, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (h, kvh, hd) = (c.heads, c.kv_heads, c.head_dim);
    let mut out = vec![0.0; c.nq() * h * hd];
    let mut lse = vec![f64::INFINITY; c.nq() * h];
    let scale = 1.0 / (hd as f64).sqrt();
    for s in 0..c.num_seqs() {
        let (q0, q1) = (c.cu_q[s] as usize, c.cu_q[s + 1] as usize);
        let (k0, k1) = (c.cu_k[s] as usize, c.cu_k[s + 1] as usize);
        for head in 0..h {
            let kh = head / (h / kvh);
            // scores[i][j] over the whole segment, -inf where masked
            let mut scores = vec![vec![f64::NEG_INFINITY; k1 - k0]; q1 - q0];
            for i in q0..q1 {
                for j in k0..k1 {
                    if c.pos_k[j] <= c.pos_q[i] {
                        let mut d = 0.0;
                        for e in 0..hd {
                            d += q[(i * h + head) * hd + e] * k[(j * kvh + kh) * hd + e];
                        }
                        scores[i - q0][j - k0] = d * scale;
                    }
                }
            }
            for i in q0..q1 {
                let row = &scores[i - q0];
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = row.iter().map(|&x| (x - m).exp()).sum();
                lse[i * h + head] = m + z.ln();
                for j in k0..k1 {
                    let p = (row[j - k0] - m).exp() / z;
                    for e in 0..hd {
                        out[(i * h + head) * hd + e] += p * v[(j * kvh + kh) * hd + e];
                    }
                }
            }
        }
    }
    (out, lse)
}
