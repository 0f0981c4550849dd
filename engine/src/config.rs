//! Model configuration: read from a Hugging Face `config.json` or GGUF metadata, validated
//! before any tensor is touched.

use crate::error::{EngineError, Result};
use crate::gguf::GgufMeta;
use serde_json::Value;
use std::path::{Path, PathBuf};
use vellum_kernels::{QuantTarget, RopeScaling};

/// Supported architectures (all Llama-shaped decoders).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    /// Llama with q/k/v biases.
    Qwen2,
}

impl Arch {
    /// The Hugging Face `architectures[0]` name.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The format of the linear layers of a checkpoint written by `vellum quantize`
    /// (`quantization_config` with `quant_method: "vellum"`).
    pub quantization: Option<QuantTarget>,
}

struct Fields<'a> {
    path: &'a Path,
    json: &'a Value,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> EngineError {
        EngineError::Config {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        match self.json.get(field) {
            None | Some(Value::Null) => Err(self.err(field, "missing")),
            Some(v) => v
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| self.err(field, format!("must be a non-negative integer, got {v}"))),
        }
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.json.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.usize(field).map(Some),
        }
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.json.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(field, format!("must be a number, got {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.json.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("must be true or false, got {v}"))),
        }
    }

    /// A token id field that may be an integer or a list of integers.
    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        let bad = || self.err(field, "must be a token id or a list of token ids");
        match self.json.get(field) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(bad)
                })
                .collect(),
            Some(v) => Ok(vec![v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(bad)?]),
        }
    }
}

