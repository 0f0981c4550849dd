//! [`KernelRuntime`] on a real GPU through cudarc's driver API. Everything is synchronous on
//! the default stream for now (the engine's Backend trait is synchronous); streams and CUDA
//! graphs come with device-resident activations.

use super::runtime::{Arg, KernelRuntime, LaunchConfig, PackedArgs};
use super::sources;
use super::CudaError;
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Result<T> = std::result::Result<T, CudaError>;

fn driver(call: &'static str) -> impl Fn(result::DriverError) -> CudaError {
    move |e| CudaError::Driver {
        call,
        detail: format!("{e:?}"),
    }
}

/// Whether GPU `ordinal` is usable, and why not. Checks that libcuda loads before any call
/// into it (cudarc panics on a missing library), then initialises the driver.
pub fn probe(ordinal: usize) -> Result<()> {
    // SAFETY: only tries to dlopen candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "libcuda (the NVIDIA driver) is not installed".into(),
        ));
    }
    if !super::nvrtc::available() {
        return Err(CudaError::Unavailable(
            "libnvrtc is not on the library path".into(),
        ));
    }
    result::init().map_err(driver("cuInit"))?;
    let count = result::device::get_count().map_err(driver("cuDeviceGetCount"))?;
    if ordinal as i32 >= count {
        return Err(CudaError::Unavailable(format!(
            "cuda:{ordinal} requested but {count} GPU(s) present"
        )));
    }
    Ok(())
}

pub struct CudaRuntime {
    ctx: Arc<CudaContext>,
    ordinal: usize,
    arch: u32,
    name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl CudaRuntime {
    /// Opens GPU `ordinal`; kernels are compiled (or read from the cache) on first launch.
    pub fn new(ordinal: usize) -> Result<Self> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(driver("cuCtxCreate"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("cuDeviceGetAttribute"))?;
        let name = ctx.name().map_err(driver("cuDeviceGetName"))?;
        Ok(CudaRuntime {
            ctx,
            ordinal,
            arch: (major * 10 + minor) as u32,
            name,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The compute capability as `sm_XY` digits (75, 86, 90, ...).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    fn function(&self, module: &str, kernel: &str) -> Result<CudaFunction> {
        let key = format!("{module}/{kernel}");
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(&key) {
            return Ok(f.clone());
        }
        let m = sources::module(module).ok_or_else(|| CudaError::Launch {
            kernel: kernel.into(),
            detail: format!("no kernel module named {module}"),
        })?;
        let loaded = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match modules.get(m.name) {
                Some(l) => l.clone(),
                None => {
                    let cubin = super::nvrtc::compile_cached(m, self.arch)?;
                    let image = cudarc::nvrtc::Ptx::from_binary(cubin);
                    let l = self
                        .ctx
                        .load_module(image)
                        .map_err(driver("cuModuleLoadData"))?;
                    modules.insert(m.name, l.clone());
                    l
                }
            }
        };
        let f = loaded
            .load_function(kernel)
            .map_err(driver("cuModuleGetFunction"))?;
        functions.insert(key, f.clone());
        Ok(f)
    }
}

impl KernelRuntime for CudaRuntime {
    fn name(&self) -> String {
        format!("cuda:{} ({}, sm_{})", self.ordinal, self.name, self.arch)
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: the context is current; the allocation is zeroed before use.
        unsafe {
            let p = result::malloc_sync(bytes.max(1))
                .map_err(|e| CudaError::Memory(format!("cuMemAlloc of {bytes} bytes: {e:?}")))?;
            result::memset_d8_sync(p, 0, bytes.max(1)).map_err(driver("cuMemsetD8"))?;
            Ok(p)
        }
    }

    fn free(&self, ptr: u64) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from malloc_sync and is freed once (DeviceBuffer::drop).
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: `dst` is a live allocation of at least `src.len()` bytes (DeviceBuffer).
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(driver("cuMemcpyHtoD"))
    }

    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: `src` is a live allocation of at least `dst.len()` bytes (DeviceBuffer).
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(driver("cuMemcpyDtoH"))
    }

    fn launch(&self, module: &str, kernel: &str, cfg: &LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self.function(module, kernel)?;
        // Launches come from whichever (pool) thread runs the op: make the context current.
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        let mut packed = PackedArgs::new(args);
        let mut ptrs = packed.pointers();
        // SAFETY: the argument array matches the kernel's parameters (the backend's host code
        // is the only caller, and the parity tests cover every launch).
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                cfg.grid,
                cfg.block,
                cfg.shared_bytes,
                std::ptr::null_mut(),
                &mut ptrs,
            )
        }
        .map_err(|e| CudaError::Launch {
            kernel: kernel.into(),
            detail: format!("{e:?}"),
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        result::ctx::synchronize().map_err(driver("cuCtxSynchronize"))
    }
}
