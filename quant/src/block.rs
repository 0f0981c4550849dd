//! Group-32 block formats, byte-compatible with llama.cpp's GGUF tensors.
//!
//! Each block covers [`QK`] = 32 consecutive values of one row. Layouts (little endian):
//!
//! ```text
//! Q8_0 (34 B): | d: f16 | q[0..32]: i8 |                       x[i] = q[i] * d
//! Q4_0 (18 B): | d: f16 | qs[0..16]: u8 |                      x[i] = (nib(i) - 8) * d
//! Q4_1 (20 B): | d: f16 | m: f16 | qs[0..16]: u8 |             x[i] = nib(i) * d + m
//!
//! nibble packing of qs (both Q4 formats):
//!   byte j (0..16):  bits 0..4 = value j,  bits 4..8 = value j + 16
//!   so the low nibbles hold the first half of the block and the high nibbles the second half.
//! ```
//!
//! The GPU-friendly repacked layouts (16-byte coalesced chunks) belong to the CUDA kernels
//! and are derived from these at load time.

use crate::QuantError;
use half::f16;

/// Values per block in every block format.
pub const QK: usize = 32;

/// A group-32 block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockFormat {
    /// Symmetric int8, one f16 scale per 32 values.
    Q8_0,
    /// Symmetric int4 (offset 8), one f16 scale per 32 values.
    Q4_0,
    /// Asymmetric int4, f16 scale and f16 minimum per 32 values.
    Q4_1,
}

