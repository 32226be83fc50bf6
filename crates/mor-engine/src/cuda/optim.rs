//! Multi-tensor ops (`kernels/optim.cu`): the optimizer step, gradient zeroing and the gradient
//! norm of a few hundred tensors in one launch (two for the norm) instead of one or two per
//! tensor, as PyTorch's `multi_tensor_apply`. Most tensors of a model are tiny (norm weights), so
//! per-tensor launches, not bandwidth, set the cost of these ops.
//!
//! Each call describes its tensors in a table of 64-bit words (device pointers, lengths, the
//! first block of each tensor's chunks; the layouts are the `Mt*` structs of the kernel file).
//! Tables are cached by content: the buffer sets of a training run do not change, so each is
//! uploaded once (a host-to-device copy: the first call with a new set is not capturable in a
//! CUDA graph) and later calls only launch, with the per-step scalars as arguments. Results equal
//! the single-tensor kernels' bit for bit (same per-element math; the norm replays the
//! per-tensor launch shapes and reduction trees).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use cudarc::driver::{result as drv_result, CudaSlice, PushKernelArg};

use super::{cfg, check_len, sumsq_blocks, Cuda, CudaBuf, Slot, EW_THREADS};
use crate::backend::{opt_scalars, AdamStepScalars, AdamWItem};

/// Elements per block of the multi-tensor fill and AdamW kernels.
const MT_CHUNK: usize = 16 * 1024;
/// Cached tables kept at most (all are dropped when a new one would exceed this).
const MT_TABLES_MAX: usize = 64;
/// Threads per block of `sumsq_many_final` (those of `sumsq_final` in `sum_squares`).
const SUMSQ_FINAL_THREADS: u32 = 1024;

/// The per-step scalars of the AdamW kernels (`adamw_f32`, `adamw_many_f32`): the shared
/// [`AdamStepScalars`] rounded to f32, as the CPU reference rounds them.
pub(super) struct AdamScalars {
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub ob1: f32,
    pub ob2: f32,
}

impl AdamScalars {
    pub fn new(lr: f32, beta1: f32, beta2: f32, step: u64) -> Self {
        let s = AdamStepScalars::new(lr, beta1, beta2, step);
        AdamScalars { step_size: s.step_size as f32, bc2_sqrt: s.bc2_sqrt as f32, ob1: s.ob1 as f32, ob2: s.ob2 as f32 }
    }
}

/// Device copies of multi-tensor tables, by content.
#[derive(Default)]
pub(super) struct MtTables(Mutex<HashMap<Vec<u64>, CudaSlice<u64>>>);

