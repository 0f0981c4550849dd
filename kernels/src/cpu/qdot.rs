//! Integer dot products for quantized weights, the way llama.cpp runs quantized models on a
//! CPU: each activation row is quantized once per matmul to int8 blocks of 32 (scale
//! `amax / 127`), and each weight block meets it in a u8 × s8 integer dot (AVX-512 VNNI
//! `vpdpbusd`: 64 multiply-adds per instruction) with one float scale per block.
//! Every quantized weight layout is read in place: GGUF Q8_0/Q4_0/Q4_1 blocks, planar int4
//! at any group size (symmetric or not) and int8 per channel.
//!
//! Every weight format is brought to u8 codes `u` so one instruction serves all, with a
//! per-block offset coefficient `c`:
//! ```text
//! Q4_0, int4 sym:   w = (n - 8) d      Σ w x = d dx Σ n q  +  (-8 d)   dx Σ q
//! Q4_1, int4 asym:  w = n d + m        Σ w x = d dx Σ n q  +  m        dx Σ q
//! Q8_0, int8:       w = s d (s: i8)    Σ w x = d dx Σ u q  +  (-128 d) dx Σ q,  u = s + 128
//! ```
//! where `q` are the activation codes of the block, `dx` its scale, and `dx Σ q` is kept with
//! them. The integer sums are exact; the float accumulation of the SIMD path (per-lane
//! partial sums) differs from the scalar reference within the bound its test documents. A
//! row's result never depends on the other rows of the batch.
//!
//! Speed comes from the layout of the quantized activations, chosen to match what 512-bit
//! registers of weight codes hold after the cheapest decode. Blocks are taken 8 at a time
//! ("a chunk", 256 values), as four registers of 64 u8 codes:
//! ```text
//! register 0: blocks 0..4 of the chunk, values 0..16 of each (16 bytes per block)
//! register 1: blocks 0..4, values 16..32      register 3: blocks 4..8, values 16..32
//! register 2: blocks 4..8, values 0..16
//! ```
//! For 4-bit codes that is two 64-byte loads, a shift and four ANDs (the low nibbles are
//! values 0..16, the high ones 16..32). In registers 0 and 1 dot lane `l` (4 bytes) belongs
//! to block `l / 4`, and likewise in 2 and 3, so `vpdpbusd` accumulates each pair of
//! registers in one integer sum; one conversion and one FMA (with the lanes' `d dx`) then
//! serve 128 values. Activation codes are stored in the same order, activation scales
//! expanded to the lanes, and the offsets handled per chunk in one 8-lane FMA.
//!
//! GGUF blocks (Q4_0, Q4_1, Q8_0) do not come through here in the backend: they are
//! repacked 16 rows per register (`rows16`), which reads them ~3x faster at one activation
//! row. The layouts below are read in place (planar int4, int8 per channel), and
//! [`Q8Acts`] serves both.
//!
//! The cost is accuracy, which is why the path is opt-in (`VELLUM_INT_DOT=1`,
//! `Cpu::with_int_dot`). Rounding activations to 8 bits per block of 32 (an outlier channel
//! leaves the rest of its block few levels) moves SmolLM2's log-probabilities by up to ~0.3
//! nats: perplexity changes by -0.8% to +1.3% depending on the weights, the real-model
//! golden scores fall outside transformers' tolerance, and the greedy answer to "What is
//! the capital of France?" on the Q4_1 model stops being "Paris" (benches/RESULTS.md,
//! 2026-12-03). The kernels themselves are exact: the result is the float matmul of the
//! rounded activations to 1e-5 (tested).

use super::pool::Pool;
use crate::{Weight, WeightData};
use half::f16;
use vellum_quant::{BlockFormat, QK};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// How far ahead (in weight rows) the VNNI path prefetches: past the end of one rayon
/// task's rows too, so a thread starting the next task finds its first rows on the way.
const PREFETCH_ROWS: usize = 16;

/// Blocks in a chunk (see the module docs).
const CHUNK: usize = 8;
/// Values in a chunk: four registers of codes.
const CHUNK_VALUES: usize = CHUNK * QK;
/// Dot lanes (i32) per chunk: two registers' worth, 4 per block.
const CHUNK_LANES: usize = 2 * 16;

/// Where values `4k..4k + 4` of a block sit, from its first code (values 0..16 of a block
/// are adjacent, 16..32 one register on).
#[inline]
pub(super) fn quad_offset(k: usize) -> usize {
    chunk_pos(0, 4 * k)
}

/// Where value `j` of block `b` sits in the chunk order (see the module docs).
#[inline]
fn chunk_pos(b: usize, j: usize) -> usize {
    let (c, i) = (b / CHUNK, b % CHUNK);
    c * CHUNK_VALUES + (i / 4) * 128 + (j / 16) * 64 + (i % 4) * 16 + j % 16
}

/// The first of block `b`'s 4 lanes in the chunk's lane order.
#[inline]
fn lane_of(b: usize) -> usize {
    (b / CHUNK) * CHUNK_LANES + (b % CHUNK) * 4
}

