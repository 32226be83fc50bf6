//! Reduced-precision emulation on the CPU: the operand roundings of the CUDA bf16 mode
//! ([`crate::MatmulPrecision::Bf16`]), so its numerical error can be studied against the exact
//! `Cpu<f32>` reference without a GPU (see [`super::Cpu::set_matmul_precision`],
//! [`super::Cpu::set_attention_bf16`] and [`super::Cpu::set_gemm_rule`]).
//!
//! Only the *operands* of a product are rounded; products, sums and outputs stay in the backend's
//! float type, as tensor cores accumulate bf16 products in fp32. The emulation rounds a copy of
//! each operand and then runs the ordinary GEMM, so it matches the GPU up to fp32 summation order.

use std::sync::Arc;

/// The number format a GEMM operand is rounded to before the product (round to nearest, ties to
/// even, except [`Operand::Tf32Trunc`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// Unchanged (no rounding).
    F32,
    /// bf16: 8 significant bits, the f32 exponent range (the CUDA `f32_to_bf16` kernel).
    Bf16,
    /// The operand split into `hi = bf16(x)` and `lo = bf16(x - hi)`, i.e. the value `hi + lo`
    /// (16 significant bits): the result of two bf16 GEMMs `hi·B + lo·B` with fp32 accumulation.
    Bf16x2,
    /// TF32: 11 significant bits, round to nearest (as after an explicit conversion pass).
    Tf32,
    /// TF32 by truncation: what tensor cores do with raw f32 inputs (cuBLAS
    /// `CUBLAS_COMPUTE_32F_FAST_TF32` reads only the first 10 mantissa bits).
    Tf32Trunc,
}

impl Operand {
    /// `x` rounded to this format (returned as f32).
    pub fn round(self, x: f32) -> f32 {
        match self {
            Operand::F32 => x,
            Operand::Bf16 => round_bf16(x),
            Operand::Bf16x2 => {
                let hi = round_bf16(x);
                if !hi.is_finite() {
                    return hi;
                }
                hi + round_bf16(x - hi)
            }
            Operand::Tf32 => round_mantissa(x, 13),
            Operand::Tf32Trunc => {
                if x.is_finite() {
                    f32::from_bits(x.to_bits() & !0x1fff)
                } else {
                    x
                }
            }
        }
    }
}

/// `x` rounded to bf16, round to nearest even, as f32; a NaN stays a (quiet) NaN. Bit-for-bit
/// the CUDA `bf16_bits` conversion (kernels/common.cuh) and `cvt.rn.bf16.f32`.
pub fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return f32::from_bits((b | 0x0040_0000) & 0xffff_0000);
    }
    f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
}

/// `x` with its lowest `drop` mantissa bits rounded away (round to nearest even).
fn round_mantissa(x: f32, drop: u32) -> f32 {
    let b = x.to_bits();
    if b & 0x7fff_ffff >= 0x7f80_0000 {
        return x;
    }
    let half = (1u32 << (drop - 1)) - 1;
    f32::from_bits(b.wrapping_add(half + ((b >> drop) & 1)) & !((1u32 << drop) - 1))
}

/// Which product of a linear layer `y[n, m] = x[n, k] · W[m, k]ᵀ` a GEMM computes; the two
/// operands of [`GemmRule`]'s answer are in the order given here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmProduct {
    /// `y = x · Wᵀ`: operands `[x, W]`.
    Fwd,
    /// `dx += dy · W`: operands `[dy, W]`.
    Dx,
    /// `dW += dyᵀ · x`: operands `[dy, x]`.
    Dw,
}

/// One GEMM of `matmul_fwd` / `matmul_bwd`, with the shape of its linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmCall {
    pub product: GemmProduct,
    pub n: usize,
    pub k: usize,
    pub m: usize,
}

/// Operand formats per GEMM, chosen from the call (e.g. by shape: `m == vocab` is the LM head).
pub type GemmRule = Arc<dyn Fn(&GemmCall) -> [Operand; 2] + Send + Sync>;

/// Output format per forward GEMM (see [`super::Cpu::set_gemm_output_rule`]).
pub type GemmOutRule = Arc<dyn Fn(&GemmCall) -> Operand + Send + Sync>;

/// The operand formats of attention's products (see `cpu.rs`; `Bf16` everywhere is what the CUDA
/// tensor-core flash kernels do, [`Operand::F32`] everywhere is exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnRounding {
    /// `q` and `k` in every product (`S = q·kᵀ` forward and recomputed, `dS·k`, `dSᵀ·q`).
    pub qk: Operand,
    /// `v` (`P·v`, `dP = dout·vᵀ`).
    pub v: Operand,
    /// `dout` (`dP = dout·vᵀ`, `Pᵀ·dout`).
    pub dout: Operand,
    /// `dout` as `D = <dout, out>` reads it. The flash kernels with f32 activations read the f32
    /// one (`attn_delta_f32`), so with `dout` in bf16 the rows of `dS = P ⊙ (dP - D)` no longer
    /// sum to zero; `Bf16` (the dout of `dP`) makes them consistent.
    pub delta_dout: Operand,
    /// `out` as `D` reads it: f32 with f32 activations; bf16 when activations are stored in bf16
    /// (`attn_delta_bf16`), which breaks the same consistency (`D` should be `<dout, P·v>`).
    pub delta_out: Operand,
    /// The probabilities where they multiply a matrix: `P·v` (forward) and `Pᵀ·dout` (dV).
    pub p: Operand,
    /// `dS` where it multiplies a matrix: `dS·k` (dQ) and `dSᵀ·q` (dK).
    pub ds: Operand,
}

impl AttnRounding {
    pub const EXACT: AttnRounding =
        AttnRounding { qk: Operand::F32, v: Operand::F32, dout: Operand::F32, delta_dout: Operand::F32, delta_out: Operand::F32, p: Operand::F32, ds: Operand::F32 };
    /// The CUDA flash kernels (`kernels/flash_attention.cu`) on f32 activations.
    pub const FLASH: AttnRounding =
        AttnRounding { qk: Operand::Bf16, v: Operand::Bf16, dout: Operand::Bf16, delta_dout: Operand::F32, delta_out: Operand::F32, p: Operand::Bf16, ds: Operand::Bf16 };
}

/// The rule of [`crate::MatmulPrecision::Bf16`]: every operand of every GEMM in bf16.
pub fn all_bf16() -> GemmRule {
    Arc::new(|_: &GemmCall| [Operand::Bf16, Operand::Bf16])
}
