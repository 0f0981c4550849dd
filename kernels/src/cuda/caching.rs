//! [`Caching`]: a [`KernelRuntime`] that keeps freed device memory for the next allocation
//! of the same size, as PyTorch's caching allocator does.
//!
//! Why: a decode step allocates the same activations, uploads and scratch buffers as the
//! step before. `cuMemAlloc` costs microseconds, and `cuMemFree` waits for the device to go
//! idle, which would drain the launch queue at every temporary an op frees. Reusing a block
//! needs no wait: every launch and copy goes through one stream, in order, so the work queued
//! before a free has read the block before any work queued after its reuse writes it.

use super::runtime::{Arg, KernelRuntime, LaunchConfig};
use super::CudaError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Bytes of freed blocks kept for reuse, at most (beyond it, frees go to the device).
pub const DEFAULT_CACHE_BYTES: usize = 512 << 20;

pub struct Caching {
    inner: Arc<dyn KernelRuntime>,
    limit: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The size of every block allocated through this runtime and not given back to it.
    sizes: HashMap<u64, usize>,
    /// Freed blocks by size, for reuse.
    free: HashMap<usize, Vec<u64>>,
    free_bytes: usize,
}

impl Caching {
    /// Keeps up to `limit` bytes of freed blocks of `inner`.
    pub fn new(inner: Arc<dyn KernelRuntime>, limit: usize) -> Caching {
        Caching {
            inner,
            limit,
            state: Mutex::new(State::default()),
        }
    }

    /// Bytes of freed blocks held for reuse.
    pub fn cached_bytes(&self) -> usize {
        self.lock().free_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Caching {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for ptr in state.free.drain().flat_map(|(_, ptrs)| ptrs) {
            self.inner.free(ptr);
        }
    }
}

impl KernelRuntime for Caching {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn multiprocessors(&self) -> u32 {
        self.inner.multiprocessors()
    }
    fn tensor_cores(&self) -> bool {
        self.inner.tensor_cores()
    }

    /// A freed block of exactly `bytes`, zeroed again (queued on the stream), or a new one.
    fn alloc(&self, bytes: usize) -> Result<u64, CudaError> {
        let reused = {
            let mut state = self.lock();
            let ptr = state.free.get_mut(&bytes).and_then(Vec::pop);
            if ptr.is_some() {
                state.free_bytes -= bytes;
            }
            ptr
        };
        if let Some(ptr) = reused {
            if let Err(e) = self.inner.zero(ptr, bytes) {
                self.free(ptr);
                return Err(e);
            }
            return Ok(ptr);
        }
        let ptr = self.inner.alloc(bytes)?;
        self.lock().sizes.insert(ptr, bytes);
        Ok(ptr)
    }

    /// Keeps the block for reuse while the cache holds less than its limit.
    fn free(&self, ptr: u64) {
        let mut state = self.lock();
        let Some(&bytes) = state.sizes.get(&ptr) else {
            return self.inner.free(ptr); // not one of ours: the device's business
        };
        if state.free_bytes + bytes <= self.limit {
            state.free.entry(bytes).or_default().push(ptr);
            state.free_bytes += bytes;
        } else {
            state.sizes.remove(&ptr);
            drop(state);
            self.inner.free(ptr);
        }
    }

    fn zero(&self, ptr: u64, bytes: usize) -> Result<(), CudaError> {
        self.inner.zero(ptr, bytes)
    }
    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        self.inner.htod(dst, src)
    }
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), CudaError> {
        self.inner.dtoh(src, dst)
    }
    fn launch(&self, m: &str, k: &str, cfg: &LaunchConfig, args: &[Arg]) -> Result<(), CudaError> {
        self.inner.launch(m, k, cfg, args)
    }
    fn synchronize(&self) -> Result<(), CudaError> {
        self.inner.synchronize()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::counting::Counting;
    use crate::cuda::emu::EmuRuntime;

    fn runtime(limit: usize) -> Result<(Arc<Counting>, Caching), CudaError> {
        let counted = Arc::new(Counting::new(Arc::new(EmuRuntime::new()?)));
        Ok((counted.clone(), Caching::new(counted, limit)))
    }

    #[test]
    fn a_freed_block_is_reused_for_the_same_size_and_zeroed_again() -> Result<(), CudaError> {
        let (counted, rt) = runtime(1 << 20)?;
        let a = rt.alloc(64)?;
        rt.htod(a, &[7u8; 64])?;
        rt.free(a);
        assert_eq!(rt.cached_bytes(), 64);
        counted.take_allocated();
        let b = rt.alloc(64)?;
        assert_eq!(
            (b, counted.take_allocated()),
            (a, 0),
            "the same block, no new one"
        );
        let mut back = [1u8; 64];
        rt.dtoh(b, &mut back)?;
        assert_eq!(back, [0u8; 64], "zeroed as a new allocation is");
        // Another size is a new block.
        let c = rt.alloc(65)?;
        assert_ne!(c, b);
        assert_eq!(counted.take_allocated(), 65);
        Ok(())
    }

    #[test]
    fn blocks_beyond_the_limit_go_back_to_the_device() -> Result<(), CudaError> {
        let (counted, rt) = runtime(100)?;
        let (a, b) = (rt.alloc(60)?, rt.alloc(60)?);
        rt.free(a);
        rt.free(b);
        assert_eq!(rt.cached_bytes(), 60, "the second would pass the limit");
        counted.take_allocated();
        rt.alloc(60)?;
        rt.alloc(60)?;
        assert_eq!(counted.take_allocated(), 60, "one reused, one new");
        Ok(())
    }
}
