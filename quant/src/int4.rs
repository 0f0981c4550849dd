//! Group-wise int4 in a planar layout, for any group of 32, 64 or 128 values.
//!
//! A `[rows, cols]` matrix is three arrays (row-major, each row contiguous):
//!
//! ```text
//! packed [rows, cols/2] u8   the 4-bit codes, in 32-value chunks of 16 bytes:
//!                            chunk c of a row = bytes 16c..16c+16;
//!                            byte j: bits 0..4 = value 32c + j, bits 4..8 = value 32c + j + 16
//! scales [rows, groups] f16   one scale d per group; groups = ceil(cols / group), the last
//!                              group of a row may be short (cols only need whole chunks)
//! mins   [rows, groups] f16   asymmetric only: one offset m per group
//!
//! symmetric:   x = (q - 8) * d        (q in 0..16; the Q4_0 rule)
//! asymmetric:  x = q * d + m          (the Q4_1 rule)
//! ```
//!
//! Unlike GGUF's Q4_0/Q4_1 blocks (18 or 20 bytes: a scale interleaved with 16 bytes of
//! codes, so nothing after the first block is 16-byte aligned), the codes here are one aligned
//! stream: a GPU lane reads 32 values with one 16-byte load and a warp reads 512 contiguous
//! bytes, and the scales are a separate small array that stays in cache. The nibble order
//! inside a chunk is GGUF's, so the CPU decodes both with the same code. GGUF Q4_0/Q4_1
//! tensors are group-32 instances of this format and can be repacked without requantizing
//! ([`Int4Format::from_q4_blocks`]).

use crate::{BlockFormat, QuantError, QK};
use half::f16;

/// Group size and symmetry of a planar int4 matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Int4Format {
    pub group: usize,
    pub symmetric: bool,
}

/// How the per-group scale (and offset) are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleSearch {
    /// Round to nearest from the group's extremes (what llama.cpp's reference code does).
    RoundToNearest,
    /// Tries a range of scales around the round-to-nearest one, refits scale (and offset) by
    /// least squares for each, and keeps the one with the smallest squared error.
    Mse,
}

/// The three arrays of a planar int4 matrix (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Data {
    pub packed: Vec<u8>,
    pub scales: Vec<f16>,
    pub mins: Vec<f16>,
}

impl Int4Format {
    pub const GROUPS: [usize; 3] = [32, 64, 128];

    pub fn new(group: usize, symmetric: bool) -> Result<Self, QuantError> {
        if Self::GROUPS.contains(&group) {
            Ok(Int4Format { group, symmetric })
        } else {
            Err(QuantError::UnsupportedGroup { group })
        }
    }

