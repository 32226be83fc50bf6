//! CPU reference backend: plain Rust, generic over `f32` (training) and `f64` (gradient checks).
//!
//! * GEMMs go through `matrixmultiply` (its stride arguments express the transposes).
//! * Row-independent ops run in parallel with rayon over rows; every reduction has a fixed order
//!   that does not depend on the thread count or on scheduling, so results are bit-for-bit
//!   reproducible across runs on the same machine (training resume relies on this).
//! * Attention is a straightforward per-query loop; its backward recomputes the probabilities from
//!   `q`, `k` and the saved log-sum-exp (flash-attention style) and computes `dq` in a pass over
//!   queries and `dk`/`dv` in a pass over keys, so each gradient row has exactly one owner.
//!
//! Layout notes beyond `backend.rs`: `lse` of [`Backend::attention_fwd`] is `[nq, heads]`
//! (`lse[i * heads + h]`), and a query with no visible key gets `lse = +inf` (as flash-attention
//! does), so `exp(s - lse) = 0` for it.
//!
//! Emulated precision (off by default; with it off every result is bit-for-bit unchanged): the
//! roundings of the CUDA bf16 mode, to study its error against the exact reference on a CPU.
//! * [`Backend::set_matmul_precision`]`(Bf16)`: every GEMM of `matmul_fwd` / `matmul_bwd` (and so
//!   of the `_many` variants) rounds its operands to bf16 (round to nearest even) — `x` and `w`
//!   forward, `dout` and `w` for `dx`, `dout` and `x` for `dw` — and sums the exact products in
//!   `T`, as cuBLAS bf16 GEMMs with fp32 accumulation do.
//! * [`Cpu::set_gemm_rule`]: the operand formats chosen per GEMM ([`precision::GemmRule`]: bf16,
//!   split bf16 hi + lo, TF32 or unchanged, per product and operand), for per-site studies.
//! * [`Cpu::set_attention_bf16`]: attention rounds like the tensor-core flash kernels
//!   (`cuda/kernels/flash_attention.cu`, head_dim 32/64): `q`, `k`, `v`, `dout` to bf16 for every
//!   product, and the probabilities `P` (in `P·V` and `Pᵀ·dout`) and `dS` (in `dS·K` and
//!   `dSᵀ·Q`) to bf16 where they enter a product; softmax statistics, `lse`, `D = <dout, out>`
//!   (from the unrounded `dout`) and the accumulations stay in `T`. One difference in kind: the
//!   forward rounds `exp(s - max)` relative to the row's final max, the kernel relative to its
//!   running max (then rescales in f32), so individual roundings differ, not their size.
//!   [`Cpu::set_attention_rounding`] picks the format of each operand group (`q`/`k`, `v`, `dout`,
//!   `P`, `dS`, and the `dout` / `out` that `D` reads) separately, for studies.
//!
//! The GPU's bf16 mode is both switches on. On `Cpu<f64>` an operand is rounded through f32.

mod attention;
pub mod math;
pub mod precision;

use std::borrow::Cow;
use std::cmp::Ordering;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::RwLock;

use num_traits::Float;
use rayon::prelude::*;

use crate::backend::{AdamStepScalars, AdamWItem, AttnShape, Backend, GateFn, MatmulPrecision, Readback};

use math::{axpy, bce_with_logits, sigmoid};
use precision::{AttnRounding, GemmCall, GemmOutRule, GemmProduct, GemmRule, Operand};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// The float types the CPU backend computes in: `f32` and `f64`.
pub trait CpuFloat: Float + Send + Sync + std::fmt::Debug + Default + 'static + sealed::Sealed {
    fn of_f32(x: f32) -> Self;
    fn of_f64(x: f64) -> Self;
    fn as_f32(self) -> f32;
    fn as_f64(self) -> f64;

    /// `matrixmultiply`'s `sgemm` / `dgemm`: `C ← α A B + β C` with arbitrary strides.
    ///
    /// # Safety
    /// The pointers and strides must describe valid, non-aliasing (for C) matrices.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl CpuFloat for f32 {
    #[inline]
    fn of_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn of_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn as_f32(self) -> f32 {
        self
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self as f64
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl CpuFloat for f64 {
    #[inline]
    fn of_f32(x: f32) -> Self {
        x as f64
    }
    #[inline]
    fn of_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn as_f32(self) -> f32 {
        self as f32
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// Number of elements one element of a strided `rows x cols` matrix spans.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// Bounds-checked GEMM `C[m,n] ← α A[m,k] B[k,n] + β C` (β = 0 overwrites C without reading it).
#[allow(clippy::too_many_arguments)]
fn gemm<T: CpuFloat>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &[T],
    (rsa, csa): (usize, usize),
    b: &[T],
    (rsb, csb): (usize, usize),
    beta: T,
    c: &mut [T],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= extent(m, n, rsc, csc), "gemm: output buffer too small");
    if k > 0 {
        assert!(a.len() >= extent(m, k, rsa, csa), "gemm: A buffer too small");
        assert!(b.len() >= extent(k, n, rsb, csb), "gemm: B buffer too small");
    }
    // SAFETY: the extents are checked above; `c` is a unique borrow, disjoint from `a` and `b`.
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        )
    }
}

/// Elements per parallel task for elementwise ops.
const EW_CHUNK: usize = 1 << 14;
/// Rows per partial sum of the RMSNorm weight gradient (fixed: determinism does not depend on it
/// being tuned, only on it being constant).
const RMS_DW_ROWS: usize = 32;

/// Minimum rows per rayon task so that a task touches at least a few thousand elements.
#[inline]
fn min_rows(d: usize) -> usize {
    (4096 / d.max(1)).max(1)
}

