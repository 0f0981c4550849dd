//! `vellum convert`: writes a loaded checkpoint as a Hugging Face directory (config.json,
//! model.safetensors, tokenizer files) that transformers loads as it is.

use crate::error::{io_err, EngineError, Result};
use crate::loader::Checkpoint;
use crate::model::{Model, LINEAR_NAMES};
use crate::tokenizer::Tokenizer;
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;
use vellum_kernels::{QuantTarget, Tensor, Weight, WeightData};
use vellum_quant::dtype::encode_le;
use vellum_quant::DType;

/// A tensor's Hugging Face name, shape and values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Every tensor of `model` in Hugging Face naming and layout, dequantized to f32.
pub fn hf_tensors(model: &Model) -> Result<Vec<NamedTensor>> {
    let mut out = Vec::new();
    let mut mat = |name: String, w: &Weight| out.push((name, vec![w.rows, w.cols], w.to_f32()));
    mat("model.embed_tokens.weight".into(), &model.embed);
    if let Some(head) = &model.lm_head {
        mat("lm_head.weight".into(), head);
    }
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (name, w) in LINEAR_NAMES.iter().zip(l.linears()) {
            mat(format!("{p}.{name}.weight"), w);
        }
    }
    let mut vec = |name: String, v: &Tensor| -> Result<()> {
        out.push((name, vec![v.len()], v.to_vec()?));
        Ok(())
    };
    vec("model.norm.weight".into(), &model.norm)?;
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        vec(format!("{p}.input_layernorm.weight"), &l.attn_norm)?;
        vec(format!("{p}.post_attention_layernorm.weight"), &l.mlp_norm)?;
        for (name, b) in [
            ("q_proj", &l.q_bias),
            ("k_proj", &l.k_bias),
            ("v_proj", &l.v_bias),
        ] {
            if let Some(b) = b {
                vec(format!("{p}.self_attn.{name}.bias"), b)?;
            }
        }
    }
    Ok(out)
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

/// Writes `checkpoint` to `out_dir` with every weight dense in `dtype` (quantized GGUF weights
/// dequantized).
pub fn convert(checkpoint: &Checkpoint, out_dir: &Path, dtype: DType) -> Result<()> {
    let model = checkpoint.load_model()?;
    write_checkpoint(&model, checkpoint.tokenizer.as_ref(), out_dir, dtype)
}

/// `vellum quantize`: writes `checkpoint` with its linear layers quantized to `target` (from
/// their values as loaded) and everything else dense in `dtype`; config.json records the
/// format in `quantization_config`, and Vellum loads the result back identically.
pub fn quantize(
    checkpoint: &Checkpoint,
    out_dir: &Path,
    target: QuantTarget,
    dtype: DType,
) -> Result<Model> {
    let mut model = checkpoint.load_model()?;
    model.quantize_linears(target)?;
    write_checkpoint(&model, checkpoint.tokenizer.as_ref(), out_dir, dtype)?;
    Ok(model)
}

/// One tensor to write: safetensors dtype, shape, little-endian bytes.
type Encoded = (String, Dtype, Vec<usize>, Vec<u8>);

/// A linear layer as stored: quantized formats as raw values (+ scales), dense in `dtype`.
fn encode_linear(name: &str, w: &Weight, dtype: DType, out: &mut Vec<Encoded>) {
    match &w.data {
        WeightData::Int8PerRow { q, scales } => {
            out.push((
                name.into(),
                Dtype::I8,
                vec![w.rows, w.cols],
                q.iter().map(|&v| v as u8).collect(),
            ));
            let mut bytes = Vec::with_capacity(scales.len() * 4);
            encode_le(DType::F32, scales, &mut bytes);
            out.push((format!("{name}_scale"), Dtype::F32, vec![w.rows], bytes));
        }
        WeightData::Int4(_, d) => {
            let groups = d.scales.len() / w.rows.max(1);
            out.push((
                name.into(),
                Dtype::U8,
                vec![w.rows, w.cols / 2],
                d.packed.clone(),
            ));
            let f16_bytes = |v: &[half::f16]| v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let shape = vec![w.rows, groups];
            out.push((
                format!("{name}_scale"),
                Dtype::F16,
                shape.clone(),
                f16_bytes(&d.scales),
            ));
            if !d.mins.is_empty() {
                out.push((format!("{name}_min"), Dtype::F16, shape, f16_bytes(&d.mins)));
            }
        }
        WeightData::Block(_, bytes) => {
            out.push((
                name.into(),
                Dtype::U8,
                vec![w.rows, bytes.len() / w.rows.max(1)],
                bytes.clone(),
            ));
        }
        _ => out.push(encode_dense(name, vec![w.rows, w.cols], &w.to_f32(), dtype)),
    }
}

