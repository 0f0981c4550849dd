//! Integer dot products for quantized weights, the way llama.cpp runs quantized models on a
//! CPU: each activation row is quantized once per matmul to integer blocks of 32
//! ([`IntActs`]), and each weight block meets it in u8 × s8 integer dots with one float
//! scale per block. The dots themselves run in `rows16`, on weights repacked 16 rows per
//! register; this module quantizes the activations and reads every quantized weight layout
//! block by block ([`blocks_of`]) for that repacking: GGUF Q8_0/Q4_0/Q4_1, planar int4 at
//! any group size (symmetric or not) and int8 per channel.
//!
//! Every weight format is brought to u8 codes `u` so one instruction serves all, with a
//! per-block offset coefficient `c`:
//! ```text
//! Q4_0, int4 sym:   w = (n - 8) d      Σ w x = d dx Σ n q  +  (-8 d)   dx Σ q
//! Q4_1, int4 asym:  w = n d + m        Σ w x = d dx Σ n q  +  m        dx Σ q
//! Q8_0, int8:       w = s d (s: i8)    Σ w x = d dx Σ u q  +  (-128 d) dx Σ q,  u = s + 128
//! ```
//! where `q` are the activation codes of the block, `dx` its scale, and `dx Σ q` is kept with
//! them. The integer sums are exact, and a row's result never depends on the other rows of
//! the batch.
//!
//! What is lost is the activations' rounding ([`ActBits`]). llama.cpp rounds them to int8
//! (`amax / 127` per block): an outlier channel leaves the rest of its block few levels, which
//! moves SmolLM2's log-probabilities by up to ~0.3 nats, perplexity by up to ~1% either way,
//! and changes the Q4_1 model's greedy chat answer to "What is the capital of France?" from
//! "Paris", exactly as in llama.cpp. Vellum's default rounds them to int16 instead, held as
//! two int8 halves that each meet the weight codes: twice the multiply-adds, no more weight
//! traffic, and log-probabilities within ~3e-3 nats of the float path, perplexities within
//! 0.01%, the same greedy replies (tests/golden.rs, tests/accuracy.rs; README). The kernels
//! themselves are exact: the result is the float matmul of the rounded activations to 1e-5
//! (tested).

use super::pool::Pool;
use crate::{Weight, WeightData};
use half::f16;
use vellum_quant::{BlockFormat, QK};

/// How finely [`IntActs`] rounds activations, per block of 32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActBits {
    /// int8 codes, step `amax / 127`, as llama.cpp: the fastest, but an outlier leaves the
    /// rest of its block few levels (log-probabilities move by up to ~0.3 nats on SmolLM2).
    Eight,
    /// int16 codes, step `amax / 32639`, held as two int8 halves `c = 256 h + l` (`h`, `l`
    /// in -128..=127): each weight block meets both halves in two dot chains combined
    /// exactly in i32 (`256 Σ u h + Σ u l`), so the same u8 × s8 instruction gives 256x
    /// finer activations for twice the multiply-adds and no extra weight traffic.
    Sixteen,
}

impl ActBits {
    /// The largest code: `amax` maps to it.
    fn top(self) -> f32 {
        match self {
            ActBits::Eight => 127.0,
            ActBits::Sixteen => 32_639.0,
        }
    }

    /// Code bytes per block: one int8 per value, or the high halves then the low ones.
    pub fn block_bytes(self) -> usize {
        match self {
            ActBits::Eight => QK,
            ActBits::Sixteen => 2 * QK,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ActBits::Eight => "int8",
            ActBits::Sixteen => "int16",
        }
    }
}

/// Activation rows quantized to integer blocks of 32 ([`ActBits`]).
pub struct IntActs {
    bits: ActBits,
    rows: usize,
    blocks: usize,
    /// `[rows, blocks, bits.block_bytes()]`: int8 codes, or int16 codes as 32 high halves
    /// then 32 low halves.
    codes: Vec<i8>,
    /// `[rows, blocks]` each block's scale `dx`.
    scales: Vec<f32>,
    /// `[rows, blocks]` each block's `dx Σ c` (`c` the whole codes).
    scaled_sums: Vec<f32>,
}

