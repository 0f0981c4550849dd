//! SIMD primitives with run-time dispatch, chosen once per process.
//!
//! The dot products are written once, generic over a [`Row`] that loads weights as f32
//! vectors straight from their stored format (f32, f16, bf16, or group-32 blocks decoded in
//! registers), so a matmul never widens a weight row into memory first.
//!
//! Every path reduces in a fixed order that depends only on the vector length, so a row's
//! result is the same whatever else is in the batch (on one machine and one path). Since a
//! `Row` yields exactly the values `Weight::row_to_f32` would, a fused dot equals the f32
//! dot of the dequantized row, bit for bit.

use super::kv_rows::{chunk_view, KvRows};
use std::sync::OnceLock;

/// The instruction set the primitives run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// NEON with the dot-product extension (ARMv8.2 `dotprod`: Jetson Orin's Cortex-A78AE,
    /// Graviton 2 and later, Apple M1 and later). Only the integer dots of quantized
    /// weights have their own kernel (`rows16::neon`); f32 primitives run the scalar code,
    /// which the compiler vectorizes with baseline NEON.
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => "neon-dotprod",
        }
    }

    /// The best path this CPU supports; `VELLUM_ISA=scalar|avx2` lowers it (for testing).
    pub fn detect() -> Isa {
        let all = Self::all_supported();
        let best = *all.last().expect("scalar is always supported");
        match std::env::var("VELLUM_ISA").as_deref() {
            Ok("scalar") => Isa::Scalar,
            #[cfg(target_arch = "x86_64")]
            Ok("avx2") if all.contains(&Isa::Avx2Fma) => Isa::Avx2Fma,
            _ => best,
        }
    }

    /// All paths this CPU can run, worst to best (for parity tests).
    pub fn all_supported() -> Vec<Isa> {
        #[allow(unused_mut)] // nothing is pushed on other architectures
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push(Isa::NeonDot);
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 {
                v.push(Isa::Avx2Fma);
                if is_x86_feature_detected!("avx512f") {
                    v.push(Isa::Avx512);
                }
            }
        }
        v
    }
}

/// The process-wide path, detected on first use.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(Isa::detect)
}

/// A weight row that SIMD code can read as f32 vectors.
///
/// # Safety
/// Implementations must keep `load8(i)` / `load16(i)` within the row for every `i` with
/// `i + 8 <= len()` / `i + 16 <= len()` (multiples of 8 / 16).
#[allow(clippy::len_without_is_empty)]
pub unsafe trait Row {
    fn len(&self) -> usize;
    /// The row's stored bytes (to prefetch them ahead of use).
    fn bytes(&self) -> &[u8];
    /// Element `i` as f32 (scalar path and tails).
    fn get(&self, i: usize) -> f32;
    /// Elements `i..i+8`.
    ///
    /// # Safety
    /// `i + 8 <= len()`, and the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(&self, i: usize) -> std::arch::x86_64::__m256;
    /// Elements `i..i+16`.
    ///
    /// # Safety
    /// `i + 16 <= len()`, and the CPU has AVX-512F (and AVX2, FMA, F16C).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(&self, i: usize) -> std::arch::x86_64::__m512;
}

/// Asks for `bytes` to be brought into L2 (a hint; no effect off x86-64, where it is
/// unmeasured). Into L2, not L1: an L1 prefetch holds one of the core's few L1 miss buffers
/// until its line arrives, which caps the lines in flight from memory. Measured (2 threads):
/// TinyLlama-shape Q4_0 decode with integer dots 39-40 -> 46-47 tok/s, SmolLM2 Q4_0 291 ->
/// 350, f16 93 -> 104-106 (benches/RESULTS.md).
#[inline]
pub fn prefetch(bytes: &[u8]) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: prefetching is a hint that never faults; the address is inside `bytes`.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            _mm_prefetch::<_MM_HINT_T1>(line.as_ptr() as *const i8)
        };
    }
}

/// Dot product of `x` with a row of the same length.
#[inline]
pub fn dot_row<R: Row + ?Sized>(isa: Isa, x: &[f32], w: &R) -> f32 {
    debug_assert_eq!(x.len(), w.len());
    match isa {
        Isa::Scalar => dot_scalar(x, w),
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => dot_scalar(x, w),
        // SAFETY: the variant exists only when detection found the features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { x86::dot_avx2(x, w) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::dot_avx512(x, w) },
    }
}

/// How many activation rows [`dot_rows`] takes at once on a path.
/// At most 8 (callers keep a fixed-size array of row slices).
pub fn rows_per_pass(isa: Isa) -> usize {
    match isa {
        Isa::Scalar => 1,
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => 1,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => 2,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => 8,
    }
}

