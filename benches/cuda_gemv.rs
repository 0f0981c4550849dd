//! GPU kernel benchmark for the weight-quantized matmuls (issue #7): W4A16 and W8A16 at the
//! issue's shapes (K×N = 4096×4096, 4096×14336, 14336×4096), batch 1 and 16 and a 256-row
//! prefill, each through both kernels (the warp-per-column GEMV, `qmatmul.cu`, and the
//! tensor-core GEMM, `qgemm.cu`, the engine's default), reported as bandwidth (weight +
//! scale bytes / kernel time) against the device-to-device copy bandwidth measured in the
//! same run, each batch's time against batch 1's on the same kernel, and the speed-up over
//! the same matmul in dense bf16, twice: through cuBLAS (`cublasGemmEx`, bf16 in and out,
//! f32 sums: the baseline; its output is checked against an f64 host product first)
//! and through Vellum's own dense kernels (the faster of its GEMV and GEMM). Where cuBLAS does not load, its column says `-`
//! and the reason is printed.
//!
//! Kernel time: 20 launches back to back on resident buffers, then one synchronize; the best
//! of 5 such rounds. Needs GPU 0; without one it says SKIPPED and exits 0.
//! `CUDA_GEMV_EMULATED=1` runs it on the CPU emulator at 1/16 of each dimension instead: a
//! check that the benchmark itself works, not a measurement.
//!
//!   cargo bench --bench cuda_gemv       # on a machine with a GPU and Rust
//!   scripts/gpu-check.sh run            # the executable carried to a GPU machine

use half::bf16;
use std::time::Instant;
use vellum_kernels::cuda::{CudaBackend, DeviceBuffer, KernelRuntime};
use vellum_kernels::{Backend, QuantTarget, Weight, WeightData};
use vellum_quant::DType;

const SHAPES: [(usize, usize); 3] = [(4096, 4096), (4096, 14336), (14336, 4096)];
/// Activation rows: decode batches of 1 and 16, and a prefill.
const BATCHES: [usize; 3] = [1, 16, 256];
/// The quantized kernels, by the row count from which the backend takes the GEMM.
const KERNELS: [(&str, usize); 2] = [("GEMV", usize::MAX), ("GEMM", 1)];
/// Split-K targets swept for the GEMM on the first shape (blocks per multiprocessor).
const BLOCKS_PER_SM: [usize; 5] = [1, 2, 4, 8, 16];
/// Launches per timed round, and rounds (the best is kept, after a warm-up round).
#[derive(Clone, Copy)]
struct Timing {
    launches: u32,
    rounds: usize,
}
const GPU_TIMING: Timing = Timing {
    launches: 20,
    rounds: 5,
};
/// On the emulator the benchmark only checks itself: one launch per cell.
const EMULATED_TIMING: Timing = Timing {
    launches: 1,
    rounds: 1,
};

fn main() {
    let emulated = std::env::var_os("CUDA_GEMV_EMULATED").is_some();
    let be = match emulated {
        true => CudaBackend::emulated(),
        false => CudaBackend::gpu(0),
    };
    let be = match be {
        Ok(be) => be,
        Err(e) => {
            eprintln!("cuda_gemv SKIPPED: {e}");
            return;
        }
    };
    let (scale, timing) = match emulated {
        true => (16, EMULATED_TIMING),
        false => (1, GPU_TIMING),
    };
    if let Err(e) = run(&be, scale, timing) {
        eprintln!("cuda_gemv FAILED: {e}");
        std::process::exit(1);
    }
}

