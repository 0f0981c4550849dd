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

fn engine(cpu: &Cpu, dtype: Option<DType>, quant: Option<QuantTarget>, kv: KvDtype) -> Engine {
    let mut b = Engine::builder()
        .model(real_model())
        .backend(Box::new(cpu.clone()))
        .config(config(kv));
    if let Some(d) = dtype {
        b = b.dtype(d);
    }
    if let Some(q) = quant {
        b = b.quant(q);
    }
    b.build().unwrap()
}

fn perplexity(cpu: &Cpu, dtype: Option<DType>, quant: Option<QuantTarget>, kv: KvDtype) -> f64 {
    perplexity_of(engine(cpu, dtype, quant, kv))
}

/// Perplexity of the committed text (the model's own BOS first).
fn perplexity_of(mut engine: Engine) -> f64 {
    let text = std::fs::read_to_string(repo().join("tests/data/public-domain.txt")).unwrap();
    let tok = engine.tokenizer().unwrap().clone();
    let mut ids = vec![tok.bos_id.unwrap()];
    ids.extend(tok.encode(&text, false).unwrap());
    assert!(ids.len() > 4000, "{} tokens", ids.len());
    let lps = engine.score(vec![ids]).unwrap().remove(0);
    (-lps.iter().map(|&l| l as f64).sum::<f64>() / lps.len() as f64).exp()
}

/// On the default CPU path (integer dots over int16 activations wherever a SIMD path is
/// present) and on the one that decodes the weights to f32, when they differ. Int8
/// activations (`VELLUM_INT_DOT=8`) cost up to +0.8% more on this text (README) and are not
/// held to these bounds.
///
/// GPTQ is calibrated on text the dense model samples itself (8 × 256 tokens, seeded), so
/// nothing of the evaluation text: per-channel int8 then meets the 0.5% that round to nearest
/// misses.
#[test]
fn quantized_weights_keep_perplexity_close_to_the_dequantized_model() {
    let default = Cpu::new();
    let float = Cpu::new().with_int_dot(None);
    let gptq = gptq_int8_model(&default);
    check_perplexities(&default, &gptq);
    if default.name() != float.name() {
        check_perplexities(&float, &gptq);
    }
}

/// The f16 model quantized to int8 per channel by GPTQ, with its tokenizer.
fn gptq_int8_model(cpu: &Cpu) -> (Model, Option<Tokenizer>) {
    let mut dense = engine(cpu, Some(DType::F16), None, KvDtype::F16);
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

/// Every row with the default (f16) KV cache, which the f32 one bounds.
fn check_perplexities(cpu: &Cpu, (gptq, tokenizer): &(Model, Option<Tokenizer>)) {
    let perplexity = |dtype, quant| perplexity(cpu, dtype, quant, KvDtype::F16);
    let base = perplexity(Some(DType::F16), None);
    let gptq = Engine::new(
        gptq.clone(),
        tokenizer.clone(),
        Box::new(cpu.clone()),
        config(KvDtype::F16),
    )
    .unwrap();
    let rows = [
        (
            "f32 KV cache",
            self::perplexity(cpu, Some(DType::F16), None, KvDtype::F32),
            0.001,
        ),
        (
            "int8 KV cache",
            self::perplexity(cpu, Some(DType::F16), None, KvDtype::Int8),
            0.005,
        ),
        ("Q4_1 as shipped (native)", perplexity(None, None), 0.005),
        (
            "int8 g32 (Q8_0)",
            perplexity(Some(DType::F16), QuantTarget::parse("q8_0")),
            0.005,
        ),
        (
            "int4 g32 asymmetric (Q4_1 layout)",
            perplexity(Some(DType::F16), QuantTarget::parse("int4")),
            0.005,
        ),
        // Larger int4 groups re-grid these Q4_1 weights (two or four group-32 grids into
        // one) and lose a lot; reported in the README, bounded here so a broken kernel (which
        // gives perplexities in the hundreds) fails.
        (
            "int4 g64 symmetric",
            perplexity(Some(DType::F16), QuantTarget::parse("int4:g64:sym")),
            0.6,
        ),
        (
            "int4 g128 symmetric",
            perplexity(Some(DType::F16), QuantTarget::parse("int4:g128:sym")),
            0.75,
        ),
        (
            "int4 g128 asymmetric",
            perplexity(Some(DType::F16), QuantTarget::parse("int4:g128")),
            1.5,
        ),
        // Per-channel int8 of these Q4_1-derived weights rounded to nearest loses more (one
        // step per row across groups of very different ranges: +0.61%); GPTQ makes up for it.
        (
            "int8 per channel, round to nearest",
            perplexity(Some(DType::F16), QuantTarget::parse("int8")),
            0.01,
        ),
        ("int8 per channel, GPTQ", perplexity_of(gptq), 0.005),
    ];
    let backend = cpu.name();
    eprintln!("{backend}: perplexity, f16 dequantized: {base:.4}");
    let mut failed = Vec::new();
    for (name, ppl, bound) in rows {
        let rel = ppl / base - 1.0;
        eprintln!(
            "{backend}: perplexity, {name}: {ppl:.4} ({:+.2}%)",
            100.0 * rel
        );
        if rel.abs() > bound {
            failed.push(format!(
                "{name}: {ppl:.4} vs {base:.4} ({:+.2}%)",
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
