//! Quantized weights (GGUF Q4_0, Q4_1, Q8_0, planar int4 of any group size, int8 per
//! channel) repacked 16 rows at a time for the integer-dot path: one 512-bit register holds
//! 4 codes of each of 16 rows, so one `vpdpbusd` against 4 activation codes broadcast to
//! every lane advances 16 dot products, and a block's 16 scales are one load. Without VNNI,
//! an AVX2 kernel reads each line as two halves of 8 rows (`vpmaddubsw`, module `avx2`); on
//! ARM, a NEON kernel as four quarters of 4 rows (`sdot`, module `neon`). Reading the
//! GGUF layout in place, each row on its own with each block's scale gathered and spread
//! over the lanes that hold it, decoded 14 GB/s of Q4_0 on one thread at one activation row
//! (cached SmolLM2 shapes); this reads ~50 (benches/RESULTS.md, 2026-12-03). llama.cpp
//! repacks for the same reason.
//!
//! Layout, per group of 16 rows (rows past the matrix's end are zero) and per block of 32
//! columns, in order:
//! ```text
//! 4-bit: 4 lines of 64 bytes. Line k, lane l (bytes 4l..4l+4) = row l's nibble bytes
//!        4k..4k+4 in GGUF order: byte i holds value 4k+i (low) and 16+4k+i (high).
//! 8-bit: 8 lines. Line k, lane l = row l's codes for values 4k..4k+4, as u8 (s + 128).
//! scales: 16 f16 `d` per (group, block), one per row; Q4_1 also 16 f16 offsets `m`.
//! ```
//! Planar int4 follows the rule of the GGUF format it matches (symmetric: Q4_0, asymmetric:
//! Q4_1), its group's scale repeated for each block of the group. Int8 per channel follows
//! Q8_0's, with its f32 row scales kept as they are: 16 per group instead of the f16 `d`s.
//! Each block's sum is `d dx Σ u q + c dx Σ q` as in `qdot` (`c` = -8d, -128d or m), with
//! the activations of `qdot::IntActs` read in place: values 4k..4k+4 of a block are 4
//! adjacent bytes. Int16 activations come as two int8 halves, each with its own chain of
//! dots, joined exactly as `Σ u q = 256 Σ u h + Σ u l` before the one conversion to f32.
//!
//! A model's weights are repacked once, at load, by the backend that will run them
//! (`Backend::prepare_weight`), and the packed form replaces the original storage
//! (`WeightData::Rows16`): it reads back every value bit for bit ([`Rows16::row_to_f32`],
//! for the embedding lookup of tied embeddings), so nothing needs the original after.

use super::qdot::{self, ActBits, IntActs};
use super::simd::Isa;
use crate::{Weight, WeightData};
use half::f16;
use vellum_quant::{BlockFormat, QK};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows per group: the f32 lanes of a 512-bit register.
pub const ROWS: usize = 16;

/// How far ahead in the code stream a group prefetches, in bytes (past the end of its task
/// too, so the next task's first group is on its way).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 4096;

/// 64 bytes on a cache line of their own, so each register load is one aligned line.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A quantized matrix in the 16-row layout (module docs).
#[derive(Clone, Debug)]
pub struct Rows16 {
    /// The storage format this was packed from (`Weight::format_name`).
    source: &'static str,
    format: BlockFormat,
    rows: usize,
    blocks: usize,
    /// `[groups, blocks, lines]`
    codes: Vec<Line>,
    /// `[groups, blocks, 16]`
    scales: Vec<f16>,
    /// `[groups, blocks, 16]` (Q4_1 only)
    mins: Vec<f16>,
    /// `[groups, 16]` f32 scales of int8 per channel, which then has no `scales`.
    row_scales: Vec<f32>,
}

