//! CUDA backend (feature `cuda`): one device, one stream, f32 and bf16 buffers.
//!
//! * Libraries are loaded at run time (cudarc with `fallback-dynamic-loading`), so building needs
//!   no CUDA installation; running needs the driver, cuBLAS and NVRTC 13.0 on `LD_LIBRARY_PATH`
//!   (`scripts/gpu-env.sh` sets that up on the GPU machine).
//! * Kernels are CUDA C in `kernels/*.cu`, compiled once per process by NVRTC for `sm_90a`
//!   ([`compile_kernels`]; `CUDA_INCLUDE_DIR` is passed as an include path when set) and loaded
//!   once per [`Cuda`] instance. A compilation failure prints the NVRTC log.
//! * Two precisions ([`Backend::set_matmul_precision`], `MOR_GEMM=bf16`): fp32 mode is the parity
//!   reference (cuBLAS SGEMM, default math mode: no TF32 unless `NVIDIA_TF32_OVERRIDE` says so;
//!   the exact attention kernels of `kernels/attention.cu`); bf16 mode rounds GEMM operands to
//!   bf16 (tensor-core cuBLASLt matmuls, fp32 accumulation, one plan per shape with its algorithm
//!   timed or taken from the heuristic, see `cuda/gemm.rs`) and runs attention with head dim 32/64
//!   on the tensor-core kernels of `kernels/flash_attention.cu`. Parameters, gradients, optimizer
//!   state and the residual stream are f32 in both. The row-major `[out, in]` weight layout is
//!   mapped onto column-major calls.
//! * Element types ([`CudaBuf`], [`Dtype`]): [`Backend::zeros`] makes f32 buffers;
//!   [`Backend::zeros_act`] makes bf16 ones in bf16 mode (f32 in fp32 mode), for the activations
//!   the model saves and their gradients. GEMMs take either for `x`, `dout`, `out` and `dx`
//!   (a bf16 operand needs no conversion pass, a bf16 output is written by cuBLASLt directly) and
//!   round an f32 weight once per change of its contents (a copy kept with the buffer); the
//!   attention kernels, RMSNorm's output, RoPE, SwiGLU, `fill` and `copy` (converting) have bf16
//!   variants. Every other op takes f32 buffers only and says so when given a bf16 one.
//! * Every reduction but one has a fixed order that depends only on the shapes, so results are
//!   reproducible run to run: scatters with repeated destination rows (embedding backward,
//!   `scatter_add_rows`, `scatter_rows`) group their sources with a stable counting sort on the
//!   device instead of using float atomics; RMSNorm's weight gradient and `sum_squares` use fixed
//!   two-pass reductions. The exception: the tensor-core attention backward is by default one
//!   fused kernel (5 products instead of 7) whose dq sums by float atomics; in deterministic mode
//!   ([`CudaOptions::deterministic`], `MOR_DETERMINISTIC=1`, [`Cuda::set_deterministic`]) it runs
//!   as two passes (dq, then dk/dv) that give every gradient row one owner.
//! * Nothing here synchronises with the host except the reads (`to_f32`, `idx_to_vec`,
//!   `sum_squares`; `*_async` wait on an event of their own) and, with tuned GEMM algorithms
//!   ([`GemmSelect::Tuned`]), the first bf16 GEMM of each new shape (it times the candidates), so
//!   a training step after the first can be captured in a CUDA graph ([`Backend::capture_begin`];
//!   while capturing, whatever would allocate, transfer, wait or plan a GEMM panics, and cached
//!   bf16 weight copies are remade once per capture so its replays convert changed weights).
//!
//! Layout conventions are those of the CPU reference ([`crate::cpu`]): `lse` of the attention is
//! `[nq, heads]`, `+inf` for a query with no visible key.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{
    result as drv_result, sys as drv_sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr,
    DevicePtrMut, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::backend::{attention_bwd_packed_unfused, matmul_bwd_each, matmul_fwd_each, matmul_fwd_residual_unfused, AdamWItem, AttnBwdInputs, AttnGrads, AttnShape, Backend, GateFn, MatmulGrad, MatmulPrecision, Readback, StepGraph};

/// The CUDA C source of every kernel, as handed to NVRTC.
pub const KERNEL_SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/elementwise.cu"),
    "\n",
    include_str!("kernels/rows.cu"),
    "\n",
    include_str!("kernels/topk.cu"),
    "\n",
    include_str!("kernels/attention.cu"),
    "\n",
    include_str!("kernels/flash_attention.cu"),
    "\n",
    include_str!("kernels/optim.cu"),
);

/// Every `extern "C"` kernel of [`KERNEL_SOURCE`], loaded at start-up (a missing one is an error).
const KERNELS: &[&str] = &[
    "fill_f32",
    "axpy_f32",
    "scale_f32",
    "sumsq_partial_f32",
    "sumsq_final",
    "f32_to_bf16",
    "bf16_to_f32",
    "copy_block",
    "fill_bf16",
    "swiglu_fwd_bf16",
    "swiglu_bwd_bf16",
    "rmsnorm_fwd_to_bf16",
    "rope_bf16",
    "rope_vec_f32",
    "rope_vec_bf16",
    "attn_delta_bf16",
    "attn_dq_from_acc",
    "attn_dq_from_acc_rope",
    "attn_pack_kv_rope",
    "attn_delta_bf16_f32",
    "bce_fwd_f32",
    "bce_bwd_f32",
    "adamw_f32",
    "swiglu_fwd_f32",
    "swiglu_bwd_f32",
    "gelu_fwd_f32",
    "gelu_bwd_f32",
    "gate_fwd_f32",
    "gate_bwd_f32",
    "rmsnorm_fwd_f32",
    "rmsnorm_bwd_dx_f32",
    "rmsnorm_dw_partial_f32",
    "rmsnorm_dw_final",
    "rmsnorm_fwd_v2_f32",
    "rmsnorm_fwd_v4_f32",
    "rmsnorm_fwd_v8_f32",
    "rmsnorm_fwd_v16_f32",
    "rmsnorm_fwd_v2_to_bf16",
    "rmsnorm_fwd_v4_to_bf16",
    "rmsnorm_fwd_v8_to_bf16",
    "rmsnorm_fwd_v16_to_bf16",
    "rmsnorm_bwd_v2_f32",
    "rmsnorm_bwd_v4_f32",
    "rmsnorm_bwd_v8_f32",
    "rmsnorm_bwd_v16_f32",
    "rmsnorm_dw_reduce",
    "rope_f32",
    "softmax_fwd_f32",
    "softmax_bwd_f32",
    "cross_entropy_fwd_f32",
    "cross_entropy_bwd_f32",
    "cross_entropy_fwd_bwd_f32",
    "cross_entropy_fwd_bwd_bf16",
    "cross_entropy_fwd_bwd_bf16_logits",
    "cross_entropy_fwd_bf16",
    "gather_rows_f32",
    "scatter_add_scaled_bwd_f32",
    "gather_add_rows_f32",
    "zero_rows_f32",
    "index_fill_f32",
    "group_count",
    "group_scan",
    "group_place",
    "group_rank",
    "group_apply_f32",
    "scatter_distinct_f32",
    "topk_segments_f32",
    "subset_rows_u32",
    "attn_tiles",
    "attn_rank_order",
    "attn_delta_f32",
    "attn_fwd_f32_d64",
    "attn_bwd_dq_f32_d64",
    "attn_bwd_dkdv_f32_d64",
    "attn_fwd_f32_d128",
    "attn_bwd_dq_f32_d128",
    "attn_bwd_dkdv_f32_d128",
    "attn_tile_range",
    "wg_probe_d32",
    "wg_probe_d64",
    "tma_probe_d64",
    "fa_trace_take",
    "fill_many_f32",
    "adamw_many_f32",
    "adamw_many_dev_f32",
    "clip_scalars_f32",
    "sumsq_many_partial_f32",
    "sumsq_many_final",
];

/// Largest head dimension the attention kernels take.
pub const MAX_HEAD_DIM: usize = 128;
/// Rows (queries or keys) per block of the exact f32 attention kernels.
const ATT_ROWS: usize = 32;
/// Shape of a tensor-core attention kernel's blocks: `warps` warps, each owning `tiles` row tiles
/// of 16 rows (queries in the forward and dq pass, keys in the dk/dv pass), multiplying with
/// mma.sync per warp or, with `wgmma`, with Hopper warpgroup MMAs (groups of 4 warps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlashShape {
    warps: usize,
    tiles: usize,
    wgmma: bool,
    /// The warp-specialised TMA forward (`attn_fwd_bf16_d64_w12_tma*`; hd 64).
    tma: bool,
    /// With FlashAttention-3's overlap of the next scores and the previous P·V (`..._tmap`).
    pipe: bool,
    /// The consumer warpgroups' products in turns (ping-pong; instantiated with `pipe`: `..._tmapp`).
    pingpong: bool,
}

impl FlashShape {
    const fn mma(warps: usize, tiles: usize) -> Self {
        FlashShape { warps, tiles, wgmma: false, tma: false, pipe: false, pingpong: false }
    }

    const fn wg(warps: usize) -> Self {
        FlashShape { warps, tiles: 1, wgmma: true, tma: false, pipe: false, pingpong: false }
    }

    /// A producer warpgroup and two consumer warpgroups of 64 rows (`pipe`, `pingpong`: see the fields).
    const fn tma(pipe: bool, pingpong: bool) -> Self {
        FlashShape { warps: 12, tiles: 1, wgmma: true, tma: true, pipe, pingpong }
    }

    /// The TMA forward's kernel suffix (`INST_FA_FWD_TMA`), which `MOR_FLASH_WARPS` also takes.
    fn tma_name(self) -> &'static str {
        match (self.pipe, self.pingpong) {
            (false, false) => "tma",
            (true, false) => "tmap",
            (false, true) => "tmas", // not instantiated (no faster than `tma`)
            (true, true) => "tmapp",
        }
    }

    fn rows(self) -> usize {
        if self.tma {
            128
        } else {
            16 * self.warps * self.tiles
        }
    }
}

/// K/V buffers of the TMA forward's ring (`TMA_STAGES` in kernels/flash_attention.cu; experiments may
/// set fewer with `MOR_NVRTC_DEFINES=TMA_STAGES=n`). Four: the overlapped kernels hold two stages at a
/// time (this tile's K for S, the previous tile's V for P·V), so two left the producer no room ahead
/// (H200: 0.451 ms at 2 stages, 0.330 at 4, 360M shape).
const TMA_STAGES: usize = 4;
/// Q / dout stages of the TMA backward's ring (`TMA_BWD_STAGES` in kernels/flash_attention.cu).
const TMA_BWD_STAGES: usize = 2;

/// The instantiated shapes (`INST_FA_FWD` / `INST_FA_BWD` in kernels/flash_attention.cu); the
/// backward kernels hold too many fragments for two row tiles per warp.
const FLASH_SHAPES: [(&str, FlashShape); 19] = [
    ("fwd", FlashShape::mma(4, 1)),
    ("fwd", FlashShape::mma(8, 1)),
    ("fwd", FlashShape::mma(4, 2)),
    ("fwd", FlashShape::wg(4)),
    ("fwd", FlashShape::wg(8)),
    ("fwd", FlashShape::tma(false, false)),
    ("fwd", FlashShape::tma(true, false)),
    ("fwd", FlashShape::tma(true, true)),
    ("dq", FlashShape::mma(4, 1)),
    ("dq", FlashShape::mma(8, 1)),
    ("dq", FlashShape::wg(4)),
    ("dq", FlashShape::wg(8)),
    ("dkdv", FlashShape::mma(4, 1)),
    ("dkdv", FlashShape::mma(8, 1)),
    ("dkdv", FlashShape::wg(4)),
    ("dkdv", FlashShape::wg(8)),
    ("fused", FlashShape::mma(4, 1)),
    ("fused", FlashShape::mma(8, 1)),
    ("fused", FlashShape::tma(false, false)),
];

/// Block shape per tensor-core attention kernel: the defaults come from tuning on an H200
/// (docs/benchmarks/); `MOR_FLASH_WARPS=fwd,dq,dkdv` overrides them for experiments, each entry
/// `W` (W warps of one row tile), `WxT` (T row tiles per warp), `Wg` (wgmma) or, for the forward,
/// `tma` / `tmap` / `tmapp` (the TMA kernels), e.g. `4x2,4,8g`; dq `fused` selects the fused
/// backward with the dk/dv shape, `tma` for the TMA backward (`tmapp,fused,tma`, the default).
#[derive(Debug, Clone, Copy)]
struct FlashConfig {
    fwd: FlashShape,
    /// The dq pass of the two-pass backward.
    dq: FlashShape,
    dkdv: FlashShape,
    /// The fused backward: dq by float atomics inside the dk/dv kernel (5 products instead of 7;
    /// dq's summation order then depends on scheduling), unless the backend is deterministic.
    fused: bool,
}

impl FlashConfig {
    const DEFAULT: FlashConfig =
        FlashConfig { fwd: FlashShape::tma(true, true), dq: FlashShape::mma(4, 1), dkdv: FlashShape::tma(false, false), fused: true };
    /// The forward where the TMA kernel does not apply (head dims other than 64, calls without keys).
    const MMA_FWD: FlashShape = FlashShape::mma(8, 1);
    /// The backward kernels where the TMA backward does not apply (head dims other than 64, the
    /// deterministic two passes).
    const MMA_BWD: FlashShape = FlashShape::mma(4, 1);

    /// The defaults unless `MOR_FLASH_WARPS` names the shapes.
    fn from_env() -> Self {
        let Ok(v) = std::env::var("MOR_FLASH_WARPS") else { return Self::DEFAULT };
        let parse = |x: &str| -> Option<FlashShape> {
            let x = x.trim();
            if let Some(s) = FLASH_SHAPES.iter().map(|(_, s)| *s).find(|s| s.tma && s.tma_name() == x) {
                return Some(s);
            }
            if let Some(w) = x.strip_suffix('g') {
                return Some(FlashShape::wg(w.parse().ok()?));
            }
            let (w, t) = x.split_once('x').unwrap_or((x, "1"));
            Some(FlashShape::mma(w.parse().ok()?, t.parse().ok()?))
        };
        let ok = |kind: &str, s: &str| parse(s).filter(|s| FLASH_SHAPES.contains(&(kind, *s)));
        let bad = || panic!("MOR_FLASH_WARPS={v}: not an instantiated shape; available: {FLASH_SHAPES:?}");
        match v.split(',').collect::<Vec<_>>()[..] {
            [f, q, kv] if q.trim() == "fused" => match (ok("fwd", f), ok("fused", kv)) {
                (Some(fwd), Some(dkdv)) => FlashConfig { fwd, dkdv, ..Self::DEFAULT },
                _ => bad(),
            },
            [f, q, kv] => match (ok("fwd", f), ok("dq", q), ok("dkdv", kv)) {
                (Some(fwd), Some(dq), Some(dkdv)) => FlashConfig { fwd, dq, dkdv, fused: false },
                _ => bad(),
            },
            _ => panic!("MOR_FLASH_WARPS={v}: expected three shapes (fwd,dq,dkdv), e.g. 4x2,4,4 or 8,fused,4"),
        }
    }
}

/// Rows per streamed tile of the tensor-core attention kernels (FA_BN).
const FLASH_TILE: usize = 64;
/// Kernels and head dims of the tensor-core attention (kernels/flash_attention.cu).
const FLASH_HEAD_DIMS: [usize; 2] = [32, 64];
/// Blocks of the first `sum_squares` pass (at most; fixed for a given n).
const SUMSQ_MAX_BLOCKS: usize = 1024;

/// Blocks of the first `sum_squares` pass over n elements (a function of n only, so the sum's
/// order is): at least 16 elements per thread — four float4 loads (kernels/elementwise.cu).
fn sumsq_blocks(n: usize) -> usize {
    n.div_ceil(EW_THREADS as usize * 16).clamp(1, SUMSQ_MAX_BLOCKS)
}
/// Threads per block of elementwise kernels.
const EW_THREADS: u32 = 256;
/// 16-byte vectors per thread and iteration of the vectorized elementwise kernels (`EW_UNROLL` in
/// kernels/elementwise.cu).
const EW_UNROLL: usize = 2;
/// Warps (rows at a time) per block of the warp-per-row RMSNorm forward.
const RMS_FWD_WARPS: usize = 8;
/// Warps per block of the warp-per-row RMSNorm backward (`RMS_BWD_WARPS` in kernels/rows.cu).
const RMS_BWD_WARPS: usize = 4;
/// Blocks (weight-gradient partials) of the RMSNorm backward, at most: rows per block follow from
/// n alone, so the order of the dw sums does too. (1024, 2048 and 4096 measured no faster on the
/// H200 at 16384 x 960.)
const RMS_BWD_PARTS: usize = 512;
/// Pairs of a head the RoPE kernels take, at most (`ROPE_MAX_PAIRS` in kernels/common.cuh).
const ROPE_MAX_PAIRS: usize = 128;
/// Rows per block and vector pairs per thread of the vector RoPE kernel (kernels/rows.cu).
const ROPE_ROWS: usize = 8;
const ROPE_ITEMS: usize = 4;
/// Dynamic shared memory the top-k kernel may use (opt-in above 48 KiB).
const TOPK_SMEM_BYTES: usize = 128 * 1024;

/// Errors of setting up the backend (op calls panic instead: the interface has no error path).
#[derive(Debug)]
pub enum CudaError {
    Driver(String),
    Nvrtc(String),
    Blas(String),
    /// Reading or writing the GEMM algorithm table ([`Cuda::load_gemm_algos`]).
    Gemm(String),
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::Driver(s) => write!(f, "CUDA driver: {s}"),
            CudaError::Nvrtc(s) => write!(f, "NVRTC: {s}"),
            CudaError::Blas(s) => write!(f, "cuBLAS: {s}"),
            CudaError::Gemm(s) => write!(f, "GEMM algorithm table {s}"),
        }
    }
}

impl std::error::Error for CudaError {}

fn drv<E: fmt::Debug>(e: E) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// NVRTC options: `sm_90a` (Hopper with its arch-specific wgmma), C++17, `CUDA_INCLUDE_DIR` as an
/// include path when set. `MOR_NVRTC_DEFINES="A=1 B"` adds `-D` macros (kernel experiments).
fn compile_options() -> CompileOptions {
    let mut options = vec!["--std=c++17".to_string()];
    if let Ok(defs) = std::env::var("MOR_NVRTC_DEFINES") {
        options.extend(defs.split_whitespace().map(|d| format!("-D{d}")));
    }
    let mut opts = CompileOptions {
        arch: Some("sm_90a"),
        options,
        name: Some("mor_kernels.cu".into()),
        ..Default::default()
    };
    if let Ok(dir) = std::env::var("CUDA_INCLUDE_DIR") {
        if !dir.is_empty() {
            opts.include_paths.push(dir);
        }
    }
    opts
}