impl ModelConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| EngineError::Format {
            path: path.to_path_buf(),
            msg: format!("invalid JSON: {e}"),
        })?;
        Self::from_hf_json(path, &json)
    }

    pub fn from_hf_json(path: &Path, json: &Value) -> Result<ModelConfig> {
        let f = Fields { path, json };
        if !json.is_object() {
            return Err(f.err("(root)", "config.json must be a JSON object"));
        }
        let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "" => return Err(f.err("model_type", "missing")),
            other => {
                return Err(EngineError::Unsupported {
                    path: path.to_path_buf(),
                    msg: format!("architecture `{other}` (supported: llama, mistral, qwen2)"),
                })
            }
        };
        if arch == Arch::Mistral && f.opt_usize("sliding_window")?.is_some() {
            return Err(EngineError::Unsupported {
                path: path.to_path_buf(),
                msg: "Mistral sliding-window attention (`sliding_window` is set; only full attention is implemented)".into(),
            });
        }
        if arch == Arch::Qwen2 && f.bool_or("use_sliding_window", false)? {
            return Err(EngineError::Unsupported {
                path: path.to_path_buf(),
                msg: "Qwen2 sliding-window attention (`use_sliding_window` is true)".into(),
            });
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let rope_scaling = parse_rope_scaling(&f)?;
        let quantization = parse_quantization(&f)?;
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
            rope_theta: match json
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
            {
                // transformers 5 moved rope_theta into rope_parameters.
                Some(v) if json.get("rope_theta").is_none() => v
                    .as_f64()
                    .ok_or_else(|| f.err("rope_parameters.rope_theta", "must be a number"))?,
                _ => f.f64_or("rope_theta", 10000.0)?,
            },
            rope_scaling,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            attention_bias: arch == Arch::Qwen2 || f.bool_or("attention_bias", false)?,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            quantization,
        };
        if num_heads > 0 && f.opt_usize("head_dim")?.is_none() && hidden_size % num_heads != 0 {
            return Err(f.err(
                "num_attention_heads",
                format!("{num_heads} heads do not divide hidden_size {hidden_size}"),
            ));
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads the config of a llama-architecture GGUF file from its metadata.
    pub fn from_gguf(meta: &GgufMeta, vocab_size: usize) -> Result<ModelConfig> {
        let arch_name = meta.require_str("general.architecture")?;
        if arch_name != "llama" {
            return Err(EngineError::Unsupported {
                path: meta.path.clone(),
                msg: format!("GGUF architecture `{arch_name}` (supported: llama)"),
            });
        }
        let key = |k: &str| format!("llama.{k}");
        let u = |k: &str| meta.require_u64(&key(k)).map(|v| v as usize);
        let f = |k: &str, d: f64| meta.get(&key(k)).and_then(|v| v.as_f64()).unwrap_or(d);
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        let num_kv_heads = meta
            .get(&key("attention.head_count_kv"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(num_heads);
        let head_dim = match meta
            .get(&key("rope.dimension_count"))
            .and_then(|v| v.as_u64())
        {
            Some(d) => d as usize,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let scaling = match meta.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: f("rope.scaling.factor", 1.0),
            },
            Some(other) => {
                return Err(EngineError::Unsupported {
                    path: meta.path.clone(),
                    msg: format!("rope scaling `{other}` in GGUF"),
                })
            }
        };
        let token = |k: &str| meta.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let cfg = ModelConfig {
            arch: Arch::Llama,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5) as f32,
            rope_theta: f("rope.freq_base", 10000.0),
            rope_scaling: scaling,
            // Decided by the loader from the presence of `output.weight`.
            tie_word_embeddings: false,
            attention_bias: false,
            max_position_embeddings: u("context_length").unwrap_or(2048),
            bos_token_id: token("tokenizer.ggml.bos_token_id"),
            eos_token_ids: token("tokenizer.ggml.eos_token_id").into_iter().collect(),
            quantization: None,
        };
        cfg.validate(&meta.path)?;
        Ok(cfg)
    }

    /// Rejects shapes the forward pass cannot run, naming the field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |field: &str, msg: String| EngineError::Config {
            path: PathBuf::from(path),
            field: field.to_string(),
            msg,
        };
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(err(field, "must be positive, got 0".into()));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(err(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(err(
                "head_dim",
                format!("{} must be even for rotary embeddings", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(err(
                "rms_norm_eps",
                format!("{} must be a positive number", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(err(
                "rope_theta",
                format!("{} must be a positive number", self.rope_theta),
            ));
        }
        let limits = [
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 19),
            ("num_hidden_layers", self.num_layers, 1 << 10),
            ("vocab_size", self.vocab_size, 1 << 22),
            ("head_dim", self.head_dim, 1 << 10),
        ];
        for (field, v, max) in limits {
            if v > max {
                return Err(err(
                    field,
                    format!("{v} is implausibly large (limit {max})"),
                ));
            }
        }
        Ok(())
    }

    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The Hugging Face config.json for this model (what `vellum convert` writes).
    pub fn to_hf_json(&self, torch_dtype: &str) -> Value {
        let mut j = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": false,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": torch_dtype,
        });
        if let Some(b) = self.bos_token_id {
            j["bos_token_id"] = b.into();
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => j["eos_token_id"] = (*one).into(),
            many => j["eos_token_id"] = many.into(),
        }
        if let Some(q) = self.quantization {
            j["quantization_config"] = serde_json::json!({
                "quant_method": "vellum", "format": q.name().to_ascii_lowercase(),
                "modules": "attention and MLP projections",
            });
        }
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                j["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                j["rope_scaling"] = serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                })
            }
        }
        j
    }
}

fn parse_quantization(f: &Fields) -> Result<Option<QuantTarget>> {
    let Some(q) = f.json.get("quantization_config").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "vellum" {
        return Err(EngineError::Unsupported {
            path: f.path.to_path_buf(),
            msg: format!(
                "quantization_config with quant_method `{method}` (Vellum reads its own, `vellum`)"
            ),
        });
    }
    let format = q.get("format").and_then(Value::as_str).unwrap_or("");
    QuantTarget::parse(format).map(Some).ok_or_else(|| {
        f.err(
            "quantization_config.format",
            format!("`{format}` is not a Vellum format"),
        )
    })
}

fn parse_rope_scaling(f: &Fields) -> Result<RopeScaling> {
    // Newer transformers versions write `rope_parameters` (with rope_theta inside) instead.
    let Some(rs) = f
        .json
        .get("rope_scaling")
        .filter(|v| !v.is_null())
        .or_else(|| f.json.get("rope_parameters").filter(|v| !v.is_null()))
    else {
        return Ok(RopeScaling::None);
    };
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        rs.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| f.err(&format!("rope_scaling.{k}"), "missing or not a number"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(EngineError::Unsupported {
            path: f.path.to_path_buf(),
            msg: format!("rope_scaling type `{other}` (supported: linear, llama3)"),
        }),
    }
}
