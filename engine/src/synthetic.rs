//! Models of real shapes with random weights, for benchmarks and device tests that must not
//! depend on a download.

use crate::config::{Arch, ModelConfig};
use crate::model::{Layer, Model};
use rayon::prelude::*;
use vellum_kernels::{Rope, RopeScaling, Tensor, Weight};
use vellum_quant::DType;

/// Named shapes `vellum bench --shape` knows.
pub const SHAPES: [&str; 4] = [
    "smollm-135m",
    "tinyllama-1.1b",
    "llama-3.2-1b",
    "qwen2.5-0.5b",
];

/// The config of a named shape.
pub fn shape(name: &str) -> Option<ModelConfig> {
    #[allow(clippy::type_complexity)]
    let (arch, h, f, l, nh, nkv, hd, vocab, tied, theta): (
        Arch,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
        f64,
    ) = match name {
        "smollm-135m" => (Arch::Llama, 576, 1536, 30, 9, 3, 64, 49152, true, 100000.0),
        "tinyllama-1.1b" => (
            Arch::Llama,
            2048,
            5632,
            22,
            32,
            4,
            64,
            32000,
            false,
            10000.0,
        ),
        "llama-3.2-1b" => (
            Arch::Llama,
            2048,
            8192,
            16,
            32,
            8,
            64,
            128256,
            true,
            500000.0,
        ),
        "qwen2.5-0.5b" => (
            Arch::Qwen2,
            896,
            4864,
            24,
            14,
            2,
            64,
            151936,
            true,
            1000000.0,
        ),
        _ => return None,
    };
    Some(ModelConfig {
        arch,
        hidden_size: h,
        intermediate_size: f,
        num_layers: l,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: RopeScaling::None,
        tie_word_embeddings: tied,
        attention_bias: arch == Arch::Qwen2,
        max_position_embeddings: 8192,
        bos_token_id: None,
        eos_token_ids: vec![],
        quantization: None,
    })
}

/// Deterministic pseudo-random values in about N(0, std²) (sum of uniforms), fast enough
/// for a billion parameters.
fn random(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for x in chunk {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let w = (s >> 40) as f32 / (1u64 << 24) as f32;
                *x = (u + w - 1.0) * std * 2.449; // var of u+w-1 is 1/6
            }
        });
    v
}

/// A model of `config`'s shape with random weights stored as `dtype`.
pub fn random_model(config: ModelConfig, dtype: DType, seed: u64) -> Model {
    let c = &config;
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let mut next = seed;
    let mut mat = |rows: usize, cols: usize| {
        next = next.wrapping_add(1);
        let v = random(rows * cols, 1.0 / (cols as f32).sqrt(), next);
        Weight::dense(rows, cols, dtype, &v).expect("sizes match by construction")
    };
    let embed = mat(c.vocab_size, h);
    let lm_head = (!c.tie_word_embeddings).then(|| mat(c.vocab_size, h));
    let layers = (0..c.num_layers)
        .map(|_| Layer {
            attn_norm: vec![1.0; h].into(),
            q: mat(c.q_width(), h),
            k: mat(c.kv_width(), h),
            v: mat(c.kv_width(), h),
            q_bias: c.attention_bias.then(|| Tensor::zeros(c.q_width())),
            k_bias: c.attention_bias.then(|| Tensor::zeros(c.kv_width())),
            v_bias: c.attention_bias.then(|| Tensor::zeros(c.kv_width())),
            o: mat(h, c.q_width()),
            mlp_norm: vec![1.0; h].into(),
            gate: mat(f, h),
            up: mat(f, h),
            down: mat(h, f),
        })
        .collect();
    let rope = Rope::new(c.head_dim, c.rope_theta, &c.rope_scaling);
    Model {
        config,
        embed,
        layers,
        norm: vec![1.0; h].into(),
        lm_head,
        rope,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_shapes_are_valid_and_have_their_parameter_counts() {
        for name in SHAPES {
            let c = shape(name).unwrap();
            c.validate(std::path::Path::new(name)).unwrap();
        }
        let c = shape("tinyllama-1.1b").unwrap();
        let per_layer = 2 * c.hidden_size * c.q_width()
            + 2 * c.hidden_size * c.kv_width()
            + 3 * c.hidden_size * c.intermediate_size;
        let total = c.num_layers * per_layer + 2 * c.vocab_size * c.hidden_size;
        assert!((1_000_000_000..1_200_000_000).contains(&total), "{total}");
        assert!(shape("gpt-5").is_none());
    }

    #[test]
    fn random_values_have_the_asked_spread() {
        let v = random(100_000, 0.5, 1);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(
            mean.abs() < 0.01 && (var.sqrt() - 0.5).abs() < 0.02,
            "mean {mean}, std {}",
            var.sqrt()
        );
    }
}
