//! Integer dot products for group-32 block weights (Q8_0, Q4_0, Q4_1), the way llama.cpp
//! runs quantized models: each activation row is quantized once per matmul to int8 blocks of
//! 32 (scale `amax / 127`), and each weight block meets it in a u8 × s8 integer dot
//! (AVX-512 VNNI `vpdpbusd`: 64 multiply-adds per instruction) with one float scale per
//! block pair. Opt-in and experimental (`Cpu::with_int_dot`, `VELLUM_INT_DOT=1`): rounding
//! activations to int8 moves log-probabilities by ~1e-2 (perplexity +0.3% on SmolLM2 Q4_1),
//! beyond the float path's agreement with transformers, and as written it is slower than the
//! float path that decodes blocks in registers (benches/RESULTS.md, 2026-12-03): per block
//! pair and row it pays scale and correction arithmetic that llama.cpp's repacked layouts
//! amortise over several weight rows.
//!
//! Every format is brought to u8 codes so one instruction serves all:
//! ```text
//! Q4_0: w = (n - 8) d        Σ w x = d dx (Σ n q - 8 Σ q)
//! Q4_1: w = n d + m          Σ w x = d dx Σ n q + m dx Σ q
//! Q8_0: w = c d (c: i8)      Σ w x = d dx (Σ (c + 128) q - 128 Σ q)
//! ```
//! where `q` are the activation codes of the block and `Σ q` is kept with them. The integer
//! sums are exact on every path; the float accumulation differs between the scalar and the
//! SIMD path (per-lane partial sums), within a bound the parity test documents. A row's
//! result never depends on the other rows of the batch.

use half::f16;
use vellum_quant::{BlockFormat, QK};

/// Activation rows quantized to int8 blocks of 32.
pub struct Q8Rows {
    pub k: usize,
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    /// Σ of each block's codes.
    pub sums: Vec<i32>,
}

impl Q8Rows {
    /// Quantizes `x` (rows of `k`, `k` a multiple of 32).
    pub fn quantize(x: &[f32], k: usize) -> Q8Rows {
        let blocks = x.len() / QK;
        let mut q = Q8Rows {
            k,
            codes: Vec::with_capacity(x.len()),
            scales: Vec::with_capacity(blocks),
            sums: Vec::with_capacity(blocks),
        };
        for b in x.chunks_exact(QK) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for &v in b {
                let c = (v * id).round() as i8;
                sum += c as i32;
                q.codes.push(c);
            }
            q.scales.push(d);
            q.sums.push(sum);
        }
        q
    }

    pub fn rows(&self) -> usize {
        self.codes.len() / self.k.max(1)
    }
}

/// Whether the VNNI path can run here.
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One weight block as 32 u8 codes in value order, its scale, and the correction
/// coefficient `c` such that the block's dot is `d dx Σ n q + c dx Σ q`.
#[inline]
fn block_codes(f: BlockFormat, b: &[u8], out: &mut [u8; QK]) -> (f32, f32) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    match f {
        BlockFormat::Q8_0 => {
            for (o, &c) in out.iter_mut().zip(&b[2..2 + QK]) {
                *o = c ^ 0x80; // i8 + 128 as u8
            }
            (d, -128.0 * d)
        }
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            let (qs, c) = match f {
                BlockFormat::Q4_0 => (&b[2..18], -8.0 * d),
                _ => (&b[4..20], f16::from_le_bytes([b[2], b[3]]).to_f32()),
            };
            for j in 0..QK / 2 {
                out[j] = qs[j] & 0x0f;
                out[j + QK / 2] = qs[j] >> 4;
            }
            (d, c)
        }
    }
}