fn encode_dense(name: &str, shape: Vec<usize>, values: &[f32], dtype: DType) -> Encoded {
    let mut bytes = Vec::with_capacity(values.len() * dtype.size());
    encode_le(dtype, values, &mut bytes);
    (name.into(), st_dtype(dtype), shape, bytes)
}

/// Writes a Hugging Face directory for `model`: config.json (with `quantization_config`
/// when the linear layers are quantized), generation_config.json, tokenizer files and
/// model.safetensors.
pub fn write_checkpoint(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    out_dir: &Path,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    };
    let write = |name: &str, text: String| {
        let p = out_dir.join(name);
        std::fs::write(&p, text).map_err(io_err(&p))
    };
    // Linear layers are written quantized only when `quantize_linears` made them all one
    // format (it records it in the config); otherwise everything is dense.
    let quantized = model.config.quantization.is_some();
    let config = model.config.to_hf_json(torch_dtype);
    write(
        "config.json",
        serde_json::to_string_pretty(&config).expect("JSON value"),
    )?;
    let mut gen = serde_json::json!({"do_sample": false});
    if let Some(b) = model.config.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    if !model.config.eos_token_ids.is_empty() {
        gen["eos_token_id"] = model.config.eos_token_ids.clone().into();
    }
    write(
        "generation_config.json",
        serde_json::to_string_pretty(&gen).expect("JSON value"),
    )?;
    if let Some(tok) = tokenizer {
        write("tokenizer.json", tok.json().to_string())?;
        write(
            "tokenizer_config.json",
            serde_json::to_string_pretty(&tok.config_json()).expect("JSON value"),
        )?;
    }
    let mut tensors: Vec<Encoded> = Vec::new();
    tensors.push(encode_dense(
        "model.embed_tokens.weight",
        vec![model.embed.rows, model.embed.cols],
        &model.embed.to_f32(),
        dtype,
    ));
    if let Some(h) = &model.lm_head {
        tensors.push(encode_dense(
            "lm_head.weight",
            vec![h.rows, h.cols],
            &h.to_f32(),
            dtype,
        ));
    }
    // Norms and biases are tiny: a quantized checkpoint keeps them f32 so that it loads back
    // exactly; a converted one writes them like every other tensor.
    let small = if quantized { DType::F32 } else { dtype };
    tensors.push(encode_dense(
        "model.norm.weight",
        vec![model.norm.len()],
        &model.norm.host()?,
        small,
    ));
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (name, w) in LINEAR_NAMES.iter().zip(l.linears()) {
            let name = format!("{p}.{name}.weight");
            if quantized {
                encode_linear(&name, w, dtype, &mut tensors);
            } else {
                tensors.push(encode_dense(
                    &name,
                    vec![w.rows, w.cols],
                    &w.to_f32(),
                    dtype,
                ));
            }
        }
        tensors.push(encode_dense(
            &format!("{p}.input_layernorm.weight"),
            vec![l.attn_norm.len()],
            &l.attn_norm.host()?,
            small,
        ));
        tensors.push(encode_dense(
            &format!("{p}.post_attention_layernorm.weight"),
            vec![l.mlp_norm.len()],
            &l.mlp_norm.host()?,
            small,
        ));
        for (name, b) in [
            ("q_proj", &l.q_bias),
            ("k_proj", &l.k_bias),
            ("v_proj", &l.v_bias),
        ] {
            if let Some(b) = b {
                tensors.push(encode_dense(
                    &format!("{p}.self_attn.{name}.bias"),
                    vec![b.len()],
                    &b.host()?,
                    small,
                ));
            }
        }
    }
    let views = tensors
        .iter()
        .map(|(name, st, shape, bytes)| {
            TensorView::new(*st, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| EngineError::Tensor {
                    path: out_dir.to_path_buf(),
                    tensor: name.clone(),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let st_path = out_dir.join("model.safetensors");
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), &st_path).map_err(|e| EngineError::Format {
        path: st_path.clone(),
        msg: e.to_string(),
    })
}
