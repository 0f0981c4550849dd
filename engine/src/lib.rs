//! Vellum engine: checkpoint loaders, tokenizer, the Llama-family model and its KV cache.

pub mod calibrate;
pub mod config;
pub mod convert;
pub mod error;
pub mod gguf;
pub mod graphs;
pub mod handle;
pub mod loader;
pub mod model;
pub mod tensors;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use error::{EngineError, Result};
pub use handle::{EngineHandle, OutputStream};
pub use loader::Checkpoint;
pub use model::Model;
pub use tokenizer::{ChatMessage, Tokenizer};
pub mod engine;
pub mod kv;
pub mod sampler;
pub mod synthetic;

pub use engine::{
    Completion, Engine, EngineBuilder, EngineConfig, FinishReason, Request, RequestId,
    RequestOutput, Usage,
};
pub use sampler::SamplingParams;
