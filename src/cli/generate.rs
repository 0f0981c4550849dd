//! `vellum generate`: completions for one prompt (streamed) or a JSONL file of prompts.

use super::{jsonl, open_input, EngineArgs};
use anyhow::{anyhow, bail, Result};
use clap::Args;
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use vellum_engine::{ChatMessage, Engine, Request, SamplingParams};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// A single prompt; its completion is streamed to stdout.
    #[arg(long, short = 'p', conflicts_with = "input")]
    prompt: Option<String>,
    /// JSONL input: {"id": ..., "prompt": ...} per line, with optional per-line sampling
    /// fields (temperature, top_k, top_p, min_p, max_tokens, seed, stop, ...).
    #[arg(long, short = 'i')]
    input: Option<String>,
    /// JSONL output (batch mode); `-` writes stdout.
    #[arg(long, short = 'o', default_value = "-")]
    output: String,
    /// Wrap each prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0 disables).
    #[arg(long, default_value_t = 0)]
    top_k: i64,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens below min_p times the top probability.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Seed for sampling (same seed, same tokens).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable); not included in the output.
    #[arg(long)]
    stop: Vec<String>,
    /// Stop token ids, comma separated (the token is kept in the output).
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
    /// What a malformed line does: `skip` writes an error line and goes on, `fail` stops.
    #[arg(long, value_enum, default_value = "skip")]
    on_error: jsonl::OnError,
    /// Report this many top alternatives per token (batch mode, in `logprobs`).
    #[arg(long, default_value_t = 0)]
    logprobs: usize,
    /// Independent samples per prompt (they share the prompt's KV blocks).
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Prompts handed to the engine at once (batch mode).
    #[arg(long, default_value_t = 256)]
    group: usize,
    /// Keep an existing --output file's complete lines and skip their ids.
    #[arg(long)]
    resume: bool,
    /// Handle only the input lines with index % N == I (0-based), e.g. --shard 0/4.
    #[arg(long, value_parser = jsonl::Shard::parse)]
    shard: Option<jsonl::Shard>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl GenerateArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop_token_ids: self.stop_token_ids.clone(),
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            n: self.n,
        }
    }
}

/// Per-line overrides of the flag defaults.
fn line_params(base: &SamplingParams, v: &Value) -> std::result::Result<SamplingParams, String> {
    let mut p = base.clone();
    let num = |k: &str| {
        v.get(k)
            .map(|x| x.as_f64().ok_or(format!("`{k}` must be a number")))
    };
    let int = |k: &str| {
        v.get(k)
            .map(|x| x.as_i64().ok_or(format!("`{k}` must be an integer")))
    };
    if let Some(x) = num("temperature") {
        p.temperature = x? as f32;
    }
    if let Some(x) = num("top_p") {
        p.top_p = x? as f32;
    }
    if let Some(x) = num("min_p") {
        p.min_p = x? as f32;
    }
    if let Some(x) = num("repetition_penalty") {
        p.repetition_penalty = x? as f32;
    }
    if let Some(x) = num("presence_penalty") {
        p.presence_penalty = x? as f32;
    }
    if let Some(x) = num("frequency_penalty") {
        p.frequency_penalty = x? as f32;
    }
    if let Some(x) = int("top_k") {
        p.top_k = x?;
    }
    if let Some(x) = int("max_tokens") {
        p.max_tokens = usize::try_from(x?).map_err(|_| "`max_tokens` must be >= 0".to_string())?;
    }
    if let Some(x) = int("seed") {
        p.seed = Some(x? as u64);
    }
    if let Some(x) = int("n") {
        p.n = usize::try_from(x?).map_err(|_| "`n` must be >= 1".to_string())?;
    }
    if let Some(x) = int("logprobs") {
        p.logprobs = usize::try_from(x?).map_err(|_| "`logprobs` must be >= 0".to_string())?;
    }
    match v.get("stop_token_ids") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            p.stop_token_ids = a
                .iter()
                .map(|t| {
                    t.as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .ok_or("`stop_token_ids` must be token ids".to_string())
                })
                .collect::<std::result::Result<_, _>>()?
        }
        Some(_) => return Err("`stop_token_ids` must be a list of token ids".into()),
    }
    match v.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => p.stop = vec![s.clone()],
        Some(Value::Array(a)) => {
            p.stop = a
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or("`stop` must be strings".to_string())
                })
                .collect::<std::result::Result<_, _>>()?
        }
        Some(_) => return Err("`stop` must be a string or a list of strings".into()),
    }
    p.validate().map_err(|e| e.to_string())?;
    Ok(p)
}

fn prompt_tokens(engine: &Engine, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    let tok = engine
        .tokenizer()
        .ok_or_else(|| anyhow!("the model has no tokenizer"))?;
    if chat {
        let text = tok.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }],
            true,
        )?;
        // The template writes any BOS itself.
        Ok(tok.encode(&text, false)?)
    } else {
        Ok(tok.encode(prompt, true)?)
    }
}