/// Compile [`KERNEL_SOURCE`] with NVRTC (needs only libnvrtc, no GPU). On failure the error holds
/// the NVRTC log, which is also printed to stderr.
pub fn compile_kernels() -> Result<Ptx, CudaError> {
    cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, compile_options()).map_err(|e| {
        let msg = match e {
            CompileError::CompileError { nvrtc, options, log } => {
                format!("{nvrtc:?} with options {options:?}; log:\n{}", log.to_string_lossy())
            }
            other => format!("{other:?}"),
        };
        eprintln!("mor-engine: NVRTC compilation of the CUDA kernels failed: {msg}");
        CudaError::Nvrtc(msg)
    })
}

/// First line of a cached PTX file: identifies the kernel source and compile options it came from.
fn ptx_tag() -> String {
    // FNV-1a 64 over the source and the options that change the PTX (not the include path).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let opts = compile_options();
    let key = format!("{KERNEL_SOURCE}\n{:?} {:?}", opts.arch, opts.options);
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("// mor-kernels {h:016x}\n")
}

/// Compile the kernels into the `MOR_PTX_CACHE` file unless it already holds them (needs only
/// libnvrtc, no GPU); true when the file was already up to date.
pub fn ensure_ptx_cache() -> Result<bool, CudaError> {
    kernels_ptx().map(|(_, cached)| cached)
}

/// The kernels' PTX, once per process, and whether it came from the cache file. With
/// `MOR_PTX_CACHE=path` a PTX file compiled from the same source is loaded instead of compiling
/// (NVRTC takes tens of seconds for these kernels); a missing or stale file is (re)written after
/// compiling. Without the variable every process compiles.
fn kernels_ptx() -> Result<(Ptx, bool), CudaError> {
    static PTX: OnceLock<Result<(Ptx, bool), String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let cache = std::env::var("MOR_PTX_CACHE").ok().filter(|p| !p.is_empty());
        let tag = ptx_tag();
        if let Some(path) = &cache {
            if let Ok(text) = std::fs::read_to_string(path) {
                if text.starts_with(&tag) {
                    return Ok((Ptx::from_src(text), true));
                }
            }
        }
        let ptx = compile_kernels().map_err(|e| e.to_string())?;
        if let Some(path) = &cache {
            let tmp = format!("{path}.tmp{}", std::process::id());
            if std::fs::write(&tmp, format!("{tag}{}", ptx.to_src())).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
        Ok((ptx, false))
    })
    .clone()
    .map_err(CudaError::Nvrtc)
}

/// Scratch buffers kept across calls (grown on demand; a replaced buffer is freed in stream order).
#[derive(Clone, Copy)]
enum Slot {
    SumsqPartial,
    SumsqOut,
    GroupCounts,
    GroupFill,
    GroupTmp,
    GroupOrder,
    RmsPartial,
    AttQOff,
    AttKOff,
    AttDelta,
    /// Per-tile position ranges of the streamed side (flash attention).
    AttRange,
    /// The blocks of a TMA flash pass in rank-major order (`attn_rank_order`).
    AttOrder,
    /// bf16 copies of f32 q, k, v, dout (flash attention), or f32 copies of bf16 ones (exact
    /// kernels).
    AttQ16,
    AttK16,
    AttV16,
    AttG16,
    /// Attention output copy (bf16 for the flash backward, f32 for the exact kernels), and f32
    /// views of bf16 gradients for the exact kernels.
    AttO,
    AttDq,
    AttDk,
    AttDv,
    /// f32 dq workspace of the fused attention backward (float atomics).
    AttDqAcc,
    Topk,
    /// bf16 copies of f32 GEMM operands (bf16 GEMM path); BfC also holds the packed output
    /// gradients of a fused backward.
    BfB,
    BfC,
    /// Stacked weight gradients of a fused backward (see [`fuse_gemm`]).
    FusedOut,
}
const NUM_SLOTS: usize = 25;

/// Element type of a [`CudaBuf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    /// bfloat16 (round to nearest even on every store): activations of the bf16 mode.
    Bf16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
}

/// A float buffer on the device: f32, or bf16 for the activations of the bf16 mode
/// ([`Backend::zeros_act`]). Ops read and write either where they have kernels for it; see the
/// module documentation.
pub struct CudaBuf {
    mem: CudaSlice<u8>,
    len: usize,
    dtype: Dtype,
    /// Unique per buffer in the process (`next_stamp` at allocation).
    id: u64,
    /// A fresh `next_stamp` at every mutable access: unique per content, so a cached copy (see
    /// below and [`Cuda::weights_bf16_concat`]) knows when it went stale.
    version: u64,
    /// bf16 copy of this (f32) buffer as a GEMM weight operand in bf16 mode, made from
    /// `version` in capture epoch `.1` ([`Cuda::epoch`]): weights change once per optimizer step
    /// but feed many GEMMs.
    bf16_copy: Mutex<Option<(u64, u64, CudaSlice<u8>)>>,
}

impl CudaBuf {
    /// Elements (not bytes).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn is_bf16(&self) -> bool {
        self.dtype == Dtype::Bf16
    }
}

/// A process-wide counter for [`CudaBuf`] ids and versions.
fn next_stamp() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Device memory an op reads or writes through a raw pointer.
trait DevMem {
    fn ptr(&self, s: &Arc<CudaStream>) -> u64;
    fn ptr_mut(&mut self, s: &Arc<CudaStream>) -> u64;
}

impl<T> DevMem for CudaSlice<T> {
    fn ptr(&self, s: &Arc<CudaStream>) -> u64 {
        self.device_ptr(s).0
    }
    fn ptr_mut(&mut self, s: &Arc<CudaStream>) -> u64 {
        self.device_ptr_mut(s).0
    }
}

impl DevMem for CudaBuf {
    fn ptr(&self, s: &Arc<CudaStream>) -> u64 {
        self.mem.device_ptr(s).0
    }
    fn ptr_mut(&mut self, s: &Arc<CudaStream>) -> u64 {
        self.version = next_stamp();
        self.mem.device_ptr_mut(s).0
    }
}

/// The fused attention backward's dq through the inverse rotary embedding (base `theta`), into
/// `packed` = (bf16 pointer, row stride in elements) when not into the dq buffer itself.
#[derive(Clone, Copy)]
struct DqRope {
    theta: f32,
    packed: Option<(u64, usize)>,
}

/// A captured stretch of the stream ([`Backend::capture_end`]), the backend's resource
/// generation it recorded pointers of, and its capture epoch.
struct CudaStepGraph {
    graph: cudarc::driver::CudaGraph,
    resources: Arc<AtomicU64>,
    recorded: u64,
    epoch: Arc<AtomicU64>,
}

impl StepGraph for CudaStepGraph {
    fn launch(&self) -> Result<(), String> {
        if self.resources.load(Ordering::Relaxed) != self.recorded {
            return Err("the backend reallocated scratch or weight buffers the graph uses since its capture".into());
        }
        self.graph.launch().map_err(|e| format!("CUDA graph launch failed: {e:?}"))?;
        // A replay may change weights (an optimizer step) without the host seeing a write: bf16
        // copies made before it are stale.
        self.epoch.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Input precision of the GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPrecision {
    /// cuBLAS SGEMM, fp32 in and out (no TF32): the parity reference.
    F32,
    /// Operands rounded to bf16 on the fly (round to nearest even), tensor-core GEMM with fp32
    /// accumulation and fp32 or bf16 output (cuBLASLt, `CUBLAS_COMPUTE_32F`; algorithm per
    /// [`GemmSelect`]). Parameters, gradients and optimizer state stay fp32 (fp32 master weights).
    Bf16,
}

/// Run-time options of the backend.
#[derive(Debug, Clone, Copy)]
pub struct CudaOptions {
    pub gemm: GemmPrecision,
    /// How bf16 GEMMs pick their cuBLASLt algorithm: timed per shape (default) or the
    /// heuristic's first; see [`GemmSelect`].
    pub gemm_select: GemmSelect,
    /// Time every op on the GPU with CUDA events ([`Backend::take_profile`]); bf16 GEMMs are also
    /// timed by shape. Adds two event records per op; for breakdowns only.
    pub profile: bool,
    /// Bit-reproducible results: the attention backward in two passes (dq and dk/dv, every
    /// gradient row with one owner) instead of the fused kernel whose dq sums by float atomics,
    /// and GEMM algorithms from the heuristic (timed choices can differ between processes).
    pub deterministic: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { gemm: GemmPrecision::F32, gemm_select: GemmSelect::default(), profile: false, deterministic: false }
    }
}

impl CudaOptions {
    /// Defaults overridden by the environment: `MOR_GEMM=bf16|f32`,
    /// `MOR_GEMM_SELECT=tuned|heuristic`, `MOR_PROFILE=1`,
    /// `MOR_DETERMINISTIC=1`.
    pub fn from_env() -> Self {
        let mut o = CudaOptions::default();
        if let Ok(v) = std::env::var("MOR_GEMM") {
            if v.eq_ignore_ascii_case("bf16") {
                o.gemm = GemmPrecision::Bf16;
            }
        }
        if let Ok(v) = std::env::var("MOR_GEMM_SELECT") {
            match GemmSelect::parse(&v) {
                Some(g) => o.gemm_select = g,
                None => eprintln!("mor-engine: warning: MOR_GEMM_SELECT={v} is neither `tuned` nor `heuristic`; using {:?}", o.gemm_select),
            }
        }
        let flag = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0");
        o.profile = flag("MOR_PROFILE");
        o.deterministic = flag("MOR_DETERMINISTIC");
        o
    }
}

/// Times one op on the GPU when profiling: CUDA events recorded before and after its launches,
/// read when the profile is taken ([`Backend::take_profile`]), so the stream is not synchronised
/// per op and the times are the GPU's, without launch gaps. Nested ops are not counted twice;
/// detail entries ([`Cuda::prof_detail`]) are counted besides their op.
struct ProfGuard<'a> {
    cuda: &'a Cuda,
    name: Cow<'static, str>,
    start: Option<CudaEvent>,
    outermost: bool,
}

impl Drop for ProfGuard<'_> {
    fn drop(&mut self) {
        let end = self.cuda.prof_event();
        let start = self.start.take().expect("profiled op started");
        if self.outermost {
            self.cuda.prof_depth.fetch_sub(1, Ordering::SeqCst);
        }
        let mut pending = self.cuda.prof_pending.lock().unwrap();
        pending.push((std::mem::take(&mut self.name), start, end));
        let full = pending.len() >= PROF_PENDING_MAX;
        drop(pending);
        // Bound the events in flight (one synchronisation per many thousand ops).
        if full {
            self.cuda.prof_resolve();
        }
    }
}

/// Timed ops kept unresolved before the profiler synchronises and reads their events.
const PROF_PENDING_MAX: usize = 16384;

/// A copy into a page-locked buffer in flight ([`Cuda::read_words_async`]). Dropped — read or
/// not — it waits for the copy before the buffer goes back to the pool, so no later read can
/// reuse (or a free release) memory the copy still writes.
struct PinnedRead {
    buf: Option<PinnedHostSlice<u32>>,
    copied: CudaEvent,
    pool: Arc<Mutex<Vec<PinnedHostSlice<u32>>>>,
}

impl Drop for PinnedRead {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            // (After a failed wait, or with the pool's lock poisoned, the buffer is freed instead.)
            if self.copied.synchronize().is_ok() {
                if let Ok(mut pool) = self.pool.lock() {
                    pool.push(buf);
                }
            }
        }
    }
}

/// RoPE frequencies `theta^(-2j/head_dim)` of the pairs j, computed in f64 as the CPU reference
/// computes them, passed to the RoPE kernels by value (`RopeFreqs` in kernels/common.cuh).
#[repr(C)]
struct RopeFreqs([f64; ROPE_MAX_PAIRS]);

// SAFETY: a plain array of doubles, the layout of the kernels' parameter.
unsafe impl cudarc::driver::DeviceRepr for RopeFreqs {}

impl RopeFreqs {
    fn new(head_dim: usize, theta: f32) -> Self {
        assert!(head_dim.is_multiple_of(2) && head_dim <= 2 * ROPE_MAX_PAIRS, "rope: head_dim must be even and at most {}", 2 * ROPE_MAX_PAIRS);
        let mut f = [0.0; ROPE_MAX_PAIRS];
        for (j, x) in f.iter_mut().take(head_dim / 2).enumerate() {
            *x = (theta as f64).powf(-((2 * j) as f64) / head_dim as f64);
        }
        RopeFreqs(f)
    }
}

/// A TMA tensor map (`CUtensorMap`, 128 opaque bytes) passed to a kernel by value
/// (`const __grid_constant__ TmaMap` in kernels/flash_attention.cu).
#[repr(transparent)]
struct TmaMap(drv_sys::CUtensorMap);

// SAFETY: a plain 128-byte value the kernel receives as its parameter of the same layout.
unsafe impl cudarc::driver::DeviceRepr for TmaMap {}

impl TmaMap {
    /// A 2-d map over a row-major bf16 matrix `[rows][cols]` at device address `ptr` (16-byte
    /// aligned, `cols` a multiple of 64), read in boxes of 64 rows x 64 columns with 128-byte
    /// swizzle (a box row is 128 bytes); rows past the end read as zero.
    fn bf16_tiles(ptr: u64, rows: usize, cols: usize) -> Self {
        Self::tiles(ptr, rows, cols, 2, 64, drv_sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16)
    }

    /// As [`TmaMap::bf16_tiles`] over an f32 matrix, in boxes of 64 rows x 32 columns (128-byte
    /// rows, swizzled): the TMA backward's dq reductions (`cp.reduce.async.bulk.tensor`).
    fn f32_tiles(ptr: u64, rows: usize, cols: usize) -> Self {
        Self::tiles(ptr, rows, cols, 4, 64, drv_sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32)
    }

    /// Boxes of `box_rows` rows x 128 bytes of `elem_bytes` elements, 128-byte swizzle.
    fn tiles(ptr: u64, rows: usize, cols: usize, elem_bytes: usize, box_rows: u32, dtype: drv_sys::CUtensorMapDataType) -> Self {
        use drv_sys::*;
        let box_cols = 128 / elem_bytes;
        assert!(ptr.is_multiple_of(16) && cols.is_multiple_of(box_cols) && rows > 0, "TmaMap: pointer {ptr:#x}, {rows} x {cols}");
        let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
        let dims: [cuuint64_t; 2] = [cols as cuuint64_t, rows as cuuint64_t];
        let strides: [cuuint64_t; 1] = [(cols * elem_bytes) as cuuint64_t];
        let boxes: [cuuint32_t; 2] = [box_cols as cuuint32_t, box_rows];
        let elem: [cuuint32_t; 2] = [1, 1];
        // SAFETY: every pointer refers to a live local array of the rank the call is told.
        let r = unsafe {
            cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                dtype,
                2,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        assert!(r == CUresult::CUDA_SUCCESS, "cuTensorMapEncodeTiled failed: {r:?}");
        // SAFETY: initialised by the successful call.
        TmaMap(unsafe { map.assume_init() })
    }
}

/// The CUDA backend. See the module documentation.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    /// cuBLASLt: every bf16 GEMM (cuda/gemm.rs), one plan per shape.
    blas_lt: CudaBlasLT,
    lt_workspace: CudaSlice<u8>,
    lt_plans: Mutex<HashMap<GemmShape, gemm::LtPlan>>,
    gemm_select: GemmSelect,
    /// The algorithms chosen in `tuned` mode by shape, and the file they are kept in.
    gemm_table: Mutex<gemm::AlgoTable>,
    /// The tensor-core attention kernels, by name (see [`FLASH_SHAPES`]).
    flash_funcs: HashMap<String, CudaFunction>,
    /// Concatenated bf16 copies of weight sets that share a GEMM input ([`Cuda::weights_bf16_concat`]),
    /// by the weights' ids, with the versions they were made from.
    concat_weights: Mutex<HashMap<Vec<u64>, (Vec<u64>, u64, CudaSlice<u8>)>>,
    scratch: Mutex<Vec<Option<CudaSlice<u8>>>>,
    /// Tables of the multi-tensor kernels (cuda/optim.rs).
    mt_tables: optim::MtTables,
    /// Keys the top-k kernel may sort in shared memory (a power of two).
    topk_smem_keys: usize,
    sm_count: u32,
    /// bf16 GEMM operands (switchable at run time, see [`Backend::set_matmul_precision`]).
    gemm_bf16: AtomicBool,
    flash: FlashConfig,
    /// See [`CudaOptions::deterministic`] and [`Cuda::set_deterministic`].
    deterministic: AtomicBool,
    profiling: AtomicBool,
    prof_depth: AtomicUsize,
    /// Seconds and calls per op, from resolved events.
    prof: Mutex<HashMap<Cow<'static, str>, (f64, u64)>>,
    /// Ops timed but not read yet: (name, start event, end event).
    prof_pending: Mutex<Vec<(Cow<'static, str>, CudaEvent, CudaEvent)>>,
    /// Timing events for reuse.
    prof_events: Mutex<Vec<CudaEvent>>,
    /// Page-locked host buffers of the asynchronous reads ([`Cuda::read_words_async`]), reused:
    /// allocating page-locked memory is slow and freeing it synchronises.
    pinned: Arc<Mutex<Vec<PinnedHostSlice<u32>>>>,
    /// A graph capture is in progress ([`Backend::capture_begin`]): what would allocate,
    /// transfer or wait panics instead (the recording would be wrong or fail).
    capturing: AtomicBool,
    /// Bumped when a capture begins and ends: cached bf16 weight copies record the epoch they
    /// were made in, so a capture records every conversion it needs once (its replays convert the
    /// weights the optimizer changed), and eager work after it converts afresh.
    epoch: Arc<AtomicU64>,
    /// Bumped when scratch or a concatenated weight is reallocated: a graph recorded the old
    /// pointers and refuses to launch after it.
    resources: Arc<AtomicU64>,
}

impl fmt::Debug for Cuda {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cuda(device {})", self.ctx.ordinal())
    }
}

macro_rules! launch {
    ($s:expr, $name:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let name: &str = $name;
        let f = $s.func(name);
        let mut b = $s.stream.launch_builder(f);
        $( let a = $arg; b.arg(&a); )*
        // SAFETY: argument lists match the kernel signatures in kernels/*.cu; buffer extents are
        // checked by the callers.
        unsafe { b.launch($cfg) }.unwrap_or_else(|e| panic!("CUDA launch of {name} failed: {e:?}"));
    }};
}

mod gemm;
mod optim;

pub use gemm::{GemmAdd, GemmChoice, GemmSelect, GemmShape, GemmSource, TUNE_CANDIDATES};
use gemm::LT_WORKSPACE;

fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem }
}

/// Threads per block for one-block-per-row kernels over rows of `d`.
fn row_threads(d: usize, max: usize) -> u32 {
    (d.div_ceil(4)).next_power_of_two().clamp(32, max) as u32
}

fn rows_grid(rows: usize) -> u32 {
    rows.clamp(1, 1 << 30) as u32
}

fn check_len(what: &str, have: usize, need: usize) {
    assert!(have >= need, "cuda: {what} has {have} elements, the op needs {need}");
}

