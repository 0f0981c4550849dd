//! Parity of every CUDA kernel with the CPU backend, on random inputs with odd sizes and edge
//! cases, run through the CUDA backend's real host code. Under the CPU emulator always; on a
//! GPU too when one is usable (and the test says so when it is not).

mod common;
use common::backends;

use half::{bf16, f16};
use vellum_kernels::cuda::runtime::Pod;
use vellum_kernels::cuda::{Arg, DeviceBuffer, KernelRuntime, LaunchConfig};
use vellum_kernels::{
    cpu::Cpu, Backend, BatchLayout, KvData, KvDtype, KvLayer, Pick, QuantTarget, Rope, RopeScaling,
    Tensor, Weight, NO_TARGET, PAD_SLOT,
};
use vellum_quant::{BlockFormat, DType};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A tensor's values on the host.
fn host(t: &Tensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

/// Largest |a - b| relative to `scale`, asserted within `tol`.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / scale;
        assert!(
            err <= tol,
            "{what}: element {i}: got {g}, want {w} (error {err:.2e} of max |value| {scale}, tolerance {tol:.0e})"
        );
    }
}

#[test]
fn embedding_matches_for_every_table_format() {
    let cpu = Cpu::new();
    let mut rng = Rng(1);
    for be in backends() {
        for (cols, dtype) in [
            (37, Some(DType::F32)),
            (37, Some(DType::F16)),
            (65, Some(DType::BF16)),
            (64, None),
        ] {
            let rows = 11;
            let values = rng.vec(rows * cols);
            let table = match dtype {
                Some(d) => Weight::dense(rows, cols, d, &values).unwrap(),
                None => Weight::from_f32(rows, cols, values)
                    .unwrap()
                    .quantize(QuantTarget::Block(BlockFormat::Q8_0))
                    .unwrap(),
            };
            let tokens = [0u32, 10, 3, 3];
            let (mut got, mut want) = (Tensor::zeros(4 * cols), Tensor::zeros(4 * cols));
            be.embedding(&table, &tokens, &mut got).unwrap();
            cpu.embedding(&table, &tokens, &mut want).unwrap();
            let what = format!("{} embedding {}", be.name(), table.format_name());
            assert_eq!(host(&got), host(&want), "{what}");
            let err = be
                .embedding(&table, &[11], &mut Tensor::zeros(cols))
                .unwrap_err();
            assert!(err.to_string().contains("11"), "{err}");
        }
    }
}

#[test]
fn add_rms_norm_matches_with_and_without_residual() {
    let cpu = Cpu::new();
    let mut rng = Rng(2);
    for be in backends() {
        for width in [1usize, 31, 577] {
            let rows = 3;
            let residual = Tensor::from(rng.vec(rows * width));
            let delta = Tensor::from(rng.vec(rows * width));
            let weight = Tensor::from(rng.vec(width));
            for with_delta in [false, true] {
                let d = with_delta.then_some(&delta);
                let (mut r1, mut r2) = (residual.clone(), residual.clone());
                let (mut o1, mut o2) = (Tensor::zeros(rows * width), Tensor::zeros(rows * width));
                be.add_rms_norm(&mut r1, d, &weight, 1e-5, &mut o1).unwrap();
                cpu.add_rms_norm(&mut r2, d, &weight, 1e-5, &mut o2)
                    .unwrap();
                let what = format!("{} rms_norm width {width} delta {with_delta}", be.name());
                assert_eq!(host(&r1), host(&r2), "{what}: residual");
                assert_close(&what, &host(&o1), &host(&o2), 2e-6);
            }
        }
    }
}

/// Dense matmuls through the warp-per-column kernel (exact products, so 1e-5): k where every
/// row takes 16-byte loads (64, 576, 1000), where only f32's rows do (1004: a multiple of 4,
/// not 8), and where none do (37, 65, 130). The tensor-core GEMM of dense f16/bf16 rows is
/// checked in cuda_qmatmul.rs.
#[test]
fn matmul_matches_for_odd_shapes_and_every_dense_type() {
    let cpu = Cpu::new();
    let mut rng = Rng(3);
    for be in backends() {
        be.set_gemm_min_rows(usize::MAX);
        for (rows, k, n) in [
            (1usize, 37usize, 5usize),
            (3, 64, 33),
            (9, 130, 7),
            (17, 65, 4),
            (2, 576, 9),
            (5, 1000, 3),
            (3, 1004, 2),
        ] {
            let x = Tensor::from(rng.vec(rows * k));
            let values = rng.vec(n * k);
            let bias = Tensor::from(rng.vec(n));
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let w = Weight::dense(n, k, dtype, &values).unwrap();
                for b in [None, Some(&bias)] {
                    let (mut got, mut want) = (Tensor::zeros(rows * n), Tensor::zeros(rows * n));
                    be.matmul(&x, &w, b, &mut got).unwrap();
                    cpu.matmul(&x, &w, b, &mut want).unwrap();
                    let what = format!(
                        "{} matmul {rows}x{k}x{n} {dtype:?} bias {}",
                        be.name(),
                        b.is_some()
                    );
                    assert_close(&what, &host(&got), &host(&want), 1e-5);
                }
            }
        }
    }
}

