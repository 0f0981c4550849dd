//! What stays on the device: model weights after `prepare_weight` (a matmul or an embedding
//! uploads its activations only, and gives exactly what the per-op upload gave); a layer's
//! KV pools after the first attention over it (not sent again until something else changes
//! them); and activations from op to op (nothing comes back until the host reads it).
//! Under the CPU emulator always; on GPU 0 too when it is usable.

mod common;

use std::sync::Arc;
use vellum_kernels::cpu::Cpu;
use vellum_kernels::cuda::counting::Counting;
use vellum_kernels::cuda::emu::EmuRuntime;
use vellum_kernels::cuda::{driver, CudaBackend, KernelRuntime};
use vellum_kernels::{Backend, BatchLayout, KvDtype, KvLayer, QuantTarget, Tensor, Weight};
use vellum_quant::DType;

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
        .map(|inner| Arc::new(Counting::new(inner)))
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
        // A new tensor each time: a tensor the backend has read keeps its device copy.
        let matmul = |be: &CudaBackend, w: &Weight| {
            let mut out = Tensor::from(vec![f32::NAN; t * rows]);
            be.matmul(&Tensor::from(&x[..]), w, None, &mut out).unwrap();
            out
        };
        for (name, w) in &formats {
            rt.take_uploaded();
            let per_op = matmul(&be, w);
            let first = rt.take_uploaded();
            assert!(first >= w.bytes(), "{name}: {first} bytes for the op");

            let mut prepared = w.clone();
            be.prepare_weight(&mut prepared).unwrap();
            assert!(
                rt.take_uploaded() >= w.bytes(),
                "{name}: uploaded at prepare"
            );
            be.prepare_weight(&mut prepared).unwrap();
            assert_eq!(
                rt.take_uploaded(),
                0,
                "{name}: prepared twice, uploaded once"
            );
            let per_op = per_op.to_vec().unwrap();
            for _ in 0..2 {
                let out = matmul(&be, &prepared);
                assert_eq!(rt.take_uploaded(), x.len() * 4, "{name}: only x travels");
                assert_eq!(out.to_vec().unwrap(), per_op, "{name}: prepared vs per-op");
            }
            let out = matmul(&other, &prepared);
            assert_eq!(
                out.to_vec().unwrap(),
                per_op,
                "{name}: another runtime's backend"
            );
        }
    }
}

/// A prepared table (a tied LM head is one) uploads its gather form on first use as an
/// embedding, and not again; one prepared as a table (`prepare_embedding`) at load.
#[test]
fn prepared_embedding_tables_upload_their_rows_once() {
    let (rows, cols) = (50, 64);
    let table = Weight::dense(rows, cols, DType::F32, &values(rows * cols, 3))
        .unwrap()
        .quantize(QuantTarget::parse("q8_0").unwrap())
        .unwrap();
    // Each lookup other token ids: the same ones would not be sent again.
    let tokens = [[3u32, 49, 0, 3], [1, 2, 3, 4], [49, 48, 0, 0]];
    for rt in runtimes() {
        let be = CudaBackend::new(rt.clone());
        let embed = |table: &Weight, tokens: &[u32]| {
            let mut out = Tensor::zeros(tokens.len() * cols);
            be.embedding(table, tokens, &mut out).unwrap();
            out.to_vec().unwrap()
        };
        let want: Vec<Vec<f32>> = tokens.iter().map(|t| embed(&table, t)).collect();
        let mut prepared = table.clone();
        be.prepare_weight(&mut prepared).unwrap();
        rt.take_uploaded();
        assert_eq!(embed(&prepared, &tokens[1]), want[1]);
        assert!(
            rt.take_uploaded() >= rows * cols * 4,
            "the rows go up on first use"
        );
        assert_eq!(embed(&prepared, &tokens[2]), want[2]);
        assert_eq!(rt.take_uploaded(), 4 * 4, "then only the token ids");
        // Prepared as a table, at load: the rows go up then.
        let mut table_only = table.clone();
        be.prepare_embedding(&mut table_only).unwrap();
        assert!(
            rt.take_uploaded() >= rows * cols * 4,
            "the rows go up at load"
        );
        assert_eq!(embed(&table_only, &tokens[0]), want[0]);
        assert_eq!(rt.take_uploaded(), 4 * 4, "then only the token ids");
    }
}

