//! Weights as the backends consume them: dense rows kept in the dtype they were loaded in
//! (bf16/f16 are not widened to f32 in memory), or group-32 block-quantized rows.

use crate::cpu::rows16::Rows16;
use half::{bf16, f16};
use vellum_quant::{int8, BlockFormat, DType, Int4Data, Int4Format, ScaleSearch, QK};

/// Storage of a `[rows, cols]` weight matrix, row-major.
#[derive(Debug, Clone)]
pub enum WeightData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    /// Block-quantized rows, each `cols / 32` blocks.
    Block(BlockFormat, Vec<u8>),
    /// Symmetric int8 with one f32 scale per output row (per channel): `x = q * scale`.
    Int8PerRow {
        q: Vec<i8>,
        scales: Vec<f32>,
    },
    /// Planar group-wise int4 (groups of 32/64/128; layout in `vellum_quant::int4`).
    Int4(Int4Format, Int4Data),
    /// A quantized weight repacked 16 rows per register for the CPU's integer dots
    /// (`cpu::rows16`), by `Backend::prepare_weight` at load: it replaces the storage it was
    /// packed from and reads back the same values.
    Rows16(Box<Rows16>),
}

/// A weight format to quantize to (on load, or with `vellum quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantTarget {
    /// Symmetric int8, one scale per output row.
    Int8PerChannel,
    /// A group-32 block format (Q8_0, Q4_0 symmetric int4, Q4_1 asymmetric int4).
    Block(BlockFormat),
    /// Planar int4 with groups of 64 or 128 (and the scale search used to quantize).
    Int4(Int4Format, ScaleSearch),
}

impl QuantTarget {
    /// Parses `int8`, `int8:g32` (Q8_0), `int4` (= `int4:g32`, asymmetric, the Q4_1 layout),
    /// `int4:sym` (Q4_0), the GGUF names `q8_0`, `q4_0`, `q4_1`, and planar int4 with larger
    /// groups: `int4:g64`, `int4:g128`, `…:sym` for symmetric, `…:mse` for the MSE scale
    /// search instead of round to nearest (it lowers weight error but, measured on SmolLM2,
    /// raises perplexity; see README).
    pub fn parse(s: &str) -> Option<QuantTarget> {
        let lower = s.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("int4:g") {
            let mut parts = rest.split(':');
            let group: usize = parts.next()?.parse().ok()?;
            let (mut symmetric, mut search) = (false, ScaleSearch::RoundToNearest);
            for p in parts {
                match p {
                    "sym" => symmetric = true,
                    "mse" => search = ScaleSearch::Mse,
                    _ => return None,
                }
            }
            if group == QK {
                // Group 32 is GGUF's block layout (kept for llama.cpp compatibility).
                let f = if symmetric {
                    BlockFormat::Q4_0
                } else {
                    BlockFormat::Q4_1
                };
                return (search == ScaleSearch::RoundToNearest).then_some(QuantTarget::Block(f));
            }
            return Int4Format::new(group, symmetric)
                .ok()
                .map(|f| QuantTarget::Int4(f, search));
        }
        Some(match lower.as_str() {
            "int8" | "int8:channel" => QuantTarget::Int8PerChannel,
            "q8_0" | "int8:g32" => QuantTarget::Block(BlockFormat::Q8_0),
            "int4" | "int4:g32" | "q4_1" => QuantTarget::Block(BlockFormat::Q4_1),
            "int4:sym" | "int4:g32:sym" | "q4_0" => QuantTarget::Block(BlockFormat::Q4_0),
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantTarget::Int8PerChannel => "int8",
            QuantTarget::Block(f) => f.name(),
            QuantTarget::Int4(f, _) => f.name(),
        }
    }
}

/// A 2-D weight: `rows` output features by `cols` input features.
#[derive(Debug, Clone)]
pub struct Weight {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
    /// A backend's own copy (device memory), attached by its `prepare_weight`.
    device: Option<DeviceCopy>,
}

/// A backend's copy of a weight, opaque to everything else; clones share it.
#[derive(Clone)]
pub struct DeviceCopy(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for DeviceCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceCopy")
    }
}