/// Activation rows quantized to int8 blocks of 32, in the chunk order.
pub struct Q8Acts {
    rows: usize,
    blocks: usize,
    chunks: usize,
    /// `[rows, chunks, 256]` codes in the chunk order; zero past the row's end.
    codes: Vec<i8>,
    /// `[rows, chunks, 32]` each lane's block scale `dx`.
    lane_scales: Vec<f32>,
    /// `[rows, chunks, 8]` each block's scale (zero past the row's end).
    scales: Vec<f32>,
    /// `[rows, chunks, 8]` each block's `dx Σ q` (zero past the row's end).
    scaled_sums: Vec<f32>,
}

impl Q8Acts {
    /// Quantizes `x` (rows of `k`, `k` a multiple of 32).
    pub fn quantize(x: &[f32], k: usize) -> Q8Acts {
        assert!(
            k > 0 && k.is_multiple_of(QK),
            "{k} columns are not whole blocks"
        );
        let rows = x.len() / k;
        let blocks = k / QK;
        let chunks = blocks.div_ceil(CHUNK);
        let mut q = Q8Acts {
            rows,
            blocks,
            chunks,
            codes: vec![0; rows * chunks * CHUNK_VALUES],
            lane_scales: vec![0.0; rows * chunks * CHUNK_LANES],
            scales: vec![0.0; rows * chunks * CHUNK],
            scaled_sums: vec![0.0; rows * chunks * CHUNK],
        };
        let mut rows: Vec<_> = q
            .codes
            .chunks_mut(chunks * CHUNK_VALUES)
            .zip(q.lane_scales.chunks_mut(chunks * CHUNK_LANES))
            .zip(q.scales.chunks_mut(chunks * CHUNK))
            .zip(q.scaled_sums.chunks_mut(chunks * CHUNK))
            .zip(x.chunks_exact(k))
            .collect();
        Pool::global().for_each_mut(&mut rows, |((((codes, lanes), scales), sums), row)| {
            for (b, block) in row.chunks_exact(QK).enumerate() {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let mut sum = 0i32;
                for (j, &v) in block.iter().enumerate() {
                    let c = round_to_even(v * id) as i8;
                    sum += c as i32;
                    codes[chunk_pos(b, j)] = c;
                }
                lanes[lane_of(b)..lane_of(b) + 4].fill(d);
                scales[b] = d;
                sums[b] = d * sum as f32;
            }
        });
        q
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Block `b` of row `r`: a pointer to its first code in the chunk order, its scale
    /// `dx` and `dx Σ q`. Values `4k..4k + 4` are the 4 bytes at [`quad_offset`]`(k)`.
    pub(super) fn block_raw(&self, r: usize, b: usize) -> (*const i8, f32, f32) {
        let at = r * self.chunks * CHUNK + b;
        let first = r * self.chunks * CHUNK_VALUES + chunk_pos(b, 0);
        (
            self.codes[first..].as_ptr(),
            self.scales[at],
            self.scaled_sums[at],
        )
    }

    /// Block `b` of row `r`: its codes in value order, `dx` and `dx Σ q`.
    pub(super) fn block(&self, r: usize, b: usize) -> ([i8; QK], f32, f32) {
        let mut q = [0i8; QK];
        let base = r * self.chunks * CHUNK_VALUES;
        for (j, v) in q.iter_mut().enumerate() {
            *v = self.codes[base + chunk_pos(b, j)];
        }
        let at = r * self.chunks * CHUNK + b;
        (q, self.scales[at], self.scaled_sums[at])
    }

    /// Activation value `j` of row `r` as the integer path sees it (code × scale).
    pub fn value(&self, r: usize, j: usize) -> f32 {
        let (b, jj) = (j / QK, j % QK);
        let code = self.codes[r * self.chunks * CHUNK_VALUES + chunk_pos(b, jj)];
        code as f32 * self.scales[r * self.chunks * CHUNK + b]
    }
}

/// `x` rounded to the nearest integer, ties to even, for |x| <= 2^22: adding 1.5 · 2^23 leaves
/// no fraction bits. `f32::round` is a libm call on baseline x86-64 (no SSE4.1), ~1–3 µs per
/// decode matmul's activations.
#[inline]
fn round_to_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
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

/// One quantized weight row as the integer path reads it (see the module docs).
///
/// # Safety
/// Implementations: `codes(c, n)` and `chunk(c, n)` must read only the row's first `n`
/// blocks from `8c`. Callers of the unsafe methods: the CPU must have AVX-512 F/BW/VL, FMA
/// and F16C, and `8c + n` must not pass the row's blocks.
pub unsafe trait QRow: Sync {
    fn blocks(&self) -> usize;
    /// Block `b`'s u8 codes in value order, its scale `d` and offset coefficient `c`.
    fn block(&self, b: usize) -> ([u8; QK], f32, f32);
    /// The u8 codes of the `n` (1..=8) blocks from `8c` as the chunk's four registers
    /// (module docs); lanes past `n` need not be zero (their activations are).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::missing_safety_doc)] // on the trait
    unsafe fn codes(&self, c: usize, n: usize) -> [__m512i; 4];
    /// Scales and offset coefficients of the `n` (1..=8) blocks from `8c`; lanes past `n`
    /// need not be zero (their activations are).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::missing_safety_doc)] // on the trait
    unsafe fn chunk(&self, c: usize, n: usize) -> (__m256, __m256);
    /// Asks for chunk `c`'s bytes to be brought into the cache (a hint; never faults).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::missing_safety_doc)] // on the trait
    unsafe fn prefetch(&self, c: usize);
}

/// Prefetches the cache lines of `len` bytes from `p` into L2, like `simd::prefetch` (a hint:
/// never faults, even past the end of the data).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn prefetch_bytes<T>(p: *const T, len: usize) {
    let p = p as *const i8;
    for off in (0..len).step_by(64) {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(off));
    }
}

