//! [`Caching`]: a [`KernelRuntime`] that keeps freed device memory for the next allocation
//! of the same size, as PyTorch's caching allocator does.
//!
//! Why: a decode step allocates the same activations, uploads and scratch buffers as the
//! step before. `cuMemAlloc` costs microseconds, and `cuMemFree` waits for the device to go
//! idle, which would drain the launch queue at every temporary an op frees. Reusing a block
//! needs no wait: every launch and copy goes through one stream, in order, so the work queued
//! before a free has read the block before any work queued after its reuse writes it.

use super::runtime::{Arg, DeviceGraph, KernelRuntime, LaunchConfig};
use super::CudaError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes of freed blocks kept for reuse, at most (beyond it, frees go to the device).
pub const DEFAULT_CACHE_BYTES: usize = 512 << 20;

pub struct Caching {
    inner: Arc<dyn KernelRuntime>,
    limit: usize,
    /// Shared with the graphs captured through this runtime, which give their pools back
    /// when dropped.
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// The size of every block allocated through this runtime, outside any graph's pool,
    /// and not given back to the device.
    sizes: HashMap<u64, usize>,
    /// Freed blocks by size, for reuse.
    free: HashMap<usize, Vec<u64>>,
    free_bytes: usize,
    /// The pool of the capture in progress.
    capturing: Option<u64>,
    /// The pools of graphs captured here, by id, and the pool of each of their blocks.
    pools: HashMap<u64, Pool>,
    pool_of: HashMap<u64, u64>,
    next_pool: u64,
}

/// The device memory of one captured graph: every block allocated while capturing, and
/// every block freed then, since the graph's replays read and write them all. Within the
/// capture, a freed block serves a later allocation of its size (stream order makes that
/// safe, as outside); after it, no one else gets them until the graph is dropped. A block
/// its owner still holds then (a step's output, kept beside the graph) goes back to the
/// device when that owner frees it.
#[derive(Default)]
struct Pool {
    sizes: HashMap<u64, usize>,
    free: HashMap<usize, Vec<u64>>,
    graph_alive: bool,
}

