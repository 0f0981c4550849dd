//! Criterion benches of whole forward steps and the non-matmul ops, on the SmolLM2-135M shape
//! with random f16 weights (no download): decode at batch 1 and 16, a 128-token prefill,
//! decode at 2,048 cached tokens with an f32 and an f16 KV cache, attention over 256 and
//! 2,048 cached tokens, RMSNorm. Named `<op>/<backend>/<dtype>/<shape>` (`kv-f16`: an f16
//! KV cache).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vellum_engine::synthetic;
use vellum_kernels::{cpu::Cpu, Backend, BatchLayout, KvDtype, KvLayer, Tensor};
use vellum_quant::DType;

/// A batch of `seqs` sequences, each with `past` cached tokens and `new` tokens this step.
fn layout(seqs: usize, past: usize, new: usize, block: usize) -> BatchLayout {
    let blocks_per_seq = (past + new).div_ceil(block);
    let mut l = BatchLayout {
        seq_offsets: vec![0],
        ..BatchLayout::default()
    };
    for s in 0..seqs {
        let table: Vec<u32> = (0..blocks_per_seq)
            .map(|b| (s * blocks_per_seq + b) as u32)
            .collect();
        for p in past..past + new {
            l.positions.push(p as u32);
            l.slot_mapping
                .push((table[p / block] as usize * block + p % block) as u32);
        }
        l.seq_offsets.push(l.positions.len());
        l.block_tables.push(table);
        l.context_lens.push(past + new);
    }
    l
}

/// Writes values into every slot: an untouched pool would read the kernel's shared zero
/// page (always cached) instead of memory.
fn fill(cache: &mut KvLayer) {
    let (k, v) = cache.pools_mut().expect("a host-only cache");
    let values: Vec<f32> = (0..k.len()).map(|i| (i % 23) as f32 / 23.0 - 0.5).collect();
    k.write(0, &values);
    v.write(0, &values);
}

fn forward(c: &mut Criterion) {
    let cpu = Cpu::new();
    let model = synthetic::random_model(
        synthetic::shape("smollm-135m").expect("known shape"),
        DType::F16,
        1,
    );
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    for (name, seqs, past, new, kv_dtype) in [
        ("decode-b1-ctx128", 1, 128, 1, KvDtype::F32),
        ("decode-b16-ctx128", 16, 128, 1, KvDtype::F32),
        ("prefill-128", 1, 0, 128, KvDtype::F32),
        ("decode-b1-ctx2048", 1, 2047, 1, KvDtype::F32),
        ("decode-b1-ctx2048-kv-f16", 1, 2047, 1, KvDtype::F16),
        ("decode-b1-ctx2048-kv-int8", 1, 2047, 1, KvDtype::Int8),
    ] {
        let l = layout(seqs, past, new, 16);
        let mut kv = model.new_kv_cache(seqs * (past + new).div_ceil(16), 16, kv_dtype);
        kv.iter_mut().for_each(fill);
        let tokens: Vec<u32> = (0..l.num_tokens() as u32).map(|t| t * 7 % 49152).collect();
        let last: Vec<usize> = (0..seqs).map(|s| l.seq_offsets[s + 1] - 1).collect();
        g.throughput(Throughput::Elements(tokens.len() as u64));
        g.bench_function(format!("{}/f16/smollm-135m/{name}", cpu.name()), |b| {
            // As the engine does: the step runs on a pool thread.
            b.iter(|| {
                rayon::scope(|_| model.forward(&cpu, &tokens, &l, &mut kv, &last))
                    .expect("valid batch")
            })
        });
    }
    g.finish();
}

fn ops(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut g = c.benchmark_group("ops");
    for (heads, kv_heads, hd, seqs, ctx, shape) in [
        (9, 3, 64, 16, 256, "smollm-135m"),
        (9, 3, 64, 1, 2048, "smollm-135m"),
        // One KV head (multi-query attention, as Falcon-7B's 71 heads of 64): one tile per
        // sequence.
        (16, 1, 64, 1, 2048, "mqa-16x64"),
    ] {
        let l = layout(seqs, ctx - 1, 1, 16);
        let q = Tensor::from(vec![0.1f32; l.num_tokens() * heads * hd]);
        let mut out = Tensor::zeros(q.len());
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
            let mut cache = KvLayer::new(seqs * ctx / 16, 16, kv_heads, hd, dtype);
            fill(&mut cache);
            let shape = format!("{shape}-b{seqs}-ctx{ctx}");
            g.bench_function(
                format!("attention/{}/kv-{}/{shape}", cpu.name(), dtype.name()),
                |b| {
                    b.iter(|| {
                        cpu.attention(&q, &cache, &l, heads, &mut out)
                            .expect("valid batch")
                    })
                },
            );
        }
    }
    let mut residual = Tensor::from(vec![0.5f32; 16 * 576]);
    let delta = Tensor::from(vec![0.01f32; 16 * 576]);
    let weight = Tensor::from(vec![1f32; 576]);
    let mut normed = Tensor::zeros(16 * 576);
    g.bench_function(format!("add_rms_norm/{}/f32/576-b16", cpu.name()), |b| {
        b.iter(|| {
            cpu.add_rms_norm(&mut residual, Some(&delta), &weight, 1e-5, &mut normed)
                .expect("shapes match")
        })
    });
    g.finish();
}

criterion_group!(benches, forward, ops);
criterion_main!(benches);