impl Weight {
    /// Builds a weight, checking that the storage holds exactly `rows * cols` values.
    pub fn new(rows: usize, cols: usize, data: WeightData) -> crate::Result<Weight> {
        let n = rows * cols;
        let (have, unit) = match &data {
            WeightData::F32(v) => (v.len(), n),
            WeightData::F16(v) => (v.len(), n),
            WeightData::BF16(v) => (v.len(), n),
            WeightData::Block(f, v) => (v.len(), f.bytes_for(n)?),
            WeightData::Int8PerRow { q, scales } => {
                crate::check("weight", scales.len() == rows, || {
                    format!("int8: {} scales for {rows} rows", scales.len())
                })?;
                (q.len(), n)
            }
            WeightData::Int4(f, d) => {
                f.check(rows, cols, d)?;
                (n, n)
            }
            WeightData::Rows16(p) => {
                crate::check("weight", (p.rows(), p.cols()) == (rows, cols), || {
                    format!(
                        "a [{}, {}] packing for [{rows}, {cols}]",
                        p.rows(),
                        p.cols()
                    )
                })?;
                (n, n)
            }
        };
        if let WeightData::Block(f, _) = &data {
            crate::check("weight", cols.is_multiple_of(QK), || {
                format!("{} rows must be whole blocks; cols = {cols}", f.name())
            })?;
        }
        crate::check("weight", have == unit, || {
            format!("[{rows}, {cols}] needs {unit} elements/bytes, storage has {have}")
        })?;
        Ok(Weight {
            rows,
            cols,
            data,
            device: None,
        })
    }

    /// The copy a backend attached with [`Weight::set_device_copy`], if any. Each backend
    /// recognizes its own (by type and device) and ignores others.
    pub fn device_copy(&self) -> Option<&DeviceCopy> {
        self.device.as_ref()
    }

    /// Attaches a backend's copy of this weight, made from `data` as it is now: whoever
    /// changes `data` afterwards must call [`Weight::clear_device_copy`].
    pub fn set_device_copy(&mut self, copy: DeviceCopy) {
        self.device = Some(copy);
    }

    pub fn clear_device_copy(&mut self) {
        self.device = None;
    }

    /// The CPU integer path's repacked storage, if this weight was prepared for it
    /// (`Backend::prepare_weight`).
    pub(crate) fn packed_rows16(&self) -> Option<&Rows16> {
        match &self.data {
            WeightData::Rows16(p) => Some(p),
            _ => None,
        }
    }

    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> crate::Result<Weight> {
        Weight::new(rows, cols, WeightData::F32(values))
    }

    /// Converts f32 values into a dense weight of `dtype`.
    pub fn dense(rows: usize, cols: usize, dtype: DType, values: &[f32]) -> crate::Result<Weight> {
        let data = match dtype {
            DType::F32 => WeightData::F32(values.to_vec()),
            DType::F16 => WeightData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            DType::BF16 => WeightData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
        };
        Weight::new(rows, cols, data)
    }

