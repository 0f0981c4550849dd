//! Subcommands of the `vellum` binary. Every command goes through the same Engine API as
//! embedders use; there is no second inference path.

mod bench;
mod generate;
mod inspect;
mod jsonl;
mod quantize;
mod score;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vellum_engine::{Engine, EngineConfig};
use vellum_kernels::{Device, KvDtype};

#[derive(Parser)]
#[command(
    name = "vellum",
    version,
    about = "Vellum: a small, embeddable LLM inference engine"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score texts from JSONL: log-likelihood, perplexity and per-token logprobs.
    ///
    /// Example: vellum score --model model.gguf --input texts.jsonl --output scores.jsonl
    Score(score::ScoreArgs),
    /// Generate completions for a prompt or a JSONL file of prompts.
    ///
    /// Example: vellum generate --model model.gguf --chat --prompt "What is the capital of France?"
    Generate(generate::GenerateArgs),
    /// Print a model's architecture, tensors and tokenizer, validating everything a load checks.
    ///
    /// Example: vellum inspect model.gguf
    Inspect(inspect::InspectArgs),
    /// Write a checkpoint with quantized linear layers (a Hugging Face directory that Vellum
    /// loads back as it was written).
    ///
    /// Example: vellum quantize model.gguf out_dir --to int8 --gptq
    Quantize(quantize::QuantizeArgs),
    /// Throughput and latency at several concurrency levels, on a model or a synthetic shape.
    ///
    /// Example: vellum bench --shape tinyllama-1.1b --concurrency 1,4,16 --threads 2
    Bench(bench::BenchArgs),
    /// Convert a checkpoint (e.g. a GGUF file) to a Hugging Face directory.
    ///
    /// Example: vellum convert model.gguf out_dir --dtype f32
    Convert(inspect::ConvertArgs),
}

/// Options shared by the commands that run a model.
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Model: a Hugging Face directory (config.json + safetensors) or a .gguf file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Device to run on: auto (VELLUM_DEVICE, else cpu), cpu, cuda:N (a GPU), or cuda-emu
    /// (the CUDA kernels on the CPU emulator, slow, for debugging).
    #[arg(long, default_value = "auto")]
    device: String,
    /// KV cache memory, with units (e.g. 512MiB, 2GiB).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    kv_cache_mem: usize,
    /// KV cache element type: f16 (twice the tokens in the same memory, half the bytes a
    /// long-context decode reads), f32, or int8 (one scale per 32 values: 1.78x f16's
    /// tokens, perplexity +0.03% on SmolLM2; see README).
    #[arg(long, default_value = "f16", value_parser = parse_kv_dtype)]
    kv_dtype: KvDtype,
    /// Convert all weights to this dense dtype on load: f32, f16 or bf16 (quantized GGUF
    /// weights are dequantized).
    #[arg(long)]
    dtype: Option<String>,
    /// Quantize the linear layers on load: int8 (per channel), int4 (= int4:g32, asymmetric,
    /// the Q4_1 layout), int4:sym (Q4_0), q8_0, int4:g64 / int4:g128 (planar, `:sym` for
    /// symmetric, `:mse` for the MSE scale search). Embeddings, norms and the LM head stay as
    /// loaded.
    #[arg(long)]
    quant: Option<String>,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 64)]
    max_seqs: usize,
    /// Token budget of one step (prefill chunks plus decodes).
    #[arg(long, default_value_t = 512)]
    max_batched_tokens: usize,
    /// Record each decode batch shape's step once and replay it as one launch (CUDA graphs,
    /// on cuda:N and cuda-emu): the same results without a launch per op. Off by default
    /// until measured on GPUs.
    #[arg(long)]
    step_graphs: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// No progress output on stderr.
    #[arg(long, short = 'q')]
    quiet: bool,
}

impl EngineArgs {
    fn build(&self) -> Result<Engine> {
        let device = match self.device.as_str() {
            "auto" => Device::auto().map_err(|e| anyhow::anyhow!("--device auto: {e}"))?,
            d => Device::parse(d).map_err(|e| anyhow::anyhow!("--device: {e}"))?,
        };
        if let Some(n) = self.threads {
            if n == 0 {
                bail!("--threads must be at least 1");
            }
            // Ignored if the pool was already built (only happens in tests).
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global();
        }
        let config = EngineConfig {
            kv_cache_bytes: self.kv_cache_mem,
            kv_dtype: self.kv_dtype,
            max_seqs: self.max_seqs,
            max_batched_tokens: self.max_batched_tokens,
            step_graphs: self.step_graphs,
            ..EngineConfig::default()
        };
        let mut builder = Engine::builder()
            .model(&self.model)
            .config(config)
            .device(device);
        if let Some(d) = &self.dtype {
            let dtype = vellum_quant::DType::parse(d)
                .ok_or_else(|| anyhow::anyhow!("--dtype {d}: expected f32, f16 or bf16"))?;
            builder = builder.dtype(dtype);
        }
        if let Some(q) = &self.quant {
            let target = vellum_kernels::QuantTarget::parse(q).ok_or_else(|| {
                anyhow::anyhow!(
                    "--quant {q}: expected int8, int4, int4:sym, q8_0 or int4:g64|g128[:sym][:mse]"
                )
            })?;
            builder = builder.quant(target);
        }
        builder
            .build()
            .with_context(|| format!("loading {}", self.model.display()))
    }
}

pub fn parse_kv_dtype(s: &str) -> std::result::Result<KvDtype, String> {
    KvDtype::parse(s).ok_or_else(|| format!("{s}: expected f16, f32 or int8"))
}

/// Parses sizes like `512MiB`, `2GiB`, `1.5GB`, `1048576`.
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 512MiB, 2GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{s}` (use KiB, MiB, GiB)"
            ))
        }
    };
    Ok((n * mult) as usize)
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Score(a) => score::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::inspect(a),
        Command::Convert(a) => inspect::convert(a),
        Command::Bench(a) => bench::run(a),
        Command::Quantize(a) => quantize::quantize(a),
    }
}

/// Opens `path` for reading, `-` meaning stdin.
fn open_input(path: &str) -> Result<Box<dyn std::io::BufRead>> {
    Ok(if path == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
        Box::new(std::io::BufReader::new(f))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(super::parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(super::parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(super::parse_size("1000"), Ok(1000));
        assert!(super::parse_size("12 parsecs").is_err());
    }
}
