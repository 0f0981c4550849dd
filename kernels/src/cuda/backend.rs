//! The CUDA backend's host code, written once against [`KernelRuntime`]: argument checks,
//! launch geometry and argument packing for every kernel, run by a GPU or by the emulator.
//!
//! It implements the engine's [`Backend`] trait, whose activations are [`Tensor`]s: each op
//! writes its outputs into the tensors' device copies ([`DeviceF32`]) and reads its inputs
//! from there, so a forward pass's activations stay on the device, and the host reads back
//! only what it asks for (the logits). Norm weights and biases go up with the first op that
//! reads them, and stay attached to their tensors. Model weights stay on the device:
//! `prepare_weight` and `prepare_embedding` put each there once, at load, in the form the
//! matmul or the lookup reads ([`ResidentWeight`]). So do the KV pools: the first attention
//! or write over a layer puts them there as stored (f32, f16, or int8 codes and scales:
//! [`ResidentKv`]), and `write_kv` then stores new slots there only, rounded as the host
//! would have (the host pools are stale until someone reads them there, see [`KvLayer`]).
//! The batch's positions, slot mapping and block tables, and the rotary frequencies, go up
//! once per step: each is kept by role while the next op's equal it (`CudaBackend::arrays`).
//!
//! The rows the LM head reads are gathered on the device (`gather_rows`). So a decode step
//! sends its token ids and brings back the log-probabilities, with no copy between its
//! layers: the shape CUDA graphs need. Its device memory comes from a caching allocator ([`super::caching`]), so a
//! step reuses the last one's.

use super::runtime::{Arg, DeviceBuffer, KernelRuntime, LaunchConfig, Pod};

mod step_graph;
use super::CudaError;
use crate::{
    check, shapes, Backend, BatchLayout, DeviceTensor, GraphKey, KvData, KvDtype, KvLayer,
    MatmulPart, RecordedStep, Result, Rope, StepInputs, Tensor, Weight, WeightData,
};
use half::f16;
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use vellum_quant::{BlockFormat, Int4Format, QK};

/// Threads per block of the row kernels (norms, softmax, argmax).
const ROW_THREADS: u32 = 256;
/// Threads per block of attention; a head_dim up to twice this is supported.
const ATTENTION_THREADS: u32 = 128;
/// Warps (output columns) per block of the matmul.
const MATMUL_WARPS: u32 = 4;

/// Keys per block of split-K (flash-decoding) attention; contexts longer than this are split.
const DEFAULT_SPLIT_KEYS: u32 = 512;

/// From this many activation rows a quantized matmul runs on tensor cores (`qgemm.cu`)
/// rather than as a warp-per-column GEMV (`qmatmul.cu`): from one, so that a row's result
/// never depends on how many rows share the batch (the two kernels round differently). The
/// GEMV's 2 × rows FMAs per int4 byte on the CUDA cores also run out of throughput before
/// memory bandwidth at a few rows on every target card (H100: ~10 FMA per byte of
/// bandwidth). `set_gemm_min_rows` lets `benches/cuda_gemv.rs` time both at every batch.
const DEFAULT_GEMM_MIN_ROWS: usize = 1;
/// Output columns and k values per block step of the tensor-core GEMM (`GEMM_BN`,
/// `GEMM_BK` in qgemm.cu), and its threads per block.
const GEMM_COLS: usize = 64;
const GEMM_STEP: usize = 64;
const GEMM_THREADS: u32 = 128;
/// Blocks per multiprocessor that split-K aims at for a decode matmul: enough that some have
/// loads in flight while others compute. An estimate until measured (`benches/cuda_gemv.rs`
/// sweeps it); the GEMM's registers allow about five such blocks per multiprocessor.
const DEFAULT_GEMM_BLOCKS_PER_SM: usize = 4;

/// How one tensor-core GEMM covers its matrix (see `CudaBackend::gemm_plan`).
struct GemmPlan {
    /// Rows per block: 16 (decode batches) or 64.
    tile_rows: usize,
    /// Blocks along the columns (64 each) and along the rows.
    tiles: (usize, usize),
    /// k steps (64 values each) per chunk.
    per_chunk: usize,
    /// Blocks along k: one per chunk for a single row tile (split-K), else one.
    splits: usize,
}

/// What a split kernel (a split-K GEMM, flash-decoding attention) needs beside its output:
/// room for every split's partials (each split writes all of its own, so it needs no
/// clearing), and a counter per output part (a GEMM's column tile, an attention's token and
/// head), at zero between launches (the part's last split resets it; new counters are
/// allocated zeroed). Grown as needed, kept between ops: an allocation per op would cost
/// more than a decode matmul.
#[derive(Default)]
struct SplitScratch {
    partials: Option<(Arc<OwnedBuffer>, usize)>,
    counters: Option<(Arc<OwnedBuffer>, usize)>,
}

impl SplitScratch {
    /// The partials (`floats` f32) and the counters (`parts` u32), grown to fit.
    fn for_split(&mut self, be: &CudaBackend, floats: usize, parts: usize) -> Result<(Arg, Arg)> {
        for (slot, bytes) in [
            (&mut self.partials, floats * 4),
            (&mut self.counters, parts * 4),
        ] {
            if slot.as_ref().is_none_or(|(_, size)| *size < bytes) {
                *slot = None; // freed before its replacement is allocated
                *slot = Some((Arc::new(be.keep(be.zeroed(bytes)?)), bytes));
            }
        }
        let arg = |slot: &Option<(Arc<OwnedBuffer>, usize)>| {
            slot.as_ref().map_or(Arg::Ptr(0), |b| b.0.arg())
        };
        Ok((arg(&self.partials), arg(&self.counters)))
    }

    /// The buffers, for a recorded step to keep alive.
    fn buffers(&self) -> impl Iterator<Item = Arc<OwnedBuffer>> + '_ {
        [&self.partials, &self.counters]
            .into_iter()
            .flatten()
            .map(|(b, _)| b.clone())
    }
}

/// What a tensor-core GEMM reads as its rows: a matrix, or silu(gate) · up, computed as it
/// loads them (`qgemm.cu`'s `_silu` kernels: the MLP's down projection, fused).
#[derive(Clone, Copy)]
enum GemmRows {
    Plain(Arg),
    SiluOf { gate: Arg, up: Arg },
}

/// A small array's bytes as sent, and its device copy (see `CudaBackend::arrays`).
type SentArray = (Vec<u8>, Arc<OwnedBuffer>);

/// A small array an op reads on the device: a buffer of its own, or a part of one (a
/// recorded step's inputs share one buffer, sent in one copy).
struct DeviceArray {
    buf: Arc<OwnedBuffer>,
    offset: u64,
}

impl DeviceArray {
    fn all_of(buf: &Arc<OwnedBuffer>) -> DeviceArray {
        DeviceArray {
            buf: buf.clone(),
            offset: 0,
        }
    }

    fn arg(&self) -> Arg {
        Arg::Ptr(self.buf.ptr + self.offset)
    }
}

pub struct CudaBackend {
    rt: Arc<dyn KernelRuntime>,
    name: String,
    split_keys: u32,
    /// See `set_gemm_min_rows`; atomic so that a benchmark can switch kernels between
    /// matmuls on buffers borrowed from the backend.
    gemm_min_rows: AtomicUsize,
    /// See `set_gemm_blocks_per_sm`; atomic for the same reason.
    gemm_blocks_per_sm: AtomicUsize,
    /// The split-K GEMM's scratch, kept between ops and grown as needed.
    gemm_scratch: Mutex<SplitScratch>,
    /// Flash-decoding attention's, likewise.
    attention_scratch: Mutex<SplitScratch>,
    /// The small arrays ops read beside the activations (a batch's positions, slot mapping
    /// and block tables; the rotary frequencies), by role: the last one sent for each, with
    /// its bytes, reused while an op's array equals it. Every layer of a step reads the same
    /// ones, so they go up once a step rather than once an op.
    arrays: Mutex<HashMap<&'static str, SentArray>>,
    /// The step being recorded, if one is (see `step_graph`).
    capture: Mutex<Option<step_graph::Capture>>,
}

