//! The CUDA backend: CUDA C kernels (`kernels/cuda/*.cu`) compiled at run time by NVRTC for
//! the GPU present, launched through a [`KernelRuntime`] seam that has two implementations:
//! [`driver::CudaRuntime`] (cudarc, a real GPU) and [`emu::EmuRuntime`] (the same sources
//! compiled with g++ against `emu.h` and run on the CPU). [`backend::CudaBackend`] holds the
//! host code (launch geometry, argument packing, validation) once, for both.
//!
//! Nothing here panics when CUDA is absent: [`driver::probe`] checks for the driver library
//! before any CUDA call and says why a GPU is unusable.

pub mod backend;
pub mod caching;
pub mod counting;
pub mod driver;
pub mod emu;
pub mod nvrtc;
pub mod runtime;
pub mod sources;

pub use backend::CudaBackend;
pub use runtime::{Arg, DeviceBuffer, KernelRuntime, LaunchConfig};

/// Errors of the CUDA path, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA is not usable here: {0}")]
    Unavailable(String),
    #[error("NVRTC failed to compile {file} for sm_{arch}:\n{log}")]
    Compile {
        file: String,
        arch: u32,
        log: String,
    },
    #[error("CUDA driver call {call} failed: {detail}")]
    Driver { call: &'static str, detail: String },
    #[error("CUDA emulator: {0}")]
    Emulator(String),
    #[error("launch of kernel {kernel}: {detail}")]
    Launch { kernel: String, detail: String },
    #[error("device memory: {0}")]
    Memory(String),
}

/// FNV-1a over byte strings: a stable key for the on-disk caches (std's hasher may change
/// between Rust releases).
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(&[0xffu8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// `$VELLUM_CACHE_DIR`, else `$XDG_CACHE_HOME/vellum`, else `~/.cache/vellum`, else the
/// temp dir: where compiled kernels are kept between runs.
pub(crate) fn cache_dir() -> std::path::PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = env("VELLUM_CACHE_DIR") {
        return d.into();
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        return std::path::PathBuf::from(d).join("vellum");
    }
    if let Some(d) = env("HOME") {
        return std::path::PathBuf::from(d).join(".cache").join("vellum");
    }
    std::env::temp_dir().join("vellum-cache")
}

/// Writes `bytes` to `path` through a temporary file and a rename, so concurrent processes
/// never see half a file.
pub(crate) fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
