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
    /// A row as the SIMD loads read it.
    type Row<'a>: Row
    where
        Self: 'a;
    /// Elements from the start (for bounds checks).
    fn len(&self) -> usize;
    /// The values themselves, when they are f32 (read in place, never widened).
    fn in_place(&self) -> Option<&[f32]>;
    /// The `hd` values from element `at`.
    fn row(&self, at: usize, hd: usize) -> Self::Row<'_>;
}

impl KvRows for [f32] {
    type Row<'a> = &'a [f32];
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }
    fn in_place(&self) -> Option<&[f32]> {
        Some(self)
    }
    fn row(&self, at: usize, hd: usize) -> &[f32] {
        &self[at..at + hd]
    }
}

impl KvRows for [half::f16] {
    type Row<'a> = &'a [half::f16];
    fn len(&self) -> usize {
        <[half::f16]>::len(self)
    }
    fn in_place(&self) -> Option<&[f32]> {
        None
    }
    fn row(&self, at: usize, hd: usize) -> &[half::f16] {
        &self[at..at + hd]
    }
}

/// An int8 pool from one KV head on: `codes` from the head's first value, `scales` from its
/// first scale, one per `group` codes. Offsets are whole token slots, so each row starts a
/// group.
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
    type Row<'a>
        = Int8KvRow<'a>
    where
        Self: 'a;
    fn len(&self) -> usize {
        self.codes.len()
    }
    fn in_place(&self) -> Option<&[f32]> {
        None
    }
    fn row(&self, at: usize, hd: usize) -> Int8KvRow<'_> {
        let g = self.group;
        Int8KvRow {
            codes: &self.codes[at..at + hd],
            scales: &self.scales[at / g..(at + hd).div_ceil(g)],
            group: g,
        }
    }
}

/// One head's row of an int8 pool: value `i` is `codes[i] · scales[i / group]`.
pub struct Int8KvRow<'a> {
    codes: &'a [i8],
    scales: &'a [f32],
    group: usize,
}

// SAFETY: loads read `codes[i..i + 8 or 16]` (in the row for in-range `i`) and one scale,
// `scales[i / group]`: a group is a multiple of the load width wherever a SIMD path runs
// (`int8_group` gives 32 or the head, and those paths need heads of multiples of 16 or 8),
// so the values of one load share it.
unsafe impl Row for Int8KvRow<'_> {
    fn len(&self) -> usize {
        self.codes.len()
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: i8 and u8 have one layout.
        unsafe { std::slice::from_raw_parts(self.codes.as_ptr() as *const u8, self.codes.len()) }
    }
    fn get(&self, i: usize) -> f32 {
        self.codes[i] as f32 * self.scales[i / self.group]
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(&self, i: usize) -> std::arch::x86_64::__m256 {
        super::rows::Int8Row(&self.codes[i..i + 8], self.scales[i / self.group]).load8(0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(&self, i: usize) -> std::arch::x86_64::__m512 {
        super::rows::Int8Row(&self.codes[i..i + 16], self.scales[i / self.group]).load16(0)
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
    let row = |at: usize| src.row(at, hd);
    match isa {
        // SAFETY: the ISA was detected; each row is `hd` values (sliced, so in bounds) and
        // `scratch` holds them all; the loads and stores step by 16 or 8 within a row of
        // that multiple.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if hd.is_multiple_of(16) => unsafe {
            x86::widen_avx512(offsets, hd, scratch, row)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 if hd.is_multiple_of(8) => unsafe {
            x86::widen_avx2(offsets, hd, scratch, row)
        },
        _ => {
            for (&at, dst) in offsets.iter().zip(scratch.chunks_exact_mut(hd)) {
                let src = row(at);
                dst.iter_mut()
                    .enumerate()
                    .for_each(|(i, d)| *d = Row::get(&src, i));
            }
        }
    }
    (scratch, &packed[..offsets.len()])
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Row;
    use std::arch::x86_64::*;

    /// The rows `row(at)` of `hd` values for each of `offsets`, as f32 back to back in
    /// `dst`, 16 values at a time.
    ///
    /// # Safety
    /// AVX-512F and F16C; `hd` a multiple of 16, every row `hd` long,
    /// `dst.len() >= offsets.len() * hd`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn widen_avx512<R: Row>(
        offsets: &[usize],
        hd: usize,
        dst: &mut [f32],
        row: impl Fn(usize) -> R,
    ) {
        let mut out = dst.as_mut_ptr();
        for &at in offsets {
            let src = row(at);
            for i in (0..hd).step_by(16) {
                _mm512_storeu_ps(out.add(i), src.load16(i));
            }
            out = out.add(hd);
        }
    }

    /// [`widen_avx512`] 8 values at a time.
    ///
    /// # Safety
    /// AVX2 and F16C; `hd` a multiple of 8, rows and `dst` as in [`widen_avx512`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen_avx2<R: Row>(
        offsets: &[usize],
        hd: usize,
        dst: &mut [f32],
        row: impl Fn(usize) -> R,
    ) {
        let mut out = dst.as_mut_ptr();
        for &at in offsets {
            let src = row(at);
            for i in (0..hd).step_by(8) {
                _mm256_storeu_ps(out.add(i), src.load8(i));
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

    /// The rows at `offsets` through [`chunk_view`], which packs them back to back.
    fn widened<R: KvRows + ?Sized>(isa: Isa, rows: &R, offsets: &[usize], hd: usize) -> Vec<f32> {
        let packed: Vec<usize> = (0..offsets.len()).map(|i| i * hd).collect();
        let mut scratch = vec![f32::NAN; offsets.len() * hd];
        let (got, got_offsets) = chunk_view(isa, rows, offsets, hd, &mut scratch, &packed);
        assert_eq!(got_offsets, &packed[..]);
        got.to_vec()
    }
}
