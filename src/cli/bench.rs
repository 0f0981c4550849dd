//! `vellum bench`: throughput and latency of the engine on a model or a synthetic shape.
//!
//! For each concurrency level, that many requests (random prompt tokens, fixed seed) are
//! submitted at once and decoded to `--gen-len` tokens through the same Engine API as
//! everything else. Reported per level:
//! - `prefill_tok_s`: prompt tokens / time until every request had its first token;
//! - `decode_tok_s`: tokens generated after that moment / the time they took;
//! - `ttft_ms_*`: submission to first token; `itl_ms_*`: gaps between a request's tokens;
//! - `overhead_pct` ("sched %"): step time outside the forward pass (scheduler, block
//!   manager, sampler, detokenizer);
//! - `bandwidth_pct`: (weight bytes + KV bytes read per decode step) / step time, as a % of
//!   the streaming-read bandwidth measured in the same run.
//!
//! `--repeat N` runs each level N times and reports the median of each throughput (and the
//! latency percentiles of all runs together): one prefill is a fraction of a second, and a
//! single sample on a shared machine can be off by a quarter.

use super::{parse_kv_dtype, parse_size};
use anyhow::{anyhow, bail, Result};
use clap::Args;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use vellum_engine::sampler::Rng;
use vellum_engine::{synthetic, Engine, EngineConfig, Request, SamplingParams};
use vellum_kernels::cpu::membw;
use vellum_kernels::KvDtype;
use vellum_quant::DType;

#[derive(Args)]
pub struct BenchArgs {
    /// A model to bench (HF directory or .gguf); or use --shape.
    #[arg(long, short = 'm', conflicts_with = "shape")]
    model: Option<PathBuf>,
    /// A synthetic shape with random weights: smollm-135m, tinyllama-1.1b, llama-3.2-1b, qwen2.5-0.5b.
    #[arg(long)]
    shape: Option<String>,
    /// Weight dtype of a synthetic shape: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// Quantize the linear layers first (as `--quant` of score/generate: int8, int4, int4:sym,
    /// q8_0, int4:g64|g128[:sym][:mse]).
    #[arg(long)]
    quant: Option<String>,
    /// With --model: convert all weights to this dense dtype first (f32, f16, bf16).
    #[arg(long = "to-dtype")]
    to_dtype: Option<String>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    gen_len: usize,
    /// Concurrency levels, comma separated.
    #[arg(long, default_value = "1,4,16", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Backend: cpu, cuda:N or cuda-emu (see `score --help`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// KV cache memory (default: enough for the largest level).
    #[arg(long, value_parser = parse_size)]
    kv_cache_mem: Option<usize>,
    /// KV cache element type: f16 or f32 (see `score --help`).
    #[arg(long, default_value = "f16", value_parser = parse_kv_dtype)]
    kv_dtype: KvDtype,
    #[arg(long, default_value_t = 512)]
    max_batched_tokens: usize,
    /// Record decode steps and replay them (CUDA graphs; see `score --help`).
    #[arg(long)]
    step_graphs: bool,
    /// Each request also reports its prompt's log-probabilities (as `vellum score` does):
    /// prefill then brings back a pick (8 bytes) per prompt token.
    #[arg(long)]
    prompt_logprobs: bool,
    /// Baseline: bring every row of log-probabilities back whole and pick greedy and scored
    /// tokens on the host, as steps did before picked rows (the same results).
    #[arg(long)]
    picks_on_host: bool,
    /// Sample each decoded token at this temperature (0: greedy, the default), from the whole
    /// vocabulary unless --top-k: the host sampler's cost shows in "sched %".
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// With --temperature: draw within the K most likely tokens (0: all). Up to 64, the
    /// backend ranks them where the rows are (see "Picked rows" in the README).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Runs of each level; throughputs are their medians (llama-bench reports a median too).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Seed of the random prompts (and synthetic weights).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// One JSON object per concurrency level instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw decode throughput and inter-token latency (p50/p90/p99) against
    /// concurrency into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// `p50/p90/p99` of sorted latencies for the table, `-` where there are none (one
/// generated token has no inter-token gap).
fn percentiles(sorted: &[f64], decimals: usize) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let [a, b, c] = [0.5, 0.9, 0.99].map(|q| percentile(sorted, q));
    format!("{a:.decimals$}/{b:.decimals$}/{c:.decimals$}")
}