impl Cuda {
    /// Open device `ordinal` with [`CudaOptions::from_env`] (fp32 GEMMs, no profiling unless
    /// `MOR_GEMM` / `MOR_PROFILE` say otherwise).
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        Self::with_options(ordinal, CudaOptions::from_env())
    }

    /// Open device `ordinal`, compile (once per process) and load the kernels, create the cuBLAS
    /// handle.
    pub fn with_options(ordinal: usize, opts: CudaOptions) -> Result<Self, CudaError> {
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        // One stream: no cross-stream event tracking needed. An own (non-blocking) stream, not the
        // legacy null stream, which stream capture refuses (docs/design/cuda-graphs.md, A1).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv)?;
        let (ptx, cached) = kernels_ptx()?;
        let module = match ctx.load_module(ptx) {
            Ok(m) => m,
            // A cached PTX the driver rejects (another NVRTC wrote it): compile afresh.
            Err(_) if cached => ctx.load_module(compile_kernels()?).map_err(drv)?,
            Err(e) => return Err(drv(e)),
        };
        let mut funcs = HashMap::new();
        let mut flash_funcs = HashMap::new();
        for &name in KERNELS {
            let f = module.load_function(name).map_err(|e| CudaError::Driver(format!("loading kernel {name}: {e:?}")))?;
            funcs.insert(name, f);
        }
        // Top-k sorts in up to TOPK_SMEM_BYTES of dynamic shared memory when the device allows it.
        let optin = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .unwrap_or(48 * 1024) as usize;
        let topk_bytes = TOPK_SMEM_BYTES.min(optin.max(48 * 1024));
        let topk_ok = funcs["topk_segments_f32"]
            .set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                topk_bytes as i32,
            )
            .is_ok();
        let topk_bytes = if topk_ok { topk_bytes } else { 48 * 1024 };
        // The flash attention kernels use more than the default 48 KiB of dynamic shared memory.
        for hd in FLASH_HEAD_DIMS {
            for (kind, shape) in FLASH_SHAPES.into_iter().filter(|(_, s)| !s.tma || hd == 64) {
                let name = Self::flash_kernel_name(kind, hd, shape);
                let f = module.load_function(&name).map_err(|e| CudaError::Driver(format!("loading kernel {name}: {e:?}")))?;
                f.set_attribute(
                    drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    Self::flash_smem(kind, hd, shape) as i32,
                )
                .map_err(|e| CudaError::Driver(format!("shared memory opt-in of {name}: {e:?}")))?;
                flash_funcs.insert(name, f);
            }
        }
        let topk_smem_keys = 1usize << (usize::BITS - 1 - (topk_bytes / 8).leading_zeros());
        let sm_count = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(132) as u32;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas(format!("{e:?}")))?;
        let blas_lt = CudaBlasLT::new(stream.clone()).map_err(|e| CudaError::Blas(format!("cublasLt: {e:?}")))?;
        let lt_workspace = unsafe { stream.alloc::<u8>(LT_WORKSPACE) }.map_err(drv)?;
        unsafe { blas_sys::cublasSetMathMode(*blas.handle(), blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH) }
            .result()
            .map_err(|e| CudaError::Blas(format!("cublasSetMathMode: {e:?}")))?;
        let cuda = Cuda {
            ctx,
            stream,
            blas,
            funcs,
            blas_lt,
            lt_workspace,
            lt_plans: Mutex::new(HashMap::new()),
            gemm_select: if opts.deterministic { GemmSelect::Heuristic } else { opts.gemm_select },
            gemm_table: Mutex::new(Default::default()),
            flash_funcs,
            concat_weights: Mutex::new(HashMap::new()),
            scratch: Mutex::new((0..NUM_SLOTS).map(|_| None).collect()),
            mt_tables: Default::default(),
            topk_smem_keys,
            sm_count,
            gemm_bf16: AtomicBool::new(opts.gemm == GemmPrecision::Bf16),
            flash: FlashConfig::from_env(),
            deterministic: AtomicBool::new(opts.deterministic),
            profiling: AtomicBool::new(opts.profile),
            prof_depth: AtomicUsize::new(0),
            prof: Mutex::new(HashMap::new()),
            prof_pending: Mutex::new(Vec::new()),
            prof_events: Mutex::new(Vec::new()),
            pinned: Arc::new(Mutex::new(Vec::new())),
            capturing: AtomicBool::new(false),
            epoch: Arc::new(AtomicU64::new(0)),
            resources: Arc::new(AtomicU64::new(0)),
        };
        cuda.gemm_algos_from_env();
        Ok(cuda)
    }

    /// The options in force now.
    pub fn options(&self) -> CudaOptions {
        CudaOptions {
            gemm: if self.bf16() { GemmPrecision::Bf16 } else { GemmPrecision::F32 },
            gemm_select: self.gemm_select,
            profile: self.profiling.load(Ordering::Relaxed),
            deterministic: self.deterministic.load(Ordering::Relaxed),
        }
    }

    /// Switch the attention backward's bit-reproducible mode ([`CudaOptions::deterministic`]) for
    /// the ops that follow (the GEMM algorithm selection is fixed when the backend starts).
    pub fn set_deterministic(&self, on: bool) {
        self.deterministic.store(on, Ordering::Relaxed);
    }

    fn bf16(&self) -> bool {
        self.gemm_bf16.load(Ordering::Relaxed)
    }

    /// Whether a GEMM takes the bf16 path: bf16 mode, or a bf16 operand (a buffer made in bf16
    /// mode and used after switching to fp32).
    fn bf16_gemm(&self, bufs: &[&CudaBuf]) -> bool {
        self.bf16() || bufs.iter().any(|b| b.is_bf16())
    }

    /// `(free, total)` device memory in bytes (`cuMemGetInfo`).
    pub fn mem_get_info(&self) -> (usize, usize) {
        self.ctx.mem_get_info().unwrap_or((0, 0))
    }

    /// Start timing op `name` (profiling only; the outermost op of a nest is the one counted).
    fn prof(&self, name: &'static str) -> Option<ProfGuard<'_>> {
        if !self.profiling.load(Ordering::Relaxed) {
            return None;
        }
        if self.prof_depth.fetch_add(1, Ordering::SeqCst) > 0 {
            self.prof_depth.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(ProfGuard { cuda: self, name: Cow::Borrowed(name), start: Some(self.prof_event()), outermost: true })
    }

    /// Start timing a detail of the op being timed (a GEMM by shape), reported under
    /// `detail: <name>` besides the op (profiling only).
    fn prof_detail(&self, name: impl FnOnce() -> String) -> Option<ProfGuard<'_>> {
        if !self.profiling.load(Ordering::Relaxed) {
            return None;
        }
        Some(ProfGuard { cuda: self, name: Cow::Owned(format!("detail: {}", name())), start: Some(self.prof_event()), outermost: false })
    }

    /// A timing event recorded on the stream now.
    fn prof_event(&self) -> CudaEvent {
        let pooled = self.prof_events.lock().unwrap().pop();
        let ev = match pooled {
            Some(ev) => ev,
            None => self.ctx.new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT)).expect("cuda: event creation failed"),
        };
        ev.record(&self.stream).expect("cuda: event record failed");
        ev
    }

    /// Wait for the timed ops and add their GPU times to the profile.
    fn prof_resolve(&self) {
        let pending = std::mem::take(&mut *self.prof_pending.lock().unwrap());
        if pending.is_empty() {
            return;
        }
        self.synchronize();
        let mut prof = self.prof.lock().unwrap();
        let mut pool = self.prof_events.lock().unwrap();
        for (name, start, end) in pending {
            let ms = start.elapsed_ms(&end).expect("cuda: event elapsed time failed");
            let e = prof.entry(name).or_insert((0.0, 0));
            e.0 += ms as f64 * 1e-3;
            e.1 += 1;
            pool.push(start);
            pool.push(end);
        }
    }

    /// A zeroed buffer of `n` elements.
    fn alloc(&self, n: usize, dtype: Dtype) -> CudaBuf {
        self.not_capturing("allocating a buffer");
        let mem = if n == 0 {
            self.stream.null().expect("cuda: alloc failed")
        } else {
            self.stream
                .alloc_zeros(n * dtype.size())
                .unwrap_or_else(|e| panic!("cuda: alloc of {n} {dtype:?} values failed: {e:?}"))
        };
        let id = next_stamp();
        CudaBuf { mem, len: n, dtype, id, version: id, bf16_copy: Mutex::new(None) }
    }

    /// Element type of activation buffers ([`Backend::zeros_act`]) in the current mode.
    fn act_dtype(&self) -> Dtype {
        if self.bf16() {
            Dtype::Bf16
        } else {
            Dtype::F32
        }
    }

    /// Ops without a bf16 kernel take f32 buffers only; the model gives them f32 ones.
    fn f32_only(op: &str, bufs: &[(&str, &CudaBuf)]) {
        for (name, b) in bufs {
            assert!(!b.is_bf16(), "cuda: {op} takes f32 buffers only, `{name}` is bf16");
        }
    }

    /// Kernel name `<base>_f32` or `<base>_bf16` for buffers of one element type.
    fn typed(op: &str, bufs: &[(&str, &CudaBuf)]) -> String {
        let dt = bufs[0].1.dtype;
        for (name, b) in bufs {
            assert!(b.dtype == dt, "cuda: {op} needs one element type, `{}` is {dt:?} but `{name}` is {:?}", bufs[0].0, b.dtype);
        }
        format!("{op}_{}", if dt == Dtype::Bf16 { "bf16" } else { "f32" })
    }

    /// bf16 copy of the first `n` values of `src` in scratch `slot`; returns its device pointer.
    fn to_bf16(&self, slot: Slot, src: u64, n: usize) -> u64 {
        let dst = self.scratch(slot, n * 2);
        launch!(self, "f32_to_bf16", self.ew(n), [src, dst, n as i64]);
        dst
    }

    /// Device pointer to the first `n` values of `b` as bf16: `b` itself when it is bf16, else a
    /// copy rounded into scratch `slot`.
    fn bf16_operand(&self, slot: Slot, b: &CudaBuf, n: usize) -> u64 {
        match b.dtype {
            Dtype::Bf16 => self.p(b),
            Dtype::F32 => self.to_bf16(slot, self.p(b), n),
        }
    }

    /// bf16 operand of a GEMM weight: an f32 weight is rounded once per change of its contents
    /// (the copy is kept with the buffer, see [`CudaBuf`]).
    fn weight_bf16(&self, w: &CudaBuf) -> u64 {
        if w.is_bf16() || w.is_empty() {
            return self.p(w);
        }
        let mut cache = w.bf16_copy.lock().unwrap();
        let epoch = self.epoch.load(Ordering::Relaxed);
        if cache.as_ref().is_none_or(|(v, e, _)| (*v, *e) != (w.version, epoch)) {
            let mut copy = match cache.take() {
                Some((_, _, c)) => c,
                None => {
                    self.not_capturing("allocating a bf16 weight copy");
                    unsafe { self.stream.alloc::<u8>(w.len * 2) }.expect("cuda: alloc of a bf16 weight copy failed")
                }
            };
            let dst = self.pm(&mut copy);
            launch!(self, "f32_to_bf16", self.ew(w.len), [self.p(w), dst, w.len as i64]);
            *cache = Some((w.version, epoch, copy));
        }
        self.p(&cache.as_ref().unwrap().2)
    }

    /// One bf16 copy of several weights stacked by rows (`[Σ m_i, k]`, the weights' `[m_i, k]` in
    /// order), refilled in place when any of them changed: the operand of a fused GEMM (see
    /// [`fuse_gemm`], [`Backend::matmul_fwd_cat`]). A weight whose own bf16 copy is current is
    /// copied from it, any other converted straight into the stack (gate/up never need their own).
    fn weights_bf16_concat(&self, ws: &[(&CudaBuf, usize)], k: usize) -> u64 {
        let ids: Vec<u64> = ws.iter().map(|(w, _)| w.id).collect();
        let versions: Vec<u64> = ws.iter().map(|(w, _)| w.version).collect();
        let total: usize = ws.iter().map(|(_, m)| m * k).sum();
        let mut cache = self.concat_weights.lock().unwrap();
        let epoch = self.epoch.load(Ordering::Relaxed);
        let fresh = cache.get(&ids).is_some_and(|(v, e, buf)| *v == versions && *e == epoch && buf.len() >= total * 2);
        if !fresh {
            // Earlier GEMMs reading the old contents are ahead of the refill in stream order.
            let mut buf = match cache.remove(&ids) {
                Some((_, _, buf)) if buf.len() >= total * 2 => buf,
                old => {
                    self.not_capturing("allocating a concatenated bf16 weight");
                    if old.is_some() {
                        self.resources.fetch_add(1, Ordering::Relaxed);
                    }
                    unsafe { self.stream.alloc::<u8>(total * 2) }.expect("cuda: alloc of a concatenated bf16 weight failed")
                }
            };
            let dst = self.pm(&mut buf);
            let mut off = 0u64;
            for &(w, m) in ws {
                let len = m * k;
                let own_copy = match w.bf16_copy.lock().unwrap().as_ref() {
                    Some((v, e, c)) if (*v, *e) == (w.version, epoch) => Some(self.p(c)),
                    _ => None,
                };
                match (w.is_bf16(), own_copy) {
                    (true, _) => self.memcpy_dtod(dst + off, self.p(w), len * 2),
                    (false, Some(src)) => self.memcpy_dtod(dst + off, src, len * 2),
                    (false, None) => launch!(self, "f32_to_bf16", self.ew(len), [self.p(w), dst + off, len as i64]),
                }
                off += (len * 2) as u64;
            }
            cache.insert(ids.clone(), (versions, epoch, buf));
        }
        self.p(&cache[&ids].2)
    }

    /// Copies `bytes` from device pointer `src` to `dst` (non-overlapping) on the stream.
    fn memcpy_dtod(&self, dst: u64, src: u64, bytes: usize) {
        if bytes > 0 {
            unsafe { drv_result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.expect("cuda: device copy failed");
        }
    }

    /// The bf16 GEMMs of a backward over weights whose output gradients sit side by side in
    /// `dout[n, Σm]` (bf16 device pointer; `x` likewise, `[n, k]`): `dx` = (or += when
    /// `accumulate`) `dout · Wcat` as one GEMM over `k = Σm` on the weights stacked by rows; the
    /// weight gradients as one GEMM into f32 scratch added to each `dw` when some weight is
    /// skinny ([`fuse_gemm`]: q/k/v, small GEMMs run slowly), else one GEMM per weight on its
    /// columns of `dout` (gate/up).
    #[allow(clippy::too_many_arguments)]
    fn gemm_bwd_cat(&self, dx: Option<&mut CudaBuf>, accumulate: bool, xb: u64, dout: u64, n: usize, k: usize, items: &mut [(&mut CudaBuf, &CudaBuf, usize)]) {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let ms: Vec<usize> = items.iter().map(|it| it.2).collect();
        let total: usize = ms.iter().sum();
        if let Some(dx) = dx {
            let ws: Vec<(&CudaBuf, usize)> = items.iter().map(|it| (it.1, it.2)).collect();
            let wcat = self.weights_bf16_concat(&ws, k);
            let dt = dx.dtype;
            let dxp = self.pm(dx);
            // dxᵀ[k, n] (+)= Wcat-as-[k, Σm] · doutᵀ[Σm, n]
            self.gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_N, k, n, total, wcat, k, dout, total, if accumulate { 1.0 } else { 0.0 }, dxp, dt, k);
        }
        if fuse_gemm(n, k, &ms) {
            // dWcatᵀ[k, Σm] = xᵀ[k, n] · dout[n, Σm]: row-major [Σm, k], each weight's rows in turn.
            let dwcat = self.scratch(Slot::FusedOut, total * k * 4);
            self.gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_T, k, total, n, xb, k, dout, total, 0.0, dwcat, Dtype::F32, k);
            let mut row = 0;
            for (dw, _, m) in items.iter_mut() {
                let len = *m * k;
                let dwp = self.pm(*dw);
                let src = dwcat + (row * k * 4) as u64;
                launch!(self, "axpy_f32", self.ew(len), [dwp, src, 1.0f32, len as i64]);
                row += *m;
            }
            return;
        }
        let mut col = 0;
        for (dw, _, m) in items.iter_mut() {
            // dwᵀ[k, m] += xᵀ[k, n] · dout[:, col..col + m]
            let dwp = self.pm(*dw);
            self.gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_T, k, *m, n, xb, k, dout + (col * 2) as u64, total, 1.0, dwp, Dtype::F32, k);
            col += *m;
        }
    }

    /// Copy a `rows x cols` block between row-major matrices of leading dimensions `dst_ld` /
    /// `src_ld` (elements), converting between f32 and bf16 as the flags say (the packing of a
    /// fused backward).
    #[allow(clippy::too_many_arguments)]
    fn copy_block(&self, dst: u64, dst_ld: usize, dst_bf16: bool, src: u64, src_ld: usize, src_bf16: bool, rows: usize, cols: usize) {
        if rows == 0 || cols == 0 {
            return;
        }
        // 4-element vectors when every row start is aligned to them.
        let size = |bf16: bool| if bf16 { 2u64 } else { 4 };
        let vec = cols % 4 == 0 && dst_ld % 4 == 0 && src_ld % 4 == 0 && dst % (4 * size(dst_bf16)) == 0 && src % (4 * size(src_bf16)) == 0;
        let threads = 128u32;
        let gx = (cols.div_ceil(4) as u32).div_ceil(threads);
        let c = LaunchConfig { grid_dim: (gx, rows.min(65535) as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let args = [dst_ld as i32, dst_bf16 as i32, src_ld as i32, src_bf16 as i32, rows as i32, cols as i32, vec as i32];
        launch!(self, "copy_block", c, [dst, src, args[0], args[1], args[2], args[3], args[4], args[5], args[6]]);
    }

    /// Device pointer to the first `n` values of `b` as f32 (for the exact kernels): `b` itself,
    /// or for a bf16 buffer a widened copy in scratch `slot`.
    fn f32_operand(&self, slot: Slot, b: &CudaBuf, n: usize) -> u64 {
        match b.dtype {
            Dtype::F32 => self.p(b),
            Dtype::Bf16 => {
                let dst = self.scratch(slot, n * 4);
                launch!(self, "bf16_to_f32", self.ew(n), [self.p(b), dst, n as i64]);
                dst
            }
        }
    }

    /// Mutable f32 view of an output for the exact kernels: `b` itself, or a widened copy of a
    /// bf16 `b` in scratch `slot` that [`Cuda::f32_output_done`] rounds back.
    fn f32_output(&self, slot: Slot, b: &mut CudaBuf, n: usize) -> u64 {
        match b.dtype {
            Dtype::F32 => self.pm(b),
            Dtype::Bf16 => self.f32_operand(slot, b, n),
        }
    }

    fn f32_output_done(&self, view: u64, b: &mut CudaBuf, n: usize) {
        if b.is_bf16() {
            let dst = self.pm(b);
            launch!(self, "f32_to_bf16", self.ew(n), [view, dst, n as i64]);
        }
    }

    /// Column-major `C[m, n] = op(A)·op(B) + beta·C`, all f32 (cuBLAS SGEMM, the parity path).
    #[allow(clippy::too_many_arguments)]
    fn gemm_f32(
        &self,
        transa: blas_sys::cublasOperation_t,
        transb: blas_sys::cublasOperation_t,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        ldc: usize,
    ) {
        let alpha = 1.0f32;
        unsafe {
            cudarc::cublas::result::sgemm(
                *self.blas.handle(),
                transa,
                transb,
                m as i32,
                n as i32,
                k as i32,
                &alpha,
                a as *const f32,
                lda as i32,
                b as *const f32,
                ldb as i32,
                &beta,
                c as *mut f32,
                ldc as i32,
            )
        }
        .unwrap_or_else(|e| panic!("cuBLAS sgemm failed: {e:?}"));
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The wgmma building blocks of the flash kernels on one 64-row tile (`wg_probe_d{hd}` in
    /// kernels/flash_attention.cu; `mode` as documented there): `a` [64][hd], `b` [64][hd], rounded
    /// to bf16 here; the b tile sits `shift` bytes past a 1024-byte boundary of shared memory.
    /// Returns the f32 output ([64][64], or [64][hd] for the P·V mode).
    pub fn wgmma_probe(&self, hd: usize, mode: i32, shift: i32, a: &[f32], b: &[f32]) -> Vec<f32> {
        assert!(matches!(hd, 32 | 64) && a.len() == 64 * hd && b.len() == FLASH_TILE * hd);
        assert!(shift >= 0 && shift % 16 == 0 && shift as usize <= 2 * FLASH_TILE * (hd + 8) * 2 + 1024, "wgmma_probe: shift {shift}");
        let (a, b) = (self.upload_bf16(a), self.upload_bf16(b));
        let out = self.stream.alloc_zeros::<f32>(64 * 64).expect("cuda: alloc failed");
        let (op, ap, bp) = (self.p(&out), self.p(&a), self.p(&b));
        launch!(self, &format!("wg_probe_d{hd}"), cfg((1, 1, 1), 128, 0), [op, ap, bp, mode, shift]);
        let v = self.stream.clone_dtoh(&out).expect("cuda: device-to-host copy failed");
        self.synchronize();
        v
    }

    /// `x` rounded to bf16 in a new device buffer (the probes' operands).
    fn upload_bf16(&self, x: &[f32]) -> CudaSlice<half::bf16> {
        let v: Vec<half::bf16> = x.iter().map(|&f| half::bf16::from_f32(f)).collect();
        self.stream.clone_htod(&v).expect("cuda: host-to-device copy failed")
    }

    /// A check of the TMA and shared-memory wgmma building blocks (kernels/flash_attention.cu,
    /// `tma_probe_d64`; `cuda_parity --tma-probe`): `s[64][64] = a[a0..a0+64] · b[b0..b0+64]ᵀ` for
    /// row-major bf16 `a [rows_a][64]` and `b [rows_b][64]`, each tile loaded by TMA with 128-byte
    /// swizzle (rows past the tensor read as zero) and both wgmma operands read from shared memory;
    /// `mode` 0 returns s, 1 returns `bf16(s) · b-tile` with the b tile as a swizzled MN-major
    /// operand described by strides `lbo` / `sbo` (bytes).
    pub fn tma_probe(&self, a: &[f32], b: &[f32], a0: usize, b0: usize, mode: i32, lbo: i32, sbo: i32) -> Vec<f32> {
        assert!(a.len() % 64 == 0 && b.len() % 64 == 0 && a0 < a.len() / 64 && b0 < b.len() / 64);
        let (a_dev, b_dev) = (self.upload_bf16(a), self.upload_bf16(b));
        let map = |buf: &CudaSlice<half::bf16>, rows: usize| TmaMap::bf16_tiles(self.p(buf), rows, 64);
        let (ta, tb) = (map(&a_dev, a.len() / 64), map(&b_dev, b.len() / 64));
        let out = self.stream.alloc_zeros::<f32>(64 * 64).expect("cuda: alloc failed");
        let op = self.p(&out);
        launch!(self, "tma_probe_d64", cfg((1, 1, 1), 128, 0), [ta, tb, op, a0 as i32, b0 as i32, mode, lbo, sbo]);
        let v = self.stream.clone_dtoh(&out).expect("cuda: device-to-host copy failed");
        self.synchronize();
        v
    }

    /// The TMA kernels' phase cycle sums since the last call (`fa_trace` in
    /// kernels/flash_attention.cu; zero unless the kernels were compiled with
    /// `MOR_NVRTC_DEFINES=FA_TRACE`), then cleared.
    pub fn take_flash_trace(&self) -> [u64; 32] {
        let out = self.stream.alloc_zeros::<u32>(64).expect("cuda: alloc failed");
        let op = self.p(&out);
        launch!(self, "fa_trace_take", cfg((1, 1, 1), 32, 0), [op]);
        let v = self.stream.clone_dtoh(&out).expect("cuda: device-to-host copy failed");
        self.synchronize();
        std::array::from_fn(|i| v[2 * i] as u64 | (v[2 * i + 1] as u64) << 32)
    }

    /// Device name as the driver reports it.
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "?".into())
    }

    /// Panics while a graph is being captured: `what` would allocate, transfer or wait, which a
    /// recording cannot hold (or would replay wrongly).
    fn not_capturing(&self, what: &str) {
        assert!(
            !self.capturing.load(Ordering::Relaxed),
            "cuda: {what} while capturing a CUDA graph; the captured work must have run once eagerly at the same shapes (docs/design/cuda-graphs.md)"
        );
    }

    /// Wait for all queued work.
    pub fn synchronize(&self) {
        self.not_capturing("waiting for the device");
        self.stream.synchronize().expect("cuda: stream synchronize failed");
    }

    /// Per kernel: (name, registers per thread, local memory bytes per thread (spills and stack
    /// arrays), static shared memory bytes), as the driver reports them after loading.
    pub fn kernel_info(&self) -> Vec<(String, i32, i32, i32)> {
        let mut flash: Vec<_> = self.flash_funcs.iter().collect();
        flash.sort_by(|a, b| a.0.cmp(b.0));
        let named = KERNELS.iter().map(|&n| (n.to_string(), &self.funcs[n])).chain(flash.into_iter().map(|(n, f)| (n.clone(), f)));
        named.map(|(n, f)| (n, f.num_regs().unwrap_or(-1), f.local_size_bytes().unwrap_or(-1), f.shared_size_bytes().unwrap_or(-1))).collect()
    }

    fn func(&self, name: &str) -> &CudaFunction {
        self.funcs.get(name).or_else(|| self.flash_funcs.get(name)).unwrap_or_else(|| panic!("cuda: kernel {name} not loaded"))
    }

    /// Device pointer for reading.
    fn p<M: DevMem>(&self, b: &M) -> u64 {
        b.ptr(&self.stream)
    }

    /// Device pointer for writing (a [`CudaBuf`] counts it as a change of its contents).
    fn pm<M: DevMem>(&self, b: &mut M) -> u64 {
        b.ptr_mut(&self.stream)
    }

    /// Device pointer to at least `bytes` of scratch in `slot` (contents unspecified).
    fn scratch(&self, slot: Slot, bytes: usize) -> u64 {
        let mut s = self.scratch.lock().unwrap();
        let e = &mut s[slot as usize];
        if e.as_ref().is_none_or(|b| b.len() < bytes) {
            self.not_capturing("growing a scratch buffer");
            if e.is_some() {
                self.resources.fetch_add(1, Ordering::Relaxed);
            }
            let size = (bytes + bytes / 4).max(256).next_multiple_of(256);
            *e = Some(unsafe { self.stream.alloc::<u8>(size) }.expect("cuda: scratch allocation failed"));
        }
        let (p, _) = e.as_ref().unwrap().device_ptr(&self.stream);
        p
    }

    fn memset0(&self, ptr: u64, bytes: usize) {
        if bytes > 0 {
            unsafe { drv_result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
                .expect("cuda: memset failed");
        }
    }

    /// Grid for grid-stride elementwise kernels over `n` elements.
    fn ew(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(EW_THREADS as usize).clamp(1, self.sm_count as usize * 16);
        cfg((blocks as u32, 1, 1), EW_THREADS, 0)
    }

    /// Grid for the vectorized elementwise kernels (16-byte vectors, [`EW_UNROLL`] per thread) over
    /// `n` elements of `dtype`: one pass of the grid-stride loop covers them all, in as many
    /// blocks as it takes (the hardware schedules them as SMs free up, no tail of a fixed grid).
    fn ew16(&self, n: usize, dtype: Dtype) -> LaunchConfig {
        let per_thread = 16 / dtype.size() * EW_UNROLL;
        let blocks = n.div_ceil(EW_THREADS as usize * per_thread).clamp(1, i32::MAX as usize);
        cfg((blocks as u32, 1, 1), EW_THREADS, 0)
    }

    /// Whether the attention backward takes the fused flash kernel (dq summed into an f32 workspace
    /// by float atomics or TMA reductions) for these outputs.
    fn attention_bwd_fused(&self, hd: usize, outs: &[u64]) -> bool {
        self.use_flash(hd, outs) && self.flash.fused && !self.deterministic.load(Ordering::Relaxed)
    }

    /// Queues a copy of the `n` 4-byte words at `src` into a page-locked buffer of the pool and an
    /// event after it; the read waits for that event only, then `convert`s the words.
    fn read_words_async<T: 'static>(&self, src: u64, n: usize, convert: fn(&[u32]) -> Vec<T>) -> Readback<T> {
        self.not_capturing("reading device memory (a captured step reads after it: Reads::AfterStep)");
        let mut buf = {
            let mut pool = self.pinned.lock().unwrap();
            match pool.iter().position(|b| b.len() >= n) {
                Some(i) => pool.swap_remove(i),
                // SAFETY: the words are written by the copy below before they are read.
                None => unsafe { self.ctx.alloc_pinned_with_flags::<u32>(n.next_power_of_two(), 0) }
                    .expect("cuda: page-locked host allocation failed"),
            }
        };
        let dst = &mut buf.as_mut_slice().expect("cuda: page-locked buffer")[..n];
        unsafe { drv_result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.expect("cuda: device-to-host copy failed");
        let copied = self.stream.record_event(None).expect("cuda: event record failed");
        let read = PinnedRead { buf: Some(buf), copied, pool: self.pinned.clone() };
        Readback::pending(move || {
            read.copied.synchronize().expect("cuda: event wait failed");
            convert(&read.buf.as_ref().unwrap().as_slice().expect("cuda: page-locked buffer")[..n])
        })
    }

    /// The attention forward; the TMA kernel also stores `out_act`, the bf16 copy of an f32
    /// `out`, from its epilogue when given one (returns whether it did).
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd_into(
        &self,
        out: &mut CudaBuf,
        out_act: Option<&mut CudaBuf>,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: &AttnShape<'_, CudaSlice<u32>>,
    ) -> bool {
        let (nq, nk, heads, kvh, hd) = (shape.nq, shape.nk, shape.heads, shape.kv_heads, shape.head_dim);
        if nq == 0 || heads == 0 || hd == 0 || shape.num_seqs == 0 {
            return false;
        }
        Self::check_attn(shape);
        check_len("out", out.len(), nq * heads * hd);
        check_len("lse", lse.len(), nq * heads);
        check_len("q", q.len(), nq * heads * hd);
        check_len("k", k.len(), nk * kvh * hd);
        check_len("v", v.len(), nk * kvh * hd);
        Self::f32_only("attention_fwd", &[("lse", lse)]);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let (nqe, nke) = (nq * heads * hd, nk * kvh * hd);
        let (cq, ck, pq, pk) = (self.p(shape.cu_q), self.p(shape.cu_k), self.p(shape.pos_q), self.p(shape.pos_k));
        let (ns, hi, kvi) = (shape.num_seqs as i32, heads as i32, kvh as i32);
        let lp = self.pm(lse);
        if self.use_flash(hd, &[self.p(out)]) {
            let q16 = self.bf16_operand(Slot::AttQ16, q, nqe);
            let k16 = self.bf16_operand(Slot::AttK16, k, nke);
            let v16 = self.bf16_operand(Slot::AttV16, v, nke);
            let out_bf16 = out.is_bf16() as i32;
            let op = self.pm(out);
            // The TMA forward needs keys to map (none: every query sees nothing, the default kernel).
            let fwd = if self.flash.fwd.tma && nk == 0 { FlashConfig::MMA_FWD } else { self.flash.fwd };
            let (name, rows, threads, smem) = Self::flash_kernel_of("fwd", hd, fwd);
            let (qoff, grid, koff, krange) = self.flash_tables(shape.cu_q, nq, rows, shape.cu_k, shape.pos_k, nk, shape.num_seqs);
            if name.contains("_tma") {
                let (tq, tk, tv) = (TmaMap::bf16_tiles(q16, nq, heads * hd), TmaMap::bf16_tiles(k16, nk, kvh * hd), TmaMap::bf16_tiles(v16, nk, kvh * hd));
                let order = self.flash_order(qoff, shape.num_seqs, grid);
                let c = cfg((heads as u32, grid, 1), threads, smem);
                // The epilogue's bf16 copy: 4-byte stores of element pairs.
                let act = out_act.filter(|a| !out.is_bf16() && a.is_bf16()).map(|a| self.pm(a));
                let ap = act.unwrap_or(0);
                launch!(self, &name, c, [tq, tk, tv, op, out_bf16, ap, lp, cq, ck, pq, pk, qoff, koff, krange, order, ns, hi, kvi, scale]);
                return act.is_some();
            }
            let c = cfg((grid, heads as u32, 1), threads, smem);
            launch!(self, &name, c, [op, out_bf16, lp, q16, k16, v16, cq, ck, pq, pk, qoff, koff, krange, ns, hi, kvi, scale]);
            return false;
        }
        // The exact f32 kernels (bf16 buffers are widened into scratch and the output rounded back).
        let (qp, kp, vp) = (self.f32_operand(Slot::AttQ16, q, nqe), self.f32_operand(Slot::AttK16, k, nke), self.f32_operand(Slot::AttV16, v, nke));
        let op = self.f32_output(Slot::AttO, out, nqe);
        let (qoff, grid) = self.attn_tiles(Slot::AttQOff, shape.cu_q, shape.num_seqs, nq, ATT_ROWS);
        launch!(
            self,
            &format!("attn_fwd_f32_{}", Self::exact_variant(hd)),
            cfg((grid, heads as u32, 1), 128, 0),
            [op, lp, qp, kp, vp, cq, ck, pq, pk, qoff, ns, hi, kvi, hd as i32, scale]
        );
        self.f32_output_done(op, out, nqe);
        false
    }

    /// Attention backward (see [`Backend::attention_bwd`]). With `dq_rope = Some(theta)` (the
    /// fused kernel only, see [`Backend::attention_bwd_rope_dq`]) dq is overwritten with the
    /// inverse rotary embedding of its gradient in the pass that converts the f32 workspace;
    /// `kv_set`: dk and dv are overwritten instead of added to.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd_into(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: &AttnShape<'_, CudaSlice<u32>>,
        dq_rope: Option<DqRope>,
        kv_set: bool,
    ) {
        // The flash kernels store dk / dv themselves when `kv_set`; the other paths (and an empty
        // shape) add to them, so they start from zeros.
        let flash = !shape.is_empty() && self.use_flash(shape.head_dim, &[self.p(dq), self.p(dk), self.p(dv)]);
        if kv_set && !flash {
            let nke = shape.nk * shape.kv_heads * shape.head_dim;
            self.fill(dk, nke, 0.0);
            self.fill(dv, nke, 0.0);
        }
        if shape.is_empty() {
            return;
        }
        let (nq, nk, heads, kvh, hd) = (shape.nq, shape.nk, shape.heads, shape.kv_heads, shape.head_dim);
        Self::check_attn(shape);
        for (name, len, need) in [
            ("dq", dq.len(), nq * heads * hd),
            ("dout", dout.len(), nq * heads * hd),
            ("out", out.len(), nq * heads * hd),
            ("q", q.len(), nq * heads * hd),
            ("lse", lse.len(), nq * heads),
            ("dk", dk.len(), nk * kvh * hd),
            ("dv", dv.len(), nk * kvh * hd),
            ("k", k.len(), nk * kvh * hd),
            ("v", v.len(), nk * kvh * hd),
        ] {
            check_len(name, len, need);
        }
        Self::f32_only("attention_bwd", &[("lse", lse)]);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let (nqe, nke) = (nq * heads * hd, nk * kvh * hd);
        let delta = self.scratch(Slot::AttDelta, nq * heads * 4);
        let delta_cfg = cfg(((nq * heads).div_ceil(8) as u32, 1, 1), 256, 0);
        let lp = self.p(lse);
        let (cq, ck, pq, pk) = (self.p(shape.cu_q), self.p(shape.cu_k), self.p(shape.pos_q), self.p(shape.pos_k));
        let (ns, hi, kvi, hdi) = (shape.num_seqs as i32, heads as i32, kvh as i32, hd as i32);
        if flash {
            let q16 = self.bf16_operand(Slot::AttQ16, q, nqe);
            let g16 = self.bf16_operand(Slot::AttG16, dout, nqe);
            let k16 = self.bf16_operand(Slot::AttK16, k, nke);
            let v16 = self.bf16_operand(Slot::AttV16, v, nke);
            // D = <dout, out> from the bf16 dout of the dP products and out as stored (f32 keeps
            // D consistent with P·V; docs/design/bf16-gradient-error.md).
            let delta_kernel = if out.is_bf16() { "attn_delta_bf16" } else { "attn_delta_bf16_f32" };
            let op = self.p(out);
            launch!(self, delta_kernel, delta_cfg, [delta, g16, op, nq as i32, hi, hdi]);
            let dq_bf16 = dq.is_bf16() as i32;
            assert!(dk.dtype == dv.dtype, "cuda: attention_bwd needs dk and dv of one element type");
            // FA_KV_BF16 | FA_KV_SET (kernels/flash_attention.cu).
            let kv_flags = dk.is_bf16() as i32 | (kv_set as i32) << 1;
            let (dqp, dkp, dvp) = (self.pm(dq), self.pm(dk), self.pm(dv));
            if self.attention_bwd_fused(hd, &[dqp, dkp, dvp]) {
                // Fused: dq accumulates in an f32 workspace (float atomics, or TMA reductions in the
                // TMA kernel), converted into dq at the end.
                let acc = self.scratch(Slot::AttDqAcc, nqe * 4);
                self.memset0(acc, nqe * 4);
                let (name, rows, threads, smem) = self.flash_kernel("fused", hd);
                let (koff, grid, qoff, qrange) = self.flash_tables(shape.cu_k, nk, rows, shape.cu_q, shape.pos_q, nq, shape.num_seqs);
                if name.contains("_tma") {
                    let (tq, tg) = (TmaMap::bf16_tiles(q16, nq, heads * hd), TmaMap::bf16_tiles(g16, nq, heads * hd));
                    let (tk, tv) = (TmaMap::bf16_tiles(k16, nk, kvh * hd), TmaMap::bf16_tiles(v16, nk, kvh * hd));
                    let tacc = TmaMap::f32_tiles(acc, nq, heads * hd);
                    let order = self.flash_order(koff, shape.num_seqs, grid);
                    let c = cfg((kvh as u32, grid, 1), threads, smem);
                    launch!(self, &name, c, [tq, tg, tk, tv, tacc, dkp, dvp, kv_flags, lp, delta, cq, ck, pq, pk, koff, qoff, qrange, order, ns, hi, kvi, scale]);
                } else {
                    let c = cfg((grid, kvh as u32, 1), threads, smem);
                    launch!(self, &name, c, [dkp, dvp, kv_flags, acc, g16, lp, delta, q16, k16, v16, cq, ck, pq, pk, koff, qoff, qrange, ns, hi, kvi, scale]);
                }
                match dq_rope {
                    Some(rope) => {
                        let freqs = RopeFreqs::new(hd, rope.theta);
                        let (dst, bf16, ld) = rope.packed.map_or((dqp, dq_bf16, heads * hd), |(p, ld)| (p, 1, ld));
                        launch!(self, "attn_dq_from_acc_rope", self.ew(nq * hd / 2), [dst, bf16, acc, pq, freqs, nq as i32, hi, hdi, ld as i32])
                    }
                    None => launch!(self, "attn_dq_from_acc", self.ew(nqe / 2), [dqp, dq_bf16, acc, nqe as i64]),
                }
                return;
            }
            let (name, rows, threads, smem) = self.flash_kernel("dq", hd);
            let (qoff, grid, koff, krange) = self.flash_tables(shape.cu_q, nq, rows, shape.cu_k, shape.pos_k, nk, shape.num_seqs);
            launch!(
                self,
                &name,
                cfg((grid, heads as u32, 1), threads, smem),
                [dqp, dq_bf16, g16, lp, delta, q16, k16, v16, cq, ck, pq, pk, qoff, koff, krange, ns, hi, kvi, scale]
            );
            let (name, rows, threads, smem) = self.flash_kernel("dkdv", hd);
            let (koff, grid, qoff, qrange) = self.flash_tables(shape.cu_k, nk, rows, shape.cu_q, shape.pos_q, nq, shape.num_seqs);
            launch!(
                self,
                &name,
                cfg((grid, kvh as u32, 1), threads, smem),
                [dkp, dvp, kv_flags, g16, lp, delta, q16, k16, v16, cq, ck, pq, pk, koff, qoff, qrange, ns, hi, kvi, scale]
            );
            return;
        }
        // The exact f32 kernels (bf16 buffers are widened into scratch, outputs rounded back).
        let gp = self.f32_operand(Slot::AttG16, dout, nqe);
        let op = self.f32_operand(Slot::AttO, out, nqe);
        launch!(self, "attn_delta_f32", delta_cfg, [delta, gp, op, nq as i32, hi, hdi]);
        let (qp, kp, vp) = (self.f32_operand(Slot::AttQ16, q, nqe), self.f32_operand(Slot::AttK16, k, nke), self.f32_operand(Slot::AttV16, v, nke));
        let dqp = self.f32_output(Slot::AttDq, dq, nqe);
        let dkp = self.f32_output(Slot::AttDk, dk, nke);
        let dvp = self.f32_output(Slot::AttDv, dv, nke);
        let var = Self::exact_variant(hd);
        let (qoff, qgrid) = self.attn_tiles(Slot::AttQOff, shape.cu_q, shape.num_seqs, nq, ATT_ROWS);
        launch!(
            self,
            &format!("attn_bwd_dq_f32_{var}"),
            cfg((qgrid, heads as u32, 1), 128, 0),
            [dqp, gp, lp, delta, qp, kp, vp, cq, ck, pq, pk, qoff, ns, hi, kvi, hdi, scale]
        );
        let (koff, kgrid) = self.attn_tiles(Slot::AttKOff, shape.cu_k, shape.num_seqs, nk, ATT_ROWS);
        launch!(
            self,
            &format!("attn_bwd_dkdv_f32_{var}"),
            cfg((kgrid, kvh as u32, 1), 128, 0),
            [dkp, dvp, gp, lp, delta, qp, kp, vp, cq, ck, pq, pk, koff, ns, hi, kvi, hdi, scale]
        );
        self.f32_output_done(dqp, dq, nqe);
        self.f32_output_done(dkp, dk, nke);
        self.f32_output_done(dvp, dv, nke);
    }

    /// RMSNorm backward (see [`Backend::rmsnorm_bwd`]); `dx_bf16` also receives the updated dx
    /// rounded to bf16.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd_into(
        &self,
        dx: &mut CudaBuf,
        dx_bf16: Option<&mut CudaBuf>,
        dw: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        d: usize,
    ) {
        Self::f32_only("rmsnorm_bwd", &[("dx", dx), ("dw", dw), ("dout", dout), ("x", x), ("w", w), ("rstd", rstd)]);
        if n == 0 || d == 0 {
            return;
        }
        check_len("dx", dx.len(), n * d);
        check_len("dw", dw.len(), d);
        check_len("dout", dout.len(), n * d);
        check_len("x", x.len(), n * d);
        check_len("w", w.len(), d);
        check_len("rstd", rstd.len(), n);
        let (dxp, dwp, gp, xp, wp, rp) = (self.pm(dx), self.pm(dw), self.p(dout), self.p(x), self.p(w), self.p(rstd));
        let (ni, di) = (n as i32, d as i32);
        let mirror = dx_bf16.map(|b| self.pm(b)).unwrap_or(0);
        if let Some(v) = Self::rms_warp_v(d, &[dxp, gp, xp, wp], mirror, 8) {
            // One pass, one row per warp: dx and per-block dw partials (kernels/rows.cu), then the
            // partials in a fixed order. Rows per block depend on n only.
            let rpb = n.div_ceil(RMS_BWD_PARTS).max(2 * RMS_BWD_WARPS);
            let parts = n.div_ceil(rpb);
            let partial = self.scratch(Slot::RmsPartial, parts * d * 4);
            let inv_d = (1.0f64 / d as f64) as f32;
            let c = cfg((parts as u32, 1, 1), 32 * RMS_BWD_WARPS as u32, (RMS_BWD_WARPS * d * 4) as u32);
            launch!(self, &format!("rmsnorm_bwd_v{v}_f32"), c, [dxp, mirror, partial, gp, xp, wp, rp, ni, di, inv_d, rpb as i32]);
            launch!(self, "rmsnorm_dw_reduce", cfg((d.div_ceil(32) as u32, 1, 1), 1024, 0), [dwp, partial, parts as i32, di]);
            return;
        }
        launch!(self, "rmsnorm_bwd_dx_f32", cfg((rows_grid(n), 1, 1), row_threads(d, 1024), 0), [dxp, gp, xp, wp, rp, ni, di]);
        // dw: fixed chunks of rows (a function of n only), then a pass over the chunks in order.
        let rpc = n.div_ceil(256).max(32);
        let chunks = n.div_ceil(rpc);
        let partial = self.scratch(Slot::RmsPartial, chunks * d * 4);
        let col_blocks = d.div_ceil(256) as u32;
        launch!(self, "rmsnorm_dw_partial_f32", cfg((col_blocks, chunks as u32, 1), 256, 0), [partial, gp, xp, rp, ni, di, rpc as i32]);
        launch!(self, "rmsnorm_dw_final", cfg((col_blocks, 1, 1), 256, 0), [dwp, partial, chunks as i32, di]);
        if mirror != 0 {
            launch!(self, "f32_to_bf16", self.ew(n * d), [dxp, mirror, (n * d) as i64]);
        }
    }

    /// `V` of the warp-per-row RMSNorm kernels (rows of up to 128 V, in 4-element groups; see
    /// kernels/rows.cu) for rows of `d` at these device addresses, if they can take them: d a
    /// multiple of 4 up to 2048, 16-byte aligned f32 rows, and `out_align`-aligned outputs.
    fn rms_warp_v(d: usize, f32_ptrs: &[u64], out: u64, out_align: u64) -> Option<usize> {
        let groups_per_lane = (d / 4).div_ceil(32);
        let aligned = f32_ptrs.iter().all(|p| p.is_multiple_of(16)) && out.is_multiple_of(out_align);
        if !d.is_multiple_of(4) || !aligned {
            return None;
        }
        [2, 4, 8, 16].into_iter().find(|&v| groups_per_lane <= v)
    }

    /// Scatter `src` rows into `dst` rows `idx[i]`. mode 0: add; 1: add `scale[i]` times; 2:
    /// replace. `distinct` rows (a token set's): one kernel, a block per source row; otherwise
    /// with a stable grouping by destination row (see `group_*` in kernels/rows.cu), repeated rows
    /// added in index order (replace: the last source wins).
    #[allow(clippy::too_many_arguments)]
    fn scatter_into(&self, dst: &mut CudaBuf, src: u64, scale: u64, idx: &CudaSlice<u32>, m: usize, d: usize, mode: i32, distinct: bool) {
        if m == 0 || d == 0 {
            return;
        }
        check_len("idx", idx.len(), m);
        let rows = dst.len() / d;
        if distinct {
            let (dp, ip) = (self.pm(dst), self.p(idx));
            let c = cfg((rows_grid(m), 1, 1), row_threads(d, 256), 0);
            launch!(self, "scatter_distinct_f32", c, [dp, src, scale, ip, m as i32, rows as i32, d as i32, mode]);
            return;
        }
        let counts = self.scratch(Slot::GroupCounts, (rows + 1) * 4);
        let fill = self.scratch(Slot::GroupFill, rows.max(1) * 4);
        let tmp = self.scratch(Slot::GroupTmp, m * 4);
        let order = self.scratch(Slot::GroupOrder, m * 4);
        self.memset0(counts, (rows + 1) * 4);
        self.memset0(fill, rows * 4);
        let (mi, ri, di) = (m as i32, rows as i32, d as i32);
        let idxp = self.p(idx);
        launch!(self, "group_count", self.ew(m), [idxp, mi, ri, counts]);
        launch!(self, "group_scan", cfg((1, 1, 1), 1024, 0), [counts, ri + 1]);
        launch!(self, "group_place", self.ew(m), [idxp, mi, ri, counts, fill, tmp]);
        launch!(self, "group_rank", self.ew(m), [idxp, mi, ri, counts, tmp, order]);
        let dstp = self.pm(dst);
        launch!(
            self,
            "group_apply_f32",
            cfg((rows_grid(m), 1, 1), row_threads(d, 256), 0),
            [dstp, src, scale, idxp, counts, order, mi, ri, di, mode]
        );
    }

    /// `scatter_add_rows` (`distinct`: its `_distinct` form).
    fn scatter_add_rows_into(&self, dx: &mut CudaBuf, dout: &CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize, distinct: bool) {
        let _p = self.prof("scatter_add_rows");
        Self::f32_only("scatter_add_rows", &[("dx", dx), ("dout", dout)]);
        check_len("dout", dout.len(), m * d);
        self.scatter_into(dx, self.p(dout), 0, idx, m, d, 0, distinct);
    }

    /// `scatter_add_scaled` (`distinct`: its `_distinct` form).
    #[allow(clippy::too_many_arguments)]
    fn scatter_add_scaled_into(&self, h: &mut CudaBuf, y: &CudaBuf, scale: &CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize, distinct: bool) {
        let _p = self.prof("scatter_add_scaled");
        Self::f32_only("scatter_add_scaled", &[("h", h), ("y", y), ("scale", scale)]);
        check_len("y", y.len(), m * d);
        check_len("scale", scale.len(), m);
        self.scatter_into(h, self.p(y), self.p(scale), idx, m, d, 1, distinct);
    }

    /// `scatter_rows` (`distinct`: its `_distinct` form).
    fn scatter_rows_into(&self, x: &mut CudaBuf, y: &CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize, distinct: bool) {
        let _p = self.prof("scatter_rows");
        Self::f32_only("scatter_rows", &[("x", x), ("y", y)]);
        check_len("y", y.len(), m * d);
        self.scatter_into(x, self.p(y), 0, idx, m, d, 2, distinct);
    }

    /// `out`: the forward's output, written again (`swiglu_bwd_recompute`).
    #[allow(clippy::too_many_arguments)]
    fn swiglu_bwd_impl(&self, dgate_up: &mut CudaBuf, out: Option<&mut CudaBuf>, dout: &CudaBuf, gate_up: &CudaBuf, rows: usize, f: usize, acc: bool) {
        let n = rows * f;
        if n == 0 {
            return;
        }
        check_len("dgate_up", dgate_up.len(), 2 * n);
        check_len("dout", dout.len(), n);
        check_len("gate_up", gate_up.len(), 2 * n);
        let name = Self::typed("swiglu_bwd", &[("dgate_up", &*dgate_up), ("dout", dout), ("gate_up", gate_up)]);
        let outp = match out {
            Some(o) => {
                check_len("out", o.len(), n);
                assert_eq!(o.dtype, dgate_up.dtype, "cuda: swiglu_bwd_recompute: out and dgate_up differ in element type");
                self.pm(o)
            }
            None => 0u64,
        };
        let c = self.ew16(n, dgate_up.dtype);
        let (dp, op, gp) = (self.pm(dgate_up), self.p(dout), self.p(gate_up));
        launch!(self, &name, c, [dp, outp, op, gp, f as i32, acc as i32, n as i64]);
    }

    /// Tile table of an attention pass over the segments of `cu` (see kernels/attention.cu);
    /// returns the device pointer and the grid size (an upper bound of the tile count).
    fn attn_tiles(&self, slot: Slot, cu: &CudaSlice<u32>, num_seqs: usize, rows: usize, tile: usize) -> (u64, u32) {
        check_len("cu", cu.len(), num_seqs + 1);
        let off = self.scratch(slot, (num_seqs + 1) * 4);
        let cup = self.p(cu);
        launch!(self, "attn_tiles", cfg((1, 1, 1), 32, 0), [cup, num_seqs as i32, tile as i32, off]);
        (off, (rows.div_ceil(tile) + num_seqs) as u32)
    }

    /// Whether a call takes the tensor-core kernels (kernels/flash_attention.cu): bf16 mode, head
    /// dim 32 or 64, and outputs aligned for their paired (8-byte) stores.
    fn use_flash(&self, hd: usize, outs: &[u64]) -> bool {
        self.bf16() && FLASH_HEAD_DIMS.contains(&hd) && outs.iter().all(|p| p % 8 == 0)
    }

    /// Suffix of the exact f32 kernels for a head dim.
    fn exact_variant(hd: usize) -> &'static str {
        assert!(hd > 0 && hd <= MAX_HEAD_DIM, "cuda attention: head_dim {hd} not in 1..={MAX_HEAD_DIM}");
        if hd <= 64 {
            "d64"
        } else {
            "d128"
        }
    }

    /// Dynamic shared memory of a flash kernel (`kind` fwd | dq | dkdv) of block shape `shape`;
    /// the layouts are at the top of each kernel in kernels/flash_attention.cu.
    fn flash_smem(kind: &str, hd: usize, shape: FlashShape) -> u32 {
        if shape.tma {
            let tile = FLASH_TILE * hd * 2;
            // 1024 bytes of alignment slack, then the tiles and the mbarriers: forward Q (two tiles)
            // and the K / V ring (128-key stages: two tiles each); backward K and V (two tiles each),
            // the Q / dout ring (128-row stages: two tiles each), dSᵀ (two buffers of 128 x 128) and
            // an f32 [64][64] dQ staging buffer per consumer warpgroup.
            return if kind == "fwd" {
                1024 + (2 + 4 * TMA_STAGES) * tile + 8 * (2 * TMA_STAGES + 1)
            } else {
                1024 + (4 + 4 * TMA_BWD_STAGES + 8) * tile + 2 * FLASH_TILE * hd * 4 + 8 * (2 * TMA_BWD_STAGES + 1)
            } as u32;
        }
        let row = (hd + 8) * 2;
        // The wgmma backward kernels stage their own rows' two operands in tiles of their own.
        let staging = if shape.wgmma && kind != "fwd" { 2 * shape.rows() * row } else { 0 };
        (staging
            + match kind {
                "fwd" => (shape.rows() + 4 * FLASH_TILE) * row + 2 * FLASH_TILE * 4,
                "dq" => 4 * FLASH_TILE * row + 2 * FLASH_TILE * 4,
                "dkdv" => 4 * FLASH_TILE * row + 6 * FLASH_TILE * 4,
                // dk/dv's, plus its own k tile and the dS tile (FLASH_TILE queries x rows keys).
                _ => 4 * FLASH_TILE * row + 6 * FLASH_TILE * 4 + shape.rows() * row + FLASH_TILE * (shape.rows() + 8) * 2,
            }) as u32
    }

    /// Name of a flash kernel (`kind` fwd | dq | dkdv | fused) as instantiated by `INST_FA_FWD` /
    /// `INST_FA_BWD` / `INST_FA_BWD_FUSED`.
    fn flash_kernel_name(kind: &str, hd: usize, shape: FlashShape) -> String {
        let w = shape.warps;
        let path = if shape.tma {
            shape.tma_name().to_string()
        } else if shape.wgmma {
            "wg".to_string()
        } else {
            format!("m{}", shape.tiles)
        };
        match kind {
            "fwd" => format!("attn_fwd_bf16_d{hd}_w{w}_{path}"),
            _ => format!("attn_bwd_{kind}_bf16_d{hd}_w{w}_{path}"),
        }
    }

    /// Name, rows per block, threads per block and shared memory of a flash kernel (grid x from
    /// the caller).
    fn flash_kernel(&self, kind: &str, hd: usize) -> (String, usize, u32, u32) {
        let shape = match kind {
            "fwd" => self.flash.fwd,
            "dq" => self.flash.dq,
            _ => self.flash.dkdv,
        };
        Self::flash_kernel_of(kind, hd, shape)
    }

    /// [`Cuda::flash_kernel`] for a given shape; the TMA kernels exist for hd 64 only (other head
    /// dims, and the two-pass backward, take the mma.sync kernels).
    fn flash_kernel_of(kind: &str, hd: usize, shape: FlashShape) -> (String, usize, u32, u32) {
        let shape = match kind {
            _ if !shape.tma => shape,
            "fwd" | "fused" if hd == 64 => shape,
            "fwd" => FlashConfig::MMA_FWD,
            _ => FlashConfig::MMA_BWD,
        };
        (Self::flash_kernel_name(kind, hd, shape), shape.rows(), 32 * shape.warps as u32, Self::flash_smem(kind, hd, shape))
    }

    /// The `grid` blocks of a TMA flash pass (`off`: per-segment block offsets) in rank-major order,
    /// every segment's heaviest block first (`attn_rank_order`); the kernels take the heads as the
    /// fastest grid dimension and their block from this table.
    fn flash_order(&self, off: u64, num_seqs: usize, grid: u32) -> u64 {
        assert!(grid <= 65_535, "cuda attention: {grid} blocks per head exceed the grid's y limit");
        let order = self.scratch(Slot::AttOrder, grid as usize * 4);
        launch!(self, "attn_rank_order", cfg((grid.div_ceil(256), 1, 1), 256, 0), [order, off, num_seqs as i32]);
        order
    }

    /// Tile tables for a flash pass: the blocks' own side in `own_tile`-row tiles (grid) and the
    /// streamed side in FLASH_TILE tiles with per-tile position ranges. Returns
    /// `(own_off, grid, stream_off, stream_range)`.
    fn flash_tables(&self, own_cu: &CudaSlice<u32>, own_rows: usize, own_tile: usize, st_cu: &CudaSlice<u32>, st_pos: &CudaSlice<u32>, st_rows: usize, ns: usize) -> (u64, u32, u64, u64) {
        let (own, grid) = self.attn_tiles(Slot::AttQOff, own_cu, ns, own_rows, own_tile);
        let (st, st_grid) = self.attn_tiles(Slot::AttKOff, st_cu, ns, st_rows, FLASH_TILE);
        let range = self.scratch(Slot::AttRange, st_grid as usize * 8);
        let (cup, posp) = (self.p(st_cu), self.p(st_pos));
        launch!(self, "attn_tile_range", cfg((st_grid, 1, 1), 32, 0), [cup, posp, st, ns as i32, FLASH_TILE as i32, range]);
        (own, grid, st, range)
    }

    fn check_attn(shape: &AttnShape<'_, CudaSlice<u32>>) {
        assert!(shape.kv_heads > 0 && shape.heads.is_multiple_of(shape.kv_heads), "cuda attention: heads not a multiple of kv_heads");
        check_len("cu_q", shape.cu_q.len(), shape.num_seqs + 1);
        check_len("cu_k", shape.cu_k.len(), shape.num_seqs + 1);
        check_len("pos_q", shape.pos_q.len(), shape.nq);
        check_len("pos_k", shape.pos_k.len(), shape.nk);
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Idx = CudaSlice<u32>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn synchronize(&self) {
        Cuda::synchronize(self);
    }

    /// Stream capture in global mode (any unsafe CUDA call of the process fails it); needs the
    /// bf16 mode (cuBLAS's SGEMM has no workspace set up for graphs) and profiling off.
    fn capture_begin(&self) -> Result<(), String> {
        if self.profiling.load(Ordering::Relaxed) {
            return Err("cannot capture while profiling (its events and reads are not recordable)".into());
        }
        if !self.bf16() {
            return Err("capturing needs bf16 GEMMs (--gemm bf16)".into());
        }
        if self.capturing.swap(true, Ordering::Relaxed) {
            return Err("a capture is already in progress".into());
        }
        self.epoch.fetch_add(1, Ordering::Relaxed);
        self.stream.begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL).map_err(|e| {
            self.capturing.store(false, Ordering::Relaxed);
            format!("cuStreamBeginCapture failed: {e:?}")
        })
    }

    fn capture_end(&self) -> Result<Box<dyn StepGraph>, String> {
        if !self.capturing.swap(false, Ordering::Relaxed) {
            return Err("no capture in progress".into());
        }
        self.epoch.fetch_add(1, Ordering::Relaxed);
        let graph = self
            .stream
            .end_capture(drv_sys::CUgraphInstantiate_flags(0))
            .map_err(|e| format!("ending the capture or instantiating its graph failed: {e:?}"))?
            .ok_or("the capture recorded nothing")?;
        graph.upload().map_err(|e| format!("uploading the graph failed: {e:?}"))?;
        let recorded = self.resources.load(Ordering::Relaxed);
        Ok(Box::new(CudaStepGraph { graph, resources: self.resources.clone(), recorded, epoch: self.epoch.clone() }))
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        let (free, total) = self.mem_get_info();
        Some((total.saturating_sub(free), total))
    }

    fn set_profiling(&self, on: bool) -> bool {
        self.synchronize();
        self.profiling.store(on, Ordering::SeqCst);
        true
    }

    fn set_matmul_precision(&self, p: MatmulPrecision) -> bool {
        self.gemm_bf16.store(p == MatmulPrecision::Bf16, Ordering::SeqCst);
        true
    }

    fn take_profile(&self) -> Vec<(String, f64, u64)> {
        self.prof_resolve();
        let mut p = self.prof.lock().unwrap();
        let mut v: Vec<(String, f64, u64)> = p.drain().map(|(k, (t, c))| (k.into_owned(), t, c)).collect();
        v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        v
    }

    // ---- memory ---------------------------------------------------------------------------
    fn zeros(&self, n: usize) -> CudaBuf {
        let _p = self.prof("zeros");
        self.alloc(n, Dtype::F32)
    }

    /// bf16 in bf16 mode, f32 in fp32 mode (the parity reference).
    fn zeros_act(&self, n: usize) -> CudaBuf {
        let _p = self.prof("zeros");
        self.alloc(n, self.act_dtype())
    }

    fn from_f32(&self, data: &[f32]) -> CudaBuf {
        let _p = self.prof("from_f32");
        let mut b = self.alloc(data.len(), Dtype::F32);
        self.write_f32(&mut b, data);
        b
    }

    fn to_f32(&self, buf: &CudaBuf) -> Vec<f32> {
        let _p = self.prof("to_f32");
        self.to_f32_prefix(buf, buf.len())
    }

    fn to_f32_prefix(&self, buf: &CudaBuf, n: usize) -> Vec<f32> {
        let _p = self.prof("to_f32_prefix");
        check_len("buffer", buf.len(), n);
        if n == 0 {
            return Vec::new();
        }
        let src = self.p(buf);
        let cs = self.stream.cu_stream();
        let v = match buf.dtype {
            Dtype::F32 => {
                let mut v = vec![0.0f32; n];
                unsafe { drv_result::memcpy_dtoh_async(&mut v[..], src, cs) }.expect("cuda: device-to-host copy failed");
                self.synchronize();
                v
            }
            Dtype::Bf16 => {
                let mut v = vec![half::bf16::ZERO; n];
                unsafe { drv_result::memcpy_dtoh_async(&mut v[..], src, cs) }.expect("cuda: device-to-host copy failed");
                self.synchronize();
                v.into_iter().map(f32::from).collect()
            }
        };
        v
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }

    fn idx_from(&self, data: &[u32]) -> CudaSlice<u32> {
        self.not_capturing("uploading indices");
        let _p = self.prof("idx_from");
        if data.is_empty() {
            return self.stream.null().expect("cuda: alloc failed");
        }
        self.stream.clone_htod(data).expect("cuda: host-to-device copy failed")
    }

    fn idx_to_vec(&self, idx: &CudaSlice<u32>) -> Vec<u32> {
        let _p = self.prof("idx_to_vec");
        if idx.is_empty() {
            return Vec::new();
        }
        let v = self.stream.clone_dtoh(idx).expect("cuda: device-to-host copy failed");
        self.synchronize();
        v
    }

    fn idx_prefix_async(&self, idx: &CudaSlice<u32>, n: usize) -> Readback<u32> {
        check_len("index buffer", idx.len(), n);
        if n == 0 {
            return Readback::ready(Vec::new());
        }
        self.read_words_async(self.p(idx), n, <[u32]>::to_vec)
    }

    fn to_f64_prefix_async(&self, buf: &CudaBuf, n: usize) -> Readback<f64> {
        check_len("buffer", buf.len(), n);
        if n == 0 || buf.dtype != Dtype::F32 {
            return Readback::ready(self.to_f64_prefix(buf, n));
        }
        self.read_words_async(self.p(buf), n, |w| w.iter().map(|&x| f32::from_bits(x) as f64).collect())
    }

    fn idx_write(&self, idx: &mut CudaSlice<u32>, data: &[u32]) {
        self.not_capturing("uploading indices");
        let _p = self.prof("idx_write");
        check_len("index buffer", idx.len(), data.len());
        if data.is_empty() {
            return;
        }
        self.stream.memcpy_htod(data, &mut idx.slice_mut(..data.len())).expect("cuda: host-to-device copy failed");
    }

    fn write_f32(&self, buf: &mut CudaBuf, data: &[f32]) {
        self.not_capturing("uploading values");
        let _p = self.prof("write_f32");
        check_len("buffer", buf.len(), data.len());
        if data.is_empty() {
            return;
        }
        let dst = self.pm(buf);
        let cs = self.stream.cu_stream();
        // Pageable host memory: the call returns once `data` (or its conversion) has been staged.
        match buf.dtype {
            Dtype::F32 => unsafe { drv_result::memcpy_htod_async(dst, data, cs) },
            Dtype::Bf16 => {
                let h: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                unsafe { drv_result::memcpy_htod_async(dst, &h[..], cs) }
            }
        }
        .expect("cuda: host-to-device copy failed");
    }

    fn fill(&self, buf: &mut CudaBuf, n: usize, value: f32) {
        let _p = self.prof("fill");
        check_len("buffer", buf.len(), n);
        if n == 0 {
            return;
        }
        let p = self.pm(buf);
        if value.to_bits() == 0 {
            self.memset0(p, n * buf.dtype.size());
        } else {
            let name = if buf.is_bf16() { "fill_bf16" } else { "fill_f32" };
            launch!(self, name, self.ew(n), [p, n as i64, value]);
        }
    }

    fn fill_many(&self, bufs: &mut [(&mut CudaBuf, usize)], value: f32) {
        self.fill_many_mt(bufs, value);
    }

    /// Converts when the element types differ.
    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf, n: usize) {
        let _p = self.prof("copy");
        check_len("dst", dst.len(), n);
        check_len("src", src.len(), n);
        if n == 0 {
            return;
        }
        let (dp, sp) = (self.pm(dst), self.p(src));
        match (src.dtype, dst.dtype) {
            (a, b) if a == b => self.memcpy_dtod(dp, sp, n * a.size()),
            (Dtype::F32, _) => launch!(self, "f32_to_bf16", self.ew(n), [sp, dp, n as i64]),
            (Dtype::Bf16, _) => launch!(self, "bf16_to_f32", self.ew(n), [sp, dp, n as i64]),
        }
    }

    // ---- elementwise ----------------------------------------------------------------------
    fn axpy(&self, y: &mut CudaBuf, x: &CudaBuf, alpha: f32, n: usize) {
        let _p = self.prof("axpy");
        Self::f32_only("axpy", &[("y", y), ("x", x)]);
        check_len("y", y.len(), n);
        check_len("x", x.len(), n);
        if n == 0 {
            return;
        }
        let (yp, xp) = (self.pm(y), self.p(x));
        launch!(self, "axpy_f32", self.ew(n), [yp, xp, alpha, n as i64]);
    }

    fn scale(&self, x: &mut CudaBuf, alpha: f32, n: usize) {
        let _p = self.prof("scale");
        Self::f32_only("scale", &[("x", x)]);
        check_len("x", x.len(), n);
        if n == 0 {
            return;
        }
        let xp = self.pm(x);
        launch!(self, "scale_f32", self.ew(n), [xp, alpha, n as i64]);
    }

    fn sum_squares(&self, x: &CudaBuf, n: usize) -> f64 {
        let _p = self.prof("sum_squares");
        Self::f32_only("sum_squares", &[("x", x)]);
        check_len("x", x.len(), n);
        if n == 0 {
            return 0.0;
        }
        let blocks = sumsq_blocks(n);
        let partial = self.scratch(Slot::SumsqPartial, blocks * 8);
        let out = self.scratch(Slot::SumsqOut, 8);
        let xp = self.p(x);
        launch!(self, "sumsq_partial_f32", cfg((blocks as u32, 1, 1), EW_THREADS, 0), [xp, n as i64, partial]);
        launch!(self, "sumsq_final", cfg((1, 1, 1), 1024, 0), [partial, blocks as i32, out]);
        let mut r = [0.0f64];
        unsafe { drv_result::memcpy_dtoh_async(&mut r[..], out, self.stream.cu_stream()) }
            .expect("cuda: device-to-host copy failed");
        self.synchronize();
        r[0]
    }

    fn sum_squares_many(&self, xs: &[(&CudaBuf, usize)]) -> Vec<f64> {
        self.sum_squares_many_mt(xs)
    }

    fn clip_scalars(&self, xs: &[(&CudaBuf, usize)], max_norm: f64, sc: &mut CudaBuf) {
        self.clip_scalars_mt(xs, max_norm, sc);
    }

    // ---- embedding ------------------------------------------------------------------------
    fn embedding_fwd(&self, out: &mut CudaBuf, table: &CudaBuf, ids: &CudaSlice<u32>, n: usize, d: usize) {
        let _p = self.prof("embedding_fwd");
        Self::f32_only("embedding_fwd", &[("out", out), ("table", table)]);
        self.gather_rows(out, table, ids, n, d);
    }

    fn embedding_bwd(&self, dtable: &mut CudaBuf, dout: &CudaBuf, ids: &CudaSlice<u32>, n: usize, d: usize) {
        let _p = self.prof("embedding_bwd");
        Self::f32_only("embedding_bwd", &[("dtable", dtable), ("dout", dout)]);
        self.scatter_add_rows(dtable, dout, ids, n, d);
    }

    // ---- linear ---------------------------------------------------------------------------
    fn matmul_fwd(&self, out: &mut CudaBuf, x: &CudaBuf, w: &CudaBuf, n: usize, k: usize, m: usize) {
        let _p = self.prof("matmul_fwd");
        if n == 0 || m == 0 {
            return;
        }
        check_len("out", out.len(), n * m);
        check_len("x", x.len(), n * k);
        check_len("w", w.len(), m * k);
        if k == 0 {
            self.fill(out, n * m, 0.0);
            return;
        }
        if self.bf16_gemm(&[x, w, out]) {
            self.matmul_fwd_many(x, n, k, &mut [(out, w, m)]);
            return;
        }
        // Column-major view: outᵀ[m, n] = w[m, k] · xᵀ[k, n]; the row-major w is a column-major
        // [k, m] matrix (op T), the row-major x a column-major [k, n] one.
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let (wp, xp, op) = (self.p(w), self.p(x), self.pm(out));
        self.gemm_f32(CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, wp, k, xp, k, 0.0, op, m);
    }

    fn matmul_bwd(
        &self,
        dx: Option<&mut CudaBuf>,
        dw: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        k: usize,
        m: usize,
    ) {
        let _p = self.prof("matmul_bwd");
        if k == 0 || n == 0 || m == 0 {
            return;
        }
        check_len("dout", dout.len(), n * m);
        check_len("x", x.len(), n * k);
        check_len("w", w.len(), m * k);
        check_len("dw", dw.len(), m * k);
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        if self.bf16_gemm(&[x, w, dout]) || dx.as_deref().is_some_and(|d| d.is_bf16()) {
            self.matmul_bwd_many(dx, false, x, n, k, &mut [MatmulGrad { dw, dout, w, m }]);
            return;
        }
        if let Some(dx) = dx {
            self.matmul_bwd_dx(dx, false, dout, w, n, k, m);
        }
        // dwᵀ[k, m] += xᵀ[k, n] · dout[n, m] (doutᵀ is column-major [m, n], op T)
        let (xp, gp, dwp) = (self.p(x), self.p(dout), self.pm(dw));
        self.gemm_f32(CUBLAS_OP_N, CUBLAS_OP_T, k, m, n, xp, k, gp, m, 1.0, dwp, k);
    }

    fn matmul_bwd_dx(&self, dx: &mut CudaBuf, dx_set: bool, dout: &CudaBuf, w: &CudaBuf, n: usize, k: usize, m: usize) {
        let _p = self.prof("matmul_bwd");
        if k == 0 || n == 0 {
            return;
        }
        check_len("dx", dx.len(), n * k);
        if m == 0 {
            if dx_set {
                self.fill(dx, n * k, 0.0);
            }
            return;
        }
        check_len("dout", dout.len(), n * m);
        check_len("w", w.len(), m * k);
        use blas_sys::cublasOperation_t::CUBLAS_OP_N;
        let beta = if dx_set { 0.0 } else { 1.0 };
        // dxᵀ[k, n] (+)= w-as-[k, m] · doutᵀ[m, n] (matmul_bwd_many runs the same GEMM per weight)
        if self.bf16_gemm(&[w, dout, dx]) {
            let (wb, gb) = (self.weight_bf16(w), self.bf16_operand(Slot::BfC, dout, n * m));
            let dt = dx.dtype;
            let dxp = self.pm(dx);
            self.gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_N, k, n, m, wb, k, gb, m, beta, dxp, dt, k);
        } else {
            let (wp, gp, dxp) = (self.p(w), self.p(dout), self.pm(dx));
            self.gemm_f32(CUBLAS_OP_N, CUBLAS_OP_N, k, n, m, wp, k, gp, m, beta, dxp, k);
        }
    }

    /// bf16 mode: one cuBLASLt GEMM whose epilogue adds `res` (no separate pass over the
    /// residual stream); fp32 mode: the reference path (SGEMM, then the add).
    #[allow(clippy::too_many_arguments)]
    fn matmul_fwd_residual(&self, out: &mut CudaBuf, x: &CudaBuf, w: &CudaBuf, res: &CudaBuf, n: usize, k: usize, m: usize) {
        if !self.bf16_gemm(&[x, w, out, res]) || n == 0 || m == 0 || k == 0 || out.dtype != res.dtype {
            return matmul_fwd_residual_unfused(self, out, x, w, res, n, k, m);
        }
        let _p = self.prof("matmul_fwd");
        check_len("out", out.len(), n * m);
        check_len("res", res.len(), n * m);
        check_len("x", x.len(), n * k);
        check_len("w", w.len(), m * k);
        // Column-major view as in matmul_fwd: outᵀ[m, n] = w-as-[k, m]ᵀ · xᵀ[k, n] + resᵀ.
        let xb = self.bf16_operand(Slot::BfB, x, n * k);
        let wb = self.weight_bf16(w);
        let shape = GemmShape::new(true, false, m, n, k, out.dtype, GemmAdd::Residual).with_ld(k, k, m);
        let (rp, op) = (self.p(res), self.pm(out));
        self.lt_gemm(shape, wb, xb, rp, op);
    }

    /// bf16 mode (or bf16 buffers): one bf16 operand of `x` for all weights (no conversion when
    /// `x` is a bf16 activation), cached bf16 weights, outputs stored as their buffers' type;
    /// fp32 mode: one SGEMM per weight.
    fn matmul_fwd_many(&self, x: &CudaBuf, n: usize, k: usize, outs: &mut [(&mut CudaBuf, &CudaBuf, usize)]) {
        let any_bf16 = outs.iter().any(|(o, w, _)| o.is_bf16() || w.is_bf16());
        if !(self.bf16_gemm(&[x]) || any_bf16) || n == 0 || k == 0 {
            return matmul_fwd_each(self, x, n, k, outs);
        }
        let _p = self.prof("matmul_fwd");
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        check_len("x", x.len(), n * k);
        let xb = self.bf16_operand(Slot::BfB, x, n * k);
        for (out, w, m) in outs.iter_mut() {
            let m = *m;
            check_len("out", out.len(), n * m);
            check_len("w", w.len(), m * k);
            if m == 0 {
                continue;
            }
            let wb = self.weight_bf16(w);
            let ot = out.dtype;
            let op = self.pm(*out);
            self.gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, wb, k, xb, k, 0.0, op, ot, m);
        }
    }

    /// bf16 mode (or bf16 buffers): `x` and each `dout` as bf16 operands (converted only when
    /// f32), cached bf16 weights; the first `dx` product overwrites (`beta = 0`) when `dx_set`.
    /// fp32 mode: the reference path (zero fill, then accumulating SGEMMs).
    fn matmul_bwd_many(&self, mut dx: Option<&mut CudaBuf>, dx_set: bool, x: &CudaBuf, n: usize, k: usize, items: &mut [MatmulGrad<'_, Self>]) {
        let any_bf16 = dx.as_deref().is_some_and(|d| d.is_bf16()) || items.iter().any(|it| it.dout.is_bf16() || it.w.is_bf16());
        if !(self.bf16_gemm(&[x]) || any_bf16) {
            return matmul_bwd_each(self, dx, dx_set, x, n, k, items);
        }
        let _p = self.prof("matmul_bwd");
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        if let Some(dx) = dx.as_deref() {
            check_len("dx", dx.len(), n * k);
        }
        let mut dx_written = !dx_set;
        let ms: Vec<usize> = items.iter().map(|it| it.m).collect();
        if n > 0 && k > 0 && fuse_gemm(n, k, &ms) {
            // The output gradients packed side by side into bf16 [n, Σm]: one GEMM for dx on the
            // stacked weights, one for the stacked weight gradients, added to each dw.
            check_len("x", x.len(), n * k);
            let xb = self.bf16_operand(Slot::BfB, x, n * k);
            let total: usize = ms.iter().sum();
            let packed = self.scratch(Slot::BfC, n * total * 2);
            let mut col = 0;
            for it in items.iter() {
                check_len("dout", it.dout.len(), n * it.m);
                check_len("w", it.w.len(), it.m * k);
                check_len("dw", it.dw.len(), it.m * k);
                Self::f32_only("matmul_bwd", &[("dw", &*it.dw)]);
                self.copy_block(packed + (col * 2) as u64, total, true, self.p(it.dout), it.m, it.dout.is_bf16(), n, it.m);
                col += it.m;
            }
            let mut cat: Vec<(&mut CudaBuf, &CudaBuf, usize)> = items.iter_mut().map(|it| (&mut *it.dw, it.w, it.m)).collect();
            self.gemm_bwd_cat(dx, dx_written, xb, packed, n, k, &mut cat);
            return;
        }
        if n > 0 && k > 0 {
            check_len("x", x.len(), n * k);
            let xb = self.bf16_operand(Slot::BfB, x, n * k);
            for it in items.iter_mut() {
                let m = it.m;
                check_len("dout", it.dout.len(), n * m);
                check_len("w", it.w.len(), m * k);
                check_len("dw", it.dw.len(), m * k);
                Self::f32_only("matmul_bwd", &[("dw", it.dw)]);
                if m == 0 {
                    continue;
                }
                let gb = self.bf16_operand(Slot::BfC, it.dout, n * m);
                if let Some(dx) = dx.as_deref_mut() {
                    // dxᵀ[k, n] (+)= w-as-[k, m] · doutᵀ[m, n]
                    let wb = self.weight_bf16(it.w);
                    let dt = dx.dtype;
                    let dxp = self.pm(dx);
                    self.gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_N, k, n, m, wb, k, gb, m, if dx_written { 1.0 } else { 0.0 }, dxp, dt, k);
                    dx_written = true;
                }
                // dwᵀ[k, m] += xᵀ[k, n] · dout[n, m]
                let dwp = self.pm(it.dw);
                self.gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_T, k, m, n, xb, k, gb, m, 1.0, dwp, Dtype::F32, k);
            }
        }
        if !dx_written {
            if let Some(dx) = dx {
                self.fill(dx, n * k, 0.0);
            }
        }
    }

    /// bf16 mode: one GEMM on the weights stacked by rows (their cached bf16 copy), out `[n, Σm]`;
    /// fp32 mode: one SGEMM per weight into its columns.
    fn matmul_fwd_cat(&self, out: &mut CudaBuf, x: &CudaBuf, n: usize, k: usize, ws: &[(&CudaBuf, usize)]) {
        let _p = self.prof("matmul_fwd");
        let total: usize = ws.iter().map(|&(_, m)| m).sum();
        if n == 0 || total == 0 {
            return;
        }
        check_len("out", out.len(), n * total);
        check_len("x", x.len(), n * k);
        for (w, m) in ws {
            check_len("w", w.len(), m * k);
        }
        if k == 0 {
            self.fill(out, n * total, 0.0);
            return;
        }
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let op = self.pm(out);
        if self.bf16_gemm(&[x, out]) || ws.iter().any(|(w, _)| w.is_bf16()) {
            // outᵀ[Σm, n] = Wcat-as-[k, Σm]ᵀ · xᵀ[k, n]
            let xb = self.bf16_operand(Slot::BfB, x, n * k);
            let wcat = self.weights_bf16_concat(ws, k);
            self.gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, total, n, k, wcat, k, xb, k, 0.0, op, out.dtype, total);
            return;
        }
        let mut col = 0;
        for &(w, m) in ws {
            self.gemm_f32(CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, self.p(w), k, self.p(x), k, 0.0, op + (col * 4) as u64, total);
            col += m;
        }
    }

    /// bf16 mode: [`Cuda::gemm_bwd_cat`] on `dout` as it is (no packing); fp32 mode: SGEMMs per
    /// weight on its columns.
    fn matmul_bwd_cat(
        &self,
        dx: Option<&mut CudaBuf>,
        dx_set: bool,
        x: &CudaBuf,
        dout: &CudaBuf,
        n: usize,
        k: usize,
        items: &mut [(&mut CudaBuf, &CudaBuf, usize)],
    ) {
        let _p = self.prof("matmul_bwd");
        let total: usize = items.iter().map(|it| it.2).sum();
        if let Some(dx) = dx.as_deref() {
            check_len("dx", dx.len(), n * k);
        }
        check_len("x", x.len(), n * k);
        check_len("dout", dout.len(), n * total);
        for (dw, w, m) in items.iter() {
            check_len("w", w.len(), m * k);
            check_len("dw", dw.len(), m * k);
            Self::f32_only("matmul_bwd_cat", &[("dw", &**dw)]);
        }
        if n == 0 || k == 0 || total == 0 {
            if let (true, Some(dx)) = (dx_set, dx) {
                self.fill(dx, n * k, 0.0);
            }
            return;
        }
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let bf16 = self.bf16_gemm(&[x, dout]) || dx.as_deref().is_some_and(|d| d.is_bf16()) || items.iter().any(|it| it.1.is_bf16());
        if bf16 {
            let gb = self.bf16_operand(Slot::BfC, dout, n * total);
            let xb = self.bf16_operand(Slot::BfB, x, n * k);
            self.gemm_bwd_cat(dx, !dx_set, xb, gb, n, k, items);
            return;
        }
        if let Some(dx) = dx {
            if dx_set {
                self.fill(dx, n * k, 0.0);
            }
            let dxp = self.pm(dx);
            let mut col = 0;
            for (_, w, m) in items.iter() {
                let gp = self.p(dout) + (col * 4) as u64;
                self.gemm_f32(CUBLAS_OP_N, CUBLAS_OP_N, k, n, *m, self.p(*w), k, gp, total, 1.0, dxp, k);
                col += *m;
            }
        }
        let xp = self.p(x);
        let mut col = 0;
        for (dw, _, m) in items.iter_mut() {
            let (gp, dwp) = (self.p(dout) + (col * 4) as u64, self.pm(*dw));
            self.gemm_f32(CUBLAS_OP_N, CUBLAS_OP_T, k, *m, n, xp, k, gp, total, 1.0, dwp, k);
            col += *m;
        }
    }

    // ---- normalisation --------------------------------------------------------------------
    fn rmsnorm_fwd(&self, out: &mut CudaBuf, rstd: &mut CudaBuf, x: &CudaBuf, w: &CudaBuf, n: usize, d: usize, eps: f32) {
        let _p = self.prof("rmsnorm_fwd");
        if n == 0 || d == 0 {
            return;
        }
        check_len("out", out.len(), n * d);
        check_len("rstd", rstd.len(), n);
        check_len("x", x.len(), n * d);
        check_len("w", w.len(), d);
        Self::f32_only("rmsnorm_fwd", &[("rstd", rstd), ("x", x), ("w", w)]);
        // A bf16 output is the bf16 mode's activation of the f32 residual stream.
        let suffix = if out.is_bf16() { "to_bf16" } else { "f32" };
        let (op, rp, xp, wp) = (self.pm(out), self.pm(rstd), self.p(x), self.p(w));
        if let Some(v) = Self::rms_warp_v(d, &[xp, wp], op, 4 * out.dtype.size() as u64) {
            // One row per warp (kernels/rows.cu).
            let blocks = n.div_ceil(RMS_FWD_WARPS).min(i32::MAX as usize) as u32;
            let c = cfg((blocks, 1, 1), 32 * RMS_FWD_WARPS as u32, 0);
            launch!(self, &format!("rmsnorm_fwd_v{v}_{suffix}"), c, [op, rp, xp, wp, n as i32, d as i32, eps]);
            return;
        }
        launch!(
            self,
            &format!("rmsnorm_fwd_{suffix}"),
            cfg((rows_grid(n), 1, 1), row_threads(d, 1024), 0),
            [op, rp, xp, wp, n as i32, d as i32, eps]
        );
    }

    fn rmsnorm_bwd(
        &self,
        dx: &mut CudaBuf,
        dw: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        d: usize,
    ) {
        let _p = self.prof("rmsnorm_bwd");
        self.rmsnorm_bwd_into(dx, None, dw, dout, x, w, rstd, n, d);
    }

    fn rmsnorm_bwd_mirrored(
        &self,
        dx: &mut CudaBuf,
        dx_act: &mut CudaBuf,
        dw: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        d: usize,
    ) {
        let _p = self.prof("rmsnorm_bwd");
        check_len("dx_act", dx_act.len(), n * d);
        if !dx_act.is_bf16() {
            self.rmsnorm_bwd_into(dx, None, dw, dout, x, w, rstd, n, d);
            return self.copy(dx_act, dx, n * d);
        }
        self.rmsnorm_bwd_into(dx, Some(dx_act), dw, dout, x, w, rstd, n, d);
    }

    // ---- rotary embedding -----------------------------------------------------------------
    fn rope_fwd(&self, x: &mut CudaBuf, pos: &CudaSlice<u32>, n: usize, heads: usize, head_dim: usize, theta: f32) {
        let _p = self.prof("rope_fwd");
        self.rope(x, pos, n, heads, head_dim, theta, 1.0);
    }

    fn rope_bwd(&self, dx: &mut CudaBuf, pos: &CudaSlice<u32>, n: usize, heads: usize, head_dim: usize, theta: f32) {
        let _p = self.prof("rope_bwd");
        self.rope(dx, pos, n, heads, head_dim, theta, -1.0);
    }

    /// One launch of the vector kernel for both, the angles computed once per (row, pair).
    #[allow(clippy::too_many_arguments)]
    fn rope_fwd_qk(&self, q: &mut CudaBuf, k: &mut CudaBuf, pos: &CudaSlice<u32>, n: usize, heads: usize, kv_heads: usize, head_dim: usize, theta: f32) {
        let _p = self.prof("rope_fwd");
        let one_launch = n > 0 && head_dim > 0 && heads > 0 && kv_heads > 0 && {
            check_len("q", q.len(), n * heads * head_dim);
            check_len("k", k.len(), n * kv_heads * head_dim);
            check_len("pos", pos.len(), n);
            self.rope_vec(q, heads, Some((k, kv_heads)), pos, n, head_dim, theta, 1.0)
        };
        if !one_launch {
            self.rope(q, pos, n, heads, head_dim, theta, 1.0);
            self.rope(k, pos, n, kv_heads, head_dim, theta, 1.0);
        }
    }

    // ---- attention ------------------------------------------------------------------------
    fn attention_fwd(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: &AttnShape<'_, CudaSlice<u32>>,
    ) {
        let _p = self.prof("attention_fwd");
        self.attention_fwd_into(out, None, lse, q, k, v, shape);
    }

    fn attention_fwd_mirrored(
        &self,
        out: &mut CudaBuf,
        out_act: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: &AttnShape<'_, CudaSlice<u32>>,
    ) {
        let n = shape.nq * shape.heads * shape.head_dim;
        check_len("out_act", out_act.len(), n);
        let mirrored = {
            let _p = self.prof("attention_fwd");
            self.attention_fwd_into(out, Some(out_act), lse, q, k, v, shape)
        };
        if !mirrored {
            self.copy(out_act, out, n);
        }
    }

    fn attention_bwd(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: &AttnShape<'_, CudaSlice<u32>>,
    ) {
        let _p = self.prof("attention_bwd");
        self.attention_bwd_into(dq, dk, dv, dout, out, lse, q, k, v, shape, None, false);
    }

    fn attention_bwd_rope_dq(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: &AttnShape<'_, CudaSlice<u32>>,
        theta: f32,
        kv_set: bool,
    ) {
        let _p = self.prof("attention_bwd");
        if !shape.is_empty() && self.attention_bwd_fused(shape.head_dim, &[self.p(dq), self.p(dk), self.p(dv)]) {
            return self.attention_bwd_into(dq, dk, dv, dout, out, lse, q, k, v, shape, Some(DqRope { theta, packed: None }), kv_set);
        }
        let n = shape.nq * shape.heads * shape.head_dim;
        self.fill(dq, n, 0.0);
        self.attention_bwd_into(dq, dk, dv, dout, out, lse, q, k, v, shape, None, kv_set);
        self.rope_bwd(dq, shape.pos_q, shape.nq, shape.heads, shape.head_dim, theta);
    }

    /// The fused flash backward writes dq through the inverse rotation straight into its columns
    /// of `dkvq`, then one pass rotates dk and packs dk and dv (`attn_pack_kv_rope`); other
    /// configurations take the unpacked ops.
    fn attention_bwd_packed(&self, dkvq: &mut CudaBuf, g: AttnGrads<'_, Self>, x: &AttnBwdInputs<'_, Self>, theta: f32) {
        let _p = self.prof("attention_bwd");
        let shape = x.shape;
        let (n, hd, kvh) = (shape.nq, shape.head_dim, shape.kv_heads);
        let (qd, kvd) = (shape.heads * hd, kvh * hd);
        let packed = !shape.is_empty()
            && shape.nq == shape.nk
            && dkvq.is_bf16()
            && g.dk.dtype == Dtype::F32
            && g.dv.dtype == Dtype::F32
            && self.attention_bwd_fused(hd, &[self.p(g.dq), self.p(g.dk), self.p(g.dv)]);
        if !packed {
            return attention_bwd_packed_unfused(self, dkvq, g, x, theta);
        }
        let ld = 2 * kvd + qd;
        check_len("dkvq", dkvq.len(), n * ld);
        let base = self.pm(dkvq);
        let rope = DqRope { theta, packed: Some((base + (2 * kvd * 2) as u64, ld)) };
        let AttnGrads { dq, dk, dv } = g;
        self.attention_bwd_into(dq, dk, dv, x.dout, x.out, x.lse, x.q, x.k, x.v, shape, Some(rope), true);
        let freqs = RopeFreqs::new(hd, theta);
        let (dkp, dvp, pk) = (self.p(dk), self.p(dv), self.p(shape.pos_k));
        launch!(self, "attn_pack_kv_rope", self.ew(n * hd / 2), [base, ld as i32, dkp, dvp, pk, freqs, n as i32, kvh as i32, hd as i32]);
    }

    fn copy_cols(&self, dst: &mut CudaBuf, ld: usize, col: usize, src: &CudaBuf, rows: usize, cols: usize) {
        let _p = self.prof("copy");
        if rows == 0 || cols == 0 {
            return;
        }
        assert!(col + cols <= ld, "copy_cols: columns {col}..{} past the row of {ld}", col + cols);
        check_len("dst", dst.len(), (rows - 1) * ld + col + cols);
        check_len("src", src.len(), rows * cols);
        let dst_bf16 = dst.is_bf16();
        let dp = self.pm(dst) + (col * dst.dtype.size()) as u64;
        self.copy_block(dp, ld, dst_bf16, self.p(src), cols, src.is_bf16(), rows, cols);
    }

    // ---- activations ----------------------------------------------------------------------
    fn swiglu_fwd(&self, out: &mut CudaBuf, gate_up: &CudaBuf, rows: usize, f: usize) {
        let _p = self.prof("swiglu_fwd");
        let n = rows * f;
        if n == 0 {
            return;
        }
        check_len("out", out.len(), n);
        check_len("gate_up", gate_up.len(), 2 * n);
        let name = Self::typed("swiglu_fwd", &[("out", out), ("gate_up", gate_up)]);
        let c = self.ew16(n, out.dtype);
        let (op, gp) = (self.pm(out), self.p(gate_up));
        launch!(self, &name, c, [op, gp, f as i32, n as i64]);
    }

    fn swiglu_bwd(&self, dgate_up: &mut CudaBuf, dout: &CudaBuf, gate_up: &CudaBuf, rows: usize, f: usize) {
        let _p = self.prof("swiglu_bwd");
        self.swiglu_bwd_impl(dgate_up, None, dout, gate_up, rows, f, true);
    }

    fn swiglu_bwd_set(&self, dgate_up: &mut CudaBuf, dout: &CudaBuf, gate_up: &CudaBuf, rows: usize, f: usize) {
        let _p = self.prof("swiglu_bwd");
        self.swiglu_bwd_impl(dgate_up, None, dout, gate_up, rows, f, false);
    }

    fn swiglu_bwd_recompute(&self, dgate_up: &mut CudaBuf, out: &mut CudaBuf, dout: &CudaBuf, gate_up: &CudaBuf, rows: usize, f: usize) {
        let _p = self.prof("swiglu_bwd");
        self.swiglu_bwd_impl(dgate_up, Some(out), dout, gate_up, rows, f, false);
    }

    fn gelu_fwd(&self, out: &mut CudaBuf, x: &CudaBuf, n: usize) {
        let _p = self.prof("gelu_fwd");
        Self::f32_only("gelu_fwd", &[("out", out), ("x", x)]);
        if n == 0 {
            return;
        }
        check_len("out", out.len(), n);
        check_len("x", x.len(), n);
        let (op, xp) = (self.pm(out), self.p(x));
        launch!(self, "gelu_fwd_f32", self.ew(n), [op, xp, n as i64]);
    }

    fn gelu_bwd(&self, dx: &mut CudaBuf, dout: &CudaBuf, x: &CudaBuf, n: usize) {
        let _p = self.prof("gelu_bwd");
        Self::f32_only("gelu_bwd", &[("dx", dx), ("dout", dout), ("x", x)]);
        if n == 0 {
            return;
        }
        check_len("dx", dx.len(), n);
        check_len("dout", dout.len(), n);
        check_len("x", x.len(), n);
        let (dp, gp, xp) = (self.pm(dx), self.p(dout), self.p(x));
        launch!(self, "gelu_bwd_f32", self.ew(n), [dp, gp, xp, n as i64]);
    }

    fn gate_fwd(&self, out: &mut CudaBuf, x: &CudaBuf, f: GateFn, alpha: f32, n: usize) {
        let _p = self.prof("gate_fwd");
        Self::f32_only("gate_fwd", &[("out", out), ("x", x)]);
        if n == 0 {
            return;
        }
        check_len("out", out.len(), n);
        check_len("x", x.len(), n);
        let (op, xp) = (self.pm(out), self.p(x));
        launch!(self, "gate_fwd_f32", self.ew(n), [op, xp, gate_code(f), alpha, n as i64]);
    }

    fn gate_bwd(&self, dx: &mut CudaBuf, dout: &CudaBuf, x: &CudaBuf, f: GateFn, alpha: f32, n: usize) {
        let _p = self.prof("gate_bwd");
        Self::f32_only("gate_bwd", &[("dx", dx), ("dout", dout), ("x", x)]);
        if n == 0 {
            return;
        }
        check_len("dx", dx.len(), n);
        check_len("dout", dout.len(), n);
        check_len("x", x.len(), n);
        let (dp, gp, xp) = (self.pm(dx), self.p(dout), self.p(x));
        launch!(self, "gate_bwd_f32", self.ew(n), [dp, gp, xp, gate_code(f), alpha, n as i64]);
    }

    fn softmax_fwd(&self, out: &mut CudaBuf, x: &CudaBuf, n: usize, c: usize) {
        let _p = self.prof("softmax_fwd");
        Self::f32_only("softmax_fwd", &[("out", out), ("x", x)]);
        if n == 0 || c == 0 {
            return;
        }
        check_len("out", out.len(), n * c);
        check_len("x", x.len(), n * c);
        let (op, xp) = (self.pm(out), self.p(x));
        launch!(self, "softmax_fwd_f32", cfg((rows_grid(n), 1, 1), row_threads(c, 1024), 0), [op, xp, n as i32, c as i32]);
    }

    fn softmax_bwd(&self, dx: &mut CudaBuf, dout: &CudaBuf, out: &CudaBuf, n: usize, c: usize) {
        let _p = self.prof("softmax_bwd");
        Self::f32_only("softmax_bwd", &[("dx", dx), ("dout", dout), ("out", out)]);
        if n == 0 || c == 0 {
            return;
        }
        check_len("dx", dx.len(), n * c);
        check_len("dout", dout.len(), n * c);
        check_len("out", out.len(), n * c);
        let (dp, gp, op) = (self.pm(dx), self.p(dout), self.p(out));
        launch!(self, "softmax_bwd_f32", cfg((rows_grid(n), 1, 1), row_threads(c, 1024), 0), [dp, gp, op, n as i32, c as i32]);
    }

    // ---- token subsets --------------------------------------------------------------------
    fn gather_rows(&self, out: &mut CudaBuf, x: &CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize) {
        let _p = self.prof("gather_rows");
        Self::f32_only("gather_rows", &[("out", out), ("x", x)]);
        if m == 0 || d == 0 {
            return;
        }
        check_len("out", out.len(), m * d);
        check_len("idx", idx.len(), m);
        let (op, xp, ip) = (self.pm(out), self.p(x), self.p(idx));
        launch!(self, "gather_rows_f32", cfg((rows_grid(m), 1, 1), row_threads(d, 256), 0), [op, xp, ip, m as i32, d as i32]);
    }

    fn scatter_add_rows(&self, dx: &mut CudaBuf, dout: &CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize) {
        self.scatter_add_rows_into(dx, dout, idx, m, d, false);
    }

    fn scatter_add_rows_distinct(&self, dx: &mut CudaBuf, dout: &CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize) {
        self.scatter_add_rows_into(dx, dout, idx, m, d, true);
    }

    fn scatter_add_scaled(&self, h: &mut CudaBuf, y: &CudaBuf, scale: &CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize) {
        self.scatter_add_scaled_into(h, y, scale, idx, m, d, false);
    }

    fn scatter_add_scaled_distinct(&self, h: &mut CudaBuf, y: &CudaBuf, scale: &CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize) {
        self.scatter_add_scaled_into(h, y, scale, idx, m, d, true);
    }

    fn scatter_add_scaled_bwd(
        &self,
        dy: &mut CudaBuf,
        dscale: &mut CudaBuf,
        dh: &CudaBuf,
        y: &CudaBuf,
        scale: &CudaBuf,
        idx: &CudaSlice<u32>,
        m: usize,
        d: usize,
    ) {
        let _p = self.prof("scatter_add_scaled_bwd");
        Self::f32_only("scatter_add_scaled_bwd", &[("dy", dy), ("dscale", dscale), ("dh", dh), ("y", y), ("scale", scale)]);
        if m == 0 || d == 0 {
            return;
        }
        check_len("dy", dy.len(), m * d);
        check_len("dscale", dscale.len(), m);
        check_len("y", y.len(), m * d);
        check_len("scale", scale.len(), m);
        check_len("idx", idx.len(), m);
        let (dyp, dsp, dhp, yp, sp, ip) = (self.pm(dy), self.pm(dscale), self.p(dh), self.p(y), self.p(scale), self.p(idx));
        launch!(
            self,
            "scatter_add_scaled_bwd_f32",
            cfg((rows_grid(m), 1, 1), row_threads(d, 256), 0),
            [dyp, dsp, dhp, yp, sp, ip, m as i32, d as i32]
        );
    }

    fn scatter_rows(&self, x: &mut CudaBuf, y: &CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize) {
        self.scatter_rows_into(x, y, idx, m, d, false);
    }

    fn scatter_rows_distinct(&self, x: &mut CudaBuf, y: &CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize) {
        self.scatter_rows_into(x, y, idx, m, d, true);
    }

    fn scatter_rows_bwd(&self, dy: &mut CudaBuf, dx: &mut CudaBuf, idx: &CudaSlice<u32>, m: usize, d: usize) {
        let _p = self.prof("scatter_rows_bwd");
        Self::f32_only("scatter_rows_bwd", &[("dy", dy), ("dx", dx)]);
        if m == 0 || d == 0 {
            return;
        }
        check_len("dy", dy.len(), m * d);
        check_len("idx", idx.len(), m);
        let (dyp, dxp, ip) = (self.pm(dy), self.pm(dx), self.p(idx));
        let c = cfg((rows_grid(m), 1, 1), row_threads(d, 256), 0);
        launch!(self, "gather_add_rows_f32", c, [dyp, dxp, ip, m as i32, d as i32]);
        launch!(self, "zero_rows_f32", c, [dxp, ip, m as i32, d as i32]);
    }

    fn index_fill(&self, x: &mut CudaBuf, idx: &CudaSlice<u32>, m: usize, value: f32) {
        let _p = self.prof("index_fill");
        Self::f32_only("index_fill", &[("x", x)]);
        if m == 0 {
            return;
        }
        check_len("idx", idx.len(), m);
        let (xp, ip) = (self.pm(x), self.p(idx));
        launch!(self, "index_fill_f32", self.ew(m), [xp, ip, m as i32, value]);
    }

    fn topk_segments(&self, out: &mut CudaSlice<u32>, scores: &CudaBuf, cu: &CudaSlice<u32>, num_seqs: usize, k: usize) {
        let _p = self.prof("topk_segments");
        Self::f32_only("topk_segments", &[("scores", scores)]);
        if k == 0 || num_seqs == 0 {
            return;
        }
        check_len("out", out.len(), num_seqs * k);
        check_len("cu", cu.len(), num_seqs + 1);
        // A segment lies inside `scores`, so its padded length is at most next_pow2(len).
        let max_p = scores.len().max(1).next_power_of_two();
        let smem_keys = self.topk_smem_keys.min(max_p);
        let gscratch = if max_p > smem_keys { self.scratch(Slot::Topk, 2 * scores.len() * 8) } else { 0 };
        let (op, sp, cp) = (self.pm(out), self.p(scores), self.p(cu));
        launch!(
            self,
            "topk_segments_f32",
            cfg((num_seqs as u32, 1, 1), 1024, (smem_keys * 8) as u32),
            [op, sp, cp, k as i32, gscratch, smem_keys as i32]
        );
    }

    fn subset_rows(&self, idx: &mut CudaSlice<u32>, pos: &mut CudaSlice<u32>, parent: &CudaSlice<u32>, local: &CudaSlice<u32>, m: usize, seq_len: usize) {
        let _p = self.prof("subset_rows");
        if m == 0 {
            return;
        }
        assert!(seq_len > 0 && seq_len <= u32::MAX as usize, "subset_rows: seq_len {seq_len} out of range");
        check_len("idx", idx.len(), m);
        check_len("pos", pos.len(), m);
        check_len("local", local.len(), m);
        let (ip, pp, parp, lp) = (self.pm(idx), self.pm(pos), self.p(parent), self.p(local));
        launch!(self, "subset_rows_u32", self.ew(m), [ip, pp, parp, lp, m as i64, seq_len as u32]);
    }

    // ---- losses ---------------------------------------------------------------------------
    /// f32 losses from f32 or bf16 logits (the bf16 mode's LM head writes bf16).
    fn cross_entropy_fwd(&self, loss: &mut CudaBuf, logits: &CudaBuf, targets: &CudaSlice<u32>, n: usize, vocab: usize) {
        let _p = self.prof("cross_entropy_fwd");
        Self::f32_only("cross_entropy_fwd", &[("loss", loss)]);
        if n == 0 {
            return;
        }
        assert!(vocab > 0);
        check_len("loss", loss.len(), n);
        check_len("logits", logits.len(), n * vocab);
        check_len("targets", targets.len(), n);
        let (lp, xp, tp) = (self.pm(loss), self.p(logits), self.p(targets));
        launch!(
            self,
            if logits.is_bf16() { "cross_entropy_fwd_bf16" } else { "cross_entropy_fwd_f32" },
            cfg((rows_grid(n), 1, 1), row_threads(vocab, 1024), 0),
            [lp, xp, tp, n as i32, vocab as i32]
        );
    }

    fn cross_entropy_bwd(&self, dlogits: &mut CudaBuf, logits: &CudaBuf, targets: &CudaSlice<u32>, scale: f32, n: usize, vocab: usize) {
        let _p = self.prof("cross_entropy_bwd");
        Self::f32_only("cross_entropy_bwd", &[("dlogits", dlogits), ("logits", logits)]);
        if n == 0 {
            return;
        }
        assert!(vocab > 0);
        check_len("dlogits", dlogits.len(), n * vocab);
        check_len("logits", logits.len(), n * vocab);
        check_len("targets", targets.len(), n);
        let (dp, xp, tp) = (self.pm(dlogits), self.p(logits), self.p(targets));
        launch!(
            self,
            "cross_entropy_bwd_f32",
            cfg((rows_grid(n), 1, 1), row_threads(vocab, 1024), 0),
            [dp, xp, tp, scale, n as i32, vocab as i32]
        );
    }

    /// One kernel: f32 losses; logits f32 or bf16 (the bf16 mode's LM head writes them as bf16:
    /// half the traffic of the head's largest buffer), `dlogits` f32 or bf16 (an activation
    /// buffer in the bf16 mode, which `matmul_bwd` then reads without a conversion).
    fn cross_entropy_fwd_bwd(
        &self,
        loss: &mut CudaBuf,
        dlogits: &mut CudaBuf,
        logits: &CudaBuf,
        targets: &CudaSlice<u32>,
        scale: f32,
        n: usize,
        vocab: usize,
    ) {
        let _p = self.prof("cross_entropy_fwd_bwd");
        Self::f32_only("cross_entropy_fwd_bwd", &[("loss", loss)]);
        if n == 0 {
            return;
        }
        assert!(vocab > 0);
        check_len("loss", loss.len(), n);
        check_len("dlogits", dlogits.len(), n * vocab);
        check_len("logits", logits.len(), n * vocab);
        check_len("targets", targets.len(), n);
        let name = match (logits.dtype, dlogits.dtype) {
            (Dtype::F32, Dtype::F32) => "cross_entropy_fwd_bwd_f32",
            (Dtype::F32, Dtype::Bf16) => "cross_entropy_fwd_bwd_bf16",
            (Dtype::Bf16, Dtype::Bf16) => "cross_entropy_fwd_bwd_bf16_logits",
            (Dtype::Bf16, Dtype::F32) => panic!("cuda: cross_entropy_fwd_bwd has no kernel for bf16 logits with f32 dlogits"),
        };
        let (lp, dp, xp, tp) = (self.pm(loss), self.pm(dlogits), self.p(logits), self.p(targets));
        launch!(
            self,
            name,
            cfg((rows_grid(n), 1, 1), row_threads(vocab, 1024), 0),
            [lp, dp, xp, tp, scale, n as i32, vocab as i32]
        );
    }

    fn bce_logits_fwd(&self, loss: &mut CudaBuf, x: &CudaBuf, targets: &CudaBuf, n: usize) {
        let _p = self.prof("bce_logits_fwd");
        Self::f32_only("bce_logits_fwd", &[("loss", loss), ("x", x), ("targets", targets)]);
        if n == 0 {
            return;
        }
        check_len("loss", loss.len(), n);
        check_len("x", x.len(), n);
        check_len("targets", targets.len(), n);
        let (lp, xp, tp) = (self.pm(loss), self.p(x), self.p(targets));
        launch!(self, "bce_fwd_f32", self.ew(n), [lp, xp, tp, n as i64]);
    }

    fn bce_logits_bwd(&self, dx: &mut CudaBuf, x: &CudaBuf, targets: &CudaBuf, scale: f32, n: usize) {
        let _p = self.prof("bce_logits_bwd");
        Self::f32_only("bce_logits_bwd", &[("dx", dx), ("x", x), ("targets", targets)]);
        if n == 0 {
            return;
        }
        check_len("dx", dx.len(), n);
        check_len("x", x.len(), n);
        check_len("targets", targets.len(), n);
        let (dp, xp, tp) = (self.pm(dx), self.p(x), self.p(targets));
        launch!(self, "bce_bwd_f32", self.ew(n), [dp, xp, tp, scale, n as i64]);
    }

    // ---- optimiser ------------------------------------------------------------------------
    fn adamw(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        n: usize,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        step: u64,
    ) {
        let _p = self.prof("adamw");
        Self::f32_only("adamw", &[("param", param), ("grad", grad), ("m", m), ("v", v)]);
        assert!(step >= 1, "adamw: step is 1-based");
        if n == 0 {
            return;
        }
        for (name, len) in [("param", param.len()), ("grad", grad.len()), ("m", m.len()), ("v", v.len())] {
            check_len(name, len, n);
        }
        // Scalar arithmetic in f64, exactly as the CPU reference.
        let decay = (1.0 - lr as f64 * weight_decay as f64) as f32;
        let optim::AdamScalars { step_size, bc2_sqrt, ob1, ob2 } = optim::AdamScalars::new(lr, beta1, beta2, step);
        let (pp, gp, mp, vp) = (self.pm(param), self.p(grad), self.pm(m), self.pm(v));
        launch!(
            self,
            "adamw_f32",
            self.ew(n),
            [pp, gp, mp, vp, n as i64, decay, step_size, bc2_sqrt, beta1, beta2, ob1, ob2, eps]
        );
    }

    fn adamw_many(&self, items: &mut [AdamWItem<'_, Self>], lr: f32, beta1: f32, beta2: f32, eps: f32, step: u64, grad_scale: f32) {
        self.adamw_many_mt(items, lr, beta1, beta2, eps, step, grad_scale);
    }

    fn adamw_many_dev(&self, items: &mut [AdamWItem<'_, Self>], beta1: f32, beta2: f32, eps: f32, skip_nonfinite: bool, sc: &CudaBuf) {
        self.adamw_many_dev_mt(items, beta1, beta2, eps, skip_nonfinite, sc);
    }
}

/// Whether the backward GEMMs of several weights on one input (`m_i` outputs each, inner
/// dimension `k`, `n` rows) run as two GEMMs on the stacked weights: when some output is skinny
/// (`m_i <= k / 2`, as the k and v projections of grouped-query attention). Measured on an H200
/// at the 360M q/k/v shapes: 0.224 ms fused against 0.315 ms for three backward GEMMs; the
/// forward is faster unfused (0.091 ms against 0.132 ms with the split copies), so it stays so.
fn fuse_gemm(n: usize, k: usize, ms: &[usize]) -> bool {
    ms.len() > 1 && n >= 1024 && ms.iter().all(|&m| m > 0) && ms.iter().any(|&m| 2 * m <= k)
}

fn gate_code(f: GateFn) -> i32 {
    match f {
        GateFn::Sigmoid => 0,
        GateFn::Tanh => 1,
        GateFn::Identity => 2,
    }
}

impl Cuda {
    #[allow(clippy::too_many_arguments)]
    fn rope(&self, x: &mut CudaBuf, pos: &CudaSlice<u32>, n: usize, heads: usize, head_dim: usize, theta: f32, sign: f32) {
        if n == 0 || heads == 0 || head_dim == 0 {
            return;
        }
        check_len("x", x.len(), n * heads * head_dim);
        check_len("pos", pos.len(), n);
        if self.rope_vec(x, heads, None, pos, n, head_dim, theta, sign) {
            return;
        }
        let freqs = RopeFreqs::new(head_dim, theta);
        let (xp, pp) = (self.pm(x), self.p(pos));
        let suffix = if x.is_bf16() { "bf16" } else { "f32" };
        launch!(self, &format!("rope_{suffix}"), self.ew(n * head_dim / 2), [xp, pp, freqs, n as i32, heads as i32, head_dim as i32, sign]);
    }

    /// The vector kernel on `x[n, heads, head_dim]` and, sharing the angles, `x2`'s `[n, heads2,
    /// head_dim]` (one element type): 16-byte halves of heads, at most ROPE_ITEMS * 256 vectors per
    /// row. False (nothing launched) for shapes or alignments it does not take.
    #[allow(clippy::too_many_arguments)]
    fn rope_vec(&self, x: &mut CudaBuf, heads: usize, x2: Option<(&mut CudaBuf, usize)>, pos: &CudaSlice<u32>, n: usize, head_dim: usize, theta: f32, sign: f32) -> bool {
        let (suffix, vec) = if x.is_bf16() { ("bf16", 8) } else { ("f32", 4) };
        let heads2 = x2.as_ref().map_or(0, |x2| x2.1);
        let per_row = (heads + heads2) * (head_dim / 2 / vec);
        let xp = self.pm(x);
        let (x2p, ok2) = match x2 {
            Some((x2, _)) => {
                let p = self.pm(x2);
                (p, x2.dtype == x.dtype && p.is_multiple_of(16))
            }
            None => (0, true),
        };
        if !((head_dim / 2).is_multiple_of(vec) && xp.is_multiple_of(16) && ok2 && per_row <= ROPE_ITEMS * 256) {
            return false;
        }
        let freqs = RopeFreqs::new(head_dim, theta);
        let pp = self.p(pos);
        let rpb = (ROPE_ITEMS * 256 / per_row).min(ROPE_ROWS);
        let blocks = n.div_ceil(rpb).min(self.sm_count as usize * 16);
        let c = cfg((blocks as u32, 1, 1), 256, 0);
        let (h, h2) = (heads as i32, heads2 as i32);
        launch!(self, &format!("rope_vec_{suffix}"), c, [xp, h, x2p, h2, pp, freqs, n as i32, head_dim as i32, sign, rpb as i32]);
        true
    }
}