impl Rows16 {
    /// Repacks a quantized weight (`qdot::blocks_of`); `None` for one the integer path cannot
    /// read.
    pub fn pack(w: &Weight) -> Option<Rows16> {
        let (format, read) = qdot::blocks_of(w)?;
        let per_row = matches!(w.data, WeightData::Int8PerRow { .. });
        let blocks = w.cols / QK;
        let groups = w.rows.div_ceil(ROWS);
        let lines = lines_per_block(format);
        let sized = |yes: bool, n: usize| if yes { n } else { 0 };
        let mut p = Rows16 {
            source: w.format_name(),
            format,
            rows: w.rows,
            blocks,
            codes: vec![Line([0; 64]); groups * blocks * lines],
            scales: vec![f16::ZERO; sized(!per_row, groups * blocks * ROWS)],
            mins: vec![f16::ZERO; sized(format == BlockFormat::Q4_1, groups * blocks * ROWS)],
            row_scales: vec![0.0; sized(per_row, groups * ROWS)],
        };
        // The stored code bytes are already in the lines' byte order (module docs): each
        // block's 4-byte groups go to their lanes as they are.
        let mut row_blocks = vec![qdot::RawBlock::default(); blocks];
        for row in 0..w.rows {
            let (g, l) = (row / ROWS, row % ROWS);
            read(row, &mut row_blocks);
            for (b, blk) in row_blocks.iter().enumerate() {
                let at = (g * blocks + b) * lines;
                for (line, quad) in p.codes[at..at + lines]
                    .iter_mut()
                    .zip(blk.bytes.chunks_exact(4))
                {
                    line.0[4 * l..4 * l + 4].copy_from_slice(quad);
                }
                let s = (g * blocks + b) * ROWS + l;
                if per_row {
                    p.row_scales[g * ROWS + l] = blk.d;
                } else {
                    p.scales[s] = f16::from_f32(blk.d);
                }
                if !p.mins.is_empty() {
                    p.mins[s] = f16::from_f32(blk.c);
                }
            }
        }
        Some(p)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.blocks * QK
    }

    /// The storage format this was packed from (`Q4_0`, `int4:g64`, `int8`, ...).
    pub fn source_format(&self) -> &'static str {
        self.source
    }

    /// Bytes held, the zero rows that fill the last group of 16 included.
    pub fn bytes(&self) -> usize {
        self.codes.len() * 64
            + (self.scales.len() + self.mins.len()) * 2
            + self.row_scales.len() * 4
    }

    /// Row `r` as f32 values (`out.len() == cols`), with the arithmetic of the storage it
    /// was packed from, so the values are bit for bit the same.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        for (b, chunk) in out.chunks_exact_mut(QK).enumerate() {
            let (u, d, c) = self.block(r, b);
            for (o, &u) in chunk.iter_mut().zip(&u) {
                *o = match self.format {
                    BlockFormat::Q4_1 => u as f32 * d + c,
                    BlockFormat::Q4_0 => (u as i32 - 8) as f32 * d,
                    BlockFormat::Q8_0 => (u as i32 - 128) as f32 * d,
                };
            }
        }
    }

    /// Block `b` of row `row`: u8 codes in value order, scale `d` and offset coefficient.
    fn block(&self, row: usize, b: usize) -> qdot::Block {
        let (g, l) = (row / ROWS, row % ROWS);
        let lines = lines_per_block(self.format);
        let at = (g * self.blocks + b) * lines;
        let mut u = [0u8; QK];
        for (k, line) in self.codes[at..at + lines].iter().enumerate() {
            for (i, &byte) in line.0[4 * l..4 * l + 4].iter().enumerate() {
                if lines == 4 {
                    u[4 * k + i] = byte & 0x0f;
                    u[16 + 4 * k + i] = byte >> 4;
                } else {
                    u[4 * k + i] = byte;
                }
            }
        }
        let s = (g * self.blocks + b) * ROWS + l;
        let d = match self.row_scales.get(g * ROWS + l) {
            Some(&d) => d,
            None => self.scales[s].to_f32(),
        };
        let c = match self.format {
            BlockFormat::Q4_1 => self.mins[s].to_f32(),
            f => offset_factor(f) * d,
        };
        (u, d, c)
    }
}

fn lines_per_block(f: BlockFormat) -> usize {
    if f == BlockFormat::Q8_0 {
        8
    } else {
        4
    }
}

/// `c / d` for the formats whose offset coefficient is a multiple of the scale.
fn offset_factor(f: BlockFormat) -> f32 {
    if f == BlockFormat::Q8_0 {
        -128.0
    } else {
        -8.0
    }
}

/// `out[r * n + i] = x_r · w[j0 + i]` for `n = out.len() / t` rows from `j0` (a multiple of
/// [`ROWS`]) and every activation row `r` (`t` of them), token-major as the matmul's output
/// is (a pass's 16 lanes are one contiguous store), on `isa`'s kernel: AVX-512 VNNI
/// where present, AVX2 (`vpmaddubsw`) otherwise, NEON `sdot` on ARM, else the scalar
/// reference. Each computes the exact dot of the codes; only the float steps after may round
/// differently.
pub fn dot_rows(isa: Isa, w: &Rows16, j0: usize, x: &IntActs, out: &mut [f32]) {
    let t = x.rows().max(1);
    assert!(
        j0.is_multiple_of(ROWS) && j0 + out.len() / t <= w.rows && x.blocks() == w.blocks,
        "rows {j0}+{} of a [{}, {}x32] 16-row weight, activations of {} blocks",
        out.len() / t,
        w.rows,
        w.blocks,
        x.blocks()
    );
    match isa {
        // SAFETY (both): `isa` is only ever a path this CPU supports (`Isa::detect`), VNNI
        // is detected here, and the shapes are asserted above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if qdot::vnni_available() => unsafe { x86::dot_rows(w, j0, x, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2Fma => unsafe { avx2::dot_rows(w, j0, x, out) },
        // SAFETY: as above, `dotprod` was detected (`Isa::all_supported`).
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => unsafe { neon::dot_rows(w, j0, x, out) },
        Isa::Scalar => dot_rows_scalar(w, j0, x, out),
    }
}

