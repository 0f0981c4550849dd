//! [`Row`] implementations: weight rows read as f32 vectors in registers, in every stored
//! format. Each yields exactly the values of `Weight::row_to_f32` (same roundings), which
//! the parity tests check.

use super::simd::Row;
use half::{bf16, f16};
use vellum_quant::QK;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

// SAFETY (all impls): loads stay within the row for in-range `i`, as the trait requires.

/// A slice of plain numbers (no padding, any bit pattern valid) as its bytes.
fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: f32/f16/bf16/i8 have no padding and every byte is initialised.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// A reference to a row is a row (lets callers pass cheap row views by value).
unsafe impl<T: Row + ?Sized> Row for &T {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn bytes(&self) -> &[u8] {
        (**self).bytes()
    }
    fn get(&self, i: usize) -> f32 {
        (**self).get(i)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(&self, i: usize) -> __m256 {
        (**self).load8(i)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(&self, i: usize) -> __m512 {
        (**self).load16(i)
    }
}

unsafe impl Row for [f32] {
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }
    fn bytes(&self) -> &[u8] {
        as_bytes(self)
    }
    fn get(&self, i: usize) -> f32 {
        self[i]
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(&self, i: usize) -> __m256 {
        _mm256_loadu_ps(self.as_ptr().add(i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(&self, i: usize) -> __m512 {
        _mm512_loadu_ps(self.as_ptr().add(i))
    }
}

unsafe impl Row for [f16] {
    fn len(&self) -> usize {
        <[f16]>::len(self)
    }
    fn bytes(&self) -> &[u8] {
        as_bytes(self)
    }
    fn get(&self, i: usize) -> f32 {
        self[i].to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(&self, i: usize) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(self.as_ptr().add(i) as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(&self, i: usize) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(self.as_ptr().add(i) as *const __m256i))
    }
}

unsafe impl Row for [bf16] {
    fn len(&self) -> usize {
        <[bf16]>::len(self)
    }
    fn bytes(&self) -> &[u8] {
        as_bytes(self)
    }
    fn get(&self, i: usize) -> f32 {
        f32::from_bits((self[i].to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(&self, i: usize) -> __m256 {
        // bf16 is the top half of an f32: widen and shift, exact.
        let h = _mm_loadu_si128(self.as_ptr().add(i) as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(&self, i: usize) -> __m512 {
        let h = _mm256_loadu_si256(self.as_ptr().add(i) as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
}

/// A row of per-channel int8 values with its scale: x = q * scale.
pub struct Int8Row<'a>(pub &'a [i8], pub f32);

unsafe impl Row for Int8Row<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn bytes(&self) -> &[u8] {
        as_bytes(self.0)
    }
    fn get(&self, i: usize) -> f32 {
        self.0[i] as f32 * self.1
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(&self, i: usize) -> __m256 {
        let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(self.0.as_ptr().add(i) as *const __m128i));
        _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(self.1))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(&self, i: usize) -> __m512 {
        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(self.0.as_ptr().add(i) as *const __m128i));
        _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(self.1))
    }
}

/// A row of Q8_0 blocks: `| d: f16 | q[32]: i8 |`, x = q * d.
pub struct Q8_0Row<'a>(pub &'a [u8]);
/// A row of Q4_0 blocks: `| d: f16 | qs[16] |`, x = (nibble - 8) * d.
pub struct Q4_0Row<'a>(pub &'a [u8]);
/// A row of Q4_1 blocks: `| d: f16 | m: f16 | qs[16] |`, x = nibble * d + m.
pub struct Q4_1Row<'a>(pub &'a [u8]);

const Q8_BYTES: usize = 34;
const Q40_BYTES: usize = 18;
const Q41_BYTES: usize = 20;

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// A block scale as a broadcast vector, converted by F16C (exact, like `f16::to_f32`).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale8(p: *const u8) -> __m256 {
    let bits = (p as *const u16).read_unaligned();
    _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn scale16(p: *const u8) -> __m512 {
    let bits = (p as *const u16).read_unaligned();
    _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Nibble of value `j` (0..32) of a Q4 block whose `qs` start at `qs`.
#[inline]
fn nibble(b: &[u8], qs: usize, j: usize) -> u8 {
    let byte = b[qs + j % (QK / 2)];
    if j < QK / 2 {
        byte & 0x0f
    } else {
        byte >> 4
    }
}

/// 8 (AVX2) or 16 (AVX-512) nibbles of a Q4 block starting at value `off`, as i32 lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles8(qs: *const u8, off: usize) -> __m256i {
    let bytes = _mm_loadl_epi64(qs.add(off % (QK / 2)) as *const __m128i);
    let bytes = if off < QK / 2 {
        bytes
    } else {
        _mm_srli_epi16(bytes, 4)
    };
    _mm256_cvtepu8_epi32(_mm_and_si128(bytes, _mm_set1_epi8(0x0f)))
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn nibbles16(qs: *const u8, off: usize) -> __m512i {
    let bytes = _mm_loadu_si128(qs as *const __m128i);
    let bytes = if off < QK / 2 {
        bytes
    } else {
        _mm_srli_epi16(bytes, 4)
    };
    _mm512_cvtepu8_epi32(_mm_and_si128(bytes, _mm_set1_epi8(0x0f)))
}

unsafe impl Row for Q8_0Row<'_> {
    fn len(&self) -> usize {
        self.0.len() / Q8_BYTES * QK
    }
    fn bytes(&self) -> &[u8] {
        self.0
    }
    fn get(&self, i: usize) -> f32 {
        let b = (i / QK) * Q8_BYTES;
        (self.0[b + 2 + i % QK] as i8) as f32 * f16_at(self.0, b)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(&self, i: usize) -> __m256 {
        let b = (i / QK) * Q8_BYTES;
        let p = self.0.as_ptr().add(b + 2 + i % QK);
        let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i));
        _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale8(self.0.as_ptr().add(b)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(&self, i: usize) -> __m512 {
        let b = (i / QK) * Q8_BYTES;
        let p = self.0.as_ptr().add(b + 2 + i % QK);
        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm512_mul_ps(_mm512_cvtepi32_ps(q), scale16(self.0.as_ptr().add(b)))
    }
}

unsafe impl Row for Q4_0Row<'_> {
    fn len(&self) -> usize {
        self.0.len() / Q40_BYTES * QK
    }
    fn bytes(&self) -> &[u8] {
        self.0
    }
    fn get(&self, i: usize) -> f32 {
        let b = (i / QK) * Q40_BYTES;
        (nibble(self.0, b + 2, i % QK) as i32 - 8) as f32 * f16_at(self.0, b)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(&self, i: usize) -> __m256 {
        let b = (i / QK) * Q40_BYTES;
        let q = _mm256_sub_epi32(
            nibbles8(self.0.as_ptr().add(b + 2), i % QK),
            _mm256_set1_epi32(8),
        );
        _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale8(self.0.as_ptr().add(b)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(&self, i: usize) -> __m512 {
        let b = (i / QK) * Q40_BYTES;
        let q = _mm512_sub_epi32(
            nibbles16(self.0.as_ptr().add(b + 2), i % QK),
            _mm512_set1_epi32(8),
        );
        _mm512_mul_ps(_mm512_cvtepi32_ps(q), scale16(self.0.as_ptr().add(b)))
    }
}

unsafe impl Row for Q4_1Row<'_> {
    fn len(&self) -> usize {
        self.0.len() / Q41_BYTES * QK
    }
    fn bytes(&self) -> &[u8] {
        self.0
    }
    fn get(&self, i: usize) -> f32 {
        let b = (i / QK) * Q41_BYTES;
        nibble(self.0, b + 4, i % QK) as f32 * f16_at(self.0, b) + f16_at(self.0, b + 2)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(&self, i: usize) -> __m256 {
        let b = (i / QK) * Q41_BYTES;
        let q = _mm256_cvtepi32_ps(nibbles8(self.0.as_ptr().add(b + 4), i % QK));
        // Multiply then add (not fma): the same two roundings as the reference dequantize.
        let scaled = _mm256_mul_ps(q, scale8(self.0.as_ptr().add(b)));
        _mm256_add_ps(scaled, scale8(self.0.as_ptr().add(b + 2)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(&self, i: usize) -> __m512 {
        let b = (i / QK) * Q41_BYTES;
        let q = _mm512_cvtepi32_ps(nibbles16(self.0.as_ptr().add(b + 4), i % QK));
        let scaled = _mm512_mul_ps(q, scale16(self.0.as_ptr().add(b)));
        _mm512_add_ps(scaled, scale16(self.0.as_ptr().add(b + 2)))
    }
}

/// A row of planar int4 (`vellum_quant::int4`): the row's codes (`cols / 2` bytes, 32-value
/// chunks of 16 bytes in GGUF's nibble order), its group scales and, asymmetric, offsets.
/// `SYM`: x = (q - 8) * d; otherwise x = q * d + m.
pub struct Int4Row<'a, const SYM: bool> {
    pub packed: &'a [u8],
    pub scales: &'a [f16],
    pub mins: &'a [f16],
    pub group: usize,
}

unsafe impl<const SYM: bool> Row for Int4Row<'_, SYM> {
    fn len(&self) -> usize {
        self.packed.len() * 2
    }
    fn bytes(&self) -> &[u8] {
        self.packed
    }
    fn get(&self, i: usize) -> f32 {
        let q = nibble(self.packed, i / QK * (QK / 2), i % QK);
        let g = i / self.group;
        let d = self.scales[g].to_f32();
        if SYM {
            (q as i32 - 8) as f32 * d
        } else {
            q as f32 * d + self.mins[g].to_f32()
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(&self, i: usize) -> __m256 {
        let q = nibbles8(self.packed.as_ptr().add(i / QK * (QK / 2)), i % QK);
        let g = i / self.group;
        let d = scale8(self.scales.as_ptr().add(g) as *const u8);
        if SYM {
            _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(8))),
                d,
            )
        } else {
            // Multiply then add (not fma): the same two roundings as the reference dequantize.
            let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
            _mm256_add_ps(scaled, scale8(self.mins.as_ptr().add(g) as *const u8))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16(&self, i: usize) -> __m512 {
        let q = nibbles16(self.packed.as_ptr().add(i / QK * (QK / 2)), i % QK);
        let g = i / self.group;
        let d = scale16(self.scales.as_ptr().add(g) as *const u8);
        if SYM {
            _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(8))),
                d,
            )
        } else {
            let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
            _mm512_add_ps(scaled, scale16(self.mins.as_ptr().add(g) as *const u8))
        }
    }
}
