//! Model weights and KV pools stay on the device: after `prepare_weight`, a matmul or an
//! embedding uploads its activations only, and gives exactly what the per-op upload gave;
//! after the first attention over a layer, its pools are not sent again until something
//! else changes them. Under the CPU emulator always; on GPU 0 too when it is usable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vellum_kernels::cpu::Cpu;
use vellum_kernels::cuda::emu::EmuRuntime;
use vellum_kernels::cuda::{driver, Arg, CudaBackend, CudaError, KernelRuntime, LaunchConfig};
use vellum_kernels::{Backend, BatchLayout, KvDtype, KvLayer, QuantTarget, Weight};
use vellum_quant::DType;

/// A runtime that counts the bytes copied to the device.
struct Counting {
    inner: Arc<dyn KernelRuntime>,
    uploaded: AtomicUsize,
}

impl Counting {
    fn take(&self) -> usize {
        self.uploaded.swap(0, Ordering::SeqCst)
    }
}

impl KernelRuntime for Counting {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn multiprocessors(&self) -> u32 {
        self.inner.multiprocessors()
    }
    fn alloc(&self, bytes: usize) -> Result<u64, CudaError> {
        self.inner.alloc(bytes)
    }
    fn free(&self, ptr: u64) {
        self.inner.free(ptr)
    }
    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        self.uploaded.fetch_add(src.len(), Ordering::SeqCst);
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
}

/// The emulator, and GPU 0 when usable, each behind a counter.
fn runtimes() -> Vec<Arc<Counting>> {
    let mut inner: Vec<Arc<dyn KernelRuntime>> = vec![Arc::new(
        EmuRuntime::new().expect("the CUDA emulator needs g++"),
    )];
    match driver::probe(0) {
        Ok(()) => inner.push(Arc::new(driver::CudaRuntime::new(0).expect("GPU 0 probed"))),
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "GPU check SKIPPED (emulator only): {e}");
        }
    }
    inner
        .into_iter()
        .map(|inner| {
            Arc::new(Counting {
                inner,
                uploaded: AtomicUsize::new(0),
            })
        })
        .collect()
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 0.5)
        .collect()
}

/// Every matmul weight form (dense f16, int4 from Q4_0 blocks, int8 from Q8_0 blocks and per
/// channel): after `prepare_weight` a matmul uploads only its activations and gives the same
/// bits; a backend on another runtime ignores the copy and uploads for the op, still right.
#[test]
fn prepared_weights_are_uploaded_once_and_give_the_same_results() {
    let (rows, cols, t) = (72, 96, 3);
    let dense = Weight::dense(rows, cols, DType::F16, &values(rows * cols, 1)).unwrap();
    let formats = [
        ("f16", dense.clone()),
        (
            "q4_0",
            dense.quantize(QuantTarget::parse("q4_0").unwrap()).unwrap(),
        ),
        (
            "q8_0",
            dense.quantize(QuantTarget::parse("q8_0").unwrap()).unwrap(),
        ),
        ("int8", dense.quantize(QuantTarget::Int8PerChannel).unwrap()),
    ];
    let x = values(t * cols, 2);
    for rt in runtimes() {
        let be = CudaBackend::new(rt.clone());
        let other = CudaBackend::emulated().unwrap();
        for (name, w) in &formats {
            let mut per_op = vec![0f32; t * rows];
            rt.take();
            be.matmul(&x, w, None, &mut per_op).unwrap();
            let first = rt.take();
            assert!(first >= w.bytes(), "{name}: {first} bytes for the op");

            let mut prepared = w.clone();
            be.prepare_weight(&mut prepared).unwrap();
            assert!(rt.take() >= w.bytes(), "{name}: uploaded at prepare");
            be.prepare_weight(&mut prepared).unwrap();
            assert_eq!(rt.take(), 0, "{name}: prepared twice, uploaded once");
            for _ in 0..2 {
                let mut out = vec![f32::NAN; t * rows];
                be.matmul(&x, &prepared, None, &mut out).unwrap();
                assert_eq!(rt.take(), x.len() * 4, "{name}: only x travels");
                assert_eq!(out, per_op, "{name}: prepared vs per-op upload");
            }
            let mut out = vec![f32::NAN; t * rows];
            other.matmul(&x, &prepared, None, &mut out).unwrap();
            assert_eq!(out, per_op, "{name}: another runtime's backend");
        }
    }
}

/// A prepared table (a tied LM head is one) uploads its gather form on first use as an
/// embedding, and not again.
#[test]
fn prepared_embedding_tables_upload_their_rows_once() {
    let (rows, cols) = (50, 64);
    let table = Weight::dense(rows, cols, DType::F32, &values(rows * cols, 3))
        .unwrap()
        .quantize(QuantTarget::parse("q8_0").unwrap())
        .unwrap();
    let tokens = [3u32, 49, 0, 3];
    for rt in runtimes() {
        let be = CudaBackend::new(rt.clone());
        let mut want = vec![0f32; tokens.len() * cols];
        be.embedding(&table, &tokens, &mut want).unwrap();
        let mut prepared = table.clone();
        be.prepare_weight(&mut prepared).unwrap();
        rt.take();
        let mut first = vec![f32::NAN; want.len()];
        be.embedding(&prepared, &tokens, &mut first).unwrap();
        assert!(rt.take() >= rows * cols * 4, "the rows go up on first use");
        let mut again = vec![f32::NAN; want.len()];
        be.embedding(&prepared, &tokens, &mut again).unwrap();
        assert_eq!(rt.take(), tokens.len() * 4, "then only the token ids");
        assert_eq!(first, want);
        assert_eq!(again, want);
    }
}

