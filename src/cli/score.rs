//! `vellum score`: log-likelihood of texts (or of continuations given contexts) over JSONL.

use super::{open_input, open_output, EngineArgs};
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use vellum_engine::{Engine, Request};

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// JSONL input, one {"text": ...} or {"context": ..., "continuation": ...} per line,
    /// with an optional "id"; `-` reads stdin.
    #[arg(long, short = 'i', default_value = "-")]
    input: String,
    /// JSONL output, one line per input line in input order; `-` writes stdout.
    #[arg(long, short = 'o', default_value = "-")]
    output: String,
    /// Also write `tokens` and `token_logprobs` (one per scored token).
    #[arg(long)]
    token_logprobs: bool,
    /// Write the run summary as JSON to this file too.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// What a malformed line does: `skip` writes an error line and goes on, `fail` stops.
    #[arg(long, value_enum, default_value = "skip")]
    on_error: OnError,
    /// Lines handed to the engine at once (continuous batching works within a group).
    #[arg(long, default_value_t = 256)]
    group: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnError {
    Skip,
    Fail,
}

/// One parsed input line: the tokens to run and how many trailing ones are scored.
struct Job {
    id: Value,
    tokens: Vec<u32>,
    scored: usize,
}

fn parse_line(
    engine: &Engine,
    line: &str,
    lineno: usize,
    prefix: u32,
) -> std::result::Result<Job, (Value, String)> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| (json!(lineno), format!("not valid JSON: {e}")))?;
    let id = v.get("id").cloned().unwrap_or(json!(lineno));
    let field = |name: &str| -> std::result::Result<Option<&str>, (Value, String)> {
        match v.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err((id.clone(), format!("`{name}` must be a string"))),
        }
    };
    let enc = |s: &str| engine.encode(s).map_err(|e| (id.clone(), e.to_string()));
    let (tokens, scored) = match (field("text")?, field("context")?, field("continuation")?) {
        (Some(text), None, None) => {
            if text.is_empty() {
                return Err((id, "`text` is empty".into()));
            }
            // Every token of the text is scored, conditioned on one prefix token, as
            // lm-evaluation-harness's rolling log-likelihood does.
            let mut t = vec![prefix];
            t.extend(enc(text)?);
            let n = t.len() - 1;
            (t, n)
        }
        (None, Some(ctx), Some(cont)) => {
            if cont.is_empty() {
                return Err((id, "`continuation` is empty".into()));
            }
            let mut t = if ctx.is_empty() {
                vec![prefix]
            } else {
                enc(ctx)?
            };
            let c = enc(cont)?;
            // encode() may prepend BOS; a continuation never starts with it.
            let c: Vec<u32> = match engine.tokenizer().and_then(|t| t.bos_id) {
                Some(b) if c.first() == Some(&b) => c[1..].to_vec(),
                _ => c,
            };
            let n = c.len();
            t.extend(c);
            (t, n)
        }
        _ => {
            return Err((
                id,
                "expected {\"text\": ...} or {\"context\": ..., \"continuation\": ...}".into(),
            ))
        }
    };
    if scored == 0 {
        return Err((id, "nothing to score: the text has no tokens".into()));
    }
    let limit = engine
        .model()
        .config
        .max_position_embeddings
        .min(engine.kv_capacity_tokens());
    if tokens.len() > limit {
        return Err((
            id,
            format!("{} tokens exceed the context window of {limit} (sliding-window scoring is not built yet)", tokens.len()),
        ));
    }
    Ok(Job { id, tokens, scored })
}

pub fn run(a: ScoreArgs) -> Result<ExitCode> {
    let mut engine = a.engine.build()?;
    let tok = engine.tokenizer().cloned();
    let Some(tok) = tok else {
        bail!("{}: the model has no tokenizer", a.engine.model.display())
    };
    let prefix = tok
        .bos_id
        .or(engine.model().config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let input = open_input(&a.input)?;
    let mut out = open_output(&a.output)?;
    let start = std::time::Instant::now();
    let (mut docs, mut failed, mut total_tokens, mut total_lp) = (0usize, 0usize, 0usize, 0f64);
    let mut lines = input.lines().enumerate().peekable();
    while lines.peek().is_some() {
        // Parse a group, run its valid lines together, then write all in input order.
        let mut group: Vec<std::result::Result<Job, (Value, String)>> = Vec::new();
        for (i, line) in lines.by_ref().take(a.group.max(1)) {
            let line = line?;
            group.push(parse_line(&engine, &line, i + 1, prefix));
        }
        let jobs: Vec<&Job> = group.iter().filter_map(|g| g.as_ref().ok()).collect();
        let scores = engine.generate(
            jobs.iter()
                .map(|j| Request::score(j.tokens.clone()))
                .collect(),
        )?;
        let mut scores = scores.into_iter();
        for g in group {
            let line = match g {
                Err((id, msg)) => {
                    failed += 1;
                    if a.on_error == OnError::Fail {
                        out.flush()?;
                        bail!("line {id}: {msg}");
                    }
                    json!({"id": id, "error": msg})
                }
                Ok(job) => {
                    let c = scores.next().expect("one completion per job");
                    let lps = c.prompt_logprobs.unwrap_or_default();
                    let greedy = c.prompt_is_greedy.unwrap_or_default();
                    let from = lps.len() - job.scored;
                    let lps = &lps[from..];
                    let sum: f64 = lps.iter().map(|&l| l as f64).sum();
                    docs += 1;
                    total_tokens += lps.len();
                    total_lp += sum;
                    let mut o = json!({
                        "id": job.id, "total_logprob": sum, "n_tokens": lps.len(),
                        "ppl": (-sum / lps.len() as f64).exp(),
                        "is_greedy": greedy[from..].iter().all(|&g| g),
                    });
                    if a.token_logprobs {
                        let scored = &job.tokens[job.tokens.len() - job.scored..];
                        let pieces: Vec<String> = scored
                            .iter()
                            .map(|&t| tok.id_to_piece(t).unwrap_or_default())
                            .collect();
                        o["tokens"] = json!(pieces);
                        o["token_logprobs"] = json!(lps);
                    }
                    o
                }
            };
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        if !a.engine.quiet {
            eprint!("\rscored {docs} lines ({failed} failed), {total_tokens} tokens");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let summary = json!({
        "documents": docs, "failed": failed, "tokens": total_tokens,
        "ppl": if total_tokens > 0 { (-total_lp / total_tokens as f64).exp() } else { f64::NAN },
        "total_logprob": total_lp, "seconds": secs, "tokens_per_second": total_tokens as f64 / secs.max(1e-9),
    });
    if !a.engine.quiet {
        eprintln!();
    }
    eprintln!("{summary}");
    if let Some(p) = &a.summary {
        std::fs::write(p, summary.to_string() + "\n")?;
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