/// One concurrency level's measurements.
struct Level {
    concurrency: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    ttft_ms: Vec<f64>,
    itl_ms: Vec<f64>,
    bandwidth_pct: f64,
    kv_usage_max: f64,
    /// Share of step time outside the forward pass (scheduler, blocks, sampler).
    overhead_pct: f64,
}

/// What each request of a level asks for besides its lengths.
struct Asks {
    prompt_logprobs: bool,
    temperature: f32,
    top_k: u32,
}

/// Runs `c` requests of `prompt_len` random tokens, each decoding `gen_len` tokens (and
/// reporting its prompt's log-probabilities with `prompt_logprobs`).
fn run_level(
    engine: &mut Engine,
    c: usize,
    (prompt_len, gen_len): (usize, usize),
    asks: &Asks,
    read_bw: f64,
    rng: &mut Rng,
) -> Result<Level> {
    let vocab = engine.model().config.vocab_size as u64;
    let mut params = SamplingParams::default()
        .max_tokens(gen_len)
        .temperature(asks.temperature)
        .top_k(asks.top_k as i64)
        .ignore_eos(true);
    if asks.temperature != 0.0 {
        // Reproducible draws; greedy runs keep the prompts they had before `--temperature`.
        params = params.seed(rng.next_u64());
    }
    let stats_before = engine.stats.clone();
    let start = Instant::now();
    let mut last_token: HashMap<u64, Instant> = HashMap::new();
    let mut ttft = Vec::new();
    let mut itl = Vec::new();
    for _ in 0..c {
        let prompt = (0..prompt_len)
            .map(|_| (rng.next_u64() % vocab) as u32)
            .collect();
        engine.add_request(Request {
            prompt_logprobs: asks.prompt_logprobs,
            ..Request::tokens(prompt, params.clone())
        })?;
    }
    let (mut all_first, mut decode_tokens, mut decode_steps, mut kv_tokens_read) =
        (None, 0usize, 0usize, 0usize);
    let mut kv_usage_max = 0f64;
    while engine.has_unfinished() {
        let outs = engine.step()?;
        let now = Instant::now();
        kv_usage_max = kv_usage_max.max(engine.kv_usage());
        if all_first.is_some() {
            decode_steps += 1;
            kv_tokens_read += engine.running_context_tokens();
        }
        for o in outs {
            if o.new_tokens.is_empty() {
                continue;
            }
            match last_token.insert(o.request_id, now) {
                None => ttft.push((now - start).as_secs_f64() * 1e3),
                Some(prev) => itl.push((now - prev).as_secs_f64() * 1e3),
            }
            if all_first.is_some() {
                decode_tokens += o.new_tokens.len();
            }
        }
        if all_first.is_none() && ttft.len() == c {
            all_first = Some(now);
        }
    }
    let end = Instant::now();
    let first = all_first.ok_or_else(|| anyhow!("no request produced a token"))?;
    let prefill_s = (first - start).as_secs_f64();
    let decode_s = (end - first).as_secs_f64();
    let model = engine.model();
    let bytes = decode_steps * model.weight_bytes()
        + kv_tokens_read * model.kv_bytes_per_token(engine.config().kv_dtype);
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    Ok(Level {
        concurrency: c,
        prefill_tok_s: (c * prompt_len) as f64 / prefill_s,
        decode_tok_s: decode_tokens as f64 / decode_s,
        ttft_ms: ttft,
        itl_ms: itl,
        overhead_pct: {
            let s = &engine.stats;
            let step = s.step_ns - stats_before.step_ns;
            let fwd = s.forward_ns - stats_before.forward_ns;
            100.0 * step.saturating_sub(fwd) as f64 / step.max(1) as f64
        },
        bandwidth_pct: if decode_s > 0.0 {
            100.0 * bytes as f64 / decode_s / read_bw
        } else {
            f64::NAN
        },
        kv_usage_max,
    })
}