impl CudaBackend {
    /// A backend on `rt`. `VELLUM_CUDA_GEMM=0` keeps quantized matmuls on the GEMV (a way
    /// out, without a rebuild, should the tensor-core path misbehave on some card); `=1`,
    /// the default, runs them on tensor cores.
    pub fn new(rt: Arc<dyn KernelRuntime>) -> Self {
        let name = rt.name();
        let gemm_min_rows = match std::env::var("VELLUM_CUDA_GEMM").as_deref() {
            Ok("0") => usize::MAX,
            Ok("1") | Err(_) => DEFAULT_GEMM_MIN_ROWS,
            Ok(other) => {
                tracing::warn!("VELLUM_CUDA_GEMM={other:?} is not 0 or 1: ignored");
                DEFAULT_GEMM_MIN_ROWS
            }
        };
        CudaBackend {
            rt,
            name,
            split_keys: DEFAULT_SPLIT_KEYS,
            gemm_min_rows: AtomicUsize::new(gemm_min_rows),
            gemm_blocks_per_sm: AtomicUsize::new(DEFAULT_GEMM_BLOCKS_PER_SM),
            gemm_scratch: Mutex::new(SplitScratch::default()),
            attention_scratch: Mutex::new(SplitScratch::default()),
            arrays: Mutex::new(HashMap::new()),
            capture: Mutex::new(None),
        }
    }

    /// The kernels run on the CPU emulator (tests, and machines without a GPU).
    pub fn emulated() -> std::result::Result<Self, CudaError> {
        Ok(Self::new(caching(Arc::new(super::emu::EmuRuntime::new()?))))
    }

    /// The kernels run on GPU `ordinal`.
    pub fn gpu(ordinal: usize) -> std::result::Result<Self, CudaError> {
        let rt = super::driver::CudaRuntime::new(ordinal)?;
        Ok(Self::new(caching(Arc::new(rt))))
    }

    /// Contexts longer than `keys` (a multiple of the attention block's 128 threads) are
    /// attended in splits of `keys`, merged by the last split of each token and head.
    pub fn set_split_keys(&mut self, keys: u32) {
        self.split_keys = keys.div_ceil(ATTENTION_THREADS).max(1) * ATTENTION_THREADS;
    }

    pub fn split_keys(&self) -> u32 {
        self.split_keys
    }

    /// Quantized matmuls of at least `rows` activation rows run on tensor cores (where the
    /// device has them), fewer as a GEMV; `usize::MAX` keeps every one on the GEMV. For
    /// benchmarks and tests of both kernels; the default is `DEFAULT_GEMM_MIN_ROWS`.
    pub fn set_gemm_min_rows(&self, rows: usize) {
        self.gemm_min_rows.store(rows.max(1), Ordering::Relaxed);
    }

    /// The blocks per multiprocessor split-K aims at for a decode matmul (default
    /// `DEFAULT_GEMM_BLOCKS_PER_SM`), for the benchmark's sweep. It sets the chunk size of
    /// k, so results change with it (for every batch alike).
    pub fn set_gemm_blocks_per_sm(&self, blocks: usize) {
        self.gemm_blocks_per_sm
            .store(blocks.max(1), Ordering::Relaxed);
    }

    pub fn gemm_blocks_per_sm(&self) -> usize {
        self.gemm_blocks_per_sm.load(Ordering::Relaxed)
    }

    pub fn runtime(&self) -> &dyn KernelRuntime {
        &*self.rt
    }

    /// `out = x · wᵀ` with `x` (`[rows, k]` f32) and `out` (`[rows, n]` f32) already on the
    /// device and `w` prepared on it (`prepare_weight`): the kernel alone, asynchronous
    /// (`runtime().synchronize()` waits). For kernel benchmarks, and a first step towards
    /// device-resident activations.
    pub fn matmul_device(
        &self,
        w: &Weight,
        x: &DeviceBuffer<'_>,
        out: &DeviceBuffer<'_>,
        rows: usize,
    ) -> Result<()> {
        let (k, n) = (w.cols, w.rows);
        let resident = self.resident(w);
        check("matmul_device", resident.is_some(), || {
            "the weight is not prepared on this backend's device".into()
        })?;
        check(
            "matmul_device",
            x.bytes() >= rows * k * 4 && out.bytes() >= rows * n * 4,
            || {
                format!(
                    "buffers of {} and {} bytes for [{rows}, {k}] · [{n}, {k}]ᵀ",
                    x.bytes(),
                    out.bytes()
                )
            },
        )?;
        let matrix = self.matrix_of(resident.expect("checked"), w)?;
        self.launch_matmul(matrix, (x.arg(), Arg::Ptr(0), out.arg()), (rows, k, n))
    }

    /// Copies `n` f32 from `src` to `dst` on the device with a kernel: the device-to-device
    /// copy bandwidth a kernel benchmark reports against.
    pub fn copy_device(
        &self,
        src: &DeviceBuffer<'_>,
        dst: &DeviceBuffer<'_>,
        n: usize,
    ) -> Result<()> {
        check(
            "copy_device",
            src.bytes() >= n * 4 && dst.bytes() >= n * 4,
            || {
                format!(
                    "{n} floats between buffers of {} and {} bytes",
                    src.bytes(),
                    dst.bytes()
                )
            },
        )?;
        self.copy_f32(src.arg(), dst.arg(), n)
    }

    fn copy_f32(&self, src: Arg, dst: Arg, n: usize) -> Result<()> {
        let blocks = (n as u32).div_ceil(256).clamp(1, 65535);
        let cfg = LaunchConfig::linear(blocks, 256);
        let args = [src, dst, Arg::U32(n as u32)];
        self.launch("elementwise", "copy_f32", cfg, &args)
    }

