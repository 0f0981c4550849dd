//! The engine end to end on the CUDA backend, its kernels run by the CPU emulator: the tiny
//! models must match transformers' goldens (and so the CPU backend) exactly as the CPU
//! backend does: same greedy tokens, logprobs within the same tolerance.

mod common;
use common::*;
use vellum::kernels::cpu::Cpu;
use vellum::kernels::{Device, KvDtype};

/// An engine over the model in `dir` with a 4 MiB KV cache: on `device`, or for the CPU
/// without integer dots (f32 weights against unrounded activations, the reference here).
fn engine_on(
    device: Device,
    dir: &std::path::Path,
    quant: Option<vellum::kernels::QuantTarget>,
    kv_dtype: KvDtype,
) -> vellum::engine::Engine {
    use vellum::engine::{Engine, EngineConfig};
    let b = match device {
        Device::Cpu => Engine::builder().backend(Box::new(Cpu::new().with_int_dot(None))),
        _ => Engine::builder().device(device),
    };
    let b = match quant {
        Some(q) => b.quant(q),
        None => b,
    };
    b.model(dir)
        .config(EngineConfig {
            kv_cache_bytes: 4 << 20,
            kv_dtype,
            ..EngineConfig::default()
        })
        .build()
        .unwrap()
}

#[test]
fn tiny_models_match_transformers_on_the_emulated_cuda_backend() {
    check_tiny_models(Device::CudaEmulator);
}

/// Quantized weights (planar int4 g64, int8 per channel, GGUF-style Q4_1) through the
/// emulated CUDA matmuls give the CPU backend's greedy tokens and logprobs, with the default
/// f16 KV cache and with an int8 one (the device copies of the pools read as stored). The CPU
/// runs without integer dots (f32 weights against unrounded activations); the CUDA GEMM
/// rounds both to f16 for its tensor cores, hence logprobs within 1.5e-2 (measured: up to
/// 7.3e-3) rather than 1e-4.
#[test]
fn quantized_tiny_model_decodes_like_the_cpu_on_the_emulated_cuda_backend() {
    use vellum::engine::Request;
    use vellum::kernels::QuantTarget;
    let dir = repo().join("tests/golden/models/llama_gqa");
    let prompts: Vec<Vec<u32>> = vec![(1..20).collect(), vec![5, 9, 200, 7]];
    let cases = [
        ("int4:g64:sym", KvDtype::F16),
        ("int8", KvDtype::F16),
        ("int4", KvDtype::F16),
        ("int4", KvDtype::Int8),
    ];
    for (quant, kv_dtype) in cases {
        let run = |device: Device| {
            let quant = QuantTarget::parse(quant).unwrap();
            let mut e = engine_on(device, &dir, Some(quant), kv_dtype);
            let reqs = prompts
                .iter()
                .map(|p| Request::tokens(p.clone(), greedy(6)))
                .collect();
            e.generate(reqs).unwrap()
        };
        let (cpu, emu) = (run(Device::Cpu), run(Device::CudaEmulator));
        for (a, b) in cpu.iter().zip(&emu) {
            assert_eq!(
                a.tokens, b.tokens,
                "{quant}, KV {kv_dtype:?}: greedy tokens"
            );
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!(
                    (x.logprob - y.logprob).abs() < 1.5e-2,
                    "{quant}, KV {kv_dtype:?}: {} vs {}",
                    x.logprob,
                    y.logprob
                );
            }
        }
    }
}