impl BlockFormat {
    pub fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q4_1 => "Q4_1",
        }
    }

    /// Bytes of one block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 2 + QK,
            BlockFormat::Q4_0 => 2 + QK / 2,
            BlockFormat::Q4_1 => 4 + QK / 2,
        }
    }

    /// Bytes needed for `n` values, or an error when `n` is not whole blocks.
    pub fn bytes_for(self, n: usize) -> Result<usize, QuantError> {
        if !n.is_multiple_of(QK) {
            return Err(QuantError::NotBlockAligned {
                format: self.name(),
                n,
                block: QK,
            });
        }
        Ok(n / QK * self.block_bytes())
    }

    /// Dequantizes one block (`block.len() == block_bytes()`) into 32 values.
    #[inline]
    pub fn dequantize_block(self, block: &[u8], out: &mut [f32; QK]) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        match self {
            BlockFormat::Q8_0 => {
                for (o, &q) in out.iter_mut().zip(&block[2..2 + QK]) {
                    *o = (q as i8) as f32 * d;
                }
            }
            BlockFormat::Q4_0 => {
                let qs = &block[2..2 + QK / 2];
                for j in 0..QK / 2 {
                    out[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                    out[j + QK / 2] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            BlockFormat::Q4_1 => {
                let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                let qs = &block[4..4 + QK / 2];
                for j in 0..QK / 2 {
                    out[j] = (qs[j] & 0x0f) as f32 * d + m;
                    out[j + QK / 2] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
    }

    /// Dequantizes `bytes` holding `n` values into `out` (appended).
    pub fn dequantize(self, bytes: &[u8], n: usize, out: &mut Vec<f32>) -> Result<(), QuantError> {
        crate::expect_len(self.name(), n, self.bytes_for(n)?, bytes.len())?;
        let mut tmp = [0f32; QK];
        out.reserve(n);
        for block in bytes.chunks_exact(self.block_bytes()) {
            self.dequantize_block(block, &mut tmp);
            out.extend_from_slice(&tmp);
        }
        Ok(())
    }

    /// Round-to-nearest reference quantization of `values` (whole blocks), appended to `out`.
    /// Matches llama.cpp's reference quantizers so re-quantizing a dequantized tensor is stable.
    pub fn quantize(self, values: &[f32], out: &mut Vec<u8>) -> Result<(), QuantError> {
        self.bytes_for(values.len())?;
        for block in values.chunks_exact(QK) {
            match self {
                BlockFormat::Q8_0 => quantize_q8_0(block, out),
                BlockFormat::Q4_0 => quantize_q4_0(block, out),
                BlockFormat::Q4_1 => quantize_q4_1(block, out),
            }
        }
        Ok(())
    }
}

fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|v| ((v * id).round() as i8) as u8));
}

fn quantize_q4_0(x: &[f32], out: &mut Vec<u8>) {
    // The signed value of largest magnitude maps to -8, so the full [-8, 7] range is used.
    let max = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    for j in 0..QK / 2 {
        out.push(q(x[j]) | (q(x[j + QK / 2]) << 4));
    }
}

fn quantize_q4_1(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
    let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
    for j in 0..QK / 2 {
        out.push(q(x[j]) | (q(x[j + QK / 2]) << 4));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let x = pseudo_random(QK * 64, 7);
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1] {
            let mut bytes = Vec::new();
            format.quantize(&x, &mut bytes).unwrap();
            assert_eq!(bytes.len(), format.bytes_for(x.len()).unwrap());
            let mut y = Vec::new();
            format.dequantize(&bytes, x.len(), &mut y).unwrap();
            for (bx, by) in x.chunks(QK).zip(y.chunks(QK)) {
                let amax = bx.iter().fold(0f32, |m, v| m.max(v.abs()));
                let range = bx.iter().copied().fold(f32::MIN, f32::max)
                    - bx.iter().copied().fold(f32::MAX, f32::min);
                // One quantization step, plus f16 rounding of the scale.
                let step = match format {
                    BlockFormat::Q8_0 => amax / 127.0,
                    BlockFormat::Q4_0 => amax / 8.0,
                    BlockFormat::Q4_1 => range / 15.0,
                };
                // Q4_0 maps the largest magnitude to -8, so values of the opposite sign
                // near the far end clamp at 7: up to one whole step there.
                let bound = if format == BlockFormat::Q4_0 {
                    step
                } else {
                    0.5 * step
                };
                for (a, b) in bx.iter().zip(by) {
                    assert!(
                        (a - b).abs() <= bound * 1.01 + 1e-3 * amax,
                        "{}: {a} vs {b} (step {step})",
                        format.name()
                    );
                }
            }
        }
    }

    #[test]
    fn requantizing_dequantized_values_is_stable() {
        let x = pseudo_random(QK * 8, 3);
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1] {
            let mut bytes = Vec::new();
            format.quantize(&x, &mut bytes).unwrap();
            let mut y = Vec::new();
            format.dequantize(&bytes, x.len(), &mut y).unwrap();
            let mut bytes2 = Vec::new();
            format.quantize(&y, &mut bytes2).unwrap();
            let mut z = Vec::new();
            format.dequantize(&bytes2, x.len(), &mut z).unwrap();
            let worst = y
                .iter()
                .zip(&z)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // f32::max drops NaN: finiteness is its own check.
            assert!(z.iter().all(|v| v.is_finite()), "{}", format.name());
            assert!(worst < 2e-3, "{}: drift {worst}", format.name());
        }
    }

    #[test]
    fn nibble_layout_matches_the_documented_diagram() {
        // d = 1.0, m = 0: byte j holds value j (low) and value j+16 (high).
        let mut block = vec![0u8; BlockFormat::Q4_1.block_bytes()];
        block[..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        block[4] = 0x3a; // value 0 = 0xa, value 16 = 0x3
        let mut out = [0f32; QK];
        BlockFormat::Q4_1.dequantize_block(&block, &mut out);
        assert_eq!(out[0], 10.0);
        assert_eq!(out[16], 3.0);
        assert_eq!(out[1], 0.0);
    }

    #[test]
    fn misaligned_or_short_input_is_an_error() {
        let mut out = Vec::new();
        assert!(BlockFormat::Q8_0
            .dequantize(&[0; 34], 31, &mut out)
            .is_err());
        assert!(BlockFormat::Q4_0
            .dequantize(&[0; 17], 32, &mut out)
            .is_err());
        assert!(BlockFormat::Q4_1
            .quantize(&[0.0; 33], &mut Vec::new())
            .is_err());
    }
}