/// The scalar reference of [`dot_rows`]: same sums, in block order.
pub fn dot_rows_scalar(w: &Rows16, j0: usize, x: &IntActs, out: &mut [f32]) {
    let t = x.rows().max(1);
    let n = out.len() / t;
    for (r, dst) in out.chunks_exact_mut(n.max(1)).enumerate() {
        for (i, o) in dst.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..w.blocks {
                let (u, d, c) = w.block(j0 + i, b);
                let (_, dx, sdx) = x.block(r, b);
                let isum = x.int_dot(r, b, &u);
                acc += d * dx * isum as f32 + c * sdx;
            }
            *o = acc;
        }
    }
}

/// The most activation rows a SIMD pass computes at once.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const MAX_PASS: usize = 8;

/// One pass's results: lane `l` of entry `dr` is weight row `16 g + l` against activation
/// row `r0 + dr`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
type Lanes = [[f32; ROWS]; MAX_PASS];

/// The loop both SIMD kernels share: every group of 16 weight rows from `j0`, against the
/// `t` activation rows a pass at a time. `pass(g, r0, lanes)` computes group `g` for some of
/// the rows from `r0` and returns how many; they are stored into `out` as [`dot_rows`]
/// promises.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn for_each_pass(
    j0: usize,
    t: usize,
    out: &mut [f32],
    mut pass: impl FnMut(usize, usize, &mut Lanes) -> usize,
) {
    let n = out.len() / t;
    let mut lanes = [[0f32; ROWS]; MAX_PASS];
    let mut i = 0;
    while i < n {
        let rows = (n - i).min(ROWS);
        let g = (j0 + i) / ROWS;
        let mut r = 0;
        while r < t {
            let rn = pass(g, r, &mut lanes);
            for (dr, lane) in lanes.iter().take(rn).enumerate() {
                let at = (r + dr) * n + i;
                out[at..at + rows].copy_from_slice(&lane[..rows]);
            }
            r += rn;
        }
        i += rows;
    }
}

