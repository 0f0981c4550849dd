//! [`KernelRuntime`] on a real GPU through cudarc's driver API. Every launch, memset and copy
//! goes through one stream of the runtime's own, in order: a non-default stream, since the
//! legacy default stream cannot be captured into a CUDA graph. Copies to the host wait for
//! the stream, so the engine's synchronous `Backend` ops see finished results.

use super::runtime::{Arg, DeviceGraph, KernelRuntime, LaunchConfig, PackedArgs};
use super::sources;
use super::CudaError;
use cudarc::cublas as blas;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Result<T> = std::result::Result<T, CudaError>;

/// The first architecture with the f16 `mma.sync` shapes the tensor-core GEMM uses (Turing).
const MMA_ARCH: u32 = 75;

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
    /// Made on the first [`KernelRuntime::blas_gemm_bf16`]; destroyed before the context.
    blas: Mutex<Option<BlasHandle>>,
    ctx: Arc<CudaContext>,
    /// Where everything is queued (see the module's comment).
    stream: Arc<CudaStream>,
    /// Launches recorded by the capture in progress, if one is.
    capturing: Mutex<Option<usize>>,
    ordinal: usize,
    arch: u32,
    multiprocessors: u32,
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
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("cuDeviceGetAttribute"))?;
        let stream = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        Ok(CudaRuntime {
            blas: Mutex::new(None),
            ctx,
            stream,
            capturing: Mutex::new(None),
            ordinal,
            arch: (major * 10 + minor) as u32,
            multiprocessors: multiprocessors.max(1) as u32,
            name,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// Host copies cannot be part of a graph: refused while capturing, with a clear error
    /// rather than the driver's.
    fn refuse_while_capturing(&self, what: &str) -> Result<()> {
        match self
            .capturing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            true => Err(CudaError::Driver {
                call: "stream capture",
                detail: format!(
                    "a {what} while capturing a graph: a recorded step's inputs must already \
                     be on the device"
                ),
            }),
            false => Ok(()),
        }
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))
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

/// The arguments of a column-major BLAS GEMM, `C (m×n) = op(A) (m×k) · op(B) (k×n)`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BlasGemm {
    transpose_a: bool,
    transpose_b: bool,
    m: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    ldc: i32,
}

impl BlasGemm {
    /// Row-major `y [rows, n] = x [rows, k] · wᵀ` (`w` `[n, k]`) in column-major terms: `w`
    /// is a k×n matrix with leading dimension k, `x` a k×rows one, and `y` the n×rows
    /// product `wᵀ · x`.
    fn for_rows_times_weight_t(rows: i32, n: i32, k: i32) -> BlasGemm {
        BlasGemm {
            transpose_a: true,
            transpose_b: false,
            m: n,
            n: rows,
            k,
            lda: k,
            ldb: k,
            ldc: n,
        }
    }
}

/// An instantiated CUDA graph, launched on the runtime's stream.
struct DriverGraph {
    /// cudarc's graph is neither Send nor Sync: CUDA graph objects must not be used from two
    /// threads at once. The mutex serializes every use.
    graph: Mutex<CudaGraph>,
    launches: usize,
}

// SAFETY: every use of the graph goes through the mutex (see above).
unsafe impl Send for DriverGraph {}
unsafe impl Sync for DriverGraph {}