fn ew1<T: CpuFloat>(y: &mut [T], f: impl Fn(&mut T) + Sync + Send) {
    y.par_chunks_mut(EW_CHUNK).for_each(|c| c.iter_mut().for_each(&f));
}

fn ew2<T: CpuFloat>(y: &mut [T], a: &[T], f: impl Fn(&mut T, T) + Sync + Send) {
    assert_eq!(y.len(), a.len());
    y.par_chunks_mut(EW_CHUNK).zip(a.par_chunks(EW_CHUNK)).for_each(|(yc, ac)| {
        for (yi, &ai) in yc.iter_mut().zip(ac) {
            f(yi, ai)
        }
    });
}

fn ew3<T: CpuFloat>(y: &mut [T], a: &[T], b: &[T], f: impl Fn(&mut T, T, T) + Sync + Send) {
    assert_eq!(y.len(), a.len());
    assert_eq!(y.len(), b.len());
    y.par_chunks_mut(EW_CHUNK).zip(a.par_chunks(EW_CHUNK)).zip(b.par_chunks(EW_CHUNK)).for_each(|((yc, ac), bc)| {
        for ((yi, &ai), &bi) in yc.iter_mut().zip(ac).zip(bc) {
            f(yi, ai, bi)
        }
    });
}

/// Deterministic parallel "scatter" into the rows of `dst` (rows of `d`): for every `i < m`,
/// `f(dst_row(idx[i]), i)` is called, grouped by destination row (rows in parallel, the `i` of one
/// row in increasing order, exactly as a serial loop over `i` would apply them).
fn scatter_grouped<T: CpuFloat>(
    dst: &mut [T],
    d: usize,
    idx: &[u32],
    m: usize,
    f: impl Fn(&mut [T], usize) + Sync + Send,
) {
    if m == 0 || d == 0 {
        return;
    }
    let idx = &idx[..m];
    let rows = idx.iter().map(|&r| r as usize + 1).max().unwrap_or(0);
    assert!(rows * d <= dst.len(), "scatter: index {} out of range", rows - 1);
    // Counting sort of the positions by destination row (stable: ascending `i` per row).
    let mut start = vec![0usize; rows + 1];
    for &r in idx {
        start[r as usize + 1] += 1;
    }
    for r in 0..rows {
        start[r + 1] += start[r];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; m];
    for (i, &r) in idx.iter().enumerate() {
        order[fill[r as usize]] = i;
        fill[r as usize] += 1;
    }
    dst[..rows * d].par_chunks_mut(d).with_min_len(min_rows(d)).enumerate().for_each(|(r, row)| {
        for &i in &order[start[r]..start[r + 1]] {
            f(row, i);
        }
    });
}

/// Descending by score (NaN last), then ascending by index: a total order.
fn topk_order<T: CpuFloat>(scores: &[T], i: u32, j: u32) -> Ordering {
    let (x, y) = (scores[i as usize], scores[j as usize]);
    let by_score = match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
    };
    by_score.then(i.cmp(&j))
}

/// `(max, Σ exp(x - max))` of a row, the sum accumulated in f64.
fn row_max_sumexp<T: CpuFloat>(row: &[T]) -> (T, f64) {
    let m = row.iter().fold(T::neg_infinity(), |a, &b| if b > a { b } else { a });
    let s = row.iter().fold(0.0f64, |s, &x| s + (x - m).exp().as_f64());
    (m, s)
}

/// The first `len` values of `x` rounded to `f`, or all of `x` borrowed unchanged for
/// [`Operand::F32`].
fn operand<T: CpuFloat>(x: &[T], len: usize, f: Operand) -> Cow<'_, [T]> {
    match f {
        Operand::F32 => Cow::Borrowed(x),
        f => Cow::Owned(x[..len].par_iter().map(|&v| T::of_f32(f.round(v.as_f32()))).collect()),
    }
}

/// The CPU reference backend. `Cpu::<f32>::new()` for training, `Cpu::<f64>::new()` for
/// gradient checks. Exact by default; see the module docs for the emulated (bf16) precision.
pub struct Cpu<T> {
    emulation: RwLock<Emulation>,
    traffic: TrafficCounters,
    _t: PhantomData<fn() -> T>,
}

/// Calls that would move data between host and device, or allocate, on a device backend: what
/// the CPU counts so tests can prove that a stretch of model code queues device work only (the
/// condition for capturing it in a CUDA graph; docs/design/cuda-graphs.md).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HostTraffic {
    /// `zeros`, `zeros_act`, `from_*`, `idx_from`.
    pub allocs: u64,
    /// `idx_from`, `from_*`, `idx_write`, `write_*`.
    pub uploads: u64,
    /// Reads that wait for the queued work: `to_*`, `idx_to_vec`, `sum_squares*`.
    pub reads: u64,
    /// Reads queued without waiting (`*_async`), waited for later.
    pub async_reads: u64,
}

#[derive(Default)]
struct TrafficCounters {
    allocs: AtomicU64,
    uploads: AtomicU64,
    reads: AtomicU64,
    async_reads: AtomicU64,
}

impl TrafficCounters {
    fn count(c: &AtomicU64) {
        c.fetch_add(1, AtomicOrdering::Relaxed);
    }
}

/// The emulated precision (module docs); the default is exact.
#[derive(Clone)]
struct Emulation {
    /// Operand formats of the GEMMs; `None`: unchanged operands.
    gemm: Option<GemmRule>,
    /// Output formats of the forward GEMMs (CUDA's bf16 mode stores some outputs, e.g. the LM
    /// head's logits, in bf16); `None`: unrounded.
    gemm_out: Option<GemmOutRule>,
    attention: AttnRounding,
}