/// `out[r] = x[r] · w` for `rows_per_pass(isa)` activation rows, loading (and decoding)
/// each weight vector once for all of them. Each row's result is bit-identical to
/// [`dot_row`] of that row alone: same accumulators, same order.
#[inline]
pub fn dot_rows<R: Row + ?Sized>(isa: Isa, x: &[&[f32]], w: &R, out: &mut [f32]) {
    debug_assert_eq!(x.len(), rows_per_pass(isa));
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe {
            x86::dot_rows_avx2::<R, 2>(x.try_into().expect("2 rows"), w, out)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe {
            x86::dot_rows_avx512::<R, 8>(x.try_into().expect("8 rows"), w, out)
        },
        _ => {
            for (o, x) in out.iter_mut().zip(x) {
                *o = dot_row(isa, x, w);
            }
        }
    }
}

/// Weight rows × activation rows of one [`dot_tile`] (AVX-512 only). 2 × 6 instead of 3 × 4
/// decodes a third fewer weight vectors per FMA (f16 conversions share a port with FMAs;
/// quantized rows on the float path decode whole blocks): SmolLM2 prefill of 512 tokens on
/// Q4_0 weights decoded to f32 +10–17%, f16 level. Even MATMUL_CHUNKs also leave no weight
/// row outside a tile.
pub const TILE_W: usize = 2;
pub const TILE_T: usize = 6;

/// Whether [`dot_tile`] runs on this path.
pub fn has_tile(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// `out[j][r] = x[r] · w[j]` for a tile of `TILE_W` weight rows and `TILE_T` activation
/// rows: every loaded vector feeds several FMAs. Each result is bit-identical to
/// [`dot_row`] of that pair alone. Only for paths where [`has_tile`] is true.
#[inline]
pub fn dot_tile<R: Row + ?Sized>(
    isa: Isa,
    x: [&[f32]; TILE_T],
    w: [&R; TILE_W],
    out: &mut [[f32; TILE_T]; TILE_W],
) {
    assert!(has_tile(isa), "dot_tile on {isa:?}");
    // SAFETY: has_tile means AVX-512F (and AVX2/FMA/F16C) were detected.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::dot_tile_avx512(x, w, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, w, out);
}

/// Dot product of equal-length f32 slices.
#[inline]
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    dot_row(isa, a, b)
}

/// One query head of an attention tile: its vector, how many cached positions it sees (the
/// first `visible` of the tile's offsets) and its output.
pub struct QueryRow<'a> {
    pub q: &'a [f32],
    pub visible: usize,
    pub out: &'a mut [f32],
}

/// Cached positions per pass of a tile over K or V. One head's rows of a chunk (8 KiB at 64
/// values) stay in L1 while every query row of the tile reads them. Read once per query
/// row instead, a long context streams from L3 at every row, at L3's bandwidth.
const KV_CHUNK: usize = 32;

