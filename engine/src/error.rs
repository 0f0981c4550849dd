//! The engine's error type: every message names the file, tensor, field or parameter at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that is not what it claims to be (truncated, bad header, bad offsets, ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// config.json (or GGUF metadata) with a missing or nonsensical field.
    #[error("{path}: config field `{field}`: {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// A tensor that is missing or does not match the config.
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("{path}: unsupported: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An invalid request or sampling parameter, naming the field.
    #[error("invalid request: `{field}` {msg}")]
    InvalidRequest { field: &'static str, msg: String },
    #[error(transparent)]
    Kernel(#[from] vellum_kernels::KernelError),
}

pub type Result<T> = std::result::Result<T, EngineError>;

pub(crate) fn format_err(path: impl Into<PathBuf>, msg: impl Into<String>) -> EngineError {
    EngineError::Format {
        path: path.into(),
        msg: msg.into(),
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EngineError {
    let path = path.into();
    move |source| EngineError::Io { path, source }
}
