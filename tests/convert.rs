//! `vellum convert` of the real GGUF: the Hugging Face directory loads back with
//! bit-identical f32 tensors and the same tokenizer.

mod common;
use common::*;
use vellum::engine::{convert, Checkpoint};
use vellum::quant::DType;

#[test]
fn converted_gguf_loads_back_bit_exact() {
    let gguf = Checkpoint::open(&real_model()).unwrap();
    let out = std::env::temp_dir().join(format!("vellum-convert-{}", std::process::id()));
    convert::convert(&gguf, &out, DType::F32).unwrap();
    let hf = Checkpoint::open(&out).unwrap();
    assert_eq!(hf.config.num_layers, gguf.config.num_layers);
    assert_eq!(hf.config.eos_token_ids, gguf.config.eos_token_ids);
    assert!(hf.config.tie_word_embeddings);
    let a = convert::hf_tensors(&gguf.load_model().unwrap());
    let b = convert::hf_tensors(&hf.load_model().unwrap());
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
