//! `vellum convert` of the real GGUF: the Hugging Face directory loads back with
//! bit-identical f32 tensors and the same tokenizer.

mod common;
use common::*;
use vellum::engine::{convert, Checkpoint};
use vellum::quant::DType;

#[test]
fn converted_gguf_loads_back_bit_exact() {
    let gguf = Checkpoint::open(&real_model()).unwrap();
    let out = scratch("convert");
    convert::convert(&gguf, &out, DType::F32).unwrap();
    let hf = Checkpoint::open(&out).unwrap();
    assert_eq!(hf.config.num_layers, gguf.config.num_layers);
    assert_eq!(hf.config.eos_token_ids, gguf.config.eos_token_ids);
    assert!(hf.config.tie_word_embeddings);
    let a = convert::hf_tensors(&gguf.load_model().unwrap()).unwrap();
    let b = convert::hf_tensors(&hf.load_model().unwrap()).unwrap();
    assert_eq!(a.len(), b.len());
    for ((na, sa, va), (nb, sb, vb)) in a.iter().zip(&b) {
        assert_eq!((na, sa), (nb, sb));
        assert!(
            va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{na} differs"
        );
    }
    let (ta, tb) = (gguf.tokenizer.unwrap(), hf.tokenizer.unwrap());
    let text = "<|im_start|>user\nWhat's 12345 + 3.14? café 🙂<|im_end|>\n";
    assert_eq!(
        ta.encode(text, true).unwrap(),
        tb.encode(text, true).unwrap()
    );
    assert_eq!(ta.chat_template, tb.chat_template);
    std::fs::remove_dir_all(&out).unwrap();
}

/// `vellum quantize` output loads back with the same weights (bit for bit, same formats) and
/// gives the same log-probabilities as the in-memory quantized model.
#[test]
fn quantized_checkpoints_load_back_identically() {
    let src = Checkpoint::open(&real_model()).unwrap();
    for name in ["int8", "int4", "int4:g128", "int4:g64:sym"] {
        let target = vellum::kernels::QuantTarget::parse(name).unwrap();
        let out = scratch(&format!("quantize-{name}"));
        let written = convert::quantize(&src, &out, target, DType::F16).unwrap();
        let back = Checkpoint::open(&out).unwrap();
        assert_eq!(back.config.quantization, Some(target));
        let loaded = back.load_model().unwrap();
        for (a, b) in written.layers.iter().zip(&loaded.layers) {
            for (x, y) in [
                (&a.q, &b.q),
                (&a.k, &b.k),
                (&a.v, &b.v),
                (&a.o, &b.o),
                (&a.gate, &b.gate),
                (&a.up, &b.up),
                (&a.down, &b.down),
            ] {
                assert_eq!(x.format_name(), y.format_name());
                assert_eq!(x.bytes(), y.bytes());
                assert!(
                    x.to_f32()
                        .iter()
                        .zip(y.to_f32())
                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{name}"
                );
            }
        }
        let tokens: Vec<u32> = vec![1, 504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30];
        let score = |model: vellum::engine::Model| {
            let mut e = vellum::engine::Engine::new(
                model,
                None,
                Box::new(vellum::kernels::cpu::Cpu::new()),
                Default::default(),
            )
            .unwrap();
            e.score(vec![tokens.clone()]).unwrap().remove(0)
        };
        // Embeddings (and an untied LM head) went through f16 on disk; norms are kept f32.
        let mut reference = written;
        reference.embed = reference.embed.to_dense(DType::F16).unwrap();
        if let Some(h) = &mut reference.lm_head {
            *h = h.to_dense(DType::F16).unwrap();
        }
        assert_eq!(
            score(reference),
            score(loaded),
            "{name}: same numbers after the round trip"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}
