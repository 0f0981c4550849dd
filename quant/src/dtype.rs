//! Dense element types as stored in checkpoints.

use half::{bf16, f16};

/// A dense element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The safetensors spelling (`"F32"`, `"F16"`, `"BF16"`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        match name {
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Parses the user-facing spelling (`f32`, `f16`, `bf16`).
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// Decodes little-endian bytes of `dtype` into f32 values, appending to `out`.
/// `bytes.len()` must be a multiple of the element size (callers validate lengths first).
pub fn decode_le(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        DType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
    }
}

/// Encodes f32 values as little-endian `dtype` bytes (round to nearest even).
pub fn encode_le(dtype: DType, values: &[f32], out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_is_exact_for_representable_values() {
        let values = [0.0f32, 1.0, -2.5, 0.125, 65504.0, -0.0078125];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut bytes = Vec::new();
            encode_le(dtype, &values, &mut bytes);
            assert_eq!(bytes.len(), values.len() * dtype.size());
            let mut back = Vec::new();
            decode_le(dtype, &bytes, &mut back);
            for (a, b) in values.iter().zip(&back) {
                let tol = if dtype == DType::BF16 {
                    a.abs() / 128.0
                } else {
                    0.0
                };
                assert!((a - b).abs() <= tol, "{dtype}: {a} -> {b}");
            }
        }
    }

    #[test]
    fn names_parse_back() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(
                DType::from_safetensors_name(dtype.safetensors_name()),
                Some(dtype)
            );
            assert_eq!(DType::parse(&dtype.to_string()), Some(dtype));
        }
        assert_eq!(DType::parse("int3"), None);
    }
}
