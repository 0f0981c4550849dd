//! Parity of the weight-quantized CUDA matmuls (W4A16, W8A16) with vellum-quant's reference
//! dequantize and an f64 matmul, for every int4 group size and symmetry, GGUF Q4_0/Q4_1/Q8_0
//! (repacked at upload) and per-channel int8, and dense f16/bf16 rows, on shapes that are not multiples of the
//! kernels' tiles (k not a multiple of 256, n not of 128, a short last int4 group): the
//! warp-per-column GEMV (`qmatmul.cu`) and the tensor-core GEMM (`qgemm.cu`, its MMAs
//! emulated from the PTX fragment layout), split along k and not. Under the CPU emulator
//! always; on GPU 0 too when it is usable.

use half::{bf16, f16};
mod common;
use common::backends;
use std::sync::Arc;
use vellum_kernels::cuda::emu::EmuRuntime;
use vellum_kernels::cuda::{Arg, CudaBackend, DeviceBuffer, LaunchConfig};
use vellum_kernels::{Backend, QuantTarget, Tensor, Weight, WeightData};
use vellum_quant::{DType, Int4Format, ScaleSearch};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Every quantized format the kernels read, built from the same values, and the dense f16
/// and bf16 rows the GEMM reads too.
fn formats(n: usize, k: usize, v: &[f32]) -> Vec<Weight> {
    let dense = Weight::from_f32(n, k, v.to_vec()).unwrap();
    let half_rows = [DType::F16, DType::BF16].map(|d| Weight::dense(n, k, d, v).unwrap());
    let mut out: Vec<Weight> = [
        "int8",
        "q8_0",
        "int4",
        "int4:sym",
        "int4:g64",
        "int4:g128:sym",
    ]
    .iter()
    .map(|t| dense.quantize(QuantTarget::parse(t).unwrap()).unwrap())
    .collect();
    for group in Int4Format::GROUPS {
        for symmetric in [false, true] {
            let f = Int4Format::new(group, symmetric).unwrap();
            let d = f.quantize(n, k, v, ScaleSearch::RoundToNearest).unwrap();
            out.push(Weight::new(n, k, WeightData::Int4(f, d)).unwrap());
        }
    }
    out.extend(half_rows);
    out
}

/// out = x · wᵀ (+ bias) in f64 from the reference dequantize, and the scale of each output's
/// terms (Σ|x·w|) for a relative bound.
fn reference(x: &[f32], w: &Weight, bias: Option<&[f32]>) -> (Vec<f32>, Vec<f64>) {
    let k = w.cols;
    let wf = w.to_f32();
    let mut out = Vec::new();
    let mut mag = Vec::new();
    for xr in x.chunks(k) {
        for (c, wr) in wf.chunks(k).enumerate() {
            let dot: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let m: f64 = xr
                .iter()
                .zip(wr)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            out.push((dot + bias.map_or(0.0, |b| b[c] as f64)) as f32);
            mag.push(m + 1.0);
        }
    }
    (out, mag)
}

/// The two kernels, and how far each may be from the f64 reference as a fraction of an
/// output's Σ|x·w|: the GEMV sums exact f32 products; the GEMM rounds x and the dequantized
/// weight to f16 (each at most 2^-11 relative) before its f32 sums.
const KERNELS: [(&str, usize, f64); 2] = [("GEMV", usize::MAX, 1e-6), ("GEMM", 1, 1.2e-3)];

/// (3, 576, 33), (9, 320, 130) and (16, 1536, 7) are split along k on the emulator's 8
/// multiprocessors; (40, 576, 70) sums k in chunks in one block.
const ODD_SHAPES: [(usize, usize, usize); 6] = [
    (1, 96, 5),
    (3, 576, 33),
    (9, 320, 130),
    (16, 1536, 7),
    (17, 96, 3),
    (40, 576, 70),
];