impl IntActs {
    /// Quantizes `x` (rows of `k`, `k` a multiple of 32).
    pub fn quantize(x: &[f32], k: usize, bits: ActBits) -> IntActs {
        assert!(
            k > 0 && k.is_multiple_of(QK),
            "{k} columns are not whole blocks"
        );
        let rows = x.len() / k;
        let blocks = k / QK;
        let bb = bits.block_bytes();
        let mut q = IntActs {
            bits,
            rows,
            blocks,
            codes: vec![0; rows * blocks * bb],
            scales: vec![0.0; rows * blocks],
            scaled_sums: vec![0.0; rows * blocks],
        };
        let mut rows: Vec<_> = q
            .codes
            .chunks_mut(blocks * bb)
            .zip(q.scales.chunks_mut(blocks))
            .zip(q.scaled_sums.chunks_mut(blocks))
            .zip(x.chunks_exact(k))
            .collect();
        let quantize = block_quantizer();
        Pool::global().for_each_mut(&mut rows, |(((codes, scales), sums), row)| {
            let blocks = row.chunks_exact(QK).zip(codes.chunks_exact_mut(bb));
            for ((block, out), (d_out, sum_out)) in
                blocks.zip(scales.iter_mut().zip(sums.iter_mut()))
            {
                let (d, sum) = quantize(block, bits, out);
                *d_out = d;
                *sum_out = d * sum as f32;
            }
        });
        q
    }

    pub fn bits(&self) -> ActBits {
        self.bits
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Block `b` of row `r`: its code bytes ([`ActBits::block_bytes`]), its scale `dx` and
    /// `dx Σ c`.
    pub(super) fn block(&self, r: usize, b: usize) -> (&[i8], f32, f32) {
        let at = r * self.blocks + b;
        let bb = self.bits.block_bytes();
        (
            &self.codes[at * bb..(at + 1) * bb],
            self.scales[at],
            self.scaled_sums[at],
        )
    }

    /// Activation value `j` of row `r` as the integer path sees it (code × scale).
    pub fn value(&self, r: usize, j: usize) -> f32 {
        let (codes, d, _) = self.block(r, j / QK);
        let i = j % QK;
        let c = match self.bits {
            ActBits::Eight => codes[i] as i32,
            ActBits::Sixteen => 256 * codes[i] as i32 + codes[QK + i] as i32,
        };
        c as f32 * d
    }

    /// `Σ u c` over block `b` of row `r`, for u8 weight codes `u` in value order: the
    /// integer sum every path computes.
    pub(super) fn int_dot(&self, r: usize, b: usize, u: &[u8; QK]) -> i32 {
        let (codes, _, _) = self.block(r, b);
        let dot =
            |half: &[i8]| -> i32 { u.iter().zip(half).map(|(&a, &c)| a as i32 * c as i32).sum() };
        match self.bits {
            ActBits::Eight => dot(codes),
            ActBits::Sixteen => 256 * dot(&codes[..QK]) + dot(&codes[QK..]),
        }
    }
}

/// One block of 32 activations to codes (`out`: [`ActBits::block_bytes`]): returns its scale
/// `d = amax / top` and the sum of its whole codes. A NaN or infinite value makes `d` NaN
/// (and every code 0), so the block's dots come out NaN instead of silently finite.
fn quantize_block(block: &[f32], bits: ActBits, out: &mut [i8]) -> (f32, i32) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let amax = if amax.is_finite() && block.iter().all(|v| !v.is_nan()) {
        amax
    } else {
        f32::NAN
    };
    let (d, id) = step(amax, bits);
    let mut sum = 0i32;
    for (i, &v) in block.iter().enumerate() {
        let c = round_to_even(v * id) as i32;
        sum += c;
        match bits {
            ActBits::Eight => out[i] = c as i8,
            ActBits::Sixteen => {
                let (h, l) = halves(c);
                out[i] = h as i8;
                out[QK + i] = l as i8;
            }
        }
    }
    (d, sum)
}

/// A block's step `d = amax / top` and its inverse. A NaN `amax` keeps `d` NaN (codes 0); a
/// block too small for the inverse to be finite (`amax` below ~1e-34) or all zeros gets
/// `d = 0` and codes 0, where an infinite inverse would make its codes garbage.
fn step(amax: f32, bits: ActBits) -> (f32, f32) {
    let d = amax / bits.top();
    let id = 1.0 / d;
    match d {
        _ if d.is_nan() => (d, 0.0),
        _ if d > 0.0 && id.is_finite() => (d, id),
        _ => (0.0, 0.0),
    }
}

