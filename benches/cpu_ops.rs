//! Criterion benches of the CPU backend's ops, named `<op>/<backend>/<dtype>/<shape>`.
//!
//! `read_bandwidth/cpu/u64/256MiB` is the baseline measured in the same run: a matmul's
//! achieved bandwidth is its weight bytes / time, reported as a ratio to that baseline.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;
use vellum_kernels::{cpu::Cpu, Backend, Tensor, Weight, WeightData};
use vellum_quant::{BlockFormat, DType};

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
        .collect()
}

fn weight(rows: usize, cols: usize, format: &str) -> Weight {
    let v = values(rows * cols);
    match format {
        "Q4_1" | "Q8_0" => {
            let f = if format == "Q4_1" {
                BlockFormat::Q4_1
            } else {
                BlockFormat::Q8_0
            };
            let mut bytes = Vec::new();
            f.quantize(&v, &mut bytes).unwrap();
            Weight::new(rows, cols, WeightData::Block(f, bytes)).unwrap()
        }
        d => Weight::dense(rows, cols, DType::parse(d).unwrap(), &v).unwrap(),
    }
}

fn read_bandwidth(c: &mut Criterion) {
    // Integer sums vectorize freely (no float reassociation limits), so this is bound by
    // memory, not by an add chain.
    let buf = vec![1u64; 32 << 20];
    let mut g = c.benchmark_group("read_bandwidth");
    g.throughput(Throughput::Bytes((buf.len() * 8) as u64));
    g.bench_function("cpu/u64/256MiB", |b| {
        b.iter(|| {
            buf.par_chunks(1 << 15)
                .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                .reduce(|| 0, u64::wrapping_add)
        })
    });
    g.finish();
}

fn matmul(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut g = c.benchmark_group("matmul");
    for (shape, rows, cols) in [
        ("smollm-ffn-1536x576", 1536, 576),
        ("tinyllama-ffn-5632x2048", 5632, 2048),
    ] {
        for format in ["f32", "bf16", "f16", "Q8_0", "Q4_1"] {
            // As the engine does at load: quantized weights in the layout this CPU reads.
            let mut w = weight(rows, cols, format);
            cpu.prepare_weight(&mut w).unwrap();
            let x = Tensor::from(values(cols));
            let mut out = Tensor::zeros(rows);
            g.throughput(Throughput::Bytes(w.bytes() as u64));
            let id = BenchmarkId::new(
                format!("{}/{format}", cpu.name()),
                format!("{shape}/batch1"),
            );
            g.bench_function(id, |b| {
                b.iter(|| cpu.matmul(&x, &w, None, &mut out).unwrap())
            });
        }
    }
    g.finish();
}

/// The cost of one hand-off to the CPU backend's thread pool and back, which a decode step
/// pays per parallel op (about five per layer at one sequence): a job of one empty task per
/// thread.
fn pool_handoff(c: &mut Criterion) {
    let pool = vellum_kernels::cpu::pool::Pool::global();
    let tasks = rayon::current_num_threads();
    let mut g = c.benchmark_group("pool");
    g.bench_function(format!("cpu/empty-job/{tasks}-tasks"), |b| {
        b.iter(|| {
            pool.run(tasks, &|i| {
                std::hint::black_box(i);
            })
        })
    });
    g.finish();
}

/// The host sampler over a SmolLM2-sized row (49,152 log-probabilities), per sequence per
/// step, against its floor measured in the same run: one argmax pass over the row (greedy).
fn sampler(c: &mut Criterion) {
    use vellum_engine::sampler::{argmax, sample, Rng, SamplingParams};
    let vocab = 49_152;
    // A peaked, ragged row like a language model's: a few likely tokens, a long tail.
    let row: Vec<f32> = (0..vocab)
        .map(|i| -((i * 2_654_435_761usize % 100_003) as f32 / 2_000.0) - 0.5)
        .collect();
    let mut g = c.benchmark_group("sample");
    g.bench_function("cpu/argmax/vocab49152", |b| b.iter(|| argmax(&row)));
    let t = || SamplingParams::default().temperature(0.8);
    for (name, params) in [
        ("temperature", t()),
        ("top_p0.95", t().top_p(0.95)),
        ("top_k40", t().top_k(40)),
        ("top_k40_top_p0.95", t().top_k(40).top_p(0.95)),
    ] {
        let mut rng = Rng::new(1);
        g.bench_function(format!("cpu/{name}/vocab49152"), |b| {
            b.iter(|| sample(&row, &params, &[], &[], &mut rng))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = read_bandwidth, matmul, pool_handoff, sampler
}
criterion_main!(benches);
