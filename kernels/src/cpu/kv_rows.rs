//! How the rows of a KV cache reach the attention kernels as f32, in each [`KvDtype`]
//! (`crate::KvDtype`): f32 read in place; f16 and int8 widened a chunk of rows at a time
//! into an f32 scratch that stays in L1 while every query row of a tile reads it (once per
//! tile, not once per query row: a prefill tile has up to 32 rows).
//!
//! Widening gives each value exactly as `KvData::to_f32` reads it (f16 exactly; int8 as
//! `code · scale`, one f32 multiply on every path), so the attention over a narrow cache is,
//! bit for bit, the attention over an f32 cache holding those values.

use super::simd::{Isa, Row};

/// The K or V pool of one KV head (sliced to start at it) as rows of `head_dim` values
/// starting at element offsets.
pub trait KvRows {
    /// Elements from the start (for bounds checks).
    fn len(&self) -> usize;
    /// The values themselves, when they are f32 (read in place, never widened).
    fn in_place(&self) -> Option<&[f32]>;
    /// The rows of `hd` values at `offsets`, as f32 back to back in `dst`
    /// (`offsets.len() * hd` long). Panics on a row outside the pool.
    fn widen(&self, isa: Isa, offsets: &[usize], hd: usize, dst: &mut [f32]);
    /// Asks for the rows of `hd` values at `offsets` to be brought toward the cache (a hint:
    /// rows outside the pool are skipped).
    fn prefetch(&self, offsets: &[usize], hd: usize);
}

/// Prefetches `hd` elements of `T` at each offset of `rows` that lies inside it.
fn prefetch_rows<T>(rows: &[T], offsets: &[usize], hd: usize) {
    for &at in offsets {
        if let Some(row) = at.checked_add(hd).and_then(|end| rows.get(at..end)) {
            // SAFETY: the bytes of an initialized slice of plain values.
            let bytes = unsafe {
                std::slice::from_raw_parts(row.as_ptr() as *const u8, std::mem::size_of_val(row))
            };
            super::simd::prefetch(bytes);
        }
    }
}

impl KvRows for [f32] {
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }
    fn in_place(&self) -> Option<&[f32]> {
        Some(self)
    }
    fn prefetch(&self, offsets: &[usize], hd: usize) {
        prefetch_rows(self, offsets, hd)
    }
    fn widen(&self, _: Isa, offsets: &[usize], hd: usize, dst: &mut [f32]) {
        for (&at, dst) in offsets.iter().zip(dst.chunks_exact_mut(hd)) {
            dst.copy_from_slice(&self[at..at + hd]);
        }
    }
}

impl KvRows for [half::f16] {
    fn len(&self) -> usize {
        <[half::f16]>::len(self)
    }
    fn in_place(&self) -> Option<&[f32]> {
        None
    }
    fn prefetch(&self, offsets: &[usize], hd: usize) {
        prefetch_rows(self, offsets, hd)
    }
    fn widen(&self, isa: Isa, offsets: &[usize], hd: usize, dst: &mut [f32]) {
        assert!(offsets.iter().all(|&at| at + hd <= self.len()) && dst.len() >= offsets.len() * hd);
        match isa {
            // SAFETY: the ISA was detected; every row is inside the pool and `dst` holds
            // them all (asserted); the loads and stores step by 16 or 8 within a row of
            // that multiple.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if hd.is_multiple_of(16) => unsafe {
                x86::widen_avx512(self, offsets, hd, dst)
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma | Isa::Avx512 if hd.is_multiple_of(8) => unsafe {
                x86::widen_avx2(self, offsets, hd, dst)
            },
            _ => {
                for (&at, dst) in offsets.iter().zip(dst.chunks_exact_mut(hd)) {
                    let src = &self[at..at + hd];
                    dst.iter_mut()
                        .enumerate()
                        .for_each(|(i, d)| *d = Row::get(src, i));
                }
            }
        }
    }
}

/// An int8 pool from one KV head on: `codes` from the head's first value, `scales` from its
/// first scale, one per `group` codes (a power of two, `crate::attention::int8_group`).
/// Offsets are whole token slots, so each row starts a group.
pub struct Int8Rows<'a> {
    pub codes: &'a [i8],
    pub scales: &'a [f32],
    pub group: usize,
}

impl<'a> Int8Rows<'a> {
    /// KV head `kvh`'s rows of a whole pool whose heads are `head_dim` values.
    pub fn of_head(
        codes: &'a [i8],
        scales: &'a [f32],
        group: usize,
        head_dim: usize,
        kvh: usize,
    ) -> Self {
        let at = kvh * head_dim;
        Int8Rows {
            codes: &codes[at..],
            scales: &scales[at / group..],
            group,
        }
    }
}