/// `$rows_of::<LINES, MINS, ROW_SCALES, SPLIT>(w, j0, x, out)` for the activations' width
/// and the weight's format: the kernels each ISA module monomorphizes.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! by_format {
    ($rows_of:ident($w:ident, $j0:ident, $x:ident, $out:ident)) => {
        match $x.bits() {
            ActBits::Eight => by_format!(@format $rows_of, false, $w, $j0, $x, $out),
            ActBits::Sixteen => by_format!(@format $rows_of, true, $w, $j0, $x, $out),
        }
    };
    (@format $rows_of:ident, $split:literal, $w:ident, $j0:ident, $x:ident, $out:ident) => {
        match $w.format {
            BlockFormat::Q4_0 => $rows_of::<4, false, false, $split>($w, $j0, $x, $out),
            BlockFormat::Q4_1 => $rows_of::<4, true, false, $split>($w, $j0, $x, $out),
            BlockFormat::Q8_0 if $w.row_scales.is_empty() => {
                $rows_of::<8, false, false, $split>($w, $j0, $x, $out)
            }
            BlockFormat::Q8_0 => $rows_of::<8, false, true, $split>($w, $j0, $x, $out),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, FMA and F16C must be present; `j0` a multiple of [`ROWS`],
    /// `out.len() / t` rows from it inside the matrix, `x` of the matrix's blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_rows(w: &Rows16, j0: usize, x: &IntActs, out: &mut [f32]) {
        by_format!(rows_of(w, j0, x, out))
    }

    /// [`dot_rows`] for one format: each group of 16 weight rows against the activation rows
    /// 8, 4, 2 or 1 at a time.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn rows_of<
        const LINES: usize,
        const MINS: bool,
        const ROW_SCALES: bool,
        const SPLIT: bool,
    >(
        w: &Rows16,
        j0: usize,
        x: &IntActs,
        out: &mut [f32],
    ) {
        let t = x.rows().max(1);
        // Each decoded block serves every row of a pass: up to 8.
        for_each_pass(j0, t, out, |g, r, lanes| match t - r {
            8.. => group::<8, LINES, MINS, ROW_SCALES, SPLIT>(w, g, x, r, lanes),
            4..=7 => group::<4, LINES, MINS, ROW_SCALES, SPLIT>(w, g, x, r, lanes),
            2..=3 => group::<2, LINES, MINS, ROW_SCALES, SPLIT>(w, g, x, r, lanes),
            _ => group::<1, LINES, MINS, ROW_SCALES, SPLIT>(w, g, x, r, lanes),
        })
    }

    /// Group `g` (16 weight rows) against activation rows `r0..r0 + R`, into `lanes[..R]`;
    /// returns `R`.
    /// `LINES`: 4 (4-bit codes) or 8 (8-bit); `MINS`: Q4_1's per-block offsets;
    /// `ROW_SCALES`: one f32 scale per row (int8 per channel), not an f16 per block;
    /// `SPLIT`: int16 activations in two halves (`ActBits::Sixteen`). Each
    /// (weight row, activation row) sum goes through the same operations whatever `R`, so
    /// a row's result does not depend on the batch.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn group<
        const R: usize,
        const LINES: usize,
        const MINS: bool,
        const ROW_SCALES: bool,
        const SPLIT: bool,
    >(
        w: &Rows16,
        g: usize,
        x: &IntActs,
        r0: usize,
        lanes: &mut Lanes,
    ) -> usize {
        let mut acc = [_mm512_setzero_ps(); R];
        let nib = _mm512_set1_epi8(0x0f);
        let factor = _mm512_set1_ps(offset_factor(w.format));
        let codes = w.codes.as_ptr().add(g * w.blocks * LINES) as *const u8;
        let scales = w.scales.as_ptr().wrapping_add(g * w.blocks * ROWS);
        let row_scales = if ROW_SCALES {
            _mm512_loadu_ps(w.row_scales.as_ptr().add(g * ROWS))
        } else {
            _mm512_setzero_ps()
        };
        let mins = w.mins.as_ptr().wrapping_add(g * w.blocks * ROWS);
        for b in 0..w.blocks {
            let line = codes.add(b * LINES * 64);
            qdot::prefetch_bytes(line.wrapping_add(PREFETCH_AHEAD), LINES * 64);
            // The block's codes as registers whose lane l holds row l's values 4k..4k+4.
            let mut u = [_mm512_setzero_si512(); 8];
            if LINES == 4 {
                for k in 0..4 {
                    let v = _mm512_load_si512(line.add(64 * k) as *const _);
                    u[k] = _mm512_and_si512(v, nib);
                    u[4 + k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                }
            } else {
                for (k, reg) in u.iter_mut().enumerate() {
                    *reg = _mm512_load_si512(line.add(64 * k) as *const _);
                }
            }
            let d = if ROW_SCALES {
                row_scales
            } else {
                _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(b * ROWS) as *const _))
            };
            let m = if MINS {
                _mm512_cvtph_ps(_mm256_loadu_si256(mins.add(b * ROWS) as *const _))
            } else {
                _mm512_setzero_ps()
            };
            for (r, a) in acc.iter_mut().enumerate() {
                let (xq, dx, sdx) = x.block(r0 + r, b);
                // 4-byte groups of the block's activation codes, values 4k..4k+4 (of the
                // half starting at byte `from`).
                let quad = |from: usize, k: usize| {
                    let at = xq.as_ptr().add(from + 4 * k) as *const i32;
                    _mm512_set1_epi32(at.read_unaligned())
                };
                // One chain per activation row (per half): integer sums are exact in any
                // grouping, so a row's result is the same whatever `R`.
                let mut s = _mm512_setzero_si512();
                for (k, &uk) in u.iter().enumerate() {
                    s = _mm512_dpbusd_epi32(s, uk, quad(0, k));
                }
                if SPLIT {
                    let mut lo = _mm512_setzero_si512();
                    for (k, &uk) in u.iter().enumerate() {
                        lo = _mm512_dpbusd_epi32(lo, uk, quad(QK, k));
                    }
                    s = _mm512_add_epi32(_mm512_slli_epi32(s, 8), lo);
                }
                let isum = _mm512_cvtepi32_ps(s);
                let (dx, sdx) = (_mm512_set1_ps(dx), _mm512_set1_ps(sdx));
                if MINS {
                    *a = _mm512_fmadd_ps(_mm512_mul_ps(isum, dx), d, *a);
                    *a = _mm512_fmadd_ps(m, sdx, *a);
                } else {
                    let t = _mm512_fmadd_ps(isum, dx, _mm512_mul_ps(factor, sdx));
                    *a = _mm512_fmadd_ps(t, d, *a);
                }
            }
        }
        for (lane, a) in lanes.iter_mut().zip(acc) {
            _mm512_storeu_ps(lane.as_mut_ptr(), a);
        }
        R
    }
}