/// One sequence of 40 cached positions in blocks 2, 0, 3 (of 16), decoding at position 39:
/// its layout, and a pool of `dtype` filled with values.
fn decode_case(dtype: KvDtype) -> (KvLayer, BatchLayout) {
    let (n_kv, hd) = (2, 64);
    let mut cache = KvLayer::new(5, 16, n_kv, hd, dtype);
    let (k, v) = cache.pools_mut().unwrap();
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

/// Flash-decoding attention (a context longer than a split) is one launch: the last split
/// of each token and head merges them. Its workspace stays on the device, each split writes
/// all of its part, so an attention after the first clears nothing. A sequence shorter than
/// a split leaves splits empty. The CPU's results, for every KV dtype.
#[test]
fn split_attention_is_one_launch_over_kept_scratch() {
    let cpu = Cpu::new();
    let (n_heads, n_kv, hd, bs) = (4, 2, 64, 16);
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
        for rt in runtimes() {
            let mut be = CudaBackend::new(rt.clone());
            be.set_split_keys(128);
            let mut cache = KvLayer::new(24, bs, n_kv, hd, dtype);
            let (k, v) = cache.pools_mut().unwrap();
            k.write(0, &values(k.len(), 4));
            v.write(0, &values(v.len(), 5));
            // 300 keys (three splits, the last partial) and 21 (two empty splits).
            let long: Vec<u32> = (0..19).collect();
            let batch = BatchLayout {
                positions: vec![299, 20],
                slot_mapping: vec![18 * 16 + 299 % 16, 21 * 16 + 4],
                seq_offsets: vec![0, 1, 2],
                block_tables: vec![long, vec![20, 21]],
                context_lens: vec![300, 21],
            };
            // A query of its own each call: an output left from the last would be wrong.
            for call in 0..2 {
                let q = Tensor::from(values(2 * n_heads * hd, 6 + call));
                let mut want = Tensor::zeros(q.len());
                cpu.attention(&q, &cache, &batch, n_heads, &mut want)
                    .unwrap();
                let want = want.to_vec().unwrap();
                rt.take_launches();
                rt.take_memsets();
                let mut got = Tensor::zeros(q.len());
                be.attention(&q, &cache, &batch, n_heads, &mut got).unwrap();
                assert_eq!(rt.take_launches(), 1, "{dtype:?} call {call}: one launch");
                if call > 0 {
                    assert_eq!(rt.take_memsets(), 0, "{dtype:?}: nothing cleared");
                }
                let err = common::max_abs_diff(&got.to_vec().unwrap(), &want);
                assert!(err < 1e-5, "{dtype:?} call {call}: {err} from the CPU's");
            }
        }
    }
}

