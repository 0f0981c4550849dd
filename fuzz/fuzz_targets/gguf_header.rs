//! Any bytes given to the GGUF reader give a parsed file or an error, never a panic, a hang
//! or a huge allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vellum_engine::gguf::parse_bytes(data);
});