#[test]
fn rotary_matches_for_both_head_dims_and_far_positions() {
    let cpu = Cpu::new();
    let mut rng = Rng(4);
    for be in backends() {
        for hd in [64usize, 128] {
            let rope = Rope::new(hd, 10000.0, &RopeScaling::None);
            let positions = [0u32, 7, 1000, 32767];
            let x = Tensor::from(rng.vec(positions.len() * 3 * hd));
            let (mut a, mut b) = (x.clone(), x.clone());
            be.rotary(&mut a, &positions, 3, &rope).unwrap();
            cpu.rotary(&mut b, &positions, 3, &rope).unwrap();
            let what = format!("{} rotary hd {hd}", be.name());
            assert_close(&what, &host(&a), &host(&b), 1e-6);
        }
    }
}

/// A cache of `dtype` with random contents, a batch of three sequences (a decode deep in a
/// long context, a prefill chunk, a single first token) over shuffled blocks.
fn paged_case(
    rng: &mut Rng,
    n_kv: usize,
    hd: usize,
    block_size: usize,
    dtype: KvDtype,
) -> (KvLayer, BatchLayout) {
    let num_blocks = 120;
    let mut cache = KvLayer::new(num_blocks, block_size, n_kv, hd, dtype);
    let (k, v) = cache.pools_mut().unwrap();
    k.write(0, &rng.vec(k.len()));
    v.write(0, &rng.vec(v.len()));
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i + 1));
    }
    // (context length, query positions)
    let seqs: [(usize, Vec<u32>); 3] = [(300, vec![299]), (21, (16..21).collect()), (1, vec![0])];
    let mut batch = BatchLayout {
        seq_offsets: vec![0],
        ..Default::default()
    };
    for (ctx, positions) in seqs {
        let table: Vec<u32> = free.drain(..ctx.div_ceil(block_size)).collect();
        for &p in &positions {
            let blk = table[p as usize / block_size] as usize;
            batch
                .slot_mapping
                .push((blk * block_size + p as usize % block_size) as u32);
        }
        batch.positions.extend(&positions);
        batch.seq_offsets.push(batch.positions.len());
        batch.block_tables.push(table);
        batch.context_lens.push(ctx);
    }
    (cache, batch)
}

/// The CUDA backend stores new K/V slots on the device; brought back, they are the bits the
/// host stores (`KvData::write`) for edge values too: beyond f16's range (saturated), f16
/// subnormals, int8 groups that are all zero, hold a NaN or an infinity, or round ties
/// (away from zero).
#[test]
fn kv_writes_on_the_device_store_the_hosts_bits_for_edge_values() {
    let cpu = Cpu::new();
    let mut rng = Rng(9);
    let (n_kv, hd) = (1usize, 64usize); // int8: two groups of 32 per head
    let mut rows = rng.vec(4 * hd);
    rows[hd..hd + 8].copy_from_slice(&[70000.0, -1e9, 65519.0, 65520.0, 6e-8, -3e-8, 1e-10, 1e-5]);
    rows[2 * hd..2 * hd + 32].fill(0.0);
    rows[2 * hd + 40] = f32::NAN;
    rows[3 * hd + 3] = f32::INFINITY;
    // A group whose largest is 127: codes are the values rounded, ties away from zero.
    let ties = [127.0, 0.5, 1.5, -2.5, -0.5, 126.5];
    rows[3 * hd + 32..3 * hd + 32 + ties.len()].copy_from_slice(&ties);
    let (k, v) = (Tensor::from(&rows[..]), Tensor::from(rng.vec(4 * hd)));
    let slots = [5u32, 0, 17, 3];
    for be in backends() {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
            let mut cache = KvLayer::new(2, 16, n_kv, hd, dtype);
            let mut host = cache.try_clone().unwrap();
            be.write_kv(&mut cache, &k, &v, &slots).unwrap();
            cpu.write_kv(&mut host, &k, &v, &slots).unwrap();
            let (got, want) = (cache.host_pools().unwrap(), host.host_pools().unwrap());
            for (what, g, w) in [("K", got.0, want.0), ("V", got.1, want.1)] {
                // As bytes: NaN != NaN.
                assert!(
                    g.planes() == w.planes(),
                    "{} {dtype:?}: {what} stored on the device differs from the host's",
                    be.name()
                );
            }
        }
    }
}

