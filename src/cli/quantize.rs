//! `vellum quantize`: round to nearest, or GPTQ calibrated on a text or on the model's own
//! samples.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use vellum_engine::calibrate::{
    gptq_supports, quantize_linears_gptq, sample_calibration, DEFAULT_DAMP,
};
use vellum_engine::{Checkpoint, Engine, Model};
use vellum_kernels::cpu::Cpu;
use vellum_kernels::QuantTarget;
use vellum_quant::DType;

#[derive(Args)]
pub struct QuantizeArgs {
    /// Input checkpoint (a Hugging Face directory or a .gguf file).
    input: PathBuf,
    /// Output directory (created if missing).
    output: PathBuf,
    /// Format of the linear layers: int8 (per channel), int4 (g32 asymmetric, Q4_1 layout),
    /// int4:sym (Q4_0 layout), q8_0, int4:g64|g128[:sym][:mse].
    #[arg(long)]
    to: String,
    /// Dtype of everything else (embeddings, norms, LM head): f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// Quantize with GPTQ (int8, int4:g64, int4:g128): each weight's rounding error is
    /// compensated on the weights not yet rounded, against the layer inputs of calibration
    /// tokens. Runs the model on the CPU first (about 40 s for a 135M model on 2 cores).
    #[arg(long)]
    gptq: bool,
    /// GPTQ calibration text (UTF-8), cut into sequences of --calibration-len tokens.
    /// Default: text the model samples itself (no data needed).
    #[arg(long, requires = "gptq")]
    calibration: Option<PathBuf>,
    /// GPTQ: sequences the model samples for calibration when no text is given.
    #[arg(long, default_value_t = 8, requires = "gptq")]
    calibration_samples: usize,
    /// GPTQ: tokens per calibration sequence.
    #[arg(long, default_value_t = 256, requires = "gptq")]
    calibration_len: usize,
    /// GPTQ: seed of the calibration samples.
    #[arg(long, default_value_t = 0, requires = "gptq")]
    seed: u64,
    /// GPTQ: fraction of the mean Hessian diagonal added to the diagonal (larger trusts the
    /// calibration less).
    #[arg(long, default_value_t = DEFAULT_DAMP, requires = "gptq")]
    damp: f64,
}

pub fn quantize(a: QuantizeArgs) -> Result<ExitCode> {
    let target = QuantTarget::parse(&a.to).ok_or_else(|| {
        anyhow!(
            "--to {}: expected int8, int4, int4:sym, q8_0 or int4:g64|g128[:sym][:mse]",
            a.to
        )
    })?;
    let dtype = DType::parse(&a.dtype)
        .ok_or_else(|| anyhow!("--dtype {}: expected f32, f16 or bf16", a.dtype))?;
    if a.gptq && !gptq_supports(target) {
        bail!(
            "--gptq quantizes to int8 (per channel) or int4:g64|g128[:sym], not {}",
            target.name()
        );
    }
    if a.calibration_len < 2 || a.calibration_samples == 0 {
        bail!("--calibration-len must be at least 2 and --calibration-samples at least 1");
    }
    let ck = Checkpoint::open(&a.input)?;
    let model = if a.gptq {
        let calibration = calibration_tokens(&a, &ck, dtype)?;
        let mut model = ck.load_model()?;
        model.to_dtype(dtype)?;
        let start = Instant::now();
        eprintln!(
            "GPTQ over {} calibration tokens… (RUST_LOG=info shows each layer)",
            calibration.iter().map(Vec::len).sum::<usize>()
        );
        quantize_linears_gptq(&mut model, &Cpu::new(), target, &calibration, a.damp)?;
        eprintln!("GPTQ done in {:.1} s", start.elapsed().as_secs_f64());
        write(&model, &ck, &a, dtype)?;
        model
    } else {
        vellum_engine::convert::quantize(&ck, &a.output, target, dtype)
            .with_context(|| context(&a))?
    };
    eprintln!(
        "wrote {}: linear layers {}{}, the rest {dtype}; {:.1} MiB of weights read per step",
        a.output.display(),
        target.name(),
        if a.gptq { " (GPTQ)" } else { "" },
        model.weight_bytes() as f64 / (1 << 20) as f64
    );
    Ok(ExitCode::SUCCESS)
}

/// The calibration sequences: the given text cut into `--calibration-len` pieces (BOS
/// first when the model has one), or the model's own samples.
fn calibration_tokens(a: &QuantizeArgs, ck: &Checkpoint, dtype: DType) -> Result<Vec<Vec<u32>>> {
    let Some(path) = &a.calibration else {
        let start = Instant::now();
        eprintln!(
            "sampling {} calibration sequences of {} tokens from the model…",
            a.calibration_samples, a.calibration_len
        );
        let mut engine = Engine::builder()
            .model(&a.input)
            .dtype(dtype)
            .backend(Box::new(Cpu::new()))
            .build()?;
        let samples = sample_calibration(
            &mut engine,
            a.calibration_samples,
            a.calibration_len,
            a.seed,
        )?;
        eprintln!("sampled in {:.1} s", start.elapsed().as_secs_f64());
        return Ok(samples);
    };
    let tok = ck.tokenizer.as_ref().ok_or_else(|| {
        anyhow!(
            "{}: no tokenizer to encode --calibration with",
            a.input.display()
        )
    })?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --calibration {}", path.display()))?;
    let ids = tok.encode(&text, false)?;
    if ids.is_empty() {
        bail!("--calibration {}: no tokens", path.display());
    }
    let body = a.calibration_len - usize::from(tok.bos_id.is_some());
    let sequences: Vec<Vec<u32>> = ids
        .chunks(body)
        .map(|c| tok.bos_id.into_iter().chain(c.iter().copied()).collect())
        .collect();
    Ok(sequences)
}

fn write(model: &Model, ck: &Checkpoint, a: &QuantizeArgs, dtype: DType) -> Result<()> {
    vellum_engine::convert::write_checkpoint(model, ck.tokenizer.as_ref(), &a.output, dtype)
        .with_context(|| context(a))
}

fn context(a: &QuantizeArgs) -> String {
    format!("quantizing {} to {}", a.input.display(), a.output.display())
}
