//! `--device cpu|cuda`: which backend a subcommand runs on. CUDA exists only in binaries built
//! with `--features cuda`; elsewhere asking for it is an error naming the rebuild.

use std::path::PathBuf;

use anyhow::Result;
use mor_engine::{Backend, Cpu};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The CPU reference backend (f32).
    Cpu,
    /// The CUDA backend (GPU 0).
    Cuda,
}

/// GEMM input precision on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Gemm {
    /// fp32 SGEMM (the parity reference).
    #[default]
    F32,
    /// bf16 GEMM and attention operands with fp32 accumulation, bf16 activation buffers; fp32
    /// master weights, gradients, optimizer state and residual stream.
    Bf16,
}

/// The error for `--device cuda` in a binary without the CUDA backend.
pub const NO_CUDA: &str = "this binary was built without CUDA support; rebuild with --features cuda";

/// Backend options that only the CUDA backend uses.
#[derive(Debug, Clone, Default)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct DeviceOptions {
    pub gemm: Gemm,
    /// Per-op timings (synchronising around every op).
    pub profile: bool,
    /// Bit-reproducible GPU results (`--deterministic`): the two-pass attention backward and the
    /// heuristic's GEMM algorithms, at some speed.
    pub deterministic: bool,
    /// File of the tuned cuBLASLt GEMM algorithms: loaded when it exists, rewritten when a new
    /// GEMM shape is tuned, so that a resumed or repeated run computes with the same algorithms.
    /// `MOR_GEMM_ALGOS` takes precedence; unused with `MOR_GEMM_SELECT=heuristic`.
    pub gemm_algos: Option<PathBuf>,
}

/// Work that runs on whichever backend the user picked.
pub trait OnBackend {
    type Output;
    fn run<B: Backend>(self, backend: &B) -> Result<Self::Output>;
}

/// True when this binary has the CUDA backend.
pub fn cuda_available() -> bool {
    cfg!(feature = "cuda")
}

/// Fail early (before loading data or configs) when `device` is not in this binary.
pub fn check(device: Device) -> Result<()> {
    if device == Device::Cuda && !cuda_available() {
        anyhow::bail!(NO_CUDA);
    }
    Ok(())
}

/// Run `work` on the backend for `device`.
pub fn dispatch<W: OnBackend>(device: Device, opts: DeviceOptions, work: W) -> Result<W::Output> {
    match device {
        Device::Cpu => work.run(&Cpu::<f32>::new()),
        Device::Cuda => cuda(opts, work),
    }
}

#[cfg(feature = "cuda")]
fn cuda<W: OnBackend>(opts: DeviceOptions, work: W) -> Result<W::Output> {
    use mor_engine::cuda::{CudaOptions, GemmPrecision, GemmSelect};
    let mut o = CudaOptions::from_env();
    if opts.gemm == Gemm::Bf16 {
        o.gemm = GemmPrecision::Bf16;
    }
    o.profile |= opts.profile;
    o.deterministic |= opts.deterministic;
    let backend = mor_engine::Cuda::with_options(0, o).map_err(|e| anyhow::anyhow!("cannot start the CUDA backend: {e}"))?;
    eprintln!(
        "device: {} (CUDA, GEMMs {:?}{}{})",
        backend.device_name(),
        o.gemm,
        if o.profile { ", profiling" } else { "" },
        if o.deterministic { ", deterministic" } else { "" }
    );
    if let (Some(path), GemmSelect::Tuned, None) = (&opts.gemm_algos, backend.options().gemm_select, backend.gemm_algos_file()) {
        let n = backend.keep_gemm_algos_in(path).map_err(|e| anyhow::anyhow!("{e} (delete the file to tune the GEMMs afresh)"))?;
        if n > 0 {
            eprintln!("GEMM algorithms: {n} shapes from {}", path.display());
        }
    }
    work.run(&backend)
}

#[cfg(not(feature = "cuda"))]
fn cuda<W: OnBackend>(_opts: DeviceOptions, _work: W) -> Result<W::Output> {
    anyhow::bail!(NO_CUDA)
}
