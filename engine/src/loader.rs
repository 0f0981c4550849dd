//! Opens a checkpoint — a Hugging Face directory or a GGUF file — into a validated config,
//! tensor store and tokenizer.

use crate::config::ModelConfig;
use crate::error::{format_err, io_err, EngineError, Result};
use crate::gguf::{GgufFile, GgufMeta};
use crate::model::{Model, TensorLayout};
use crate::tensors::TensorStore;
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// An opened, not yet materialised checkpoint.
pub struct Checkpoint {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub store: TensorStore,
    pub tokenizer: Option<Tokenizer>,
    pub layout: TensorLayout,
    /// Metadata of a GGUF source.
    pub gguf: Option<GgufMeta>,
}

impl Checkpoint {
    /// Opens `path`: a directory with config.json + safetensors, or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if meta.is_dir() {
            open_hf_dir(path)
        } else {
            open_gguf(path)
        }
    }

    /// Builds the model, checking every tensor against the config.
    pub fn load_model(&self) -> Result<Model> {
        Model::load(self.config.clone(), &self.store, &self.path, self.layout)
    }

    /// Parameters counted over the tensors the model uses.
    pub fn num_params(&self) -> usize {
        self.store.infos().map(|t| t.numel()).sum()
    }
}

/// GGUF tensor names → Hugging Face names.
fn hf_name(gguf: &str) -> String {
    let simple = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    if let Some((_, hf)) = simple.iter().find(|(g, _)| *g == gguf) {
        return hf.to_string();
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_string();
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return gguf.to_string();
    };
    let parts = [
        ("attn_norm.weight", "input_layernorm.weight"),
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ("attn_q.weight", "self_attn.q_proj.weight"),
        ("attn_k.weight", "self_attn.k_proj.weight"),
        ("attn_v.weight", "self_attn.v_proj.weight"),
        ("attn_output.weight", "self_attn.o_proj.weight"),
        ("ffn_gate.weight", "mlp.gate_proj.weight"),
        ("ffn_up.weight", "mlp.up_proj.weight"),
        ("ffn_down.weight", "mlp.down_proj.weight"),
    ];
    match parts.iter().find(|(g, _)| *g == tail) {
        Some((_, hf)) => format!("model.layers.{layer}.{hf}"),
        None => gguf.to_string(),
    }
}

fn open_gguf(path: &Path) -> Result<Checkpoint> {
    let file = GgufFile::open(path)?;
    let (store, meta) = file.into_store(hf_name)?;
    let embed = store
        .get("model.embed_tokens.weight")
        .ok_or_else(|| EngineError::Tensor {
            path: path.to_path_buf(),
            tensor: "token_embd.weight".into(),
            msg: "missing from the checkpoint".into(),
        })?
        .0;
    let vocab = embed.shape.first().copied().unwrap_or(0);
    let mut config = ModelConfig::from_gguf(&meta, vocab)?;
    config.tie_word_embeddings = store.get("lm_head.weight").is_none();
    let tokenizer = Tokenizer::from_gguf(&meta)?;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        config,
        store,
        tokenizer: Some(tokenizer),
        layout: TensorLayout::GgufLlama,
        gguf: Some(meta),
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| format_err(path, format!("invalid JSON: {e}")))
}

fn open_hf_dir(dir: &Path) -> Result<Checkpoint> {
    let mut config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let mut store = TensorStore::default();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        store.add_safetensors(&single)?;
    } else if index.exists() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format_err(&index, "missing `weight_map` object"))?;
        let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            if shard.contains('/') || shard.contains("..") {
                return Err(format_err(
                    &index,
                    format!("shard name `{shard}` must be a plain file name"),
                ));
            }
            store.add_safetensors(&dir.join(shard))?;
        }
        for (tensor, shard) in map {
            if store
                .path_of(tensor)
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                != shard.as_str()
            {
                return Err(EngineError::Tensor {
                    path: index.clone(),
                    tensor: tensor.clone(),
                    msg: format!(
                        "listed in shard `{}` but not found there",
                        shard.as_str().unwrap_or("?")
                    ),
                });
            }
        }
    } else {
        return Err(format_err(
            dir,
            "no model.safetensors or model.safetensors.index.json",
        ));
    }
    let tokenizer = match std::fs::read_to_string(dir.join("tokenizer.json")) {
        Ok(json) => {
            let mut tok = Tokenizer::from_json(json)
                .map_err(|e| format_err(dir.join("tokenizer.json"), e.to_string()))?;
            let cfg_path = dir.join("tokenizer_config.json");
            if cfg_path.exists() {
                tok.apply_config(&read_json(&cfg_path)?);
            }
            Some(tok)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(dir.join("tokenizer.json"))(e)),
    };
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let gen = read_json(&gen_path)?;
        let ids: Vec<u32> = match gen.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            Some(v) => v.as_u64().map(|v| v as u32).into_iter().collect(),
            None => vec![],
        };
        for id in ids {
            if !config.eos_token_ids.contains(&id) {
                config.eos_token_ids.push(id);
            }
        }
    }
    Ok(Checkpoint {
        path: dir.to_path_buf(),
        config,
        store,
        tokenizer,
        layout: TensorLayout::HuggingFace,
        gguf: None,
    })
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight"),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight"),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("rope_freqs.weight"), "rope_freqs.weight");
    }
}
