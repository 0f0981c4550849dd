//! The `vellum` binary end to end on the tiny and real models.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn vellum(args: &[&str], stdin: &str) -> (i32, String, String) {
    vellum_with_env(args, stdin, &[])
}

fn vellum_with_env(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vellum"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A run that fails before it reads its input (a rejected flag) closes the pipe first.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "writing stdin: {e}"
        );
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn score_matches_the_engine_api_and_reports_bad_lines() {
    let model = real_model();
    let m = model.to_str().unwrap();
    let input = "{\"id\":\"a\",\"text\":\"The quick brown fox jumps over the lazy dog.\"}\n\
                 not json\n\
                 {\"id\":7,\"context\":\"The capital of France is\",\"continuation\":\" Paris\"}\n\
                 {\"id\":\"e\",\"text\":\"\"}\n";
    let (code, out, err) = vellum(&["score", "-m", m, "--token-logprobs", "-q"], input);
    assert_eq!(
        code, 1,
        "a failed line makes the exit code non-zero; stderr: {err}"
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "one output line per input line");
    assert_eq!(lines[0]["id"], "a");
    assert_eq!(lines[1]["id"], 2);
    assert!(lines[1]["error"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    assert_eq!(lines[2]["id"], 7);
    assert_eq!(
        lines[2]["is_greedy"], true,
        "Paris is the model's greedy answer"
    );
    assert!(lines[3]["error"].as_str().unwrap().contains("empty"));

    // Same numbers through the Engine API.
    let mut engine = vellum::engine::Engine::builder()
        .model(&model)
        .build()
        .unwrap();
    let tok = engine.tokenizer().unwrap().clone();
    let mut ids = vec![tok.bos_id.unwrap()];
    ids.extend(
        tok.encode("The quick brown fox jumps over the lazy dog.", false)
            .unwrap(),
    );
    let api = engine.score(vec![ids]).unwrap().remove(0);
    let cli = floats(&lines[0]["token_logprobs"]);
    assert_eq!(cli, api);
    let total: f64 = api.iter().map(|&x| x as f64).sum();
    assert!((lines[0]["total_logprob"].as_f64().unwrap() - total).abs() < 1e-9);
    assert_eq!(lines[0]["n_tokens"], api.len());
    assert!(err.contains("\"documents\":2"), "summary on stderr: {err}");
}

#[test]
fn generate_honours_stop_strings_and_seeds() {
    let model = real_model();
    let m = model.to_str().unwrap();
    let (code, out, err) = vellum(
        &[
            "generate",
            "-m",
            m,
            "--chat",
            "-p",
            "What is the capital of France?",
            "--max-tokens",
            "20",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Paris"), "{out}");
    assert!(
        !out.contains("<|im_end|>"),
        "special tokens are not printed: {out}"
    );

    let input = "{\"id\":1,\"prompt\":\"The capital of France is\",\"stop\":[\" Paris\"]}\n\
                 {\"id\":2,\"prompt\":\"Once upon a time\",\"temperature\":0.9,\"seed\":5}\n\
                 {\"id\":3,\"prompt\":\"Once upon a time\",\"temperature\":0.9,\"seed\":5}\n\
                 {\"id\":4,\"prompt\":\"x\",\"top_p\":7}\n";
    let (code, out, _) = vellum(
        &["generate", "-m", m, "-i", "-", "--max-tokens", "12", "-q"],
        input,
    );
    assert_eq!(code, 1, "the bad line makes the run fail");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["finish_reason"], "stop");
    assert!(!lines[0]["completion"].as_str().unwrap().contains("Paris"));
    assert_eq!(
        lines[1]["completion"], lines[2]["completion"],
        "same seed, same text"
    );
    assert!(lines[3]["error"].as_str().unwrap().contains("top_p"));
}

#[test]
fn inspect_validates_and_fails_on_bad_models() {
    let (code, out, _) = vellum(&["inspect", real_model().to_str().unwrap()], "");
    assert_eq!(code, 0);
    assert!(out.contains("30 layers") && out.contains("Q4_1"), "{out}");
    let bad = scratch("cli-bad.gguf");
    std::fs::write(&bad, b"GGUF\x09\0\0\0").unwrap();
    let (code, _, err) = vellum(&["inspect", bad.to_str().unwrap()], "");
    assert_ne!(code, 0);
    assert!(err.contains("version 9"), "{err}");
}

/// A GGUF of k-quant and 5-bit matrices: inspect lists its formats and the memory a decode
/// step reads as loaded, and says which formats it decodes to f16 (Q5_0, Q4_K, IQ4_NL and
/// IQ4_XS it keeps quantized, so they are not named there).
#[test]
fn inspect_names_the_formats_decoded_at_load() {
    let model = repo().join("tests/golden/kquant_llama.gguf");
    let (code, out, err) = vellum(&["inspect", model.to_str().unwrap()], "");
    assert_eq!(code, 0, "{err}");
    let formats = [
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS",
    ];
    for f in formats {
        assert!(out.contains(f), "{f} in {out}");
    }
    let warning = err
        .lines()
        .find(|l| l.contains("decoded to f16 at load"))
        .unwrap_or_else(|| panic!("no warning in {err}"));
    for f in ["1 Q2_K", "1 Q3_K", "1 Q5_1", "1 Q5_K", "1 Q6_K", "--quant"] {
        assert!(warning.contains(f), "{f} in {warning}");
    }
    for kept in ["Q5_0", "Q4_K", "IQ4"] {
        assert!(!warning.contains(kept), "{kept} in {warning}");
    }
}

#[test]
fn bench_reports_every_level_as_json() {
    let args = [
        "bench",
        "--shape",
        "smollm-135m",
        "--concurrency",
        "1,3",
        "--prompt-len",
        "5",
        "--gen-len",
        "3",
        "--json",
    ];
    let plot = scratch("bench.svg");
    let mut args = args.to_vec();
    args.extend(["--plot", plot.to_str().unwrap()]);
    let (code, out, err) = vellum(&args, "");
    assert_eq!(code, 0, "{err}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.matches("<polyline").count() == 4,
        "{svg}"
    );
    let levels: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(levels.len(), 2);
    for (l, c) in levels.iter().zip([1, 3]) {
        assert_eq!(l["concurrency"], c);
        assert_eq!(l["kv_dtype"], "f16", "the default KV cache");
        for key in [
            "prefill_tok_s",
            "decode_tok_s",
            "ttft_ms_p50",
            "ttft_ms_p99",
            "itl_ms_p50",
            "itl_ms_p90",
            "bandwidth_pct",
        ] {
            let v = l[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing: {l}"));
            assert!(v.is_finite() && v > 0.0, "{key} = {v}");
        }
    }
    // One generated token: no inter-token gaps, shown as "-" in the table, never NaN.
    let (code, out, err) = vellum(
        &[
            "bench",
            "--shape",
            "smollm-135m",
            "--prompt-len",
            "4",
            "--gen-len",
            "1",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let row = out.lines().last().unwrap_or_default();
    assert!(row.contains(" - ") && !out.contains("NaN"), "{out}");
    // The opt-in int8 KV cache runs and says so.
    let mut int8 = args[..args.len() - 2].to_vec();
    int8[4] = "1";
    int8.extend(["--kv-dtype", "int8", "--repeat", "2"]);
    // With the prompts scored, the picked-rows baseline, and tokens drawn at a temperature.
    int8.extend([
        "--prompt-logprobs",
        "--picks-on-host",
        "--temperature",
        "0.75",
        "--top-k",
        "5",
    ]);
    let (code, out, err) = vellum(&int8, "");
    assert_eq!(code, 0, "{err}");
    let level: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(level["kv_dtype"], "int8");
    assert_eq!(level["repeat"], 2);
    assert_eq!(
        (&level["prompt_logprobs"], &level["picks_on_host"]),
        (&true.into(), &true.into())
    );
    assert_eq!(
        (&level["temperature"], &level["top_k"]),
        (&0.75.into(), &5.into())
    );
    assert!(level["decode_tok_s"].as_f64().unwrap() > 0.0, "{level}");
    let (code, _, err) = vellum(&["bench", "--shape", "smollm-135m", "--repeat", "0"], "");
    assert!(code != 0 && err.contains("--repeat"), "{err}");
    let (code, _, err) = vellum(&["bench", "--shape", "smollm-135m", "--temperature=-1"], "");
    assert!(code != 0 && err.contains("--temperature -1"), "{err}");
    let (code, _, err) = vellum(&["bench", "--shape", "smollm-135m", "--top-k", "5"], "");
    assert!(
        code != 0 && err.contains("--top-k 5 needs a --temperature"),
        "{err}"
    );
    let (code, _, err) = vellum(&["bench", "--shape", "gpt-9"], "");
    assert_ne!(code, 0);
    assert!(err.contains("unknown"), "{err}");
    let (code, _, err) = vellum(&["bench", "--shape", "smollm-135m", "--kv-dtype", "f8"], "");
    assert_ne!(code, 0);
    assert!(
        err.contains("--kv-dtype") && err.contains("f16, f32 or int8"),
        "{err}"
    );
}

fn score_input(n: usize) -> String {
    (0..n)
        .map(|i| format!("{{\"id\":\"doc{i}\",\"text\":\"Line number {i} of a file that is scored in pieces.\"}}\n"))
        .collect()
}

fn tmp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let p = scratch(&format!("cli-{name}"));
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn resume_after_a_kill_and_shards_reproduce_the_full_run() {
    let m = real_model();
    let m = m.to_str().unwrap();
    let input = tmp_file("resume-in.jsonl", &score_input(9));
    let full = tmp_file("resume-full.jsonl", "");
    let run = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "score",
            "-m",
            m,
            "-q",
            "--group",
            "2",
            "-i",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (code, _, err) = vellum(&args, "");
        assert_eq!(code, 0, "{err}");
    };
    run(&full, &[]);
    let full_text = std::fs::read_to_string(&full).unwrap();
    assert_eq!(full_text.lines().count(), 9);

    // A run killed after 4 whole lines and half of the fifth, then resumed.
    let killed = tmp_file("resume-killed.jsonl", "");
    let cut: usize = full_text
        .lines()
        .take(4)
        .map(|l| l.len() + 1)
        .sum::<usize>()
        + 20;
    std::fs::write(&killed, &full_text[..cut]).unwrap();
    run(&killed, &["--resume"]);
    assert_eq!(std::fs::read_to_string(&killed).unwrap(), full_text);

    // Three shards cover every line exactly once, with the same numbers.
    let mut lines: Vec<String> = vec![];
    for s in 0..3 {
        let out = tmp_file(&format!("shard{s}.jsonl"), "");
        run(&out, &["--shard", &format!("{s}/3")]);
        lines.extend(
            std::fs::read_to_string(&out)
                .unwrap()
                .lines()
                .map(str::to_string),
        );
    }
    let mut want: Vec<String> = full_text.lines().map(str::to_string).collect();
    lines.sort();
    want.sort();
    assert_eq!(lines, want);
}

#[test]
fn long_texts_are_scored_with_a_sliding_window() {
    let m = real_model();
    let text: String = (0..40).map(|i| format!("Sentence {i} is here. ")).collect();
    let input = format!(
        "{{\"id\":1,\"text\":{}}}\n",
        serde_json::to_string(&text).unwrap()
    );
    let score = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["score", "-m", m.to_str().unwrap(), "-q", "--token-logprobs"];
        args.extend_from_slice(extra);
        let (code, out, err) = vellum(&args, &input);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(out.lines().next().unwrap()).unwrap()
    };
    let full = score(&[]);
    // 1.5 MiB of (f16) KV holds 64 tokens of this model: windows of 64, advancing by 32.
    let windowed = score(&["--kv-cache-mem", "1536KiB", "--stride", "32"]);
    let n = full["n_tokens"].as_u64().unwrap() as usize;
    assert!(
        n > 150,
        "the text is longer than several windows ({n} tokens)"
    );
    assert_eq!(windowed["n_tokens"], full["n_tokens"]);
    let (a, b) = (
        floats(&full["token_logprobs"]),
        floats(&windowed["token_logprobs"]),
    );
    assert_eq!(a[..63], b[..63], "the first window sees the same context");
    assert_ne!(a, b, "later tokens see less context");
    let (code, _, err) = vellum(
        &[
            "score",
            "-m",
            m.to_str().unwrap(),
            "--kv-cache-mem",
            "1536KiB",
            "--stride",
            "64",
        ],
        &input,
    );
    assert_ne!(code, 0);
    assert!(err.contains("--stride"), "{err}");
}

#[test]
fn rust_log_turns_on_engine_logs() {
    let out = Command::new(env!("CARGO_BIN_EXE_vellum"))
        .args([
            "generate",
            "-m",
            real_model().to_str().unwrap(),
            "-p",
            "Hi",
            "--max-tokens",
            "2",
            "-q",
        ])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("model loaded") && err.contains("KV cache allocated"),
        "{err}"
    );
    let quiet = Command::new(env!("CARGO_BIN_EXE_vellum"))
        .args([
            "generate",
            "-m",
            real_model().to_str().unwrap(),
            "-p",
            "Hi",
            "--max-tokens",
            "2",
            "-q",
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8(quiet.stderr)
            .unwrap()
            .contains("model loaded"),
        "info logs are off by default"
    );
}

#[test]
fn generate_takes_stop_token_ids_and_can_fail_fast() {
    let m = real_model();
    let m = m.to_str().unwrap();
    let line =
        |extra: &str| format!("{{\"id\":1,\"prompt\":\"The capital of France is\"{extra}}}\n");
    let (code, out, err) = vellum(
        &[
            "generate",
            "-m",
            m,
            "-i",
            "-",
            "--max-tokens",
            "3",
            "--logprobs",
            "1",
            "-q",
        ],
        &line(""),
    );
    assert_eq!(code, 0, "{err}");
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let t0 = first["logprobs"][0]["token"].as_u64().unwrap();
    let (code, out, _) = vellum(
        &["generate", "-m", m, "-i", "-", "--max-tokens", "3", "-q"],
        &line(&format!(",\"stop_token_ids\":[{t0}]")),
    );
    assert_eq!(code, 0);
    let stopped: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        (
            stopped["finish_reason"].as_str(),
            stopped["completion_tokens"].as_u64()
        ),
        (Some("stop"), Some(1))
    );
    let (code, _, err) = vellum(
        &["generate", "-m", m, "-i", "-", "--on-error", "fail", "-q"],
        "{\"id\":\"x\"}\n",
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("line \"x\"") && err.contains("prompt"),
        "{err}"
    );
}

/// `--device cuda-emu` runs the CUDA kernels on the CPU emulator and scores like the CPU;
/// an unusable or unknown device is a clear error, not a panic or a silent fallback.
#[test]
fn device_flag_selects_the_backend_and_rejects_unusable_devices() {
    // A tiny GGUF that carries its own tokenizer.
    let path = repo().join("tests/golden/spm_llama.gguf");
    let m = path.to_str().unwrap();
    let input = "{\"id\":\"a\",\"text\":\"hello world, hello again\"}\n";
    let score = |device: &str| vellum(&["score", "-m", m, "-q", "--device", device], input);
    let (code, cpu, err) = score("cpu");
    assert_eq!(code, 0, "{err}");
    let (code, emu, err) = score("cuda-emu");
    assert_eq!(code, 0, "{err}");
    let logprob = |out: &str| -> f64 {
        let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        v["total_logprob"].as_f64().unwrap()
    };
    let (a, b) = (logprob(&cpu), logprob(&emu));
    assert!(
        (a - b).abs() < 1e-3 * a.abs().max(1.0),
        "cpu {a} vs cuda-emu {b}"
    );

    let (code, _, err) = score("cuda:7");
    assert_ne!(code, 0);
    assert!(err.contains("cuda:7"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (code, _, err) = score("tpu");
    assert_ne!(code, 0);
    assert!(err.contains("unknown device `tpu`"), "{err}");
}

/// Quantized matmuls on the CUDA backend run on tensor cores by default (f16 operands);
/// `VELLUM_CUDA_GEMM=0` keeps them on the GEMV, whose exact f32 products score as the CPU's
/// float path does.
#[test]
fn vellum_cuda_gemm_0_keeps_quantized_matmuls_on_the_gemv() {
    let path = repo().join("tests/golden/spm_llama.gguf");
    let m = path.to_str().unwrap();
    let input = "{\"id\":\"a\",\"text\":\"hello world, hello again, and once more\"}\n";
    let score = |device: &str, env: &[(&str, &str)]| {
        let args = [
            "score", "-m", m, "-q", "--quant", "int8", "--device", device,
        ];
        let (code, out, err) = vellum_with_env(&args, input, env);
        assert_eq!(code, 0, "{device} {env:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        v["total_logprob"].as_f64().unwrap()
    };
    let float = score("cpu", &[("VELLUM_INT_DOT", "0")]);
    let gemv = score("cuda-emu", &[("VELLUM_CUDA_GEMM", "0")]);
    let gemm = score("cuda-emu", &[]);
    assert!(
        (gemv - float).abs() < 1e-5 * float.abs(),
        "GEMV {gemv} vs CPU {float}"
    );
    assert_ne!(gemm, gemv, "the default should take the tensor-core GEMM");
    assert!(
        (gemm - float).abs() < 1e-2 * float.abs(),
        "GEMM {gemm} vs CPU {float}"
    );
}

/// `vellum quantize --gptq`: calibrated on the model's own samples (no tokenizer needed) or
/// on a text; the checkpoint loads back as int8 and rounds differently from round to nearest.
#[test]
fn quantize_with_gptq_writes_a_loadable_int8_checkpoint() {
    let tiny = repo().join("tests/golden/models/llama_gqa");
    let out = |name: &str| scratch(&format!("cli-gptq-{name}"));
    let int8 = |dir: &std::path::Path| {
        let m = vellum::engine::Checkpoint::open(dir)
            .unwrap()
            .load_model()
            .unwrap();
        assert_eq!(
            m.config.quantization,
            vellum::kernels::QuantTarget::parse("int8")
        );
        m.layers[0].q.to_f32()
    };
    let (rtn, gptq) = (out("rtn"), out("sampled"));
    let (code, _, err) = vellum(
        &[
            "quantize",
            tiny.to_str().unwrap(),
            rtn.to_str().unwrap(),
            "--to",
            "int8",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let args = [
        "quantize",
        tiny.to_str().unwrap(),
        gptq.to_str().unwrap(),
        "--to",
        "int8",
        "--gptq",
        "--calibration-samples",
        "3",
        "--calibration-len",
        "40",
    ];
    let (code, _, err) = vellum(&args, "");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("sampling 3 calibration sequences of 40 tokens"),
        "{err}"
    );
    assert!(err.contains("GPTQ over 120 calibration tokens"), "{err}");
    assert!(err.contains("linear layers int8 (GPTQ)"), "{err}");
    assert_ne!(int8(&rtn), int8(&gptq));

    // A text, on a model with a tokenizer: cut into sequences of --calibration-len tokens.
    let spm = repo().join("tests/golden/spm_llama.gguf");
    let text = tmp_file(
        "gptq.txt",
        &"The quick brown fox jumps over the lazy dog. ".repeat(20),
    );
    let from_text = out("text");
    let (code, _, err) = vellum(
        &[
            "quantize",
            spm.to_str().unwrap(),
            from_text.to_str().unwrap(),
            "--to",
            "int8",
            "--gptq",
            "--calibration",
            text.to_str().unwrap(),
            "--calibration-len",
            "32",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("GPTQ over"), "{err}");
    int8(&from_text);

    let fails = |extra: &[&str], why: &str| {
        let dir = out("bad");
        let mut args = vec!["quantize", tiny.to_str().unwrap(), dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (code, _, err) = vellum(&args, "");
        assert_ne!(code, 0, "{extra:?}");
        assert!(err.contains(why), "{extra:?}: {err}");
    };
    fails(
        &["--to", "int4", "--gptq"],
        "--gptq quantizes to int8 (per channel) or int4:g64|g128[:sym], not Q4_1",
    );
    fails(&["--to", "int8", "--calibration", "x.txt"], "--gptq");
    fails(
        &[
            "--to",
            "int8",
            "--gptq",
            "--calibration",
            text.to_str().unwrap(),
        ],
        "no tokenizer to encode --calibration with",
    );
    fails(
        &["--to", "int8", "--gptq", "--damp=-1"],
        "GPTQ damping must be a finite number",
    );
    fails(
        &["--to", "int8", "--gptq", "--calibration-len", "1"],
        "--calibration-len must be at least 2",
    );
    for dir in [rtn, gptq, from_text] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// `--step-graphs` replays recorded decode steps (here on the emulated CUDA backend): the
/// same generations, token for token and logprob for logprob, as op by op.
#[test]
fn step_graphs_flag_generates_the_same_text() {
    let path = repo().join("tests/golden/spm_llama.gguf");
    let m = path.to_str().unwrap();
    let input = "{\"id\":1,\"prompt\":\"hello world\",\"max_tokens\":9,\"logprobs\":1}\n\
                 {\"id\":2,\"prompt\":\"hello again, and once more\",\"max_tokens\":5,\"logprobs\":1}\n";
    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "-m", m, "-i", "-", "-q", "--device", "cuda-emu"];
        args.extend(extra);
        let (code, out, err) = vellum(&args, input);
        assert_eq!(code, 0, "{extra:?}: {err}");
        out
    };
    let (with, without) = (generate(&["--step-graphs"]), generate(&[]));
    assert_eq!(with.lines().count(), 2, "{with}");
    assert_eq!(with, without);
}
