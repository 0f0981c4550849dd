//! `vellum convert`: writes a loaded checkpoint as a Hugging Face directory (config.json,
//! model.safetensors, tokenizer files) that transformers loads as it is.

use crate::error::{io_err, EngineError, Result};
use crate::loader::Checkpoint;
use crate::model::Model;
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;
use vellum_kernels::Weight;
use vellum_quant::dtype::encode_le;
use vellum_quant::DType;

/// Every tensor of `model` in Hugging Face naming and layout, dequantized to f32.
pub fn hf_tensors(model: &Model) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    let mut mat = |name: String, w: &Weight| out.push((name, vec![w.rows, w.cols], w.to_f32()));
    mat("model.embed_tokens.weight".into(), &model.embed);
    if let Some(head) = &model.lm_head {
        mat("lm_head.weight".into(), head);
    }
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        mat(format!("{p}.self_attn.q_proj.weight"), &l.q);
        mat(format!("{p}.self_attn.k_proj.weight"), &l.k);
        mat(format!("{p}.self_attn.v_proj.weight"), &l.v);
        mat(format!("{p}.self_attn.o_proj.weight"), &l.o);
        mat(format!("{p}.mlp.gate_proj.weight"), &l.gate);
        mat(format!("{p}.mlp.up_proj.weight"), &l.up);
        mat(format!("{p}.mlp.down_proj.weight"), &l.down);
    }
    let mut vec = |name: String, v: &[f32]| out.push((name, vec![v.len()], v.to_vec()));
    vec("model.norm.weight".into(), &model.norm);
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        vec(format!("{p}.input_layernorm.weight"), &l.attn_norm);
        vec(format!("{p}.post_attention_layernorm.weight"), &l.mlp_norm);
        for (name, b) in [
            ("q_proj", &l.q_bias),
            ("k_proj", &l.k_bias),
            ("v_proj", &l.v_bias),
        ] {
            if let Some(b) = b {
                vec(format!("{p}.self_attn.{name}.bias"), b);
            }
        }
    }
    out
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

/// Writes `checkpoint` to `out_dir` with weights in `dtype`.
pub fn convert(checkpoint: &Checkpoint, out_dir: &Path, dtype: DType) -> Result<()> {
    let model = checkpoint.load_model()?;
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
    if let Some(tok) = &checkpoint.tokenizer {
        write("tokenizer.json", tok.json().to_string())?;
        write(
            "tokenizer_config.json",
            serde_json::to_string_pretty(&tok.config_json()).expect("JSON value"),
        )?;
    }
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = hf_tensors(&model)
        .into_iter()
        .map(|(name, shape, values)| {
            let mut bytes = Vec::with_capacity(values.len() * dtype.size());
            encode_le(dtype, &values, &mut bytes);
            (name, shape, bytes)
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(st_dtype(dtype), shape.clone(), bytes)
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
