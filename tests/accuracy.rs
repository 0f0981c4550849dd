//! Perplexity of the real SmolLM2 on a fixed public-domain text (tests/data) with its weights
//! dequantized to f16 ("the model"), re-quantized, and run natively as shipped (Q4_1).

mod common;
use common::*;
use vellum::engine::calibrate::{quantize_linears_gptq, sample_calibration, DEFAULT_DAMP};
use vellum::engine::{Checkpoint, Engine, EngineConfig, Model, Tokenizer};
use vellum::kernels::cpu::Cpu;
use vellum::kernels::{Backend, KvDtype, QuantTarget};
use vellum::quant::DType;

fn config(kv: KvDtype) -> EngineConfig {
    EngineConfig {
        kv_cache_bytes: 256 << 20,
        kv_dtype: kv,
        max_batched_tokens: 512,
        ..EngineConfig::default()
    }
}

/// The committed text's tokens, the model's own BOS first.
fn text_tokens(engine: &Engine) -> Vec<u32> {
    let text = std::fs::read_to_string(repo().join("tests/data/public-domain.txt")).unwrap();
    let tok = engine.tokenizer().unwrap().clone();
    let mut ids = vec![tok.bos_id.unwrap()];
    ids.extend(tok.encode(&text, false).unwrap());
    assert!(ids.len() > 4000, "{} tokens", ids.len());
    ids
}

/// Perplexity of the committed text, or of its first `limit` tokens.
fn perplexity_of(mut engine: Engine, limit: Option<usize>) -> f64 {
    let mut ids = text_tokens(&engine);
    ids.truncate(limit.unwrap_or(usize::MAX));
    let lps = engine.score(vec![ids]).unwrap().remove(0);
    (-lps.iter().map(|&l| l as f64).sum::<f64>() / lps.len() as f64).exp()
}

