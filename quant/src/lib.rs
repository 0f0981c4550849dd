//! Weight formats of Vellum and their reference (plain Rust, obviously correct) code.
//!
//! Dense dtypes (`f32`, `f16`, `bf16`), the group-32 block formats that llama.cpp ships
//! in GGUF files, planar group-wise int4 (groups of 32/64/128), and the decoders of the
//! GGUF formats read at load only (5-bit and k-quants, [`ggml`]). Every kernel in `vellum-kernels` is tested against the reference
//! dequantize here.

pub mod block;
pub mod dtype;
pub mod ggml;
pub mod gptq;
pub mod int4;
pub mod int8;

pub use block::{BlockFormat, QK};
pub use dtype::DType;
pub use ggml::DecodedFormat;
pub use gptq::GptqFactor;
pub use int4::{Int4Data, Int4Format, ScaleSearch};

/// Errors of this crate: they name the format and the sizes at fault.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{format}: {n} values is not a multiple of the block size {block}")]
    NotBlockAligned {
        format: &'static str,
        n: usize,
        block: usize,
    },
    #[error("{format}: expected {expected} bytes for {n} values, got {got}")]
    ByteLength {
        format: &'static str,
        n: usize,
        expected: usize,
        got: usize,
    },
    #[error("int4: group size {group} is not supported (32, 64 or 128)")]
    UnsupportedGroup { group: usize },
    #[error("GPTQ: {0}")]
    Gptq(String),
}

/// A [`QuantError::ByteLength`] unless `got` is `expected` (bytes, or values, for `n` values).
pub(crate) fn expect_len(
    format: &'static str,
    n: usize,
    expected: usize,
    got: usize,
) -> Result<(), QuantError> {
    if got == expected {
        return Ok(());
    }
    Err(QuantError::ByteLength {
        format,
        n,
        expected,
        got,
    })
}