/// Scalar reference: `out[r] = x_r · w` for every quantized activation row.
pub fn dot_rows_scalar(f: BlockFormat, w: &[u8], x: &Q8Rows, out: &mut [f32]) {
    let bb = f.block_bytes();
    let blocks = x.k / QK;
    let mut codes = [0u8; QK];
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for (i, b) in w.chunks_exact(bb).take(blocks).enumerate() {
            let (d, c) = block_codes(f, b, &mut codes);
            let xb = r * blocks + i;
            let xs = &x.codes[xb * QK..(xb + 1) * QK];
            let isum: i32 = codes
                .iter()
                .zip(xs)
                .map(|(&n, &q)| n as i32 * q as i32)
                .sum();
            let dx = x.scales[xb];
            acc += d * dx * isum as f32 + c * dx * x.sums[xb] as f32;
        }
        *o = acc;
    }
}

/// The VNNI path; falls back to scalar where it cannot run.
pub fn dot_rows(f: BlockFormat, w: &[u8], x: &Q8Rows, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if vnni_available() {
        // SAFETY: the features were detected above.
        unsafe { x86::dot_rows_vnni(f, w, x, out) };
        return;
    }
    dot_rows_scalar(f, w, x, out)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Activation rows per pass: each decoded weight block pair is reused this often.
    const ROWS: usize = 4;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
    pub unsafe fn dot_rows_vnni(f: BlockFormat, w: &[u8], x: &Q8Rows, out: &mut [f32]) {
        let mut r = 0;
        while r < out.len() {
            let n = (out.len() - r).min(ROWS);
            let mut res = [0f32; ROWS];
            match n {
                4 => pass::<4>(f, w, x, r, &mut res),
                3 => pass::<3>(f, w, x, r, &mut res),
                2 => pass::<2>(f, w, x, r, &mut res),
                _ => pass::<1>(f, w, x, r, &mut res),
            }
            out[r..r + n].copy_from_slice(&res[..n]);
            r += n;
        }
    }

    /// The f16 at `p` as f32 (F16C, exact).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// [`block_codes`] with SIMD loads: the 32 u8 codes in value order, scale, correction.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
    unsafe fn block_codes_simd(f: BlockFormat, b: *const u8) -> (__m256i, f32, f32) {
        let d = f16_at(b);
        match f {
            BlockFormat::Q8_0 => {
                let c = _mm256_loadu_si256(b.add(2) as *const __m256i);
                (_mm256_xor_si256(c, _mm256_set1_epi8(-128)), d, -128.0 * d)
            }
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let (qs, c) = match f {
                    BlockFormat::Q4_0 => (b.add(2), -8.0 * d),
                    _ => (b.add(4), f16_at(b.add(2))),
                };
                let bytes = _mm_loadu_si128(qs as *const __m128i);
                let low = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(bytes, low);
                let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
                (_mm256_set_m128i(hi, lo), d, c)
            }
        }
    }

    /// Rows `r0..r0 + R` of `x` against weight row `w`. Each row's arithmetic is the same
    /// whatever R is, so results do not depend on how rows are grouped.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
    unsafe fn pass<const R: usize>(
        f: BlockFormat,
        w: &[u8],
        x: &Q8Rows,
        r0: usize,
        res: &mut [f32; ROWS],
    ) {
        let bb = f.block_bytes();
        let blocks = x.k / QK;
        let mut acc = [_mm512_setzero_ps(); R];
        let mut corr = [0f32; R];
        let mut i = 0;
        while i < blocks {
            // Two blocks per 512-bit register (the second all zero past the row's end).
            let pair = (blocks - i).min(2);
            let mut d = [0f32; 2];
            let mut c = [0f32; 2];
            let mut halves = [_mm256_setzero_si256(); 2];
            for p in 0..pair {
                let b = w.as_ptr().add((i + p) * bb);
                (halves[p], d[p], c[p]) = block_codes_simd(f, b);
            }
            let wv = _mm512_inserti64x4(_mm512_castsi256_si512(halves[0]), halves[1], 1);
            let mask: u64 = if pair == 2 { !0 } else { (1u64 << QK) - 1 };
            for (rr, a) in acc.iter_mut().enumerate() {
                let xb = (r0 + rr) * blocks + i;
                let xv = _mm512_maskz_loadu_epi8(mask, x.codes.as_ptr().add(xb * QK));
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                let s0 = d[0] * x.scales[xb];
                let s1 = if pair == 2 {
                    d[1] * x.scales[xb + 1]
                } else {
                    0.0
                };
                let scale = _mm512_insertf64x4(
                    _mm512_castps_pd(_mm512_set1_ps(s0)),
                    _mm256_castps_pd(_mm256_set1_ps(s1)),
                    1,
                );
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_castpd_ps(scale), *a);
                for (p, &cp) in c.iter().enumerate().take(pair) {
                    corr[rr] += cp * x.scales[xb + p] * x.sums[xb + p] as f32;
                }
            }
            i += pair;
        }
        for (rr, a) in acc.iter().enumerate() {
            res[rr] = _mm512_reduce_add_ps(*a) + corr[rr];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                ((h >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * (1.0 + (i % 5) as f32)
            })
            .collect()
    }

    /// Both paths against the f64 dot of the dequantized weights with the dequantized
    /// activations (the exact value of what the integer path computes), and the SIMD path
    /// against the scalar one: within 1e-5 of Σ|terms|, for odd block counts and row counts.
    #[test]
    fn integer_dots_match_the_exact_value_and_each_other() {
        for f in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1] {
            for (k, rows) in [(32usize, 1usize), (96, 3), (576, 5), (1536, 9)] {
                let mut w = Vec::new();
                f.quantize(&values(k, 1), &mut w).unwrap();
                let mut wf = Vec::new();
                f.dequantize(&w, k, &mut wf).unwrap();
                let x = Q8Rows::quantize(&values(rows * k, 2), k);
                assert_eq!(x.rows(), rows);
                let (mut scalar, mut simd) = (vec![0f32; rows], vec![0f32; rows]);
                dot_rows_scalar(f, &w, &x, &mut scalar);
                dot_rows(f, &w, &x, &mut simd);
                for r in 0..rows {
                    let (mut exact, mut mag) = (0f64, 1e-3f64);
                    for j in 0..k {
                        let xb = (r * k + j) / QK;
                        let xv = x.codes[r * k + j] as f64 * x.scales[xb] as f64;
                        exact += xv * wf[j] as f64;
                        mag += (xv * wf[j] as f64).abs();
                    }
                    for (path, got) in [("scalar", scalar[r]), ("simd", simd[r])] {
                        let err = (got as f64 - exact).abs() / mag;
                        assert!(
                            err < 1e-5,
                            "{} k {k} row {r} {path}: {got} vs {exact}",
                            f.name()
                        );
                    }
                    let gap = (scalar[r] - simd[r]).abs() as f64 / mag;
                    assert!(
                        gap < 1e-5,
                        "{} k {k} row {r}: scalar vs simd {gap:.1e}",
                        f.name()
                    );
                }
                // A row alone gives what it gave among the others.
                let mut alone = vec![0f32; 1];
                let last = Q8Rows {
                    k,
                    codes: x.codes[(rows - 1) * k..].to_vec(),
                    scales: x.scales[(rows - 1) * k / QK..].to_vec(),
                    sums: x.sums[(rows - 1) * k / QK..].to_vec(),
                };
                dot_rows(f, &w, &last, &mut alone);
                assert_eq!(alone[0].to_bits(), simd[rows - 1].to_bits(), "{}", f.name());
            }
        }
    }

    #[test]
    fn activation_codes_round_within_half_a_step() {
        let v = values(96, 3);
        let q = Q8Rows::quantize(&v, 96);
        for (i, &x) in v.iter().enumerate() {
            let d = q.scales[i / QK];
            assert!((x - q.codes[i] as f32 * d).abs() <= 0.5 * d * 1.0001);
        }
        let sum: i32 = q.codes[..QK].iter().map(|&c| c as i32).sum();
        assert_eq!(q.sums[0], sum);
    }
}