/// A token whose slot is `PAD_SLOT` (a padding sequence of a recorded decode step) is
/// stored nowhere, on every backend and KV dtype: the pools are those of the other tokens'
/// writes alone.
#[test]
fn kv_writes_store_nothing_for_padding_slots() {
    let cpu = Cpu::new();
    let mut rng = Rng(4);
    let (n_kv, hd) = (2usize, 32usize);
    let (k, v) = (rng.vec(3 * n_kv * hd), rng.vec(3 * n_kv * hd));
    let real = |x: &[f32]| Tensor::from([&x[..n_kv * hd], &x[2 * n_kv * hd..]].concat());
    let cuda = backends();
    let all = cuda
        .iter()
        .map(|b| b as &dyn Backend)
        .chain([&cpu as &dyn Backend]);
    for be in all {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
            let mut cache = KvLayer::new(2, 16, n_kv, hd, dtype);
            let mut host = cache.try_clone().unwrap();
            let slots = [7, PAD_SLOT, 20];
            be.write_kv(
                &mut cache,
                &Tensor::from(&k[..]),
                &Tensor::from(&v[..]),
                &slots,
            )
            .unwrap();
            cpu.write_kv(&mut host, &real(&k), &real(&v), &[7, 20])
                .unwrap();
            let (got, want) = (cache.host_pools().unwrap(), host.host_pools().unwrap());
            assert!(
                got.0.planes() == want.0.planes() && got.1.planes() == want.1.planes(),
                "{} {dtype:?}: a padding token's K/V was stored",
                be.name()
            );
        }
    }
}

#[test]
fn write_kv_and_paged_attention_match_for_gqa_ratios_and_head_dims() {
    let cpu = Cpu::new();
    let mut rng = Rng(5);
    for mut be in backends() {
        for (n_heads, n_kv, hd, bs, dtype) in [
            (2usize, 2usize, 64usize, 16usize, KvDtype::F32),
            (3, 1, 128, 16, KvDtype::F32),
            (8, 1, 64, 5, KvDtype::F32),
            (3, 1, 64, 16, KvDtype::F16),
            (2, 2, 64, 16, KvDtype::Int8),
        ] {
            let (mut cache, batch) = paged_case(&mut rng, n_kv, hd, bs, dtype);
            let t = batch.num_tokens();
            let q = Tensor::from(rng.vec(t * n_heads * hd));
            // An attention first: the backend's device copy of the pools (if it keeps one)
            // exists before the write, which must then update it.
            let (mut before, mut want) = (Tensor::zeros(q.len()), Tensor::zeros(q.len()));
            be.attention(&q, &cache, &batch, n_heads, &mut before)
                .unwrap();
            cpu.attention(&q, &cache, &batch, n_heads, &mut want)
                .unwrap();
            assert_close(
                &format!("{} before write_kv", be.name()),
                &host(&before),
                &host(&want),
                2e-5,
            );

            let k = Tensor::from(rng.vec(t * n_kv * hd));
            let v = Tensor::from(rng.vec(t * n_kv * hd));
            let mut mirror = cache.try_clone().unwrap();
            be.write_kv(&mut cache, &k, &v, &batch.slot_mapping)
                .unwrap();
            cpu.write_kv(&mut mirror, &k, &v, &batch.slot_mapping)
                .unwrap();

            let mut want = Tensor::zeros(q.len());
            cpu.attention(&q, &mirror, &batch, n_heads, &mut want)
                .unwrap();
            let want = host(&want);
            let mut got = Tensor::zeros(q.len());
            be.attention(&q, &cache, &batch, n_heads, &mut got).unwrap();
            let what = format!(
                "{} attention heads {n_heads}/{n_kv} hd {hd} block {bs}",
                be.name()
            );
            assert_close(&what, &host(&got), &want, 2e-5);
            // Split-K: 128-key splits cut the 300-token context into 3 (the last partial),
            // the 21-token one is a single split, the 1-token one leaves two splits empty.
            let default = be.split_keys();
            be.set_split_keys(128);
            let mut got = Tensor::zeros(q.len());
            be.attention(&q, &cache, &batch, n_heads, &mut got).unwrap();
            be.set_split_keys(default);
            assert_close(&format!("{what} split-K"), &host(&got), &want, 2e-5);
            // The new slots as the device stored them: the host's bits.
            let got = cache.host_pools().unwrap();
            assert_eq!(got, mirror.host_pools().unwrap(), "{what}: stored K/V");
        }
    }
}