/// GGUF block formats as const parameters of [`BlockRow`].
pub const Q8_0: u8 = 0;
pub const Q4_0: u8 = 1;
pub const Q4_1: u8 = 2;

/// A row of GGUF blocks: `| d: f16 | q[32]: i8 |` (Q8_0), `| d | qs[16] |` (Q4_0),
/// `| d | m: f16 | qs[16] |` (Q4_1).
pub struct BlockRow<'a, const F: u8>(pub &'a [u8]);

impl<const F: u8> BlockRow<'_, F> {
    const BYTES: usize = match F {
        Q8_0 => 34,
        Q4_0 => 18,
        _ => 20,
    };
    const CODES_AT: usize = if F == Q4_1 { 4 } else { 2 };
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Block `b` of a row of GGUF blocks in format `f`: u8 codes in value order, scale and
/// offset coefficient (see the module docs).
pub(super) fn block_codes(f: BlockFormat, row: &[u8], b: usize) -> ([u8; QK], f32, f32) {
    match f {
        BlockFormat::Q8_0 => BlockRow::<Q8_0>(row).block(b),
        BlockFormat::Q4_0 => BlockRow::<Q4_0>(row).block(b),
        BlockFormat::Q4_1 => BlockRow::<Q4_1>(row).block(b),
    }
}

/// `(row, block) -> (codes, d, c)` of a quantized weight, as [`block_codes`].
pub(super) type BlockReader<'a> = Box<dyn Fn(usize, usize) -> ([u8; QK], f32, f32) + 'a>;

/// The blocks of a quantized weight (GGUF blocks, planar int4, int8 per channel), with the
/// GGUF format whose offset rule they follow: `c = -8d` (Q4_0, symmetric int4), `c = m`
/// (Q4_1, asymmetric int4) or `c = -128d` (Q8_0, int8 per channel). `None` for dense
/// weights.
pub(super) fn blocks_of(w: &Weight) -> Option<(BlockFormat, BlockReader<'_>)> {
    let k = w.cols;
    match &w.data {
        WeightData::Int8PerRow { q, scales } => {
            let read = move |j: usize, b: usize| {
                let row = Int8Row {
                    q: &q[j * k..(j + 1) * k],
                    scale: scales[j],
                };
                row.block(b)
            };
            Some((BlockFormat::Q8_0, Box::new(read)))
        }
        WeightData::Block(f, bytes) => {
            let rb = k / QK * f.block_bytes();
            let f = *f;
            let read = move |j: usize, b: usize| block_codes(f, &bytes[j * rb..(j + 1) * rb], b);
            Some((f, Box::new(read)))
        }
        WeightData::Int4(f, d) => {
            let groups = k.div_ceil(f.group);
            let per = f.group / QK;
            let span = move |j: usize| j * groups..(j + 1) * groups;
            let packed = move |j: usize| &d.packed[j * k / 2..(j + 1) * k / 2];
            if f.symmetric {
                let read = move |j: usize, b: usize| {
                    let (scales, mins) = (&d.scales[span(j)], &[][..]);
                    Int4Row::<true> {
                        packed: packed(j),
                        scales,
                        mins,
                        per,
                    }
                    .block(b)
                };
                Some((BlockFormat::Q4_0, Box::new(read)))
            } else {
                let read = move |j: usize, b: usize| {
                    let (scales, mins) = (&d.scales[span(j)], &d.mins[span(j)]);
                    Int4Row::<false> {
                        packed: packed(j),
                        scales,
                        mins,
                        per,
                    }
                    .block(b)
                };
                Some((BlockFormat::Q4_1, Box::new(read)))
            }
        }
        _ => None,
    }
}

/// A 16-byte chunk of nibbles (GGUF order) as 32 u8 codes in value order.
fn nibbles(qs: &[u8], out: &mut [u8; QK]) {
    for j in 0..QK / 2 {
        out[j] = qs[j] & 0x0f;
        out[j + QK / 2] = qs[j] >> 4;
    }
}

