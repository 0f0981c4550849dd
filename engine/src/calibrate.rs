//! Calibrated quantization (GPTQ, `vellum_quant::gptq`): runs the dense model over
//! calibration tokens, sums each linear input's Hessian `Σ x xᵀ`, and quantizes every linear
//! weight against the Hessian of the input it reads.
//!
//! All Hessians come from the dense model's activations (not from partly quantized ones), so
//! the result does not depend on how many layers' Hessians fit in memory at once.

use crate::engine::{Engine, Request};
use crate::error::{EngineError, Result};
use crate::model::{LinearInput, Model};
use crate::sampler::SamplingParams;
use ndarray::{linalg::general_mat_mul, Array2, ArrayView2};
use rayon::prelude::*;
use vellum_kernels::{Backend, BatchLayout, KvDtype, QuantTarget, Weight, WeightData};
use vellum_quant::{GptqFactor, ScaleSearch};

/// GPTQ's damping: this fraction of the mean Hessian diagonal is added to the diagonal.
pub const DAMP: f64 = 0.01;

/// Bytes of Hessians (f32) held at once; a model needing more is calibrated over several
/// passes, each collecting a window of layers.
const HESSIAN_BUDGET: usize = 1 << 30;

/// KV block size of the calibration passes (one sequence at a time, so any size works).
const BLOCK: usize = 16;

/// Quantizes `model`'s linear layers to `target` with GPTQ over `calibration` (token
/// sequences, each run from position 0), on `backend`: int8 per channel or planar int4
/// ([`gptq_supports`]).
pub fn quantize_linears_gptq(
    model: &mut Model,
    backend: &dyn Backend,
    target: QuantTarget,
    calibration: &[Vec<u32>],
) -> Result<()> {
    if !gptq_supports(target) {
        let msg = if let QuantTarget::Int4(_, ScaleSearch::Mse) = target {
            "GPTQ rounds on round to nearest's grid: the MSE scale search (:mse) does not apply"
                .to_string()
        } else {
            format!(
                "GPTQ quantizes to int8 (per channel) or planar int4 (int4:g64, int4:g128, \
                 [:sym]), not {}",
                target.name()
            )
        };
        return Err(EngineError::InvalidRequest {
            field: "quant",
            msg,
        });
    }
    check_calibration(model, calibration)?;
    let c = &model.config;
    let per_layer = 4
        * (2 * c.hidden_size * c.hidden_size
            + c.q_width() * c.q_width()
            + c.intermediate_size * c.intermediate_size);
    let window = (HESSIAN_BUDGET / per_layer.max(1)).clamp(1, c.num_layers.max(1));
    let mut quantized = Vec::new();
    for first in (0..c.num_layers).step_by(window) {
        let layers = first..(first + window).min(c.num_layers);
        let hessians = collect_hessians(model, backend, calibration, layers.clone())?;
        tracing::info!(
            layers = ?layers,
            tokens = calibration.iter().map(Vec::len).sum::<usize>(),
            "GPTQ: Hessians collected"
        );
        quantized.extend(quantize_window(model, target, layers, hessians)?);
    }
    for (layer, index, w) in quantized {
        *model.layers[layer].linears_mut()[index] = w;
    }
    model.config.quantization = Some(target);
    Ok(())
}

/// Whether GPTQ can quantize to `target`: int8 per channel and planar int4 with round to
/// nearest's grid (the group-32 block formats and the MSE scale search are not supported).
pub fn gptq_supports(target: QuantTarget) -> bool {
    matches!(
        target,
        QuantTarget::Int8PerChannel | QuantTarget::Int4(_, ScaleSearch::RoundToNearest)
    )
}

fn check_calibration(model: &Model, calibration: &[Vec<u32>]) -> Result<()> {
    let c = &model.config;
    let invalid = |msg: String| {
        Err(EngineError::InvalidRequest {
            field: "calibration",
            msg,
        })
    };
    if calibration.iter().all(Vec::is_empty) {
        return invalid("no calibration tokens".into());
    }
    for (i, seq) in calibration.iter().enumerate() {
        if seq.len() > c.max_position_embeddings {
            return invalid(format!(
                "sequence {i} has {} tokens, past the model's {} positions",
                seq.len(),
                c.max_position_embeddings
            ));
        }
        if let Some(&t) = seq.iter().find(|&&t| t as usize >= c.vocab_size) {
            return invalid(format!(
                "sequence {i} has token {t}, outside the vocabulary of {}",
                c.vocab_size
            ));
        }
    }
    Ok(())
}

