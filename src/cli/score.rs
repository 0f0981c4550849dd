//! `vellum score`: log-likelihood of texts (or of continuations given contexts) over JSONL.

use super::jsonl::{self, OnError, Shard};
use super::{open_input, EngineArgs};
use anyhow::{bail, Result};
use clap::Args;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use vellum_engine::{Completion, Engine, Request};

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
    /// Tokens a sliding window advances when a text is longer than the context window
    /// (default: half the window). Each token is scored once, with up to a window of context.
    #[arg(long)]
    stride: Option<usize>,
    /// Keep an existing --output file's complete lines and skip their ids.
    #[arg(long)]
    resume: bool,
    /// Score only the input lines with index % N == I (0-based), e.g. --shard 0/4.
    #[arg(long, value_parser = Shard::parse)]
    shard: Option<Shard>,
}

/// One parsed input line: the tokens to run and how many trailing ones are scored.
struct Job {
    id: Value,
    tokens: Vec<u32>,
    scored: usize,
}

type LineResult = std::result::Result<Job, (Value, String)>;

fn parse_line(engine: &Engine, v: &Value, id: Value, prefix: u32) -> LineResult {
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
    Ok(Job { id, tokens, scored })
}

/// Splits a job into windows of at most `window` tokens: `(tokens, scored)` pairs whose
/// scored tails cover the job's scored tokens exactly once, in order. The first window
/// ends as late as a full window allows; each next one advances by `stride`.
fn windows(job: &Job, window: usize, stride: usize) -> Vec<(Vec<u32>, usize)> {
    let total = job.tokens.len();
    let mut done = total - job.scored; // next token to score
    let mut out = Vec::new();
    while done < total {
        let end = if out.is_empty() {
            window.max(done + 1).min(total)
        } else {
            (done + stride).min(total)
        };
        let begin = end.saturating_sub(window);
        out.push((job.tokens[begin..end].to_vec(), end - done));
        done = end;
    }
    out
}

/// The output line of a scored job from its windows' completions.
fn result_line(
    job: &Job,
    parts: &[(&Completion, usize)],
    tok: &vellum_engine::Tokenizer,
    token_logprobs: bool,
) -> (Value, f64, usize) {
    let mut lps = Vec::with_capacity(job.scored);
    let mut greedy = true;
    for (c, scored) in parts {
        let all = c.prompt_logprobs.as_deref().unwrap_or_default();
        let is_greedy = c.prompt_is_greedy.as_deref().unwrap_or_default();
        let from = all.len() - scored;
        lps.extend_from_slice(&all[from..]);
        greedy &= is_greedy[from..].iter().all(|&g| g);
    }
    let sum: f64 = lps.iter().map(|&l| l as f64).sum();
    let mut o = json!({
        "id": job.id, "total_logprob": sum, "n_tokens": lps.len(),
        "ppl": (-sum / lps.len() as f64).exp(), "is_greedy": greedy,
    });
    if token_logprobs {
        let scored = &job.tokens[job.tokens.len() - job.scored..];
        let pieces: Vec<String> = scored
            .iter()
            .map(|&t| tok.id_to_piece(t).unwrap_or_default())
            .collect();
        o["tokens"] = json!(pieces);
        o["token_logprobs"] = json!(lps);
    }
    (o, sum, lps.len())
}