impl KvRows for Int8Rows<'_> {
    fn len(&self) -> usize {
        self.codes.len()
    }
    fn in_place(&self) -> Option<&[f32]> {
        None
    }
    fn prefetch(&self, offsets: &[usize], hd: usize) {
        for &at in offsets {
            prefetch_rows(self.codes, &[at], hd);
            prefetch_rows(self.scales, &[at / self.group], hd / self.group);
        }
    }
    fn widen(&self, isa: Isa, offsets: &[usize], hd: usize, dst: &mut [f32]) {
        let g = self.group;
        assert!(g.is_power_of_two(), "int8 KV groups of {g}");
        assert!(
            offsets.iter().all(|&at| at.is_multiple_of(g)
                && at + hd <= self.codes.len()
                && (at + hd).div_ceil(g) <= self.scales.len())
                && hd.is_multiple_of(g)
                && dst.len() >= offsets.len() * hd,
            "int8 KV rows outside the pool, or not in whole groups"
        );
        match isa {
            // SAFETY: the ISA was detected; rows, their scales and `dst` are in bounds and
            // rows are whole groups (asserted); a group of a multiple of 16 or 8 codes
            // steps its loads within itself.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if g.is_multiple_of(16) => unsafe {
                x86::widen_int8_avx512(self, offsets, hd, dst)
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma | Isa::Avx512 if g.is_multiple_of(8) => unsafe {
                x86::widen_int8_avx2(self, offsets, hd, dst)
            },
            _ => {
                for (&at, dst) in offsets.iter().zip(dst.chunks_exact_mut(hd)) {
                    let codes = self.codes[at..at + hd].chunks_exact(g);
                    let groups = codes
                        .zip(&self.scales[at / g..])
                        .zip(dst.chunks_exact_mut(g));
                    for ((codes, &scale), dst) in groups {
                        for (d, &c) in dst.iter_mut().zip(codes) {
                            *d = c as f32 * scale;
                        }
                    }
                }
            }
        }
    }
}