#[test]
fn silu_mul_and_log_softmax_match() {
    let cpu = Cpu::new();
    let mut rng = Rng(6);
    for be in backends() {
        for n in [1usize, 1000] {
            let (gate, up) = (Tensor::from(rng.vec(n)), Tensor::from(rng.vec(n)));
            let (mut a, mut b) = (gate.clone(), gate.clone());
            be.silu_mul(&mut a, &up).unwrap();
            cpu.silu_mul(&mut b, &up).unwrap();
            let what = format!("{} silu_mul {n}", be.name());
            assert_close(&what, &host(&a), &host(&b), 1e-6);
        }
        for width in [1usize, 1000] {
            let x: Vec<f32> = rng.vec(2 * width).iter().map(|v| v * 20.0).collect();
            let (mut a, mut b) = (Tensor::from(&x[..]), Tensor::from(&x[..]));
            be.log_softmax(&mut a, width).unwrap();
            cpu.log_softmax(&mut b, width).unwrap();
            let what = format!("{} log_softmax {width}", be.name());
            assert_close(&what, &host(&a), &host(&b), 1e-6);
        }
        // Bad arguments are the same error on both backends (shared checks, kernels::shapes).
        let (mut g, u) = (Tensor::zeros(3), Tensor::zeros(2));
        let errs = (be.silu_mul(&mut g, &u), cpu.silu_mul(&mut g, &u));
        assert_eq!(
            errs.0.unwrap_err().to_string(),
            errs.1.unwrap_err().to_string()
        );
        let w = Weight::from_f32(4, 8, vec![0.0; 32]).unwrap();
        let errs = (
            be.matmul(&g, &w, None, &mut Tensor::zeros(4)),
            cpu.matmul(&g, &w, None, &mut Tensor::zeros(4)),
        );
        assert_eq!(
            errs.0.unwrap_err().to_string(),
            errs.1.unwrap_err().to_string()
        );
    }
}

/// Picked rows (argmax and a target's value) on the device are the host's, bit for bit:
/// ties to the lowest index, NaN never the argmax, a row of -inf and NaN giving index 0,
/// targets and `NO_TARGET`, widths under and over a block's threads.
#[test]
fn picked_rows_match_the_host() {
    let cpu = Cpu::new();
    let mut rng = Rng(12);
    for width in [5usize, 777, 49_152] {
        let mut x = rng.vec(5 * width);
        let w = width;
        x[w - 1] = 9.0; // row 0: a tie, the first wins
        x[w / 2] = 9.0;
        x[w + 1] = f32::NAN; // row 1: NaN beside the largest
        x[w + w - 1] = 4.0;
        x[2 * w..3 * w].fill(f32::NEG_INFINITY); // row 2: nothing above -inf
        x[2 * w + w / 3] = f32::NAN;
        x[3 * w..4 * w].fill(-1.5); // row 3: all equal
        let targets = [3, NO_TARGET, NO_TARGET, (w - 1) as u32, 0];
        let x = Tensor::from(x);
        let mut want = Tensor::zeros(10);
        cpu.pick_rows(&x, w, &targets, &mut want).unwrap();
        let want = want.to_vec().unwrap();
        let picks = Pick::from_values(&want);
        assert_eq!(picks[0].argmax, (w / 2) as u32, "width {w}");
        assert_eq!((picks[2].argmax, picks[3].argmax), (0, 0), "width {w}");
        for be in backends() {
            let mut got = Tensor::zeros(10);
            be.pick_rows(&x, w, &targets, &mut got).unwrap();
            let got = got.to_vec().unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{} width {w}", be.name());
        }
        let past_the_row = [w as u32, 0, 0, 0, 0];
        let bad = cpu.pick_rows(&x, w, &past_the_row, &mut Tensor::zeros(10));
        assert!(bad.unwrap_err().to_string().contains("pick_rows"));
    }
}