/// A forward pass on the CUDA backend keeps its activations and its KV writes on the device:
/// all that comes back to the host is, at the end, the log-probabilities, byte for byte;
/// and they match the CPU backend's. Once weights, pools, norms and the batch's arrays are
/// on the device, a step sends its token ids, nothing else, allocating no device memory (the
/// caching allocator hands it the last step's); and the cache, brought back, holds the
/// CPU's K and V.
/// The tiny GQA model on the emulated CUDA backend, its runtime counted, and a prompt of 19
/// tokens as one sequence's batch.
fn counted_prompt() -> (
    vellum::engine::Model,
    std::sync::Arc<vellum::kernels::cuda::counting::Counting>,
    vellum::kernels::cuda::CudaBackend,
    Vec<u32>,
    vellum::kernels::BatchLayout,
) {
    use std::sync::Arc;
    use vellum::engine::Checkpoint;
    use vellum::kernels::cuda::caching::{Caching, DEFAULT_CACHE_BYTES};
    use vellum::kernels::cuda::counting::Counting;
    use vellum::kernels::cuda::emu::EmuRuntime;
    use vellum::kernels::cuda::CudaBackend;
    use vellum::kernels::BatchLayout;
    let mut model = Checkpoint::open(&repo().join("tests/golden/models/llama_gqa"))
        .unwrap()
        .load_model()
        .unwrap();
    let rt = Arc::new(Counting::new(Arc::new(EmuRuntime::new().unwrap())));
    let cuda = CudaBackend::new(Arc::new(Caching::new(rt.clone(), DEFAULT_CACHE_BYTES)));
    model.prepare_for(&cuda).unwrap();
    let tokens: Vec<u32> = (1..20).collect();
    let t = tokens.len();
    let batch = BatchLayout {
        positions: (0..t as u32).collect(),
        slot_mapping: (0..t as u32).collect(),
        seq_offsets: vec![0, t],
        block_tables: vec![(0..t.div_ceil(16) as u32).collect()],
        context_lens: vec![t],
    };
    (model, rt, cuda, tokens, batch)
}

/// Scoring a prompt brings back 8 bytes per scored token (its log-probability and whether
/// it was the argmax: `pick_rows`), not its row; the picks are those of the whole rows.
#[test]
fn a_scored_prompt_moves_picks_not_rows() {
    use vellum::engine::model::LogitRows;
    let (model, rt, cuda, tokens, batch) = counted_prompt();
    let (t, vocab) = (tokens.len(), model.config.vocab_size);
    let rows = LogitRows {
        whole: vec![t - 1],
        picked: (0..t - 1).map(|p| (p, tokens[p + 1])).collect(),
        ..LogitRows::default()
    };
    let mut kv = model.new_kv_cache(4, 16, KvDtype::F16);
    rt.take_downloaded();
    let got = model
        .forward_with_graphs(&cuda, &tokens, &batch, &mut kv, &rows, None)
        .unwrap();
    // The whole row, and a pick of each row (the whole one's included).
    assert_eq!(
        rt.take_downloaded(),
        vocab * 4 + t * 8,
        "bytes brought back"
    );
    let mut kv = model.new_kv_cache(4, 16, KvDtype::F16);
    let all: Vec<usize> = (0..t).collect();
    let whole = model
        .forward(&cuda, &tokens, &batch, &mut kv, &all)
        .unwrap();
    assert!(got.whole[..] == whole[(t - 1) * vocab..], "the whole row");
    for (p, pick) in got.picks.iter().enumerate() {
        let row = &whole[p * vocab..(p + 1) * vocab];
        let want = (
            row[tokens[p + 1] as usize],
            vellum::kernels::pick::argmax(row),
        );
        assert_eq!((pick.logprob, pick.argmax), want, "row {p}");
    }
}

/// A row drawn within `top_k` (or greedy with alternatives) brings back its pick and its `k`
/// ranked candidates (8 bytes each), not its row: those of the whole row.
#[test]
fn a_ranked_row_moves_its_candidates_not_the_row() {
    use vellum::engine::model::LogitRows;
    use vellum::kernels::pick::top_pairs;
    use vellum::kernels::NO_TARGET;
    let (model, rt, cuda, tokens, batch) = counted_prompt();
    let (t, vocab, k) = (tokens.len(), model.config.vocab_size, 7);
    let rows = LogitRows {
        picked: vec![(t - 1, NO_TARGET), (2, NO_TARGET)],
        ranked: vec![0, 1],
        top: k,
        ..LogitRows::default()
    };
    let mut kv = model.new_kv_cache(4, 16, KvDtype::F16);
    rt.take_downloaded();
    let got = model
        .forward_with_graphs(&cuda, &tokens, &batch, &mut kv, &rows, None)
        .unwrap();
    assert_eq!(
        rt.take_downloaded(),
        2 * 8 + 2 * k * 8,
        "bytes brought back"
    );
    let mut kv = model.new_kv_cache(4, 16, KvDtype::F16);
    let whole = model
        .forward(&cuda, &tokens, &batch, &mut kv, &[t - 1, 2])
        .unwrap();
    for (i, ranked) in got.ranked.iter().enumerate() {
        let row = &whole[i * vocab..(i + 1) * vocab];
        assert_eq!(ranked, &top_pairs(row, k), "row {i}");
    }
}

