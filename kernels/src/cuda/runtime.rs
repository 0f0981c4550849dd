//! The seam between the CUDA backend's host code and whatever runs the kernels: a GPU through
//! cudarc, or the CPU emulator. Device memory is addressed by plain `u64` device pointers and
//! kernels are launched by module and name with a `void**` argument array, exactly as
//! `cuLaunchKernel` takes it, so both implementations see the same packed arguments.

use super::CudaError;
use std::ffi::c_void;

type Result<T> = std::result::Result<T, CudaError>;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D grid of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        LaunchConfig {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        }
    }
}

/// One kernel argument. Pointers are device pointers (`0` is a null pointer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Ptr(u64),
    U32(u32),
    I32(i32),
    F32(f32),
}

/// Arguments laid out as `cuLaunchKernel` wants them: one 8-byte slot per argument holding
/// its value in the slot's first bytes (little-endian targets only, which is all CUDA runs
/// on), and an array of pointers to the slots.
pub struct PackedArgs {
    slots: Vec<u64>,
}

impl PackedArgs {
    pub fn new(args: &[Arg]) -> Self {
        let slots = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::U32(v) => v as u64,
                Arg::I32(v) => v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        PackedArgs { slots }
    }

    /// The `void**` array; valid while `self` lives and is not moved.
    pub fn pointers(&mut self) -> Vec<*mut c_void> {
        self.slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect()
    }
}

/// Memory, copies and launches on one device.
pub trait KernelRuntime: Send + Sync {
    /// `cuda:0 (NVIDIA H100, sm_90)`, `cuda-emulator`, ...
    fn name(&self) -> String;
    /// Streaming multiprocessors: how many blocks a launch needs to fill the device (split-K
    /// sizing). The emulator reports a small GPU, so small test shapes take the split path.
    fn multiprocessors(&self) -> u32;
    /// Whether the f16 `mma.sync` shapes of `qgemm.cu` run here (sm_75 and newer; the
    /// emulator emulates them).
    fn tensor_cores(&self) -> bool {
        true
    }
    /// Allocates `bytes` (zeroed) and returns the device pointer.
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// Allocates `bytes` that the caller overwrites before anything reads them (an upload,
    /// an op's output): as `alloc`, except that a runtime reusing freed memory need not zero
    /// it. Default: `alloc`.
    fn alloc_for_overwrite(&self, bytes: usize) -> Result<u64> {
        self.alloc(bytes)
    }
    /// Frees what [`KernelRuntime::alloc`] returned.
    fn free(&self, ptr: u64);
    /// Sets `bytes` from `ptr` to zero, queued after the work before it.
    fn zero(&self, ptr: u64, bytes: usize) -> Result<()>;
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()>;
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// Launches `kernel` of `module` (a [`super::sources::Module`] name).
    fn launch(&self, module: &str, kernel: &str, cfg: &LaunchConfig, args: &[Arg]) -> Result<()>;
    /// Waits until every launch so far has finished, surfacing asynchronous errors.
    fn synchronize(&self) -> Result<()>;
    /// From here on, launches and memsets are recorded into a graph rather than run, until
    /// [`KernelRuntime::end_capture`] (CUDA stream capture). Host copies are refused while
    /// capturing: a recorded step must find its inputs already on the device. Allocations
    /// still happen at once. Default: unsupported.
    fn begin_capture(&self) -> Result<()> {
        Err(CudaError::Unavailable(format!(
            "no graph capture on {}",
            self.name()
        )))
    }
    /// Ends the capture and returns what it recorded, ready to launch. Also the way out of a
    /// capture that failed half way (the result is then dropped).
    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>> {
        Err(CudaError::Unavailable(format!(
            "no graph capture on {}",
            self.name()
        )))
    }
    /// Runs a graph this runtime's `end_capture` made, queued like a launch.
    fn launch_graph(&self, graph: &dyn DeviceGraph) -> Result<()> {
        let _ = graph;
        Err(CudaError::Unavailable(format!(
            "no graph capture on {}",
            self.name()
        )))
    }
    /// `y = x · wᵀ` in dense bf16 through the vendor's BLAS (cuBLAS), queued like a launch:
    /// `w` is `[n, k]`, `x` `[rows, k]`, `y` `[rows, n]`, all bf16, summed in f32. The
    /// benchmarks' baseline (issue #7 measures the quantized kernels against it); the engine
    /// never calls it. Default: unavailable (the emulator has no cuBLAS).
    fn blas_gemm_bf16(
        &self,
        w: u64,
        x: u64,
        y: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let _ = (w, x, y, rows, n, k);
        Err(CudaError::Unavailable(format!(
            "no cuBLAS on {}",
            self.name()
        )))
    }
}

