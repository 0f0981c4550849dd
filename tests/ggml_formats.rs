//! GGUF formats Vellum decodes at load (5-bit and k-quants, `vellum_quant::ggml`): the
//! decoders against the `gguf` Python package's (tests/golden/make_ggml_blocks.py), and a
//! model holding every one of them against its twin decoded by that package
//! (tests/golden/make_kquant_llama.py).

mod common;

use common::{golden, repo};
use vellum::engine::{Checkpoint, Engine, EngineConfig};
use vellum::kernels::Device;
use vellum::quant::ggml::Repacked;
use vellum::quant::{BlockFormat, DecodedFormat, QuantError};

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
        repack_keeps_the_values(f, &bytes, &want);
        // A short buffer, or a count of values that is not whole blocks: named errors.
        let n = want.len();
        let short = f.dequantize(&bytes[1..], n, &mut Vec::new()).unwrap_err();
        assert!(matches!(short, QuantError::ByteLength { .. }), "{short}");
        let ragged = f.dequantize(&bytes, n - 1, &mut Vec::new()).unwrap_err();
        assert!(ragged.to_string().contains(name), "{ragged}");
    }
}

/// The formats kept quantized at load give the reference's values: Q5_0 and IQ4_NL as Q8_0
/// exactly; IQ4_XS as Q8_0, and Q4_K as int4, within the f16 rounding of each group's scale
/// (and offset: 2⁻¹¹ of 15·|scale| + |offset|, doubled for the f32 arithmetic around it).
fn repack_keeps_the_values(f: DecodedFormat, bytes: &[u8], want: &[u32]) {
    let (rows, cols) = (2, want.len() / 2);
    let want: Vec<f32> = want.iter().map(|&b| f32::from_bits(b)).collect();
    match f.repack(bytes, rows, cols).unwrap() {
        None => assert!(!f.repacks(), "{}", f.name()),
        Some(Repacked::Block(b, data)) => {
            assert_eq!(b, BlockFormat::Q8_0, "{}", f.name());
            let mut got = Vec::new();
            b.dequantize(&data, rows * cols, &mut got).unwrap();
            if f == DecodedFormat::Iq4Xs {
                // Each group's scale rounded to f16 (2⁻¹¹ of a normal value, 2⁻²⁵ below),
                // times int8 codes.
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let bound = w.abs() / 2000.0 + 127.0 * 2f32.powi(-25);
                    assert!((g - w).abs() <= bound, "IQ4_XS value {i}: {g} against {w}");
                }
            } else {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{} as Q8_0", f.name());
            }
        }
        Some(Repacked::Int4(i4, data)) => {
            assert_eq!(f, DecodedFormat::Q4K);
            i4.check(rows, cols, &data).unwrap();
            let mut got = vec![0f32; cols];
            for r in 0..rows {
                i4.dequantize_row(&data, cols, r, &mut got);
                for (i, (g, w)) in got.iter().zip(&want[r * cols..]).enumerate() {
                    let group = r * cols / 32 + i / 32;
                    let (scale, min) = (data.scales[group].to_f32(), data.mins[group].to_f32());
                    let bound = (15.0 * scale.abs() + min.abs()) / 1024.0;
                    assert!(
                        (g - w).abs() <= bound,
                        "Q4_K as int4, row {r} value {i}: {g} against {w}"
                    );
                }
            }
        }
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

/// A model with a matrix in each decoded format holds its twin's weights, the twin's
/// matrices decoded by the reference and stored as F16: bit for bit where Vellum decodes to
/// f16 too (Q2_K, Q3_K, Q5_K, Q6_K, Q5_1) or keeps the exact values (Q5_0 and IQ4_NL as
/// Q8_0, rounded to f16 here); within f16's rounding of each group's scale where it keeps
/// Q4_K as int4 and IQ4_XS as Q8_0.
/// And it scores as the twin, within the integer dots' rounding.
#[test]
fn a_kquant_model_holds_and_scores_as_its_reference_decoded_twin() {
    let load = |file: &str| {
        let ck = Checkpoint::open(&repo().join("tests/golden").join(file)).unwrap();
        ck.load_model().unwrap()
    };
    let (model, twin) = (load("kquant_llama.gguf"), load("kquant_llama_f16.gguf"));
    let (layer, twin_layer) = (&model.layers[0], &twin.layers[0]);
    // Each matrix, its twin's, the GGUF format it was stored in, and the format it is kept
    // in; all but the two whose group scales are rounded to f16 hold the twin's bits.
    let matrices = [
        (&model.embed, &twin.embed, "Q6_K", "f16"),
        (&layer.q, &twin_layer.q, "IQ4_NL", "Q8_0"),
        (&layer.k, &twin_layer.k, "Q5_K", "f16"),
        (&layer.v, &twin_layer.v, "Q3_K", "f16"),
        (&layer.o, &twin_layer.o, "Q2_K", "f16"),
        (&layer.gate, &twin_layer.gate, "Q5_0", "Q8_0"),
        (&layer.up, &twin_layer.up, "Q5_1", "f16"),
        (&layer.down, &twin_layer.down, "Q4_K", "int4:g32"),
        (
            model.lm_head.as_ref().unwrap(),
            twin.lm_head.as_ref().unwrap(),
            "IQ4_XS",
            "Q8_0",
        ),
    ];
    for (w, t, stored, kept) in matrices {
        assert_eq!(w.format_name(), kept, "{stored}");
        let (got, want) = (w.to_f32(), t.to_f32());
        if stored == "Q4_K" || stored == "IQ4_XS" {
            let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = common::max_abs_diff(&got, &want);
            // The group scales' f16 rounding and the twin's own: measured 6e-4 of the top.
            assert!(err <= top / 1024.0, "{stored}: {err} (values up to {top})");
        } else {
            let f16_bits = |v: &[f32]| {
                v.iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(f16_bits(&got), f16_bits(&want), "{stored}");
        }
    }

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
    let err = common::max_abs_diff(&got[0], &want[0]);
    // Measured 1.2e-3: the group scales' f16 rounding and the integer dots' int16 activations.
    assert!(err < 5e-3, "log-probabilities {err} from the twin's");
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