/// Ranked candidates on the device are the host's (`pick::ranked`), bit for bit: ties by
/// index, NaN of both signs and both zeros where `f32::total_cmp` puts them, an ascending
/// row, rows listed out of order and twice, k from 1 to `MAX_RANKED`, widths under and over
/// a block's threads and a tile.
#[test]
fn top_rows_match_the_host() {
    use vellum_kernels::pick::{ranked_pairs, top_pairs, MAX_RANKED};
    let cpu = Cpu::new();
    let mut rng = Rng(13);
    for width in [5usize, 64, 777, 49_152] {
        let w = width;
        let mut x = rng.vec(5 * w);
        x[w - 1] = 9.0; // row 0: a tie at the top, the lower index first
        x[w / 2] = 9.0;
        x[w + 1] = f32::NAN; // row 1: NaNs of both signs, both zeros
        x[w + 2] = -f32::NAN;
        x[w + 3] = -0.0;
        x[w + w - 1] = 0.0;
        x[2 * w..3 * w].fill(-1.5); // row 2: all equal
        x[3 * w + w / 3] = f32::NEG_INFINITY;
        // Row 4 ascending in ties of three: every tile beats the best so far (the device's
        // one-pass merge at its busiest).
        for (i, v) in x[4 * w..].iter_mut().enumerate() {
            *v = (i / 3) as f32;
        }
        let x = Tensor::from(x);
        let rows = [2u32, 0, 3, 4, 1, 2];
        for k in [1, 5, MAX_RANKED.min(w)] {
            let mut want = Tensor::zeros(2 * k * rows.len());
            cpu.top_rows(&x, w, &rows, k, &mut want).unwrap();
            let want = want.to_vec().unwrap();
            let host = x.to_vec().unwrap();
            for (i, &r) in rows.iter().enumerate() {
                let row = &host[r as usize * w..(r as usize + 1) * w];
                let got = ranked_pairs(&want[2 * k * i..2 * k * (i + 1)]);
                let bits =
                    |v: &[(u32, f32)]| v.iter().map(|&(i, x)| (i, x.to_bits())).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&top_pairs(row, k)),
                    "width {w} k {k} row {r}"
                );
            }
            for be in backends() {
                let mut got = Tensor::zeros(2 * k * rows.len());
                be.top_rows(&x, w, &rows, k, &mut got).unwrap();
                let got = got.to_vec().unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{} width {w} k {k}", be.name());
            }
        }
        // Past the rows, more than the row or MAX_RANKED: named errors, on every backend.
        let too_many = MAX_RANKED.min(w) + 1;
        let cuda = backends();
        let all = cuda
            .iter()
            .map(|b| b as &dyn Backend)
            .chain([&cpu as &dyn Backend]);
        for be in all {
            let bad = be.top_rows(&x, w, &[5], 1, &mut Tensor::zeros(2));
            assert!(
                bad.unwrap_err().to_string().contains("top_rows"),
                "{}",
                be.name()
            );
            let bad = be.top_rows(&x, w, &[0], too_many, &mut Tensor::zeros(2 * too_many));
            assert!(
                bad.unwrap_err().to_string().contains("top_rows"),
                "{}",
                be.name()
            );
        }
    }
}

/// The fused rotary + KV write gives, bit for bit, what rotary, rotary and write_kv give on
/// the same backend (q and k rotated in place, the pools brought back), and the CPU's
/// values, for every KV dtype.
#[test]
fn rotary_write_kv_matches_the_separate_ops() {
    let cpu = Cpu::new();
    let mut rng = Rng(11);
    let (n_heads, n_kv, hd) = (4usize, 2usize, 64usize);
    let rope = Rope::new(hd, 10000.0, &RopeScaling::None);
    for be in backends() {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
            let (cache0, batch) = paged_case(&mut rng, n_kv, hd, 16, dtype);
            let t = batch.num_tokens();
            let (q0, k0) = (rng.vec(t * n_heads * hd), rng.vec(t * n_kv * hd));
            let v = Tensor::from(rng.vec(t * n_kv * hd));
            // (q, k, K and V pools as f32) after the ops, fused or one by one.
            let run = |be: &dyn Backend, fused: bool| {
                let mut cache = cache0.try_clone().unwrap();
                let (mut q, mut k) = (Tensor::from(&q0[..]), Tensor::from(&k0[..]));
                if fused {
                    let qkv = (&mut q, &mut k, &v);
                    be.rotary_write_kv(qkv, n_heads, &rope, &mut cache, &batch)
                        .unwrap();
                } else {
                    be.rotary(&mut q, &batch.positions, n_heads, &rope).unwrap();
                    be.rotary(&mut k, &batch.positions, n_kv, &rope).unwrap();
                    be.write_kv(&mut cache, &k, &v, &batch.slot_mapping)
                        .unwrap();
                }
                let (kp, vp) = cache.host_pools().unwrap();
                [host(&q), host(&k), kp.to_f32(), vp.to_f32()]
            };
            let bits = |v: &[Vec<f32>; 4]| {
                let bits = |x: &Vec<f32>| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                v.iter().map(bits).collect::<Vec<_>>()
            };
            let fused = run(&be, true);
            let what = format!("{} {dtype:?}", be.name());
            assert_eq!(
                bits(&fused),
                bits(&run(&be, false)),
                "{what}: fused vs separate"
            );
            let want = run(&cpu, true);
            for (i, tol) in [(0, 1e-6), (1, 1e-6), (2, 1e-2), (3, 1e-2)] {
                assert_close(&format!("{what} output {i}"), &fused[i], &want[i], tol);
            }
        }
    }
}