impl Cuda {
    /// Device pointer of a table holding `words`, uploaded on first use.
    fn mt_table(&self, words: Vec<u64>) -> u64 {
        let mut tables = self.mt_tables.0.lock().unwrap();
        if tables.len() >= MT_TABLES_MAX && !tables.contains_key(&words) {
            tables.clear(); // freed in stream order, after the launches that used them
            self.resources.fetch_add(1, Ordering::Relaxed); // a graph may have recorded one
        }
        let dev = match tables.entry(words) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                self.not_capturing("uploading a multi-tensor table");
                let dev = self.stream.clone_htod(e.key().as_slice()).expect("cuda: host-to-device copy failed");
                e.insert(dev)
            }
        };
        self.p(dev)
    }

    /// [`crate::Backend::fill_many`]: f32 buffers in one launch, bf16 ones through `fill`.
    pub(super) fn fill_many_mt(&self, bufs: &mut [(&mut CudaBuf, usize)], value: f32) {
        let _p = self.prof("fill_many");
        let mut words = Vec::with_capacity(3 * bufs.len());
        let mut blocks = 0usize;
        for (buf, n) in bufs.iter_mut() {
            let n = *n;
            check_len("buffer", buf.len(), n);
            if buf.is_bf16() {
                crate::Backend::fill(self, buf, n, value);
            } else if n > 0 {
                words.extend([self.pm(*buf), n as u64, blocks as u64]);
                blocks += n.div_ceil(MT_CHUNK);
            }
        }
        if blocks == 0 {
            return;
        }
        let count = (words.len() / 3) as i32;
        let table = self.mt_table(words);
        launch!(self, "fill_many_f32", cfg((blocks as u32, 1, 1), EW_THREADS, 0), [table, count, MT_CHUNK as i64, value]);
    }

    /// [`crate::Backend::adamw_many`] in one launch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adamw_many_mt(&self, items: &mut [AdamWItem<'_, Cuda>], lr: f32, beta1: f32, beta2: f32, eps: f32, step: u64, grad_scale: f32) {
        let _p = self.prof("adamw_many");
        assert!(step >= 1, "adamw: step is 1-based");
        let Some((table, count, blocks)) = self.adamw_table(items) else { return };
        // The decay per tensor is formed on the device (in f64, as `adamw` forms it here).
        let AdamScalars { step_size, bc2_sqrt, ob1, ob2 } = AdamScalars::new(lr, beta1, beta2, step);
        launch!(
            self,
            "adamw_many_f32",
            cfg((blocks as u32, 1, 1), EW_THREADS, 0),
            [table, count, MT_CHUNK as i64, lr, grad_scale, step_size, bc2_sqrt, beta1, beta2, ob1, ob2, eps]
        );
    }

    /// [`crate::Backend::adamw_many_dev`] in one launch (the scalars read by the kernel).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adamw_many_dev_mt(&self, items: &mut [AdamWItem<'_, Cuda>], beta1: f32, beta2: f32, eps: f32, skip_nonfinite: bool, sc: &CudaBuf) {
        let _p = self.prof("adamw_many");
        check_len("scalars", sc.len(), opt_scalars::LEN);
        Self::f32_only("adamw_many_dev", &[("scalars", sc)]);
        let Some((table, count, blocks)) = self.adamw_table(items) else { return };
        let scp = self.p(sc);
        launch!(
            self,
            "adamw_many_dev_f32",
            cfg((blocks as u32, 1, 1), EW_THREADS, 0),
            [table, count, MT_CHUNK as i64, scp, beta1, beta2, eps, skip_nonfinite as i32]
        );
    }

    /// [`crate::Backend::clip_scalars`]: the sums of squares as `sum_squares_many` launches them,
    /// then one thread forms the norm and the clip scale into `sc` (no host read).
    pub(super) fn clip_scalars_mt(&self, xs: &[(&CudaBuf, usize)], max_norm: f64, sc: &mut CudaBuf) {
        let _p = self.prof("sum_squares");
        check_len("scalars", sc.len(), opt_scalars::LEN);
        Self::f32_only("clip_scalars", &[("scalars", &*sc)]);
        let out = self.sumsq_many_launch(xs);
        let scp = self.pm(sc);
        launch!(self, "clip_scalars_f32", cfg((1, 1, 1), 1, 0), [out, xs.len() as i32, max_norm, scp]);
    }

    /// The multi-tensor table of an AdamW step over `items` (versions of the written buffers
    /// bumped), its entry count and block count; `None` when there is nothing to update.
    fn adamw_table(&self, items: &mut [AdamWItem<'_, Cuda>]) -> Option<(u64, i32, usize)> {
        let mut words = Vec::with_capacity(7 * items.len());
        let mut blocks = 0usize;
        for it in items.iter_mut() {
            Self::f32_only("adamw", &[("param", &*it.param), ("grad", it.grad), ("m", &*it.m), ("v", &*it.v)]);
            for (name, len) in [("param", it.param.len()), ("grad", it.grad.len()), ("m", it.m.len()), ("v", it.v.len())] {
                check_len(name, len, it.n);
            }
            if it.n == 0 {
                continue;
            }
            // Writing through `pm` bumps the versions (stale bf16 weight copies are remade).
            let (pp, gp, mp, vp) = (self.pm(it.param), self.p(it.grad), self.pm(it.m), self.pm(it.v));
            words.extend([pp, gp, mp, vp, it.n as u64, blocks as u64, (it.weight_decay as f64).to_bits()]);
            blocks += it.n.div_ceil(MT_CHUNK);
        }
        if blocks == 0 {
            return None;
        }
        let count = (words.len() / 7) as i32;
        Some((self.mt_table(words), count, blocks))
    }

    /// [`crate::Backend::sum_squares_many`] in two launches and one read; each tensor keeps the
    /// block count and reduction tree of its own `sum_squares`, so the results are the same.
    pub(super) fn sum_squares_many_mt(&self, xs: &[(&CudaBuf, usize)]) -> Vec<f64> {
        let _p = self.prof("sum_squares");
        if xs.is_empty() {
            return Vec::new();
        }
        let out = self.sumsq_many_launch(xs);
        let mut r = vec![0.0f64; xs.len()];
        unsafe { drv_result::memcpy_dtoh_async(&mut r[..], out, self.stream.cu_stream()) }.expect("cuda: device-to-host copy failed");
        self.synchronize();
        r
    }

    /// The launches of `sum_squares_many`: the per-tensor f64 sums land in scratch, whose device
    /// pointer is returned (`xs.len()` values).
    fn sumsq_many_launch(&self, xs: &[(&CudaBuf, usize)]) -> u64 {
        if xs.is_empty() {
            return self.scratch(Slot::SumsqOut, 8);
        }
        let mut words = Vec::with_capacity(4 * xs.len());
        let mut blocks = 0usize;
        for &(x, n) in xs {
            check_len("x", x.len(), n);
            Self::f32_only("sum_squares", &[("x", x)]);
            // An empty tensor gets one block that adds nothing: its sum is 0, as sum_squares says.
            let b = sumsq_blocks(n);
            words.extend([self.p(x), n as u64, blocks as u64, b as u64]);
            blocks += b;
        }
        let partial = self.scratch(Slot::SumsqPartial, blocks * 8);
        let out = self.scratch(Slot::SumsqOut, xs.len() * 8);
        let count = xs.len() as i32;
        let table = self.mt_table(words);
        launch!(self, "sumsq_many_partial_f32", cfg((blocks as u32, 1, 1), EW_THREADS, 0), [table, count, partial]);
        launch!(self, "sumsq_many_final", cfg((count as u32, 1, 1), SUMSQ_FINAL_THREADS, 0), [table, partial, out]);
        out
    }
}