unsafe impl<const F: u8> QRow for BlockRow<'_, F> {
    fn blocks(&self) -> usize {
        self.0.len() / Self::BYTES
    }

    fn block(&self, b: usize) -> ([u8; QK], f32, f32) {
        let blk = &self.0[b * Self::BYTES..(b + 1) * Self::BYTES];
        let d = f16_at(blk, 0);
        let mut u = [0u8; QK];
        match F {
            Q8_0 => {
                for (o, &s) in u.iter_mut().zip(&blk[2..]) {
                    *o = s ^ 0x80;
                }
                (u, d, -128.0 * d)
            }
            Q4_0 => {
                nibbles(&blk[2..], &mut u);
                (u, d, -8.0 * d)
            }
            _ => {
                nibbles(&blk[4..], &mut u);
                (u, d, f16_at(blk, 2))
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn codes(&self, c: usize, n: usize) -> [__m512i; 4] {
        let first = self
            .0
            .as_ptr()
            .add(c * CHUNK * Self::BYTES + Self::CODES_AT);
        let at = |i: usize| first.add(i * Self::BYTES);
        if F == Q8_0 {
            // Each block's 32 codes, two blocks per register, then split into halves.
            let mut two = [_mm512_setzero_si512(); 4];
            for (h, reg) in two.iter_mut().enumerate() {
                let (i0, i1) = (2 * h, 2 * h + 1);
                if i0 < n {
                    let lo = _mm256_loadu_si256(at(i0) as *const __m256i);
                    *reg = _mm512_castsi256_si512(lo);
                }
                if i1 < n {
                    let hi = _mm256_loadu_si256(at(i1) as *const __m256i);
                    *reg = _mm512_inserti64x4(*reg, hi, 1);
                }
            }
            let (a_lo, a_hi) = split_halves(two[0], two[1]);
            let (b_lo, b_hi) = split_halves(two[2], two[3]);
            let flip = _mm512_set1_epi8(-128);
            [a_lo, a_hi, b_lo, b_hi].map(|r| _mm512_xor_si512(r, flip))
        } else {
            // Four blocks' 16 bytes of nibbles per register.
            let mut regs = [_mm512_setzero_si512(); 2];
            for (h, reg) in regs.iter_mut().enumerate() {
                let mut q = [_mm_setzero_si128(); 4];
                for (i, v) in q.iter_mut().enumerate() {
                    if 4 * h + i < n {
                        *v = _mm_loadu_si128(at(4 * h + i) as *const __m128i);
                    }
                }
                let low = _mm256_set_m128i(q[1], q[0]);
                let high = _mm256_set_m128i(q[3], q[2]);
                *reg = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
            }
            split_nibbles(regs)
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn chunk(&self, c: usize, n: usize) -> (__m256, __m256) {
        let base = self.0.as_ptr().add(c * CHUNK * Self::BYTES);
        let mut h = [[0i16; CHUNK]; 2];
        for i in 0..n {
            for (f, v) in h.iter_mut().enumerate() {
                v[i] = (base.add(i * Self::BYTES + 2 * f) as *const i16).read_unaligned();
            }
        }
        let gather = |h: [i16; CHUNK]| {
            _mm256_cvtph_ps(_mm_setr_epi16(
                h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7],
            ))
        };
        let d = gather(h[0]);
        let coef = match F {
            Q8_0 => _mm256_mul_ps(d, _mm256_set1_ps(-128.0)),
            Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
            _ => gather(h[1]),
        };
        (d, coef)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn prefetch(&self, c: usize) {
        let at = self.0.as_ptr().wrapping_add(c * CHUNK * Self::BYTES);
        prefetch_bytes(at, CHUNK * Self::BYTES);
    }
}

/// Two registers of 16-byte nibble chunks (GGUF order: byte j holds values j and j + 16)
/// as the chunk's four registers of u8 codes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn split_nibbles([a, b]: [__m512i; 2]) -> [__m512i; 4] {
    let m = _mm512_set1_epi8(0x0f);
    let high = |r: __m512i| _mm512_and_si512(_mm512_srli_epi16(r, 4), m);
    [
        _mm512_and_si512(a, m),
        high(a),
        _mm512_and_si512(b, m),
        high(b),
    ]
}

/// Two registers of whole 32-value blocks (`[b0, b1]`, `[b2, b3]`) as the registers of
/// their values 0..16 and 16..32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn split_halves(a: __m512i, b: __m512i) -> (__m512i, __m512i) {
    let lo = _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13);
    let hi = _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15);
    (
        _mm512_permutex2var_epi64(a, lo, b),
        _mm512_permutex2var_epi64(a, hi, b),
    )
}

/// A row of planar int4 (`vellum_quant::int4`): codes, group scales and (asymmetric)
/// offsets; `per` = blocks of 32 per group (1, 2 or 4).
pub struct Int4Row<'a, const SYM: bool> {
    pub packed: &'a [u8],
    pub scales: &'a [f16],
    pub mins: &'a [f16],
    pub per: usize,
}