/// The attention of a tile of query heads that share one KV head (a GQA group, several
/// tokens of one sequence) over the K/V rows that start at `offsets` (each `q.len()` long,
/// in `k` and `v`): `row.out = Σ_{i < row.visible} softmax_i(scale · row.q·k_i) v_i`.
///
/// Each row's arithmetic is the same whatever the tile around it: its scores in position
/// order, its softmax, its weighted sum in position order. A token's output does not depend
/// on how the batch was tiled, nor on whether the cache holds f32 or the same values in f16
/// or int8 ([`KvRows`]). The AVX-512 and AVX2 paths (head sizes 64 and 128) score 16 or 8
/// positions at a time and add each V row to outputs held in registers (AVX-512: to several
/// rows' at once), instead of a dot and an axpy call per position.
pub fn attend_rows<R: KvRows + ?Sized>(
    isa: Isa,
    rows: &mut [QueryRow],
    (k, v): (&R, &R),
    offsets: &[usize],
    scale: f32,
) {
    let Some(hd) = rows.first().map(|r| r.q.len()) else {
        return;
    };
    assert!(
        rows.iter()
            .all(|r| r.q.len() == hd && r.out.len() == hd && r.visible <= offsets.len()),
        "attention rows of unequal heads, or seeing past their offsets"
    );
    let n = rows.iter().map(|r| r.visible).max().unwrap_or(0);
    let fits = |at: usize| at + hd <= k.len() && at + hd <= v.len();
    assert!(
        offsets[..n].iter().all(|&at| fits(at)),
        "attention rows past the cache"
    );
    let path = AttentionPath::of(isa, hd);
    // The positions of the chunk from `c0` that a row sees, if any.
    let chunk = |c0: usize, row: &QueryRow| {
        (c0 < row.visible).then(|| c0..(c0 + KV_CHUNK).min(row.visible))
    };
    let chunk_offsets = |c0: usize| &offsets[c0..(c0 + KV_CHUNK).min(n)];
    // Only a cache that is widened needs the scratch and its offsets.
    let (mut scratch, packed): (Vec<f32>, Vec<usize>) = match k.in_place() {
        Some(_) => (Vec::new(), Vec::new()),
        None => (
            vec![0f32; KV_CHUNK * hd],
            (0..KV_CHUNK).map(|i| i * hd).collect(),
        ),
    };

    let mut scores: Vec<Vec<f32>> = rows.iter().map(|r| Vec::with_capacity(r.visible)).collect();
    // Each pass asks for the next chunk's rows while it works on this one (the last K chunk
    // for V's first): a paged pool's rows are scattered, and a decode at a 2,000-token
    // context ran 8–37% faster with the hint (benches/RESULTS.md).
    for c0 in (0..n).step_by(KV_CHUNK) {
        if c0 + KV_CHUNK < n {
            k.prefetch(chunk_offsets(c0 + KV_CHUNK), hd);
        } else {
            v.prefetch(chunk_offsets(0), hd);
        }
        let (k, offsets) = chunk_view(isa, k, chunk_offsets(c0), hd, &mut scratch, &packed);
        for (row, s) in rows.iter().zip(&mut scores) {
            let Some(range) = chunk(c0, row) else {
                continue;
            };
            let offsets = &offsets[..range.len()];
            // SAFETY (both register paths): their ISA was detected (`isa`), the head size is
            // theirs (`AttentionPath::of`), and every row is in bounds (asserted).
            match path {
                #[cfg(target_arch = "x86_64")]
                AttentionPath::Avx512 => unsafe {
                    match hd {
                        64 => x86::scores_avx512::<4>(row.q, k, offsets, scale, s),
                        _ => x86::scores_avx512::<8>(row.q, k, offsets, scale, s),
                    }
                },
                #[cfg(target_arch = "x86_64")]
                AttentionPath::Avx2 => unsafe {
                    match hd {
                        64 => x86::scores_avx2::<8>(row.q, k, offsets, scale, s),
                        _ => x86::scores_avx2::<16>(row.q, k, offsets, scale, s),
                    }
                },
                AttentionPath::Generic => s.extend(
                    offsets
                        .iter()
                        .map(|&at| dot(isa, row.q, &k[at..at + hd]) * scale),
                ),
            }
        }
    }
    // A row that sees nothing gets zeros (not 0 · ∞ on the register paths).
    let inv: Vec<f32> = scores
        .iter_mut()
        .map(|s| match s.is_empty() {
            true => 0.0,
            false => 1.0 / super::vmath::exp_normalized(isa, s),
        })
        .collect();

    rows.iter_mut().for_each(|r| r.out.fill(0.0));
    for c0 in (0..n).step_by(KV_CHUNK) {
        if c0 + KV_CHUNK < n {
            v.prefetch(chunk_offsets(c0 + KV_CHUNK), hd);
        }
        let (v, offsets) = chunk_view(isa, v, chunk_offsets(c0), hd, &mut scratch, &packed);
        // SAFETY: as above.
        match path {
            #[cfg(target_arch = "x86_64")]
            AttentionPath::Avx512 => unsafe {
                // Groups of 3 where rows come in threes (SmolLM2's GQA groups of 3 heads: a
                // group is one token, whose rows see the same positions), else of 4.
                match hd {
                    64 if rows.len().is_multiple_of(3) => {
                        weighted_sums_avx512::<4, 3>(rows, &scores, v, offsets, c0)
                    }
                    64 => weighted_sums_avx512::<4, 4>(rows, &scores, v, offsets, c0),
                    _ => weighted_sums_avx512::<8, 2>(rows, &scores, v, offsets, c0),
                }
            },
            #[cfg(target_arch = "x86_64")]
            AttentionPath::Avx2 => {
                for (row, s) in rows.iter_mut().zip(&scores) {
                    let Some(range) = chunk(c0, row) else {
                        continue;
                    };
                    let offsets = &offsets[..range.len()];
                    let p = &s[range];
                    // A head of 128 in two halves of 64: 8 accumulators, the rest of the 16
                    // registers for the loads.
                    for (half, out) in row.out.chunks_exact_mut(64).enumerate() {
                        unsafe { x86::weighted_sum_avx2(&v[64 * half..], offsets, p, out) };
                    }
                }
            }
            AttentionPath::Generic => {
                for ((row, s), &inv) in rows.iter_mut().zip(&scores).zip(&inv) {
                    let Some(range) = chunk(c0, row) else {
                        continue;
                    };
                    for (&at, &p) in offsets[..range.len()].iter().zip(&s[range]) {
                        axpy(isa, p * inv, &v[at..at + hd], row.out);
                    }
                }
            }
        }
    }
    // The register paths sum unnormalized and scale once.
    if path != AttentionPath::Generic {
        for (row, &inv) in rows.iter_mut().zip(&inv) {
            row.out.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

/// Which kernels a tile's attention runs on: registers for the common head sizes (64, 128)
/// where the ISA has a path, a dot and an axpy call per position otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttentionPath {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Generic,
}

impl AttentionPath {
    fn of(isa: Isa, hd: usize) -> AttentionPath {
        match (isa, hd) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, 64 | 128) => AttentionPath::Avx512,
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2Fma, 64 | 128) => AttentionPath::Avx2,
            _ => AttentionPath::Generic,
        }
    }
}