/// The KV pools go to the device once, as stored (f32, f16, or int8 codes and scales), on
/// the first attention over a layer; then an attention sends its queries and batch layout,
/// not the pools, and a write stores its slots on the device only, as the host would have
/// (bit for bit, once brought back), sending nothing but its rows. The host pools are then
/// stale until read there (`host_pools`, `try_clone`), which brings them back once. A block
/// copy (copy-on-write) is made on the device too, and on the host unless it is stale. A
/// change to the host pools (`pools_mut`) drops the device copy, and the next attention
/// sends them again.
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
            // The CUDA backend's attention over `cache` against the CPU's over `host`.
            let attend = |cache: &KvLayer, host: &KvLayer| {
                let (mut got, mut want) = (Tensor::zeros(q.len()), Tensor::zeros(q.len()));
                let q = Tensor::from(&q[..]);
                be.attention(&q, cache, &batch, n_heads, &mut got).unwrap();
                cpu.attention(&q, host, &batch, n_heads, &mut want).unwrap();
                let (got, want) = (got.to_vec().unwrap(), want.to_vec().unwrap());
                let err = common::max_abs_diff(&got, &want);
                assert!(
                    err < 1e-5,
                    "{dtype:?}: attention differs from the CPU's by {err}"
                );
            };
            rt.take_uploaded();
            attend(&cache, &cache);
            assert!(
                rt.take_uploaded() >= 2 * pool_bytes,
                "{dtype:?}: the pools go up once"
            );
            attend(&cache, &cache);
            let small = rt.take_uploaded();
            assert!(
                small < pool_bytes / 4,
                "{dtype:?}: {small} bytes, pools stayed"
            );

            let write = |cache: &mut KvLayer, host: &mut KvLayer, seed: usize| {
                let k = Tensor::from(values(n_kv * hd, seed));
                let v = Tensor::from(values(n_kv * hd, seed + 1));
                be.write_kv(cache, &k, &v, &batch.slot_mapping).unwrap();
                cpu.write_kv(host, &k, &v, &batch.slot_mapping).unwrap();
            };
            let mut host = cache.try_clone().unwrap();
            rt.take_downloaded();
            write(&mut cache, &mut host, 7);
            assert_eq!(
                rt.take_uploaded(),
                2 * n_kv * hd * 4 + 4,
                "{dtype:?}: the new rows (from the host here) and the slot mapping, no pools"
            );
            assert_eq!(rt.take_downloaded(), 0, "{dtype:?}: nothing comes back");
            assert!(
                cache.host_is_stale(),
                "{dtype:?}: written on the device only"
            );
            attend(&cache, &host);
            assert!(
                rt.take_uploaded() < pool_bytes / 4,
                "{dtype:?}: the write updated the copy"
            );
            rt.take_downloaded(); // the attention's output
            let twin = cache.try_clone().unwrap();
            assert_eq!(
                rt.take_downloaded(),
                2 * pool_bytes,
                "{dtype:?}: one download"
            );
            assert!(!twin.host_is_stale() && cache.host_is_stale());
            assert_eq!(
                cache.host_pools().unwrap(),
                host.host_pools().unwrap(),
                "{dtype:?}: the device stored the host's bits"
            );
            assert!(!cache.host_is_stale());
            attend(&cache, &twin);
            assert!(
                rt.take_uploaded() < pool_bytes / 4,
                "{dtype:?}: read back, the device copy stays"
            );

            for (c, value) in [(&mut cache, 9), (&mut host, 9)] {
                let (_, v) = c.pools_mut().unwrap();
                v.write(16 * n_kv * hd, &values(n_kv * hd, value));
            }
            attend(&cache, &host);
            assert!(
                rt.take_uploaded() >= 2 * pool_bytes,
                "{dtype:?}: a host change, sent again"
            );
            // A copy-on-write after a device write: on the device alone, nothing moved.
            write(&mut cache, &mut host, 11);
            rt.take_uploaded();
            rt.take_downloaded();
            cache.copy_block(3, 0).unwrap();
            host.copy_block(3, 0).unwrap();
            let moved = rt.take_uploaded() + rt.take_downloaded();
            assert_eq!(moved, 0, "{dtype:?}: a block copied on the device");
            assert!(cache.host_is_stale());
            attend(&cache, &host);
            assert!(
                rt.take_uploaded() < pool_bytes / 4,
                "{dtype:?}: the pools stayed"
            );
            assert_eq!(
                cache.host_pools().unwrap(),
                host.host_pools().unwrap(),
                "{dtype:?}: a block copied after a device write, brought back"
            );
            // With the host in step: copied on both sides, the device copy kept.
            cache.copy_block(0, 2).unwrap();
            host.copy_block(0, 2).unwrap();
            assert!(!cache.host_is_stale());
            attend(&cache, &host);
            assert!(
                rt.take_uploaded() < pool_bytes / 4,
                "{dtype:?}: the pools stayed"
            );
            // The read-back, the two attentions' outputs, and no more: nothing for the copy.
            let read_back = 2 * pool_bytes + 2 * q.len() * 4;
            assert_eq!(
                rt.take_downloaded(),
                read_back,
                "{dtype:?}: bytes brought back"
            );
            assert_eq!(
                cache.host_pools().unwrap(),
                host.host_pools().unwrap(),
                "{dtype:?}: a block copied on both sides"
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
        let mut want = Tensor::zeros(t * rows);
        be.matmul(&Tensor::from(&x[..]), &w, None, &mut want)
            .unwrap();
        let want = want.to_vec().unwrap();
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

/// A forward pass's activations stay on the device: a chain of ops (norm, matmuls, SiLU,
/// norm with a residual add) uploads its first input and the norm's weights only, and
/// downloads nothing until the host reads a result, which matches the CPU's. A second
/// chain reuses the norm's weights where the first left them.
#[test]
fn activations_stay_on_the_device_from_op_to_op() {
    let cpu = Cpu::new();
    let (t, h, f) = (3, 64, 96);
    let up_w = Weight::dense(f, h, DType::F16, &values(f * h, 12)).unwrap();
    let down_w = Weight::dense(h, f, DType::F16, &values(h * f, 13)).unwrap();
    let norm = Tensor::from(values(h, 14));
    let residual = values(t * h, 15);
    // One MLP block: returns the residual stream and the next norm's output.
    let block = |be: &dyn Backend, up: &Weight, down: &Weight| {
        let mut residual = Tensor::from(&residual[..]);
        let mut normed = Tensor::zeros(t * h);
        let (mut gate, mut up_out) = (Tensor::zeros(t * f), Tensor::zeros(t * f));
        let mut delta = Tensor::zeros(t * h);
        be.add_rms_norm(&mut residual, None, &norm, 1e-5, &mut normed)
            .unwrap();
        be.matmul(&normed, up, None, &mut gate).unwrap();
        be.matmul(&normed, up, None, &mut up_out).unwrap(); // the gate's weight too
        be.silu_mul(&mut gate, &up_out).unwrap();
        be.matmul(&gate, down, None, &mut delta).unwrap();
        be.add_rms_norm(&mut residual, Some(&delta), &norm, 1e-5, &mut normed)
            .unwrap();
        (residual, normed)
    };
    let (want_res, want_out) = block(&cpu, &up_w, &down_w);
    let (want_res, want_out) = (want_res.to_vec().unwrap(), want_out.to_vec().unwrap());
    for rt in runtimes() {
        let be = CudaBackend::new(rt.clone());
        let (mut up, mut down) = (up_w.clone(), down_w.clone());
        be.prepare_weight(&mut up).unwrap();
        be.prepare_weight(&mut down).unwrap();
        rt.take_uploaded();
        rt.take_downloaded();
        let (res, out) = block(&be, &up, &down);
        assert_eq!(
            rt.take_uploaded(),
            (t * h + h) * 4,
            "the residual and the norm's weights go up, nothing else"
        );
        assert_eq!(rt.take_downloaded(), 0, "nothing comes back unasked");
        let (res, out) = (res.to_vec().unwrap(), out.to_vec().unwrap());
        assert_eq!(rt.take_downloaded(), 2 * t * h * 4, "what the host reads");
        // The f16 weights' matmuls run on the tensor-core GEMM, whose operands are f16.
        for (what, got, want) in [("residual", &res, &want_res), ("norm", &out, &want_out)] {
            let err = common::max_abs_diff(got, want);
            assert!(err < 1e-2, "{what}: {err} from the CPU's");
        }
        block(&be, &up, &down);
        assert_eq!(
            rt.take_uploaded(),
            t * h * 4,
            "the norm's weights stayed on the device"
        );
    }
}

/// Clones share a device copy until one is written: an in-place op on a clone, or an op
/// writing the original, leaves the other's values as they were.
#[test]
fn clones_of_a_device_tensor_are_copied_before_a_write() {
    let (t, k, n) = (2, 64, 40);
    let w = Weight::dense(n, k, DType::F32, &values(n * k, 16)).unwrap();
    let (x1, x2) = (values(t * k, 17), values(t * k, 18));
    let up = Tensor::from(values(t * n, 19));
    for rt in runtimes() {
        let be = CudaBackend::new(rt.clone());
        let mut a = Tensor::zeros(t * n);
        be.matmul(&Tensor::from(&x1[..]), &w, None, &mut a).unwrap();
        let before = a.to_vec().unwrap();
        let mut b = a.clone();
        be.silu_mul(&mut b, &up).unwrap();
        assert_eq!(
            a.to_vec().unwrap(),
            before,
            "the original after its clone's SiLU"
        );
        let mut want = Tensor::from(&before[..]);
        Cpu::new().silu_mul(&mut want, &up).unwrap();
        let (got, want) = (b.to_vec().unwrap(), want.to_vec().unwrap());
        let err = common::max_abs_diff(&got, &want);
        assert!(err < 1e-6, "the clone's SiLU: {err}");

        let c = a.clone();
        be.matmul(&Tensor::from(&x2[..]), &w, None, &mut a).unwrap();
        assert_eq!(
            c.to_vec().unwrap(),
            before,
            "a clone after the original's rewrite"
        );
        assert_ne!(a.to_vec().unwrap(), before, "the original was rewritten");
    }
}
