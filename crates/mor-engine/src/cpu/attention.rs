//! Attention over packed variable-length segments (see [`crate::backend::AttnShape`]).
//!
//! Forward: one task per query row (all heads), scores against the visible keys of its segment,
//! max-subtracted softmax, `lse = max + ln Σ exp(s - max)` saved as `[nq, heads]`.
//!
//! Backward (flash-attention style, probabilities recomputed as `P = exp(S - lse)`):
//! `D_i = <dout_i, out_i>`, `dP = dout · Vᵀ`, `dS = P ⊙ (dP − D)`, `dQ = scale · dS · K`,
//! `dK = scale · dSᵀ · Q`, `dV = Pᵀ · dout`. `dq` is computed in a pass parallel over query rows
//! and `dk`/`dv` in a pass parallel over key rows (summing over the query heads that share a kv
//! head in a fixed order), so every gradient row has one owner and the result is deterministic.
//!
//! Emulated precision ([`AttnRounding`], see `cpu.rs`; the CUDA flash kernels round all to bf16):
//! the products read rounded copies of q, k, v and dout, and `P` / `dS` are rounded where they
//! multiply a vector; the statistics (max, sum, lse, `D`) stay in `T` (`D` reads the dout and out
//! of `delta_dout` / `delta_out`). With [`AttnRounding::EXACT`] every value is as without emulation.

use rayon::prelude::*;

use super::math::{axpy, dot};
use super::precision::{AttnRounding, Operand};
use super::{operand, CpuFloat};
use crate::backend::AttnShape;

struct Geometry {
    heads: usize,
    kv_heads: usize,
    hd: usize,
    group: usize,
    /// Row strides of q/out (`heads * hd`) and k/v (`kv_heads * hd`).
    qs: usize,
    ks: usize,
    nq: usize,
    nk: usize,
}

fn geometry(shape: &AttnShape<'_, Vec<u32>>) -> Geometry {
    let (heads, kv_heads, hd) = (shape.heads, shape.kv_heads, shape.head_dim);
    assert!(kv_heads > 0 && heads % kv_heads == 0, "attention: heads {heads} not a multiple of kv_heads {kv_heads}");
    let ns = shape.num_seqs;
    assert!(shape.cu_q.len() > ns && shape.cu_k.len() > ns, "attention: cu arrays shorter than num_seqs + 1");
    assert_eq!(shape.cu_q[ns] as usize, shape.nq, "attention: cu_q[num_seqs] != nq");
    assert_eq!(shape.cu_k[ns] as usize, shape.nk, "attention: cu_k[num_seqs] != nk");
    assert!(shape.pos_q.len() >= shape.nq && shape.pos_k.len() >= shape.nk);
    Geometry {
        heads,
        kv_heads,
        hd,
        group: heads / kv_heads,
        qs: heads * hd,
        ks: kv_heads * hd,
        nq: shape.nq,
        nk: shape.nk,
    }
}

/// Segment index of every row, from cumulative offsets `cu[0..=num_seqs]`.
fn segment_of(cu: &[u32], num_seqs: usize, rows: usize) -> Vec<u32> {
    let mut seg = vec![0u32; rows];
    for s in 0..num_seqs {
        let (a, b) = (cu[s] as usize, cu[s + 1] as usize);
        assert!(a <= b && b <= rows, "attention: bad cumulative offsets");
        seg[a..b].iter_mut().for_each(|x| *x = s as u32);
    }
    seg
}

fn softmax_scale<T: CpuFloat>(hd: usize) -> T {
    T::of_f64(1.0 / (hd as f64).sqrt())
}

/// `x` rounded to `f` (a probability or `dS` entering a tensor-core product).
#[inline]
fn rnd<T: CpuFloat>(f: Operand, x: T) -> T {
    match f {
        Operand::F32 => x,
        f => T::of_f32(f.round(x.as_f32())),
    }
}

