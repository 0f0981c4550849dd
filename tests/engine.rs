//! The batching engine under load: no lost request, no leaked block, and no output that
//! changes because of what else was in the batch (chunked prefill, preemption, aborts).

mod common;
use common::*;
use std::collections::HashMap;
use vellum::engine::{Engine, EngineConfig, EngineError, FinishReason, Request, SamplingParams};

fn engine(kv_blocks: usize, max_batched_tokens: usize, max_seqs: usize) -> Engine {
    // The tiny model's (f16) KV takes 2 layers x 2 x 32 values x 2 bytes = 256 bytes per token.
    Engine::builder()
        .model(repo().join("tests/golden/models/llama_gqa"))
        .config(EngineConfig {
            block_size: 16,
            kv_cache_bytes: kv_blocks * 16 * 256,
            max_batched_tokens,
            max_seqs,
            ..EngineConfig::default()
        })
        .build()
        .unwrap()
}

struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn random_requests(n: usize) -> Vec<Request> {
    let mut r = Lcg(42);
    (0..n)
        .map(|i| {
            let len = 1 + r.below(70) as usize;
            let mut prompt: Vec<u32> = (0..len).map(|_| r.below(256) as u32).collect();
            if i % 3 == 1 {
                // A third of the prompts share a 40-token prefix: prefix-cache hits.
                let shared: Vec<u32> = (0..40).map(|t| (t * 7 + 3) % 256).collect();
                prompt.splice(0..0, shared);
            }
            let mut p = SamplingParams::default()
                .max_tokens(1 + r.below(24) as usize)
                .ignore_eos(true);
            if i % 3 != 0 {
                p = p
                    .temperature(0.7 + r.below(5) as f32 / 10.0)
                    .top_k(r.below(50) as i64)
                    .top_p(0.9)
                    .seed(i as u64)
                    .n(if i % 5 == 2 { 3 } else { 1 });
            }
            let mut req = Request::tokens(prompt, p);
            req.prompt_logprobs = i % 4 == 0;
            req.priority = (i % 4) as i32;
            req
        })
        .collect()
}

#[test]
fn busy_preempting_batch_gives_the_same_outputs_as_running_alone() {
    let reqs = random_requests(56);
    let alone: Vec<_> = reqs
        .iter()
        .map(|r| {
            engine(64, 512, 64)
                .generate(vec![r.clone()])
                .unwrap()
                .remove(0)
        })
        .collect();

    // 24 blocks for 56 requests of up to 134 tokens, 32 tokens a step: chunked prefill and
    // preemptions are certain.
    let mut e = engine(24, 32, 16);
    let ids: Vec<_> = reqs
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    let aborted = [ids[5], ids[17], ids[33]];
    let mut done: HashMap<_, vellum::engine::Completion> = HashMap::new();
    let mut steps = 0;
    while e.has_unfinished() {
        for out in e.step().unwrap() {
            done.entry(out.request_id).or_default().absorb_sample(out);
        }
        steps += 1;
        if steps == 6 {
            for id in aborted {
                assert!(e.abort(id));
            }
        }
        e.check_blocks().unwrap();
        assert!(steps < 10_000, "the engine must make progress");
    }
    assert!(
        e.stats.preemptions > 0,
        "the small pool must force preemptions"
    );
    let cached: usize = done.values().map(|c| c.usage.cached_tokens).sum();
    assert!(
        cached >= 32,
        "shared prefixes must hit the prefix cache ({cached} tokens)"
    );
    assert_eq!(e.kv_usage(), 0.0, "every block is free at the end");
    for (i, id) in ids.iter().enumerate() {
        if aborted.contains(id) {
            continue;
        }
        let got = done
            .remove(id)
            .unwrap_or_else(|| panic!("request {i} lost"));
        let want = &alone[i];
        assert_eq!(got.tokens, want.tokens, "request {i}: tokens");
        assert_eq!(got.logprobs, want.logprobs, "request {i}: logprobs");
        assert_eq!(
            got.prompt_logprobs, want.prompt_logprobs,
            "request {i}: prompt logprobs"
        );
        assert_eq!(got.finish_reason, Some(FinishReason::Length));
        let samples = |c: &vellum::engine::Completion| -> Vec<(Vec<u32>, Vec<f32>)> {
            let lp =
                |c: &vellum::engine::Completion| c.logprobs.iter().map(|l| l.logprob).collect();
            c.more_samples
                .iter()
                .map(|s| (s.tokens.clone(), lp(s)))
                .collect()
        };
        assert_eq!(samples(&got), samples(want), "request {i}: samples 1..n");
    }
    assert!(
        alone.iter().any(|c| c.more_samples.len() == 2),
        "some requests have n = 3"
    );
}