/// `Σ x xᵀ` of each linear input of `layers`, over every calibration token, in
/// `[layer - layers.start][LinearInput]` order.
fn collect_hessians(
    model: &Model,
    backend: &dyn Backend,
    calibration: &[Vec<u32>],
    layers: std::ops::Range<usize>,
) -> Result<Vec<Array2<f32>>> {
    let c = &model.config;
    let width = |input: LinearInput| match input {
        LinearInput::Attention | LinearInput::Mlp => c.hidden_size,
        LinearInput::AttentionOutput => c.q_width(),
        LinearInput::MlpDown => c.intermediate_size,
    };
    let slot = |layer: usize, input: LinearInput| {
        let k = LinearInput::ALL.iter().position(|&i| i == input);
        (layer - layers.start) * 4 + k.expect("ALL lists every input")
    };
    let mut sums: Vec<Array2<f32>> = layers
        .clone()
        .flat_map(|_| LinearInput::ALL.map(|i| Array2::zeros((width(i), width(i)))))
        .collect();
    for seq in calibration.iter().filter(|s| !s.is_empty()) {
        let n = seq.len();
        let blocks = n.div_ceil(BLOCK);
        let mut kv = model.new_kv_cache(blocks, BLOCK, KvDtype::F32);
        let layout = BatchLayout {
            positions: (0..n as u32).collect(),
            slot_mapping: (0..n as u32).collect(),
            seq_offsets: vec![0, n],
            block_tables: vec![(0..blocks as u32).collect()],
            context_lens: vec![n],
        };
        // The forward pass hands inputs one at a time; their products run in parallel after.
        let mut inputs: Vec<Option<Vec<f32>>> = vec![None; sums.len()];
        let mut keep = |layer: usize, input: LinearInput, x: &[f32]| {
            if layers.contains(&layer) {
                inputs[slot(layer, input)] = Some(x.to_vec());
            }
        };
        rayon::scope(|_| {
            model.forward_observed(backend, seq, &layout, &mut kv, &[n - 1], Some(&mut keep))
        })?;
        sums.par_iter_mut()
            .zip(inputs.par_iter())
            .for_each(|(sum, x)| {
                if let Some(x) = x {
                    let cols = sum.ncols();
                    let x = ArrayView2::from_shape((x.len() / cols, cols), x)
                        .expect("an input of [tokens, cols]");
                    general_mat_mul(1.0, &x.t(), &x, 1.0, sum);
                }
            });
    }
    Ok(sums)
}

/// Factors each Hessian of the window and quantizes the weights that read its input:
/// `(layer, index in Layer::linears, quantized weight)`.
fn quantize_window(
    model: &Model,
    target: QuantTarget,
    layers: std::ops::Range<usize>,
    hessians: Vec<Array2<f32>>,
) -> Result<Vec<(usize, usize, Weight)>> {
    let jobs: Vec<(usize, LinearInput, Array2<f32>)> = layers
        .flat_map(|l| LinearInput::ALL.map(move |i| (l, i)))
        .zip(hessians)
        .map(|((l, i), h)| (l, i, h))
        .collect();
    let done: Vec<Vec<(usize, usize, Weight)>> = jobs
        .into_par_iter()
        .map(|(layer, input, h)| {
            let n = h.ncols();
            let h64: Vec<f64> = h.iter().map(|&v| v as f64).collect();
            drop(h);
            let factor = GptqFactor::new(&h64, n, DAMP).map_err(|e| gptq_error(layer, e))?;
            let linears = model.layers[layer].linears();
            let mut out = Vec::new();
            for (index, w) in linears.iter().enumerate() {
                if LinearInput::OF_LINEARS[index] != input {
                    continue;
                }
                let values = w.to_f32();
                let data = match target {
                    QuantTarget::Int4(format, _) => factor
                        .quantize_int4(&values, format)
                        .map(|d| WeightData::Int4(format, d)),
                    _ => factor
                        .quantize_int8_per_row(&values)
                        .map(|(q, scales)| WeightData::Int8PerRow { q, scales }),
                }
                .map_err(|e| gptq_error(layer, e))?;
                out.push((layer, index, Weight::new(w.rows, w.cols, data)?));
            }
            Ok(out)
        })
        .collect::<Result<_>>()?;
    Ok(done.into_iter().flatten().collect())
}

fn gptq_error(layer: usize, e: vellum_quant::QuantError) -> EngineError {
    EngineError::InvalidRequest {
        field: "calibration",
        msg: format!("layer {layer}: {e}"),
    }
}

/// Calibration text the model writes itself: `sequences` samples of `tokens` tokens each from
/// its BOS token (or its first end-of-sequence token when it has none), at temperature 1,
/// seeded. Needs no data, and stays independent of whatever text the result is evaluated on.
pub fn sample_calibration(
    engine: &mut Engine,
    sequences: usize,
    tokens: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let c = &engine.model().config;
    let start = c
        .bos_token_id
        .or_else(|| engine.tokenizer().and_then(|t| t.bos_id))
        .or_else(|| c.eos_token_ids.first().copied())
        .ok_or_else(|| EngineError::InvalidRequest {
            field: "calibration",
            msg: "the model has no BOS or EOS token to start samples from".into(),
        })?;
    let requests = (0..sequences as u64)
        .map(|i| {
            let params = SamplingParams {
                temperature: 1.0,
                seed: Some(seed.wrapping_add(i)),
                max_tokens: tokens.saturating_sub(1).max(1),
                ignore_eos: true,
                ..SamplingParams::default()
            };
            Request::tokens(vec![start], params)
        })
        .collect();
    Ok(engine
        .generate(requests)?
        .into_iter()
        .map(|c| std::iter::once(start).chain(c.tokens).collect())
        .collect())
}