/// The AVX2 kernel (no VNNI): `vpmaddubsw` multiplies u8 codes by s8 activation codes into
/// pairs of i16 sums, `vpmaddwd` against ones widens them to i32. Each 256-bit half of a line
/// holds 8 rows. The i16 sums must not saturate: a 4-bit code times an s8 code, two per lane
/// and 8 lanes of a block added, is at most 8 · 2 · 15 · 128 = 30720; 8-bit codes go through
/// as two nibbles, `Σ u q = 16 Σ (u >> 4) q + Σ (u & 15) q`, for the same bound.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    /// # Safety
    /// AVX2, FMA and F16C must be present; shapes as [`super::dot_rows`] asserts.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(w: &Rows16, j0: usize, x: &IntActs, out: &mut [f32]) {
        by_format!(rows_of(w, j0, x, out))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_of<
        const LINES: usize,
        const MINS: bool,
        const ROW_SCALES: bool,
        const SPLIT: bool,
    >(
        w: &Rows16,
        j0: usize,
        x: &IntActs,
        out: &mut [f32],
    ) {
        let t = x.rows().max(1);
        // Up to 4 rows a pass: two halves of accumulators each, in 16 registers.
        for_each_pass(j0, t, out, |g, r, lanes| match t - r {
            4.. => group::<4, LINES, MINS, ROW_SCALES, SPLIT>(w, g, x, r, lanes),
            2..=3 => group::<2, LINES, MINS, ROW_SCALES, SPLIT>(w, g, x, r, lanes),
            _ => group::<1, LINES, MINS, ROW_SCALES, SPLIT>(w, g, x, r, lanes),
        })
    }

    /// Group `g` against activation rows `r0..r0 + R` into `lanes[..R]`; returns `R`.
    /// Parameters as in the VNNI kernel.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<
        const R: usize,
        const LINES: usize,
        const MINS: bool,
        const ROW_SCALES: bool,
        const SPLIT: bool,
    >(
        w: &Rows16,
        g: usize,
        x: &IntActs,
        r0: usize,
        lanes: &mut Lanes,
    ) -> usize {
        // `[rows 0–7, rows 8–15]` per activation row.
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let nib = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let factor = _mm256_set1_ps(offset_factor(w.format));
        let codes = w.codes.as_ptr().add(g * w.blocks * LINES) as *const u8;
        let scales = w.scales.as_ptr().wrapping_add(g * w.blocks * ROWS);
        let mins = w.mins.as_ptr().wrapping_add(g * w.blocks * ROWS);
        let row_scales = w.row_scales.as_ptr().wrapping_add(g * ROWS);
        for b in 0..w.blocks {
            let line = codes.add(b * LINES * 64);
            for off in (0..LINES * 64).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(PREFETCH_AHEAD + off) as *const i8);
            }
            for h in 0..2 {
                // Registers whose lane l holds row 8h + l's codes for values 4k..4k+4:
                // `low[k]`, and for 8-bit codes their high nibbles `high[k]`.
                let mut low = [_mm256_setzero_si256(); 8];
                let mut high = [_mm256_setzero_si256(); 8];
                for k in 0..LINES {
                    let v = _mm256_loadu_si256(line.add(64 * k + 32 * h) as *const _);
                    let (lo, hi) = (
                        _mm256_and_si256(v, nib),
                        _mm256_and_si256(_mm256_srli_epi16(v, 4), nib),
                    );
                    if LINES == 4 {
                        (low[k], low[4 + k]) = (lo, hi);
                    } else {
                        (low[k], high[k]) = (lo, hi);
                    }
                }
                let d = if ROW_SCALES {
                    _mm256_loadu_ps(row_scales.add(8 * h))
                } else {
                    _mm256_cvtph_ps(_mm_loadu_si128(scales.add(b * ROWS + 8 * h) as *const _))
                };
                let m = if MINS {
                    _mm256_cvtph_ps(_mm_loadu_si128(mins.add(b * ROWS + 8 * h) as *const _))
                } else {
                    _mm256_setzero_ps()
                };
                for (r, a) in acc.iter_mut().enumerate() {
                    let (xq, dx, sdx) = x.block(r0 + r, b);
                    // Σ over the block of `regs` × the activation half at byte `from`, in i32.
                    let dot = |regs: &[__m256i; 8], from: usize| {
                        let mut s = _mm256_setzero_si256();
                        for (k, &reg) in regs.iter().enumerate() {
                            let at = xq.as_ptr().add(from + 4 * k) as *const i32;
                            let q = _mm256_set1_epi32(at.read_unaligned());
                            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(reg, q));
                        }
                        _mm256_madd_epi16(s, ones)
                    };
                    let codes_dot = |from: usize| {
                        if LINES == 4 {
                            dot(&low, from)
                        } else {
                            _mm256_add_epi32(
                                _mm256_slli_epi32(dot(&high, from), 4),
                                dot(&low, from),
                            )
                        }
                    };
                    let mut s = codes_dot(0);
                    if SPLIT {
                        s = _mm256_add_epi32(_mm256_slli_epi32(s, 8), codes_dot(QK));
                    }
                    let isum = _mm256_cvtepi32_ps(s);
                    let (dx, sdx) = (_mm256_set1_ps(dx), _mm256_set1_ps(sdx));
                    if MINS {
                        a[h] = _mm256_fmadd_ps(_mm256_mul_ps(isum, dx), d, a[h]);
                        a[h] = _mm256_fmadd_ps(m, sdx, a[h]);
                    } else {
                        let t = _mm256_fmadd_ps(isum, dx, _mm256_mul_ps(factor, sdx));
                        a[h] = _mm256_fmadd_ps(t, d, a[h]);
                    }
                }
            }
        }
        for (lane, a) in lanes.iter_mut().zip(acc) {
            _mm256_storeu_ps(lane.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(lane.as_mut_ptr().add(8), a[1]);
        }
        R
    }
}