#[test]
fn impossible_requests_are_rejected_at_admission() {
    let mut e = engine(4, 64, 8);
    let too_long = Request::tokens(vec![1; 65], SamplingParams::default());
    match e.add_request(too_long) {
        Err(EngineError::InvalidRequest {
            field: "prompt",
            msg,
        }) => assert!(msg.contains("KV cache"), "{msg}"),
        other => panic!("{other:?}"),
    }
    let bad_token = Request::tokens(vec![1, 999], SamplingParams::default());
    assert!(matches!(
        e.add_request(bad_token),
        Err(EngineError::InvalidRequest {
            field: "prompt",
            ..
        })
    ));
    let bad_param = Request::tokens(vec![1], SamplingParams::default().top_p(0.0));
    assert!(matches!(
        e.add_request(bad_param),
        Err(EngineError::InvalidRequest { field: "top_p", .. })
    ));
    assert!(!e.has_unfinished(), "rejected requests are not queued");
    // A request that fits the pool but asks for more tokens than it holds ends with "length".
    let c = e
        .generate(vec![Request::tokens(
            vec![1; 60],
            SamplingParams::default().max_tokens(100).ignore_eos(true),
        )])
        .unwrap();
    assert_eq!(c[0].finish_reason, Some(FinishReason::Length));
    assert_eq!(c[0].tokens.len(), 4);
}

#[test]
fn stop_tokens_and_max_tokens_finish_requests() {
    let mut e = engine(16, 64, 8);
    let first = e
        .generate(vec![Request::tokens(
            vec![3, 4, 5],
            SamplingParams::default().max_tokens(5).ignore_eos(true),
        )])
        .unwrap();
    let t0 = first[0].tokens[0];
    let stopped = e
        .generate(vec![Request::tokens(
            vec![3, 4, 5],
            SamplingParams::default()
                .max_tokens(5)
                .stop_token_ids(vec![t0]),
        )])
        .unwrap();
    assert_eq!(stopped[0].tokens, vec![t0]);
    assert_eq!(stopped[0].finish_reason, Some(FinishReason::Stop));
    assert_eq!(first[0].tokens.len(), 5);
}

/// `n = 4` samples of one 40-token prompt share its blocks; each copies only the partly
/// filled last block when it first writes; with temperature the samples differ, and each
/// is reproducible.
#[test]
fn parallel_samples_share_prompt_blocks() {
    let prompt: Vec<u32> = (0..40).map(|t| (t * 11 + 5) % 256).collect();
    let params = SamplingParams::default()
        .temperature(1.0)
        .seed(9)
        .n(4)
        .max_tokens(6)
        .ignore_eos(true);
    let mut e = engine(32, 512, 16);
    let id = e
        .add_request(Request::tokens(prompt.clone(), params.clone()))
        .unwrap();
    let first = e.step().unwrap();
    assert_eq!(
        first.len(),
        4,
        "the prefill step yields the first token of every sample"
    );
    assert!(first.iter().all(|o| o.request_id == id));
    // 40 tokens = 2 full blocks + 1 partial, all shared by the four samples.
    assert_eq!(e.kv_blocks_in_use(), 3);
    e.check_blocks().unwrap();
    let second = e.step().unwrap();
    // Each writer copies the shared partial block, except the last owner: 2 + 4.
    assert_eq!(e.kv_blocks_in_use(), 6);
    e.check_blocks().unwrap();
    let mut all = vec![vec![]; 4];
    for o in first.into_iter().chain(second) {
        all[o.sample_index].extend(o.new_tokens.iter().map(|t| t.token));
    }
    while e.has_unfinished() {
        for o in e.step().unwrap() {
            all[o.sample_index].extend(o.new_tokens.iter().map(|t| t.token));
        }
        e.check_blocks().unwrap();
    }
    assert!(all.iter().all(|s| s.len() == 6));
    let distinct: std::collections::HashSet<_> = all.iter().collect();
    assert!(
        distinct.len() > 1,
        "samples at temperature 1 differ: {all:?}"
    );
    let again = engine(32, 512, 16)
        .generate(vec![Request::tokens(prompt, params)])
        .unwrap()
        .remove(0);
    assert_eq!(again.tokens, all[0]);
    let more: Vec<Vec<u32>> = again
        .more_samples
        .iter()
        .map(|c| c.tokens.clone())
        .collect();
    assert_eq!(more, all[1..].to_vec(), "same seed, same samples");
}