impl Caching {
    /// Keeps up to `limit` bytes of freed blocks of `inner`.
    pub fn new(inner: Arc<dyn KernelRuntime>, limit: usize) -> Caching {
        Caching {
            inner,
            limit,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// Bytes of freed blocks held for reuse.
    pub fn cached_bytes(&self) -> usize {
        self.lock().free_bytes
    }

    /// Blocks owned by the pools of captured graphs (live or still held by their owners).
    pub fn pooled_blocks(&self) -> usize {
        self.lock().pool_of.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A block of `bytes`: a freed one of that size, else a new one; while capturing, from
    /// and into the capture's pool. With `zeroed`, a reused block is zeroed again (queued
    /// on the stream), and so is every block of a capture (a memset in the graph, so that
    /// each replay starts from zeroed memory as each eager step does).
    fn take(&self, bytes: usize, zeroed: bool) -> Result<u64, CudaError> {
        let (pool, reused) = {
            let mut state = self.lock();
            let pool = state.capturing;
            let pooled = pool
                .and_then(|id| state.pools.get_mut(&id))
                .and_then(|p| pop(&mut p.free, bytes));
            (pool, pooled.or_else(|| state.take_cached(bytes)))
        };
        let ptr = match reused {
            Some(ptr) => ptr,
            None if zeroed => self.inner.alloc(bytes)?,
            None => self.inner.alloc_for_overwrite(bytes)?,
        };
        match pool {
            Some(id) => self.lock().adopt(id, ptr, bytes),
            None => {
                self.lock().sizes.insert(ptr, bytes);
            }
        }
        if zeroed && (reused.is_some() || pool.is_some()) {
            if let Err(e) = self.inner.zero(ptr, bytes) {
                self.free(ptr);
                return Err(e);
            }
        }
        Ok(ptr)
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn pop(free: &mut HashMap<usize, Vec<u64>>, bytes: usize) -> Option<u64> {
    free.get_mut(&bytes).and_then(Vec::pop)
}

impl State {
    /// A cached block of exactly `bytes`, taken out of the cache.
    fn take_cached(&mut self, bytes: usize) -> Option<u64> {
        let ptr = pop(&mut self.free, bytes)?;
        self.free_bytes -= bytes;
        self.sizes.remove(&ptr);
        Some(ptr)
    }

    /// Makes `ptr` a block of pool `id`.
    fn adopt(&mut self, id: u64, ptr: u64, bytes: usize) {
        self.sizes.remove(&ptr);
        self.pool_of.insert(ptr, id);
        self.pools.entry(id).or_default().sizes.insert(ptr, bytes);
    }
}

impl Drop for Caching {
    fn drop(&mut self) {
        let mut state = self.lock();
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
    /// While capturing, the block belongs to the capture's pool.
    fn alloc(&self, bytes: usize) -> Result<u64, CudaError> {
        self.take(bytes, true)
    }

    /// As `alloc`, without zeroing a reused block: its user writes it first.
    fn alloc_for_overwrite(&self, bytes: usize) -> Result<u64, CudaError> {
        self.take(bytes, false)
    }

    /// Keeps the block for reuse while the cache holds less than its limit. A block of a
    /// graph's pool goes back to the pool while the graph lives, else to the device; a
    /// block freed while capturing joins the capture's pool (the graph may read it).
    fn free(&self, ptr: u64) {
        let mut state = self.lock();
        if let Some(&id) = state.pool_of.get(&ptr) {
            let capturing = state.capturing == Some(id);
            let pool = state.pools.get_mut(&id).expect("a block's pool exists");
            let bytes = pool.sizes[&ptr];
            if pool.graph_alive || capturing {
                pool.free.entry(bytes).or_default().push(ptr);
                return;
            }
            pool.sizes.remove(&ptr);
            if pool.sizes.is_empty() {
                state.pools.remove(&id);
            }
            state.pool_of.remove(&ptr);
            drop(state);
            return self.inner.free(ptr);
        }
        let Some(&bytes) = state.sizes.get(&ptr) else {
            return self.inner.free(ptr); // not one of ours: the device's business
        };
        if let Some(id) = state.capturing {
            state.adopt(id, ptr, bytes);
            let pool = state.pools.get_mut(&id).expect("adopted into it");
            pool.free.entry(bytes).or_default().push(ptr);
            return;
        }
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
    fn begin_capture(&self) -> Result<(), CudaError> {
        let mut state = self.lock();
        if state.capturing.is_some() {
            return Err(CudaError::Memory("a capture is already on".into()));
        }
        self.inner.begin_capture()?;
        let id = state.next_pool;
        state.next_pool += 1;
        state.capturing = Some(id);
        state.pools.insert(id, Pool::default());
        Ok(())
    }
    /// The inner graph, with the capture's pool: kept from everyone else while it lives.
    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>, CudaError> {
        let id = self.lock().capturing.take();
        let id = id.ok_or_else(|| CudaError::Memory("no capture is on".into()))?;
        let mut pooled = PooledGraph {
            graph: None,
            pool: id,
            state: self.state.clone(),
            inner: self.inner.clone(),
        };
        if let Some(pool) = self.lock().pools.get_mut(&id) {
            pool.graph_alive = true;
        }
        // On failure `pooled` is dropped here, which gives the pool back.
        pooled.graph = Some(self.inner.end_capture()?);
        Ok(Box::new(pooled))
    }
    fn launch_graph(&self, graph: &dyn DeviceGraph) -> Result<(), CudaError> {
        let inner = graph
            .as_any()
            .downcast_ref::<PooledGraph>()
            .and_then(|g| g.graph.as_deref())
            .ok_or_else(|| CudaError::Memory("not a graph captured here".into()))?;
        self.inner.launch_graph(inner)
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

/// A graph captured through [`Caching`], with the pool of device memory it replays in.
struct PooledGraph {
    graph: Option<Box<dyn DeviceGraph>>,
    pool: u64,
    state: Arc<Mutex<State>>,
    inner: Arc<dyn KernelRuntime>,
}

impl DeviceGraph for PooledGraph {
    fn launches(&self) -> usize {
        self.graph.as_ref().map_or(0, |g| g.launches())
    }
    fn bytes(&self) -> usize {
        let state = lock(&self.state);
        state
            .pools
            .get(&self.pool)
            .map_or(0, |p| p.sizes.values().sum())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for PooledGraph {
    /// The graph goes first, then the pool's free blocks; held ones follow as their
    /// owners free them.
    fn drop(&mut self) {
        self.graph = None;
        let mut state = lock(&self.state);
        let Some(mut pool) = state.pools.remove(&self.pool) else {
            return;
        };
        let idle: Vec<u64> = pool.free.drain().flat_map(|(_, ptrs)| ptrs).collect();
        for ptr in &idle {
            pool.sizes.remove(ptr);
            state.pool_of.remove(ptr);
        }
        if !pool.sizes.is_empty() {
            pool.graph_alive = false;
            state.pools.insert(self.pool, pool);
        }
        drop(state);
        for ptr in idle {
            self.inner.free(ptr);
        }
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

    /// A graph replays in the blocks its capture used: those allocated then, and those freed
    /// then (its launches may read them). No one else gets them while it lives; when it is
    /// dropped, they go back to the device, a block still held (a step's output) when freed.
    #[test]
    fn a_captured_graph_keeps_its_blocks_until_it_is_dropped() -> Result<(), CudaError> {
        let (counted, rt) = runtime(1 << 20)?;
        let cached = rt.alloc(64)?;
        rt.free(cached);
        let outside = rt.alloc(128)?;
        rt.begin_capture()?;
        let a = rt.alloc(64)?;
        assert_eq!(a, cached, "a cached block joins the capture's pool");
        rt.free(a);
        assert_eq!(rt.alloc(64)?, a, "and serves the capture again once freed");
        let held = rt.alloc(32)?;
        rt.free(outside);
        rt.free(a);
        let graph = rt.end_capture()?;
        assert_eq!(rt.pooled_blocks(), 3);
        counted.take_allocated();
        let (b, c) = (rt.alloc(64)?, rt.alloc(128)?);
        assert!(b != a && c != outside, "a live graph's block handed out");
        assert_eq!(counted.take_allocated(), 64 + 128, "new blocks instead");
        rt.free(b);
        rt.free(c);
        drop(graph);
        assert_eq!(rt.pooled_blocks(), 1, "the held block stays until freed");
        rt.free(held);
        assert_eq!(rt.pooled_blocks(), 0);
        assert_eq!(rt.cached_bytes(), 64 + 128, "only the blocks freed outside");
        Ok(())
    }

    #[test]
    fn memory_for_overwrite_is_reused_without_a_memset() -> Result<(), CudaError> {
        let (counted, rt) = runtime(1 << 20)?;
        let a = rt.alloc(64)?;
        rt.free(a);
        counted.take_memsets();
        let b = rt.alloc_for_overwrite(64)?;
        assert_eq!((b, counted.take_memsets()), (a, 0));
        rt.free(b);
        assert_eq!(rt.alloc(64)?, a);
        assert_eq!(counted.take_memsets(), 1, "alloc zeroes a reused block");
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