unsafe impl<const SYM: bool> QRow for Int4Row<'_, SYM> {
    fn blocks(&self) -> usize {
        self.packed.len() / (QK / 2)
    }

    fn block(&self, b: usize) -> ([u8; QK], f32, f32) {
        let mut u = [0u8; QK];
        nibbles(&self.packed[b * QK / 2..], &mut u);
        let d = self.scales[b / self.per].to_f32();
        let coef = if SYM {
            -8.0 * d
        } else {
            self.mins[b / self.per].to_f32()
        };
        (u, d, coef)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn codes(&self, c: usize, n: usize) -> [__m512i; 4] {
        let at = self.packed.as_ptr().add(c * CHUNK * QK / 2);
        if n == CHUNK {
            let a = _mm512_loadu_si512(at as *const _);
            let b = _mm512_loadu_si512(at.add(64) as *const _);
            split_nibbles([a, b])
        } else {
            let bytes = n * QK / 2;
            let mask = |from: usize| match bytes.saturating_sub(from) {
                0 => 0,
                64.. => !0u64,
                m => (1u64 << m) - 1,
            };
            let a = _mm512_maskz_loadu_epi8(mask(0), at as *const i8);
            let b = _mm512_maskz_loadu_epi8(mask(64), at.add(64) as *const i8);
            split_nibbles([a, b])
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn chunk(&self, c: usize, n: usize) -> (__m256, __m256) {
        // The chunk's groups, then each block's lane picks its group's value.
        let g0 = c * CHUNK / self.per;
        let count = (c * CHUNK + n).div_ceil(self.per) - g0;
        let mask = ((1u32 << count) - 1) as u8;
        let groups = match self.per {
            1 => _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            2 => _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
            _ => _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
        };
        let h = _mm_maskz_loadu_epi16(mask, self.scales.as_ptr().add(g0) as *const i16);
        let d = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), groups);
        let coef = if SYM {
            _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
        } else {
            let h = _mm_maskz_loadu_epi16(mask, self.mins.as_ptr().add(g0) as *const i16);
            _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), groups)
        };
        (d, coef)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn prefetch(&self, c: usize) {
        prefetch_bytes(
            self.packed.as_ptr().wrapping_add(c * CHUNK * QK / 2),
            CHUNK * QK / 2,
        );
        let g = c * CHUNK / self.per;
        prefetch_bytes(self.scales.as_ptr().wrapping_add(g), 1);
        if !SYM {
            prefetch_bytes(self.mins.as_ptr().wrapping_add(g), 1);
        }
    }
}

/// A row of int8 per channel: `w = s * scale`.
pub struct Int8Row<'a> {
    pub q: &'a [i8],
    pub scale: f32,
}

unsafe impl QRow for Int8Row<'_> {
    fn blocks(&self) -> usize {
        self.q.len() / QK
    }

    fn block(&self, b: usize) -> ([u8; QK], f32, f32) {
        let mut u = [0u8; QK];
        for (o, &s) in u.iter_mut().zip(&self.q[b * QK..]) {
            *o = (s as u8) ^ 0x80;
        }
        (u, self.scale, -128.0 * self.scale)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn codes(&self, c: usize, n: usize) -> [__m512i; 4] {
        let at = self.q.as_ptr().add(c * CHUNK_VALUES);
        let bytes = n * QK;
        let mut two = [_mm512_setzero_si512(); 4];
        for (h, reg) in two.iter_mut().enumerate() {
            let mask = match bytes.saturating_sub(64 * h) {
                0 => 0,
                64.. => !0u64,
                m => (1u64 << m) - 1,
            };
            *reg = _mm512_maskz_loadu_epi8(mask, at.add(64 * h));
        }
        let (a_lo, a_hi) = split_halves(two[0], two[1]);
        let (b_lo, b_hi) = split_halves(two[2], two[3]);
        let flip = _mm512_set1_epi8(-128);
        [a_lo, a_hi, b_lo, b_hi].map(|r| _mm512_xor_si512(r, flip))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn chunk(&self, _c: usize, _n: usize) -> (__m256, __m256) {
        (
            _mm256_set1_ps(self.scale),
            _mm256_set1_ps(-128.0 * self.scale),
        )
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn prefetch(&self, c: usize) {
        prefetch_bytes(self.q.as_ptr().wrapping_add(c * CHUNK_VALUES), CHUNK_VALUES);
    }
}

/// Scalar reference: `out[r] = x_r · w` for every quantized activation row.
pub fn dot_rows_scalar<W: QRow>(w: &W, x: &Q8Acts, out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        let (codes, scales) = (
            &x.codes[r * x.chunks * CHUNK_VALUES..],
            &x.scales[r * x.chunks * CHUNK..],
        );
        let sums = &x.scaled_sums[r * x.chunks * CHUNK..];
        let (mut acc, mut off) = (0f32, 0f32);
        for b in 0..x.blocks {
            let (u, d, c) = w.block(b);
            let isum: i32 = (0..QK)
                .map(|j| u[j] as i32 * codes[chunk_pos(b, j)] as i32)
                .sum();
            acc += d * scales[b] * isum as f32;
            off += c * sums[b];
        }
        *o = acc + off;
    }
}

/// `out[i * t + r] = x_r · rows[i]` for every weight row `i` and activation row `r` (`t`
/// rows): the VNNI path where it runs, else the scalar one.
/// `rows` may go on past the `out.len() / t` rows computed: those are only prefetched.
fn dot_rows<V: QRow>(rows: &[V], x: &Q8Acts, out: &mut [f32], path: Path) {
    debug_assert!(rows.iter().all(|w| w.blocks() == x.blocks));
    #[cfg(target_arch = "x86_64")]
    if path == Path::Best && vnni_available() {
        // SAFETY: the features were detected above; every row has the activations' blocks.
        unsafe { x86::dot_rows(rows, out.len() / x.rows.max(1), x, out) };
        return;
    }
    let t = x.rows.max(1);
    for (w, dst) in rows.iter().zip(out.chunks_exact_mut(t)) {
        dot_rows_scalar(w, x, dst);
    }
}

/// `out[i * t + r] = x_r · w[j0 + i]` for `out.len() / t` rows of a quantized weight
/// ([`supports`]), `t` = the activation rows.
pub fn dot_weight_rows(w: &Weight, j0: usize, x: &Q8Acts, out: &mut [f32]) {
    weight_rows_on(Path::Best, w, j0, x, out)
}

/// Which code computes the dots: the best this CPU runs, or the scalar reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Best,
    #[cfg_attr(not(test), allow(dead_code))]
    Scalar,
}