/// Which weights a row runs.
#[derive(Clone, Copy)]
enum Weights {
    /// Dequantized to f16: "the model", the baseline of every row.
    F16,
    /// The shipped Q4_1, run natively.
    Shipped,
    /// The f16 model re-quantized on load (a `QuantTarget` spelling).
    Quantized(&'static str),
    /// The f16 model quantized to int8 per channel by GPTQ.
    Gptq,
}

/// A row of the accuracy table: its weights and KV cache, and how far (relative) its
/// perplexity may be from the f16 model's with the f16 KV cache.
struct Row {
    name: &'static str,
    weights: Weights,
    kv: KvDtype,
    bound: f64,
}

const fn row(name: &'static str, weights: Weights, kv: KvDtype, bound: f64) -> Row {
    Row {
        name,
        weights,
        kv,
        bound,
    }
}

const ROWS: &[Row] = &[
    row("f32 KV cache", Weights::F16, KvDtype::F32, 0.001),
    row("int8 KV cache", Weights::F16, KvDtype::Int8, 0.005),
    row(
        "Q4_1 as shipped (native)",
        Weights::Shipped,
        KvDtype::F16,
        0.005,
    ),
    row(
        "int8 g32 (Q8_0)",
        Weights::Quantized("q8_0"),
        KvDtype::F16,
        0.005,
    ),
    row(
        "int4 g32 asymmetric (Q4_1 layout)",
        Weights::Quantized("int4"),
        KvDtype::F16,
        0.005,
    ),
    // Larger int4 groups re-grid these Q4_1 weights (two or four group-32 grids into one) and
    // lose a lot; reported in the README, bounded here so a broken kernel (which gives
    // perplexities in the hundreds) fails. (g64 shares their kernels; its row is the CLI's.)
    row(
        "int4 g128 symmetric",
        Weights::Quantized("int4:g128:sym"),
        KvDtype::F16,
        0.75,
    ),
    row(
        "int4 g128 asymmetric",
        Weights::Quantized("int4:g128"),
        KvDtype::F16,
        1.5,
    ),
    // Per-channel int8 of these Q4_1-derived weights rounded to nearest loses more (one step
    // per row across groups of very different ranges: +0.61%); GPTQ makes up for it.
    row(
        "int8 per channel, round to nearest",
        Weights::Quantized("int8"),
        KvDtype::F16,
        0.01,
    ),
    row("int8 per channel, GPTQ", Weights::Gptq, KvDtype::F16, 0.005),
];

/// The f16 model quantized to int8 per channel by GPTQ, with its tokenizer.
type GptqModel = (Model, Option<Tokenizer>);

/// `gptq` is needed only for `Weights::Gptq`.
fn engine(cpu: &Cpu, weights: Weights, kv: KvDtype, gptq: Option<&GptqModel>) -> Engine {
    let builder = || {
        Engine::builder()
            .model(real_model())
            .backend(Box::new(cpu.clone()))
            .config(config(kv))
    };
    match weights {
        Weights::F16 => builder().dtype(DType::F16).build(),
        Weights::Shipped => builder().build(),
        Weights::Quantized(target) => builder()
            .dtype(DType::F16)
            .quant(QuantTarget::parse(target).unwrap())
            .build(),
        Weights::Gptq => {
            let (model, tokenizer) = gptq.expect("the GPTQ model");
            Engine::new(
                model.clone(),
                tokenizer.clone(),
                Box::new(cpu.clone()),
                config(kv),
            )
        }
    }
    .unwrap()
}

/// Every row of the table on the default CPU path (integer dots over int16 activations
/// wherever a SIMD path is present). Int8 activations (`VELLUM_INT_DOT=8`) cost up to +0.8%
/// more on this text (README) and are not held to these bounds.
///
/// GPTQ is calibrated on text the dense model samples itself (8 × 256 tokens, seeded), so
/// nothing of the evaluation text: per-channel int8 then meets the 0.5% that round to nearest
/// misses.
///
/// Where the default path differs from the one that decodes the weights to f32, every
/// quantized row is also scored both ways on the text's first 512 tokens: the two must agree
/// to 0.1% (they differed by at most 0.024% there on 2026-12-05; README: "same perplexities
/// to 0.01%" over the whole text). Dense f16 weights take the same kernels on both. That
/// pins the integer path to the float one at the real model's scale, in a fraction of the
/// time that holding the float path to the whole table again took.
#[test]
fn quantized_weights_keep_perplexity_close_to_the_dequantized_model() {
    let default = Cpu::new();
    let gptq = gptq_int8_model(&default);
    check_perplexities(&default, &gptq);
    let float = Cpu::new().with_int_dot(None);
    if default.name() != float.name() {
        check_integer_path_matches_float_path(&default, &float, &gptq);
    }
}

fn gptq_int8_model(cpu: &Cpu) -> GptqModel {
    let mut dense = engine(cpu, Weights::F16, KvDtype::F16, None);
    let calibration = sample_calibration(&mut dense, 8, 256, 1).unwrap();
    let tokenizer = dense.tokenizer().cloned();
    drop(dense);
    let mut model = Checkpoint::open(&real_model())
        .unwrap()
        .load_model()
        .unwrap();
    model.to_dtype(DType::F16).unwrap();
    quantize_linears_gptq(
        &mut model,
        cpu,
        QuantTarget::Int8PerChannel,
        &calibration,
        DEFAULT_DAMP,
    )
    .unwrap();
    (model, tokenizer)
}

fn check_perplexities(cpu: &Cpu, gptq: &GptqModel) {
    let base = perplexity_of(engine(cpu, Weights::F16, KvDtype::F16, Some(gptq)), None);
    let backend = cpu.name();
    eprintln!("{backend}: perplexity, f16 dequantized: {base:.4}");
    let mut failed = Vec::new();
    for row in ROWS {
        let ppl = perplexity_of(engine(cpu, row.weights, row.kv, Some(gptq)), None);
        let rel = ppl / base - 1.0;
        eprintln!(
            "{backend}: perplexity, {}: {ppl:.4} ({:+.2}%)",
            row.name,
            100.0 * rel
        );
        if rel.abs() > row.bound {
            failed.push(format!(
                "{}: {ppl:.4} vs {base:.4} ({:+.2}%)",
                row.name,
                100.0 * rel
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{backend}: beyond the bounds: {failed:?}"
    );
    assert!(
        (10.0..30.0).contains(&base),
        "the model reads this prose well ({base})"
    );
}

/// Tokens of the text scored by both paths in `check_integer_path_matches_float_path`.
const PATH_CHECK_TOKENS: usize = 512;

fn check_integer_path_matches_float_path(integer: &Cpu, float: &Cpu, gptq: &GptqModel) {
    let mut failed = Vec::new();
    for row in ROWS {
        if matches!(row.weights, Weights::F16) {
            continue;
        }
        let limit = Some(PATH_CHECK_TOKENS);
        let a = perplexity_of(engine(integer, row.weights, row.kv, Some(gptq)), limit);
        let b = perplexity_of(engine(float, row.weights, row.kv, Some(gptq)), limit);
        let rel = a / b - 1.0;
        eprintln!(
            "{}: {}: {a:.4} vs {}: {b:.4} ({:+.3}%)",
            row.name,
            integer.name(),
            float.name(),
            100.0 * rel
        );
        if rel.abs() > 1e-3 {
            failed.push(format!("{}: {a:.4} vs {b:.4}", row.name));
        }
    }
    assert!(
        failed.is_empty(),
        "{} and {} disagree on the first {PATH_CHECK_TOKENS} tokens: {failed:?}",
        integer.name(),
        float.name()
    );
}