pub fn run(a: ScoreArgs) -> Result<ExitCode> {
    let mut engine = a.engine.build()?;
    let Some(tok) = engine.tokenizer().cloned() else {
        bail!("{}: the model has no tokenizer", a.engine.model.display())
    };
    let prefix = tok
        .bos_id
        .or(engine.model().config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let window = engine
        .model()
        .config
        .max_position_embeddings
        .min(engine.kv_capacity_tokens());
    let stride = a.stride.unwrap_or(window / 2).max(1);
    if stride >= window {
        bail!("--stride {stride} must be smaller than the context window of {window} tokens");
    }
    let (mut out, already) = jsonl::open_output(&a.output, a.resume)?;
    let interrupted = jsonl::interrupt_flag();
    let bar = jsonl::progress(jsonl::count_lines(&a.input), a.engine.quiet, "lines");
    let start = std::time::Instant::now();
    let (mut docs, mut failed, mut skipped, mut total_tokens, mut total_lp) =
        (0usize, 0usize, 0usize, 0usize, 0f64);
    let mut lines = open_input(&a.input)?.lines().enumerate().peekable();
    'groups: while lines.peek().is_some() {
        // Parse a group, run its valid lines together, then write all in input order.
        let (lines_in, skip) = jsonl::read_group(&mut lines, a.group, a.shard, &already, &bar)?;
        skipped += skip;
        let group: Vec<LineResult> = lines_in
            .into_iter()
            .map(|l| match l.json {
                Err(msg) => Err((l.id, msg)),
                Ok(v) => parse_line(&engine, &v, l.id, prefix),
            })
            .collect();
        // Submit every window of every job; remember which request belongs where.
        let mut owner: HashMap<u64, (usize, usize)> = HashMap::new();
        let mut per_job: Vec<Vec<(Completion, usize)>> = Vec::new();
        for (gi, g) in group.iter().enumerate() {
            per_job.push(vec![]);
            if let Ok(job) = g {
                for (wi, (tokens, scored)) in windows(job, window, stride).into_iter().enumerate() {
                    let id = engine.add_request(Request::score(tokens))?;
                    owner.insert(id, (gi, wi));
                    per_job[gi].push((Completion::default(), scored));
                }
            }
        }
        while engine.has_unfinished() {
            if interrupted.load(Ordering::SeqCst) {
                // Nothing of this group is written: every line is whole or absent.
                bar.abandon_with_message("interrupted");
                break 'groups;
            }
            for o in engine.step()? {
                let (gi, wi) = owner[&o.request_id];
                per_job[gi][wi].0.absorb(o);
            }
        }
        for (g, parts) in group.into_iter().zip(per_job) {
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
                    let parts: Vec<(&Completion, usize)> =
                        parts.iter().map(|(c, s)| (c, *s)).collect();
                    let (line, sum, n) = result_line(&job, &parts, &tok, a.token_logprobs);
                    docs += 1;
                    total_tokens += n;
                    total_lp += sum;
                    line
                }
            };
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        bar.set_message(format!("{failed} failed"));
    }
    bar.finish_and_clear();
    out.flush()?;
    let secs = start.elapsed().as_secs_f64();
    let was_interrupted = interrupted.load(Ordering::SeqCst);
    let summary = json!({
        "documents": docs, "failed": failed, "skipped_resumed": skipped, "tokens": total_tokens,
        "ppl": if total_tokens > 0 { (-total_lp / total_tokens as f64).exp() } else { f64::NAN },
        "total_logprob": total_lp, "seconds": secs, "tokens_per_second": total_tokens as f64 / secs.max(1e-9),
        "interrupted": was_interrupted,
    });
    eprintln!("{summary}");
    if let Some(p) = &a.summary {
        std::fs::write(p, summary.to_string() + "\n")?;
    }
    Ok(if was_interrupted {
        ExitCode::from(130)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(len: usize, scored: usize) -> Job {
        Job {
            id: json!(1),
            tokens: (0..len as u32).collect(),
            scored,
        }
    }

    #[test]
    fn windows_score_every_token_once_with_bounded_context() {
        for (len, scored, window, stride) in [
            (10, 9, 16, 8),
            (100, 99, 16, 8),
            (100, 99, 16, 5),
            (50, 3, 16, 8),
            (40, 39, 8, 7),
        ] {
            let j = job(len, scored);
            let ws = windows(&j, window, stride);
            let mut covered = vec![];
            for (tokens, s) in &ws {
                assert!(
                    tokens.len() <= window && *s < tokens.len() + usize::from(tokens.len() == len)
                );
                covered.extend_from_slice(&tokens[tokens.len() - s..]);
            }
            assert_eq!(
                covered,
                j.tokens[len - scored..].to_vec(),
                "len {len} window {window} stride {stride}"
            );
            if len <= window {
                assert_eq!(ws.len(), 1);
            }
        }
    }
}