/// The benchmark with every dimension divided by `scale`.
fn run(be: &CudaBackend, scale: usize, timing: Timing) -> Result<(), Box<dyn std::error::Error>> {
    let rt = be.runtime();
    println!("device: {}", rt.name());
    let floats = (64 << 20) / scale / scale; // 256 MiB each way on a GPU
    let (a, b) = (
        DeviceBuffer::zeroed(rt, floats * 4)?,
        DeviceBuffer::zeroed(rt, floats * 4)?,
    );
    let copy = kernel_seconds(rt, timing, || be.copy_device(&a, &b, floats))?;
    let copy_gbs = 2.0 * floats as f64 * 4.0 / copy / 1e9; // read + write
    println!("device-to-device copy: {copy_gbs:.0} GB/s (read + write)\n");
    println!("| K x N | weights | kernel | batch | µs | GB/s | % of copy | vs batch 1 | vs bf16 | vs cuBLAS bf16 |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut blas_note = None;
    let mut sweep = Vec::new();
    for (shape, (k, n)) in SHAPES
        .map(|(k, n)| (k / scale, n / scale))
        .into_iter()
        .enumerate()
    {
        let values: Vec<f32> = (0..n * k)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 2001) as f32 / 1000.0 - 1.0)
            .map(|v| v * 0.05)
            .collect();
        let dense = Weight::dense(n, k, DType::BF16, &values)?;
        drop(values);
        let xs: Vec<f32> = (0..BATCHES[2] * k)
            .map(|i| ((i * 7919 % 1001) as f32 / 1000.0 - 0.5) * 0.02)
            .collect();
        let blas_us = match blas_baseline(rt, timing, &dense, &xs)? {
            Ok(us) => us.map(Some),
            Err(why) => {
                blas_note.get_or_insert(why);
                [None; BATCHES.len()]
            }
        };
        let formats = [
            ("bf16", dense.clone()),
            (
                "int8 per channel",
                dense.quantize(QuantTarget::Int8PerChannel)?,
            ),
            ("int4 g32 sym (Q4_0)", dense.quantize(parse("q4_0"))?),
            ("int4 g128 sym", dense.quantize(parse("int4:g128:sym"))?),
        ];
        let mut bf16_us = [0f64; BATCHES.len()];
        for (name, mut w) in formats {
            be.prepare_weight(&mut w)?;
            if shape == 0 && name != "bf16" {
                sweep.extend(split_sweep(be, timing, &w, &xs, copy_gbs)?);
            }
            for (kernel, min_rows) in KERNELS {
                be.set_gemm_min_rows(min_rows);
                let mut batch1_us = 0.0;
                for (i, rows) in BATCHES.into_iter().enumerate() {
                    let x = DeviceBuffer::upload(rt, &xs[..rows * k])?;
                    let out = DeviceBuffer::zeroed(rt, rows * n * 4)?;
                    let us =
                        1e6 * kernel_seconds(rt, timing, || be.matmul_device(&w, &x, &out, rows))?;
                    let gbs = w.bytes() as f64 / (us * 1e-6) / 1e9;
                    if name == "bf16" {
                        // The faster of Vellum's two dense kernels: the baseline of the rest.
                        bf16_us[i] = if bf16_us[i] > 0.0 {
                            bf16_us[i].min(us)
                        } else {
                            us
                        };
                    }
                    if rows == 1 {
                        batch1_us = us;
                    }
                    println!(
                        "| {k} x {n} | {name} | {kernel} | {rows} | {us:.1} | {gbs:.0} | {:.0}% | {:.2}x | {:.2}x | {} |",
                        100.0 * gbs / copy_gbs,
                        us / batch1_us,
                        bf16_us[i] / us,
                        blas_us[i].map_or("-".into(), |b| format!("{:.2}x", b / us)),
                    );
                }
            }
        }
    }
    println!(
        "\nGEMM split-K sweep at {} x {}:\n",
        SHAPES[0].0 / scale,
        SHAPES[0].1 / scale
    );
    println!("| weights | batch | blocks per SM | µs | GB/s | % of copy |");
    println!("|---|---|---|---|---|---|");
    for row in sweep {
        println!("{row}");
    }
    if let Some(why) = blas_note {
        println!("\ncuBLAS baseline left out: {why}");
    }
    Ok(())
}

