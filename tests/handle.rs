//! The thread-backed handle: many client threads, streams, cancellation by drop.

mod common;
use common::*;
use vellum::engine::{Engine, EngineConfig, EngineHandle, Request, SamplingParams};

fn engine() -> Engine {
    Engine::builder()
        .model(repo().join("tests/golden/models/qwen2_bias"))
        .config(EngineConfig {
            kv_cache_bytes: 1 << 20,
            max_batched_tokens: 64,
            ..EngineConfig::default()
        })
        .build()
        .unwrap()
}

fn request(client: usize, k: usize) -> Request {
    let prompt = (0..5 + 3 * k + client)
        .map(|t| ((t * 31 + client * 7) % 256) as u32)
        .collect();
    let params = SamplingParams::default()
        .temperature(0.8)
        .seed((client * 10 + k) as u64)
        .max_tokens(4 + k)
        .ignore_eos(true);
    Request::tokens(prompt, params)
}

#[test]
fn concurrent_clients_get_the_same_tokens_as_offline_generation() {
    let handle = EngineHandle::spawn(engine());
    let got: Vec<Vec<Vec<u32>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|client| {
                let handle = &handle;
                s.spawn(move || {
                    (0..3)
                        .map(|k| {
                            let stream = handle.submit(request(client, k)).unwrap();
                            let mut tokens = vec![];
                            for out in stream {
                                tokens.extend(out.unwrap().new_tokens.iter().map(|t| t.token));
                            }
                            tokens
                        })
                        .collect()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut offline = engine();
    for (client, per_client) in got.iter().enumerate() {
        for (k, tokens) in per_client.iter().enumerate() {
            let want = offline
                .generate(vec![request(client, k)])
                .unwrap()
                .remove(0)
                .tokens;
            assert_eq!(tokens, &want, "client {client}, request {k}");
        }
    }
}

#[test]
fn dropped_streams_abort_and_bad_requests_are_refused() {
    let handle = EngineHandle::spawn(engine());
    let long = Request::tokens(
        vec![1, 2, 3],
        SamplingParams::default().max_tokens(400).ignore_eos(true),
    );
    let mut stream = handle.submit(long).unwrap();
    assert!(stream.next().unwrap().is_ok());
    drop(stream);
    let err = handle
        .submit(Request::tokens(
            vec![1],
            SamplingParams::default().temperature(-1.0),
        ))
        .err()
        .unwrap();
    assert!(err.contains("temperature"), "{err}");
    // The engine goes on serving after the abort.
    let outs: Vec<_> = handle.submit(request(0, 0)).unwrap().collect();
    assert_eq!(
        outs.last()
            .unwrap()
            .as_ref()
            .unwrap()
            .finish_reason
            .map(|f| f.as_str()),
        Some("length")
    );
}