    /// `copy` as this backend's device copy of a tensor, if it is one on this runtime.
    fn own_copy<'t>(&self, copy: &'t Arc<dyn DeviceTensor>) -> Option<&'t DeviceF32> {
        let copy = copy.as_any().downcast_ref::<DeviceF32>()?;
        self.is_runtime(&copy.buf.rt).then_some(copy)
    }

    fn new_device_tensor(&self, len: usize) -> Result<DeviceF32> {
        Ok(DeviceF32 {
            buf: self.keep(DeviceBuffer::for_overwrite(&*self.rt, len * 4)?),
            len,
        })
    }

    /// Where an op reads `t` on the device: its device copy; else its values uploaded and
    /// attached to it, so that later ops find them there (a norm's weights go up once);
    /// else, where another device's copy holds it, uploaded for this op only.
    fn input(&self, t: &Tensor) -> Result<Input<'_>> {
        if let Some(copy) = t.device().and_then(|c| self.own_copy(c)) {
            return Ok(Input::Resident(copy.buf.arg()));
        }
        let buf = self.up(&t.host()?)?;
        if t.device().is_some() {
            return Ok(Input::ForOp(buf));
        }
        let copy = DeviceF32 {
            buf: self.keep(buf),
            len: t.len(),
        };
        // Another thread may have attached a copy first: then this one is freed, and the op
        // reads that one (or, if it is another device's, an upload of its own).
        let _ = t.attach_device(Arc::new(copy));
        match t.device().and_then(|c| self.own_copy(c)) {
            Some(copy) => Ok(Input::Resident(copy.buf.arg())),
            None => Ok(Input::ForOp(self.up(&t.host()?)?)),
        }
    }

    /// Where an op writes all of `t`'s new values: its own device copy if no clone shares
    /// it, else new device memory that becomes its copy. The host's values go stale.
    fn output(&self, t: &mut Tensor) -> Result<Arg> {
        if let Some(copy) = t.unshared_device().and_then(|c| self.own_copy(c)) {
            let arg = copy.buf.arg();
            t.mark_written_on_device();
            return Ok(arg);
        }
        let copy = self.new_device_tensor(t.len())?;
        let arg = copy.buf.arg();
        t.set_device(Arc::new(copy));
        Ok(arg)
    }

    /// Where an op updates `t` in place: its own device copy if no clone shares it, else
    /// new device memory filled with its values (copied on the device, or uploaded) that
    /// becomes its copy. The host's values go stale.
    fn in_place(&self, t: &mut Tensor) -> Result<Arg> {
        if let Some(copy) = t.unshared_device().and_then(|c| self.own_copy(c)) {
            let arg = copy.buf.arg();
            t.mark_written_on_device();
            return Ok(arg);
        }
        let copy = match t.device().and_then(|c| self.own_copy(c)) {
            Some(shared) => {
                let copy = self.new_device_tensor(t.len())?;
                self.copy_f32(shared.buf.arg(), copy.buf.arg(), t.len())?;
                copy
            }
            None => DeviceF32 {
                buf: self.keep(self.up(&t.host()?)?),
                len: t.len(),
            },
        };
        let arg = copy.buf.arg();
        t.set_device(Arc::new(copy));
        Ok(arg)
    }

    fn up<T: Pod>(&self, data: &[T]) -> Result<DeviceBuffer<'_>> {
        Ok(DeviceBuffer::upload(&*self.rt, data)?)
    }

    /// `data` on the device, as the array of `role` (see `arrays`): the copy sent last for
    /// that role when it holds the same bytes, else that copy overwritten, or a new one
    /// (which replaces it).
    /// While a step is being recorded, the array comes from the recording instead.
    fn array<T: Pod>(&self, role: &'static str, data: &[T]) -> Result<DeviceArray> {
        let bytes = super::runtime::bytes_of(data);
        if let Some(capture) = self
            .capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            return capture.array(role, bytes, &self.arrays);
        }
        let mut arrays = self.arrays.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((sent, copy)) = arrays.get_mut(role) {
            if sent[..] == *bytes {
                return Ok(DeviceArray::all_of(copy));
            }
            // Held by no one else (no recorded step): new values in place, queued after the
            // launches that read the old ones. A decode step's arrays change size rarely.
            if sent.len() == bytes.len() && Arc::strong_count(copy) == 1 {
                self.rt.htod(copy.ptr, bytes)?;
                sent.copy_from_slice(bytes);
                return Ok(DeviceArray::all_of(copy));
            }
        }
        let copy = Arc::new(self.keep(self.up(data)?));
        arrays.insert(role, (bytes.to_vec(), copy.clone()));
        Ok(DeviceArray::all_of(&copy))
    }

    /// A layer's K and V pools on the device as stored on the host (f32, f16, or int8
    /// codes and scales), which the attention kernels read as the CPU does.
    fn upload_kv(&self, cache: &KvLayer) -> Result<DeviceKv<DeviceBuffer<'_>>> {
        let slots = cache.num_slots().max(1);
        let mut planes = Vec::new();
        for plane in cache.k.planes().into_iter().chain(cache.v.planes()) {
            planes.push((self.up(plane)?, plane.len() / slots));
        }
        let shift = match &cache.k {
            KvData::Int8 { group, .. } => group.trailing_zeros(),
            _ => 0,
        };
        Ok(DeviceKv {
            planes,
            dtype: cache.dtype(),
            shift,
        })
    }

    /// This backend's device copy of a layer's pools, if it made one on this runtime.
    fn own_kv<'c>(&self, cache: &'c KvLayer) -> Option<&'c ResidentKv> {
        let copy = cache.device.get()?.as_any().downcast_ref::<ResidentKv>()?;
        self.is_runtime(&copy.rt).then_some(copy)
    }

    /// This backend's device copy of a layer's pools, for a write that stores new slots there
    /// only, rounded as the host stores them (KvData::write): made first if need be (another
    /// backend's copy brings its values home first).
    fn kv_to_write<'c>(&self, cache: &'c mut KvLayer) -> Result<&'c ResidentKv> {
        if self.own_kv(cache).is_none() {
            cache.drop_device_copy()?;
            self.kv_on_device(cache)?;
        }
        Ok(self.own_kv(cache).expect("made above"))
    }

    /// Whether `rt` is this backend's runtime (device copies are only valid there).
    fn is_runtime(&self, rt: &Arc<dyn KernelRuntime>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(rt), Arc::as_ptr(&self.rt))
    }

    /// A layer's pools on the device for an op: its device copy, made on first use (the
    /// whole pool goes up once), or, where another backend's copy holds the layer's slot,
    /// uploaded for this op only (an error if only that copy holds the current values).
    fn kv_on_device<'c>(&'c self, cache: &'c KvLayer) -> Result<KvOnDevice<'c>> {
        if cache.device.get().is_none() {
            let pools = self.upload_kv(cache)?;
            let mirror = ResidentKv {
                rt: self.rt.clone(),
                pools: DeviceKv {
                    planes: pools
                        .planes
                        .into_iter()
                        .map(|(b, rb)| (self.keep(b), rb))
                        .collect(),
                    dtype: pools.dtype,
                    shift: pools.shift,
                },
            };
            // Another thread may have won the race: its copy is kept, this one freed.
            let _ = cache.device.set(Arc::new(mirror));
        }
        if let Some(m) = self.own_kv(cache) {
            return Ok(KvOnDevice::Resident(m));
        }
        check("attention", !cache.host_is_stale(), || {
            "the KV pools hold values written on another device: sync the layer \
             (KvLayer::sync_host) first"
                .into()
        })?;
        Ok(KvOnDevice::ForOp(self.upload_kv(cache)?))
    }

    fn zeroed(&self, bytes: usize) -> Result<DeviceBuffer<'_>> {
        Ok(DeviceBuffer::zeroed(&*self.rt, bytes)?)
    }

    fn launch(&self, module: &str, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        Ok(self.rt.launch(module, kernel, &cfg, args)?)
    }

    /// A weight on the device for a row gather (embedding): dense as stored, quantized
    /// formats dequantized to f32. Returns the buffer and the kernel-name suffix of its type.
    fn upload_rows(&self, w: &Weight) -> Result<(DeviceBuffer<'_>, &'static str)> {
        Ok(match &w.data {
            WeightData::F32(v) => (self.up(v)?, "f32"),
            WeightData::F16(v) => (self.up(v)?, "f16"),
            WeightData::BF16(v) => (self.up(v)?, "bf16"),
            _ => (self.up(&w.to_f32())?, "f32"),
        })
    }

    /// A weight on the device in the form a matmul kernel reads: dense as stored; int4
    /// (planar, or GGUF Q4_0/Q4_1 repacked to planar group 32 bit for bit) and int8 (per
    /// channel, or Q8_0 repacked to codes + a scale per 32) as codes and scales.
    fn upload_matrix(&self, w: &Weight) -> Result<DeviceMatrix<DeviceBuffer<'_>>> {
        let (rows, cols) = (w.rows, w.cols);
        Ok(match &w.data {
            WeightData::F32(_) | WeightData::F16(_) | WeightData::BF16(_) => {
                let (buf, ty) = self.upload_rows(w)?;
                DeviceMatrix::Dense(buf, ty)
            }
            WeightData::Int4(f, d) => self.upload_int4(*f, &d.packed, &d.scales, &d.mins)?,
            WeightData::Block(f @ (BlockFormat::Q4_0 | BlockFormat::Q4_1), bytes) => {
                let (f, d) = Int4Format::from_q4_blocks(*f, rows, cols, bytes)?;
                self.upload_int4(f, &d.packed, &d.scales, &d.mins)?
            }
            WeightData::Block(BlockFormat::Q8_0, bytes) if cols.is_multiple_of(16) => {
                let blocks = bytes.chunks_exact(BlockFormat::Q8_0.block_bytes());
                let mut codes = Vec::with_capacity(rows * cols);
                let mut scales = Vec::with_capacity(rows * cols / QK);
                for b in blocks {
                    scales.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
                    codes.extend_from_slice(&b[2..]);
                }
                DeviceMatrix::Int8 {
                    codes: self.up(&codes)?,
                    scales: self.up(&scales)?,
                    group: QK as u32,
                }
            }
            WeightData::Int8PerRow { q, scales } if cols.is_multiple_of(16) => {
                let codes: Vec<u8> = q.iter().map(|&v| v as u8).collect();
                DeviceMatrix::Int8 {
                    codes: self.up(&codes)?,
                    scales: self.up(scales)?,
                    group: cols as u32,
                }
            }
            // int8 rows that are not whole 16-byte loads: dequantized (no real model has them).
            _ => DeviceMatrix::Dense(self.up(&w.to_f32())?, "f32"),
        })
    }

    /// This backend's device copy of `w`, if it was prepared on this runtime.
    fn resident<'w>(&self, w: &'w Weight) -> Option<&'w ResidentWeight> {
        let copy = w.device_copy()?.0.downcast_ref::<ResidentWeight>()?;
        self.is_runtime(&copy.rt).then_some(copy)
    }

    /// `w`'s device copy on this runtime, attached empty if it has none yet.
    fn attach_resident<'w>(&self, w: &'w mut Weight) -> &'w Weight {
        if self.resident(w).is_none() {
            w.set_device_copy(crate::DeviceCopy(Arc::new(ResidentWeight {
                rt: self.rt.clone(),
                matrix: OnceLock::new(),
                rows: OnceLock::new(),
            })));
        }
        w
    }

    /// The matmul form of `w` (whose device copy is `r`), uploaded if it is not there yet.
    fn matrix_of<'r>(
        &self,
        r: &'r ResidentWeight,
        w: &Weight,
    ) -> Result<&'r DeviceMatrix<OwnedBuffer>> {
        if r.matrix.get().is_none() {
            let matrix = self.upload_matrix(w)?.map(|b| self.keep(b));
            // Another thread may have won the race: its copy is kept, this one freed.
            let _ = r.matrix.set(matrix);
        }
        Ok(r.matrix.get().expect("set above"))
    }

    /// The row-gather form of `w` (whose device copy is `r`), uploaded if it is not there yet.
    fn rows_of<'r>(
        &self,
        r: &'r ResidentWeight,
        w: &Weight,
    ) -> Result<&'r (OwnedBuffer, &'static str)> {
        if r.rows.get().is_none() {
            let (buf, ty) = self.upload_rows(w)?;
            // As above.
            let _ = r.rows.set((self.keep(buf), ty));
        }
        Ok(r.rows.get().expect("set above"))
    }

    /// An upload's memory, kept past this op (a prepared weight's, a KV device copy's).
    fn keep(&self, buf: DeviceBuffer<'_>) -> OwnedBuffer {
        OwnedBuffer {
            rt: self.rt.clone(),
            ptr: buf.into_raw(),
        }
    }

    /// `out = x · wᵀ (+ bias)` on the device with `w` already there.
    fn launch_matmul<B: DeviceMem>(
        &self,
        w: &DeviceMatrix<B>,
        (x, bias, out): (Arg, Arg, Arg),
        (rows, k, n): (usize, usize, usize),
    ) -> Result<()> {
        let blocks = (n as u32).div_ceil(MATMUL_WARPS);
        let cfg = LaunchConfig::linear(blocks, MATMUL_WARPS * 32);
        let shape = [rows, k, n].map(|v| Arg::U32(v as u32));
        if self.on_gemm(rows) && w.gemm_kind(k).is_some() {
            return self.launch_gemm(w, (GemmRows::Plain(x), bias, out), (rows, k, n));
        }
        let (kind, mut args, group) = match w.quantized_args(x, bias, out) {
            Ok(quantized) => quantized,
            Err(Dense(wb, ty)) => {
                let mut args = vec![x, wb.arg(), bias, out];
                args.extend(shape);
                return self.launch("matmul", &format!("matmul_f32_{ty}"), cfg, &args);
            }
        };
        args.extend(shape);
        args.push(Arg::U32(group));
        self.launch("qmatmul", &format!("matmul_{kind}_f32"), cfg, &args)
    }

    /// Whether a matmul of `rows` rows takes the tensor-core GEMM (where its weight has one,
    /// `DeviceMatrix::gemm_kind`). No rows take the GEMV, which launches over columns and does
    /// nothing (a GEMM grid of zero row tiles would be a launch error).
    fn on_gemm(&self, rows: usize) -> bool {
        rows > 0 && rows >= self.gemm_min_rows.load(Ordering::Relaxed) && self.rt.tensor_cores()
    }

    /// The tensor-core matmul (`qgemm.cu`) of a quantized weight, or a dense f16/bf16 one. k is summed in chunks
    /// sized by k and n alone (`gemm_chunks`); a decode batch (one tile of 16 rows) gives each
    /// chunk its own blocks (split-K), so that a small matrix still fills the device.
    fn launch_gemm<B: DeviceMem>(
        &self,
        w: &DeviceMatrix<B>,
        (x, bias, out): (GemmRows, Arg, Arg),
        (rows, k, n): (usize, usize, usize),
    ) -> Result<()> {
        let GemmPlan {
            tile_rows,
            tiles,
            per_chunk,
            splits,
        } = self.gemm_plan(rows, k, n);
        // Launches queue in order on one stream, so matmuls can share the scratch one after another.
        let mut scratch = self.gemm_scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (dst, sum_out, counters) = if splits > 1 {
            let (partials, counters) = scratch.for_split(self, splits * rows * n, tiles.0)?;
            (partials, out, counters)
        } else {
            (out, Arg::Ptr(0), Arg::Ptr(0))
        };
        let (first, up, variant) = match x {
            GemmRows::Plain(x) => (x, None, ""),
            GemmRows::SiluOf { gate, up } => (gate, Some(up), "_silu"),
        };
        let Some((kind, mut args, group)) = w.gemm_args(first, bias, dst, k) else {
            return Err(CudaError::Launch {
                kernel: "gemm".into(),
                detail: "f32 weights, or rows not 16-byte aligned, have no tensor-core kernel"
                    .into(),
            }
            .into());
        };
        if let Some(up) = up {
            args.insert(1, up);
        }
        args.extend([rows, k, n].map(|v| Arg::U32(v as u32)));
        args.extend([
            Arg::U32(group),
            Arg::U32(per_chunk as u32),
            sum_out,
            counters,
        ]);
        let cfg = LaunchConfig {
            grid: (tiles.0 as u32, tiles.1 as u32, splits as u32),
            block: (GEMM_THREADS, 1, 1),
            shared_bytes: 0,
        };
        self.launch(
            "qgemm",
            &format!("gemm_{kind}{variant}_m{tile_rows}_f32"),
            cfg,
            &args,
        )
    }

    /// How the tensor-core GEMM covers `[rows, k] · [n, k]ᵀ`: k is summed in chunks sized by
    /// k and n alone (`gemm_chunks`); a decode batch (one tile of 16 rows) gives each chunk
    /// its own blocks (split-K), so that a small matrix still fills the device.
    fn gemm_plan(&self, rows: usize, k: usize, n: usize) -> GemmPlan {
        let tile_rows = if rows <= 16 { 16 } else { 64 };
        let tiles = (n.div_ceil(GEMM_COLS), rows.div_ceil(tile_rows));
        let steps = k.div_ceil(GEMM_STEP);
        let blocks_wanted = self.rt.multiprocessors() as usize * self.gemm_blocks_per_sm();
        let chunks = gemm_chunks(tiles.0, steps, blocks_wanted);
        let per_chunk = steps.div_ceil(chunks);
        let splits = if tiles.1 == 1 {
            steps.div_ceil(per_chunk)
        } else {
            1
        };
        GemmPlan {
            tile_rows,
            tiles,
            per_chunk,
            splits,
        }
    }

    /// Two or three quantized (or dense f16/bf16) matmuls of the same input (Q, K and V;
    /// gate and up) as one grouped tensor-core launch (`gemm3_*` in qgemm.cu), each part
    /// with its own plan, so the same bits as one launch each. `None` when the parts do not
    /// qualify (not all prepared here in one form, or not on the GEMM path): the caller runs them
    /// one by one.
    fn grouped_gemm(&self, x: &Tensor, parts: &mut [MatmulPart]) -> Result<Option<()>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let k = first.w.cols;
        let rows = x.len() / k.max(1);
        if !self.on_gemm(rows) || !(2..=3).contains(&parts.len()) {
            return Ok(None);
        }
        let mut matrices = Vec::with_capacity(3);
        for p in parts.iter() {
            match self.resident(p.w).and_then(|r| r.matrix.get()) {
                Some(m) if p.w.rows > 0 => matrices.push(m),
                _ => return Ok(None),
            }
        }
        // One kernel, one kind and group for all parts (and offsets for all int4 or none).
        let form = |m: &DeviceMatrix<OwnedBuffer>| match m {
            DeviceMatrix::Int4 { mins, group, .. } => Some(("w4", *group, mins.is_some())),
            DeviceMatrix::Int8 { group, .. } => Some(("w8", *group, false)),
            DeviceMatrix::Dense(..) => m.gemm_kind(k).map(|kind| (kind, 0, false)),
        };
        let Some(kind) = form(matrices[0]) else {
            return Ok(None);
        };
        if matrices.iter().any(|m| form(m) != Some(kind)) {
            return Ok(None);
        }
        let plans: Vec<GemmPlan> = parts
            .iter()
            .map(|p| self.gemm_plan(rows, k, p.w.rows))
            .collect();
        let tile_rows = plans[0].tile_rows;
        let xd = self.input(x)?;
        let biases = parts
            .iter()
            .map(|p| p.bias.map(|b| self.input(b)).transpose())
            .collect::<Result<Vec<_>>>()?;
        let mut outs = Vec::with_capacity(3);
        for p in parts.iter_mut() {
            outs.push(self.output(p.out)?);
        }
        let partial_floats: usize = parts
            .iter()
            .zip(&plans)
            .map(|(p, plan)| {
                if plan.splits > 1 {
                    plan.splits * rows * p.w.rows
                } else {
                    0
                }
            })
            .sum();
        let column_tiles: usize = plans.iter().map(|p| p.tiles.0).sum();
        let mut scratch = self.gemm_scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (partials, counters) = scratch.for_split(self, partial_floats.max(1), column_tiles)?;
        let mut args = vec![xd.arg()];
        args.extend([rows, k, kind.1 as usize].map(|v| Arg::U32(v as u32)));
        args.extend([partials, counters]);
        for i in 0..3 {
            let (m, plan) = match (matrices.get(i), plans.get(i)) {
                (Some(m), Some(plan)) => (Some(*m), Some(plan)),
                _ => (None, None),
            };
            let mut ptrs: Vec<Arg> = match m {
                Some(DeviceMatrix::Int4 {
                    packed,
                    scales,
                    mins,
                    ..
                }) => vec![
                    packed.arg(),
                    scales.arg(),
                    mins.as_ref().map_or(Arg::Ptr(0), |m| m.arg()),
                ],
                Some(DeviceMatrix::Int8 { codes, scales, .. }) => vec![codes.arg(), scales.arg()],
                Some(DeviceMatrix::Dense(rows, _)) => vec![rows.arg()],
                // A missing third part: as many null arrays as a part of this kind has.
                _ => match kind.0 {
                    "w4" => vec![Arg::Ptr(0); 3],
                    "w8" => vec![Arg::Ptr(0); 2],
                    _ => vec![Arg::Ptr(0)],
                },
            };
            let bias = biases
                .get(i)
                .and_then(|b| b.as_ref())
                .map_or(Arg::Ptr(0), |b| b.arg());
            ptrs.extend([bias, outs.get(i).copied().unwrap_or(Arg::Ptr(0))]);
            args.extend(ptrs);
            let n = parts.get(i).map_or(0, |p| p.w.rows);
            let (chunk, splits) = plan.map_or((1, 1), |p| (p.per_chunk, p.splits));
            args.extend([n, chunk, splits].map(|v| Arg::U32(v as u32)));
        }
        let max_splits = plans.iter().map(|p| p.splits).max().unwrap_or(1);
        let cfg = LaunchConfig {
            grid: (
                column_tiles as u32,
                plans[0].tiles.1 as u32,
                max_splits as u32,
            ),
            block: (GEMM_THREADS, 1, 1),
            shared_bytes: 0,
        };
        let kernel = format!("gemm3_{}_m{tile_rows}_f32", kind.0);
        self.launch("qgemm", &kernel, cfg, &args)?;
        Ok(Some(()))
    }

    fn upload_int4(
        &self,
        f: Int4Format,
        packed: &[u8],
        scales: &[f16],
        mins: &[f16],
    ) -> Result<DeviceMatrix<DeviceBuffer<'_>>> {
        Ok(DeviceMatrix::Int4 {
            packed: self.up(packed)?,
            scales: self.up(scales)?,
            mins: (!f.symmetric).then(|| self.up(mins)).transpose()?,
            group: f.group as u32,
        })
    }
}

