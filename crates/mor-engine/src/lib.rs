//! The engine: an op interface with explicit forward and backward passes ([`Backend`]), a plain
//! Rust CPU implementation that is the reference for every other backend ([`cpu::Cpu`]), and the
//! parameter store shared by the model and the trainer.

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod params;

pub use backend::{AdamWItem, AttnBwdInputs, AttnGrads, AttnShape, Backend, GateFn, MatmulGrad, MatmulPrecision, Readback, StepGraph};
pub use cpu::{Cpu, HostTraffic};
#[cfg(feature = "cuda")]
pub use cuda::Cuda;
pub use params::{ParamGroup, ParamId, ParamInfo, ParamStore};