/// An int16 code's halves, `c = 256 h + l` with both in -128..=127.
#[inline]
fn halves(c: i32) -> (i32, i32) {
    let h = (c + 128) >> 8;
    (h, c - 256 * h)
}

type BlockQuantizer = fn(&[f32], ActBits, &mut [i8]) -> (f32, i32);

/// The fastest [`quantize_block`] this CPU runs (the scalar code was 8% of a SmolLM2
/// prefill on AVX-512).
fn block_quantizer() -> BlockQuantizer {
    static FASTEST: std::sync::OnceLock<BlockQuantizer> = std::sync::OnceLock::new();
    *FASTEST.get_or_init(|| block_quantizers()[0].1)
}

/// Every [`quantize_block`] this CPU runs, fastest first, the scalar one last.
fn block_quantizers() -> Vec<(&'static str, BlockQuantizer)> {
    let mut all: Vec<(&'static str, BlockQuantizer)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present.
            all.push(("avx512", |b, bits, out| unsafe {
                x86::quantize_block(b, bits, out)
            }));
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            all.push(("avx2", |b, bits, out| unsafe {
                x86::quantize_block_avx2(b, bits, out)
            }));
        }
    }
    // SAFETY: NEON is part of every aarch64 CPU.
    #[cfg(target_arch = "aarch64")]
    all.push(("neon", |b, bits, out| unsafe {
        neon::quantize_block(b, bits, out)
    }));
    all.push(("scalar", quantize_block));
    all
}

