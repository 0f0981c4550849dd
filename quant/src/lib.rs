//! Weight formats of Vellum and their reference (plain Rust, obviously correct) code.
//!
//! Dense dtypes (`f32`, `f16`, `bf16`) and the group-32 block formats that llama.cpp ships
//! in GGUF files. Every kernel in `vellum-kernels` is tested against the reference
//! dequantize here.

pub mod block;
pub mod dtype;

pub use block::{BlockFormat, QK};
pub use dtype::DType;

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
}
