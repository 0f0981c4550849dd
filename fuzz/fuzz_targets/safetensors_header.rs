//! Any bytes given to the safetensors header parser give tensors or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vellum_engine::tensors::parse_safetensors(data);
});