/// `x` rounded to the nearest integer, ties to even, for |x| <= 2^22: adding 1.5 · 2^23 leaves
/// no fraction bits. `f32::round` is a libm call on baseline x86-64 (no SSE4.1), ~1–3 µs per
/// decode matmul's activations.
#[inline]
fn round_to_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActBits, QK};
    use std::arch::x86_64::*;

    /// [`super::quantize_block`] on AVX-512: the same codes (`vcvtps2dq` rounds to nearest
    /// even, as `round_to_even` does) and the same scale; blocks with a NaN or infinity go
    /// to the scalar code, which owns that rule.
    ///
    /// # Safety
    /// AVX-512F must be present; `block` holds 32 values and `out` the block's code bytes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_block(block: &[f32], bits: ActBits, out: &mut [i8]) -> (f32, i32) {
        assert!(block.len() == QK && out.len() == bits.block_bytes());
        let a = _mm512_loadu_ps(block.as_ptr());
        let b = _mm512_loadu_ps(block.as_ptr().add(16));
        let nan =
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(b, b);
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        if nan != 0 || !amax.is_finite() {
            return super::quantize_block(block, bits, out);
        }
        let (d, id) = super::step(amax, bits);
        let id = _mm512_set1_ps(id);
        let ca = _mm512_cvtps_epi32(_mm512_mul_ps(a, id));
        let cb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ca, cb));
        // `vpmovdb` keeps each lane's low byte: every stored value fits in an i8.
        let mut store = |at: usize, v: __m512i| {
            _mm_storeu_si128(
                out.as_mut_ptr().add(at) as *mut __m128i,
                _mm512_cvtepi32_epi8(v),
            )
        };
        match bits {
            ActBits::Eight => {
                store(0, ca);
                store(16, cb);
            }
            ActBits::Sixteen => {
                let high = |c| _mm512_srai_epi32::<8>(_mm512_add_epi32(c, _mm512_set1_epi32(128)));
                let (ha, hb) = (high(ca), high(cb));
                store(0, ha);
                store(16, hb);
                store(QK, _mm512_sub_epi32(ca, _mm512_slli_epi32::<8>(ha)));
                store(QK + 16, _mm512_sub_epi32(cb, _mm512_slli_epi32::<8>(hb)));
            }
        }
        (d, sum)
    }

    /// [`quantize_block`] on AVX2, as the AVX-512 one.
    ///
    /// # Safety
    /// AVX2 must be present; `block` holds 32 values and `out` the block's code bytes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_block_avx2(block: &[f32], bits: ActBits, out: &mut [i8]) -> (f32, i32) {
        assert!(block.len() == QK && out.len() == bits.block_bytes());
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(block.as_ptr().add(8 * i)));
        let sign = _mm256_set1_ps(-0.0);
        let (mut amax, mut nan) = (_mm256_setzero_ps(), 0);
        for &x in &v {
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, x));
            nan |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
        }
        let amax = {
            let m = _mm_max_ps(
                _mm256_castps256_ps128(amax),
                _mm256_extractf128_ps::<1>(amax),
            );
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
        };
        if nan != 0 || !amax.is_finite() {
            return super::quantize_block(block, bits, out);
        }
        let (d, id) = super::step(amax, bits);
        let id = _mm256_set1_ps(id);
        let c = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, id)));
        let total = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
        let t = _mm_add_epi32(
            _mm256_castsi256_si128(total),
            _mm256_extracti128_si256::<1>(total),
        );
        let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b01_00_11_10>(t));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32::<0b10_11_00_01>(t)));
        // 32 i32 lanes to 32 bytes in order: the packs work within 128-bit lanes, leaving the
        // 4-byte groups at dwords [0, 2, 4, 6, 1, 3, 5, 7] of the order wanted.
        let mut store = |at: usize, c: [__m256i; 4]| {
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(c[0], c[1]),
                _mm256_packs_epi32(c[2], c[3]),
            );
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(out.as_mut_ptr().add(at) as *mut __m256i, bytes)
        };
        match bits {
            ActBits::Eight => store(0, c),
            ActBits::Sixteen => {
                let h =
                    c.map(|c| _mm256_srai_epi32::<8>(_mm256_add_epi32(c, _mm256_set1_epi32(128))));
                store(0, h);
                store(
                    QK,
                    std::array::from_fn(|i| _mm256_sub_epi32(c[i], _mm256_slli_epi32::<8>(h[i]))),
                );
            }
        }
        (d, sum)
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{ActBits, QK};
    use std::arch::aarch64::*;

    /// [`super::quantize_block`] on NEON (`fcvtns` rounds to nearest even), as the AVX-512
    /// one.
    ///
    /// # Safety
    /// `block` holds 32 values and `out` the block's code bytes.
    #[target_feature(enable = "neon")]
    pub unsafe fn quantize_block(block: &[f32], bits: ActBits, out: &mut [i8]) -> (f32, i32) {
        assert!(block.len() == QK && out.len() == bits.block_bytes());
        let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(block.as_ptr().add(4 * i)));
        let (mut amax, mut ordered) = (vdupq_n_f32(0.0), vdupq_n_u32(u32::MAX));
        for &x in &v {
            amax = vmaxq_f32(amax, vabsq_f32(x));
            ordered = vandq_u32(ordered, vceqq_f32(x, x));
        }
        let amax = vmaxvq_f32(amax);
        if vminvq_u32(ordered) == 0 || !amax.is_finite() {
            return super::quantize_block(block, bits, out);
        }
        let (d, id) = super::step(amax, bits);
        let c = v.map(|x| vcvtnq_s32_f32(vmulq_n_f32(x, id)));
        let sum = c.iter().fold(0i32, |s, &c| s + vaddvq_s32(c));
        let mut store = |at: usize, c: [int32x4_t; 8]| {
            for (i, pair) in c.chunks_exact(2).enumerate() {
                let h = vcombine_s16(vmovn_s32(pair[0]), vmovn_s32(pair[1]));
                vst1_s8(out.as_mut_ptr().add(at + 8 * i), vmovn_s16(h));
            }
        };
        match bits {
            ActBits::Eight => store(0, c),
            ActBits::Sixteen => {
                let h = c.map(|c| vshrq_n_s32::<8>(vaddq_s32(c, vdupq_n_s32(128))));
                store(0, h);
                store(
                    QK,
                    std::array::from_fn(|i| vsubq_s32(c[i], vshlq_n_s32::<8>(h[i]))),
                );
            }
        }
        (d, sum)
    }
}

/// Whether the VNNI path can run here.
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the integer path can read `w` (quantized, whole blocks per row).
pub fn supports(w: &Weight) -> bool {
    w.cols.is_multiple_of(QK)
        && matches!(
            w.data,
            WeightData::Block(..) | WeightData::Int4(..) | WeightData::Int8PerRow { .. }
        )
}