impl<T: CpuFloat> Cpu<T> {
    pub fn new() -> Self {
        Cpu {
            emulation: RwLock::new(Emulation { gemm: None, gemm_out: None, attention: AttnRounding::EXACT }),
            traffic: TrafficCounters::default(),
            _t: PhantomData,
        }
    }

    /// The host traffic counted since the backend was made or [`Cpu::reset_traffic`].
    pub fn traffic(&self) -> HostTraffic {
        let t = &self.traffic;
        let get = |c: &AtomicU64| c.load(AtomicOrdering::Relaxed);
        HostTraffic { allocs: get(&t.allocs), uploads: get(&t.uploads), reads: get(&t.reads), async_reads: get(&t.async_reads) }
    }

    pub fn reset_traffic(&self) {
        let t = &self.traffic;
        for c in [&t.allocs, &t.uploads, &t.reads, &t.async_reads] {
            c.store(0, AtomicOrdering::Relaxed);
        }
    }

    /// Round GEMM operands per `rule` from now on (`None`: exact, as
    /// `set_matmul_precision(MatmulPrecision::F32)`). The CUDA bf16 mode is
    /// [`precision::all_bf16`].
    pub fn set_gemm_rule(&self, rule: Option<GemmRule>) {
        self.emulation.write().unwrap().gemm = rule;
    }

    /// Round the outputs of forward GEMMs per `rule` from now on (`None`: unrounded): e.g. the LM
    /// head's logits, which CUDA's bf16 mode stores in bf16.
    pub fn set_gemm_output_rule(&self, rule: Option<GemmOutRule>) {
        self.emulation.write().unwrap().gemm_out = rule;
    }

    /// Round attention operands like the CUDA flash kernels from now on (`false`: exact).
    pub fn set_attention_bf16(&self, on: bool) {
        self.set_attention_rounding(if on { AttnRounding::FLASH } else { AttnRounding::EXACT });
    }

    /// Attention's operand formats from now on (for studies; see [`AttnRounding`]).
    pub fn set_attention_rounding(&self, r: AttnRounding) {
        self.emulation.write().unwrap().attention = r;
    }

    pub fn attention_rounding(&self) -> AttnRounding {
        self.emulation.read().unwrap().attention
    }

    /// The operand formats of one GEMM (`[F32, F32]` without a rule).
    fn gemm_formats(&self, product: GemmProduct, n: usize, k: usize, m: usize) -> [Operand; 2] {
        match self.emulation.read().unwrap().gemm.as_ref() {
            Some(rule) => rule(&GemmCall { product, n, k, m }),
            None => [Operand::F32, Operand::F32],
        }
    }
}

impl<T: CpuFloat> Default for Cpu<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Cpu<T> {
    fn clone(&self) -> Self {
        Cpu { emulation: RwLock::new(self.emulation.read().unwrap().clone()), traffic: TrafficCounters::default(), _t: PhantomData }
    }
}

impl<T> std::fmt::Debug for Cpu<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cpu<{}>", std::any::type_name::<T>())
    }
}

impl<T: CpuFloat> Backend for Cpu<T> {
    type Buf = Vec<T>;
    type Idx = Vec<u32>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    /// Emulated: `Bf16` rounds every GEMM operand to bf16 ([`precision::all_bf16`]), `F32`
    /// removes any rounding rule. Attention has its own switch ([`Cpu::set_attention_bf16`]).
    fn set_matmul_precision(&self, p: MatmulPrecision) -> bool {
        self.set_gemm_rule(match p {
            MatmulPrecision::F32 => None,
            MatmulPrecision::Bf16 => Some(precision::all_bf16()),
        });
        true
    }

    // ---- memory ---------------------------------------------------------------------------
    fn zeros(&self, n: usize) -> Vec<T> {
        TrafficCounters::count(&self.traffic.allocs);
        vec![T::zero(); n]
    }

    fn from_f32(&self, data: &[f32]) -> Vec<T> {
        TrafficCounters::count(&self.traffic.allocs);
        TrafficCounters::count(&self.traffic.uploads);
        data.iter().map(|&x| T::of_f32(x)).collect()
    }

    fn to_f32(&self, buf: &Vec<T>) -> Vec<f32> {
        TrafficCounters::count(&self.traffic.reads);
        buf.iter().map(|&x| x.as_f32()).collect()
    }

    fn to_f32_prefix(&self, buf: &Vec<T>, n: usize) -> Vec<f32> {
        TrafficCounters::count(&self.traffic.reads);
        buf[..n].iter().map(|&x| x.as_f32()).collect()
    }

    fn from_f64(&self, data: &[f64]) -> Vec<T> {
        TrafficCounters::count(&self.traffic.allocs);
        TrafficCounters::count(&self.traffic.uploads);
        data.iter().map(|&x| T::of_f64(x)).collect()
    }

    fn write_f64(&self, buf: &mut Vec<T>, data: &[f64]) {
        TrafficCounters::count(&self.traffic.uploads);
        for (b, &x) in buf.iter_mut().zip(data) {
            *b = T::of_f64(x);
        }
    }

    fn to_f64_prefix(&self, buf: &Vec<T>, n: usize) -> Vec<f64> {
        TrafficCounters::count(&self.traffic.reads);
        buf[..n].iter().map(|&x| x.as_f64()).collect()
    }