impl DeviceGraph for DriverGraph {
    fn launches(&self) -> usize {
        self.launches
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A cuBLAS handle; used under the runtime's mutex, one call at a time.
struct BlasHandle(blas::sys::cublasHandle_t);

// SAFETY: a cuBLAS handle is not tied to the thread that made it; the mutex serializes its use.
unsafe impl Send for BlasHandle {}

impl Drop for CudaRuntime {
    fn drop(&mut self) {
        let handle = self
            .blas
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (Some(h), Ok(())) = (handle, self.ctx.bind_to_thread()) {
            // SAFETY: made by create_handle, destroyed once, its context current.
            let _ = unsafe { blas::result::destroy_handle(h.0) };
        }
    }
}

impl KernelRuntime for CudaRuntime {
    fn name(&self) -> String {
        format!("cuda:{} ({}, sm_{})", self.ordinal, self.name, self.arch)
    }

    fn multiprocessors(&self) -> u32 {
        self.multiprocessors
    }

    fn tensor_cores(&self) -> bool {
        self.arch >= MMA_ARCH
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        // SAFETY: the context is current; the allocation is zeroed before use.
        unsafe {
            let p = result::malloc_sync(bytes.max(1))
                .map_err(|e| CudaError::Memory(format!("cuMemAlloc of {bytes} bytes: {e:?}")))?;
            result::memset_d8_sync(p, 0, bytes.max(1)).map_err(driver("cuMemsetD8"))?;
            Ok(p)
        }
    }

    fn zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: `ptr` is a live allocation of at least `bytes` bytes; the memset is queued
        // on the runtime's stream, as every launch and copy is.
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .map_err(driver("cuMemsetD8Async"))
    }

    fn free(&self, ptr: u64) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from malloc_sync and is freed once (DeviceBuffer::drop).
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    /// Queued on the stream. `src` is pageable memory, which the driver copies to a staging
    /// buffer before returning, so the caller may reuse it at once.
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.refuse_while_capturing("host-to-device copy")?;
        self.bind()?;
        // SAFETY: `dst` is a live allocation of at least `src.len()` bytes (DeviceBuffer).
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(driver("cuMemcpyHtoDAsync"))
    }