/// Prefetches the cache lines of `len` bytes from `p` into L2, like `simd::prefetch` (a hint:
/// never faults, even past the end of the data).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn prefetch_bytes<T>(p: *const T, len: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let p = p as *const i8;
    for off in (0..len).step_by(64) {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(off));
    }
}

/// A block's u8 codes in value order, its scale `d` and offset coefficient `c` (module docs).
pub(super) type Block = ([u8; QK], f32, f32);

/// A block as stored, its codes not unpacked: for 4-bit formats 16 bytes of nibble pairs in
/// GGUF order (byte j: value j in the low nibble, value j + 16 in the high one; the other 16
/// bytes zero), for 8-bit formats 32 u8 codes `s + 128`. Then its scale `d` and offset
/// coefficient `c`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct RawBlock {
    pub bytes: [u8; QK],
    pub d: f32,
    pub c: f32,
}

impl RawBlock {
    /// The block with its codes in value order (as `Rows16` reads its packing back).
    #[cfg(test)]
    pub fn decoded(&self, f: BlockFormat) -> Block {
        let mut u = self.bytes;
        if f != BlockFormat::Q8_0 {
            for j in 0..QK / 2 {
                (u[j], u[j + QK / 2]) = (self.bytes[j] & 0x0f, self.bytes[j] >> 4);
            }
        }
        (u, self.d, self.c)
    }
}

/// `(row, out)`: fills `out` with the blocks of one row of a quantized weight (one dynamic
/// call per row; the loop over the row's blocks is compiled per layout).
pub(super) type RowReader<'a> = Box<dyn Fn(usize, &mut [RawBlock]) + 'a>;

/// The blocks of a quantized weight (GGUF blocks, planar int4, int8 per channel), with the
/// GGUF format whose offset rule they follow: `c = -8d` (Q4_0, symmetric int4), `c = m`
/// (Q4_1, asymmetric int4) or `c = -128d` (Q8_0, int8 per channel). `None` where the
/// integer path cannot read the weight ([`supports`]): dense, or rows not whole blocks.
pub(super) fn blocks_of(w: &Weight) -> Option<(BlockFormat, RowReader<'_>)> {
    if !supports(w) {
        return None;
    }
    let k = w.cols;
    let f16_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    match &w.data {
        WeightData::Block(f, bytes) => {
            let (f, bb) = (*f, f.block_bytes());
            let rb = k / QK * bb;
            let read = move |j: usize, out: &mut [RawBlock]| {
                // `| d: f16 | q[32]: i8 |` (Q8_0), `| d | qs[16] |` (Q4_0),
                // `| d | m: f16 | qs[16] |` (Q4_1).
                for (o, blk) in out
                    .iter_mut()
                    .zip(bytes[j * rb..(j + 1) * rb].chunks_exact(bb))
                {
                    o.d = f16_at(blk, 0);
                    match f {
                        BlockFormat::Q8_0 => {
                            for (o, &s) in o.bytes.iter_mut().zip(&blk[2..]) {
                                *o = s ^ 0x80;
                            }
                            o.c = -128.0 * o.d;
                        }
                        BlockFormat::Q4_0 => {
                            o.bytes[..QK / 2].copy_from_slice(&blk[2..]);
                            o.c = -8.0 * o.d;
                        }
                        BlockFormat::Q4_1 => {
                            o.bytes[..QK / 2].copy_from_slice(&blk[4..]);
                            o.c = f16_at(blk, 2);
                        }
                    }
                }
            };
            Some((f, Box::new(read)))
        }
        WeightData::Int4(f, d) => {
            let (groups, per, sym) = (k.div_ceil(f.group), f.group / QK, f.symmetric);
            let read = move |j: usize, out: &mut [RawBlock]| {
                let row = d.packed[j * k / 2..(j + 1) * k / 2].chunks_exact(QK / 2);
                for (b, (o, qs)) in out.iter_mut().zip(row).enumerate() {
                    o.bytes[..QK / 2].copy_from_slice(qs);
                    let g = j * groups + b / per;
                    o.d = d.scales[g].to_f32();
                    o.c = if sym { -8.0 * o.d } else { d.mins[g].to_f32() };
                }
            };
            let rule = if sym {
                BlockFormat::Q4_0
            } else {
                BlockFormat::Q4_1
            };
            Some((rule, Box::new(read)))
        }
        WeightData::Int8PerRow { q, scales } => {
            let read = move |j: usize, out: &mut [RawBlock]| {
                for (o, codes) in out.iter_mut().zip(q[j * k..(j + 1) * k].chunks_exact(QK)) {
                    for (o, &s) in o.bytes.iter_mut().zip(codes) {
                        *o = (s as u8) ^ 0x80;
                    }
                    (o.d, o.c) = (scales[j], -128.0 * scales[j]);
                }
            };
            Some((BlockFormat::Q8_0, Box::new(read)))
        }
        _ => None,
    }
}