/// The K or V rows of one chunk as f32: `(values, offsets)` with row `i` of the chunk at
/// `values[offsets[i]..]`: the cache itself and the chunk's offsets for f32, else `scratch`
/// filled with the rows widened back to back and `packed` (`0, hd, 2 hd, …`).
pub fn chunk_view<'a, R: KvRows + ?Sized>(
    isa: Isa,
    src: &'a R,
    offsets: &'a [usize],
    hd: usize,
    scratch: &'a mut [f32],
    packed: &'a [usize],
) -> (&'a [f32], &'a [usize]) {
    if let Some(values) = src.in_place() {
        return (values, offsets);
    }
    let scratch = &mut scratch[..offsets.len() * hd];
    src.widen(isa, offsets, hd, scratch);
    (scratch, &packed[..offsets.len()])
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Int8Rows, Row};
    use std::arch::x86_64::*;

    /// The rows of `hd` values at `offsets` in `src`, as f32 back to back in `dst`, 16
    /// values at a time.
    ///
    /// # Safety
    /// AVX-512F and F16C; `hd` a multiple of 16, every `offsets[i] + hd <= src.len()`,
    /// `dst.len() >= offsets.len() * hd`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn widen_avx512<R: Row + ?Sized>(
        src: &R,
        offsets: &[usize],
        hd: usize,
        dst: &mut [f32],
    ) {
        let mut out = dst.as_mut_ptr();
        for &at in offsets {
            for i in (0..hd).step_by(16) {
                _mm512_storeu_ps(out.add(i), src.load16(at + i));
            }
            out = out.add(hd);
        }
    }

    /// [`widen_avx512`] 8 values at a time.
    ///
    /// # Safety
    /// AVX2 and F16C; `hd` a multiple of 8, rows in bounds as in [`widen_avx512`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen_avx2<R: Row + ?Sized>(
        src: &R,
        offsets: &[usize],
        hd: usize,
        dst: &mut [f32],
    ) {
        let mut out = dst.as_mut_ptr();
        for &at in offsets {
            for i in (0..hd).step_by(8) {
                _mm256_storeu_ps(out.add(i), src.load8(at + i));
            }
            out = out.add(hd);
        }
    }

    /// Int8 rows as `code · scale`, 16 values at a time, a scale per group.
    ///
    /// # Safety
    /// AVX-512F; the group a power of two of at least 16, every row whole groups inside the pool with its
    /// scales, `dst.len() >= offsets.len() * hd`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn widen_int8_avx512(src: &Int8Rows, offsets: &[usize], hd: usize, dst: &mut [f32]) {
        let (codes, g) = (src.codes.as_ptr(), src.group);
        let shift = g.trailing_zeros();
        let mut out = dst.as_mut_ptr();
        for &at in offsets {
            for g0 in (0..hd).step_by(g) {
                let scale = _mm512_set1_ps(*src.scales.get_unchecked((at + g0) >> shift));
                for i in (g0..g0 + g).step_by(16) {
                    let q = _mm_loadu_si128(codes.add(at + i) as *const __m128i);
                    let x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                    _mm512_storeu_ps(out.add(i), _mm512_mul_ps(x, scale));
                }
            }
            out = out.add(hd);
        }
    }

    /// [`widen_int8_avx512`] 8 values at a time.
    ///
    /// # Safety
    /// AVX2; the group a power of two of at least 8, rows as in [`widen_int8_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn widen_int8_avx2(src: &Int8Rows, offsets: &[usize], hd: usize, dst: &mut [f32]) {
        let (codes, g) = (src.codes.as_ptr(), src.group);
        let shift = g.trailing_zeros();
        let mut out = dst.as_mut_ptr();
        for &at in offsets {
            for g0 in (0..hd).step_by(g) {
                let scale = _mm256_set1_ps(*src.scales.get_unchecked((at + g0) >> shift));
                for i in (g0..g0 + g).step_by(8) {
                    let q = _mm_loadl_epi64(codes.add(at + i) as *const __m128i);
                    let x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    _mm256_storeu_ps(out.add(i), _mm256_mul_ps(x, scale));
                }
            }
            out = out.add(hd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path widens f16 and int8 rows to exactly what the pool reads back as f32, for
    /// head sizes with and without a SIMD path, scattered offsets and a short last chunk.
    #[test]
    fn every_path_widens_rows_to_the_pools_own_values() {
        use crate::{KvData, KvDtype};
        for hd in [8usize, 48, 64, 128, 6] {
            let slots = 40;
            let values: Vec<f32> = (0..slots * hd)
                .map(|i| ((i * 37 % 211) as f32 - 105.0) / 7.0)
                .collect();
            let offsets: Vec<usize> = (0..13).map(|i| (i * 7 % slots) * hd).collect();
            for dtype in [KvDtype::F16, KvDtype::Int8] {
                let mut pool = KvData::zeros(dtype, slots * hd, hd);
                pool.write(0, &values);
                let exact = pool.to_f32();
                for isa in Isa::all_supported() {
                    let got = match &pool {
                        KvData::F16(v) => widened(isa, &v[..], &offsets, hd),
                        KvData::Int8 {
                            codes,
                            scales,
                            group,
                        } => {
                            let rows = Int8Rows::of_head(codes, scales, *group, hd, 0);
                            widened(isa, &rows, &offsets, hd)
                        }
                        KvData::F32(_) => unreachable!(),
                    };
                    for (&at, row) in offsets.iter().zip(got.chunks(hd)) {
                        assert_eq!(row, &exact[at..at + hd], "{isa:?} {dtype:?} hd {hd}");
                    }
                }
            }
        }
    }

    /// Prefetching is a hint: rows partly or wholly past the pool (even at offsets whose end
    /// overflows) are skipped, for every kind of pool.
    #[test]
    fn prefetching_rows_past_the_pool_is_harmless() {
        let offsets = [0, 32, 48, 64, 1 << 40, usize::MAX - 3];
        let f32s = [1f32; 64];
        let f16s = [half::f16::ONE; 64];
        let (codes, scales) = ([1i8; 64], [0.5f32; 2]);
        f32s[..].prefetch(&offsets, 32);
        f16s[..].prefetch(&offsets, 32);
        let int8 = Int8Rows {
            codes: &codes,
            scales: &scales,
            group: 32,
        };
        int8.prefetch(&offsets, 32);
        assert_eq!(widened(Isa::Scalar, &int8, &[32], 32), vec![0.5f32; 32]);
    }

    /// The rows at `offsets` through [`chunk_view`], which packs them back to back.
    fn widened<R: KvRows + ?Sized>(isa: Isa, rows: &R, offsets: &[usize], hd: usize) -> Vec<f32> {
        let packed: Vec<usize> = (0..offsets.len()).map(|i| i * hd).collect();
        let mut scratch = vec![f32::NAN; offsets.len() * hd];
        let (got, got_offsets) = chunk_view(isa, rows, offsets, hd, &mut scratch, &packed);
        assert_eq!(got_offsets, &packed[..]);
        got.to_vec()
    }
}
