//! Weights as the backends consume them: dense rows kept in the dtype they were loaded in
//! (bf16/f16 are not widened to f32 in memory), or group-32 block-quantized rows.

use half::{bf16, f16};
use vellum_quant::{BlockFormat, DType, QK};

/// Storage of a `[rows, cols]` weight matrix, row-major.
#[derive(Debug, Clone)]
pub enum WeightData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    /// Block-quantized rows, each `cols / 32` blocks.
    Block(BlockFormat, Vec<u8>),
}

/// A 2-D weight: `rows` output features by `cols` input features.
#[derive(Debug, Clone)]
pub struct Weight {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
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
        };
        if let WeightData::Block(f, _) = &data {
            crate::check("weight", cols.is_multiple_of(QK), || {
                format!("{} rows must be whole blocks; cols = {cols}", f.name())
            })?;
        }
        crate::check("weight", have == unit, || {
            format!("[{rows}, {cols}] needs {unit} elements/bytes, storage has {have}")
        })?;
        Ok(Weight { rows, cols, data })
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
        }
    }

    /// Bytes the weight occupies in memory (what a matmul reads).
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::F16(v) => v.len() * 2,
            WeightData::BF16(v) => v.len() * 2,
            WeightData::Block(_, v) => v.len(),
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
        }
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
    fn dense_rows_round_trip() {
        let v: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let w = Weight::dense(3, 4, dtype, &v).unwrap();
            assert_eq!(w.to_f32(), v, "{dtype}");
        }
    }
}
