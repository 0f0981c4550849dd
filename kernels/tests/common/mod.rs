//! Helpers shared by the CUDA kernel tests.
// Each test crate that includes this module uses part of it.
#![allow(dead_code)]

use std::sync::Arc;
use vellum_kernels::cuda::emu::EmuRuntime;
use vellum_kernels::cuda::{driver, CudaBackend};

/// The emulator, plus GPU 0 when it is usable.
pub fn backends() -> Vec<CudaBackend> {
    let mut v = vec![CudaBackend::new(Arc::new(
        EmuRuntime::new().expect("the CUDA emulator needs g++"),
    ))];
    match driver::probe(0) {
        Ok(()) => v.push(CudaBackend::gpu(0).expect("GPU 0 probed usable")),
        Err(e) if std::env::var_os("VELLUM_REQUIRE_GPU").is_some() => {
            panic!("VELLUM_REQUIRE_GPU is set but GPU 0 is unusable: {e}")
        }
        Err(e) => {
            // Straight to stderr, past the test harness's capture: a skip must be seen.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "GPU parity SKIPPED (emulator only): {e}");
        }
    }
    v
}

/// The largest |a - b|. A NaN on either side, or infinities that differ, counts as
/// infinite: `f32::max` would drop it, and a kernel that wrote NaN would pass.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| match (x - y).abs() {
            _ if x == y => 0.0, // equal infinities too
            d if d.is_nan() => f32::INFINITY,
            d => d,
        })
        .fold(0f32, f32::max)
}