/// `be`'s matmuls through `kernel` against the reference, every format, with and without
/// bias, on each `(rows, k, n)`.
fn check_parity(
    be: &CudaBackend,
    (kernel, min_rows, tolerance): (&str, usize, f64),
    shapes: &[(usize, usize, usize)],
) {
    be.set_gemm_min_rows(min_rows);
    for &(rows, k, n) in shapes {
        let v = values(n * k, (k * n) as u64);
        let x = values(rows * k, 7 + k as u64);
        let bias = values(n, 3);
        for w in formats(n, k, &v) {
            for b in [None, Some(&bias[..])] {
                let mut got = Tensor::zeros(rows * n);
                let bias_t = b.map(Tensor::from);
                be.matmul(&Tensor::from(&x[..]), &w, bias_t.as_ref(), &mut got)
                    .unwrap();
                let got = got.to_vec().unwrap();
                let (want, mag) = reference(&x, &w, b);
                for (i, ((g, w_), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                    let err = (g - w_).abs() as f64 / m;
                    assert!(
                        err < tolerance,
                        "{} {kernel} {} {rows}x{k}x{n} bias {}: output {i}: {g} vs {w_} \
                         ({err:.1e} of the terms)",
                        be.name(),
                        w.format_name(),
                        b.is_some()
                    );
                }
            }
        }
    }
}

#[test]
fn quantized_matmuls_match_the_reference_for_every_format_and_odd_shapes() {
    for be in backends() {
        for kernel in KERNELS {
            check_parity(&be, kernel, &ODD_SHAPES);
        }
    }
}

/// The GEMM compiled as for a T4 (sm_75), where each m16n8k16 is two m16n8k8 MMAs: the
/// emulator runs that path with the k8 instruction emulated from its own fragment layout.
#[test]
fn the_sm75_gemm_path_matches_the_reference_under_the_emulator() {
    let rt = EmuRuntime::with_arch(75).expect("the CUDA emulator needs g++");
    let be = CudaBackend::new(Arc::new(rt));
    assert_eq!(be.name(), "cuda-emulator (sm_75)");
    check_parity(&be, KERNELS[1], &ODD_SHAPES[1..4]);
    let err = EmuRuntime::with_arch(70).err().expect("sm_70 is no target");
    assert!(err.to_string().contains("sm_70"), "{err}");
}

/// The Backend trait's promise on the tensor-core GEMM: a row's result is the same bits
/// whether it is alone, in a decode batch (split along k) or in a prefill batch of several
/// 64-row tiles (k summed in one block).
#[test]
fn a_gemm_row_does_not_depend_on_the_rest_of_the_batch() {
    let (k, n) = (576usize, 70usize);
    let v = values(n * k, 5);
    let x = values(90 * k, 6);
    let bias = values(n, 8);
    for be in backends() {
        for w in formats(n, k, &v).into_iter().step_by(3) {
            let bias = Tensor::from(&bias[..]);
            let mut batch = Tensor::zeros(90 * n);
            be.matmul(&Tensor::from(&x[..]), &w, Some(&bias), &mut batch)
                .unwrap();
            let batch = batch.to_vec().unwrap();
            for rows in [1, 5, 16] {
                let mut part = Tensor::zeros(rows * n);
                let x = Tensor::from(&x[..rows * k]);
                be.matmul(&x, &w, Some(&bias), &mut part).unwrap();
                let part = part.to_vec().unwrap();
                assert_eq!(
                    part.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    batch[..rows * n]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "{} {}: the first {rows} rows alone vs in a batch of 90",
                    be.name(),
                    w.format_name()
                );
            }
        }
    }
}

/// The 16-bit activation instantiations of both kernels, launched directly.
#[test]
fn f16_and_bf16_activations_match_the_f32_kernels() {
    let (rows, k, n) = (4usize, 320usize, 9usize);
    let v = values(n * k, 11);
    let x = values(rows * k, 12);
    let f = Int4Format::new(128, false).unwrap();
    let d = f.quantize(n, k, &v, ScaleSearch::RoundToNearest).unwrap();
    let w4 = Weight::new(n, k, WeightData::Int4(f, d.clone())).unwrap();
    let w8 = Weight::from_f32(n, k, v.clone())
        .unwrap()
        .quantize(QuantTarget::Int8PerChannel)
        .unwrap();
    let WeightData::Int8PerRow { q, scales } = &w8.data else {
        unreachable!("int8 per channel")
    };
    for be in backends() {
        let rt = be.runtime();
        let cfg = LaunchConfig::linear((n as u32).div_ceil(4), 128);
        let shape = [rows, k, n].map(|s| Arg::U32(s as u32));
        let (packed, sc, mins) = (
            DeviceBuffer::upload(rt, &d.packed).unwrap(),
            DeviceBuffer::upload(rt, &d.scales).unwrap(),
            DeviceBuffer::upload(rt, &d.mins).unwrap(),
        );
        let codes: Vec<u8> = q.iter().map(|&c| c as u8).collect();
        let (q8, s8) = (
            DeviceBuffer::upload(rt, &codes).unwrap(),
            DeviceBuffer::upload(rt, scales).unwrap(),
        );
        for (ty, tol) in [("f16", 2e-3f32), ("bf16", 1.6e-2)] {
            let (xd, xr): (DeviceBuffer, Vec<f32>) = if ty == "f16" {
                let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                (
                    DeviceBuffer::upload(rt, &h).unwrap(),
                    h.iter().map(|v| v.to_f32()).collect(),
                )
            } else {
                let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                (
                    DeviceBuffer::upload(rt, &h).unwrap(),
                    h.iter().map(|v| v.to_f32()).collect(),
                )
            };
            for (kernel, w) in [("matmul_w4", &w4), ("matmul_w8", &w8)] {
                let od = DeviceBuffer::zeroed(rt, rows * n * 2).unwrap();
                let mut args = if kernel == "matmul_w4" {
                    vec![
                        xd.arg(),
                        packed.arg(),
                        sc.arg(),
                        mins.arg(),
                        Arg::Ptr(0),
                        od.arg(),
                    ]
                } else {
                    vec![xd.arg(), q8.arg(), s8.arg(), Arg::Ptr(0), od.arg()]
                };
                args.extend(shape);
                args.push(Arg::U32(if kernel == "matmul_w4" { 128 } else { k as u32 }));
                rt.launch("qmatmul", &format!("{kernel}_{ty}"), &cfg, &args)
                    .unwrap();
                let got: Vec<f32> = if ty == "f16" {
                    od.to_vec::<f16>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_f32())
                        .collect()
                } else {
                    od.to_vec::<bf16>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_f32())
                        .collect()
                };
                let (want, _) = reference(&xr, w, None);
                let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                for (g, w_) in got.iter().zip(&want) {
                    assert!(
                        (g - w_).abs() <= tol * scale,
                        "{} {kernel}_{ty}: {g} vs {w_}",
                        be.name()
                    );
                }
            }
        }
    }
}

