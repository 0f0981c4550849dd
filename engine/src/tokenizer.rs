//! Tokenizers: Hugging Face `tokenizer.json`, or one built from GGUF metadata, plus the
//! model's chat template.

use crate::error::{EngineError, Result};
use crate::gguf::{GgufMeta, Value};
use serde_json::json;

/// A tokenizer with the special tokens and chat template the engine needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The tokenizer.json it was built from (what `vellum convert` writes).
    json: String,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether encoding a prompt prepends the BOS token.
    pub add_bos: bool,
    pub bos_id: Option<u32>,
}

/// Incremental, UTF-8-safe decoding of a growing list of generated ids: each call decodes
/// only the last few tokens (a short prefix window keeps tokenizers that render a token
/// differently at the start of a string right), so a long generation costs O(1) per token.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
    /// The text decoded so far.
    pub text: String,
}

impl IncrementalDecoder {
    /// Appends the text of `ids[read_offset..]` once it forms whole characters (or at once
    /// with `flush`, at the end of a sequence).
    pub fn update(&mut self, tok: &Tokenizer, ids: &[u32], flush: bool) -> Result<()> {
        let prefix = tok.decode_output(&ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode_output(&ids[self.prefix_offset..])?;
        // An unfinished multi-byte character decodes as U+FFFD: wait for its other bytes.
        if full.len() > prefix.len() && (flush || !full.ends_with('\u{FFFD}')) {
            let new = match full.strip_prefix(prefix.as_str()) {
                Some(new) => new,
                // The window rendered differently: keep what the longer decode says beyond
                // the common part (never re-emits text).
                None => full.get(prefix.len()..).unwrap_or(""),
            };
            self.text.push_str(new);
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
        }
        Ok(())
    }
}

/// One chat message for [`Tokenizer::apply_chat_template`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json` string.
    pub fn from_json(json: String) -> Result<Tokenizer> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(tok_err)?;
        Ok(Tokenizer {
            inner,
            json,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            add_bos: false,
            bos_id: None,
        })
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(meta: &GgufMeta) -> Result<Tokenizer> {
        let model = meta.require_str("tokenizer.ggml.model")?;
        let strings = |key: &str| -> Result<Vec<String>> {
            meta.get(key)
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_string)).collect())
                .ok_or_else(|| EngineError::Config {
                    path: meta.path.clone(),
                    field: key.to_string(),
                    msg: "missing or not a list of strings".into(),
                })
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = meta
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // Unknown (2), control (3) and user-defined (4) tokens are matched before the model
        // runs, as llama.cpp and transformers do; the first two are special.
        let added: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|(_, &ty)| (2..=4).contains(&ty))
            .map(|(i, &ty)| {
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": ty != 4})
            })
            .collect();
        let doc = match model {
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?;
                let pre = meta.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
                let pre_tokenizer = gpt2_pre_tokenizer(pre).ok_or_else(|| EngineError::Unsupported {
                    path: meta.path.clone(),
                    msg: format!("GGUF pre-tokenizer `{pre}` (supported: default, gpt-2, smollm, llama-bpe, qwen2)"),
                })?;
                json!({
                    "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                    "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": null,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null,
                              "continuing_subword_prefix": null, "end_of_word_suffix": null,
                              "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                              "vocab": vocab, "merges": merges},
                })
            }
            "llama" => {
                let scores: Vec<f32> = meta
                    .get("tokenizer.ggml.scores")
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().map(|v| v.as_f64().map(|f| f as f32)).collect())
                    .ok_or_else(|| EngineError::Config {
                        path: meta.path.clone(),
                        field: "tokenizer.ggml.scores".into(),
                        msg: "missing or not a list of numbers (needed by SentencePiece vocabularies)".into(),
                    })?;
                if scores.len() != tokens.len() {
                    return Err(EngineError::Config {
                        path: meta.path.clone(),
                        field: "tokenizer.ggml.scores".into(),
                        msg: format!("{} scores for {} tokens", scores.len(), tokens.len()),
                    });
                }
                // SentencePiece BPE as a byte-fallback BPE over `▁`-marked text, the way
                // transformers converts these vocabularies (Metaspace, prefix once at the start).
                json!({
                    "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                    "normalizer": null,
                    "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false},
                    "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"},
                        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null,
                              "continuing_subword_prefix": null, "end_of_word_suffix": null,
                              "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                              "vocab": vocab, "merges": merges_from_scores(&tokens, &scores)},
                })
            }
            other => {
                return Err(EngineError::Unsupported {
                    path: meta.path.clone(),
                    msg: format!("GGUF tokenizer model `{other}` (supported: gpt2 byte-level BPE, llama SentencePiece)"),
                })
            }
        };
        let mut tok = Tokenizer::from_json(doc.to_string())?;
        let id = |k: &str| meta.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        tok.bos_id = id("tokenizer.ggml.bos_token_id");
        tok.bos_token = name(tok.bos_id);
        tok.eos_token = name(id("tokenizer.ggml.eos_token_id"));
        tok.add_bos = match meta.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            // SentencePiece (Llama) vocabularies add BOS unless told otherwise.
            _ => model == "llama",
        };
        tok.chat_template = meta
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(tok)
    }

    /// Applies `tokenizer_config.json` settings (chat template, special tokens, BOS policy).
    pub fn apply_config(&mut self, cfg: &serde_json::Value) {
        let token = |k: &str| match cfg.get(k) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => v
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            None => None,
        };
        self.bos_token = token("bos_token").or(self.bos_token.take());
        self.eos_token = token("eos_token").or(self.eos_token.take());
        self.bos_id = self
            .bos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t));
        if let Some(b) = cfg.get("add_bos_token").and_then(|v| v.as_bool()) {
            self.add_bos = b;
        }
        self.chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => self.chat_template.take(),
        };
    }

    /// The tokenizer_config.json that goes with [`Tokenizer::json`].
    pub fn config_json(&self) -> serde_json::Value {
        let mut cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 8192,
        });
        if let Some(t) = &self.chat_template {
            cfg["chat_template"] = json!(t);
        }
        if let Some(t) = &self.bos_token {
            cfg["bos_token"] = json!(t);
        }
        if let Some(t) = &self.eos_token {
            cfg["eos_token"] = json!(t);
            cfg["pad_token"] = json!(t);
        }
        cfg
    }

    pub fn json(&self) -> &str {
        &self.json
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes text; special-token strings in it are recognised. Prepends BOS when the
    /// model asks for it and `add_special` is set.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text (special tokens included as text).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Decodes generated ids for display: special tokens (end-of-turn markers) are dropped.
    pub fn decode_output(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// The text of each id, as `decode` would render it alone.
    pub fn id_to_piece(&self, id: u32) -> Result<String> {
        self.decode(&[id])
    }

    /// Renders a conversation with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| EngineError::Tokenizer("the model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template).map_err(tok_err)?;
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| EngineError::Tokenizer(format!("chat template: {e}")))
    }
}

/// BPE merges of a SentencePiece vocabulary, which GGUF stores as pieces with scores: every
/// split of a piece into two pieces of the vocabulary is a merge, ranked by the piece's score
/// (highest first; ties in vocabulary order, then by the ids of the halves).
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(usize, usize, f32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?, score))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    // A stable sort keeps the vocabulary order among equal scores.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

/// The Hugging Face pre-tokenizer for a llama.cpp `tokenizer.ggml.pre` name.
fn gpt2_pre_tokenizer(pre: &str) -> Option<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // SmolLM: every digit is its own pre-token, then GPT-2 byte-level splitting.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        _ => return None,
    })
}
