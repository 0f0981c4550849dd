//! Vellum: a small, embeddable LLM inference engine.
pub use vellum_engine as engine;
pub use vellum_kernels as kernels;
pub use vellum_quant as quant;
