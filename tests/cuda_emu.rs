//! The engine end to end on the CUDA backend, its kernels run by the CPU emulator: the tiny
//! models must match transformers' goldens (and so the CPU backend) exactly as the CPU
//! backend does: same greedy tokens, logprobs within the same tolerance.

mod common;
use common::*;
use vellum::kernels::Device;

#[test]
fn tiny_models_match_transformers_on_the_emulated_cuda_backend() {
    check_tiny_models(Device::CudaEmulator);
}
