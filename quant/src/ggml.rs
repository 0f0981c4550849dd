//! llama.cpp block formats that Vellum reads but does not compute in: the 5-bit group-32
//! formats, the k-quants (super-blocks of 256 values) and the 4-bit IQ formats (codes into
//! a table of values). At load a GGUF tensor in one of them is re-expressed in a format
//! Vellum has kernels for where one holds its values ([`DecodedFormat::repack`]: Q5_0,
//! IQ4_NL and IQ4_XS as Q8_0, Q4_K as int4), else decoded to f32 once (and stored as f16, or
//! requantized when asked to). Most GGUF files in circulation are k-quant mixes: a `Q4_K_M`
//! file holds `Q4_K` and `Q6_K` tensors, and, where a row is not a multiple of 256 values
//! (SmolLM2's 576), llama.cpp falls back to `Q5_0`, `Q5_1`, `Q8_0` or `IQ4_NL`.
//!
//! Layouts (little endian; `f16` scales; see each decoder for the value rule):
//!
//! ```text
//! Q5_0  (22 B / 32):  d | qh: u32 | qs[16]                    x = (q - 16) d
//! Q5_1  (24 B / 32):  d | m | qh: u32 | qs[16]                x = q d + m
//! Q2_K  (84 B / 256): scales[16] | qs[64] | d | dmin          x = d sc q - dmin m (16 groups of 16)
//! Q3_K (110 B / 256): hmask[32] | qs[64] | scales[12] | d     x = d (sc - 32) (q - 4 h̄)
//! Q4_K (144 B / 256): d | dmin | scales[12] | qs[128]         x = d sc q - dmin m (8 groups of 32)
//! Q5_K (176 B / 256): d | dmin | scales[12] | qh[32] | qs[128]
//! Q6_K (210 B / 256): ql[128] | qh[64] | scales[16]: i8 | d   x = d sc (q - 32) (16 groups of 16)
//! IQ4_NL (18 B / 32): d | qs[16]                               x = d table[q]
//! IQ4_XS (136 B / 256): d | scales_h: u16 | scales_l[4] | qs[128]
//!                                                             x = d (ls - 32) table[q] (8 groups of 32)
//! ```
//!
//! Arithmetic is f32 in the order llama.cpp's reference decoders use (`d * sc` first, then
//! times the code, minus the offset), so the values are theirs; tested against the `gguf`
//! Python package's decoders (`tests/golden/ggml_blocks.json`).

use crate::int4::pack_codes;
use crate::{BlockFormat, Int4Data, Int4Format, QuantError};
use half::f16;

/// Values per k-quant super-block.
pub const QK_K: usize = 256;

/// A GGUF block format read at load, never computed in as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodedFormat {
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Iq4Nl,
    Iq4Xs,
}

impl DecodedFormat {
    pub const ALL: [DecodedFormat; 9] = [
        DecodedFormat::Q5_0,
        DecodedFormat::Q5_1,
        DecodedFormat::Q2K,
        DecodedFormat::Q3K,
        DecodedFormat::Q4K,
        DecodedFormat::Q5K,
        DecodedFormat::Q6K,
        DecodedFormat::Iq4Nl,
        DecodedFormat::Iq4Xs,
    ];