    /// A short description of the storage format (`f32`, `bf16`, `Q4_1`, ...).
    pub fn format_name(&self) -> &'static str {
        match &self.data {
            WeightData::F32(_) => "f32",
            WeightData::F16(_) => "f16",
            WeightData::BF16(_) => "bf16",
            WeightData::Block(f, _) => f.name(),
            WeightData::Int8PerRow { .. } => "int8",
            WeightData::Int4(f, _) => f.name(),
            WeightData::Rows16(p) => p.source_format(),
        }
    }

    /// Bytes the weight occupies in memory (what a matmul reads).
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::F16(v) => v.len() * 2,
            WeightData::BF16(v) => v.len() * 2,
            WeightData::Block(_, v) => v.len(),
            WeightData::Int8PerRow { q, scales } => q.len() + scales.len() * 4,
            WeightData::Int4(_, d) => d.packed.len() + (d.scales.len() + d.mins.len()) * 2,
            WeightData::Rows16(p) => p.bytes(),
        }
    }

    /// Dequantizes row `r` into `out` (`out.len() == cols`). `r < rows` is the caller's duty.
    #[inline]
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match &self.data {
            WeightData::F32(v) => out.copy_from_slice(&v[r * c..(r + 1) * c]),
            WeightData::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[r * c..(r + 1) * c].convert_to_f32_slice(out)
            }
            WeightData::BF16(v) => {
                for (o, x) in out.iter_mut().zip(&v[r * c..(r + 1) * c]) {
                    // bf16 is the top half of an f32: a shift, exact.
                    *o = f32::from_bits((x.to_bits() as u32) << 16);
                }
            }
            WeightData::Block(f, bytes) => {
                let bb = f.block_bytes();
                let per_row = c / QK;
                let row = &bytes[r * per_row * bb..(r + 1) * per_row * bb];
                for (block, chunk) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
                    let chunk: &mut [f32; QK] = chunk.try_into().expect("chunks_exact_mut(QK)");
                    f.dequantize_block(block, chunk);
                }
            }
            WeightData::Int8PerRow { q, scales } => {
                for (o, &v) in out.iter_mut().zip(&q[r * c..(r + 1) * c]) {
                    *o = v as f32 * scales[r];
                }
            }
            WeightData::Int4(f, d) => f.dequantize_row(d, c, r, out),
            WeightData::Rows16(p) => p.row_to_f32(r, out),
        }
    }

    /// This weight quantized to `target`, round to nearest from its f32 values (int8 per
    /// channel: scale `amax / 127` per row).
    pub fn quantize(&self, target: QuantTarget) -> crate::Result<Weight> {
        let values = self.to_f32();
        let data = match target {
            QuantTarget::Int8PerChannel => {
                let mut q = Vec::with_capacity(values.len());
                let mut scales = Vec::with_capacity(self.rows);
                for row in values.chunks(self.cols.max(1)) {
                    let scale = int8::row_scale(row);
                    let inv = int8::inverse(scale);
                    q.extend(row.iter().map(|&v| int8::code(v, inv)));
                    scales.push(scale);
                }
                WeightData::Int8PerRow { q, scales }
            }
            QuantTarget::Block(f) => {
                let mut bytes = Vec::new();
                f.quantize(&values, &mut bytes)?;
                WeightData::Block(f, bytes)
            }
            QuantTarget::Int4(f, search) => {
                WeightData::Int4(f, f.quantize(self.rows, self.cols, &values, search)?)
            }
        };
        Weight::new(self.rows, self.cols, data)
    }

    /// This weight as a dense `dtype` matrix (dequantizing if needed).
    pub fn to_dense(&self, dtype: DType) -> crate::Result<Weight> {
        Weight::dense(self.rows, self.cols, dtype, &self.to_f32())
    }

    /// The whole matrix as f32 (for conversion and tests; not on hot paths).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
                self.row_to_f32(r, row);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_length_is_checked() {
        assert!(Weight::from_f32(2, 3, vec![0.0; 5]).is_err());
        assert!(Weight::new(2, 32, WeightData::Block(BlockFormat::Q8_0, vec![0; 67])).is_err());
        assert!(Weight::new(2, 32, WeightData::Block(BlockFormat::Q8_0, vec![0; 68])).is_ok());
    }

    #[test]
    fn int8_per_channel_round_trip_is_within_half_a_step() {
        let v: Vec<f32> = (0..4 * 50)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / (1 + i / 50) as f32)
            .collect();
        let w = Weight::from_f32(4, 50, v.clone()).unwrap();
        let q = w.quantize(QuantTarget::Int8PerChannel).unwrap();
        assert_eq!(q.format_name(), "int8");
        assert_eq!(q.bytes(), 4 * 50 + 4 * 4);
        for (r, (a, b)) in v.chunks(50).zip(q.to_f32().chunks(50)).enumerate() {
            let step = a.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 0.5 * step * 1.001, "row {r}: {x} vs {y}");
            }
        }
        assert_eq!(
            QuantTarget::parse("int4"),
            Some(QuantTarget::Block(BlockFormat::Q4_1))
        );
        assert_eq!(QuantTarget::parse("int3"), None);
        let g128 = Int4Format::new(128, true).unwrap();
        assert_eq!(
            QuantTarget::parse("int4:g128:sym:mse"),
            Some(QuantTarget::Int4(g128, ScaleSearch::Mse))
        );
        assert_eq!(
            QuantTarget::parse("INT4:G32"),
            Some(QuantTarget::Block(BlockFormat::Q4_1))
        );
        assert_eq!(
            QuantTarget::parse("int4:g32:mse"),
            None,
            "g32 is GGUF's RTN layout"
        );
        assert_eq!(QuantTarget::parse("int4:g96"), None);
        assert_eq!(QuantTarget::parse("int4:g64:asym"), None);
        // The name written to quantization_config parses back to the same format.
        for name in ["int4:g64", "int4:g128:sym"] {
            let t = QuantTarget::parse(name).unwrap();
            assert_eq!(QuantTarget::parse(t.name()), Some(t));
        }
    }

    #[test]
    fn dense_rows_round_trip() {
        let v: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let w = Weight::dense(3, 4, dtype, &v).unwrap();
            assert_eq!(w.to_f32(), v, "{dtype}");
        }
    }
}