fn weight_rows_on(path: Path, w: &Weight, j0: usize, x: &Q8Acts, out: &mut [f32]) {
    let k = w.cols;
    // The rows after this call's are views for the prefetcher (they are not computed).
    let rows = j0..(j0 + out.len() / x.rows.max(1) + PREFETCH_ROWS).min(w.rows);
    match &w.data {
        WeightData::Block(f, bytes) => {
            let rb = k / QK * f.block_bytes();
            let row = |j: usize| &bytes[j * rb..(j + 1) * rb];
            match f {
                BlockFormat::Q8_0 => {
                    let views: Vec<_> = rows.map(|j| BlockRow::<Q8_0>(row(j))).collect();
                    dot_rows(&views, x, out, path)
                }
                BlockFormat::Q4_0 => {
                    let views: Vec<_> = rows.map(|j| BlockRow::<Q4_0>(row(j))).collect();
                    dot_rows(&views, x, out, path)
                }
                BlockFormat::Q4_1 => {
                    let views: Vec<_> = rows.map(|j| BlockRow::<Q4_1>(row(j))).collect();
                    dot_rows(&views, x, out, path)
                }
            }
        }
        WeightData::Int4(f, d) => {
            let groups = k.div_ceil(f.group);
            let packed = |j: usize| &d.packed[j * k / 2..(j + 1) * k / 2];
            let span = |j: usize| j * groups..(j + 1) * groups;
            let per = f.group / QK;
            if f.symmetric {
                let views: Vec<_> = rows
                    .map(|j| Int4Row::<true> {
                        packed: packed(j),
                        scales: &d.scales[span(j)],
                        mins: &[],
                        per,
                    })
                    .collect();
                dot_rows(&views, x, out, path)
            } else {
                let views: Vec<_> = rows
                    .map(|j| Int4Row::<false> {
                        packed: packed(j),
                        scales: &d.scales[span(j)],
                        mins: &d.mins[span(j)],
                        per,
                    })
                    .collect();
                dot_rows(&views, x, out, path)
            }
        }
        WeightData::Int8PerRow { q, scales } => {
            let views: Vec<_> = rows
                .map(|j| Int8Row {
                    q: &q[j * k..(j + 1) * k],
                    scale: scales[j],
                })
                .collect();
            dot_rows(&views, x, out, path)
        }
        _ => unreachable!("dot_weight_rows on a float weight (callers check `supports`)"),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    /// A tile is up to `TILE_W` weight rows × `TILE_R` activation rows: each decoded weight
    /// chunk is reused `TILE_R` times, each activation load `TILE_W` times, and the
    /// `TILE_W × TILE_R` running sums are independent FMA chains that all stay in registers.
    const TILE_W: usize = 4;
    const TILE_R: usize = 4;

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, FMA and F16C must be present; every row has `x.blocks` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_rows<V: QRow>(rows: &[V], n: usize, x: &Q8Acts, out: &mut [f32]) {
        let t = x.rows;
        let mut i = 0;
        while i < n {
            let wn = if n - i >= TILE_W { TILE_W } else { 1 };
            let mut r = 0;
            while r < t {
                let rn = (t - r).min(TILE_R);
                let (w, at) = (&rows[i..i + wn], (i, r));
                // The first pass over these weight rows streams them from memory: ask for
                // the rows a few tiles on meanwhile. Later passes find them in the cache.
                let ahead = if r == 0 {
                    &rows[(i + PREFETCH_ROWS).min(rows.len())
                        ..(i + PREFETCH_ROWS + wn).min(rows.len())]
                } else {
                    &[]
                };
                match (wn, rn) {
                    (TILE_W, 4) => tile::<V, TILE_W, 4>(w, ahead, x, at, out),
                    (TILE_W, 3) => tile::<V, TILE_W, 3>(w, ahead, x, at, out),
                    (TILE_W, 2) => tile::<V, TILE_W, 2>(w, ahead, x, at, out),
                    (TILE_W, _) => tile::<V, TILE_W, 1>(w, ahead, x, at, out),
                    (_, 4) => tile::<V, 1, 4>(w, ahead, x, at, out),
                    (_, 3) => tile::<V, 1, 3>(w, ahead, x, at, out),
                    (_, 2) => tile::<V, 1, 2>(w, ahead, x, at, out),
                    _ => tile::<V, 1, 1>(w, ahead, x, at, out),
                }
                r += rn;
            }
            i += wn;
        }
    }

    /// Blocks `8c..8c + n` of the tile's weight rows against its activation rows. A macro,
    /// not a function: it must be inlined into `tile` to keep the sums in registers, and
    /// `#[inline(always)]` is not allowed with `#[target_feature]`.
    /// `body` for each listed `i` below `n`, written out: each `i` is a constant,
    /// so arrays indexed by it (the tile's sums) stay in registers. LLVM does not unroll
    /// loops this large by itself.
    macro_rules! unroll {
        ($i:ident in [$($k:literal),+] < $n:expr => $body:block) => {{
            let n: usize = $n;
            debug_assert!(n <= [$($k),+].len());
            $(
                if $k < n {
                    let $i: usize = $k;
                    $body
                }
            )+
        }};
    }

    macro_rules! chunk {
        ($w:expr, $x:expr, $r0:expr, $c:expr, $n:expr, $acc:expr) => {{
            let (w, x, r0, c, n, acc): (&[V], &Q8Acts, usize, usize, usize, &mut [[__m512; R]; W]) =
                ($w, $x, $r0, $c, $n, $acc);
            // The offset terms first, block by block in the low 8 lanes.
            let mut sums = [_mm256_setzero_ps(); R];
            unroll!(r in [0, 1, 2, 3] < R => {
                let at = ((r0 + r) * x.chunks + c) * CHUNK;
                sums[r] = _mm256_loadu_ps(x.scaled_sums.as_ptr().add(at));
            });
            // Each weight row's block scales expanded to the lanes of registers 0/1 and 2/3.
            let low = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            let high = _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
            let mut d = [[_mm512_setzero_ps(); 2]; W];
            unroll!(wi in [0, 1, 2, 3] < W => {
                let (scales, coef) = w[wi].chunk(c, n);
                let scales = _mm512_castps256_ps512(scales);
                d[wi] = [
                    _mm512_permutexvar_ps(low, scales),
                    _mm512_permutexvar_ps(high, scales),
                ];
                let coef = _mm512_zextps256_ps512(coef);
                unroll!(r in [0, 1, 2, 3] < R => {
                    let s = _mm512_zextps256_ps512(sums[r]);
                    acc[wi][r] = _mm512_fmadd_ps(coef, s, acc[wi][r]);
                });
            });
            let halves = if n > 4 { 2 } else { 1 };
            unroll!(wi in [0, 1, 2, 3] < W => {
                let u = w[wi].codes(c, n);
                unroll!(r in [0, 1, 2, 3] < R => {
                    let at = (r0 + r) * x.chunks + c;
                    let xq = x.codes.as_ptr().add(at * CHUNK_VALUES);
                    let dx = x.lane_scales.as_ptr().add(at * CHUNK_LANES);
                    unroll!(h in [0, 1] < halves => {
                        let x0 = _mm512_loadu_si512(xq.add(128 * h) as *const _);
                        let x1 = _mm512_loadu_si512(xq.add(128 * h + 64) as *const _);
                        let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[2 * h], x0);
                        let dot = _mm512_dpbusd_epi32(dot, u[2 * h + 1], x1);
                        let scale = _mm512_mul_ps(d[wi][h], _mm512_loadu_ps(dx.add(16 * h)));
                        acc[wi][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[wi][r]);
                    });
                });
            });
        }};
    }

    /// Weight rows `w` (the tile's `W`, from row `i0`) against activation rows
    /// `r0..r0 + R`. Each (weight row, activation row) sum goes through the same operations
    /// in the same order whatever the tile's shape, so results do not depend on how rows
    /// are grouped.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile<V: QRow, const W: usize, const R: usize>(
        w: &[V],
        ahead: &[V],
        x: &Q8Acts,
        (i0, r0): (usize, usize),
        out: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); R]; W];
        // Whole chunks with constant trip counts (unrolled), then the short last one.
        let whole = x.blocks / CHUNK;
        for c in 0..whole {
            for row in ahead {
                row.prefetch(c);
            }
            chunk!(w, x, r0, c, CHUNK, &mut acc);
        }
        if whole < x.chunks {
            chunk!(w, x, r0, whole, x.blocks - whole * CHUNK, &mut acc);
        }
        for (wi, sums) in acc.iter().enumerate() {
            for (r, s) in sums.iter().enumerate() {
                out[(i0 + wi) * x.rows + r0 + r] = _mm512_reduce_add_ps(*s);
            }
        }
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
        let v = values(rows * k, 1);
        let mut out = Vec::new();
        for f in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1] {
            let mut bytes = Vec::new();
            f.quantize(&v, &mut bytes).unwrap();
            let w = Weight::new(rows, k, WeightData::Block(f, bytes)).unwrap();
            out.push((f.name().to_string(), w));
        }
        for group in Int4Format::GROUPS {
            for symmetric in [true, false] {
                let f = Int4Format::new(group, symmetric).unwrap();
                let d = f
                    .quantize(rows, k, &v, ScaleSearch::RoundToNearest)
                    .unwrap();
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
    pub fn assert_exact(w: &Weight, x: &Q8Acts, paths: &[(&str, &[f32])], what: &str) {
        let t = x.rows();
        let mut wf = vec![0f32; w.cols];
        for j in 0..paths[0].1.len() / t {
            w.row_to_f32(j, &mut wf);
            for r in 0..t {
                let (mut exact, mut mag) = (0f64, 1e-3f64);
                for (i, &wv) in wf.iter().enumerate() {
                    let term = x.value(r, i) as f64 * wv as f64;
                    exact += term;
                    mag += term.abs();
                }
                for (path, out) in paths {
                    let got = out[j * t + r];
                    let err = (got as f64 - exact).abs() / mag;
                    assert!(err < 1e-5, "{what} row {j}/{r} {path}: {got} vs {exact}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{assert_exact, values, weights};
    use super::*;

    /// Both paths against the f64 dot of the dequantized weights with the dequantized
    /// activations (the exact value of what the integer path computes), and the SIMD path
    /// against the scalar one: within 1e-5 of Σ|terms|, for every layout, odd block counts
    /// (1, 3, 9, 10, 18, 48) and row counts (1..=9, so every pass width and a remainder).
    #[test]
    fn integer_dots_match_the_exact_value_and_each_other() {
        for (k, t) in [
            (32usize, 1usize),
            (96, 3),
            (288, 9),
            (320, 5),
            (576, 9),
            (1536, 2),
        ] {
            let x = Q8Acts::quantize(&values(t * k, 2), k);
            assert_eq!(x.rows(), t);
            for (name, w) in weights(k, 3) {
                assert!(supports(&w), "{name}");
                let mut simd = vec![0f32; 3 * t];
                dot_weight_rows(&w, 0, &x, &mut simd);
                let mut scalar = vec![0f32; 3 * t];
                weight_rows_on(Path::Scalar, &w, 0, &x, &mut scalar);
                let paths = [("scalar", &scalar[..]), ("simd", &simd[..])];
                assert_exact(&w, &x, &paths, &format!("{name} k {k}"));
            }
        }
    }

    /// A row alone gives bit for bit what it gave among the others (batch invariance).
    #[test]
    fn a_row_gives_the_same_bits_in_any_batch() {
        let k = 576;
        let x = Q8Acts::quantize(&values(11 * k, 4), k);
        let last = Q8Acts::quantize(&values(11 * k, 4)[10 * k..], k);
        for (name, w) in weights(k, 2) {
            let (mut all, mut alone) = (vec![0f32; 2 * 11], vec![0f32; 2]);
            dot_weight_rows(&w, 0, &x, &mut all);
            dot_weight_rows(&w, 0, &last, &mut alone);
            for j in 0..2 {
                assert_eq!(
                    alone[j].to_bits(),
                    all[j * 11 + 10].to_bits(),
                    "{name} row {j}"
                );
            }
        }
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
        let q = Q8Acts::quantize(&v, 96);
        for (i, &x) in v.iter().enumerate() {
            let d = q.scales[i / QK];
            assert!((x - q.value(0, i)).abs() <= 0.5 * d * 1.0001, "value {i}");
        }
        // Past the row's end (3 blocks of a chunk of 8) the codes are zero.
        let row = &q.codes[..CHUNK_VALUES];
        for b in 3..CHUNK {
            assert!((0..QK).all(|j| row[chunk_pos(b, j)] == 0), "block {b}");
        }
        let sum: i32 = (0..QK).map(|j| q.codes[chunk_pos(2, j)] as i32).sum();
        assert_eq!(q.scaled_sums[2], q.scales[2] * sum as f32);
    }
}