    /// `int4:g128`, `int4:g64:sym`, ...
    pub fn name(self) -> &'static str {
        match (self.group, self.symmetric) {
            (32, false) => "int4:g32",
            (32, true) => "int4:g32:sym",
            (64, false) => "int4:g64",
            (64, true) => "int4:g64:sym",
            (128, false) => "int4:g128",
            _ => "int4:g128:sym",
        }
    }

    /// Groups per row of `cols` values. Rows must be whole 32-value chunks; the last group of
    /// a row may be shorter than the others (SmolLM2's 576 columns are 4.5 groups of 128).
    pub fn groups(self, cols: usize) -> Result<usize, QuantError> {
        if cols.is_multiple_of(QK) {
            Ok(cols.div_ceil(self.group))
        } else {
            Err(QuantError::NotBlockAligned {
                format: self.name(),
                n: cols,
                block: QK,
            })
        }
    }

    /// Checks the three arrays' lengths for a `[rows, cols]` matrix.
    pub fn check(self, rows: usize, cols: usize, data: &Int4Data) -> Result<(), QuantError> {
        let groups = rows * self.groups(cols)?;
        let want = [
            (rows * cols / 2, data.packed.len()),
            (groups, data.scales.len()),
            (if self.symmetric { 0 } else { groups }, data.mins.len()),
        ];
        for (expected, got) in want {
            crate::expect_len(self.name(), rows * cols, expected, got)?;
        }
        Ok(())
    }

    /// Quantizes a row-major `[rows, cols]` matrix.
    pub fn quantize(
        self,
        rows: usize,
        cols: usize,
        values: &[f32],
        search: ScaleSearch,
    ) -> Result<Int4Data, QuantError> {
        let groups = self.groups(cols)?;
        crate::expect_len(self.name(), rows * cols, rows * cols, values.len())?;
        let mut codes = vec![0u8; rows * cols];
        let mut data = Int4Data {
            packed: Vec::new(),
            scales: Vec::with_capacity(rows * groups),
            mins: Vec::with_capacity(if self.symmetric { 0 } else { rows * groups }),
        };
        let group = self.group;
        let groups_in = values.chunks(cols.max(1)).flat_map(|r| r.chunks(group));
        let codes_out = codes
            .chunks_mut(cols.max(1))
            .flat_map(|r| r.chunks_mut(group));
        for (x, q) in groups_in.zip(codes_out) {
            let (d, m) = if self.symmetric {
                (quantize_group_sym(x, q, search), None)
            } else {
                let (d, m) = quantize_group_asym(x, q, search);
                (d, Some(m))
            };
            data.scales.push(d);
            data.mins.extend(m);
        }
        data.packed = pack_codes(codes);
        Ok(data)
    }

    /// Dequantizes row `r` of a `[rows, cols]` matrix into `out` (`cols` values).
    pub fn dequantize_row(self, data: &Int4Data, cols: usize, r: usize, out: &mut [f32]) {
        let groups = cols.div_ceil(self.group);
        let packed = &data.packed[r * cols / 2..(r + 1) * cols / 2];
        for (i, o) in out.iter_mut().enumerate() {
            let byte = packed[i / QK * (QK / 2) + i % (QK / 2)];
            let q = if i % QK < QK / 2 {
                byte & 0x0f
            } else {
                byte >> 4
            };
            let g = r * groups + i / self.group;
            let d = data.scales[g].to_f32();
            *o = if self.symmetric {
                (q as i32 - 8) as f32 * d
            } else {
                q as f32 * d + data.mins[g].to_f32()
            };
        }
    }

    /// Repacks GGUF Q4_0 (symmetric) or Q4_1 (asymmetric) blocks of a `[rows, cols]` matrix
    /// into the group-32 planar format, bit for bit (no requantization).
    pub fn from_q4_blocks(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<(Int4Format, Int4Data), QuantError> {
        let (symmetric, header) = match format {
            BlockFormat::Q4_0 => (true, 2),
            BlockFormat::Q4_1 => (false, 4),
            BlockFormat::Q8_0 => {
                return Err(QuantError::NotBlockAligned {
                    format: "Q8_0 (not an int4 format)",
                    n: cols,
                    block: QK,
                })
            }
        };
        let expected = rows * format.bytes_for(cols)?;
        crate::expect_len(format.name(), rows * cols, expected, bytes.len())?;
        let mut data = Int4Data {
            packed: Vec::new(),
            scales: Vec::with_capacity(rows * cols / QK),
            mins: Vec::new(),
        };
        for block in bytes.chunks_exact(format.block_bytes()) {
            data.scales.push(f16::from_le_bytes([block[0], block[1]]));
            if !symmetric {
                data.mins.push(f16::from_le_bytes([block[2], block[3]]));
            }
            data.packed.extend_from_slice(&block[header..]);
        }
        Ok((
            Int4Format {
                group: QK,
                symmetric,
            },
            data,
        ))
    }
}

/// 4-bit codes (row-major, whole 32-value chunks) in the packed layout of the module docs.
pub(crate) fn pack_codes(codes: impl IntoIterator<Item = u8>) -> Vec<u8> {
    let codes: Vec<u8> = codes.into_iter().collect();
    let mut packed = Vec::with_capacity(codes.len() / 2);
    for chunk in codes.chunks_exact(QK) {
        for j in 0..QK / 2 {
            packed.push(chunk[j] | (chunk[j + QK / 2] << 4));
        }
    }
    packed
}

fn sq_err_sym(x: &[f32], d: f32) -> (f32, f32) {
    // Error with the scale as stored (f16), and that stored scale.
    let d16 = f16::from_f32(d).to_f32();
    let id = if d16 != 0.0 { 1.0 / d16 } else { 0.0 };
    let err = x
        .iter()
        .map(|&v| {
            let q = ((v * id).round()).clamp(-8.0, 7.0);
            (v - q * d16).powi(2)
        })
        .sum();
    (err, d16)
}

