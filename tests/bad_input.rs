//! Bad checkpoints give clear errors naming the file and the problem, never a panic.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use vellum::engine::Checkpoint;

/// A fresh directory; the counter keeps tests running in parallel apart.
fn tmpdir(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = scratch(&format!("bad-{name}-{n}"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the tiny llama model with its safetensors bytes replaced by `edit(bytes)`.
fn with_safetensors(name: &str, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) -> PathBuf {
    let src = repo().join("tests/golden/models/llama_gqa");
    let d = tmpdir(name);
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), edit(bytes)).unwrap();
    d
}

fn with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = repo().join("tests/golden/models/llama_gqa");
    let d = tmpdir(name);
    std::fs::copy(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    d
}

/// Opening and loading must fail with a message containing every `needles` entry.
fn expect_error(path: &Path, needles: &[&str]) {
    let result = Checkpoint::open(path).and_then(|c| c.load_model());
    let msg = match result {
        Ok(_) => panic!(
            "{} loaded, expected an error with {needles:?}",
            path.display()
        ),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
}

fn header(bytes: &[u8]) -> (usize, serde_json::Value) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, serde_json::from_slice(&bytes[8..8 + n]).unwrap())
}

/// Rewrites the JSON header (padded to keep the data offsets valid).
fn rewrite_header(bytes: Vec<u8>, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let (n, mut h) = header(&bytes);
    edit(&mut h);
    let mut text = h.to_string().into_bytes();
    assert!(
        text.len() <= n,
        "edited header must not grow past the original"
    );
    text.resize(n, b' ');
    let mut out = bytes[..8].to_vec();
    out.extend(text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn safetensors_problems_are_named() {
    let d = with_safetensors("trunc", |mut b| {
        b.truncate(b.len() - 100);
        b
    });
    expect_error(&d, &["model.safetensors", "outside", "truncated"]);
    let d = with_safetensors("tiny", |_| vec![1, 2, 3]);
    expect_error(&d, &["model.safetensors", "truncated"]);
    let d = with_safetensors("hdrlen", |mut b| {
        b[..8].copy_from_slice(&(1u64 << 30).to_le_bytes());
        b
    });
    expect_error(&d, &["model.safetensors", "header length"]);
    let d = with_safetensors("json", |mut b| {
        b[8] = b'#';
        b
    });
    expect_error(&d, &["invalid JSON header"]);
    let d = with_safetensors("dtype", |b| {
        rewrite_header(b, |h| h["model.norm.weight"]["dtype"] = "F64".into())
    });
    expect_error(&d, &["model.norm.weight", "F64", "not supported"]);
    let d = with_safetensors("overlap", |b| {
        rewrite_header(b, |h| {
            let other = h["model.embed_tokens.weight"]["data_offsets"].clone();
            let n = h["model.norm.weight"]["data_offsets"][1].as_u64().unwrap()
                - h["model.norm.weight"]["data_offsets"][0].as_u64().unwrap();
            let start = other[0].as_u64().unwrap();
            h["model.norm.weight"]["data_offsets"] = serde_json::json!([start, start + n]);
        })
    });
    expect_error(&d, &["overlap"]);
    let d = with_safetensors("misaligned", |b| {
        rewrite_header(b, |h| {
            let o = &h["model.norm.weight"]["data_offsets"];
            let (s, e) = (o[0].as_u64().unwrap() + 2, o[1].as_u64().unwrap() + 2);
            h["model.norm.weight"]["data_offsets"] = serde_json::json!([s, e]);
        })
    });
    expect_error(&d, &["model.norm.weight", "aligned"]);
    let d = with_safetensors("shape", |b| {
        rewrite_header(b, |h| {
            h["model.norm.weight"]["shape"] = serde_json::json!([32])
        })
    });
    expect_error(&d, &["model.norm.weight", "needs"]);
    let d = with_safetensors("missing", |b| {
        rewrite_header(b, |h| {
            h.as_object_mut()
                .unwrap()
                .remove("model.layers.1.mlp.up_proj.weight");
        })
    });
    expect_error(&d, &["model.layers.1.mlp.up_proj.weight", "missing"]);
}

#[test]
fn config_problems_are_named() {
    let d = with_config("heads0", |c| c["num_attention_heads"] = 0.into());
    expect_error(&d, &["config.json", "num_attention_heads"]);
    let d = with_config("heads_div", |c| {
        c["num_attention_heads"] = 5.into();
        c.as_object_mut().unwrap().remove("head_dim");
    });
    expect_error(&d, &["num_attention_heads", "divide"]);
    let d = with_config("kv_div", |c| c["num_key_value_heads"] = 3.into());
    expect_error(&d, &["num_key_value_heads"]);
    let d = with_config("arch", |c| c["model_type"] = "gpt_neox".into());
    expect_error(&d, &["gpt_neox", "unsupported"]);
    let d = with_config("missing", |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    expect_error(&d, &["hidden_size", "missing"]);
    let d = with_config("mismatch", |c| c["intermediate_size"] = 128.into());
    expect_error(&d, &["mlp.gate_proj.weight", "does not match the config"]);
    let d = with_config("sliding", |c| {
        c["model_type"] = "mistral".into();
        c["sliding_window"] = 4096.into();
    });
    expect_error(&d, &["sliding"]);
    let d = with_config("type", |c| c["hidden_size"] = "wide".into());
    expect_error(&d, &["hidden_size", "integer"]);
}

/// A minimal GGUF: header, `kv` metadata pairs (key, type, raw value bytes), no tensors.
fn gguf(version: u32, tensor_count: u64, kv: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    b.extend(tensor_count.to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, ty, v) in kv {
        b.extend((k.len() as u64).to_le_bytes());
        b.extend(k.as_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(v);
    }
    b
}

fn write_gguf(name: &str, bytes: Vec<u8>) -> PathBuf {
    let p = tmpdir(name).join("model.gguf");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn gguf_problems_are_named() {
    let p = write_gguf("magic", b"GGML\x03\0\0\0".to_vec());
    expect_error(&p, &["model.gguf", "not a GGUF file"]);
    let p = write_gguf("version", gguf(7, 0, &[]));
    expect_error(&p, &["version 7"]);
    let p = write_gguf("count", gguf(3, 1 << 60, &[]));
    expect_error(&p, &["tensor count", "more than"]);
    let p = write_gguf(
        "strlen",
        gguf(
            3,
            0,
            &[("general.name", 8, (1u64 << 50).to_le_bytes().to_vec())],
        ),
    );
    expect_error(&p, &["general.name"]);
    let p = write_gguf("vtype", gguf(3, 0, &[("x", 99, vec![0])]));
    expect_error(&p, &["unknown value type 99"]);
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend((1u64 << 61).to_le_bytes());
    let p = write_gguf("arrlen", gguf(3, 0, &[("tokens", 9, arr)]));
    expect_error(&p, &["array length", "more than"]);
    let p = write_gguf(
        "arch",
        gguf(
            3,
            0,
            &[("general.architecture", 8, {
                let mut v = 5u64.to_le_bytes().to_vec();
                v.extend(b"gpt2x");
                v
            })],
        ),
    );
    expect_error(&p, &["token_embd.weight", "missing"]);
    // A tensor of a ggml type Vellum does not read (IQ2_XXS = 16).
    let mut b = gguf(3, 1, &[]);
    b.extend(3u64.to_le_bytes());
    b.extend(b"foo");
    b.extend(2u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(16u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let p = write_gguf("qtype", b);
    expect_error(&p, &["foo", "ggml type 16", "not supported"]);
}

/// Truncating the real GGUF anywhere gives an error, never a panic.
#[test]
fn truncated_real_gguf_is_an_error() {
    let bytes = std::fs::read(real_model()).unwrap();
    for cut in [10usize, 1000, 100_000, 1_700_000, bytes.len() - 1] {
        let p = write_gguf(&format!("cut{cut}"), bytes[..cut].to_vec());
        let r = Checkpoint::open(&p);
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        let explained = ["truncated", "outside", "more than"]
            .iter()
            .any(|w| msg.contains(w));
        assert!(
            msg.contains("model.gguf") && explained,
            "cut at {cut}: {msg:?}"
        );
    }
}