/// One sequence of 40 cached positions in blocks 2, 0, 3 (of 16), decoding at position 39:
/// its layout, and a pool of `dtype` filled with values.
fn decode_case(dtype: KvDtype) -> (KvLayer, BatchLayout) {
    let (n_kv, hd) = (2, 64);
    let mut cache = KvLayer::new(5, 16, n_kv, hd, dtype);
    let (k, v) = cache.pools_mut();
    k.write(0, &values(k.len(), 4));
    v.write(0, &values(v.len(), 5));
    let table = vec![2u32, 0, 3];
    let batch = BatchLayout {
        positions: vec![39],
        slot_mapping: vec![3 * 16 + 39 % 16],
        seq_offsets: vec![0, 1],
        block_tables: vec![table],
        context_lens: vec![40],
    };
    (cache, batch)
}

/// The KV pools go to the device once, as stored (f32, f16, or int8 codes and scales), on
/// the first attention over a layer; then a decode
/// step's write uploads its own slots and an attention its queries and batch layout, not
/// the pools, and both match the CPU. A change to the host pools by anything else
/// (`pools_mut`, `copy_block`) drops the device copy, and the next attention sends them
/// again.
#[test]
fn kv_pools_stay_on_the_device_between_ops() {
    let cpu = Cpu::new();
    let (n_heads, n_kv, hd) = (4, 2, 64);
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
        for rt in runtimes() {
            let be = CudaBackend::new(rt.clone());
            let (mut cache, batch) = decode_case(dtype);
            // Bytes of one pool as stored (values and int8 scales): the device copy's form.
            let slot_bytes = dtype.slot_bytes(n_kv, hd);
            let pool_bytes = cache.num_slots() * slot_bytes;
            let q = values(n_heads * hd, 6);
            let attend = |cache: &KvLayer| {
                let (mut got, mut want) = (vec![0f32; q.len()], vec![0f32; q.len()]);
                be.attention(&q, cache, &batch, n_heads, &mut got).unwrap();
                cpu.attention(&q, cache, &batch, n_heads, &mut want)
                    .unwrap();
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err < 1e-5,
                    "{dtype:?}: attention differs from the CPU's by {err}"
                );
            };
            rt.take();
            attend(&cache);
            assert!(
                rt.take() >= 2 * pool_bytes,
                "{dtype:?}: the pools go up once"
            );
            attend(&cache);
            let small = rt.take();
            assert!(
                small < pool_bytes / 4,
                "{dtype:?}: {small} bytes, pools stayed"
            );

            let (k, v) = (values(n_kv * hd, 7), values(n_kv * hd, 8));
            let mut host = cache.clone();
            be.write_kv(&mut cache, &k, &v, &batch.slot_mapping)
                .unwrap();
            cpu.write_kv(&mut host, &k, &v, &batch.slot_mapping)
                .unwrap();
            assert_eq!(
                cache.k(),
                host.k(),
                "{dtype:?}: the host pools stay the truth"
            );
            assert_eq!(
                rt.take(),
                2 * slot_bytes + 4,
                "{dtype:?}: one slot's K and V"
            );
            attend(&cache);
            assert!(
                rt.take() < pool_bytes / 4,
                "{dtype:?}: the write updated the copy"
            );

            cache
                .pools_mut()
                .1
                .write(16 * n_kv * hd, &values(n_kv * hd, 9));
            attend(&cache);
            assert!(
                rt.take() >= 2 * pool_bytes,
                "{dtype:?}: a host change, sent again"
            );
            cache.copy_block(3, 0);
            attend(&cache);
            assert!(
                rt.take() >= 2 * pool_bytes,
                "{dtype:?}: a copied block, sent again"
            );
        }
    }
}

/// The device-only entry points the kernel benchmark times: a matmul on buffers already on
/// the device gives what `Backend::matmul` gives (and nothing for no rows), an unprepared
/// weight or short buffers are errors that say so, and the copy kernel copies.
#[test]
fn device_only_matmul_and_copy_match_the_host_ops() {
    use vellum_kernels::cuda::DeviceBuffer;
    let (rows, cols, t) = (40, 64, 2);
    let w = Weight::dense(rows, cols, DType::F32, &values(rows * cols, 10))
        .unwrap()
        .quantize(QuantTarget::parse("q4_0").unwrap())
        .unwrap();
    let x = values(t * cols, 11);
    for rt in runtimes() {
        let be = CudaBackend::new(rt.clone());
        let mut want = vec![0f32; t * rows];
        be.matmul(&x, &w, None, &mut want).unwrap();
        let xd = DeviceBuffer::upload(be.runtime(), &x).unwrap();
        let od = DeviceBuffer::zeroed(be.runtime(), t * rows * 4).unwrap();
        let err = be.matmul_device(&w, &xd, &od, t).unwrap_err().to_string();
        assert!(err.contains("not prepared"), "{err}");
        let mut prepared = w.clone();
        be.prepare_weight(&mut prepared).unwrap();
        let err = be.matmul_device(&prepared, &xd, &od, t + 1).unwrap_err();
        assert!(err.to_string().contains("buffers of"), "{err}");
        // No rows: nothing to launch (a grid of zero blocks is a launch error on a GPU).
        be.matmul_device(&prepared, &xd, &od, 0).unwrap();
        be.matmul_device(&prepared, &xd, &od, t).unwrap();
        be.runtime().synchronize().unwrap();
        assert_eq!(od.to_vec::<f32>().unwrap(), want);

        let copy = DeviceBuffer::zeroed(be.runtime(), x.len() * 4).unwrap();
        be.copy_device(&xd, &copy, x.len()).unwrap();
        be.runtime().synchronize().unwrap();
        assert_eq!(copy.to_vec::<f32>().unwrap(), x);
    }
}