/// `rt` behind a caching allocator: a step reuses the last step's device memory.
fn caching(rt: Arc<dyn KernelRuntime>) -> Arc<dyn KernelRuntime> {
    use super::caching::{Caching, DEFAULT_CACHE_BYTES};
    Arc::new(Caching::new(rt, DEFAULT_CACHE_BYTES))
}

/// Into how many chunks of k a tensor-core GEMM of `column_tiles` tiles of 64 output
/// columns and `steps` k steps is cut: as split-K for a decode batch, about `blocks_wanted`
/// blocks, at least two steps per chunk, at most 16 chunks (each split writes a partial
/// output).
fn gemm_chunks(column_tiles: usize, steps: usize, blocks_wanted: usize) -> usize {
    blocks_wanted
        .div_ceil(column_tiles.max(1))
        .min(steps / 2)
        .clamp(1, 16)
}

/// A matmul weight as the kernels read it (see [`CudaBackend::upload_matrix`]), in memory of
/// one op ([`DeviceBuffer`]) or of a prepared weight ([`OwnedBuffer`]).
enum DeviceMatrix<B> {
    /// Dense rows and the kernel-name suffix of their type.
    Dense(B, &'static str),
    /// Planar int4 codes, f16 scales, f16 offsets (asymmetric only), group size.
    Int4 {
        packed: B,
        scales: B,
        mins: Option<B>,
        group: u32,
    },
    /// int8 codes and one f32 scale per `group` values of a row.
    Int8 { codes: B, scales: B, group: u32 },
}

impl<B> DeviceMatrix<B> {
    fn map<C>(self, mut f: impl FnMut(B) -> C) -> DeviceMatrix<C> {
        match self {
            DeviceMatrix::Dense(b, ty) => DeviceMatrix::Dense(f(b), ty),
            DeviceMatrix::Int4 {
                packed,
                scales,
                mins,
                group,
            } => DeviceMatrix::Int4 {
                packed: f(packed),
                scales: f(scales),
                mins: mins.map(&mut f),
                group,
            },
            DeviceMatrix::Int8 {
                codes,
                scales,
                group,
            } => DeviceMatrix::Int8 {
                codes: f(codes),
                scales: f(scales),
                group,
            },
        }
    }
}

/// Device memory a kernel argument can point at.
trait DeviceMem {
    fn arg(&self) -> Arg;
}

impl DeviceMem for DeviceBuffer<'_> {
    fn arg(&self) -> Arg {
        DeviceBuffer::arg(self)
    }
}