/// Launches and memsets recorded by [`KernelRuntime::begin_capture`], replayed as one unit
/// by [`KernelRuntime::launch_graph`] with the same arguments (the same device pointers).
pub trait DeviceGraph: Send + Sync {
    /// How many launches it replays (for tests and logs).
    fn launches(&self) -> usize;
    /// Device memory it holds for its replays (its pool, see `Caching`). Default: none.
    fn bytes(&self) -> usize {
        0
    }
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Plain data that can be copied to and from the device byte for byte.
pub trait Pod: Copy + Default + 'static {}
impl Pod for f32 {}
impl Pod for u32 {}
impl Pod for i32 {}
impl Pod for u16 {}
impl Pod for u8 {}
impl Pod for half::f16 {}
impl Pod for half::bf16 {}

pub(crate) fn bytes_of<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: Pod types are plain old data without padding; the byte view has the same
    // lifetime and covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

pub(crate) fn bytes_of_mut<T: Pod>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; every byte pattern is a valid value of these types.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// An allocation that frees itself.
pub struct DeviceBuffer<'r> {
    rt: &'r dyn KernelRuntime,
    ptr: u64,
    bytes: usize,
}

impl<'r> DeviceBuffer<'r> {
    pub fn zeroed(rt: &'r dyn KernelRuntime, bytes: usize) -> Result<Self> {
        let ptr = rt.alloc(bytes)?;
        Ok(DeviceBuffer { rt, ptr, bytes })
    }

    /// Memory the caller fills before anything reads it (see `alloc_for_overwrite`).
    pub fn for_overwrite(rt: &'r dyn KernelRuntime, bytes: usize) -> Result<Self> {
        let ptr = rt.alloc_for_overwrite(bytes)?;
        Ok(DeviceBuffer { rt, ptr, bytes })
    }

    pub fn upload<T: Pod>(rt: &'r dyn KernelRuntime, data: &[T]) -> Result<Self> {
        let buf = Self::for_overwrite(rt, std::mem::size_of_val(data))?;
        rt.htod(buf.ptr, bytes_of(data))?;
        Ok(buf)
    }

    pub fn download<T: Pod>(&self, out: &mut [T]) -> Result<()> {
        let dst = bytes_of_mut(out);
        if dst.len() > self.bytes {
            return Err(CudaError::Memory(format!(
                "download of {} bytes from a buffer of {}",
                dst.len(),
                self.bytes
            )));
        }
        self.rt.dtoh(self.ptr, dst)
    }

    pub fn to_vec<T: Pod>(&self) -> Result<Vec<T>> {
        let mut v = vec![T::default(); self.bytes / std::mem::size_of::<T>()];
        self.download(&mut v)?;
        Ok(v)
    }

    pub fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives up the allocation without freeing it: the caller frees `ptr` with the
    /// runtime's `free` (memory that outlives an op, such as a prepared weight's).
    pub fn into_raw(self) -> u64 {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }
}

impl Drop for DeviceBuffer<'_> {
    fn drop(&mut self) {
        self.rt.free(self.ptr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_args_hold_each_value_in_its_slot() {
        let mut p = PackedArgs::new(&[Arg::Ptr(0xdead_beef_0000), Arg::U32(7), Arg::F32(1.5)]);
        let ptrs = p.pointers();
        // SAFETY: each pointer points at a live u64 slot of `p`.
        unsafe {
            assert_eq!(*(ptrs[0] as *const u64), 0xdead_beef_0000);
            assert_eq!(*(ptrs[1] as *const u32), 7);
            assert_eq!(*(ptrs[2] as *const f32), 1.5);
        }
    }
}