pub fn run(a: GenerateArgs) -> Result<ExitCode> {
    let mut engine = a.engine.build()?;
    let base = a.params();
    base.validate()?;
    if let Some(prompt) = &a.prompt {
        let id = engine.add_request(Request::tokens(
            prompt_tokens(&engine, prompt, a.chat)?,
            base,
        ))?;
        let mut stdout = std::io::stdout();
        let n = a.n;
        // One sample streams as it is generated; several print whole, one after another.
        let mut samples = vec![String::new(); n];
        while engine.has_unfinished() {
            for out in engine.step()? {
                if out.request_id != id {
                    continue;
                }
                if n == 1 {
                    write!(stdout, "{}", out.text_delta)?;
                    stdout.flush()?;
                } else {
                    samples[out.sample_index].push_str(&out.text_delta);
                }
            }
        }
        for (i, text) in samples.iter().enumerate().filter(|_| n > 1) {
            writeln!(stdout, "--- sample {i} ---\n{text}")?;
        }
        writeln!(stdout)?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(input) = &a.input else {
        bail!("give --prompt TEXT or --input FILE (use `-` for stdin)")
    };
    let (mut out, already) = jsonl::open_output(&a.output, a.resume)?;
    let interrupted = jsonl::interrupt_flag();
    let bar = jsonl::progress(jsonl::count_lines(input), a.engine.quiet, "prompts");
    let mut failed = 0;
    let mut lines = open_input(input)?.lines().enumerate().peekable();
    'groups: while lines.peek().is_some() {
        // A group of lines runs together; its lines are written whole, in input order.
        let (group, _) = jsonl::read_group(&mut lines, a.group, a.shard, &already, &bar)?;
        let results: Vec<Submitted> = group
            .into_iter()
            .map(|l| {
                let id = l.id;
                let v = l.json.map_err(|msg| (id.clone(), msg))?;
                let prompt = v
                    .get("prompt")
                    .and_then(Value::as_str)
                    .ok_or((id.clone(), "missing string `prompt`".to_string()))?;
                let params = line_params(&base, &v).map_err(|m| (id.clone(), m))?;
                let tokens = prompt_tokens(&engine, prompt, a.chat)
                    .map_err(|e| (id.clone(), e.to_string()))?;
                let n = tokens.len();
                let rid = engine
                    .add_request(Request::tokens(tokens, params))
                    .map_err(|e| (id.clone(), e.to_string()))?;
                Ok((id, rid, n))
            })
            .collect();
        let mut done = std::collections::HashMap::new();
        while engine.has_unfinished() {
            if interrupted.load(Ordering::SeqCst) {
                bar.abandon_with_message("interrupted");
                break 'groups;
            }
            for o in engine.step()? {
                done.entry(o.request_id)
                    .or_insert_with(vellum_engine::Completion::default)
                    .absorb_sample(o);
            }
        }
        for r in results {
            let line = match r {
                Err((id, msg)) => {
                    failed += 1;
                    if a.on_error == jsonl::OnError::Fail {
                        out.flush()?;
                        bail!("line {id}: {msg}");
                    }
                    json!({"id": id, "error": msg})
                }
                Ok((id, rid, n_prompt)) => completion_line(
                    id,
                    n_prompt,
                    done.remove(&rid).unwrap_or_default(),
                    base.logprobs,
                ),
            };
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    bar.finish_and_clear();
    out.flush()?;
    if let (Some(g), false) = (engine.graph_stats(), a.engine.quiet) {
        eprintln!("step graphs: {g}");
    }
    if interrupted.load(Ordering::SeqCst) {
        eprintln!("interrupted: every written line is complete; rerun with --resume to go on");
        return Ok(ExitCode::from(130));
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// A line handed to the engine (id, request, prompt tokens), or its error.
type Submitted = std::result::Result<(Value, u64, usize), (Value, String)>;

/// The output line of one finished prompt.
fn completion_line(
    id: Value,
    n_prompt: usize,
    c: vellum_engine::Completion,
    logprobs: usize,
) -> Value {
    let mut o = json!({
        "id": id, "completion": c.text,
        "finish_reason": c.finish_reason.map(|f| f.as_str()),
        "prompt_tokens": n_prompt, "completion_tokens": c.tokens.len(),
    });
    if !c.more_samples.is_empty() {
        o["more_samples"] = json!(c
            .more_samples
            .iter()
            .map(|s| json!({
                "completion": s.text, "finish_reason": s.finish_reason.map(|f| f.as_str()),
                "completion_tokens": s.tokens.len(),
            }))
            .collect::<Vec<_>>());
    }
    if logprobs > 0 || c.logprobs.iter().any(|l| !l.top.is_empty()) {
        o["logprobs"] = json!(c
            .logprobs
            .iter()
            .map(|l| json!({"token": l.token, "logprob": l.logprob, "top": l.top}))
            .collect::<Vec<_>>());
    }
    o
}