/// The unnormalized weighted sums of the chunk from `c0` (its V rows at `offsets`, the
/// first at position `c0`), added to each row's output: rows in groups of `R` that share
/// each V row load over the positions all of them see, then one by one over the rest (the
/// last tokens of a tile see a few more positions).
///
/// # Safety
/// AVX-512F; heads of `16 * C` values, every offset in bounds of `v`, `scores[r]` as long as
/// row `r`'s visible positions, and `offsets` covering the chunk's positions that any row
/// sees.
#[cfg(target_arch = "x86_64")]
unsafe fn weighted_sums_avx512<const C: usize, const R: usize>(
    rows: &mut [QueryRow],
    scores: &[Vec<f32>],
    v: &[f32],
    offsets: &[usize],
    c0: usize,
) {
    let chunk_end = |row: &QueryRow| (c0 + KV_CHUNK).min(row.visible).max(c0);
    for (rows, scores) in rows.chunks_mut(R).zip(scores.chunks(R)) {
        let mut done = c0;
        if let Ok(group) = <&mut [QueryRow; R]>::try_from(&mut *rows) {
            let common = group.iter().map(chunk_end).min().unwrap_or(c0);
            if common > c0 {
                let p = std::array::from_fn(|r| &scores[r][c0..common]);
                let out = group.each_mut().map(|row| &mut *row.out);
                x86::weighted_sum_avx512::<C, R>(v, &offsets[..common - c0], p, out);
                done = common;
            }
        }
        for (row, s) in rows.iter_mut().zip(scores) {
            let end = chunk_end(row);
            if end > done {
                let (offsets, p) = (&offsets[done - c0..end - c0], [&s[done..end]]);
                x86::weighted_sum_avx512::<C, 1>(v, offsets, p, [&mut *row.out]);
            }
        }
    }
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 => unsafe { x86::axpy_avx2(alpha, x, y) },
        _ => y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x),
    }
}

/// Scalar dot with 8 independent partial sums (fixed order).
pub fn dot_scalar<R: Row + ?Sized>(a: &[f32], b: &R) -> f32 {
    let mut acc = [0f32; 8];
    let n8 = a.len() / 8 * 8;
    for (c, ca) in a[..n8].chunks_exact(8).enumerate() {
        for i in 0..8 {
            acc[i] += ca[i] * b.get(c * 8 + i);
        }
    }
    let mut tail = 0f32;
    for (i, &x) in a.iter().enumerate().skip(n8) {
        tail += x * b.get(i);
    }
    let s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    s + tail
}