#[test]
fn gather_rows_matches_and_refuses_a_row_out_of_range() {
    let cpu = Cpu::new();
    let mut rng = Rng(10);
    let (rows, width) = (7usize, 33usize);
    let x = Tensor::from(rng.vec(rows * width));
    let pick = [6u32, 0, 3, 3];
    for be in backends() {
        let (mut got, mut want) = (Tensor::zeros(4 * width), Tensor::zeros(4 * width));
        be.gather_rows(&x, width, &pick, &mut got).unwrap();
        cpu.gather_rows(&x, width, &pick, &mut want).unwrap();
        let got = host(&got);
        assert_eq!(got, host(&want), "{} gather_rows", be.name());
        assert_eq!(got[..width], host(&x)[6 * width..]);
        let err = be
            .gather_rows(&x, width, &[7], &mut Tensor::zeros(width))
            .unwrap_err();
        assert!(err.to_string().contains("gather_rows"), "{err}");
    }
}

/// Launches a one-input cast kernel over `input` and returns the output elements.
fn cast<I: Pod, O: Pod>(rt: &dyn KernelRuntime, kernel: &str, input: &[I]) -> Vec<O> {
    let src = DeviceBuffer::upload(rt, input).unwrap();
    let dst = DeviceBuffer::zeroed(rt, input.len() * std::mem::size_of::<O>()).unwrap();
    let cfg = LaunchConfig::linear((input.len() as u32).div_ceil(256).min(64), 256);
    let args = [src.arg(), dst.arg(), Arg::U32(input.len() as u32)];
    rt.launch("elementwise", kernel, &cfg, &args).unwrap();
    dst.to_vec().unwrap()
}

#[test]
fn half_and_bfloat16_conversions_round_like_the_half_crate() {
    // Every f16 and bf16 bit pattern widens exactly; f32 inputs that exercise rounding
    // (halfway cases, subnormals, overflow, NaN, infinities) narrow to nearest even.
    let mut rng = Rng(7);
    let mut probes: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        65504.0,
        65519.99,
        65520.0,
        1e-8,
        -3e-8,
        6.0e-8,
        2.98e-8,
        6.1e-5,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        3.0e38,
    ];
    probes.extend((0..20000).map(|_| f32::from_bits(rng.next() as u32)));
    probes.extend((0..20000).map(|_| rng.f() * 1e-4));
    for be in backends() {
        let rt = be.runtime();
        let halves: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let widened: Vec<f32> = cast(rt, "cast_f16_to_f32", &halves);
        for (h, w) in halves.iter().zip(&widened) {
            let same = w.to_bits() == h.to_f32().to_bits() || (h.is_nan() && w.is_nan());
            assert!(
                same,
                "{} f16 {:#06x} widened to {w}",
                be.name(),
                h.to_bits()
            );
        }
        let bfs: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let widened: Vec<f32> = cast(rt, "cast_bf16_to_f32", &bfs);
        for (h, w) in bfs.iter().zip(&widened) {
            let same = w.to_bits() == h.to_f32().to_bits() || (h.is_nan() && w.is_nan());
            assert!(
                same,
                "{} bf16 {:#06x} widened to {w}",
                be.name(),
                h.to_bits()
            );
        }
        let narrowed: Vec<f16> = cast(rt, "cast_f32_to_f16", &probes);
        for (p, n) in probes.iter().zip(&narrowed) {
            let want = f16::from_f32(*p);
            let same = n.to_bits() == want.to_bits() || (want.is_nan() && n.is_nan());
            assert!(
                same,
                "{} f32 {p:e} -> f16 {:#06x}, want {:#06x}",
                be.name(),
                n.to_bits(),
                want.to_bits()
            );
        }
        let narrowed: Vec<bf16> = cast(rt, "cast_f32_to_bf16", &probes);
        for (p, n) in probes.iter().zip(&narrowed) {
            let want = bf16::from_f32(*p);
            let same = n.to_bits() == want.to_bits() || (want.is_nan() && n.is_nan());
            assert!(
                same,
                "{} f32 {p:e} -> bf16 {:#06x}, want {:#06x}",
                be.name(),
                n.to_bits(),
                want.to_bits()
            );
        }
    }
}