pub fn run(a: BenchArgs) -> Result<ExitCode> {
    if let Some(n) = a.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    if a.concurrency.is_empty()
        || a.concurrency.contains(&0)
        || a.prompt_len == 0
        || a.gen_len == 0
        || a.repeat == 0
    {
        bail!("--concurrency levels, --prompt-len, --gen-len and --repeat must all be at least 1");
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!(
            "--temperature {}: must be 0 (greedy) or positive",
            a.temperature
        );
    }
    if a.top_k > 0 && a.temperature == 0.0 {
        bail!(
            "--top-k {} needs a --temperature: greedy decoding takes the top token",
            a.top_k
        );
    }
    let (model, name) = match (&a.model, &a.shape) {
        (Some(p), None) => {
            let ck = vellum_engine::Checkpoint::open(p)?;
            (ck.load_model()?, p.display().to_string())
        }
        (None, Some(s)) => {
            let cfg = synthetic::shape(s).ok_or_else(|| {
                anyhow!(
                    "--shape {s}: unknown (known: {})",
                    synthetic::SHAPES.join(", ")
                )
            })?;
            let dtype = DType::parse(&a.dtype)
                .ok_or_else(|| anyhow!("--dtype {}: expected f32, f16 or bf16", a.dtype))?;
            eprintln!("building {s} with random {dtype} weights ...");
            (
                synthetic::random_model(cfg, dtype, a.seed),
                format!("{s} ({dtype}, random)"),
            )
        }
        _ => bail!("give --model PATH or --shape NAME"),
    };
    let (mut model, mut name) = (model, name);
    if let Some(d) = &a.to_dtype {
        let dtype =
            DType::parse(d).ok_or_else(|| anyhow!("--to-dtype {d}: expected f32, f16 or bf16"))?;
        model.to_dtype(dtype)?;
        name.push_str(&format!(" as {dtype}"));
    }
    if let Some(q) = &a.quant {
        let target = vellum_kernels::QuantTarget::parse(q).ok_or_else(|| {
            anyhow!("--quant {q}: expected int8, int4, int4:sym, q8_0 or int4:g64|g128[:sym][:mse]")
        })?;
        model.quantize_linears(target)?;
        name.push_str(&format!(", linears {}", target.name()));
    }
    let max_c = *a.concurrency.iter().max().expect("checked non-empty");
    let needed = max_c * (a.prompt_len + a.gen_len + 16) * model.kv_bytes_per_token(a.kv_dtype);
    let config = EngineConfig {
        kv_cache_bytes: a.kv_cache_mem.unwrap_or(needed),
        kv_dtype: a.kv_dtype,
        max_batched_tokens: a.max_batched_tokens,
        max_seqs: max_c.max(1),
        step_graphs: a.step_graphs,
        picks_on_host: a.picks_on_host,
        ..EngineConfig::default()
    };
    let device = vellum_kernels::Device::parse(&a.device).map_err(|e| anyhow!("--device: {e}"))?;
    let backend = device.backend()?;
    let backend_name = backend.name().to_string();
    let mut engine = Engine::new(model, None, backend, config)?;
    let read_bw = membw::read_bandwidth(512 << 20, 5);
    let mut rng = Rng::new(a.seed);
    // Warm-up: page in the weights and the pool.
    let lens = (a.prompt_len.min(16), 4);
    let asks = Asks {
        prompt_logprobs: a.prompt_logprobs,
        temperature: a.temperature,
        top_k: a.top_k,
    };
    run_level(&mut engine, 1, lens, &asks, read_bw, &mut rng)?;
    if !a.json {
        println!(
            "model {name} | backend {backend_name} | threads {} | weights {:.1} MiB | KV {} | step graphs {} | picks {}{}{} | read bandwidth {:.1} GB/s",
            rayon::current_num_threads(),
            engine.model().weight_bytes() as f64 / (1 << 20) as f64,
            a.kv_dtype.name(),
            if a.step_graphs { "on" } else { "off" },
            if a.picks_on_host { "on the host" } else { "on the device" },
            if a.prompt_logprobs { " | prompt logprobs" } else { "" },
            match (a.temperature, a.top_k) {
                (0.0, _) => String::new(),
                (t, 0) => format!(" | temperature {t}"),
                (t, k) => format!(" | temperature {t}, top_k {k}"),
            },
            read_bw / 1e9
        );
        println!(
            "{:>5} {:>12} {:>11} {:>22} {:>22} {:>7} {:>6} {:>7}",
            "conc",
            "prefill t/s",
            "decode t/s",
            "ttft ms p50/p90/p99",
            "itl ms p50/p90/p99",
            "bw %",
            "kv %",
            "sched %"
        );
    }
    let mut levels = Vec::new();
    for &c in &a.concurrency {
        let runs = (0..a.repeat)
            .map(|_| {
                let lens = (a.prompt_len, a.gen_len);
                run_level(&mut engine, c, lens, &asks, read_bw, &mut rng)
            })
            .collect::<Result<Vec<_>>>()?;
        let l = median_level(runs);
        let p = |v: &[f64], q| percentile(v, q);
        if a.json {
            let o = json!({
                "model": name, "backend": backend_name, "threads": rayon::current_num_threads(),
                "kv_dtype": a.kv_dtype.name(), "step_graphs": a.step_graphs,
                "picks_on_host": a.picks_on_host, "prompt_logprobs": a.prompt_logprobs, "temperature": a.temperature, "top_k": a.top_k,
                "concurrency": l.concurrency, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
                "repeat": a.repeat,
                "prefill_tok_s": l.prefill_tok_s, "decode_tok_s": l.decode_tok_s,
                "ttft_ms_p50": p(&l.ttft_ms, 0.5), "ttft_ms_p90": p(&l.ttft_ms, 0.9), "ttft_ms_p99": p(&l.ttft_ms, 0.99),
                "itl_ms_p50": p(&l.itl_ms, 0.5), "itl_ms_p90": p(&l.itl_ms, 0.9), "itl_ms_p99": p(&l.itl_ms, 0.99),
                "bandwidth_pct": l.bandwidth_pct, "read_bandwidth_gb_s": read_bw / 1e9, "kv_usage_max": l.kv_usage_max,
                "overhead_pct": l.overhead_pct,
            });
            println!("{o}");
        } else {
            println!(
                "{:>5} {:>12.1} {:>11.1} {:>22} {:>22} {:>7.1} {:>6.1} {:>7.2}",
                l.concurrency,
                l.prefill_tok_s,
                l.decode_tok_s,
                percentiles(&l.ttft_ms, 1),
                percentiles(&l.itl_ms, 2),
                l.bandwidth_pct,
                100.0 * l.kv_usage_max,
                l.overhead_pct
            );
        }
        levels.push(l);
    }
    if let Some(g) = engine.graph_stats() {
        eprintln!("step graphs: {g}");
    }
    if let Some(path) = &a.plot {
        std::fs::write(path, plot_svg(&name, &levels))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// One level from several runs of it: the median of each throughput and share, the
/// latencies of every run, the highest KV usage.
fn median_level(mut runs: Vec<Level>) -> Level {
    let median = |runs: &[Level], f: fn(&Level) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let prefill = median(&runs, |l| l.prefill_tok_s);
    let decode = median(&runs, |l| l.decode_tok_s);
    let bandwidth = median(&runs, |l| l.bandwidth_pct);
    let overhead = median(&runs, |l| l.overhead_pct);
    let kv_usage_max = runs.iter().map(|l| l.kv_usage_max).fold(0.0, f64::max);
    let mut level = runs.pop().expect("at least one run");
    for r in runs {
        level.ttft_ms.extend(r.ttft_ms);
        level.itl_ms.extend(r.itl_ms);
    }
    level.ttft_ms.sort_by(f64::total_cmp);
    level.itl_ms.sort_by(f64::total_cmp);
    Level {
        prefill_tok_s: prefill,
        decode_tok_s: decode,
        bandwidth_pct: bandwidth,
        overhead_pct: overhead,
        kv_usage_max,
        ..level
    }
}

/// Two side-by-side charts: decode tokens/s, and inter-token latency p50/p90/p99, against
/// concurrency (log-spaced x axis). Plain SVG, no dependencies.
fn plot_svg(title: &str, levels: &[Level]) -> String {
    let (w, h, pad) = (420.0, 300.0, 50.0);
    let xs: Vec<f64> = levels
        .iter()
        .map(|l| (l.concurrency as f64).log2())
        .collect();
    let x_max = xs.iter().copied().fold(1.0, f64::max);
    let chart = |ox: f64, label: &str, series: &[(&str, &str, Vec<f64>)]| -> String {
        let y_max = series
            .iter()
            .flat_map(|s| s.2.iter().copied())
            .fold(1e-9, f64::max)
            * 1.1;
        let px = |x: f64| ox + pad + x / x_max * (w - 2.0 * pad);
        let py = |y: f64| h - pad - y / y_max * (h - 2.0 * pad);
        let mut out = format!(
            "<rect x='{ox}' y='0' width='{w}' height='{h}' fill='white' stroke='#ccc'/>\n\
             <text x='{}' y='20' font-size='13' text-anchor='middle'>{label}</text>\n\
             <line x1='{}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n\
             <line x1='{}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n\
             <text x='{}' y='{}' font-size='10'>{y_max:.0}</text>\n",
            ox + w / 2.0,
            px(0.0),
            py(0.0),
            px(x_max),
            py(0.0),
            px(0.0),
            py(0.0),
            px(0.0),
            py(y_max),
            ox + 4.0,
            py(y_max) + 10.0,
        );
        for (l, &x) in levels.iter().zip(&xs) {
            out += &format!(
                "<text x='{}' y='{}' font-size='10' text-anchor='middle'>{}</text>\n",
                px(x),
                h - pad + 14.0,
                l.concurrency
            );
        }
        for (i, (name, color, ys)) in series.iter().enumerate() {
            let points: Vec<String> = xs
                .iter()
                .zip(ys)
                .map(|(&x, &y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            out += &format!(
                "<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/>\n",
                points.join(" ")
            );
            out += &format!(
                "<text x='{}' y='{}' font-size='10' fill='{color}'>{name}</text>\n",
                ox + w - pad - 60.0,
                40.0 + 12.0 * i as f64
            );
        }
        out
    };
    let p = |l: &Level, q: f64| percentile(&l.itl_ms, q);
    let left = chart(
        0.0,
        "decode tokens/s vs concurrency",
        &[(
            "tok/s",
            "#1f77b4",
            levels.iter().map(|l| l.decode_tok_s).collect(),
        )],
    );
    let right = chart(
        w + 10.0,
        "inter-token latency (ms) vs concurrency",
        &[
            ("p50", "#2ca02c", levels.iter().map(|l| p(l, 0.5)).collect()),
            ("p90", "#ff7f0e", levels.iter().map(|l| p(l, 0.9)).collect()),
            (
                "p99",
                "#d62728",
                levels.iter().map(|l| p(l, 0.99)).collect(),
            ),
        ],
    );
    let title = title.replace('&', "&amp;").replace('<', "&lt;");
    format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif'>\n\
         <text x='10' y='{}' font-size='12'>vellum bench: {title}</text>\n<g transform='translate(0,20)'>\n{left}{right}</g>\n</svg>\n",
        2.0 * w + 10.0,
        h + 30.0,
        14
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(prefill: f64, decode: f64, ttft: f64) -> Level {
        Level {
            concurrency: 2,
            prefill_tok_s: prefill,
            decode_tok_s: decode,
            ttft_ms: vec![ttft],
            itl_ms: vec![ttft / 10.0],
            bandwidth_pct: decode / 10.0,
            kv_usage_max: prefill / 1000.0,
            overhead_pct: 1.0,
        }
    }

    /// Each throughput is its own median (not the median run's), latencies are pooled in
    /// order, KV usage is the highest.
    #[test]
    fn repeated_runs_report_medians_and_every_latency() {
        let l = median_level(vec![
            level(900.0, 50.0, 3.0),
            level(100.0, 70.0, 1.0),
            level(500.0, 10.0, 2.0),
        ]);
        assert_eq!((l.prefill_tok_s, l.decode_tok_s), (500.0, 50.0));
        assert_eq!(l.bandwidth_pct, 5.0);
        assert_eq!(l.ttft_ms, [1.0, 2.0, 3.0]);
        assert_eq!(l.itl_ms.len(), 3);
        assert_eq!(l.kv_usage_max, 0.9);
    }
}
