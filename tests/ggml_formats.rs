//! GGUF formats Vellum decodes at load (5-bit and k-quants, `vellum_quant::ggml`): the
//! decoders against the `gguf` Python package's (tests/golden/make_ggml_blocks.py), and a
//! model holding every one of them against its twin decoded by that package
//! (tests/golden/make_kquant_llama.py).

mod common;

use common::{golden, repo};
use vellum::engine::{Checkpoint, Engine, EngineConfig};
use vellum::kernels::Device;
use vellum::quant::{DecodedFormat, QuantError};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Every format decodes the golden blocks to the reference's f32 values, bit for bit.
#[test]
fn decoders_match_the_gguf_package() {
    let g = golden("ggml_blocks.json");
    let formats = g["formats"].as_object().unwrap();
    assert_eq!(
        formats.len(),
        DecodedFormat::ALL.len(),
        "every format has blocks"
    );
    for (name, case) in formats {
        let ty = case["ggml_type"].as_u64().unwrap() as u32;
        let f = DecodedFormat::from_ggml_type(ty).unwrap();
        assert_eq!(f.name(), name);
        assert_eq!(
            f.block_values() as u64,
            case["block_values"].as_u64().unwrap()
        );
        assert_eq!(
            f.block_bytes() as u64,
            case["block_bytes"].as_u64().unwrap()
        );
        let bytes = hex(case["bytes_hex"].as_str().unwrap());
        let want: Vec<u32> = common::floats(&case["values"])
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let mut got = Vec::new();
        f.dequantize(&bytes, want.len(), &mut got).unwrap();
        let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g,
                w,
                "{name} value {i}: {} against {}",
                f32::from_bits(*g),
                f32::from_bits(*w)
            );
        }
        // A short buffer, or a count of values that is not whole blocks: named errors.
        let n = want.len();
        let short = f.dequantize(&bytes[1..], n, &mut Vec::new()).unwrap_err();
        assert!(matches!(short, QuantError::ByteLength { .. }), "{short}");
        let ragged = f.dequantize(&bytes, n - 1, &mut Vec::new()).unwrap_err();
        assert!(ragged.to_string().contains(name), "{ragged}");
    }
}

fn engine(file: &str) -> Engine {
    Engine::builder()
        .model(repo().join("tests/golden").join(file))
        .device(Device::Cpu)
        .config(EngineConfig {
            kv_cache_bytes: 8 << 20,
            ..EngineConfig::default()
        })
        .build()
        .unwrap()
}

/// A model with a matrix in each decoded format scores as its twin whose matrices the
/// reference decoded and stored as F16: the same log-probabilities, bit for bit.
#[test]
fn a_kquant_model_scores_as_its_reference_decoded_twin() {
    let ck = Checkpoint::open(&repo().join("tests/golden/kquant_llama.gguf")).unwrap();
    let tok = ck.tokenizer.clone().unwrap();
    let prompt = tok
        .encode("once upon a time there was a little model", true)
        .unwrap();
    assert!(prompt.len() > 5, "{prompt:?}");
    let got = engine("kquant_llama.gguf")
        .score(vec![prompt.clone()])
        .unwrap();
    let want = engine("kquant_llama_f16.gguf").score(vec![prompt]).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got[0]), bits(&want[0]));
    assert!(
        got[0].iter().all(|v| v.is_finite() && *v < 0.0),
        "{:?}",
        got[0]
    );
}

/// A decoded-format matrix whose rows are not whole blocks is refused with its name and
/// format: spm_llama.gguf's 448 × 32 F16 embeddings retyped Q4_K, whose 14,336 values are
/// whole super-blocks of 256 but its rows are not (a block would straddle eight rows).
#[test]
fn a_kquant_matrix_of_ragged_rows_is_refused_by_name() {
    let mut bytes = std::fs::read(repo().join("tests/golden/spm_llama.gguf")).unwrap();
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the tensor's info")
        + name.len();
    // n_dims (u32), the dims (u64 each, fastest first), then the ggml type (u32).
    assert_eq!(bytes[at..at + 4], 2u32.to_le_bytes());
    let ty = at + 4 + 2 * 8;
    assert_eq!(bytes[ty..ty + 4], 1u32.to_le_bytes(), "F16");
    bytes[ty..ty + 4].copy_from_slice(&12u32.to_le_bytes());
    let dir = common::scratch("ragged_kquant");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = Checkpoint::open(&path)
        .and_then(|ck| ck.load_model())
        .err()
        .expect("refused")
        .to_string();
    for part in ["embed_tokens", "32 columns", "Q4_K"] {
        assert!(err.contains(part), "{err}");
    }
}
