//! Prepared weights stay on the device: after `prepare_weight`, a matmul or an embedding
//! uploads its activations only, and gives exactly what the per-op upload gave. Under the
//! CPU emulator always; on GPU 0 too when it is usable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vellum_kernels::cuda::emu::EmuRuntime;
use vellum_kernels::cuda::{driver, Arg, CudaBackend, CudaError, KernelRuntime, LaunchConfig};
use vellum_kernels::{Backend, QuantTarget, Weight};
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