/// Symmetric group: codes into `q`, returns the f16 scale.
fn quantize_group_sym(x: &[f32], q: &mut [u8], search: ScaleSearch) -> f16 {
    // The signed value of largest magnitude maps to -8 (the Q4_0 rule).
    let max = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let mut best = (f32::INFINITY, max / -8.0);
    if search == ScaleSearch::Mse && max != 0.0 {
        for step in -12..=12 {
            let iscale = (-8.0 + 0.1 * step as f32) / max;
            let codes = x.iter().map(|&v| (v * iscale).round().clamp(-8.0, 7.0));
            let (sxq, sqq) = codes
                .zip(x)
                .fold((0f32, 0f32), |(a, b), (c, &v)| (a + v * c, b + c * c));
            if sqq > 0.0 {
                let cand = sq_err_sym(x, sxq / sqq);
                if cand.0 < best.0 {
                    best = cand;
                }
            }
        }
    }
    let rtn = sq_err_sym(x, max / -8.0);
    let d = if best.0 < rtn.0 { best.1 } else { rtn.1 };
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = ((v * id).round().clamp(-8.0, 7.0) + 8.0) as u8;
    }
    f16::from_f32(d)
}

fn sq_err_asym(x: &[f32], d: f32, m: f32) -> (f32, f32, f32) {
    let (d16, m16) = (f16::from_f32(d).to_f32(), f16::from_f32(m).to_f32());
    let id = if d16 != 0.0 { 1.0 / d16 } else { 0.0 };
    let err = x
        .iter()
        .map(|&v| {
            let q = ((v - m16) * id).round().clamp(0.0, 15.0);
            (v - (q * d16 + m16)).powi(2)
        })
        .sum();
    (err, d16, m16)
}