/// A 16-bit activation type of the kernels, with the tolerance its rounding allows.
trait Half: Pod {
    const NAME: &'static str;
    const TOL: f32;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}
impl Half for f16 {
    const NAME: &'static str = "f16";
    const TOL: f32 = 2e-3;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
impl Half for bf16 {
    const NAME: &'static str = "bf16";
    const TOL: f32 = 1.6e-2;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Rounds to `H` and back, so the f32 reference sees exactly the kernel's inputs.
fn rounded<H: Half>(v: &[f32]) -> (Vec<H>, Vec<f32>) {
    let h: Vec<H> = v.iter().map(|&x| H::from_f32(x)).collect();
    let f = h.iter().map(|&x| x.to_f32()).collect();
    (h, f)
}

fn widen<H: Half>(buf: &DeviceBuffer) -> Vec<f32> {
    buf.to_vec::<H>()
        .unwrap()
        .into_iter()
        .map(H::to_f32)
        .collect()
}

/// The 16-bit instantiations of matmul, RMSNorm, rotary, SiLU·mul and attention against the
/// CPU backend in f32 on the same (rounded) inputs.
fn half_kernels_match<H: Half>() {
    let cpu = Cpu::new();
    let mut rng = Rng(8);
    let ty = H::NAME;
    for be in backends() {
        let rt = be.runtime();
        let what = |op: &str| format!("{} {op}_{ty}", be.name());
        // matmul, weights of the same type
        let (rows, k, n) = (5usize, 67usize, 9usize);
        let (xh, xf) = rounded::<H>(&rng.vec(rows * k));
        let (wh, wf) = rounded::<H>(&rng.vec(n * k));
        let (xd, wd) = (
            DeviceBuffer::upload(rt, &xh).unwrap(),
            DeviceBuffer::upload(rt, &wh).unwrap(),
        );
        let od = DeviceBuffer::zeroed(rt, rows * n * 2).unwrap();
        let args = [
            xd.arg(),
            wd.arg(),
            Arg::Ptr(0),
            od.arg(),
            Arg::U32(rows as u32),
            Arg::U32(k as u32),
            Arg::U32(n as u32),
        ];
        rt.launch(
            "matmul",
            &format!("matmul_{ty}_{ty}"),
            &LaunchConfig::linear(3, 128),
            &args,
        )
        .unwrap();
        let mut want = Tensor::zeros(rows * n);
        let w = Weight::from_f32(n, k, wf).unwrap();
        cpu.matmul(&Tensor::from(xf), &w, None, &mut want).unwrap();
        assert_close(&what("matmul"), &widen::<H>(&od), &host(&want), H::TOL);

        // add_rms_norm
        let width = 300;
        let (rh, rf) = rounded::<H>(&rng.vec(2 * width));
        let (dh, df) = rounded::<H>(&rng.vec(2 * width));
        let weight = rng.vec(width);
        let (rd, dd, wd) = (
            DeviceBuffer::upload(rt, &rh).unwrap(),
            DeviceBuffer::upload(rt, &dh).unwrap(),
            DeviceBuffer::upload(rt, &weight).unwrap(),
        );
        let od = DeviceBuffer::zeroed(rt, 2 * width * 2).unwrap();
        let args = [
            rd.arg(),
            dd.arg(),
            wd.arg(),
            Arg::F32(1e-6),
            od.arg(),
            Arg::U32(width as u32),
        ];
        rt.launch(
            "norm",
            &format!("add_rms_norm_{ty}"),
            &LaunchConfig::linear(2, 128),
            &args,
        )
        .unwrap();
        let (mut r, mut want) = (Tensor::from(rf), Tensor::zeros(2 * width));
        let (df, weight) = (Tensor::from(df), Tensor::from(weight));
        cpu.add_rms_norm(&mut r, Some(&df), &weight, 1e-6, &mut want)
            .unwrap();
        let residual = widen::<H>(&rd);
        assert_close(&what("add_rms_norm residual"), &residual, &host(&r), H::TOL);
        assert_close(
            &what("add_rms_norm"),
            &widen::<H>(&od),
            &host(&want),
            H::TOL,
        );

        // rotary
        let (hd, heads) = (64usize, 2usize);
        let rope = Rope::new(hd, 10000.0, &RopeScaling::None);
        let positions = [3u32, 4000];
        let (xh, xf) = rounded::<H>(&rng.vec(2 * heads * hd));
        let (xd, pd, fd) = (
            DeviceBuffer::upload(rt, &xh).unwrap(),
            DeviceBuffer::upload(rt, &positions).unwrap(),
            DeviceBuffer::upload(rt, &rope.inv_freq).unwrap(),
        );
        let args = [
            xd.arg(),
            pd.arg(),
            fd.arg(),
            Arg::U32(heads as u32),
            Arg::U32(hd as u32),
        ];
        rt.launch(
            "elementwise",
            &format!("rotary_{ty}"),
            &LaunchConfig::linear(2, 64),
            &args,
        )
        .unwrap();
        let mut want = Tensor::from(xf);
        cpu.rotary(&mut want, &positions, heads, &rope).unwrap();
        assert_close(&what("rotary"), &widen::<H>(&xd), &host(&want), H::TOL);

        // silu_mul
        let (gh, gf) = rounded::<H>(&rng.vec(777));
        let (uh, uf) = rounded::<H>(&rng.vec(777));
        let (gd, ud) = (
            DeviceBuffer::upload(rt, &gh).unwrap(),
            DeviceBuffer::upload(rt, &uh).unwrap(),
        );
        let args = [gd.arg(), ud.arg(), Arg::U32(777)];
        rt.launch(
            "elementwise",
            &format!("silu_mul_{ty}"),
            &LaunchConfig::linear(2, 256),
            &args,
        )
        .unwrap();
        let mut want = Tensor::from(gf);
        cpu.silu_mul(&mut want, &Tensor::from(uf)).unwrap();
        assert_close(&what("silu_mul"), &widen::<H>(&gd), &host(&want), H::TOL);

        // attention over a paged cache stored in H
        let (n_heads, n_kv, hd, bs) = (3usize, 1usize, 64usize, 16usize);
        let (mut cache, batch) = paged_case(&mut rng, n_kv, hd, bs, KvDtype::F32);
        let (k, v) = cache.pools_mut().unwrap();
        let (kh, kf) = rounded::<H>(&k.to_f32());
        let (vh, vf) = rounded::<H>(&v.to_f32());
        (*k, *v) = (KvData::F32(kf), KvData::F32(vf));
        let t = batch.num_tokens();
        let (qh, qf) = rounded::<H>(&rng.vec(t * n_heads * hd));
        let (tables, max_blocks) = batch.flat_block_tables();
        let seq_of = batch.seq_of_token();
        let bufs = [
            DeviceBuffer::upload(rt, &qh).unwrap(),
            DeviceBuffer::upload(rt, &kh).unwrap(),
            DeviceBuffer::upload(rt, &vh).unwrap(),
            DeviceBuffer::zeroed(rt, qh.len() * 2).unwrap(),
            DeviceBuffer::upload(rt, &batch.positions).unwrap(),
            DeviceBuffer::upload(rt, &seq_of).unwrap(),
            DeviceBuffer::upload(rt, &tables).unwrap(),
        ];
        let mut args: Vec<Arg> = bufs.iter().map(|b| b.arg()).collect();
        args.extend([max_blocks, n_heads, n_kv, hd, bs].map(|v| Arg::U32(v as u32)));
        args.push(Arg::F32(1.0 / (hd as f32).sqrt()));
        let cfg = LaunchConfig {
            grid: (t as u32, n_heads as u32, 1),
            block: (128, 1, 1),
            shared_bytes: (hd as u32 + 128) * 4,
        };
        rt.launch("attention", &format!("attention_{ty}"), &cfg, &args)
            .unwrap();
        let mut want = Tensor::zeros(qf.len());
        cpu.attention(&Tensor::from(qf), &cache, &batch, n_heads, &mut want)
            .unwrap();
        let want = host(&want);
        assert_close(&what("attention"), &widen::<H>(&bufs[3]), &want, H::TOL);
    }
}

#[test]
fn f16_kernels_match_the_cpu_backend() {
    half_kernels_match::<f16>();
}

#[test]
fn bf16_kernels_match_the_cpu_backend() {
    half_kernels_match::<bf16>();
}