    /// Queued on the stream, then waited for: returns with `dst` filled.
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.refuse_while_capturing("device-to-host copy")?;
        self.bind()?;
        // SAFETY: `src` is a live allocation of at least `dst.len()` bytes (DeviceBuffer);
        // `dst` is not touched until the stream has finished the copy.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(driver("cuMemcpyDtoHAsync"))?;
        self.stream
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))
    }

    fn launch(&self, module: &str, kernel: &str, cfg: &LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self.function(module, kernel)?;
        // Launches come from whichever (pool) thread runs the op: make the context current.
        self.bind()?;
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
                self.stream.cu_stream(),
                &mut ptrs,
            )
        }
        .map_err(|e| CudaError::Launch {
            kernel: kernel.into(),
            detail: format!("{e:?}"),
        })?;
        if let Some(n) = self
            .capturing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            *n += 1;
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))
    }

    /// Relaxed mode: an allocation during the capture (a new block for the graph's pool,
    /// see `Caching`) is allowed, and runs at once.
    fn begin_capture(&self) -> Result<()> {
        let mut capturing = self.capturing.lock().unwrap_or_else(|e| e.into_inner());
        if capturing.is_some() {
            return Err(CudaError::Driver {
                call: "cuStreamBeginCapture",
                detail: "a capture is already on".into(),
            });
        }
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        self.stream
            .begin_capture(mode)
            .map_err(driver("cuStreamBeginCapture"))?;
        *capturing = Some(0);
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>> {
        let launches = self
            .capturing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let launches = launches.ok_or_else(|| CudaError::Driver {
            call: "cuStreamEndCapture",
            detail: "no capture is on".into(),
        })?;
        let flags = sys::CUgraphInstantiate_flags(0);
        let graph = self
            .stream
            .end_capture(flags)
            .map_err(driver("cuStreamEndCapture"))?
            .ok_or_else(|| CudaError::Driver {
                call: "cuStreamEndCapture",
                detail: "the capture recorded nothing".into(),
            })?;
        Ok(Box::new(DriverGraph {
            graph: Mutex::new(graph),
            launches,
        }))
    }

    fn launch_graph(&self, graph: &dyn DeviceGraph) -> Result<()> {
        let graph = graph
            .as_any()
            .downcast_ref::<DriverGraph>()
            .ok_or_else(|| CudaError::Driver {
                call: "cuGraphLaunch",
                detail: "not a graph of this runtime".into(),
            })?;
        let graph = graph.graph.lock().unwrap_or_else(|e| e.into_inner());
        graph.launch().map_err(driver("cuGraphLaunch"))
    }

    fn blas_gemm_bf16(
        &self,
        w: u64,
        x: u64,
        y: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        use blas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
        let blas_err = |call: &'static str| {
            move |e: blas::result::CublasError| CudaError::Driver {
                call,
                detail: format!("{e:?}"),
            }
        };
        // SAFETY: only tries to dlopen candidate names (cudarc panics on a missing library).
        if !unsafe { blas::sys::is_culib_present() } {
            return Err(CudaError::Unavailable(
                "libcublas is not on the library path".into(),
            ));
        }
        let int = |v: usize| {
            i32::try_from(v)
                .map_err(|_| CudaError::Unavailable(format!("{v} is past cuBLAS's int")))
        };
        let g = BlasGemm::for_rows_times_weight_t(int(rows)?, int(n)?, int(k)?);
        self.bind()?;
        let mut handle = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        if handle.is_none() {
            let h = blas::result::create_handle().map_err(blas_err("cublasCreate"))?;
            // SAFETY: a live handle, and the runtime's live stream (cuBLAS's type for it is
            // the runtime API's, the same object).
            unsafe { blas::result::set_stream(h, self.stream.cu_stream() as _) }
                .map_err(blas_err("cublasSetStream"))?;
            *handle = Some(BlasHandle(h));
        }
        let h = handle.as_ref().map(|h| h.0).expect("made above");
        let (alpha, beta) = (1f32, 0f32);
        let op = |t: bool| match t {
            true => cublasOperation_t::CUBLAS_OP_T,
            false => cublasOperation_t::CUBLAS_OP_N,
        };
        let bf16 = cudaDataType_t::CUDA_R_16BF;
        // SAFETY: the pointers are live device allocations of these shapes (the caller's
        // buffers), alpha and beta are host f32s as the compute type asks, and the handle
        // queues on the runtime's stream as every launch does.
        unsafe {
            blas::result::gemm_ex(
                h,
                op(g.transpose_a),
                op(g.transpose_b),
                g.m,
                g.n,
                g.k,
                &alpha as *const f32 as *const _,
                w as *const _,
                bf16,
                g.lda,
                x as *const _,
                bf16,
                g.ldb,
                &beta as *const f32 as *const _,
                y as *mut _,
                bf16,
                g.ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(blas_err("cublasGemmEx"))
    }
}

#[cfg(test)]
mod tests {
    use super::BlasGemm;

    /// What BLAS computes for these arguments (column-major, the reference definition).
    fn reference_gemm(g: BlasGemm, a: &[f64], b: &[f64], c: &mut [f64]) {
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        let at = |i: usize, p: usize| match g.transpose_a {
            true => a[p + i * lda],
            false => a[i + p * lda],
        };
        let bt = |p: usize, j: usize| match g.transpose_b {
            true => b[j + p * ldb],
            false => b[p + j * ldb],
        };
        for j in 0..n {
            for i in 0..m {
                c[i + j * ldc] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
            }
        }
    }

    /// The cuBLAS baseline's arguments give the row-major `x · wᵀ` the benchmark compares
    /// with: checked here on the BLAS definition, since CI has no cuBLAS to call.
    #[test]
    fn blas_arguments_give_rows_times_the_weight_transposed() {
        let (rows, n, k) = (3usize, 5usize, 7usize);
        let w: Vec<f64> = (0..n * k).map(|i| (i * 13 % 17) as f64 - 8.0).collect();
        let x: Vec<f64> = (0..rows * k).map(|i| (i * 7 % 11) as f64 - 5.0).collect();
        let mut y = vec![0f64; rows * n];
        let g = BlasGemm::for_rows_times_weight_t(rows as i32, n as i32, k as i32);
        reference_gemm(g, &w, &x, &mut y);
        for r in 0..rows {
            for j in 0..n {
                let want: f64 = (0..k).map(|c| x[r * k + c] * w[j * k + c]).sum();
                assert_eq!(y[r * n + j], want, "row {r} feature {j}");
            }
        }
    }
}