#[cfg(target_arch = "x86_64")]
// Index loops over small fixed arrays of registers read clearer than zipped iterators here.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::Row;
    use std::arch::x86_64::*;

    /// `scores[i] = scale · q·k[offsets[i]..]` for a head of `16 * C` values, appended.
    ///
    /// Sixteen positions at a time, one FMA chain each, summed across lanes together (a
    /// transpose tree, 30 shuffles per 16 scores instead of a reduction per score). A short
    /// last group repeats the first offset and drops those scores, so each score's
    /// arithmetic depends on its own position only.
    ///
    /// # Safety
    /// AVX-512F; every `offsets[i] + 16 * C <= k.len()`, `q.len() == 16 * C`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn scores_avx512<const C: usize>(
        q: &[f32],
        k: &[f32],
        offsets: &[usize],
        scale: f32,
        scores: &mut Vec<f32>,
    ) {
        let qv: [__m512; C] = std::array::from_fn(|i| _mm512_loadu_ps(q.as_ptr().add(16 * i)));
        let scale = _mm512_set1_ps(scale);
        scores.reserve(offsets.len());
        for group in offsets.chunks(16) {
            let acc: [__m512; 16] = std::array::from_fn(|j| {
                let kp = k.as_ptr().add(*group.get(j).unwrap_or(&group[0]));
                let mut a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kp));
                for (i, q) in qv.iter().enumerate().skip(1) {
                    a = _mm512_fmadd_ps(*q, _mm512_loadu_ps(kp.add(16 * i)), a);
                }
                a
            });
            let mut sums = [0f32; 16];
            _mm512_storeu_ps(sums.as_mut_ptr(), _mm512_mul_ps(sum_lanes16(acc), scale));
            scores.extend_from_slice(&sums[..group.len()]);
        }
    }

    /// `[Σ a[0], Σ a[1], …, Σ a[15]]`: each vector summed across its lanes, in a fixed order
    /// that does not depend on the other vectors.
    #[target_feature(enable = "avx512f")]
    unsafe fn sum_lanes16(a: [__m512; 16]) -> __m512 {
        // Pairs of vectors, 32-bit then 64-bit interleaves within each 128-bit lane: four
        // vectors of four 128-bit lanes, each lane holding partial sums of four inputs.
        let pair32 = |x: __m512, y: __m512| {
            _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
        };
        let pair64 = |x: __m512, y: __m512| {
            let (x, y) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
            let lo = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
            _mm512_add_ps(lo, _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)))
        };
        let quads: [__m512; 4] = std::array::from_fn(|i| {
            let a = &a[4 * i..4 * i + 4];
            pair64(pair32(a[0], a[1]), pair32(a[2], a[3]))
        });
        // Then across 128-bit lanes: even lanes plus odd lanes, twice.
        let lanes = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        };
        lanes(lanes(quads[0], quads[1]), lanes(quads[2], quads[3]))
    }

    /// `out[r] += Σ_i p[r][i] v[offsets[i]..]` for `R` query rows and a head of `16 * C`
    /// values: each V row is loaded once for all `R` rows. Each row's sums are the FMA chain
    /// the one-row call gives.
    ///
    /// # Safety
    /// AVX-512F; every `offsets[i] + 16 * C <= v.len()`, every `p[r].len() >=
    /// offsets.len()` and `out[r].len() == 16 * C`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn weighted_sum_avx512<const C: usize, const R: usize>(
        v: &[f32],
        offsets: &[usize],
        p: [&[f32]; R],
        out: [&mut [f32]; R],
    ) {
        let mut o: [[__m512; C]; R] = std::array::from_fn(|r| {
            std::array::from_fn(|i| _mm512_loadu_ps(out[r].as_ptr().add(16 * i)))
        });
        for (n, &at) in offsets.iter().enumerate() {
            let vp = v.as_ptr().add(at);
            let vv: [__m512; C] = std::array::from_fn(|i| _mm512_loadu_ps(vp.add(16 * i)));
            for (o, p) in o.iter_mut().zip(&p) {
                let w = _mm512_set1_ps(*p.get_unchecked(n));
                for (o, v) in o.iter_mut().zip(&vv) {
                    *o = _mm512_fmadd_ps(w, *v, *o);
                }
            }
        }
        for (o, out) in o.iter().zip(out) {
            for (i, o) in o.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), *o);
            }
        }
    }

    /// The AVX2 twin of [`scores_avx512`]: 8 positions at a time, each one FMA chain over
    /// the head (the query read from L1), summed across lanes together.
    ///
    /// # Safety
    /// AVX2 and FMA; every `offsets[i] + 8 * C <= k.len()`, `q.len() == 8 * C`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores_avx2<const C: usize>(
        q: &[f32],
        k: &[f32],
        offsets: &[usize],
        scale: f32,
        scores: &mut Vec<f32>,
    ) {
        let qp = q.as_ptr();
        let scale = _mm256_set1_ps(scale);
        scores.reserve(offsets.len());
        for group in offsets.chunks(8) {
            let acc: [__m256; 8] = std::array::from_fn(|j| {
                let kp = k.as_ptr().add(*group.get(j).unwrap_or(&group[0]));
                let mut a = _mm256_mul_ps(_mm256_loadu_ps(qp), _mm256_loadu_ps(kp));
                for i in 1..C {
                    let (q, k) = (
                        _mm256_loadu_ps(qp.add(8 * i)),
                        _mm256_loadu_ps(kp.add(8 * i)),
                    );
                    a = _mm256_fmadd_ps(q, k, a);
                }
                a
            });
            let mut sums = [0f32; 8];
            _mm256_storeu_ps(sums.as_mut_ptr(), _mm256_mul_ps(sum_lanes8(acc), scale));
            scores.extend_from_slice(&sums[..group.len()]);
        }
    }

    /// `[Σ a[0], …, Σ a[7]]`, in a fixed order per vector (as [`sum_lanes16`]).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_lanes8(a: [__m256; 8]) -> __m256 {
        let pair32 = |x: __m256, y: __m256| {
            _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y))
        };
        let pair64 = |x: __m256, y: __m256| {
            let (x, y) = (_mm256_castps_pd(x), _mm256_castps_pd(y));
            let lo = _mm256_castpd_ps(_mm256_unpacklo_pd(x, y));
            _mm256_add_ps(lo, _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)))
        };
        // Each 128-bit lane of `lo` holds partial sums of a[0..4], of `hi` of a[4..8].
        let lo = pair64(pair32(a[0], a[1]), pair32(a[2], a[3]));
        let hi = pair64(pair32(a[4], a[5]), pair32(a[6], a[7]));
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(lo, hi),
            _mm256_permute2f128_ps::<0x31>(lo, hi),
        )
    }

    /// `out += Σ_i p[i] v[offsets[i]..]` for 64 values of a head, held in 8 registers.
    ///
    /// # Safety
    /// AVX2 and FMA; every `offsets[i] + 64 <= v.len()`, `p.len() >= offsets.len()`,
    /// `out.len() == 64`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum_avx2(v: &[f32], offsets: &[usize], p: &[f32], out: &mut [f32]) {
        let mut o: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(out.as_ptr().add(8 * i)));
        for (&at, &w) in offsets.iter().zip(p) {
            let (vp, w) = (v.as_ptr().add(at), _mm256_set1_ps(w));
            for (i, o) in o.iter_mut().enumerate() {
                *o = _mm256_fmadd_ps(w, _mm256_loadu_ps(vp.add(8 * i)), *o);
            }
        }
        for (i, o) in o.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), *o);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2<R: Row + ?Sized>(a: &[f32], w: &R) -> f32 {
        let n = a.len();
        let pa = a.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * j));
                *acc = _mm256_fmadd_ps(x, w.load8(i + 8 * j), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), w.load8(i), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum256(s);
        while i < n {
            total += *pa.add(i) * w.get(i);
            i += 1;
        }
        total
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn dot_avx512<R: Row + ?Sized>(a: &[f32], w: &R) -> f32 {
        let n = a.len();
        let pa = a.as_ptr();
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), w.load16(i), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), w.load16(i + 16), acc1);
            i += 32;
        }
        while i + 16 <= n {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), w.load16(i), acc0);
            i += 16;
        }
        let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        while i < n {
            total += *pa.add(i) * w.get(i);
            i += 1;
        }
        total
    }

    /// [`dot_avx2`] for `N` activation rows sharing each weight load.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_avx2<R: Row + ?Sized, const N: usize>(
        a: [&[f32]; N],
        w: &R,
        out: &mut [f32],
    ) {
        let n = w.len();
        let mut acc = [[_mm256_setzero_ps(); 4]; N];
        let mut i = 0;
        while i + 32 <= n {
            for j in 0..4 {
                let wv = w.load8(i + 8 * j);
                for r in 0..N {
                    acc[r][j] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(a[r].as_ptr().add(i + 8 * j)),
                        wv,
                        acc[r][j],
                    );
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            let wv = w.load8(i);
            for r in 0..N {
                acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(a[r].as_ptr().add(i)), wv, acc[r][0]);
            }
            i += 8;
        }
        for r in 0..N {
            let s = _mm256_add_ps(
                _mm256_add_ps(acc[r][0], acc[r][1]),
                _mm256_add_ps(acc[r][2], acc[r][3]),
            );
            let mut total = hsum256(s);
            for k in i..n {
                total += a[r][k] * w.get(k);
            }
            out[r] = total;
        }
    }

    /// [`dot_avx512`] for `N` activation rows sharing each weight load.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn dot_rows_avx512<R: Row + ?Sized, const N: usize>(
        a: [&[f32]; N],
        w: &R,
        out: &mut [f32],
    ) {
        let n = w.len();
        let mut acc0 = [_mm512_setzero_ps(); N];
        let mut acc1 = [_mm512_setzero_ps(); N];
        let mut i = 0;
        while i + 32 <= n {
            let w0 = w.load16(i);
            let w1 = w.load16(i + 16);
            for r in 0..N {
                let p = a[r].as_ptr();
                acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(i)), w0, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(i + 16)), w1, acc1[r]);
            }
            i += 32;
        }
        while i + 16 <= n {
            let w0 = w.load16(i);
            for r in 0..N {
                acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(a[r].as_ptr().add(i)), w0, acc0[r]);
            }
            i += 16;
        }
        for r in 0..N {
            let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
            for k in i..n {
                total += a[r][k] * w.get(k);
            }
            out[r] = total;
        }
    }

    /// [`dot_avx512`] for `W` weight rows × `T` activation rows sharing every load.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn dot_tile_avx512<R: Row + ?Sized, const W: usize, const T: usize>(
        a: [&[f32]; T],
        w: [&R; W],
        out: &mut [[f32; T]; W],
    ) {
        let n = w[0].len();
        let mut acc0 = [[_mm512_setzero_ps(); T]; W];
        let mut acc1 = [[_mm512_setzero_ps(); T]; W];
        let mut i = 0;
        while i + 32 <= n {
            let mut w0 = [_mm512_setzero_ps(); W];
            let mut w1 = [_mm512_setzero_ps(); W];
            for j in 0..W {
                w0[j] = w[j].load16(i);
                w1[j] = w[j].load16(i + 16);
            }
            for r in 0..T {
                let x0 = _mm512_loadu_ps(a[r].as_ptr().add(i));
                let x1 = _mm512_loadu_ps(a[r].as_ptr().add(i + 16));
                for j in 0..W {
                    acc0[j][r] = _mm512_fmadd_ps(x0, w0[j], acc0[j][r]);
                    acc1[j][r] = _mm512_fmadd_ps(x1, w1[j], acc1[j][r]);
                }
            }
            i += 32;
        }
        while i + 16 <= n {
            for j in 0..W {
                let w0 = w[j].load16(i);
                for r in 0..T {
                    acc0[j][r] =
                        _mm512_fmadd_ps(_mm512_loadu_ps(a[r].as_ptr().add(i)), w0, acc0[j][r]);
                }
            }
            i += 16;
        }
        for j in 0..W {
            for r in 0..T {
                let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j][r], acc1[j][r]));
                for k in i..n {
                    total += a[r][k] * w[j].get(k);
                }
                out[j][r] = total;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_avx2(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let py = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                py,
                _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(py)),
            );
            i += 8;
        }
        while i < n {
            y[i] += alpha * x[i];
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_agrees_with_f64_dot() {
        for n in [0usize, 1, 7, 8, 31, 33, 64, 577, 1536] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            for isa in Isa::all_supported() {
                let got = dot(isa, &a, &b) as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * (n as f64 + 1.0),
                    "{isa:?} n={n}: {got} vs {exact}"
                );
                let mut y = b.clone();
                axpy(isa, 0.5, &a, &mut y);
                for i in 0..n {
                    assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
                }
            }
        }
    }

    /// Every path's attention against an f64 softmax-weighted sum, for the head sizes with
    /// a register path (64, 128) and one without (48): tiles of query rows that see 1 to 300
    /// rows scattered in the cache (across chunk boundaries), each also run alone, which must
    /// give the same bits.
    #[test]
    fn attention_tiles_match_f64_and_each_row_alone_on_every_path() {
        let val = |i: usize, m: usize| ((i * m % 211) as f32 - 105.0) / 60.0;
        let visible = [1usize, 2, 17, 32, 33, 300];
        for hd in [48usize, 64, 128] {
            let slots = 400;
            let k: Vec<f32> = (0..slots * hd).map(|i| val(i, 37)).collect();
            let v: Vec<f32> = (0..slots * hd).map(|i| val(i, 53)).collect();
            let qs: Vec<Vec<f32>> = (0..visible.len())
                .map(|r| (0..hd).map(|i| val(i + 13 * r, 71) * 0.3).collect())
                .collect();
            let offsets: Vec<usize> = (0..300).map(|i| (i * 7 % slots) * hd).collect();
            let scale = 1.0 / (hd as f64).sqrt();
            let exact = |q: &[f32], n: usize, j: usize| {
                let logits: Vec<f64> = offsets[..n]
                    .iter()
                    .map(|&at| (0..hd).map(|j| q[j] as f64 * k[at + j] as f64).sum::<f64>() * scale)
                    .collect();
                let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let total: f64 = w.iter().sum();
                let sum: f64 = offsets
                    .iter()
                    .zip(&w)
                    .map(|(&at, p)| p * v[at + j] as f64)
                    .sum();
                sum / total
            };
            // Tiles of 4, 5 and 6 rows: the AVX-512 path groups rows by 4, or by 3 when
            // they come in threes.
            for (isa, m) in Isa::all_supported()
                .into_iter()
                .flat_map(|i| [(i, 4), (i, 5), (i, 6)])
            {
                let mut outs = vec![vec![f32::NAN; hd]; m];
                let mut rows: Vec<QueryRow> = outs
                    .iter_mut()
                    .zip(&qs)
                    .zip(visible)
                    .map(|((out, q), visible)| QueryRow { q, visible, out })
                    .collect();
                attend_rows(isa, &mut rows, (&k[..], &v[..]), &offsets, scale as f32);
                for ((out, q), n) in outs.iter().zip(&qs).zip(visible) {
                    let mut alone = vec![f32::NAN; hd];
                    let row = QueryRow {
                        q,
                        visible: n,
                        out: &mut alone,
                    };
                    attend_rows(isa, &mut [row], (&k[..], &v[..]), &offsets, scale as f32);
                    assert_eq!(out, &alone, "{isa:?} hd {hd} n {n}: tiled vs alone");
                    for (j, &o) in out.iter().enumerate() {
                        let exact = exact(q, n, j);
                        assert!(
                            (o as f64 - exact).abs() < 1e-5,
                            "{isa:?} hd {hd} n {n} [{j}]: {o} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    /// An f16 or int8 cache is only a narrower store: every path gives, bit for bit, what it
    /// gives on an f32 cache holding the same (rounded) values, for tiles and rows alone.
    #[test]
    fn attention_over_f16_and_int8_caches_equals_f32_holding_the_same_values() {
        use crate::{cpu::kv_rows::Int8Rows, KvData, KvDtype};
        use half::f16;
        let val = |i: usize, m: usize| ((i * m % 211) as f32 - 105.0) / 60.0;
        for hd in [48usize, 64, 128] {
            let slots = 120;
            let k16: Vec<f16> = (0..slots * hd).map(|i| f16::from_f32(val(i, 37))).collect();
            let v16: Vec<f16> = (0..slots * hd).map(|i| f16::from_f32(val(i, 53))).collect();
            let k32: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
            let v32: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
            let offsets: Vec<usize> = (0..100).map(|i| (i * 7 % slots) * hd).collect();
            let visible = [100usize, 33, 1, 64, 99, 2];
            let qs: Vec<Vec<f32>> = (0..visible.len())
                .map(|r| (0..hd).map(|i| val(i + 13 * r, 71) * 0.3).collect())
                .collect();
            for isa in Isa::all_supported() {
                for m in [1, 3, 6] {
                    let rows = (&qs[..m], &visible[..m]);
                    let narrow = tile(isa, rows, (&k16[..], &v16[..]), &offsets);
                    let wide = tile(isa, rows, (&k32[..], &v32[..]), &offsets);
                    assert_eq!(narrow, wide, "{isa:?} hd {hd} m {m}");
                    assert!(narrow.iter().flatten().all(|o| o.is_finite()));
                }
            }
            // Int8, through the pool's own quantization; the f32 cache holds what it reads.
            let int8 = |values: &[f32]| {
                let mut pool = KvData::zeros(KvDtype::Int8, values.len(), hd);
                pool.write(0, values);
                let wide = pool.to_f32();
                let KvData::Int8 {
                    codes,
                    scales,
                    group,
                } = pool
                else {
                    unreachable!()
                };
                (codes, scales, group, wide)
            };
            let (kc, ks, group, k32) = int8(&k32);
            let (vc, vs, _, v32) = int8(&v32);
            let k8 = Int8Rows::of_head(&kc, &ks, group, hd, 0);
            let v8 = Int8Rows::of_head(&vc, &vs, group, hd, 0);
            for isa in Isa::all_supported() {
                for m in [1, 3, 6] {
                    let rows = (&qs[..m], &visible[..m]);
                    let narrow = tile(isa, rows, (&k8, &v8), &offsets);
                    let wide = tile(isa, rows, (&k32[..], &v32[..]), &offsets);
                    assert_eq!(narrow, wide, "int8 {isa:?} hd {hd} m {m}");
                }
            }
        }
    }

    /// The outputs of one tile of query rows (`qs`, each seeing `visible` positions).
    fn tile<R: KvRows + ?Sized>(
        isa: Isa,
        (qs, visible): (&[Vec<f32>], &[usize]),
        kv: (&R, &R),
        offsets: &[usize],
    ) -> Vec<Vec<f32>> {
        let mut outs = vec![vec![f32::NAN; qs[0].len()]; qs.len()];
        let mut rows: Vec<QueryRow> = outs
            .iter_mut()
            .zip(qs)
            .zip(visible)
            .map(|((out, q), &visible)| QueryRow { q, visible, out })
            .collect();
        attend_rows(isa, &mut rows, kv, offsets, 0.125);
        outs
    }

    /// A row that sees no position attends to nothing: zeros on every path, beside a row
    /// that sees some.
    #[test]
    fn attention_row_seeing_nothing_is_zero() {
        for hd in [48usize, 64, 128] {
            let (k, v) = (vec![0.5f32; 4 * hd], vec![1.0f32; 4 * hd]);
            let offsets: Vec<usize> = (0..4).map(|i| i * hd).collect();
            let q = vec![0.1f32; hd];
            for isa in Isa::all_supported() {
                let (mut empty, mut full) = (vec![f32::NAN; hd], vec![f32::NAN; hd]);
                let mut rows = [
                    QueryRow {
                        q: &q,
                        visible: 0,
                        out: &mut empty,
                    },
                    QueryRow {
                        q: &q,
                        visible: 4,
                        out: &mut full,
                    },
                ];
                attend_rows(isa, &mut rows, (&k[..], &v[..]), &offsets, 0.125);
                assert!(
                    empty.iter().all(|&o| o == 0.0),
                    "{isa:?} hd {hd}: {empty:?}"
                );
                assert!(
                    full.iter().all(|&o| (o - 1.0).abs() < 1e-6),
                    "{isa:?} hd {hd}"
                );
            }
        }
    }
}