    /// The format of ggml type id `ty`, if it is one of these.
    pub fn from_ggml_type(ty: u32) -> Option<DecodedFormat> {
        Some(match ty {
            6 => DecodedFormat::Q5_0,
            7 => DecodedFormat::Q5_1,
            10 => DecodedFormat::Q2K,
            11 => DecodedFormat::Q3K,
            12 => DecodedFormat::Q4K,
            13 => DecodedFormat::Q5K,
            14 => DecodedFormat::Q6K,
            20 => DecodedFormat::Iq4Nl,
            23 => DecodedFormat::Iq4Xs,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DecodedFormat::Q5_0 => "Q5_0",
            DecodedFormat::Q5_1 => "Q5_1",
            DecodedFormat::Q2K => "Q2_K",
            DecodedFormat::Q3K => "Q3_K",
            DecodedFormat::Q4K => "Q4_K",
            DecodedFormat::Q5K => "Q5_K",
            DecodedFormat::Q6K => "Q6_K",
            DecodedFormat::Iq4Nl => "IQ4_NL",
            DecodedFormat::Iq4Xs => "IQ4_XS",
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            DecodedFormat::Q5_0 | DecodedFormat::Q5_1 | DecodedFormat::Iq4Nl => 32,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DecodedFormat::Q5_0 => 22,
            DecodedFormat::Q5_1 => 24,
            DecodedFormat::Q2K => 84,
            DecodedFormat::Q3K => 110,
            DecodedFormat::Q4K => 144,
            DecodedFormat::Q5K => 176,
            DecodedFormat::Q6K => 210,
            DecodedFormat::Iq4Nl => 18,
            DecodedFormat::Iq4Xs => 136,
        }
    }

    /// Bytes holding `n` values, or an error when `n` is not whole blocks.
    pub fn bytes_for(self, n: usize) -> Result<usize, QuantError> {
        if !n.is_multiple_of(self.block_values()) {
            return Err(QuantError::NotBlockAligned {
                format: self.name(),
                n,
                block: self.block_values(),
            });
        }
        Ok(n / self.block_values() * self.block_bytes())
    }

    /// Decodes `bytes` holding `n` values, appended to `out`.
    pub fn dequantize(self, bytes: &[u8], n: usize, out: &mut Vec<f32>) -> Result<(), QuantError> {
        crate::expect_len(self.name(), n, self.bytes_for(n)?, bytes.len())?;
        let start = out.len();
        out.resize(start + n, 0.0);
        let blocks = bytes.chunks_exact(self.block_bytes());
        for (b, y) in blocks.zip(out[start..].chunks_exact_mut(self.block_values())) {
            match self {
                DecodedFormat::Q5_0 => q5_0(b, y),
                DecodedFormat::Q5_1 => q5_1(b, y),
                DecodedFormat::Q2K => q2_k(b, y),
                DecodedFormat::Q3K => q3_k(b, y),
                DecodedFormat::Q4K => q4_k(b, y),
                DecodedFormat::Q5K => q5_k(b, y),
                DecodedFormat::Q6K => q6_k(b, y),
                DecodedFormat::Iq4Nl => iq4_nl(b, y),
                DecodedFormat::Iq4Xs => iq4_xs(b, y),
            }
        }
        Ok(())
    }
}

/// A decoded-format matrix re-expressed in a format Vellum computes in (see
/// [`DecodedFormat::repack`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Repacked {
    Block(BlockFormat, Vec<u8>),
    Int4(Int4Format, Int4Data),
}

impl DecodedFormat {
    /// Whether [`DecodedFormat::repack`] keeps this format quantized (else it is decoded
    /// to f16).
    pub fn repacks(self) -> bool {
        matches!(
            self,
            DecodedFormat::Q5_0 | DecodedFormat::Q4K | DecodedFormat::Iq4Nl | DecodedFormat::Iq4Xs
        )
    }