pub(super) fn forward<T: CpuFloat>(
    out: &mut [T],
    lse: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape<'_, Vec<u32>>,
    r: AttnRounding,
) {
    let g = geometry(shape);
    if g.nq == 0 || g.heads == 0 || g.hd == 0 {
        return;
    }
    let (q, k, v) = (operand(q, g.nq * g.qs, r.qk), operand(k, g.nk * g.ks, r.qk), operand(v, g.nk * g.ks, r.v));
    let (cu_k, pos_q, pos_k) = (&shape.cu_k[..], &shape.pos_q[..], &shape.pos_k[..]);
    let seg = segment_of(shape.cu_q, shape.num_seqs, g.nq);
    let scale: T = softmax_scale(g.hd);
    let (q, k, v) = (&q[..g.nq * g.qs], &k[..g.nk * g.ks], &v[..g.nk * g.ks]);
    let hd = g.hd;
    out[..g.nq * g.qs]
        .par_chunks_mut(g.qs)
        .zip(lse[..g.nq * g.heads].par_chunks_mut(g.heads))
        .enumerate()
        .for_each_init(
            || (Vec::<usize>::new(), Vec::<T>::new()),
            |(vis, sc), (i, (orow, lrow))| {
                let s = seg[i] as usize;
                let pq = pos_q[i];
                vis.clear();
                vis.extend((cu_k[s] as usize..cu_k[s + 1] as usize).filter(|&j| pos_k[j] <= pq));
                for h in 0..g.heads {
                    let o = &mut orow[h * hd..(h + 1) * hd];
                    o.iter_mut().for_each(|x| *x = T::zero());
                    if vis.is_empty() {
                        lrow[h] = T::infinity();
                        continue;
                    }
                    let kh = h / g.group;
                    let qh = &q[i * g.qs + h * hd..][..hd];
                    sc.clear();
                    sc.extend(vis.iter().map(|&j| dot(qh, &k[j * g.ks + kh * hd..][..hd]) * scale));
                    let m = sc.iter().fold(T::neg_infinity(), |a, &b| if b > a { b } else { a });
                    let mut sum = T::zero();
                    for x in sc.iter_mut() {
                        *x = (*x - m).exp();
                        sum = sum + *x;
                    }
                    let inv = T::one() / sum;
                    for (&p, &j) in sc.iter().zip(vis.iter()) {
                        axpy(o, rnd(r.p, p) * inv, &v[j * g.ks + kh * hd..][..hd]);
                    }
                    lrow[h] = m + sum.ln();
                }
            },
        );
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: CpuFloat>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    out: &[T],
    lse: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape<'_, Vec<u32>>,
    r: AttnRounding,
) {
    let g = geometry(shape);
    if g.nq == 0 || g.nk == 0 || g.heads == 0 || g.hd == 0 {
        return;
    }
    let (q, k, v) = (operand(q, g.nq * g.qs, r.qk), operand(k, g.nk * g.ks, r.qk), operand(v, g.nk * g.ks, r.v));
    // `dout` as the products read it, and as `D = <dout, out>` reads it.
    let dout_r = operand(dout, g.nq * g.qs, r.dout);
    let dout_d = operand(dout, g.nq * g.qs, r.delta_dout);
    let out_d = operand(out, g.nq * g.qs, r.delta_out);
    let (cu_q, cu_k, pos_q, pos_k) = (&shape.cu_q[..], &shape.cu_k[..], &shape.pos_q[..], &shape.pos_k[..]);
    let seg_q = segment_of(cu_q, shape.num_seqs, g.nq);
    let seg_k = segment_of(cu_k, shape.num_seqs, g.nk);
    let scale: T = softmax_scale(g.hd);
    let hd = g.hd;
    let (q, k, v) = (&q[..g.nq * g.qs], &k[..g.nk * g.ks], &v[..g.nk * g.ks]);
    let lse = &lse[..g.nq * g.heads];
    let (dout_r, dout_d, out_d) = (&dout_r[..g.nq * g.qs], &dout_d[..g.nq * g.qs], &out_d[..g.nq * g.qs]);

    // D[i, h] = <dout_ih, out_ih>
    let mut delta = vec![T::zero(); g.nq * g.heads];
    delta.par_chunks_mut(g.heads).enumerate().for_each(|(i, drow)| {
        for (h, dd) in drow.iter_mut().enumerate() {
            let o = i * g.qs + h * hd;
            *dd = dot(&dout_d[o..o + hd], &out_d[o..o + hd]);
        }
    });
    let delta = &delta;

    // Pass 1: dq, one task per query row.
    #[allow(clippy::needless_range_loop)]
    dq[..g.nq * g.qs].par_chunks_mut(g.qs).enumerate().for_each_init(
        || vec![T::zero(); hd],
        |acc, (i, dqrow)| {
            let s = seg_q[i] as usize;
            let pq = pos_q[i];
            for h in 0..g.heads {
                let kh = h / g.group;
                let o = i * g.qs + h * hd;
                let (qh, doh) = (&q[o..o + hd], &dout_r[o..o + hd]);
                let (l, dd) = (lse[i * g.heads + h], delta[i * g.heads + h]);
                acc.iter_mut().for_each(|x| *x = T::zero());
                for j in cu_k[s] as usize..cu_k[s + 1] as usize {
                    if pos_k[j] > pq {
                        continue;
                    }
                    let kv = j * g.ks + kh * hd;
                    let p = (dot(qh, &k[kv..kv + hd]) * scale - l).exp();
                    let ds = p * (dot(doh, &v[kv..kv + hd]) - dd);
                    axpy(acc, rnd(r.ds, ds), &k[kv..kv + hd]);
                }
                axpy(&mut dqrow[h * hd..(h + 1) * hd], scale, acc);
            }
        },
    );

    // Pass 2: dk and dv, one task per key row.
    dk[..g.nk * g.ks].par_chunks_mut(g.ks).zip(dv[..g.nk * g.ks].par_chunks_mut(g.ks)).enumerate().for_each_init(
        || (vec![T::zero(); hd], vec![T::zero(); hd]),
        |(dka, dva), (j, (dkrow, dvrow))| {
            let s = seg_k[j] as usize;
            let pk = pos_k[j];
            for kh in 0..g.kv_heads {
                let kv = j * g.ks + kh * hd;
                let (kj, vj) = (&k[kv..kv + hd], &v[kv..kv + hd]);
                dka.iter_mut().for_each(|x| *x = T::zero());
                dva.iter_mut().for_each(|x| *x = T::zero());
                for i in cu_q[s] as usize..cu_q[s + 1] as usize {
                    if pk > pos_q[i] {
                        continue;
                    }
                    for h in kh * g.group..(kh + 1) * g.group {
                        let o = i * g.qs + h * hd;
                        let (qh, doh) = (&q[o..o + hd], &dout_r[o..o + hd]);
                        let p = (dot(qh, kj) * scale - lse[i * g.heads + h]).exp();
                        axpy(dva, rnd(r.p, p), doh);
                        let ds = p * (dot(doh, vj) - delta[i * g.heads + h]);
                        axpy(dka, rnd(r.ds, ds), qh);
                    }
                }
                axpy(&mut dkrow[kh * hd..(kh + 1) * hd], scale, dka);
                axpy(&mut dvrow[kh * hd..(kh + 1) * hd], T::one(), dva);
            }
        },
    );
}
