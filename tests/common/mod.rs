//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use vellum::engine::{Engine, EngineConfig, Request, SamplingParams};
use vellum::kernels::{Device, KvDtype};

/// The checkout: where the tests were built, or `$VELLUM_REPO` (a test executable run on
/// another machine, as `scripts/gpu-check.sh` does).
pub fn repo() -> PathBuf {
    match std::env::var_os("VELLUM_REPO") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

/// A path for a test's scratch files, under cargo's directory for them (target/tmp), not the
/// system temp directory: reruns reuse the same names instead of leaving a trail there.
/// Removed first if it exists.
pub fn scratch(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

pub fn golden(name: &str) -> serde_json::Value {
    let p = repo().join("tests/golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The real SmolLM2 GGUF, fetched by scripts/fetch-model.sh. Missing is a failure, not a
/// skip: CI fetches it first.
pub fn real_model() -> PathBuf {
    let p = std::env::var_os("VELLUM_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh (or set VELLUM_MODEL)",
        p.display()
    );
    p
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The largest |a - b|. A NaN on either side, or infinities that differ, counts as
/// infinite: `f32::max` would drop it, and a kernel that wrote NaN would pass.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| match (x - y).abs() {
            _ if x == y => 0.0, // equal infinities too
            d if d.is_nan() => f32::INFINITY,
            d => d,
        })
        .fold(0f32, f32::max)
}

/// An engine on `device` with a small f32 KV pool, for the golden checks: the tiny models
/// are held to 1e-4 of transformers' f32 arithmetic, which an f16 cache's rounding exceeds
/// (the real model's goldens check both).
pub fn golden_engine(path: &std::path::Path, max_batched_tokens: usize, device: Device) -> Engine {
    golden_engine_with(path, max_batched_tokens, device, KvDtype::F32)
}

pub fn golden_engine_with(
    path: &std::path::Path,
    max_batched_tokens: usize,
    device: Device,
    kv_dtype: KvDtype,
) -> Engine {
    Engine::builder()
        .model(path)
        .device(device)
        .config(EngineConfig {
            max_batched_tokens,
            kv_cache_bytes: 8 << 20,
            ..EngineConfig::default()
        })
        .kv_dtype(kv_dtype)
        .build()
        .unwrap()
}

pub fn greedy(n: usize) -> SamplingParams {
    SamplingParams::default()
        .max_tokens(n)
        .ignore_eos(true)
        .logprobs(5)
}

/// Every tiny model on `device` against transformers' goldens: all prompts scored together in
/// one ragged batch with chunked prefill (chunks of 24 tokens cross the 16-token block
/// boundaries), and greedy decoding.
pub fn check_tiny_models(device: Device) {
    let g = golden("tiny.json");
    for (name, m) in g["models"].as_object().unwrap() {
        let tol = if m["dtype"] == "bf16" { 2e-2 } else { 1e-4 };
        let dir = repo().join("tests/golden/models").join(name);
        let prompts = m["prompts"].as_array().unwrap();
        let mut engine = golden_engine(&dir, 24, device);
        let lists: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&p["prompt"])).collect();
        let scored = engine.score(lists.clone()).unwrap();
        for (p, got) in prompts.iter().zip(&scored) {
            let want = floats(&p["prompt_logprobs"]);
            let d = max_abs_diff(got, &want);
            assert!(
                d <= tol,
                "{device} {name}: prompt of {} tokens: max logprob diff {d}",
                lists[0].len()
            );
        }
        let reqs = lists
            .iter()
            .map(|l| Request::tokens(l.clone(), greedy(8)))
            .collect();
        let done = engine.generate(reqs).unwrap();
        for (p, c) in prompts.iter().zip(&done) {
            let len = p["prompt"].as_array().unwrap().len();
            assert_eq!(
                c.tokens,
                ids(&p["greedy"]),
                "{device} {name}: greedy tokens, prompt of {len}"
            );
            let lps: Vec<f32> = c.logprobs.iter().map(|l| l.logprob).collect();
            let d = max_abs_diff(&lps, &floats(&p["greedy_logprobs"]));
            assert!(d <= tol, "{device} {name}: greedy logprobs differ by {d}");
            let top: Vec<u32> = c.logprobs[0].top.iter().map(|t| t.0).collect();
            assert_eq!(
                top,
                ids(&p["last_top5"]["ids"]),
                "{device} {name}: top-5 after the prompt of {len}"
            );
        }
        engine.check_blocks().unwrap();
        assert!(!engine.has_unfinished());
    }
}