    /// The `[rows, cols]` matrix in `bytes` in a format Vellum has kernels for, where one
    /// holds its values (else None: it is decoded to f16):
    /// - Q5_0 as Q8_0, exactly: a 5-bit code minus 16 is an int8 code under the same f16
    ///   scale, and both decode as code × scale in f32. IQ4_NL likewise: its codes index a
    ///   table of int8 values.
    /// - IQ4_XS as Q8_0: the table's values as codes, each 32 values' scale d·(ls − 32)
    ///   rounded from f32 to f16 (a value moves by at most 2⁻¹¹ of 127·|scale|).
    /// - Q4_K as asymmetric int4 with groups of 32: the codes as they are, each group's
    ///   scale d·sc and offset −dmin·m rounded from f32 to f16. A value moves by at most
    ///   2⁻¹¹ of 15·|scale| + |offset|: what storing the decoded value as f16 costs too,
    ///   at a quarter of f16's memory.
    pub fn repack(
        self,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Option<Repacked>, QuantError> {
        if !self.repacks() {
            return Ok(None);
        }
        if !cols.is_multiple_of(self.block_values()) {
            return Err(QuantError::NotBlockAligned {
                format: self.name(),
                n: cols,
                block: self.block_values(),
            });
        }
        let n = rows * cols;
        crate::expect_len(self.name(), n, self.bytes_for(n)?, bytes.len())?;
        let blocks = bytes.chunks_exact(self.block_bytes());
        if self != DecodedFormat::Q4K {
            // As Q8_0 blocks: an f16 scale, then 32 int8 codes.
            let mut out = Vec::with_capacity(BlockFormat::Q8_0.bytes_for(n)?);
            for b in blocks {
                match self {
                    DecodedFormat::Q5_0 => {
                        out.extend_from_slice(&b[0..2]);
                        let codes = q5_codes(&b[2..6], &b[6..22]);
                        out.extend(codes.iter().map(|&q| (q as i8 - 16) as u8));
                    }
                    DecodedFormat::Iq4Nl => {
                        out.extend_from_slice(&b[0..2]);
                        out.extend(iq4_codes(&b[2..18]).map(|v| v as u8));
                    }
                    _ => {
                        let d = half(b, 0);
                        for (group, qs) in b[8..136].chunks_exact(16).enumerate() {
                            let scale = d * iq4_xs_scale(b, group) as f32;
                            out.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
                            out.extend(iq4_codes(qs).map(|v| v as u8));
                        }
                    }
                }
            }
            return Ok(Some(Repacked::Block(BlockFormat::Q8_0, out)));
        }
        // Q4_K as int4, group 32.
        let groups = n / 32;
        let mut data = Int4Data {
            packed: Vec::new(),
            scales: Vec::with_capacity(groups),
            mins: Vec::with_capacity(groups),
        };
        let mut codes = Vec::with_capacity(n);
        for (scale, offset, group) in blocks.flat_map(q4_k_groups) {
            data.scales.push(f16::from_f32(scale));
            data.mins.push(f16::from_f32(-offset));
            codes.extend(group);
        }
        data.packed = pack_codes(codes);
        let format = Int4Format {
            group: 32,
            symmetric: false,
        };
        Ok(Some(Repacked::Int4(format, data)))
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 5-bit codes of a Q5_0/Q5_1 block: low nibbles of `qs` (value j in byte j's low
/// nibble, value j + 16 in its high one) with bit 4 from `qh` bit j.
fn q5_codes(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for j in 0..16 {
        let high = |bit: usize| (((qh >> bit) & 1) as u8) << 4;
        q[j] = (qs[j] & 0x0f) | high(j);
        q[j + 16] = (qs[j] >> 4) | high(j + 16);
    }
    q
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (o, q) in y.iter_mut().zip(q5_codes(&b[2..6], &b[6..22])) {
        *o = (q as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (o, q) in y.iter_mut().zip(q5_codes(&b[4..8], &b[8..24])) {
        *o = q as f32 * d + m;
    }
}

/// IQ4_NL's and IQ4_XS's 16 values, which their 4-bit codes index (llama.cpp's
/// `kvalues_iq4nl`: a non-linear grid, denser near zero).
const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The table values of 32 codes in 16 bytes (value j in byte j's low nibble, j + 16 in its
/// high one).
fn iq4_codes(qs: &[u8]) -> impl Iterator<Item = i8> + '_ {
    let low = qs.iter().map(|&q| IQ4_VALUES[(q & 0x0f) as usize]);
    low.chain(qs.iter().map(|&q| IQ4_VALUES[(q >> 4) as usize]))
}

/// IQ4_NL: d, then 16 bytes of codes into the table: x = d · table[q].
fn iq4_nl(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (o, v) in y.iter_mut().zip(iq4_codes(&b[2..18])) {
        *o = d * v as f32;
    }
}

/// IQ4_XS's signed multiplier of group `group` (0..8): six bits, the low four from the
/// nibbles of bytes 4..8, the high two from the u16 at byte 2; offset 32.
fn iq4_xs_scale(b: &[u8], group: usize) -> i32 {
    let high = u16::from_le_bytes([b[2], b[3]]);
    let low = (b[4 + group / 2] >> (4 * (group % 2))) & 0x0f;
    (low as i32 | ((((high >> (2 * group)) & 3) as i32) << 4)) - 32
}

/// IQ4_XS: d | scales_h: u16 | scales_l[4] | qs[128]; 8 groups of 32 with IQ4_NL's codes:
/// x = (d · (ls − 32)) · table[q].
fn iq4_xs(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (group, (ys, qs)) in y
        .chunks_exact_mut(32)
        .zip(b[8..136].chunks_exact(16))
        .enumerate()
    {
        let dl = d * iq4_xs_scale(b, group) as f32;
        for (o, v) in ys.iter_mut().zip(iq4_codes(qs)) {
            *o = dl * v as f32;
        }
    }
}

/// Scale and offset multipliers of group `j` (0..8) of a Q4_K/Q5_K block: six bits each,
/// packed in 12 bytes (groups 0..4 in the low six bits of bytes 0..8, groups 4..8 in the
/// nibbles of bytes 8..12 with their top two bits in the top bits of bytes 0..8).
fn k4_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Q4_K: 8 groups of 32; group pairs share 32 bytes of `qs` (low nibbles the first group,
/// high nibbles the second).
fn q4_k(b: &[u8], y: &mut [f32]) {
    for (ys, (dl, ml, codes)) in y.chunks_exact_mut(32).zip(q4_k_groups(b)) {
        for (o, q) in ys.iter_mut().zip(codes) {
            *o = dl * q as f32 - ml;
        }
    }
}

/// A Q4_K block's 8 groups in order: scale d·sc, offset dmin·m (subtracted) and 32 codes.
fn q4_k_groups(b: &[u8]) -> impl Iterator<Item = (f32, f32, [u8; 32])> + '_ {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    (0..8).map(move |group| {
        let (sc, m) = k4_scale_min(scales, group);
        let (q, shift) = (&qs[32 * (group / 2)..], 4 * (group % 2));
        let codes = std::array::from_fn(|l| (q[l] >> shift) & 0x0f);
        (d * sc as f32, dmin * m as f32, codes)
    })
}

/// Q5_K: Q4_K with a fifth bit per value from `qh` (bit 2·pair for the low group of a pair,
/// 2·pair + 1 for the high one).
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (pair, (ys, q)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
        for (half_, shift) in [(0, 0), (1, 4)] {
            let (sc, m) = k4_scale_min(scales, 2 * pair + half_);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            let bit = 2 * pair + half_;
            for l in 0..32 {
                let code = ((q[l] >> shift) & 0x0f) | (((qh[l] >> bit) & 1) << 4);
                ys[32 * half_ + l] = dl * code as f32 - ml;
            }
        }
    }
}

/// Q6_K: two halves of 128 values, each from 64 bytes of `ql` (low four bits) and 32 of
/// `qh` (two high bits per value), in four runs of 32 with a signed scale per 16 values.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for h in 0..2 {
        let (ql, qh, sc) = (&ql[64 * h..], &qh[32 * h..], &scales[8 * h..]);
        let ys = &mut y[128 * h..128 * (h + 1)];
        for l in 0..32 {
            let codes = [
                (ql[l] & 0x0f) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (run, &code) in codes.iter().enumerate() {
                let scale = sc[l / 16 + 2 * run] as i8;
                ys[32 * run + l] = d * scale as f32 * (code as i32 - 32) as f32;
            }
        }
    }
}

/// Q2_K: two halves of 128 values, each from 32 bytes of `qs` read four times (two bits at
/// shifts 0, 2, 4, 6), 16 values per scale byte (low nibble scale, high nibble offset).
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half(b, 80), half(b, 82));
    let mut group = 0;
    for (h, q) in qs.chunks_exact(32).enumerate() {
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[group];
                let (dl, ml) = (d * (sc & 0x0f) as f32, dmin * (sc >> 4) as f32);
                let at = 128 * h + 32 * (shift / 2) + 16 * part;
                for l in 0..16 {
                    y[at + l] = dl * ((q[16 * part + l] >> shift) & 3) as f32 - ml;
                }
                group += 1;
            }
        }
    }
}

/// Q3_K: Q2_K's two-bit layout plus a high bit per value from `hmask` (set: the code as is;
/// clear: minus 4), and 16 six-bit signed scales (offset 32) packed in 12 bytes: the low
/// nibbles of bytes 0..8 are scales 0..8, their high nibbles 8..16, and bytes 8..12 hold
/// the top two bits of each.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half(b, 108);
    let scale = |i: usize| {
        let low = if i < 8 {
            packed[i] & 0x0f
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        (low | (high << 4)) as i32 - 32
    };
    let mut group = 0;
    let mut bit = 0;
    for (h, q) in qs.chunks_exact(32).enumerate() {
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * scale(group) as f32;
                let at = 128 * h + 32 * (shift / 2) + 16 * part;
                for l in 0..16 {
                    let low = ((q[16 * part + l] >> shift) & 3) as i32;
                    let minus = if (hmask[16 * part + l] >> bit) & 1 == 1 {
                        0
                    } else {
                        4
                    };
                    y[at + l] = dl * (low - minus) as f32;
                }
                group += 1;
            }
            bit += 1;
        }
    }
}
