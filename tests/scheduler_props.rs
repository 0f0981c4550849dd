//! Property test of the scheduler as a state machine: any interleaving of submissions,
//! steps and aborts keeps the block invariant, loses no request and leaks no block.

mod common;
use common::*;
use proptest::prelude::*;
use std::collections::HashSet;
use vellum::engine::{Engine, EngineConfig, Request, SamplingParams};

#[derive(Debug, Clone)]
enum Op {
    Add {
        len: usize,
        max_tokens: usize,
        n: usize,
        priority: i32,
        score: bool,
    },
    Step,
    Abort(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1..60usize, 1..8usize, 1..3usize, 0..3i32, any::<bool>()).prop_map(
            |(len, max_tokens, n, priority, score)| Op::Add {
                len,
                max_tokens,
                n,
                priority,
                score
            }
        ),
        Just(Op::Step),
        Just(Op::Step),
        (0..20usize).prop_map(Op::Abort),
    ]
}

fn engine() -> Engine {
    // Reloading the tiny model is cheap; a 6-block pool and 24-token steps make chunking,
    // prefix hits, forks and preemption common.
    let ck =
        vellum::engine::Checkpoint::open(&repo().join("tests/golden/models/llama_gqa")).unwrap();
    let config = EngineConfig {
        block_size: 16,
        // 256 bytes of (f16) KV per token of the tiny model.
        kv_cache_bytes: 6 * 16 * 256,
        max_batched_tokens: 24,
        max_seqs: 4,
        ..EngineConfig::default()
    };
    Engine::new(
        ck.load_model().unwrap(),
        None,
        Box::new(vellum::kernels::cpu::Cpu::new()),
        config,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn any_interleaving_keeps_the_invariants(ops in proptest::collection::vec(op(), 1..40)) {
        let mut e = engine();
        let mut ids = vec![];
        let mut aborted = HashSet::new();
        let mut finished = HashSet::new();
        for op in ops {
            match op {
                Op::Add { len, max_tokens, n, priority, score } => {
                    // Prompts share a head so that the prefix cache is exercised.
                    let prompt: Vec<u32> = (0..len).map(|t| if t < 20 { 9 } else { (t * 13 % 256) as u32 }).collect();
                    let mut req = if score {
                        Request::score(prompt)
                    } else {
                        Request::tokens(prompt, SamplingParams::default().max_tokens(max_tokens).n(n).temperature(0.5).seed(3).ignore_eos(true))
                    };
                    req.priority = priority;
                    match e.add_request(req) {
                        Ok(id) => ids.push(id),
                        // A request the whole pool can never hold (long prompt, n = 2) is
                        // refused at admission, naming why; it must not be queued forever.
                        Err(err) => prop_assert!(
                            err.to_string().contains("does not fit the KV cache"),
                            "unexpected admission error: {}", err
                        ),
                    }
                }
                Op::Step => {
                    for o in e.step().unwrap() {
                        if o.finish_reason.is_some() && !e.is_unfinished(o.request_id) {
                            finished.insert(o.request_id);
                        }
                    }
                }
                Op::Abort(k) => {
                    if let Some(&id) = ids.get(k) {
                        if e.abort(id) {
                            aborted.insert(id);
                        }
                    }
                }
            }
            let check = e.check_blocks();
            prop_assert!(check.is_ok(), "{:?}", check);
        }
        let mut steps = 0;
        while e.has_unfinished() {
            for o in e.step().unwrap() {
                if o.finish_reason.is_some() && !e.is_unfinished(o.request_id) {
                    finished.insert(o.request_id);
                }
            }
            let check = e.check_blocks();
            prop_assert!(check.is_ok(), "{:?}", check);
            steps += 1;
            prop_assert!(steps < 5000, "no progress");
        }
        for id in ids {
            prop_assert!(finished.contains(&id) ^ aborted.contains(&id), "request {} lost or double-counted", id);
        }
        prop_assert_eq!(e.kv_usage(), 0.0);
    }
}

/// A sequence proptest found: after short requests finish, a 47-token prompt that fits the
/// pool must still be scheduled (it was refused as "does not fit" mid-run).
#[test]
fn a_request_that_passed_admission_is_always_scheduled() {
    let mut e = engine();
    let add = |e: &mut Engine, len: usize, max_tokens: usize, priority: i32| {
        let prompt: Vec<u32> = (0..len)
            .map(|t| if t < 20 { 9 } else { (t * 13 % 256) as u32 })
            .collect();
        let params = SamplingParams::default()
            .max_tokens(max_tokens)
            .temperature(0.5)
            .seed(3)
            .ignore_eos(true);
        let mut req = Request::tokens(prompt, params);
        req.priority = priority;
        e.add_request(req).unwrap()
    };
    add(&mut e, 25, 3, 0);
    e.step().unwrap();
    e.step().unwrap();
    add(&mut e, 12, 6, 1);
    add(&mut e, 12, 3, 0);
    e.step().unwrap();
    add(&mut e, 1, 6, 0);
    add(&mut e, 47, 4, 0);
    let mut steps = 0;
    while e.has_unfinished() {
        e.step().unwrap();
        e.check_blocks().unwrap();
        steps += 1;
        assert!(steps < 1000, "no progress");
    }
    assert_eq!(e.kv_usage(), 0.0);
}
