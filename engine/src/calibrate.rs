//! Calibrated quantization (GPTQ, `vellum_quant::gptq`), one layer at a time: run the
//! calibration tokens through the layer, sum each of its linear inputs' Hessian `Σ x xᵀ`,
//! quantize every linear weight against the Hessian of the input it reads, then run the
//! tokens through the quantized layer to get the next layer's inputs. Each layer is thus
//! calibrated on the activations the quantized layers before it produce, as it will see them
//! (GPTQ's sequential order), and only one layer's Hessians are in memory at a time.

use crate::engine::{Engine, Request};
use crate::error::{EngineError, Result};
use crate::model::{Activations, LinearInput, Model};
use crate::sampler::SamplingParams;
use ndarray::{linalg::general_mat_mul, Array2, ArrayView2};
use rayon::prelude::*;
use vellum_kernels::{Backend, BatchLayout, KvDtype, KvLayer, QuantTarget, Weight, WeightData};
use vellum_quant::{GptqFactor, ScaleSearch};

/// The default damping: this fraction of the mean Hessian diagonal is added to the diagonal
/// before factoring. GPTQ's paper uses 0.01; on SmolLM2 int8, 0.1 kept perplexity within
/// −0.26%..+0.11% of the f16 model over seven calibration sets, 0.01 within −0.12%..+0.41%
/// (benches/RESULTS.md): the larger damping trusts a Hessian from a few thousand tokens less.
pub const DEFAULT_DAMP: f64 = 0.1;

/// KV block size of the calibration passes (one sequence at a time, so any size works).
const BLOCK: usize = 16;

/// Quantizes `model`'s linear layers to `target` with GPTQ over `calibration` (token
/// sequences, each run from position 0), on `backend`: int8 per channel or planar int4
/// ([`gptq_supports`]), with `damp` ([`DEFAULT_DAMP`]). Bad arguments are refused before
/// anything changes; an error after that (a kernel's) leaves `model` partly quantized, to be
/// dropped.
pub fn quantize_linears_gptq(
    model: &mut Model,
    backend: &dyn Backend,
    target: QuantTarget,
    calibration: &[Vec<u32>],
    damp: f64,
) -> Result<()> {
    if !(damp.is_finite() && damp >= 0.0) {
        return Err(EngineError::InvalidRequest {
            field: "damp",
            msg: format!("GPTQ damping must be a finite number ≥ 0, got {damp}"),
        });
    }
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
    let mut passes = calibration
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| Pass::new(model, backend, s))
        .collect::<Result<Vec<_>>>()?;
    let tokens: usize = passes.iter().map(|p| p.acts.tokens()).sum();
    for i in 0..model.layers.len() {
        let hessians = layer_hessians(model, backend, i, &mut passes)?;
        for (index, w) in quantize_layer(model, target, damp, i, hessians)? {
            *model.layers[i].linears_mut()[index] = w;
        }
        // The next layer's inputs come from this layer quantized, as they will at run time.
        for p in &mut passes {
            rayon::scope(|_| {
                model.layer_forward(backend, i, &mut p.acts, &p.layout, &mut p.kv, None)
            })?;
        }
        tracing::info!(layer = i, tokens, "GPTQ: layer quantized");
    }
    model.config.quantization = Some(target);
    Ok(())
}

/// One calibration sequence on its way through the layers.
struct Pass {
    layout: BatchLayout,
    /// One layer's cache, rewritten by each layer (attention reads only this sequence).
    kv: KvLayer,
    /// The activations entering the next layer.
    acts: Activations,
}

impl Pass {
    fn new(model: &Model, backend: &dyn Backend, tokens: &[u32]) -> Result<Pass> {
        let (c, n) = (&model.config, tokens.len());
        let blocks = n.div_ceil(BLOCK);
        Ok(Pass {
            layout: BatchLayout {
                positions: (0..n as u32).collect(),
                slot_mapping: (0..n as u32).collect(),
                seq_offsets: vec![0, n],
                block_tables: vec![(0..blocks as u32).collect()],
                context_lens: vec![n],
            },
            kv: KvLayer::new(blocks, BLOCK, c.num_kv_heads, c.head_dim, KvDtype::F32),
            acts: model.embed_tokens(backend, tokens)?,
        })
    }
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

/// `Σ x xᵀ` of each input of layer `i` (in [`LinearInput::ALL`] order) over every
/// calibration token, with the layer as it is now; the passes' activations stay as they were.
fn layer_hessians(
    model: &Model,
    backend: &dyn Backend,
    i: usize,
    passes: &mut [Pass],
) -> Result<Vec<Array2<f32>>> {
    let c = &model.config;
    let width = |input: LinearInput| match input {
        LinearInput::Attention | LinearInput::Mlp => c.hidden_size,
        LinearInput::AttentionOutput => c.q_width(),
        LinearInput::MlpDown => c.intermediate_size,
    };
    let slot = |input: LinearInput| {
        LinearInput::ALL
            .iter()
            .position(|&x| x == input)
            .expect("ALL lists every input")
    };
    let mut sums: Vec<Array2<f32>> = LinearInput::ALL
        .iter()
        .map(|&x| Array2::zeros((width(x), width(x))))
        .collect();
    for p in passes {
        // The forward pass hands inputs one at a time; their products run in parallel after.
        let mut inputs: Vec<Vec<f32>> = vec![Vec::new(); sums.len()];
        let mut keep = |_: usize, input: LinearInput, x: &[f32]| inputs[slot(input)] = x.to_vec();
        let mut acts = p.acts.clone();
        rayon::scope(|_| {
            model.layer_forward(backend, i, &mut acts, &p.layout, &mut p.kv, Some(&mut keep))
        })?;
        sums.par_iter_mut().zip(&inputs).for_each(|(sum, x)| {
            let cols = sum.ncols();
            let x = ArrayView2::from_shape((x.len() / cols, cols), x)
                .expect("an input of [tokens, cols]");
            general_mat_mul(1.0, &x.t(), &x, 1.0, sum);
        });
    }
    Ok(sums)
}

/// Factors each Hessian of layer `i` and quantizes the weights that read its input:
/// `(index in Layer::linears, quantized weight)`.
fn quantize_layer(
    model: &Model,
    target: QuantTarget,
    damp: f64,
    i: usize,
    hessians: Vec<Array2<f32>>,
) -> Result<Vec<(usize, Weight)>> {
    let linears = model.layers[i].linears();
    let done: Vec<Vec<(usize, Weight)>> = LinearInput::ALL
        .into_par_iter()
        .zip(hessians)
        .map(|(input, h)| {
            let n = h.ncols();
            let h64: Vec<f64> = h.iter().map(|&v| v as f64).collect();
            drop(h);
            let factor = GptqFactor::new(&h64, n, damp).map_err(|e| gptq_error(i, e))?;
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
                    QuantTarget::Int8PerChannel => factor
                        .quantize_int8_per_row(&values)
                        .map(|(q, scales)| WeightData::Int8PerRow { q, scales }),
                    // Refused up front by `gptq_supports`.
                    QuantTarget::Block(f) => Err(vellum_quant::QuantError::Gptq(format!(
                        "{} is not a GPTQ grid",
                        f.name()
                    ))),
                }
                .map_err(|e| gptq_error(i, e))?;
                out.push((index, Weight::new(w.rows, w.cols, data)?));
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