/// Sequences drawing within `top_k`, and greedy ones with alternatives, give the same
/// completions with their candidates ranked on the device as ranked on the host from whole
/// rows; mixed with sequences that need their whole rows, and with parallel samples.
#[test]
fn ranked_rows_give_the_completions_of_whole_rows() {
    use vellum::engine::{Request, SamplingParams};
    let t = |x| {
        SamplingParams::default()
            .temperature(x)
            .max_tokens(5)
            .ignore_eos(true)
    };
    let params = [
        SamplingParams::default()
            .max_tokens(5)
            .ignore_eos(true)
            .logprobs(3),
        t(0.9).top_k(5).logprobs(2).seed(1),
        t(0.7).top_k(40).top_p(0.9).min_p(0.05).seed(2).n(2),
        t(1.0).seed(3),                                  // whole rows
        t(0.8).top_k(8).repetition_penalty(1.3).seed(4), // whole rows
    ];
    for device in [Device::Cpu, Device::CudaEmulator] {
        let run = |picks_on_host: bool| {
            let mut engine = tiny_gqa_engine(device, picks_on_host);
            let requests = params
                .iter()
                .enumerate()
                .map(|(i, p)| Request::tokens((1..=7 + i as u32).collect(), p.clone()))
                .collect();
            engine.generate(requests).unwrap()
        };
        let (device_ranked, host_ranked) = (run(false), run(true));
        assert_eq!(device_ranked.len(), params.len());
        for (a, b) in device_ranked.iter().zip(&host_ranked) {
            assert_eq!(a.tokens, b.tokens, "{device:?}");
            let bits = |c: &vellum::engine::Completion| -> Vec<(u32, Vec<(u32, u32)>)> {
                let top = |l: &vellum::engine::engine::TokenLogprob| {
                    l.top.iter().map(|&(i, v)| (i, v.to_bits())).collect()
                };
                c.logprobs
                    .iter()
                    .map(|l| (l.logprob.to_bits(), top(l)))
                    .collect()
            };
            assert_eq!(bits(a), bits(b), "{device:?}: log-probabilities");
            let more = |c: &vellum::engine::Completion| -> Vec<Vec<u32>> {
                c.more_samples.iter().map(|m| m.tokens.clone()).collect()
            };
            assert_eq!(more(a), more(b), "{device:?}: parallel samples");
        }
        assert_eq!(device_ranked[2].more_samples.len(), 1);
        let alternatives = |i: usize| device_ranked[i].logprobs.iter().map(|l| l.top.len()).max();
        assert_eq!((alternatives(0), alternatives(1)), (Some(3), Some(2)));
    }
}

#[test]
fn a_forward_pass_moves_only_tokens_and_logits() {
    use vellum::kernels::Backend;
    let (model, rt, cuda, tokens, batch) = counted_prompt();
    let c = model.config.clone();
    let t = tokens.len();
    let logit_rows = [t - 1, 3];
    let forward = |be: &dyn Backend, kv: &mut Vec<_>| {
        model.forward(be, &tokens, &batch, kv, &logit_rows).unwrap()
    };
    let mut kv = model.new_kv_cache(4, 16, KvDtype::F16);
    rt.take_downloaded();
    let got = forward(&cuda, &mut kv);
    let logit_bytes = logit_rows.len() * c.vocab_size * 4;
    assert_eq!(
        rt.take_downloaded(),
        logit_bytes,
        "bytes brought back by a forward pass"
    );
    let mut cpu_kv = model.new_kv_cache(4, 16, KvDtype::F16);
    let want = forward(&Cpu::new().with_int_dot(None), &mut cpu_kv);
    let err = common::max_abs_diff(&got, &want);
    assert!(err < 1e-3, "logprobs {err} from the CPU's");

    for (layer, (got, want)) in kv.iter_mut().zip(&mut cpu_kv).enumerate() {
        let (got, want) = (got.host_pools().unwrap(), want.host_pools().unwrap());
        for (g, w) in [(got.0, want.0), (got.1, want.1)] {
            let (g, w) = (g.to_f32(), w.to_f32());
            let err = common::max_abs_diff(&g, &w);
            assert!(err < 1e-3, "layer {layer}: K/V {err} from the CPU's");
        }
    }

    // The same step again, over the same slots, twice: the second time in the device memory
    // of the first (which took some blocks the first step freed for the batch's arrays),
    // and with other token ids.
    forward(&cuda, &mut kv);
    rt.take_uploaded();
    rt.take_allocated();
    let other: Vec<u32> = tokens.iter().map(|&t| t + 1).collect();
    model
        .forward(&cuda, &other, &batch, &mut kv, &logit_rows)
        .unwrap();
    assert_eq!(rt.take_allocated(), 0, "bytes allocated by a step");
    assert_eq!(
        rt.take_uploaded(),
        t * 4,
        "bytes sent by a step: its token ids"
    );
}