/// The NEON kernel (ARMv8.2 `dotprod`): `sdot` adds the products of 4 s8 codes with 4 s8
/// activation codes into each i32 lane, so a 128-bit quarter of a line (4 rows) against one
/// 4-byte group of activations, picked by lane, advances 4 dot products. Both operands are
/// signed: 4-bit codes (0–15) are valid as they are; 8-bit codes `u = s + 128` enter as `s`
/// (`u ^ 0x80`), so for them the kernel sums `d dx Σ s q` with no offset term, which is
/// the same value as `d dx Σ u q - 128 d dx Σ q` without its cancellation.
///
/// `sdot` by lane is written in `asm!`: its intrinsic (`vdotq_laneq_s32`) is not stable
/// Rust yet, nor are the f16 vector types (the scales are widened by `fcvtl`, also `asm!`).
/// No software prefetch: ARM cores' stream prefetchers are unmeasured here (no ARM machine).
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::*;
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// # Safety
    /// NEON and `dotprod` must be present; shapes as [`super::dot_rows`] asserts.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn dot_rows(w: &Rows16, j0: usize, x: &IntActs, out: &mut [f32]) {
        by_format!(rows_of(w, j0, x, out))
    }

    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn rows_of<
        const LINES: usize,
        const MINS: bool,
        const ROW_SCALES: bool,
        const SPLIT: bool,
    >(
        w: &Rows16,
        j0: usize,
        x: &IntActs,
        out: &mut [f32],
    ) {
        let t = x.rows().max(1);
        // Up to 4 rows a pass: 4 accumulators (one per quarter of the group) each.
        for_each_pass(j0, t, out, |g, r, lanes| match t - r {
            4.. => group::<4, LINES, MINS, ROW_SCALES, SPLIT>(w, g, x, r, lanes),
            2..=3 => group::<2, LINES, MINS, ROW_SCALES, SPLIT>(w, g, x, r, lanes),
            _ => group::<1, LINES, MINS, ROW_SCALES, SPLIT>(w, g, x, r, lanes),
        })
    }

    /// `acc + Σ` over each lane of `w`'s 4 codes times activation codes `4L..4L+4` of `x`.
    #[inline(always)]
    unsafe fn sdot_lane<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{l}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            l = const L,
            options(pure, nomem, nostack),
        );
        acc
    }

    /// 4 f16 values at `p` as f32 (exact for every finite value, subnormals included).
    #[inline(always)]
    unsafe fn f16x4(p: *const f16) -> float32x4_t {
        let h = vld1_u16(p as *const u16);
        let out: float32x4_t;
        asm!(
            "fcvtl {o:v}.4s, {h:v}.4h",
            o = out(vreg) out,
            h = in(vreg) h,
            options(pure, nomem, nostack),
        );
        out
    }

    /// Group `g` against activation rows `r0..r0 + R` into `lanes[..R]`; returns `R`.
    /// Parameters as in the VNNI kernel.
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn group<
        const R: usize,
        const LINES: usize,
        const MINS: bool,
        const ROW_SCALES: bool,
        const SPLIT: bool,
    >(
        w: &Rows16,
        g: usize,
        x: &IntActs,
        r0: usize,
        lanes: &mut Lanes,
    ) -> usize {
        // `[rows 0–3, 4–7, 8–11, 12–15]` per activation row.
        let mut acc = [[vdupq_n_f32(0.0); 4]; R];
        let nib = vdupq_n_u8(0x0f);
        let sign = vdupq_n_u8(0x80);
        let factor = vdupq_n_f32(offset_factor(w.format));
        let codes = w.codes.as_ptr().add(g * w.blocks * LINES) as *const u8;
        let scales = w.scales.as_ptr().wrapping_add(g * w.blocks * ROWS);
        let mins = w.mins.as_ptr().wrapping_add(g * w.blocks * ROWS);
        let row_scales = w.row_scales.as_ptr().wrapping_add(g * ROWS);
        for b in 0..w.blocks {
            let line = codes.add(b * LINES * 64);
            for q in 0..4 {
                // `u[k]`: lane l holds row 4q + l's codes for values 4k..4k+4, as s8.
                let mut u = [vdupq_n_s8(0); 8];
                for k in 0..LINES {
                    let v = vld1q_u8(line.add(64 * k + 16 * q));
                    if LINES == 4 {
                        u[k] = vreinterpretq_s8_u8(vandq_u8(v, nib));
                        u[4 + k] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                    } else {
                        u[k] = vreinterpretq_s8_u8(veorq_u8(v, sign));
                    }
                }
                let d = if ROW_SCALES {
                    vld1q_f32(row_scales.add(4 * q))
                } else {
                    f16x4(scales.add(b * ROWS + 4 * q))
                };
                for (r, a) in acc.iter_mut().enumerate() {
                    let (xq, dx, sdx) = x.block(r0 + r, b);
                    // Σ over the block of `u` × the activation half at byte `from`, in i32.
                    let dot = |from: usize| {
                        let half = [
                            vld1q_s8(xq.as_ptr().add(from)),
                            vld1q_s8(xq.as_ptr().add(from + 16)),
                        ];
                        let mut s = vdupq_n_s32(0);
                        for (k, &uk) in u.iter().enumerate() {
                            let x = half[k / 4];
                            s = match k % 4 {
                                0 => sdot_lane::<0>(s, uk, x),
                                1 => sdot_lane::<1>(s, uk, x),
                                2 => sdot_lane::<2>(s, uk, x),
                                _ => sdot_lane::<3>(s, uk, x),
                            };
                        }
                        s
                    };
                    let mut s = dot(0);
                    if SPLIT {
                        s = vaddq_s32(vshlq_n_s32::<8>(s), dot(QK));
                    }
                    let isum = vcvtq_f32_s32(s);
                    let (dx, sdx) = (vdupq_n_f32(dx), vdupq_n_f32(sdx));
                    let a = &mut a[q];
                    if LINES == 8 {
                        *a = vfmaq_f32(*a, vmulq_f32(isum, dx), d);
                    } else if MINS {
                        let m = f16x4(mins.add(b * ROWS + 4 * q));
                        *a = vfmaq_f32(*a, vmulq_f32(isum, dx), d);
                        *a = vfmaq_f32(*a, m, sdx);
                    } else {
                        let t = vfmaq_f32(vmulq_f32(factor, sdx), isum, dx);
                        *a = vfmaq_f32(*a, t, d);
                    }
                }
            }
        }
        for (lane, a) in lanes.iter_mut().zip(acc) {
            for (q, v) in a.into_iter().enumerate() {
                vst1q_f32(lane.as_mut_ptr().add(4 * q), v);
            }
        }
        R
    }
}