/// Device memory that lives as long as its owner (a prepared weight, a KV device copy), not
/// one op.
struct OwnedBuffer {
    rt: Arc<dyn KernelRuntime>,
    ptr: u64,
}

impl DeviceMem for OwnedBuffer {
    fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr)
    }
}

impl Drop for OwnedBuffer {
    fn drop(&mut self) {
        self.rt.free(self.ptr);
    }
}

/// A weight on one runtime's device, attached to it at load (and freed with it): the matmul
/// form (`prepare_weight`) and the row-gather form (`prepare_embedding`), each uploaded at
/// load or by the first op that needs it (a tied LM head has both). Ops that meet an
/// unprepared weight, or one prepared on another device, upload it for the op.
struct ResidentWeight {
    rt: Arc<dyn KernelRuntime>,
    matrix: OnceLock<DeviceMatrix<OwnedBuffer>>,
    rows: OnceLock<(OwnedBuffer, &'static str)>,
}

/// A [`Tensor`]'s values in one runtime's device memory: its device copy.
struct DeviceF32 {
    buf: OwnedBuffer,
    len: usize,
}

impl DeviceTensor for DeviceF32 {
    fn download(&self, out: &mut [f32]) -> Result<()> {
        check("download", out.len() <= self.len, || {
            format!("{} floats out of {}", out.len(), self.len)
        })?;
        let bytes = super::runtime::bytes_of_mut(out);
        Ok(self.buf.rt.dtoh(self.buf.ptr, bytes)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// An op's input on the device (see `CudaBackend::input`).
enum Input<'b> {
    /// A tensor's device copy.
    Resident(Arg),
    /// Uploaded for this op.
    ForOp(DeviceBuffer<'b>),
}

impl Input<'_> {
    fn arg(&self) -> Arg {
        match self {
            Input::Resident(a) => *a,
            Input::ForOp(b) => b.arg(),
        }
    }
}

/// A layer's K and V pools on one runtime's device, attached to the layer (`KvLayer`'s
/// device slot) by the first attention or write over it. This backend's `write_kv` stores
/// new slots there only (the host pools go stale until read); any change to the host pools
/// drops it.
struct ResidentKv {
    rt: Arc<dyn KernelRuntime>,
    pools: DeviceKv<OwnedBuffer>,
}

impl crate::attention::DevicePools for ResidentKv {
    fn download(&self, k: &mut KvData, v: &mut KvData) -> Result<()> {
        let host = k.planes_mut().into_iter().chain(v.planes_mut());
        for ((buf, _), plane) in self.pools.planes.iter().zip(host) {
            self.rt.dtoh(buf.ptr, plane)?;
        }
        Ok(())
    }

    fn copy_slots(&self, src: usize, dst: usize, slots: usize) -> Result<()> {
        for (buf, row_bytes) in &self.pools.planes {
            let bytes = slots * row_bytes;
            let blocks = (bytes as u32).div_ceil(256).clamp(1, 1024);
            let args = [
                Arg::Ptr(buf.ptr + (src * row_bytes) as u64),
                Arg::Ptr(buf.ptr + (dst * row_bytes) as u64),
                Arg::U32(bytes as u32),
            ];
            let cfg = LaunchConfig::linear(blocks, 256);
            self.rt.launch("elementwise", "copy_u8", &cfg, &args)?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A layer's pools on the device in their host form: each array of K, then of V
/// (`KvData::planes`), with its bytes per token slot.
struct DeviceKv<B> {
    planes: Vec<(B, usize)>,
    dtype: KvDtype,
    /// int8: log2 of the values per scale.
    shift: u32,
}

/// Dense rows and the kernel-name suffix of their type: what a matmul on them needs.
struct Dense<'a, B>(&'a B, &'a str);
/// See [`DeviceMatrix::quantized_args`].
type QuantizedArgs<'a, B> = std::result::Result<GemmArgs, Dense<'a, B>>;
/// A matmul kernel's name part, leading arguments and group size.
type GemmArgs = (&'static str, Vec<Arg>, u32);

impl<B: DeviceMem> DeviceMatrix<B> {
    /// For a quantized matrix, what its GEMV and GEMM kernels share: the name part (`w4`,
    /// `w8`), the leading arguments (x, the weight's arrays, bias, out) and the group size.
    /// Dense rows are handed back as they are.
    fn quantized_args(&self, x: Arg, bias: Arg, out: Arg) -> QuantizedArgs<'_, B> {
        match self {
            DeviceMatrix::Dense(wb, ty) => Err(Dense(wb, ty)),
            DeviceMatrix::Int4 {
                packed,
                scales,
                mins,
                group,
            } => {
                let mins = mins.as_ref().map_or(Arg::Ptr(0), |m| m.arg());
                let args = vec![x, packed.arg(), scales.arg(), mins, bias, out];
                Ok(("w4", args, *group))
            }
            DeviceMatrix::Int8 {
                codes,
                scales,
                group,
            } => Ok(("w8", vec![x, codes.arg(), scales.arg(), bias, out], *group)),
        }
    }

    /// What the tensor-core GEMM's kernels take, as `quantized_args`, for a quantized
    /// matrix or dense f16/bf16 rows of `k` values, 16-byte aligned (`wf16`, `wbf16`: no
    /// scales, no group); `None` for f32 rows (the GEMM would round them to f16) and
    /// unaligned ones.
    fn gemm_args(&self, x: Arg, bias: Arg, out: Arg, k: usize) -> Option<GemmArgs> {
        let kind = self.gemm_kind(k)?;
        match self.quantized_args(x, bias, out) {
            Ok(quantized) => Some(quantized),
            Err(Dense(wb, _)) => Some((kind, vec![x, wb.arg(), bias, out], 0)),
        }
    }

    /// The name part of the GEMM kernels that read this matrix (rows of `k` values), if any
    /// do: see `gemm_args`.
    fn gemm_kind(&self, k: usize) -> Option<&'static str> {
        match self {
            DeviceMatrix::Int4 { .. } => Some("w4"),
            DeviceMatrix::Int8 { .. } => Some("w8"),
            DeviceMatrix::Dense(_, "f16") if k.is_multiple_of(8) => Some("wf16"),
            DeviceMatrix::Dense(_, "bf16") if k.is_multiple_of(8) => Some("wbf16"),
            DeviceMatrix::Dense(..) => None,
        }
    }
}

impl<B: DeviceMem> DeviceKv<B> {
    /// The cache arguments of the attention kernels, and their name's suffix.
    fn args(&self) -> (Vec<Arg>, &'static str) {
        let mut args: Vec<Arg> = self.planes.iter().map(|(b, _)| b.arg()).collect();
        let suffix = match self.dtype {
            KvDtype::F32 => "",
            KvDtype::F16 => "_kv_f16",
            KvDtype::Int8 => {
                args.push(Arg::U32(self.shift));
                "_kv_int8"
            }
        };
        (args, suffix)
    }
}

/// A layer's pools as one op reads them on the device.
enum KvOnDevice<'c> {
    Resident(&'c ResidentKv),
    /// Uploaded for this op (the layer holds another backend's copy).
    ForOp(DeviceKv<DeviceBuffer<'c>>),
}

impl KvOnDevice<'_> {
    fn args(&self) -> (Vec<Arg>, &'static str) {
        match self {
            KvOnDevice::Resident(m) => m.pools.args(),
            KvOnDevice::ForOp(pools) => pools.args(),
        }
    }
}

/// Threads for a row of `width` elements: a multiple of 32, at most [`ROW_THREADS`].
fn row_threads(width: usize) -> u32 {
    (width.div_ceil(32) * 32).clamp(32, ROW_THREADS as usize) as u32
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        &self.name
    }

    /// Uploads the weight in its matmul form, once: every later op reads it there.
    fn prepare_weight(&self, w: &mut Weight) -> Result<()> {
        let w = self.attach_resident(w);
        let r = self.resident(w).expect("attached");
        self.matrix_of(r, w).map(|_| ())
    }

    /// Uploads the table in its row-gather form, once: every later lookup reads it there.
    fn prepare_embedding(&self, table: &mut Weight) -> Result<()> {
        let table = self.attach_resident(table);
        let r = self.resident(table).expect("attached");
        self.rows_of(r, table).map(|_| ())
    }

    fn embedding(&self, table: &Weight, tokens: &[u32], out: &mut Tensor) -> Result<()> {
        shapes::embedding(table, tokens, out)?;
        let width = table.cols;
        if tokens.is_empty() {
            return Ok(());
        }
        let for_op;
        let (w, ty) = match self.resident(table) {
            Some(r) => {
                let (buf, ty) = self.rows_of(r, table)?;
                (buf.arg(), *ty)
            }
            None => {
                for_op = self.upload_rows(table)?;
                (for_op.0.arg(), for_op.1)
            }
        };
        let td = self.array("tokens", tokens)?;
        let od = self.output(out)?;
        let cfg = LaunchConfig::linear(tokens.len() as u32, row_threads(width));
        let args = [w, td.arg(), od, Arg::U32(width as u32)];
        self.launch("elementwise", &format!("embedding_f32_{ty}"), cfg, &args)
    }

    fn add_rms_norm(
        &self,
        residual: &mut Tensor,
        delta: Option<&Tensor>,
        weight: &Tensor,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        let width = weight.len();
        let rows = shapes::add_rms_norm(residual, delta, weight, out)?;
        if rows == 0 {
            return Ok(());
        }
        let dd = delta.map(|d| self.input(d)).transpose()?;
        let wd = self.input(weight)?;
        // The kernel adds the delta into the residual, or only reads the residual.
        let read_only;
        let rd = match dd {
            Some(_) => self.in_place(residual)?,
            None => {
                read_only = self.input(residual)?;
                read_only.arg()
            }
        };
        let od = self.output(out)?;
        let cfg = LaunchConfig::linear(rows as u32, row_threads(width));
        let args = [
            rd,
            dd.as_ref().map_or(Arg::Ptr(0), |d| d.arg()),
            wd.arg(),
            Arg::F32(eps),
            od,
            Arg::U32(width as u32),
        ];
        self.launch("norm", "add_rms_norm_f32", cfg, &args)
    }

    /// Quantized parts on the tensor cores go as one grouped launch; anything else one by one.
    fn matmul_many(&self, x: &Tensor, parts: &mut [MatmulPart]) -> Result<()> {
        let k = parts.first().map_or(0, |p| p.w.cols);
        for p in parts.iter() {
            check("matmul", p.w.cols == k, || {
                format!("weights of {} and {k} columns in one call", p.w.cols)
            })?;
            shapes::matmul(x, p.w, p.bias, p.out)?;
        }
        if self.grouped_gemm(x, parts)?.is_some() {
            return Ok(());
        }
        for p in parts.iter_mut() {
            self.matmul(x, p.w, p.bias, p.out)?;
        }
        Ok(())
    }

    fn matmul(
        &self,
        x: &Tensor,
        w: &Weight,
        bias: Option<&Tensor>,
        out: &mut Tensor,
    ) -> Result<()> {
        let (k, n) = (w.cols, w.rows);
        let rows = shapes::matmul(x, w, bias, out)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let xd = self.input(x)?;
        let bd = bias.map(|b| self.input(b)).transpose()?;
        let bias = bd.as_ref().map_or(Arg::Ptr(0), |b| b.arg());
        let args = (xd.arg(), bias, self.output(out)?);
        match self.resident(w) {
            Some(r) => self.launch_matmul(self.matrix_of(r, w)?, args, (rows, k, n)),
            None => self.launch_matmul(&self.upload_matrix(w)?, args, (rows, k, n)),
        }
    }

    fn rotary(&self, x: &mut Tensor, positions: &[u32], n_heads: usize, rope: &Rope) -> Result<()> {
        shapes::rotary(x, positions, n_heads, rope)?;
        let hd = rope.head_dim;
        if positions.is_empty() || n_heads == 0 || hd == 0 {
            return Ok(());
        }
        let xd = self.in_place(x)?;
        let pd = self.array("positions", positions)?;
        let fd = self.array("inv_freq", &rope.inv_freq)?;
        let cfg = LaunchConfig::linear(positions.len() as u32, 128);
        let args = [
            xd,
            pd.arg(),
            fd.arg(),
            Arg::U32(n_heads as u32),
            Arg::U32(hd as u32),
        ];
        self.launch("elementwise", "rotary_f32", cfg, &args)
    }

    fn write_kv(
        &self,
        cache: &mut KvLayer,
        k: &Tensor,
        v: &Tensor,
        slot_mapping: &[u32],
    ) -> Result<()> {
        shapes::write_kv(cache, k, v, slot_mapping)?;
        let t = slot_mapping.len();
        if t == 0 {
            return Ok(());
        }
        let width = cache.slot_width();
        let mirror = self.kv_to_write(cache)?;
        let (kd, vd) = (self.input(k)?, self.input(v)?);
        let sd = self.array("slot_mapping", slot_mapping)?;
        let mut args = vec![kd.arg(), vd.arg()];
        args.extend(mirror.pools.planes.iter().map(|(b, _)| b.arg()));
        args.extend([sd.arg(), Arg::U32(width as u32)]);
        let kernel = match mirror.pools.dtype {
            KvDtype::F32 => "write_kv_f32",
            KvDtype::F16 => "write_kv_f16",
            KvDtype::Int8 => {
                args.push(Arg::U32(1 << mirror.pools.shift));
                "write_kv_int8"
            }
        };
        let cfg = LaunchConfig::linear(t as u32, row_threads(width));
        self.launch("elementwise", kernel, cfg, &args)?;
        cache.mark_written_on_device();
        Ok(())
    }

    /// Rotary and the KV write in one launch (`rotary_write_kv_*`), with the same arithmetic
    /// as `rotary` then `write_kv`.
    fn rotary_write_kv(
        &self,
        (q, k, v): (&mut Tensor, &mut Tensor, &Tensor),
        n_heads: usize,
        rope: &Rope,
        cache: &mut KvLayer,
        batch: &BatchLayout,
    ) -> Result<()> {
        let n_kv = cache.n_kv_heads;
        shapes::rotary(q, &batch.positions, n_heads, rope)?;
        shapes::rotary(k, &batch.positions, n_kv, rope)?;
        shapes::write_kv(cache, k, v, &batch.slot_mapping)?;
        let (t, hd) = (batch.slot_mapping.len(), rope.head_dim);
        if t == 0 || hd == 0 || n_heads == 0 {
            // Degenerate shapes: the separate ops know what each has to do.
            let qkv = (q, k, v);
            return crate::rotary_then_write_kv(self, qkv, n_heads, rope, cache, batch);
        }
        let mirror = self.kv_to_write(cache)?;
        let (qd, kd, vd) = (self.in_place(q)?, self.in_place(k)?, self.input(v)?);
        let mut args = vec![qd, kd, vd.arg()];
        args.extend(mirror.pools.planes.iter().map(|(b, _)| b.arg()));
        let pd = self.array("positions", &batch.positions)?;
        let fd = self.array("inv_freq", &rope.inv_freq)?;
        let sd = self.array("slot_mapping", &batch.slot_mapping)?;
        args.extend([pd.arg(), fd.arg(), sd.arg()]);
        args.extend([n_heads, n_kv, hd].map(|v| Arg::U32(v as u32)));
        let kernel = match mirror.pools.dtype {
            KvDtype::F32 => "rotary_write_kv_f32",
            KvDtype::F16 => "rotary_write_kv_f16",
            KvDtype::Int8 => {
                args.push(Arg::U32(1 << mirror.pools.shift));
                "rotary_write_kv_int8"
            }
        };
        let cfg = LaunchConfig::linear(t as u32, 128);
        self.launch("elementwise", kernel, cfg, &args)?;
        cache.mark_written_on_device();
        Ok(())
    }

    fn attention(
        &self,
        q: &Tensor,
        cache: &KvLayer,
        batch: &BatchLayout,
        n_heads: usize,
        out: &mut Tensor,
    ) -> Result<()> {
        shapes::attention(q, cache, batch, n_heads, out)?;
        let (hd, n_kv) = (cache.head_dim, cache.n_kv_heads);
        let t = batch.num_tokens();
        check("attention", hd <= 2 * ATTENTION_THREADS as usize, || {
            format!(
                "head_dim {hd}: the CUDA kernel takes at most {}",
                2 * ATTENTION_THREADS
            )
        })?;
        if t == 0 {
            return Ok(());
        }
        let seq_of = batch.seq_of_token();
        // A recorded step's block tables are as wide as its key says, whatever the batch's.
        let (tables, max_blocks) = match self.recording_key() {
            Some(key) => (
                batch.block_tables_with_width(key.table_width),
                key.table_width,
            ),
            None => batch.flat_block_tables(),
        };
        let qd = self.input(q)?;
        let kv = self.kv_on_device(cache)?;
        let (kv_args, kv_kind) = kv.args();
        let (pd, sd, td) = (
            self.array("positions", &batch.positions)?,
            self.array("seq_of_token", &seq_of)?,
            self.array("block_tables", &tables)?,
        );
        let od = self.output(out)?;
        let shared_bytes = (hd as u32 + ATTENTION_THREADS) * 4;
        let scale = Arg::F32(1.0 / (hd as f32).sqrt());
        let layout = [
            pd.arg(),
            sd.arg(),
            td.arg(),
            Arg::U32(max_blocks as u32),
            Arg::U32(n_heads as u32),
            Arg::U32(n_kv as u32),
            Arg::U32(hd as u32),
            Arg::U32(cache.block_size as u32),
            scale,
        ];
        let longest = batch.positions.iter().max().map_or(0, |&p| p + 1);
        let splits = longest.div_ceil(self.split_keys);
        if splits > 1 {
            let heads = t * n_heads;
            let floats = heads * splits as usize * (2 + hd);
            let mut scratch = self
                .attention_scratch
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let (part, counters) = scratch.for_split(self, floats, heads)?;
            let mut args = vec![qd.arg()];
            args.extend(kv_args);
            args.extend([part, counters, od]);
            args.extend(layout);
            args.push(Arg::U32(self.split_keys));
            let cfg = LaunchConfig {
                grid: (t as u32, n_heads as u32, splits),
                block: (ATTENTION_THREADS, 1, 1),
                shared_bytes,
            };
            let kernel = format!("attention_split_f32{kv_kind}");
            return self.launch("attention", &kernel, cfg, &args);
        }
        let cfg = LaunchConfig {
            grid: (t as u32, n_heads as u32, 1),
            block: (ATTENTION_THREADS, 1, 1),
            shared_bytes,
        };
        let mut args = vec![qd.arg()];
        args.extend(kv_args);
        args.push(od);
        args.extend(layout);
        self.launch("attention", &format!("attention_f32{kv_kind}"), cfg, &args)
    }

    /// On the device, with the embedding lookup's kernel (`x` as a table of rows).
    fn gather_rows(&self, x: &Tensor, width: usize, rows: &[u32], out: &mut Tensor) -> Result<()> {
        shapes::gather_rows(x, width, rows, out)?;
        if rows.is_empty() {
            return Ok(());
        }
        let xd = self.input(x)?;
        let rd = self.array("gathered_rows", rows)?;
        let od = self.output(out)?;
        let cfg = LaunchConfig::linear(rows.len() as u32, row_threads(width));
        let args = [xd.arg(), rd.arg(), od, Arg::U32(width as u32)];
        self.launch("elementwise", "embedding_f32_f32", cfg, &args)
    }

    fn silu_mul(&self, gate: &mut Tensor, up: &Tensor) -> Result<()> {
        shapes::silu_mul(gate, up)?;
        if gate.is_empty() {
            return Ok(());
        }
        let n = gate.len();
        let ud = self.input(up)?;
        let gd = self.in_place(gate)?;
        let blocks = (n as u32).div_ceil(256).min(1024);
        let args = [gd, ud.arg(), Arg::U32(n as u32)];
        self.launch(
            "elementwise",
            "silu_mul_f32",
            LaunchConfig::linear(blocks, 256),
            &args,
        )
    }

    /// On tensor cores, one launch (`gemm_*_silu_*`) that computes silu(gate) · up as it
    /// loads its rows: the same bits as the two ops. `gate` keeps its input. Otherwise (the
    /// GEMV, f32 or unprepared weights) the two ops.
    fn silu_mul_matmul(
        &self,
        gate: &mut Tensor,
        up: &Tensor,
        w: &Weight,
        out: &mut Tensor,
    ) -> Result<()> {
        shapes::silu_mul(gate, up)?;
        let (k, n) = (w.cols, w.rows);
        let rows = shapes::matmul(gate, w, None, out)?;
        if let Some(r) = self.resident(w).filter(|_| n > 0 && self.on_gemm(rows)) {
            let matrix = self.matrix_of(r, w)?;
            if matrix.gemm_kind(k).is_some() {
                let (gd, ud) = (self.input(gate)?, self.input(up)?);
                let x = GemmRows::SiluOf {
                    gate: gd.arg(),
                    up: ud.arg(),
                };
                let od = self.output(out)?;
                return self.launch_gemm(matrix, (x, Arg::Ptr(0), od), (rows, k, n));
            }
        }
        self.silu_mul(gate, up)?;
        self.matmul(gate, w, None, out)
    }

    fn log_softmax(&self, x: &mut Tensor, width: usize) -> Result<()> {
        let rows = shapes::rows_of("log_softmax", x.len(), width)?;
        if rows == 0 {
            return Ok(());
        }
        let xd = self.in_place(x)?;
        let cfg = LaunchConfig::linear(rows as u32, row_threads(width));
        self.launch(
            "norm",
            "log_softmax_f32",
            cfg,
            &[xd, Arg::U32(width as u32)],
        )
    }

    fn pick_rows(&self, x: &Tensor, width: usize, targets: &[u32], out: &mut Tensor) -> Result<()> {
        shapes::pick_rows(x, width, targets, out)?;
        if targets.is_empty() {
            return Ok(());
        }
        let xd = self.input(x)?;
        let td = self.array("pick_targets", targets)?;
        let od = self.output(out)?;
        let cfg = LaunchConfig::linear(targets.len() as u32, row_threads(width));
        let args = [xd.arg(), Arg::U32(width as u32), td.arg(), od];
        self.launch("norm", "pick_rows_f32", cfg, &args)
    }

    fn top_rows(
        &self,
        x: &Tensor,
        width: usize,
        rows: &[u32],
        k: usize,
        out: &mut Tensor,
    ) -> Result<()> {
        shapes::top_rows(x, width, rows, k, out)?;
        if rows.is_empty() || k == 0 {
            return Ok(());
        }
        let xd = self.input(x)?;
        let rd = self.array("top_rows", rows)?;
        let od = self.output(out)?;
        let cfg = LaunchConfig::linear(rows.len() as u32, row_threads(width));
        let args = [
            xd.arg(),
            Arg::U32(width as u32),
            rd.arg(),
            Arg::U32(k as u32),
            od,
        ];
        self.launch("norm", "top_rows_f32", cfg, &args)
    }

    fn step_graph_key(&self, inputs: &StepInputs) -> Option<GraphKey> {
        self.graph_key(inputs)
    }

    fn begin_step_record(&self, key: GraphKey, inputs: &StepInputs) -> Result<()> {
        self.begin_record(key, inputs)
    }

    fn end_step_record(
        &self,
        output: Option<&Tensor>,
        kv: &[KvLayer],
    ) -> Result<Box<dyn RecordedStep>> {
        self.end_record(output, kv)
    }

    fn replay_step(
        &self,
        step: &dyn RecordedStep,
        inputs: &StepInputs,
        kv: &mut [KvLayer],
    ) -> Result<Option<Vec<f32>>> {
        self.replay(step, inputs, kv)
    }
}

#[cfg(test)]
mod tests {
    use super::{gemm_chunks, ROW_THREADS};

    /// `top_rows_f32` sizes its shared memory for at most `ROW_THREADS` threads and
    /// `pick::MAX_RANKED` candidates: the CUDA source's constants must say the same.
    #[test]
    fn top_rows_kernel_constants_match_the_host() {
        let norm = crate::cuda::sources::module("norm").unwrap().source;
        for line in [
            format!("#define TOP_ROWS_THREADS {ROW_THREADS}"),
            format!("#define TOP_ROWS_MAX_K {}", crate::pick::MAX_RANKED),
        ] {
            assert!(norm.contains(&line), "norm.cu lacks `{line}`");
        }
    }

    #[test]
    fn gemm_chunks_fill_the_device_within_their_bounds() {
        // A decode matmul of 64 column tiles on 132 multiprocessors: 528 blocks wanted.
        assert_eq!(gemm_chunks(64, 64, 4 * 132), 9);
        // Never fewer than two k steps a chunk, nor more than 16 chunks, nor none.
        assert_eq!(gemm_chunks(1, 9, 32), 4);
        assert_eq!(gemm_chunks(1, 1000, 4 * 132), 16);
        assert_eq!(gemm_chunks(1, 1, 4 * 132), 1);
        assert_eq!(gemm_chunks(10_000, 64, 4 * 132), 1);
    }
}