    fn to_f64_prefix_async(&self, buf: &Vec<T>, n: usize) -> Readback<f64> {
        TrafficCounters::count(&self.traffic.async_reads);
        Readback::ready(buf[..n].iter().map(|&x| x.as_f64()).collect())
    }

    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }

    fn idx_from(&self, data: &[u32]) -> Vec<u32> {
        TrafficCounters::count(&self.traffic.allocs);
        TrafficCounters::count(&self.traffic.uploads);
        data.to_vec()
    }

    fn idx_to_vec(&self, idx: &Vec<u32>) -> Vec<u32> {
        TrafficCounters::count(&self.traffic.reads);
        idx.clone()
    }

    fn idx_prefix_async(&self, idx: &Vec<u32>, n: usize) -> Readback<u32> {
        TrafficCounters::count(&self.traffic.async_reads);
        Readback::ready(idx[..n].to_vec())
    }

    fn idx_write(&self, idx: &mut Vec<u32>, data: &[u32]) {
        TrafficCounters::count(&self.traffic.uploads);
        idx[..data.len()].copy_from_slice(data);
    }

    fn write_f32(&self, buf: &mut Vec<T>, data: &[f32]) {
        TrafficCounters::count(&self.traffic.uploads);
        for (b, &x) in buf[..data.len()].iter_mut().zip(data) {
            *b = T::of_f32(x);
        }
    }

    fn fill(&self, buf: &mut Vec<T>, n: usize, value: f32) {
        let v = T::of_f32(value);
        buf[..n].iter_mut().for_each(|x| *x = v);
    }

    fn copy_cols(&self, dst: &mut Vec<T>, ld: usize, col: usize, src: &Vec<T>, rows: usize, cols: usize) {
        for r in 0..rows {
            dst[r * ld + col..r * ld + col + cols].copy_from_slice(&src[r * cols..(r + 1) * cols]);
        }
    }

    fn copy(&self, dst: &mut Vec<T>, src: &Vec<T>, n: usize) {
        dst[..n].copy_from_slice(&src[..n]);
    }

    // ---- elementwise ----------------------------------------------------------------------
    fn axpy(&self, y: &mut Vec<T>, x: &Vec<T>, alpha: f32, n: usize) {
        let a = T::of_f32(alpha);
        ew2(&mut y[..n], &x[..n], |yi, xi| *yi = *yi + a * xi);
    }

    fn scale(&self, x: &mut Vec<T>, alpha: f32, n: usize) {
        let a = T::of_f32(alpha);
        ew1(&mut x[..n], |xi| *xi = *xi * a);
    }

    fn sum_squares(&self, x: &Vec<T>, n: usize) -> f64 {
        TrafficCounters::count(&self.traffic.reads);
        // Fixed chunks, partial sums combined in chunk order: independent of the thread count.
        let partial: Vec<f64> =
            x[..n].par_chunks(EW_CHUNK).map(|c| c.iter().fold(0.0f64, |s, &v| s + v.as_f64() * v.as_f64())).collect();
        partial.iter().sum()
    }

    // ---- embedding ------------------------------------------------------------------------
    fn embedding_fwd(&self, out: &mut Vec<T>, table: &Vec<T>, ids: &Vec<u32>, n: usize, d: usize) {
        self.gather_rows(out, table, ids, n, d);
    }

    fn embedding_bwd(&self, dtable: &mut Vec<T>, dout: &Vec<T>, ids: &Vec<u32>, n: usize, d: usize) {
        self.scatter_add_rows(dtable, dout, ids, n, d);
    }

    // ---- linear ---------------------------------------------------------------------------
    fn matmul_fwd(&self, out: &mut Vec<T>, x: &Vec<T>, w: &Vec<T>, n: usize, k: usize, m: usize) {
        let [fx, fw] = self.gemm_formats(GemmProduct::Fwd, n, k, m);
        let (x, w) = (operand(x, n * k, fx), operand(w, m * k, fw));
        // out[n, m] = x[n, k] · (w[m, k])ᵀ; Wᵀ as a [k, m] view has strides (1, k).
        gemm(n, k, m, T::one(), &x, (k, 1), &w, (1, k), T::zero(), out, (m, 1));
        let out_format = self.emulation.read().unwrap().gemm_out.as_ref().map(|r| r(&GemmCall { product: GemmProduct::Fwd, n, k, m }));
        if let Some(f) = out_format.filter(|&f| f != Operand::F32) {
            out[..n * m].par_iter_mut().for_each(|v| *v = T::of_f32(f.round(v.as_f32())));
        }
    }

    fn matmul_bwd(
        &self,
        dx: Option<&mut Vec<T>>,
        dw: &mut Vec<T>,
        dout: &Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        k: usize,
        m: usize,
    ) {
        if let Some(dx) = dx {
            self.matmul_bwd_dx(dx, false, dout, w, n, k, m);
        }
        let [fg, fx] = self.gemm_formats(GemmProduct::Dw, n, k, m);
        let (g, x) = (operand(dout, n * m, fg), operand(x, n * k, fx));
        // dw[m, k] += doutᵀ[m, n] · x[n, k]; doutᵀ as an [m, n] view has strides (1, m).
        gemm(m, n, k, T::one(), &g, (1, m), &x, (k, 1), T::one(), dw, (k, 1));
    }

    fn matmul_bwd_dx(&self, dx: &mut Vec<T>, dx_set: bool, dout: &Vec<T>, w: &Vec<T>, n: usize, k: usize, m: usize) {
        let [fg, fw] = self.gemm_formats(GemmProduct::Dx, n, k, m);
        let (g, w) = (operand(dout, n * m, fg), operand(w, m * k, fw));
        let beta = if dx_set { T::zero() } else { T::one() };
        // dx[n, k] (+)= dout[n, m] · w[m, k]
        gemm(n, m, k, T::one(), &g, (m, 1), &w, (k, 1), beta, dx, (k, 1));
    }

    fn matmul_fwd_cat(&self, out: &mut Vec<T>, x: &Vec<T>, n: usize, k: usize, ws: &[(&Vec<T>, usize)]) {
        let total: usize = ws.iter().map(|&(_, m)| m).sum();
        let mut col = 0;
        for &(w, m) in ws {
            let [fx, fw] = self.gemm_formats(GemmProduct::Fwd, n, k, m);
            let (x, w) = (operand(x, n * k, fx), operand(w, m * k, fw));
            // out[:, col..col + m] = x · wᵀ, rows `total` apart.
            gemm(n, k, m, T::one(), &x, (k, 1), &w, (1, k), T::zero(), &mut out[col..], (total, 1));
            col += m;
        }
    }

    fn matmul_bwd_cat(
        &self,
        mut dx: Option<&mut Vec<T>>,
        dx_set: bool,
        x: &Vec<T>,
        dout: &Vec<T>,
        n: usize,
        k: usize,
        items: &mut [(&mut Vec<T>, &Vec<T>, usize)],
    ) {
        let total: usize = items.iter().map(|it| it.2).sum();
        if dx_set {
            if let Some(dx) = dx.as_deref_mut() {
                self.fill(dx, n * k, 0.0);
            }
        }
        let mut col = 0;
        for (dw, w, m) in items.iter_mut() {
            let m = *m;
            let g = &dout[col..];
            if let Some(dx) = dx.as_deref_mut() {
                let [fg, fw] = self.gemm_formats(GemmProduct::Dx, n, k, m);
                let (g, w) = (operand(g, extent(n, m, total, 1), fg), operand(w, m * k, fw));
                // dx[n, k] += dout[:, col..col + m] · w[m, k]
                gemm(n, m, k, T::one(), &g, (total, 1), &w, (k, 1), T::one(), dx, (k, 1));
            }
            let [fg, fx] = self.gemm_formats(GemmProduct::Dw, n, k, m);
            let (g, x) = (operand(g, extent(n, m, total, 1), fg), operand(x, n * k, fx));
            // dw[m, k] += dout[:, col..col + m]ᵀ · x
            gemm(m, n, k, T::one(), &g, (1, total), &x, (k, 1), T::one(), dw, (k, 1));
            col += m;
        }
    }

    // ---- normalisation --------------------------------------------------------------------
    fn rmsnorm_fwd(&self, out: &mut Vec<T>, rstd: &mut Vec<T>, x: &Vec<T>, w: &Vec<T>, n: usize, d: usize, eps: f32) {
        if n == 0 || d == 0 {
            return;
        }
        let w = &w[..d];
        let eps = eps as f64;
        out[..n * d]
            .par_chunks_mut(d)
            .zip(rstd[..n].par_iter_mut())
            .zip(x[..n * d].par_chunks(d))
            .with_min_len(min_rows(d))
            .for_each(|((o, r), xr)| {
                let ss = xr.iter().fold(0.0f64, |s, &v| s + v.as_f64() * v.as_f64());
                let rs = T::of_f64(1.0 / (ss / d as f64 + eps).sqrt());
                *r = rs;
                for ((oj, &xj), &wj) in o.iter_mut().zip(xr).zip(w) {
                    *oj = wj * (xj * rs);
                }
            });
    }

    fn rmsnorm_bwd(
        &self,
        dx: &mut Vec<T>,
        dw: &mut Vec<T>,
        dout: &Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        rstd: &Vec<T>,
        n: usize,
        d: usize,
    ) {
        if n == 0 || d == 0 {
            return;
        }
        let w = &w[..d];
        let inv_d = T::of_f64(1.0 / d as f64);
        let cd = RMS_DW_ROWS * d;
        // Per fixed block of rows: dx in place (rows are owned) and a partial dw; the partials
        // are added in block order afterwards, so dw does not depend on scheduling.
        let partials: Vec<Vec<T>> = dx[..n * d]
            .par_chunks_mut(cd)
            .zip(dout[..n * d].par_chunks(cd))
            .zip(x[..n * d].par_chunks(cd))
            .zip(rstd[..n].par_chunks(RMS_DW_ROWS))
            .map(|(((dxc, gc), xc), rc)| {
                let mut dwp = vec![T::zero(); d];
                for (r, &rs) in rc.iter().enumerate() {
                    let g = &gc[r * d..(r + 1) * d];
                    let xr = &xc[r * d..(r + 1) * d];
                    let dxr = &mut dxc[r * d..(r + 1) * d];
                    // c = mean(g ⊙ w ⊙ x̂)
                    let mut c = T::zero();
                    for j in 0..d {
                        let xh = xr[j] * rs;
                        c = c + g[j] * w[j] * xh;
                        dwp[j] = dwp[j] + g[j] * xh;
                    }
                    let c = c * inv_d;
                    for j in 0..d {
                        let xh = xr[j] * rs;
                        dxr[j] = dxr[j] + rs * (g[j] * w[j] - xh * c);
                    }
                }
                dwp
            })
            .collect();
        let dw = &mut dw[..d];
        for p in &partials {
            for (a, &b) in dw.iter_mut().zip(p) {
                *a = *a + b;
            }
        }
    }

    // ---- rotary embedding -----------------------------------------------------------------
    fn rope_fwd(&self, x: &mut Vec<T>, pos: &Vec<u32>, n: usize, heads: usize, head_dim: usize, theta: f32) {
        rope(x, pos, n, heads, head_dim, theta, false);
    }

    fn rope_bwd(&self, dx: &mut Vec<T>, pos: &Vec<u32>, n: usize, heads: usize, head_dim: usize, theta: f32) {
        rope(dx, pos, n, heads, head_dim, theta, true);
    }

    // ---- attention ------------------------------------------------------------------------
    fn attention_fwd(
        &self,
        out: &mut Vec<T>,
        lse: &mut Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        shape: &AttnShape<'_, Vec<u32>>,
    ) {
        attention::forward(out, lse, q, k, v, shape, self.attention_rounding());
    }

    fn attention_bwd(
        &self,
        dq: &mut Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
        dout: &Vec<T>,
        out: &Vec<T>,
        lse: &Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        shape: &AttnShape<'_, Vec<u32>>,
    ) {
        attention::backward(dq, dk, dv, dout, out, lse, q, k, v, shape, self.attention_rounding());
    }

    // ---- activations ----------------------------------------------------------------------
    fn swiglu_fwd(&self, out: &mut Vec<T>, gate_up: &Vec<T>, rows: usize, f: usize) {
        if f == 0 {
            return;
        }
        out[..rows * f].par_chunks_mut(f).zip(gate_up[..2 * rows * f].par_chunks(2 * f)).for_each(|(o, gu)| {
            let (g, u) = gu.split_at(f);
            for i in 0..f {
                o[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        });
    }

    fn swiglu_bwd(&self, dgate_up: &mut Vec<T>, dout: &Vec<T>, gate_up: &Vec<T>, rows: usize, f: usize) {
        if f == 0 {
            return;
        }
        let one = T::one();
        dgate_up[..2 * rows * f]
            .par_chunks_mut(2 * f)
            .zip(dout[..rows * f].par_chunks(f))
            .zip(gate_up[..2 * rows * f].par_chunks(2 * f))
            .for_each(|((dgu, o), gu)| {
                let (dg, du) = dgu.split_at_mut(f);
                let (g, u) = gu.split_at(f);
                for i in 0..f {
                    let s = sigmoid(g[i]);
                    dg[i] = dg[i] + o[i] * u[i] * s * (one + g[i] * (one - s));
                    du[i] = du[i] + o[i] * (g[i] * s);
                }
            });
    }

    fn gelu_fwd(&self, out: &mut Vec<T>, x: &Vec<T>, n: usize) {
        ew2(&mut out[..n], &x[..n], |o, xi| *o = T::of_f64(math::gelu(xi.as_f64())));
    }

    fn gelu_bwd(&self, dx: &mut Vec<T>, dout: &Vec<T>, x: &Vec<T>, n: usize) {
        ew3(&mut dx[..n], &dout[..n], &x[..n], |d, g, xi| *d = *d + g * T::of_f64(math::gelu_grad(xi.as_f64())));
    }

    fn gate_fwd(&self, out: &mut Vec<T>, x: &Vec<T>, f: GateFn, alpha: f32, n: usize) {
        let a = T::of_f32(alpha);
        match f {
            GateFn::Sigmoid => ew2(&mut out[..n], &x[..n], |o, xi| *o = a * sigmoid(xi)),
            GateFn::Tanh => ew2(&mut out[..n], &x[..n], |o, xi| *o = a * xi.tanh()),
            GateFn::Identity => out[..n].copy_from_slice(&x[..n]),
        }
    }

    fn gate_bwd(&self, dx: &mut Vec<T>, dout: &Vec<T>, x: &Vec<T>, f: GateFn, alpha: f32, n: usize) {
        let a = T::of_f32(alpha);
        let one = T::one();
        match f {
            GateFn::Sigmoid => ew3(&mut dx[..n], &dout[..n], &x[..n], |d, g, xi| {
                let s = sigmoid(xi);
                *d = *d + g * a * s * (one - s)
            }),
            GateFn::Tanh => ew3(&mut dx[..n], &dout[..n], &x[..n], |d, g, xi| {
                let t = xi.tanh();
                *d = *d + g * a * (one - t * t)
            }),
            GateFn::Identity => ew2(&mut dx[..n], &dout[..n], |d, g| *d = *d + g),
        }
    }

    fn softmax_fwd(&self, out: &mut Vec<T>, x: &Vec<T>, n: usize, c: usize) {
        if n == 0 || c == 0 {
            return;
        }
        out[..n * c].par_chunks_mut(c).zip(x[..n * c].par_chunks(c)).with_min_len(min_rows(c)).for_each(|(o, xr)| {
            let (m, s) = row_max_sumexp(xr);
            let inv = T::of_f64(1.0 / s);
            for (oj, &xj) in o.iter_mut().zip(xr) {
                *oj = (xj - m).exp() * inv;
            }
        });
    }

    fn softmax_bwd(&self, dx: &mut Vec<T>, dout: &Vec<T>, out: &Vec<T>, n: usize, c: usize) {
        if n == 0 || c == 0 {
            return;
        }
        dx[..n * c]
            .par_chunks_mut(c)
            .zip(dout[..n * c].par_chunks(c))
            .zip(out[..n * c].par_chunks(c))
            .with_min_len(min_rows(c))
            .for_each(|((d, g), y)| {
                let dotgy = math::dot(g, y);
                for j in 0..c {
                    d[j] = d[j] + y[j] * (g[j] - dotgy);
                }
            });
    }

    // ---- token subsets --------------------------------------------------------------------
    fn gather_rows(&self, out: &mut Vec<T>, x: &Vec<T>, idx: &Vec<u32>, m: usize, d: usize) {
        if m == 0 || d == 0 {
            return;
        }
        out[..m * d].par_chunks_mut(d).zip(idx[..m].par_iter()).with_min_len(min_rows(d)).for_each(|(o, &r)| {
            let r = r as usize;
            o.copy_from_slice(&x[r * d..(r + 1) * d]);
        });
    }

    fn scatter_add_rows(&self, dx: &mut Vec<T>, dout: &Vec<T>, idx: &Vec<u32>, m: usize, d: usize) {
        scatter_grouped(dx, d, idx, m, |row, i| axpy(row, T::one(), &dout[i * d..(i + 1) * d]));
    }

    fn scatter_add_scaled(&self, h: &mut Vec<T>, y: &Vec<T>, scale: &Vec<T>, idx: &Vec<u32>, m: usize, d: usize) {
        scatter_grouped(h, d, idx, m, |row, i| axpy(row, scale[i], &y[i * d..(i + 1) * d]));
    }

    fn scatter_add_scaled_bwd(
        &self,
        dy: &mut Vec<T>,
        dscale: &mut Vec<T>,
        dh: &Vec<T>,
        y: &Vec<T>,
        scale: &Vec<T>,
        idx: &Vec<u32>,
        m: usize,
        d: usize,
    ) {
        if m == 0 || d == 0 {
            return;
        }
        dy[..m * d]
            .par_chunks_mut(d)
            .zip(dscale[..m].par_iter_mut())
            .zip(y[..m * d].par_chunks(d))
            .zip(scale[..m].par_iter().zip(idx[..m].par_iter()))
            .with_min_len(min_rows(d))
            .for_each(|(((dyr, ds), yr), (&s, &r))| {
                let r = r as usize;
                let dhr = &dh[r * d..(r + 1) * d];
                axpy(dyr, s, dhr);
                *ds = *ds + math::dot(dhr, yr);
            });
    }

    fn scatter_rows(&self, x: &mut Vec<T>, y: &Vec<T>, idx: &Vec<u32>, m: usize, d: usize) {
        // Last write wins for repeated indices, as a serial loop would do.
        scatter_grouped(x, d, idx, m, |row, i| row.copy_from_slice(&y[i * d..(i + 1) * d]));
    }

    fn scatter_rows_bwd(&self, dy: &mut Vec<T>, dx: &mut Vec<T>, idx: &Vec<u32>, m: usize, d: usize) {
        if m == 0 || d == 0 {
            return;
        }
        {
            let dx: &Vec<T> = dx;
            dy[..m * d].par_chunks_mut(d).zip(idx[..m].par_iter()).with_min_len(min_rows(d)).for_each(|(dyr, &r)| {
                let r = r as usize;
                axpy(dyr, T::one(), &dx[r * d..(r + 1) * d]);
            });
        }
        for &r in &idx[..m] {
            let r = r as usize;
            dx[r * d..(r + 1) * d].iter_mut().for_each(|v| *v = T::zero());
        }
    }

    fn index_fill(&self, x: &mut Vec<T>, idx: &Vec<u32>, m: usize, value: f32) {
        let v = T::of_f32(value);
        for &r in &idx[..m] {
            x[r as usize] = v;
        }
    }

    fn subset_rows(&self, idx: &mut Vec<u32>, pos: &mut Vec<u32>, parent: &Vec<u32>, local: &Vec<u32>, m: usize, seq_len: usize) {
        for (i, &j) in local[..m].iter().enumerate() {
            idx[i] = parent[j as usize];
            pos[i] = idx[i] % seq_len as u32;
        }
    }

    fn topk_segments(&self, out: &mut Vec<u32>, scores: &Vec<T>, cu: &Vec<u32>, num_seqs: usize, k: usize) {
        if k == 0 || num_seqs == 0 {
            return;
        }
        let scores: &[T] = scores;
        out[..num_seqs * k].par_chunks_mut(k).enumerate().for_each(|(s, o)| {
            let (a, b) = (cu[s], cu[s + 1]);
            assert!(b >= a && k <= (b - a) as usize, "topk_segments: k={k} > segment {s} length");
            let mut ids: Vec<u32> = (a..b).collect();
            if k < ids.len() {
                ids.select_nth_unstable_by(k - 1, |&i, &j| topk_order(scores, i, j));
                ids.truncate(k);
            }
            ids.sort_unstable();
            o.copy_from_slice(&ids);
        });
    }

    // ---- losses ---------------------------------------------------------------------------
    fn cross_entropy_fwd(&self, loss: &mut Vec<T>, logits: &Vec<T>, targets: &Vec<u32>, n: usize, vocab: usize) {
        if n == 0 {
            return;
        }
        assert!(vocab > 0);
        loss[..n]
            .par_iter_mut()
            .zip(logits[..n * vocab].par_chunks(vocab))
            .zip(targets[..n].par_iter())
            .with_min_len(min_rows(vocab))
            .for_each(|((l, row), &t)| {
                if t == u32::MAX {
                    *l = T::zero();
                    return;
                }
                let t = t as usize;
                assert!(t < vocab, "cross_entropy: target {t} >= vocab {vocab}");
                let (m, s) = row_max_sumexp(row);
                *l = T::of_f64(m.as_f64() + s.ln() - row[t].as_f64());
            });
    }

    fn cross_entropy_bwd(
        &self,
        dlogits: &mut Vec<T>,
        logits: &Vec<T>,
        targets: &Vec<u32>,
        scale: f32,
        n: usize,
        vocab: usize,
    ) {
        if n == 0 {
            return;
        }
        assert!(vocab > 0);
        let sc = T::of_f32(scale);
        dlogits[..n * vocab]
            .par_chunks_mut(vocab)
            .zip(logits[..n * vocab].par_chunks(vocab))
            .zip(targets[..n].par_iter())
            .with_min_len(min_rows(vocab))
            .for_each(|((d, row), &t)| {
                if t == u32::MAX {
                    return;
                }
                let t = t as usize;
                assert!(t < vocab, "cross_entropy: target {t} >= vocab {vocab}");
                let (m, s) = row_max_sumexp(row);
                let inv = T::of_f64(1.0 / s);
                for (dj, &xj) in d.iter_mut().zip(row) {
                    *dj = *dj + sc * ((xj - m).exp() * inv);
                }
                d[t] = d[t] - sc;
            });
    }

    fn bce_logits_fwd(&self, loss: &mut Vec<T>, x: &Vec<T>, targets: &Vec<T>, n: usize) {
        ew3(&mut loss[..n], &x[..n], &targets[..n], |l, xi, t| {
            *l = bce_with_logits(xi, t);
        });
    }

    fn bce_logits_bwd(&self, dx: &mut Vec<T>, x: &Vec<T>, targets: &Vec<T>, scale: f32, n: usize) {
        let sc = T::of_f32(scale);
        ew3(&mut dx[..n], &x[..n], &targets[..n], |d, xi, t| *d = *d + sc * (sigmoid(xi) - t));
    }

    // ---- optimiser ------------------------------------------------------------------------
    fn adamw(
        &self,
        param: &mut Vec<T>,
        grad: &Vec<T>,
        m: &mut Vec<T>,
        v: &mut Vec<T>,
        n: usize,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        step: u64,
    ) {
        adamw_update(param, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, step, None);
    }

    /// One fused pass per tensor: `g * grad_scale` is formed where [`Backend::scale`] would have
    /// stored it (the same float operations as scale then adamw), the gradients stay unscaled.
    fn adamw_many(&self, items: &mut [AdamWItem<'_, Self>], lr: f32, beta1: f32, beta2: f32, eps: f32, step: u64, grad_scale: f32) {
        let s = (grad_scale != 1.0).then(|| T::of_f32(grad_scale));
        for it in items.iter_mut() {
            adamw_update(it.param, it.grad, it.m, it.v, it.n, lr, beta1, beta2, eps, it.weight_decay, step, s);
        }
    }
}

/// [`Backend::adamw`] on the first `n` elements, the gradient multiplied by `grad_scale` when
/// given (`g * T::of_f32(alpha)`, as [`Backend::scale`] computes it).
#[allow(clippy::too_many_arguments)]
fn adamw_update<T: CpuFloat>(
    param: &mut [T],
    grad: &[T],
    m: &mut [T],
    v: &mut [T],
    n: usize,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step: u64,
    grad_scale: Option<T>,
) {
    assert!(step >= 1, "adamw: step is 1-based");
    let sc = AdamStepScalars::new(lr, beta1, beta2, step);
    let decay = T::of_f64(1.0 - lr as f64 * weight_decay as f64);
    let (step_size, bc2_sqrt) = (T::of_f64(sc.step_size), T::of_f64(sc.bc2_sqrt));
    let (tb1, tb2) = (T::of_f64(beta1 as f64), T::of_f64(beta2 as f64));
    let (ob1, ob2) = (T::of_f64(sc.ob1), T::of_f64(sc.ob2));
    let teps = T::of_f32(eps);
    param[..n]
        .par_chunks_mut(EW_CHUNK)
        .zip(m[..n].par_chunks_mut(EW_CHUNK))
        .zip(v[..n].par_chunks_mut(EW_CHUNK))
        .zip(grad[..n].par_chunks(EW_CHUNK))
        .for_each(|(((p, mc), vc), g)| {
            for i in 0..p.len() {
                let gi = match grad_scale {
                    Some(s) => g[i] * s,
                    None => g[i],
                };
                p[i] = p[i] * decay;
                mc[i] = tb1 * mc[i] + ob1 * gi;
                vc[i] = tb2 * vc[i] + ob2 * gi * gi;
                let denom = vc[i].sqrt() / bc2_sqrt + teps;
                p[i] = p[i] - step_size * (mc[i] / denom);
            }
        });
}

/// Rotary embedding in place on `x[n, heads, head_dim]` (rotate_half layout). `inverse` rotates
/// by `-angle` (the transpose, used for the gradient).
fn rope<T: CpuFloat>(x: &mut [T], pos: &[u32], n: usize, heads: usize, head_dim: usize, theta: f32, inverse: bool) {
    if n == 0 || heads == 0 || head_dim == 0 {
        return;
    }
    assert!(head_dim & 1 == 0, "rope: head_dim must be even");
    let half = head_dim / 2;
    let theta = theta as f64;
    let inv_freq: Vec<f64> = (0..half).map(|j| theta.powf(-((2 * j) as f64) / head_dim as f64)).collect();
    let row = heads * head_dim;
    x[..n * row].par_chunks_mut(row).zip(pos[..n].par_iter()).with_min_len(min_rows(row)).for_each(|(xr, &p)| {
        for (j, &f) in inv_freq.iter().enumerate() {
            let (s, c) = (p as f64 * f).sin_cos();
            let (s, c) = (T::of_f64(if inverse { -s } else { s }), T::of_f64(c));
            for h in 0..heads {
                let base = h * head_dim;
                let x1 = xr[base + j];
                let x2 = xr[base + half + j];
                xr[base + j] = x1 * c - x2 * s;
                xr[base + half + j] = x2 * c + x1 * s;
            }
        }
    });
}