/// Asymmetric group: codes into `q`, returns the f16 scale and offset.
fn quantize_group_asym(x: &[f32], q: &mut [u8], search: ScaleSearch) -> (f16, f16) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut best = sq_err_asym(x, (max - min) / 15.0, min);
    if search == ScaleSearch::Mse && max > min {
        let n = x.len() as f32;
        for step in -5..=15 {
            // Codes for a candidate scale, then the least-squares (d, m) for those codes.
            let d0 = (max - min) / (15.0 + 0.2 * step as f32);
            let codes: Vec<f32> = x
                .iter()
                .map(|&v| ((v - min) / d0).round().clamp(0.0, 15.0))
                .collect();
            let (sq, sqq, sx, sxq) = codes
                .iter()
                .zip(x)
                .fold((0f32, 0f32, 0f32, 0f32), |(a, b, c, e), (&qv, &v)| {
                    (a + qv, b + qv * qv, c + v, e + v * qv)
                });
            let det = sqq * n - sq * sq;
            if det.abs() < 1e-12 {
                continue;
            }
            let d = (sxq * n - sq * sx) / det;
            let m = (sqq * sx - sq * sxq) / det;
            if d > 0.0 {
                let cand = sq_err_asym(x, d, m);
                if cand.0 < best.0 {
                    best = cand;
                }
            }
        }
    }
    let (_, d, m) = best;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = ((v - m) * id).round().clamp(0.0, 15.0) as u8;
    }
    (f16::from_f32(d), f16::from_f32(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                ((h >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * (1.0 + (i % 7) as f32)
            })
            .collect()
    }

    fn mse(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            / a.len() as f64
    }

    fn dequantize(f: Int4Format, d: &Int4Data, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * cols];
        for (r, row) in out.chunks_exact_mut(cols).enumerate() {
            f.dequantize_row(d, cols, r, row);
        }
        out
    }

    #[test]
    fn round_trip_error_is_within_half_a_step_per_group() {
        // 320 columns: 2.5 groups of 128, so rows end in a partial group.
        let (rows, cols) = (3, 320);
        let v = matrix(rows, cols, 1);
        for group in Int4Format::GROUPS {
            for symmetric in [false, true] {
                let f = Int4Format::new(group, symmetric).unwrap();
                let data = f
                    .quantize(rows, cols, &v, ScaleSearch::RoundToNearest)
                    .unwrap();
                f.check(rows, cols, &data).unwrap();
                let back = dequantize(f, &data, rows, cols);
                let in_groups = v.chunks(cols).flat_map(|r| r.chunks(group));
                let out_groups = back.chunks(cols).flat_map(|r| r.chunks(group));
                for (g, (x, y)) in in_groups.zip(out_groups).enumerate() {
                    let (lo, hi) = x
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                    // Symmetric spends a code on -8 but maps the largest magnitude there:
                    // its step is amax / 8; asymmetric: range / 15. Plus f16 rounding.
                    let step = if symmetric {
                        lo.abs().max(hi.abs()) / 8.0
                    } else {
                        (hi - lo) / 15.0
                    };
                    let bound = if symmetric { step } else { 0.5 * step } * 1.01 + 1e-3;
                    for (a, b) in x.iter().zip(y) {
                        assert!((a - b).abs() <= bound, "{} group {g}: {a} vs {b}", f.name());
                    }
                }
            }
        }
    }

    #[test]
    fn mse_search_never_loses_to_round_to_nearest_and_usually_wins() {
        let (rows, cols) = (8, 512);
        let v = matrix(rows, cols, 7);
        for group in Int4Format::GROUPS {
            for symmetric in [false, true] {
                let f = Int4Format::new(group, symmetric).unwrap();
                let rtn = dequantize(
                    f,
                    &f.quantize(rows, cols, &v, ScaleSearch::RoundToNearest)
                        .unwrap(),
                    rows,
                    cols,
                );
                let opt = dequantize(
                    f,
                    &f.quantize(rows, cols, &v, ScaleSearch::Mse).unwrap(),
                    rows,
                    cols,
                );
                let (e_rtn, e_opt) = (mse(&v, &rtn), mse(&v, &opt));
                assert!(
                    e_opt <= e_rtn * 1.0001,
                    "{}: mse {e_opt} vs rtn {e_rtn}",
                    f.name()
                );
                assert!(
                    e_opt < e_rtn * 0.97,
                    "{}: search gained too little: {e_opt} vs {e_rtn}",
                    f.name()
                );
            }
        }
    }

    #[test]
    fn gguf_q4_blocks_repack_bit_for_bit() {
        let (rows, cols) = (2, 96);
        let v = matrix(rows, cols, 3);
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1] {
            let mut bytes = Vec::new();
            format.quantize(&v, &mut bytes).unwrap();
            let mut want = Vec::new();
            format.dequantize(&bytes, rows * cols, &mut want).unwrap();
            let (f, data) = Int4Format::from_q4_blocks(format, rows, cols, &bytes).unwrap();
            assert_eq!(f.symmetric, format == BlockFormat::Q4_0);
            assert_eq!(dequantize(f, &data, rows, cols), want, "{}", format.name());
        }
        assert!(Int4Format::from_q4_blocks(BlockFormat::Q4_1, rows, cols, &[0; 10]).is_err());
    }

    /// Values that came out of Q4_1 are reproduced by planar group-32 (same grid), so any
    /// loss at larger groups comes from the grid, not from the code.
    #[test]
    fn requantizing_q4_1_values_at_group_32_is_lossless() {
        let (rows, cols) = (4, 192);
        let mut bytes = Vec::new();
        BlockFormat::Q4_1
            .quantize(&matrix(rows, cols, 5), &mut bytes)
            .unwrap();
        let mut v = Vec::new();
        BlockFormat::Q4_1
            .dequantize(&bytes, rows * cols, &mut v)
            .unwrap();
        let f = Int4Format::new(32, false).unwrap();
        for search in [ScaleSearch::RoundToNearest, ScaleSearch::Mse] {
            let back = dequantize(f, &f.quantize(rows, cols, &v, search).unwrap(), rows, cols);
            let worst = v
                .iter()
                .zip(&back)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // f32::max drops NaN: finiteness is its own check.
            assert!(back.iter().all(|v| v.is_finite()), "{search:?}");
            assert!(worst < 2e-3, "{search:?}: worst error {worst}");
        }
    }

    #[test]
    fn bad_shapes_and_groups_are_errors() {
        assert!(Int4Format::new(48, false).is_err());
        let f = Int4Format::new(128, false).unwrap();
        let err = f.quantize(1, 80, &[0.0; 80], ScaleSearch::Mse).unwrap_err();
        assert!(err.to_string().contains("int4:g128"), "{err}");
        let data = Int4Data {
            packed: vec![0; 64],
            scales: vec![f16::ZERO; 1],
            mins: vec![],
        };
        assert!(
            f.check(1, 128, &data).is_err(),
            "asymmetric data without mins"
        );
        // All-zero groups quantize to zero without NaNs.
        let z = f.quantize(1, 128, &[0.0; 128], ScaleSearch::Mse).unwrap();
        assert_eq!(dequantize(f, &z, 1, 128), vec![0.0; 128]);
    }
}