#[cfg(test)]
mod tests {
    use super::qdot::testing::{assert_exact, values, weights, weights_of};
    use super::*;

    const BITS: [ActBits; 2] = [ActBits::Eight, ActBits::Sixteen];

    /// Every code, scale and offset survives the packing, and the packed weight reads back
    /// the original's values bit for bit, so it can replace the original storage.
    #[test]
    fn packing_keeps_every_code_scale_and_offset() {
        for (name, w) in weights(96, 19) {
            let p = Rows16::pack(&w).unwrap();
            let (f, read) = qdot::blocks_of(&w).unwrap();
            let mut blocks = [qdot::RawBlock::default(); 3];
            for row in 0..19 {
                read(row, &mut blocks);
                for (b, blk) in blocks.iter().enumerate() {
                    assert_eq!(p.block(row, b), blk.decoded(f), "{name} {row}/{b}");
                }
            }
            let transposed = WeightData::Rows16(Box::new(p.clone()));
            assert!(
                Weight::new(96, 19, transposed).is_err(),
                "{name}: shape checked"
            );
            let packed = Weight::new(19, 96, WeightData::Rows16(Box::new(p))).unwrap();
            assert_eq!(packed.format_name(), w.format_name());
            let bits = |w: &Weight| w.to_f32().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&packed), bits(&w), "{name}");
            assert!(Rows16::pack(&packed).is_none(), "{name}: packed twice");
        }
        assert!(Rows16::pack(&Weight::from_f32(2, 32, vec![0.0; 64]).unwrap()).is_none());
    }

    /// Every kernel this CPU runs (scalar, AVX2, AVX-512 VNNI) against the exact value
    /// (`assert_exact`): every quantized layout, row counts that end inside a group, block
    /// counts 1, 3, 9 and 18, and 1–15 activation rows (every pass height).
    #[test]
    fn dots_match_the_exact_value_on_every_path() {
        let shapes = [(32usize, 1usize), (96, 6), (576, 5), (576, 1), (288, 15)];
        for ((k, t), bits) in shapes.into_iter().flat_map(|s| BITS.map(|b| (s, b))) {
            let x = IntActs::quantize(&values(t * k, 2), k, bits);
            for rows in [1usize, 16, 17, 40] {
                for (name, w) in weights(k, rows) {
                    let what = format!("{name} {bits:?} k {k} rows {rows}");
                    check_every_path(&w, &x, &what);
                }
            }
        }
    }

    fn check_every_path(w: &Weight, x: &IntActs, what: &str) {
        let p = &Rows16::pack(w).unwrap();
        let outs: Vec<(&str, Vec<f32>)> = Isa::all_supported()
            .into_iter()
            .map(|isa| {
                let mut out = vec![0f32; w.rows * x.rows()];
                dot_rows(isa, p, 0, x, &mut out);
                (isa.name(), out)
            })
            .collect();
        let paths: Vec<(&str, &[f32])> = outs.iter().map(|(n, o)| (*n, &o[..])).collect();
        assert_exact(w, x, &paths, what);
    }

    /// The largest codes on both sides (8-bit weights 255 and 0 after the offset, 4-bit 15,
    /// activations ±127 and int16 halves of every sign) stay exact: no i16 sum saturates in
    /// the AVX2 kernel.
    #[test]
    fn the_largest_codes_do_not_saturate() {
        let k = 64;
        for sign in [1.0f32, -1.0] {
            // Columns of one sign per block, so each block's codes sit at the extremes.
            let v: Vec<f32> = (0..17 * k)
                .map(|i| sign * [3.0, -3.0][i / 32 % 2])
                .collect();
            let acts: Vec<f32> = (0..2 * k)
                .map(|i| {
                    if i % 32 == 5 {
                        1.0
                    } else {
                        [1.0, -0.99805][i / 32 % 2]
                    }
                })
                .collect();
            for bits in BITS {
                let x = IntActs::quantize(&acts, k, bits);
                for (name, w) in weights_of(&v, k, 17) {
                    check_every_path(&w, &x, &format!("{name} {bits:?} sign {sign}"));
                }
            }
        }
    }

    /// A task that starts at a later group computes what the whole matrix gives there, and
    /// each row gives the same bits alone as among 11 activation rows (passes of 8, 2, 1).
    #[test]
    fn results_do_not_depend_on_the_task_or_the_batch() {
        let (k, t) = (576, 11);
        let v = values(t * k, 4);
        let weights = weights(k, 40);
        let cases = weights.iter().flat_map(|w| BITS.map(|b| (w, b)));
        for (((name, w), bits), isa) in
            cases.flat_map(|c| Isa::all_supported().into_iter().map(move |i| (c, i)))
        {
            let x = IntActs::quantize(&v, k, bits);
            let p = &Rows16::pack(w).unwrap();
            let (mut all, mut part) = (vec![0f32; 40 * t], vec![0f32; 24 * t]);
            dot_rows(isa, p, 0, &x, &mut all);
            dot_rows(isa, p, 16, &x, &mut part);
            let what = format!("{name} {bits:?} {}", isa.name());
            for r in 0..t {
                assert_eq!(
                    &all[r * 40 + 16..(r + 1) * 40],
                    &part[r * 24..(r + 1) * 24],
                    "{what}"
                );
                let alone = IntActs::quantize(&v[r * k..(r + 1) * k], k, bits);
                let mut one = vec![0f32; 40];
                dot_rows(isa, p, 0, &alone, &mut one);
                for (j, o) in one.iter().enumerate() {
                    assert_eq!(o.to_bits(), all[r * 40 + j].to_bits(), "{what} row {j}/{r}");
                }
            }
        }
    }
}
