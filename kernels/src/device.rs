//! Which backend runs the model: `cpu`, `cuda:N` (a GPU) or `cuda-emu` (the CUDA kernels on
//! the CPU emulator, for tests and debugging). Chosen by `--device`, `VELLUM_DEVICE`, or
//! [`Device::auto`].

use crate::cpu::Cpu;
use crate::cuda::{driver, CudaBackend, CudaError};
use crate::{Backend, KernelError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    CudaEmulator,
}

impl Device {
    /// Parses `cpu`, `cuda`, `cuda:N` or `cuda-emu`.
    pub fn parse(s: &str) -> Result<Device, String> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "cuda-emu" => Ok(Device::CudaEmulator),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{other}` (expected cpu, cuda, cuda:N or cuda-emu)")
                }),
        }
    }

    /// `VELLUM_DEVICE` when set, else the CPU. A usable GPU is not picked on its own yet: the
    /// CUDA backend has only run under the emulator; until a GPU run has measured it against
    /// the CPU path, the CPU stays the default, and the reason is logged.
    pub fn auto() -> Result<Device, String> {
        if let Ok(v) = std::env::var("VELLUM_DEVICE") {
            return Device::parse(&v).map_err(|e| format!("VELLUM_DEVICE: {e}"));
        }
        match driver::probe(0) {
            Ok(()) => tracing::info!(
                "a GPU is present but the CPU backend is used: the CUDA backend has not been \
                 measured on a GPU yet (pass --device cuda:0 to use it anyway)"
            ),
            Err(e) => tracing::info!("CPU backend: {e}"),
        }
        Ok(Device::Cpu)
    }

    /// The backend for this device, or why it cannot be had.
    pub fn backend(self) -> Result<Box<dyn Backend>, KernelError> {
        Ok(match self {
            Device::Cpu => Box::new(Cpu::new()),
            Device::Cuda(n) => Box::new(CudaBackend::gpu(n).map_err(|e| match e {
                CudaError::Unavailable(why) => {
                    CudaError::Unavailable(format!("--device cuda:{n}: {why}"))
                }
                other => other,
            })?),
            Device::CudaEmulator => Box::new(CudaBackend::emulated()?),
        })
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::CudaEmulator => write!(f, "cuda-emu"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_names_a_bad_one() {
        assert_eq!(Device::parse("cpu"), Ok(Device::Cpu));
        assert_eq!(Device::parse("cuda"), Ok(Device::Cuda(0)));
        assert_eq!(Device::parse("cuda:3"), Ok(Device::Cuda(3)));
        assert_eq!(Device::parse("cuda-emu"), Ok(Device::CudaEmulator));
        let err = Device::parse("cuda:x").unwrap_err();
        assert!(err.contains("cuda:x"), "{err}");
        assert!(Device::parse("gpu").is_err());
    }

    #[test]
    fn a_missing_gpu_is_an_error_naming_the_device_not_a_panic() {
        if driver::probe(7).is_ok() {
            return; // a machine with eight GPUs: nothing to check
        }
        let err = Device::Cuda(7).backend().err().expect("no cuda:7 here");
        assert!(err.to_string().contains("cuda:7"), "{err}");
    }
}