/// Lower priority values are admitted first; under memory pressure the worst priority is
/// preempted, even when it is not the youngest.
#[test]
fn priorities_order_admission_and_preemption() {
    let req = |prio: i32, max_tokens: usize| {
        let mut r = Request::tokens(
            vec![7; 20],
            SamplingParams::default()
                .max_tokens(max_tokens)
                .ignore_eos(true),
        );
        r.priority = prio;
        r
    };
    let mut e = engine(16, 512, 1);
    let a = e.add_request(req(5, 2)).unwrap();
    let b = e.add_request(req(0, 2)).unwrap();
    let c = e.add_request(req(5, 2)).unwrap();
    let mut finished = vec![];
    while e.has_unfinished() {
        for o in e.step().unwrap() {
            if o.finish_reason.is_some() {
                finished.push(o.request_id);
            }
        }
    }
    assert_eq!(finished, vec![b, a, c]);

    // 4 blocks = 64 tokens for two sequences growing to 60 tokens each.
    let mut e = engine(4, 512, 2);
    let low = e.add_request(req(9, 40)).unwrap();
    let high = e.add_request(req(0, 40)).unwrap();
    let mut usage = std::collections::HashMap::new();
    while e.has_unfinished() {
        for o in e.step().unwrap() {
            usage.insert(o.request_id, o.usage);
        }
        e.check_blocks().unwrap();
    }
    assert!(
        usage[&low].recomputed_tokens > 0,
        "the low-priority request is preempted"
    );
    assert_eq!(
        usage[&high].recomputed_tokens, 0,
        "the high-priority one never is"
    );
    assert_eq!(usage[&low].completion_tokens, 40);
}

/// The KV dtype sets how many tokens the same `kv_cache_bytes` hold: f16 twice f32's, int8
/// (the tiny model's heads of 16 values: a scale per 16) 1.6x f16's. A prompt too long for
/// the f16 pool is refused with a message that says so, and the int8 pool scores it.
#[test]
fn kv_dtype_sets_the_tokens_a_pool_holds() {
    use vellum::kernels::KvDtype;
    let engine = |kv_dtype| {
        Engine::builder()
            .model(repo().join("tests/golden/models/llama_gqa"))
            .config(EngineConfig {
                block_size: 16,
                // 8 blocks of f16: 2 layers x K and V x 32 values x 2 bytes per token.
                kv_cache_bytes: 8 * 16 * 256,
                kv_dtype,
                ..EngineConfig::default()
            })
            .build()
            .unwrap()
    };
    let capacity = |dtype| engine(dtype).kv_capacity_tokens();
    assert_eq!(capacity(KvDtype::F32), 4 * 16);
    assert_eq!(capacity(KvDtype::F16), 8 * 16);
    // 2 layers x 2 x (32 codes + 2 scales x 4 bytes) = 160 bytes per token: 12 whole blocks.
    assert_eq!(capacity(KvDtype::Int8), 12 * 16);

    let prompt: Vec<u32> = (0..150).map(|t| (t * 7 + 3) % 256).collect();
    let err = engine(KvDtype::F16)
        .add_request(Request::score(prompt.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("can never fit the KV cache of 128 tokens"),
        "{err}"
    );
    let scores = engine(KvDtype::Int8).score(vec![prompt]).unwrap();
    assert_eq!(scores[0].len(), 149);
    assert!(scores[0].iter().all(|l| l.is_finite() && *l <= 0.0));
}