/// Test helpers shared with `rows16`.
#[cfg(test)]
pub(super) mod testing {
    use super::*;
    use vellum_quant::{Int4Format, ScaleSearch};

    /// Deterministic values in about ±3 with varied magnitudes.
    pub fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                ((h >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * (1.0 + (i % 5) as f32)
            })
            .collect()
    }

    /// A quantized weight of every layout the integer path reads, `rows × k`.
    pub fn weights(k: usize, rows: usize) -> Vec<(String, Weight)> {
        weights_of(&values(rows * k, 1), k, rows)
    }

    /// `v` (`rows × k`) quantized to every layout the integer path reads.
    pub fn weights_of(v: &[f32], k: usize, rows: usize) -> Vec<(String, Weight)> {
        let mut out = Vec::new();
        for f in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1] {
            let mut bytes = Vec::new();
            f.quantize(v, &mut bytes).unwrap();
            let w = Weight::new(rows, k, WeightData::Block(f, bytes)).unwrap();
            out.push((f.name().to_string(), w));
        }
        for group in Int4Format::GROUPS {
            for symmetric in [true, false] {
                let f = Int4Format::new(group, symmetric).unwrap();
                let d = f.quantize(rows, k, v, ScaleSearch::RoundToNearest).unwrap();
                out.push((
                    f.name().to_string(),
                    Weight::new(rows, k, WeightData::Int4(f, d)).unwrap(),
                ));
            }
        }
        let scales: Vec<f32> = v
            .chunks(k)
            .map(|r| r.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0)
            .collect();
        let q = v
            .iter()
            .enumerate()
            .map(|(i, x)| (x / scales[i / k]).round() as i8)
            .collect();
        out.push((
            "int8".into(),
            Weight::new(rows, k, WeightData::Int8PerRow { q, scales }).unwrap(),
        ));
        out
    }

    /// Asserts that each path's `out[j * t + r]` is the f64 dot of weight row `j`
    /// (dequantized) with activation row `r` as the integer path sees it, within 1e-5 of
    /// Σ|terms|: the exact value of what the integer kernels compute.
    /// `paths` hold token-major results, `out[r * n + j]` (`rows16::dot_rows`).
    pub fn assert_exact(w: &Weight, x: &IntActs, paths: &[(&str, &[f32])], what: &str) {
        let t = x.rows();
        let n = paths[0].1.len() / t;
        let mut wf = vec![0f32; w.cols];
        for j in 0..n {
            w.row_to_f32(j, &mut wf);
            for r in 0..t {
                let (mut exact, mut mag) = (0f64, 1e-3f64);
                for (i, &wv) in wf.iter().enumerate() {
                    let term = x.value(r, i) as f64 * wv as f64;
                    exact += term;
                    mag += term.abs();
                }
                for (path, out) in paths {
                    let got = out[r * n + j];
                    let err = (got as f64 - exact).abs() / mag;
                    assert!(err < 1e-5, "{what} row {j}/{r} {path}: {got} vs {exact}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{values, weights};
    use super::*;

    /// Every block quantizer this CPU runs gives the scalar one's codes, scale and sum, bit
    /// for bit: ties halfway between codes (to even), zeros, the largest code of both
    /// signs, values too small for the step's inverse (codes 0), and a NaN or an infinity,
    /// which make the scale NaN so the dots come out NaN.
    #[test]
    fn every_block_quantizer_equals_the_scalar_one() {
        for bits in [ActBits::Eight, ActBits::Sixteen] {
            let top = bits.top();
            let ties: Vec<f32> = (0..QK)
                .map(|i| if i == 0 { -top } else { i as f32 - 15.5 })
                .collect();
            // Values so small that 1 / step overflows: codes 0, not garbage.
            let tiny: Vec<f32> = (0..QK).map(|i| [1e-38, -3e-39][i % 2]).collect();
            let mut blocks = vec![vec![0f32; QK], ties, values(QK, 7), values(QK, 8), tiny];
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut b = values(QK, 9);
                b[QK - 3] = bad;
                blocks.push(b);
            }
            for ((n, block), (path, quantize)) in blocks
                .iter()
                .enumerate()
                .flat_map(|b| block_quantizers().into_iter().map(move |q| (b, q)))
            {
                let mut want = vec![0i8; bits.block_bytes()];
                let mut got = want.clone();
                let (d0, s0) = quantize_block(block, bits, &mut want);
                let (d1, s1) = quantize(block, bits, &mut got);
                let what = format!("{path} {bits:?} block {n}");
                assert_eq!(
                    (d0.to_bits(), s0, &want),
                    (d1.to_bits(), s1, &got),
                    "{what}"
                );
                assert_eq!(d0.is_nan(), n >= 5, "{what}: scale {d0}");
                if n == 4 {
                    assert!(d0 == 0.0 && want.iter().all(|&c| c == 0), "{what}");
                }
            }
        }
    }

    /// Every layout's blocks, read as codes, scale and offset, give the weight's own values
    /// (`Weight::row_to_f32`): `w = d u + c`.
    #[test]
    fn blocks_read_back_the_weight_values() {
        let (k, rows) = (96, 5);
        for (name, w) in weights(k, rows) {
            assert!(supports(&w), "{name}");
            let (f, read) = blocks_of(&w).unwrap();
            let mut wf = vec![0f32; k];
            let mut blocks = vec![RawBlock::default(); k / QK];
            for j in 0..rows {
                w.row_to_f32(j, &mut wf);
                read(j, &mut blocks);
                for (b, blk) in blocks.iter().enumerate() {
                    let (u, d, c) = blk.decoded(f);
                    for (i, &want) in wf[b * QK..(b + 1) * QK].iter().enumerate() {
                        let got = d * u[i] as f32 + c;
                        let tol = 1e-6 * (d.abs() * 255.0 + c.abs());
                        assert!(
                            (got - want).abs() <= tol,
                            "{name} {j}/{b}/{i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        assert!(blocks_of(&Weight::from_f32(1, 32, vec![0.0; 32]).unwrap()).is_none());
    }

    #[test]
    fn rounding_goes_to_the_nearest_integer_and_ties_to_even() {
        for (x, want) in [
            (0.4f32, 0.0f32),
            (0.5, 0.0),
            (1.5, 2.0),
            (2.5, 2.0),
            (-0.6, -1.0),
        ] {
            assert_eq!(round_to_even(x), want, "{x}");
        }
        for i in -1270..=1270 {
            let x = i as f32 * 0.1 + 0.03;
            assert_eq!(round_to_even(x), x.round(), "{x}");
        }
    }

    #[test]
    fn activation_codes_round_within_half_a_step() {
        let v = values(96, 3);
        for bits in [ActBits::Eight, ActBits::Sixteen] {
            let q = IntActs::quantize(&v, 96, bits);
            for (i, &x) in v.iter().enumerate() {
                let d = q.scales[i / QK];
                // Half a step, plus the f32 rounding of `x / d` (codes up to 2^15).
                let tol = 0.5 * d + 2e-7 * x.abs();
                let what = format!("{bits:?} value {i}");
                assert!((x - q.value(0, i)).abs() <= tol, "{what}");
            }
            let sum: f32 = (2 * QK..3 * QK).map(|i| q.value(0, i) / q.scales[2]).sum();
            assert_eq!(q.scaled_sums[2], q.scales[2] * sum, "{bits:?}");
        }
        // int16: the largest value takes the largest code, 127 * 256 + 127, and the halves
        // stay within int8.
        let q = IntActs::quantize(&[-2.0, 2.0, 1.0, 0.0].repeat(8), 32, ActBits::Sixteen);
        let (codes, d, _) = q.block(0, 0);
        assert_eq!((codes[1], codes[QK + 1]), (127, 127));
        assert_eq!((codes[0], codes[QK]), (-127, -127));
        assert!((q.value(0, 2) - 1.0).abs() <= 0.5 * d);
    }
}