/// Parallel samples share their prompt's blocks and each copies the partly filled one before
/// writing into it (copy-on-write). On the CUDA backend, whose KV writes stay on the device,
/// the block is copied there: seeded samples give the CPU backend's tokens.
#[test]
fn parallel_samples_copy_device_written_blocks_on_the_emulated_cuda_backend() {
    use vellum::engine::Request;
    let dir = repo().join("tests/golden/models/llama_gqa");
    // 20 tokens: one full block of 16 and a partly filled one, shared by the samples.
    let prompt: Vec<u32> = (1..21).collect();
    let params = greedy(5).temperature(0.7).seed(3).n(3);
    let run = |device: Device| {
        let mut e = engine_on(device, &dir, None, KvDtype::F16);
        let done = e
            .generate(vec![Request::tokens(prompt.clone(), params.clone())])
            .unwrap();
        let first = &done[0];
        let mut samples = vec![first.tokens.clone()];
        samples.extend(first.more_samples.iter().map(|s| s.tokens.clone()));
        samples
    };
    let (cpu, emu) = (run(Device::Cpu), run(Device::CudaEmulator));
    assert_eq!(cpu.len(), 3);
    assert_eq!(cpu, emu, "the samples' tokens");
}

/// A greedy request without alternatives brings back picks, not its rows: the same tokens
/// and log-probabilities as when alternatives make it bring back whole rows, or when every
/// row comes back whole (`picks_on_host`), on both backends.
/// The tiny GQA model on `device`, rows picked on the device or (`picks_on_host`) on the host.
fn tiny_gqa_engine(device: Device, picks_on_host: bool) -> vellum::engine::Engine {
    use vellum::engine::{Engine, EngineConfig};
    Engine::builder()
        .device(device)
        .model(repo().join("tests/golden/models/llama_gqa"))
        .config(EngineConfig {
            kv_cache_bytes: 4 << 20,
            picks_on_host,
            ..EngineConfig::default()
        })
        .build()
        .unwrap()
}

#[test]
fn greedy_tokens_are_the_same_picked_or_from_whole_rows() {
    use vellum::engine::{Request, SamplingParams};
    for device in [Device::Cpu, Device::CudaEmulator] {
        let run = |logprobs: usize, picks_on_host: bool| {
            let mut engine = tiny_gqa_engine(device, picks_on_host);
            let params = SamplingParams::default()
                .max_tokens(6)
                .ignore_eos(true)
                .logprobs(logprobs);
            // Their prompts scored too: picked rows, or whole ones picked on the host.
            let requests = [9u32, 23]
                .map(|len| Request {
                    prompt_logprobs: true,
                    ..Request::tokens((1..=len).collect(), params.clone())
                })
                .into();
            engine.generate(requests).unwrap()
        };
        let (picked, whole, on_host) = (run(0, false), run(2, false), run(0, true));
        assert_eq!(picked.len(), 2);
        for ((a, b), c) in picked.iter().zip(&whole).zip(&on_host) {
            assert_eq!(a.logprobs, c.logprobs, "{device:?}: picked on the host");
            assert_eq!(a.prompt_logprobs, c.prompt_logprobs, "{device:?}: prompt");
            assert_eq!(a.prompt_is_greedy, c.prompt_is_greedy, "{device:?}");
            assert_eq!(a.tokens, b.tokens, "{device:?}");
            let bits = |c: &vellum::engine::Completion| -> Vec<u32> {
                c.logprobs.iter().map(|l| l.logprob.to_bits()).collect()
            };
            assert_eq!(bits(a), bits(b), "{device:?}: log-probabilities");
            assert!(a.logprobs.iter().all(|l| l.top.is_empty()));
            assert!(b.logprobs.iter().all(|l| l.top.len() == 2));
        }
    }
}