/// The GEMM on `w` at decode batches 1 and 16 for each split-K target of [`BLOCKS_PER_SM`],
/// as table rows; leaves the backend at its defaults.
fn split_sweep(
    be: &CudaBackend,
    timing: Timing,
    w: &Weight,
    xs: &[f32],
    copy_gbs: f64,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let rt = be.runtime();
    let (k, n) = (w.cols, w.rows);
    let name = w.format_name();
    be.set_gemm_min_rows(1);
    let default_blocks = be.gemm_blocks_per_sm();
    let mut rows_out = Vec::new();
    for rows in [1usize, 16] {
        let x = DeviceBuffer::upload(rt, &xs[..rows * k])?;
        let out = DeviceBuffer::zeroed(rt, rows * n * 4)?;
        for blocks in BLOCKS_PER_SM {
            be.set_gemm_blocks_per_sm(blocks);
            let us = 1e6 * kernel_seconds(rt, timing, || be.matmul_device(w, &x, &out, rows))?;
            let gbs = w.bytes() as f64 / (us * 1e-6) / 1e9;
            rows_out.push(format!(
                "| {name} | {rows} | {blocks} | {us:.1} | {gbs:.0} | {:.0}% |",
                100.0 * gbs / copy_gbs
            ));
        }
    }
    be.set_gemm_blocks_per_sm(default_blocks);
    Ok(rows_out)
}

/// cuBLAS's time in µs for the bf16 matmul of `dense` at each of [`BATCHES`], after checking its
/// result against an f64 product on the host (a wrong call must not pass as a fast one);
/// `Err(why)` where cuBLAS is not available or its result is wrong.
fn blas_baseline(
    rt: &dyn KernelRuntime,
    timing: Timing,
    dense: &Weight,
    xs: &[f32],
) -> Result<Result<[f64; BATCHES.len()], String>, Box<dyn std::error::Error>> {
    let (n, k) = (dense.rows, dense.cols);
    let WeightData::BF16(w_host) = &dense.data else {
        return Err("the baseline weight is not bf16".into());
    };
    let w = DeviceBuffer::upload(rt, w_host)?;
    let xs: Vec<bf16> = xs.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut us = [0f64; BATCHES.len()];
    for (i, rows) in BATCHES.into_iter().enumerate() {
        let x = DeviceBuffer::upload(rt, &xs[..rows * k])?;
        let y = DeviceBuffer::zeroed(rt, rows * n * 2)?;
        let gemm = || rt.blas_gemm_bf16(w.ptr(), x.ptr(), y.ptr(), rows, n, k);
        if let Err(e) = gemm().and_then(|_| rt.synchronize()) {
            return Ok(Err(e.to_string()));
        }
        let got: Vec<bf16> = y.to_vec()?;
        let r = rows - 1; // the last activation row: a transposed call would not give it
        let mut worst = 0f64;
        let mut scale = 1e-6f64;
        for j in 0..n {
            let exact: f64 = (0..k)
                .map(|c| w_host[j * k + c].to_f64() * xs[r * k + c].to_f64())
                .sum();
            worst = worst.max((got[r * n + j].to_f64() - exact).abs());
            scale = scale.max(exact.abs());
        }
        if worst > 0.02 * scale {
            return Ok(Err(format!(
                "its {k} x {n} result is off by {worst} (outputs up to {scale}): a wrong call"
            )));
        }
        us[i] = 1e6 * kernel_seconds(rt, timing, || gemm().map_err(Into::into))?;
    }
    Ok(Ok(us))
}

fn parse(target: &str) -> QuantTarget {
    QuantTarget::parse(target).expect("a known target")
}

/// Seconds per launch of `launch`: `timing.launches` back to back, then a synchronize; the
/// best of `timing.rounds`, after a warm-up round.
fn kernel_seconds(
    rt: &dyn KernelRuntime,
    timing: Timing,
    launch: impl Fn() -> vellum_kernels::Result<()>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut best = f64::INFINITY;
    for round in 0..=timing.rounds {
        let start = Instant::now();
        for _ in 0..timing.launches {
            launch()?;
        }
        rt.synchronize()?;
        if round > 0 {
            best = best.min(start.elapsed().as_secs_f64() / timing.launches as f64);
        }
    }
    Ok(best)
}
