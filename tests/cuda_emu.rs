//! The engine end to end on the CUDA backend, its kernels run by the CPU emulator: the tiny
//! models must match transformers' goldens (and so the CPU backend) exactly as the CPU
//! backend does: same greedy tokens, logprobs within the same tolerance.

mod common;
use common::*;
use vellum::kernels::cpu::Cpu;
use vellum::kernels::{Device, KvDtype};

#[test]
fn tiny_models_match_transformers_on_the_emulated_cuda_backend() {
    check_tiny_models(Device::CudaEmulator);
}

/// Quantized weights (planar int4 g64, int8 per channel, GGUF-style Q4_1) through the
/// emulated CUDA matmuls give the CPU backend's greedy tokens and logprobs, with the default
/// f16 KV cache and with an int8 one (the device copies of the pools read as stored). The CPU
/// runs without integer dots (f32 weights against unrounded activations); the CUDA GEMM
/// rounds both to f16 for its tensor cores, hence logprobs within 1.5e-2 (measured: up to
/// 7.3e-3) rather than 1e-4.
#[test]
fn quantized_tiny_model_decodes_like_the_cpu_on_the_emulated_cuda_backend() {
    use vellum::engine::{Engine, EngineConfig, Request};
    use vellum::kernels::QuantTarget;
    let dir = repo().join("tests/golden/models/llama_gqa");
    let prompts: Vec<Vec<u32>> = vec![(1..20).collect(), vec![5, 9, 200, 7]];
    let cases = [
        ("int4:g64:sym", KvDtype::F16),
        ("int8", KvDtype::F16),
        ("int4", KvDtype::F16),
        ("int4", KvDtype::Int8),
    ];
    for (quant, kv_dtype) in cases {
        let run = |device: Device| {
            let b = match device {
                Device::Cpu => Engine::builder().backend(Box::new(Cpu::new().with_int_dot(None))),
                _ => Engine::builder().device(device),
            };
            let mut e = b
                .model(&dir)
                .quant(QuantTarget::parse(quant).unwrap())
                .config(EngineConfig {
                    kv_cache_bytes: 4 << 20,
                    kv_dtype,
                    ..EngineConfig::default()
                })
                .build()
                .unwrap();
            let reqs = prompts
                .iter()
                .map(|p| Request::tokens(p.clone(), greedy(6)))
                .collect();
            e.generate(reqs).unwrap()
        };
        let (cpu, emu) = (run(Device::Cpu), run(Device::CudaEmulator));
        for (a, b) in cpu.iter().zip(&emu) {
            assert_eq!(
                a.tokens, b.tokens,
                "{quant}, KV {kv_dtype:?}: greedy tokens"
            );
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!(
                    (x.logprob - y.logprob).abs() < 1.5e-2,
                    "{quant}, KV {kv_dtype:?}: {} vs {}",
                    x.logprob,
                    y.logprob
                );
            }
        }
    }
}
