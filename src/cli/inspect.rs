//! `vellum inspect` and `vellum convert`.

use anyhow::{anyhow, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use vellum_engine::Checkpoint;
use vellum_quant::DType;

#[derive(Args)]
pub struct InspectArgs {
    /// A Hugging Face directory or a .gguf file.
    path: PathBuf,
    /// Also list every tensor.
    #[arg(long)]
    tensors: bool,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Input checkpoint (a .gguf file or a Hugging Face directory).
    input: PathBuf,
    /// Output directory (created if missing).
    output: PathBuf,
    /// Weight dtype of the written safetensors: f32 (exact for dequantized GGUF weights), f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn inspect(a: InspectArgs) -> Result<ExitCode> {
    let ck = Checkpoint::open(&a.path)?;
    // Materialising the model runs every check a load does (presence, shape, dtype, bytes).
    let model = ck.load_model()?;
    let c = &ck.config;
    println!("path:          {}", a.path.display());
    if let Some(g) = &ck.gguf {
        println!("format:        GGUF v{}", g.version);
    } else {
        println!("format:        Hugging Face (safetensors)");
    }
    println!("architecture:  {:?}", c.arch);
    println!(
        "shape:         {} layers, hidden {}, ffn {}, heads {} / kv heads {}, head_dim {}, vocab {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    );
    println!(
        "rope:          theta {}, scaling {:?}; rms eps {}; tied embeddings: {}; qkv bias: {}",
        c.rope_theta, c.rope_scaling, c.rms_norm_eps, c.tie_word_embeddings, c.attention_bias
    );
    println!("context:       {} positions", c.max_position_embeddings);
    let mut formats = std::collections::BTreeMap::<String, (usize, usize)>::new();
    for t in ck.store.infos() {
        let e = formats.entry(t.format.name()).or_default();
        e.0 += 1;
        e.1 += t.byte_len;
    }
    let bytes: usize = formats.values().map(|v| v.1).sum();
    println!(
        "parameters:    {} ({:.1} MiB on disk)",
        ck.num_params(),
        bytes as f64 / (1 << 20) as f64
    );
    for (f, (n, b)) in &formats {
        println!(
            "  {f:>5}: {n} tensors, {:.1} MiB",
            *b as f64 / (1 << 20) as f64
        );
    }
    println!(
        "weights read per decode step: {:.1} MiB",
        model.weight_bytes() as f64 / (1 << 20) as f64
    );
    match &ck.tokenizer {
        Some(t) => println!(
            "tokenizer:     {} tokens, bos {:?}, eos {:?}, add_bos {}, chat template: {}",
            t.vocab_size(),
            t.bos_token,
            t.eos_token,
            t.add_bos,
            if t.chat_template.is_some() {
                "yes"
            } else {
                "no"
            }
        ),
        None => println!("tokenizer:     none (token ids only)"),
    }
    if a.tensors {
        for t in ck.store.infos() {
            println!("  {:<50} {:>6} {:?}", t.name, t.format.name(), t.shape);
        }
    }
    println!("ok: every tensor present, shaped and typed as the config says");
    Ok(ExitCode::SUCCESS)
}

pub fn convert(a: ConvertArgs) -> Result<ExitCode> {
    let dtype = DType::parse(&a.dtype)
        .ok_or_else(|| anyhow!("--dtype {}: expected f32, f16 or bf16", a.dtype))?;
    let ck = Checkpoint::open(&a.input)?;
    vellum_engine::convert::convert(&ck, &a.output, dtype)
        .with_context(|| format!("converting {} to {}", a.input.display(), a.output.display()))?;
    eprintln!("wrote {} ({dtype})", a.output.display());
    Ok(ExitCode::SUCCESS)
}