/// Q/K/V and gate/up as one grouped launch (`matmul_many` on prepared weights) give, bit for
/// bit, what one launch per weight gives: several formats, a decode and a prefill batch,
/// parts of different widths (so different splits of k), two or three parts, with and
/// without biases; and the group is one launch.
#[test]
fn grouped_gemm_matches_one_launch_per_weight() {
    use vellum_kernels::cuda::counting::Counting;
    use vellum_kernels::MatmulPart;
    let k = 256;
    let widths = [256usize, 128, 70];
    let counted = Arc::new(Counting::new(Arc::new(EmuRuntime::new().unwrap())));
    let mut bes = vec![CudaBackend::new(counted.clone())];
    bes.extend(backends().into_iter().skip(1)); // GPU 0, when there is one
    let n_formats = formats(64, 64, &values(64 * 64, 1)).len();
    for (b, be) in bes.iter().enumerate() {
        // Every third format, and the last (dense bf16 rows).
        for f in (0..n_formats).step_by(3).chain([n_formats - 1]) {
            let ws: Vec<Weight> = widths
                .iter()
                .map(|&n| {
                    let mut w = formats(n, k, &values(n * k, n as u64)).swap_remove(f);
                    be.prepare_weight(&mut w).unwrap();
                    w
                })
                .collect();
            let biases: Vec<Tensor> = widths.iter().map(|&n| Tensor::from(values(n, 3))).collect();
            for (rows, count, with_bias) in [(1, 3, true), (1, 2, false), (40, 3, false)] {
                let x = Tensor::from(values(rows * k, 7));
                let bias = |i: usize| with_bias.then_some(&biases[i]);
                let mut outs: Vec<Tensor> = widths[..count]
                    .iter()
                    .map(|&n| Tensor::zeros(rows * n))
                    .collect();
                counted.take_launches();
                let mut parts: Vec<MatmulPart> = ws
                    .iter()
                    .zip(outs.iter_mut())
                    .enumerate()
                    .map(|(i, (w, out))| MatmulPart {
                        w,
                        bias: bias(i),
                        out,
                    })
                    .collect();
                be.matmul_many(&x, &mut parts).unwrap();
                let what = format!(
                    "{} {} rows {rows} parts {count}",
                    be.name(),
                    ws[0].format_name()
                );
                if b == 0 {
                    assert_eq!(counted.take_launches(), 1, "{what}: one launch");
                }
                for (i, grouped) in outs.iter().enumerate() {
                    let mut alone = Tensor::zeros(grouped.len());
                    be.matmul(&x, &ws[i], bias(i), &mut alone).unwrap();
                    let bits = |t: &Tensor| {
                        t.to_vec()
                            .unwrap()
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(bits(grouped), bits(&alone), "{what}: part {i}");
                }
            }
        }
    }
}

/// The MLP's activation and down projection as one launch (`silu_mul_matmul` on a prepared
/// weight: the GEMM computes silu(gate) · up as it loads its rows) give, bit for bit, the
/// two ops: several formats, a decode batch (split along k) and a
/// prefill batch; and it is one launch.
#[test]
fn silu_fused_into_the_gemm_matches_the_two_ops() {
    use vellum_kernels::cuda::counting::Counting;
    let (k, n) = (320, 96);
    let counted = Arc::new(Counting::new(Arc::new(EmuRuntime::new().unwrap())));
    let mut bes = vec![CudaBackend::new(counted.clone())];
    bes.extend(backends().into_iter().skip(1)); // GPU 0, when there is one
    let all = formats(n, k, &values(n * k, 5));
    for (b, be) in bes.iter().enumerate() {
        for f in (0..all.len()).step_by(2) {
            let mut w = all[f].clone();
            be.prepare_weight(&mut w).unwrap();
            for rows in [1, 3, 70] {
                // Gates from about -6 to 6: silu's curved part and both tails.
                let gate: Vec<f32> = values(rows * k, 11).iter().map(|v| v * 12.0).collect();
                let up = Tensor::from(values(rows * k, 13));
                let mut fused = Tensor::zeros(rows * n);
                counted.take_launches();
                be.silu_mul_matmul(&mut Tensor::from(gate.clone()), &up, &w, &mut fused)
                    .unwrap();
                let what = format!("{} {} rows {rows}", be.name(), w.format_name());
                if b == 0 {
                    assert_eq!(counted.take_launches(), 1, "{what}: one launch");
                }
                let mut two_ops = Tensor::zeros(rows * n);
                let mut g = Tensor::from(gate);
                be.silu_mul(&mut g, &up).unwrap();
                be.matmul(&g, &w, None, &mut two_ops).unwrap();
                let bits = |t: &Tensor| -> Vec<u32> {
                    t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect()
                };
                assert_eq!(bits(&fused), bits(&two_ops), "{what}");
            }
        }
    }
}
