//! Scalar special functions in double precision and small slice kernels shared by the CPU ops.

use super::CpuFloat;

const FRAC_2_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;
/// `1 / sqrt(pi)`.
const FRAC_1_SQRT_PI: f64 = 0.5 * FRAC_2_SQRT_PI;
/// Below this `|x|` erf uses its power series, above it erfc uses its continued fraction.
const ERF_SWITCH: f64 = 2.5;
/// Depth of the erfc continued fraction: enough for full double precision at `x >= 2.5`.
const ERFC_CF_TERMS: usize = 32;

/// `erf(x)` for `|x| < ERF_SWITCH`: `2/sqrt(pi) * exp(-x²) * Σ_n (2x²)^n x / (2n+1)!!`
/// (all terms share one sign, so there is no cancellation; relative error ~1e-15).
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0f64;
    // At |x| = 2.5 the series needs ~40 terms; 80 is a safe cap.
    for _ in 0..80 {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
        if term.abs() <= 1e-17 * sum.abs() {
            break;
        }
    }
    FRAC_2_SQRT_PI * (-x2).exp() * sum
}

/// `erfc(x)` for `x >= ERF_SWITCH`, continued fraction
/// `erfc(x) = exp(-x²)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))`, evaluated backwards.
fn erfc_cf(x: f64) -> f64 {
    let mut f = x;
    for k in (1..=ERFC_CF_TERMS).rev() {
        f = x + (k as f64 * 0.5) / f;
    }
    FRAC_1_SQRT_PI * (-x * x).exp() / f
}

/// Error function in double precision (absolute error below 1e-15).
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    if a < ERF_SWITCH {
        erf_series(x)
    } else {
        let r = 1.0 - erfc_cf(a);
        if x < 0.0 {
            -r
        } else {
            r
        }
    }
}

/// Complementary error function in double precision (relative error ~1e-13 in the far tail,
/// absolute error below 1e-15 everywhere).
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x >= ERF_SWITCH {
        erfc_cf(x)
    } else if x <= -ERF_SWITCH {
        2.0 - erfc_cf(-x)
    } else {
        1.0 - erf_series(x)
    }
}

/// Standard normal CDF `Φ(x) = erfc(-x/√2)/2`.
pub fn norm_cdf(x: f64) -> f64 {
    0.5 * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

/// Standard normal density.
pub fn norm_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() * (FRAC_1_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2)
}

/// Exact GELU `x Φ(x)`.
pub fn gelu(x: f64) -> f64 {
    x * norm_cdf(x)
}

/// Derivative of exact GELU: `Φ(x) + x φ(x)`.
pub fn gelu_grad(x: f64) -> f64 {
    norm_cdf(x) + x * norm_pdf(x)
}

/// Dot product with eight independent accumulators (vectorisable, fixed summation order).
#[inline]
pub fn dot<T: CpuFloat>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s = s + *x * *y;
    }
    s
}

/// `y += alpha * x`.
#[inline]
pub fn axpy<T: CpuFloat>(y: &mut [T], alpha: T, x: &[T]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = *yi + alpha * *xi;
    }
}

/// Binary cross-entropy of a logit `x` against a target probability `t`, in the stable form
/// `max(x, 0) - x·t + ln(1 + e^-|x|)`.
#[inline]
pub fn bce_with_logits<T: CpuFloat>(x: T, t: T) -> T {
    x.max(T::zero()) - x * t + (-x.abs()).exp().ln_1p()
}

/// Numerically stable logistic sigmoid.
#[inline]
pub fn sigmoid<T: CpuFloat>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}
