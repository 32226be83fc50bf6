//! Dequantisation of ggml block formats to f32 (reference scalar code, after ggml-quants.c).

use crate::GgmlType;
use anyhow::{bail, ensure, Result};
use half::f16;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantise `src` (whole blocks of type `ty`) into `out`; `out.len()` is the element count.
pub fn dequantize_into(ty: GgmlType, src: &[u8], out: &mut [f32]) -> Result<()> {
    let (bs, bb) = ty.block();
    ensure!(
        out.len() % bs == 0,
        "{} elements is not a whole number of {ty:?} blocks",
        out.len()
    );
    let nb = out.len() / bs;
    ensure!(
        src.len() == nb * bb,
        "{ty:?}: {} bytes for {} elements (expected {})",
        src.len(),
        out.len(),
        nb * bb
    );
    use GgmlType::*;
    match ty {
        F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap());
            }
        }
        F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        F64 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().unwrap()) as f32;
            }
        }
        I8 => {
            for (o, &c) in out.iter_mut().zip(src) {
                *o = c as i8 as f32;
            }
        }
        I16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = i16::from_le_bytes([c[0], c[1]]) as f32;
            }
        }
        I32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = i32::from_le_bytes(c.try_into().unwrap()) as f32;
            }
        }
        Q4_0 => blocks(src, out, bb, bs, |b, y| {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }),
        Q4_1 => blocks(src, out, bb, bs, |b, y| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0xF) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }),
        Q5_0 => blocks(src, out, bb, bs, |b, y| {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes(b[2..6].try_into().unwrap());
            let qs = &b[6..22];
            for j in 0..16 {
                let xh0 = ((qh >> j) << 4) & 0x10;
                let xh1 = (qh >> (j + 12)) & 0x10;
                y[j] = (((qs[j] as u32 & 0xF) | xh0) as i32 - 16) as f32 * d;
                y[j + 16] = (((qs[j] as u32 >> 4) | xh1) as i32 - 16) as f32 * d;
            }
        }),
        Q5_1 => blocks(src, out, bb, bs, |b, y| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes(b[4..8].try_into().unwrap());
            let qs = &b[8..24];
            for j in 0..16 {
                let xh0 = ((qh >> j) << 4) & 0x10;
                let xh1 = (qh >> (j + 12)) & 0x10;
                y[j] = ((qs[j] as u32 & 0xF) | xh0) as f32 * d + m;
                y[j + 16] = ((qs[j] as u32 >> 4) | xh1) as f32 * d + m;
            }
        }),
        Q8_0 => blocks(src, out, bb, bs, |b, y| {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = b[2 + j] as i8 as f32 * d;
            }
        }),
        Q8_1 => blocks(src, out, bb, bs, |b, y| {
            let d = f16_at(b, 0); // b[2..4] holds d * sum(qs), not needed here
            for j in 0..32 {
                y[j] = b[4 + j] as i8 as f32 * d;
            }
        }),
        Q2K => blocks(src, out, bb, bs, |b, y| {
            let scales = &b[0..16];
            let qs = &b[16..80];
            let (d, min) = (f16_at(b, 80), f16_at(b, 82));
            let mut yi = 0;
            let mut is = 0;
            for n in 0..2 {
                let q = &qs[32 * n..32 * n + 32];
                let mut shift = 0;
                for _ in 0..4 {
                    for half in 0..2 {
                        let sc = scales[is];
                        is += 1;
                        let dl = d * (sc & 0xF) as f32;
                        let ml = min * (sc >> 4) as f32;
                        for l in 0..16 {
                            y[yi] = dl * ((q[l + 16 * half] >> shift) & 3) as f32 - ml;
                            yi += 1;
                        }
                    }
                    shift += 2;
                }
            }
        }),
        Q3K => blocks(src, out, bb, bs, |b, y| {
            let hm = &b[0..32];
            let qs = &b[32..96];
            let sraw = &b[96..108];
            let d_all = f16_at(b, 108);
            let sc = unpack_q3k_scales(sraw);
            let mut yi = 0;
            let mut is = 0;
            let mut m: u8 = 1;
            for n in 0..2 {
                let q = &qs[32 * n..32 * n + 32];
                let mut shift = 0;
                for _ in 0..4 {
                    for half in 0..2 {
                        let dl = d_all * (sc[is] as i32 - 32) as f32;
                        is += 1;
                        for l in 0..16 {
                            let k = l + 16 * half;
                            let v = ((q[k] >> shift) & 3) as i32 - if hm[k] & m != 0 { 0 } else { 4 };
                            y[yi] = dl * v as f32;
                            yi += 1;
                        }
                    }
                    shift += 2;
                    m <<= 1;
                }
            }
        }),
        Q4K => blocks(src, out, bb, bs, |b, y| {
            let (d, min) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            let mut is = 0;
            for j in 0..4 {
                let q = &qs[32 * j..32 * j + 32];
                let (sc1, m1) = scale_min_k4(is, scales);
                let (sc2, m2) = scale_min_k4(is + 1, scales);
                let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
                let y = &mut y[64 * j..64 * j + 64];
                for l in 0..32 {
                    y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                    y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                }
                is += 2;
            }
        }),
        Q5K => blocks(src, out, bb, bs, |b, y| {
            let (d, min) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            let mut is = 0;
            let (mut u1, mut u2) = (1u8, 2u8);
            for j in 0..4 {
                let ql = &qs[32 * j..32 * j + 32];
                let (sc1, m1) = scale_min_k4(is, scales);
                let (sc2, m2) = scale_min_k4(is + 1, scales);
                let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
                let y = &mut y[64 * j..64 * j + 64];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
                    y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
                }
                is += 2;
                u1 <<= 2;
                u2 <<= 2;
            }
        }),
        Q6K => blocks(src, out, bb, bs, |b, y| {
            let ql_all = &b[0..128];
            let qh_all = &b[128..192];
            let sc_all = &b[192..208];
            let d = f16_at(b, 208);
            for n in 0..2 {
                let ql = &ql_all[64 * n..];
                let qh = &qh_all[32 * n..];
                let sc = &sc_all[8 * n..];
                let y = &mut y[128 * n..128 * n + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                }
            }
        }),
        Q8K => blocks(src, out, bb, bs, |b, y| {
            let d = f32::from_le_bytes(b[0..4].try_into().unwrap());
            for j in 0..256 {
                y[j] = b[4 + j] as i8 as f32 * d;
            }
        }),
        other => bail!("dequantisation of {other:?} is not implemented"),
    }
    Ok(())
}

fn blocks(src: &[u8], out: &mut [f32], bb: usize, bs: usize, f: impl Fn(&[u8], &mut [f32])) {
    for (b, y) in src.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
        f(b, y);
    }
}

/// 6-bit scale and min number `j` of a Q4_K / Q5_K block.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 16 6-bit scales of a Q3_K block, each in 0..64 (subtract 32 for the signed value).
fn unpack_q3k_scales(s: &[u8]) -> [u8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let a0 = u32::from_le_bytes(s[0..4].try_into().unwrap());
    let a1 = u32::from_le_bytes(s[4..8].try_into().unwrap());
    let tmp = u32::from_le_bytes(s[8..12].try_into().unwrap());
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut out = [0u8; 16];
    for (i, a) in aux.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&a.to_le_bytes());
    }
    out
}
