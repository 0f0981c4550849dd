//! [`Counting`]: a [`KernelRuntime`] that counts the bytes copied each way across the host
//! boundary, the bytes allocated and the kernels launched, for tests and benchmarks that
//! check what stays on the device and what a step costs.

use super::runtime::{Arg, DeviceGraph, KernelRuntime, LaunchConfig};
use super::CudaError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Counting {
    inner: Arc<dyn KernelRuntime>,
    uploaded: AtomicUsize,
    downloaded: AtomicUsize,
    allocated: AtomicUsize,
    launches: AtomicUsize,
    graph_launches: AtomicUsize,
    memsets: AtomicUsize,
    copies: AtomicUsize,
}

impl Counting {
    pub fn new(inner: Arc<dyn KernelRuntime>) -> Counting {
        Counting {
            inner,
            uploaded: AtomicUsize::new(0),
            downloaded: AtomicUsize::new(0),
            allocated: AtomicUsize::new(0),
            launches: AtomicUsize::new(0),
            graph_launches: AtomicUsize::new(0),
            memsets: AtomicUsize::new(0),
            copies: AtomicUsize::new(0),
        }
    }

    /// Bytes copied to the device since the last call.
    pub fn take_uploaded(&self) -> usize {
        self.uploaded.swap(0, Ordering::SeqCst)
    }

    /// Bytes copied to the host since the last call.
    pub fn take_downloaded(&self) -> usize {
        self.downloaded.swap(0, Ordering::SeqCst)
    }

    /// Bytes allocated on the device since the last call.
    pub fn take_allocated(&self) -> usize {
        self.allocated.swap(0, Ordering::SeqCst)
    }

    /// Kernels launched since the last call.
    pub fn take_launches(&self) -> usize {
        self.launches.swap(0, Ordering::SeqCst)
    }

    /// Copies across the host boundary since the last call, each way: each waits for the
    /// work queued before it.
    /// Graphs launched (each replays many kernels; those are not in `take_launches`).
    pub fn take_graph_launches(&self) -> usize {
        self.graph_launches.swap(0, Ordering::SeqCst)
    }

    /// Memsets queued (a reused block is zeroed again).
    pub fn take_memsets(&self) -> usize {
        self.memsets.swap(0, Ordering::SeqCst)
    }

    pub fn take_copies(&self) -> usize {
        self.copies.swap(0, Ordering::SeqCst)
    }
}

impl KernelRuntime for Counting {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn multiprocessors(&self) -> u32 {
        self.inner.multiprocessors()
    }
    fn tensor_cores(&self) -> bool {
        self.inner.tensor_cores()
    }
    fn alloc(&self, bytes: usize) -> Result<u64, CudaError> {
        self.allocated.fetch_add(bytes, Ordering::SeqCst);
        self.inner.alloc(bytes)
    }
    fn alloc_for_overwrite(&self, bytes: usize) -> Result<u64, CudaError> {
        self.allocated.fetch_add(bytes, Ordering::SeqCst);
        self.inner.alloc_for_overwrite(bytes)
    }
    fn free(&self, ptr: u64) {
        self.inner.free(ptr)
    }
    fn zero(&self, ptr: u64, bytes: usize) -> Result<(), CudaError> {
        self.memsets.fetch_add(1, Ordering::SeqCst);
        self.inner.zero(ptr, bytes)
    }
    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        self.uploaded.fetch_add(src.len(), Ordering::SeqCst);
        self.copies.fetch_add(1, Ordering::SeqCst);
        self.inner.htod(dst, src)
    }
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), CudaError> {
        self.downloaded.fetch_add(dst.len(), Ordering::SeqCst);
        self.copies.fetch_add(1, Ordering::SeqCst);
        self.inner.dtoh(src, dst)
    }
    fn launch(&self, m: &str, k: &str, cfg: &LaunchConfig, args: &[Arg]) -> Result<(), CudaError> {
        self.launches.fetch_add(1, Ordering::SeqCst);
        self.inner.launch(m, k, cfg, args)
    }
    fn synchronize(&self) -> Result<(), CudaError> {
        self.inner.synchronize()
    }
    fn begin_capture(&self) -> Result<(), CudaError> {
        self.inner.begin_capture()
    }
    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>, CudaError> {
        self.inner.end_capture()
    }
    fn launch_graph(&self, graph: &dyn DeviceGraph) -> Result<(), CudaError> {
        self.graph_launches.fetch_add(1, Ordering::SeqCst);
        self.inner.launch_graph(graph)
    }
    fn blas_gemm_bf16(
        &self,
        w: u64,
        x: u64,
        y: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        self.inner.blas_gemm_bf16(w, x, y, rows, n, k)
    }
}
