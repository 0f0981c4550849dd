//! Perplexity of the real SmolLM2 on a fixed public-domain text (tests/data) with its weights
//! dequantized to f16 ("the model"), re-quantized, and run natively as shipped (Q4_1).

mod common;
use common::*;
use vellum::engine::{Engine, EngineConfig};
use vellum::kernels::cpu::Cpu;
use vellum::kernels::{Backend, KvDtype, QuantTarget};
use vellum::quant::DType;

fn perplexity(cpu: &Cpu, dtype: Option<DType>, quant: Option<QuantTarget>, kv: KvDtype) -> f64 {
    let mut b = Engine::builder()
        .model(real_model())
        .backend(Box::new(cpu.clone()))
        .config(EngineConfig {
            kv_cache_bytes: 256 << 20,
            kv_dtype: kv,
            max_batched_tokens: 512,
            ..EngineConfig::default()
        });
    if let Some(d) = dtype {
        b = b.dtype(d);
    }
    if let Some(q) = quant {
        b = b.quant(q);
    }
    let mut engine = b.build().unwrap();
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
#[test]
fn quantized_weights_keep_perplexity_close_to_the_dequantized_model() {
    let default = Cpu::new();
    let float = Cpu::new().with_int_dot(None);
    check_perplexities(&default);
    if default.name() != float.name() {
        check_perplexities(&float);
    }
}

/// Every row with the default (f16) KV cache, which the f32 one bounds.
fn check_perplexities(cpu: &Cpu) {
    let perplexity = |dtype, quant| perplexity(cpu, dtype, quant, KvDtype::F16);
    let base = perplexity(Some(DType::F16), None);
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
        // Per-channel int8 of these Q4_1-derived weights loses more (one step per row across
        // groups of very different ranges: +0.61%): bounded here, reported in the README.
        (
            "int8 per channel",
            perplexity(Some(DType::F16), QuantTarget::parse("int8")),
            0.01,
        ),
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
