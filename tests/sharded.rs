//! A checkpoint split into shards with `model.safetensors.index.json` loads the same as the
//! single file, and a lying index is caught.

mod common;
use common::*;
use std::path::Path;
use vellum::engine::tensors::parse_safetensors;
use vellum::engine::Checkpoint;

/// Writes a safetensors file of `(name, info, bytes)` taken from a parsed file.
fn write_safetensors(path: &Path, tensors: &[(String, serde_json::Value, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, entry, bytes) in tensors {
        let mut e = entry.clone();
        e["data_offsets"] = serde_json::json!([data.len(), data.len() + bytes.len()]);
        header.insert(name.clone(), e);
        data.extend_from_slice(bytes);
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let src = repo().join("tests/golden/models/qwen2_bias");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let (start, infos) = parse_safetensors(&bytes).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let tensors: Vec<(String, serde_json::Value, Vec<u8>)> = infos
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                header[&t.name].clone(),
                bytes[start + t.offset..start + t.offset + t.byte_len].to_vec(),
            )
        })
        .collect();
    let dir = scratch("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), a);
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), b);
    let mut map = serde_json::Map::new();
    for (name, _, _) in a {
        map.insert(name.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (name, _, _) in b {
        map.insert(name.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let sharded = Checkpoint::open(&dir).unwrap();
    let single = Checkpoint::open(&src).unwrap();
    let (ms, m1) = (sharded.load_model().unwrap(), single.load_model().unwrap());
    let (ts, t1) = (
        vellum::engine::convert::hf_tensors(&ms).unwrap(),
        vellum::engine::convert::hf_tensors(&m1).unwrap(),
    );
    assert_eq!(ts.len(), t1.len());
    for (x, y) in ts.iter().zip(&t1) {
        assert_eq!(x, y);
    }

    // An index that names the wrong shard for a tensor is an error naming it.
    let (first, _, _) = &a[0];
    map.insert(first.clone(), "model-00002-of-00002.safetensors".into());
    let bad = serde_json::json!({"weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), bad.to_string()).unwrap();
    let err = Checkpoint::open(&dir)
        .err()
        .expect("lying index")
        .to_string();
    assert!(
        err.contains(first.as_str()) && err.contains("index.json"),
        "{err}"
    );
    // A shard outside the directory is refused.
    let escape = serde_json::json!({"weight_map": {"x": "../model.safetensors"}});
    std::fs::write(dir.join("model.safetensors.index.json"), escape.to_string()).unwrap();
    let err = Checkpoint::open(&dir)
        .err()
        .expect("escaping shard")
        .to_string();
    assert!(err.contains("plain file name"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
