//! Elementwise math that LLVM vectorizes: an `exp` with no branch and no libm call, and the
//! backend's ops built on it. libm's `expf`/`exp` cost one call per value: SiLU·mul took
//! 5.3 µs per 1,536 values and a log-softmax 235 µs per 49,152 logits, 5% of a SmolLM2
//! decode step at one sequence (benches/RESULTS.md).
//!
//! Each op is compiled once per instruction set (`Isa`); the per-value operations are the
//! same on every path (Rust does not fuse a multiply and an add on its own), so the paths
//! agree bit for bit, sums included (they keep a fixed lane order).

use super::simd::Isa;

/// e^x to within 2 ulp for x in [-87.3, 88] (Cephes' `expf` polynomial). Below that range
/// it gives ~1.2e-38 (the smallest normal), above it ~1.7e38; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_55, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    // 2^n from its exponent bits. n + 127 is in [1, 254] after the clamp; adding 2^23 puts it
    // in the low mantissa bits, and the shift moves it to the exponent field (the bits above
    // fall off). An `as i32` conversion would not vectorize: it saturates lane by lane. A
    // NaN `n` gives some finite scale, and `y` is NaN anyway.
    const SHIFTER: f32 = 127.0 + (1 << 23) as f32;
    y * f32::from_bits((n + SHIFTER).to_bits() << 23)
}

/// Runs `body` compiled for the given instruction set.
macro_rules! per_isa {
    ($isa:expr, $name:ident($($arg:expr),*)) => {{
        match $isa {
            // SAFETY: `Isa` values other than Scalar are only made when their features are
            // present (`simd::Isa::detect`).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::$name::avx512($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { x86::$name::avx2($($arg),*) },
            _ => $name::generic($($arg),*),
        }
    }};
}

/// `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    per_isa!(isa, silu_mul(gate, up))
}

/// A row of logits in place as log-probabilities: `x - max - ln Σ e^(x - max)`, the sum in
/// f64.
pub fn log_softmax(isa: Isa, row: &mut [f32]) {
    per_isa!(isa, log_softmax(row))
}

/// Softmax numerators in place, `x = e^(x - max(x))`; returns their sum (f32, eight partial
/// sums in a fixed order). Empty input sums to 0.
pub fn exp_normalized(isa: Isa, xs: &mut [f32]) -> f32 {
    per_isa!(isa, exp_normalized(xs))
}

mod exp_normalized {
    #[inline(always)]
    pub fn generic(xs: &mut [f32]) -> f32 {
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut acc = [0f32; 8];
        let whole = xs.len() / 8 * 8;
        for c in xs[..whole].chunks_exact_mut(8) {
            for (a, v) in acc.iter_mut().zip(c) {
                *v = super::exp(*v - max);
                *a += *v;
            }
        }
        let mut tail = 0f32;
        for v in &mut xs[whole..] {
            *v = super::exp(*v - max);
            tail += *v;
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
    }
}

mod silu_mul {
    #[inline(always)]
    pub fn generic(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + super::exp(-*g)) * u;
        }
    }
}

mod log_softmax {
    #[inline(always)]
    pub fn generic(row: &mut [f32]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Eight f64 partial sums in a fixed order: vectorizable, and the same on every path.
        let mut acc = [0f64; 8];
        let whole = row.len() / 8 * 8;
        for c in row[..whole].chunks_exact(8) {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += super::exp(v - max) as f64;
            }
        }
        let tail: f64 = row[whole..]
            .iter()
            .map(|&v| super::exp(v - max) as f64)
            .sum();
        let sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        let lse = max + (sum + tail).ln() as f32;
        row.iter_mut().for_each(|v| *v -= lse);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// `avx512`/`avx2` builds of an op's `generic` body.
    macro_rules! builds {
        ($op:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
            pub mod $op {
                #[target_feature(enable = "avx512f,avx2,fma")]
                pub unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    super::super::$op::generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                pub unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    super::super::$op::generic($($arg),*)
                }
            }
        };
    }
    builds!(silu_mul(gate: &mut [f32], up: &[f32]));
    builds!(log_softmax(row: &mut [f32]));
    builds!(exp_normalized(xs: &mut [f32]) -> f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_handles_the_edges() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let err = (exp(x) as f64 - want).abs() / want;
            worst = worst.max(err);
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1e4) > 0.0 && exp(-1e4) < 1.2e-38);
        assert!(exp(f32::NEG_INFINITY) < 1.2e-38);
        assert!(exp(100.0).is_finite() && exp(100.0) > 1e38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn ops_match_f64_and_agree_across_paths() {
        let n = 1003;
        let vals: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) * 0.013)
            .collect();
        for isa in Isa::all_supported() {
            let mut g = vals.clone();
            let up: Vec<f32> = vals.iter().map(|v| 1.0 - v).collect();
            silu_mul(isa, &mut g, &up);
            for ((&got, &x), &u) in g.iter().zip(&vals).zip(&up) {
                let want = x as f64 / (1.0 + (-x as f64).exp()) * u as f64;
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "{isa:?} silu({x})"
                );
            }
            let mut row = vals.clone();
            log_softmax(isa, &mut row);
            let max = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + vals
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            for (&got, &x) in row.iter().zip(&vals) {
                assert!(
                    (got as f64 - (x as f64 - lse)).abs() < 1e-5,
                    "{isa:?} log_softmax({x})"
                );
            }
            let mut scalar = vals.clone();
            log_softmax(Isa::Scalar, &mut scalar);
            assert_eq!(row, scalar, "{isa:?} vs scalar");
            let mut num = vals.clone();
            let sum = exp_normalized(isa, &mut num);
            let want: f64 = vals.iter().map(|&v| (v as f64 - max).exp()).sum();
            assert!(
                (sum as f64 - want).abs() < 1e-5 * want,
                "{isa:?} sum {sum} vs {want}"
            );
            for (&got, &x) in num.iter().zip(&vals) {
                // Against e^ of the f32 difference the op computes (its rounding is not exp's).
                let want = ((x - max as f32) as f64).exp();
                assert!(
                    (got as f64 - want).abs() <= 3e-7 * want.max(1e-30),
                    "{isa:?} e^{x}"
                );
            }
            assert_eq!(exp_normalized(isa, &mut []), 0.0);
        }
    }
}
