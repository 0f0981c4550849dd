#!/usr/bin/env bash
# GPU verification in one go (DESIGN.md, "Testing kernels without a GPU"; the device tool's
# budget is minutes, so everything is built beforehand).
#
#   scripts/gpu-check.sh prepare   # here, with Rust: builds the release binary and the CUDA
#                                  # test executables into gpu-carry/ (git-ignored, carried)
#   scripts/gpu-check.sh run       # on the GPU machine (no Rust needed): runs every GPU test
#                                  # and the GPU benches, prints a short table last
#   scripts/gpu-check.sh engine [DEVICE [VELLUM]]
#                                  # the engine end to end on DEVICE (default cuda:0) against
#                                  # the CPU, part of `run` (here: with cuda-emu and
#                                  # target/release/vellum, to check the check)
#
# The run step needs libcuda (the driver) and libnvrtc (the CUDA toolkit's, or the wheel from
# scripts/install-nvrtc.sh) on the library path; it fails rather than skips without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=gpu-carry

prepare() {
  rm -rf "$carry" && mkdir -p "$carry"
  cargo build --release --bin vellum
  cp target/release/vellum "$carry/"
  # The test executables whose names the run step knows.
  cargo test --release --no-run --message-format=json -p vellum-kernels 2>/dev/null |
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    exe = m.get("executable")
    name = m.get("target", {}).get("name")
    if exe and name in ("cuda_parity", "cuda_compile", "cuda_qmatmul", "cuda_resident", "vellum_kernels"):
        shutil.copy(exe, sys.argv[1] + "/" + name)
        print("carried", name)
' "$carry"
  # The engine-level one: recorded decode steps (CUDA graphs) against op by op.
  cargo test --release --no-run --message-format=json --test cuda_graphs 2>/dev/null |
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("target", {}).get("name") == "cuda_graphs":
        shutil.copy(m["executable"], sys.argv[1] + "/cuda_graphs")
        print("carried cuda_graphs")
' "$carry"
  # The GEMV kernel benchmark (benches/cuda_gemv.rs).
  cargo bench --no-run --bench cuda_gemv --message-format=json 2>/dev/null |
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("target", {}).get("name") == "cuda_gemv":
        shutil.copy(m["executable"], sys.argv[1] + "/cuda_gemv")
        print("carried cuda_gemv")
' "$carry"
  strip "$carry"/* 2>/dev/null || true  # debug info would not fit the 64 MiB carry
  du -sh "$carry"
}

run() {
  local lib
  for lib in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d "$lib" ]] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  # cuBLAS, the GEMV benchmark's bf16 baseline, also from pip's NVIDIA wheels where the
  # toolkit's lib64 lacks it (the machine's python has them); after the toolkit's own.
  for lib in $(python3 -c 'import nvidia, os; [print(os.path.join(p, d, "lib")) for p in nvidia.__path__ for d in sorted(os.listdir(p))]' 2>/dev/null || true); do
    [[ -d "$lib" ]] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$lib"
  done
  export VELLUM_REQUIRE_GPU=1 VELLUM_REQUIRE_NVRTC=1 VELLUM_CACHE_DIR="$PWD/$carry/cache"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  local status=()
  # VELLUM_REPO: where cuda_graphs finds the committed tiny model.
  for t in cuda_compile cuda_parity cuda_qmatmul cuda_resident vellum_kernels cuda_graphs; do
    if VELLUM_REPO="$PWD" "$carry/$t" --test-threads=1 >"$carry/$t.log" 2>&1; then
      status+=("$t|ok|$(grep -o '[0-9]* passed' "$carry/$t.log" | tail -1)")
    else
      status+=("$t|FAILED|see $carry/$t.log")
      tail -30 "$carry/$t.log"
    fi
  done
  if engine_check cuda:0 "$carry/vellum" >"$carry/engine.log" 2>&1; then
    status+=("engine end to end|ok|$(tail -1 "$carry/engine.log")")
  else
    status+=("engine end to end|FAILED|see $carry/engine.log")
    tail -30 "$carry/engine.log"
  fi
  # Issue #7's end-to-end comparison: int4 (and int8) against bf16, batch 1 and 64, with
  # kernels launched one by one and with decode steps replayed as CUDA graphs.
  local q graphs
  for q in bf16 int4 int8; do
    local quant=()
    [[ "$q" == int4 ]] && quant=(--quant int4:sym)
    [[ "$q" == int8 ]] && quant=(--quant int8)
    for graphs in off on; do
      local flag=() out="$carry/bench-cuda-$q-graphs-$graphs"
      [[ "$graphs" == on ]] && flag=(--step-graphs)
      "$carry/vellum" bench --shape smollm-135m --dtype bf16 "${quant[@]}" "${flag[@]}" --device cuda:0 \
        --concurrency 1,16,64 --prompt-len 64 --gen-len 32 --json >"$out.json" 2>"$out.log" ||
        status+=("bench cuda:0 $q graphs $graphs|FAILED|see $out.log")
    done
  done
  # Picked rows (8 bytes a row to the host) against whole rows picked on the host, int4,
  # prompts scored: prefill brings back a row per prompt token, decode one per sequence.
  local picks
  for picks in device host; do
    local flag=() out="$carry/bench-cuda-picks-$picks"
    [[ "$picks" == host ]] && flag=(--picks-on-host)
    "$carry/vellum" bench --shape smollm-135m --dtype bf16 --quant int4:sym "${flag[@]}" \
      --device cuda:0 --prompt-logprobs --concurrency 1,64 --prompt-len 256 --gen-len 32 \
      --json >"$out.json" 2>"$out.log" || status+=("bench cuda:0 picks $picks|FAILED|see $out.log")
  done
  # Ranked rows: tokens drawn within top_k 40 from candidates ranked on the device (328
  # bytes a row) against whole rows ranked on the host, int4, 64 sequences.
  for picks in device host; do
    local flag=() out="$carry/bench-cuda-ranked-$picks"
    [[ "$picks" == host ]] && flag=(--picks-on-host)
    "$carry/vellum" bench --shape smollm-135m --dtype bf16 --quant int4:sym "${flag[@]}" \
      --device cuda:0 --temperature 0.8 --top-k 40 --concurrency 64 --prompt-len 64 \
      --gen-len 32 --json >"$out.json" 2>"$out.log" ||
      status+=("bench cuda:0 ranked $picks|FAILED|see $out.log")
  done
  # Kernel bandwidth at the issue's shapes (its own table, printed after the summary).
  "$carry/cuda_gemv" >"$carry/cuda_gemv.md" 2>"$carry/cuda_gemv.log" ||
    status+=("bench cuda_gemv|FAILED|see $carry/cuda_gemv.log")
  echo
  echo "| check | result | detail |"
  echo "|---|---|---|"
  for s in "${status[@]}"; do echo "| ${s//|/ | } |"; done
  python3 - "$carry" <<'PY' || true
import json, sys
for q in ("bf16", "int4", "int8"):
    rows = {}
    for graphs in ("off", "on"):
        try:
            lines = open(f"{sys.argv[1]}/bench-cuda-{q}-graphs-{graphs}.json").read().splitlines()
        except OSError:
            continue
        for line in lines:
            r = json.loads(line)
            rows.setdefault(r.get("concurrency"), {})[graphs] = r.get("decode_tok_s", 0)
    for c, t in sorted(rows.items()):
        off, on = t.get("off", 0), t.get("on", 0)
        gain = f"graphs {on / off:.2f}x" if off else ""
        print(f"| bench smollm-135m {q} cuda:0 x{c} | {off:.1f} tok/s, graphs {on:.1f} tok/s | {gain} |")
for kind, what in (("picks", "prompts scored: picks"), ("ranked", "T 0.8 top_k 40: ranked")):
    runs = {}
    for picks in ("device", "host"):
        try:
            for line in open(f"{sys.argv[1]}/bench-cuda-{kind}-{picks}.json").read().splitlines():
                r = json.loads(line)
                runs.setdefault(r.get("concurrency"), {})[picks] = r
        except OSError:
            continue
    for c, r in sorted(runs.items()):
        if len(r) < 2:
            continue
        d, h = r["device"], r["host"]
        ratio = lambda k: d[k] / h[k] if h.get(k) else float("nan")
        print(f"| bench int4 x{c}, {what} on the device vs whole rows | "
              f"prefill {d['prefill_tok_s']:.0f} vs {h['prefill_tok_s']:.0f} tok/s, decode "
              f"{d['decode_tok_s']:.1f} vs {h['decode_tok_s']:.1f} tok/s | "
              f"prefill {ratio('prefill_tok_s'):.2f}x, decode {ratio('decode_tok_s'):.2f}x |")
PY
  echo
  cat "$carry/cuda_gemv.md" 2>/dev/null || true
}

# The engine end to end on a device, against the CPU's f32 path, on the committed tiny GGUF
# (tests/golden/spm_llama.gguf, with its tokenizer): scores through the GEMV (exact f32
# products: within 1e-5) and the tensor-core GEMM (f16 rounding: within 1e-2), int8 and
# int4 weights, f16 and int8 KV caches; a k-quant GGUF as loaded (tests/golden/kquant_llama.gguf:
# Q8_0, int4 and f16 matrices) within 1e-2; parallel samples (copy-on-write of KV blocks
# written on the device) give the CPU's tokens; and generations with decode steps replayed
# as CUDA graphs (--step-graphs) are byte for byte those run op by op.
engine_check() {
  local device="${1:-cuda:0}" vellum="${2:-target/release/vellum}"
  local model=tests/golden/spm_llama.gguf tmp
  tmp=$(mktemp -d)
  printf '%s\n' '{"id":"a","text":"hello world, hello again, and once more"}' \
    '{"id":"b","context":"once upon a time","continuation":" there was a world"}' >"$tmp/in.jsonl"
  local q kv
  for q in int8 int4; do
    for kv in f16 int8; do
      local args=(score -m "$model" -q --quant "$q" --kv-dtype "$kv" --input "$tmp/in.jsonl")
      VELLUM_INT_DOT=0 "$vellum" "${args[@]}" --device cpu >"$tmp/cpu-$q-$kv.jsonl"
      VELLUM_CUDA_GEMM=0 "$vellum" "${args[@]}" --device "$device" >"$tmp/gemv-$q-$kv.jsonl"
      "$vellum" "${args[@]}" --device "$device" >"$tmp/gemm-$q-$kv.jsonl"
    done
  done
  # A GGUF of k-quant and 5-bit matrices, as loaded: Q5_0 run as Q8_0, Q4_K as int4, the
  # rest decoded to f16 (tests/golden/kquant_llama.gguf, its own tokenizer).
  local kq=(score -m tests/golden/kquant_llama.gguf -q --input "$tmp/in.jsonl")
  VELLUM_INT_DOT=0 "$vellum" "${kq[@]}" --device cpu >"$tmp/cpu-kquant.jsonl" 2>/dev/null
  "$vellum" "${kq[@]}" --device "$device" >"$tmp/gemm-kquant.jsonl" 2>/dev/null
  printf '%s\n' '{"id":"s","prompt":"hello world","max_tokens":8,"seed":5,"temperature":0.8}' >"$tmp/gen.jsonl"
  local gen=(generate -m "$model" -q --n 3 --input "$tmp/gen.jsonl")
  VELLUM_INT_DOT=0 "$vellum" "${gen[@]}" --device cpu >"$tmp/gen-cpu.jsonl"
  VELLUM_CUDA_GEMM=0 "$vellum" "${gen[@]}" --device "$device" >"$tmp/gen-dev.jsonl"
  printf '%s\n' '{"id":1,"prompt":"hello world","max_tokens":12,"logprobs":2}' \
    '{"id":2,"prompt":"once upon a time there was","max_tokens":6,"logprobs":2}' >"$tmp/greedy.jsonl"
  local greedy=(generate -m "$model" --quant int4 --input "$tmp/greedy.jsonl" --device "$device")
  "$vellum" "${greedy[@]}" -q >"$tmp/greedy-ops.jsonl"
  # Not quiet: its last words are what the recordings did.
  "$vellum" "${greedy[@]}" --step-graphs >"$tmp/greedy-graphs.jsonl" 2>"$tmp/greedy-graphs.log"
  python3 - "$tmp" <<'PY'
import json, sys
d = sys.argv[1]
def lines(name):
    return [json.loads(l) for l in open(f"{d}/{name}") if l.strip()]
worst = {"gemv": 0.0, "gemm": 0.0}
for q in ("int8", "int4"):
    for kv in ("f16", "int8"):
        cpu = lines(f"cpu-{q}-{kv}.jsonl")
        for kernel, tol in (("gemv", 1e-5), ("gemm", 1e-2)):
            for c, g in zip(cpu, lines(f"{kernel}-{q}-{kv}.jsonl")):
                a, b = c["total_logprob"], g["total_logprob"]
                rel = abs(a - b) / abs(a)
                worst[kernel] = max(worst[kernel], rel)
                assert rel < tol, f"{kernel} {q} KV {kv} line {c['id']}: {b} vs the CPU's {a} ({rel:.1e})"
for c, g in zip(lines("cpu-kquant.jsonl"), lines("gemm-kquant.jsonl")):
    a, b = c["total_logprob"], g["total_logprob"]
    rel = abs(a - b) / abs(a)
    worst["gemm"] = max(worst["gemm"], rel)
    assert rel < 1e-2, f"k-quant GGUF line {c['id']}: {b} vs the CPU's {a} ({rel:.1e})"
cpu, dev = lines("gen-cpu.jsonl"), lines("gen-dev.jsonl")
samples = lambda r: [r["completion"]] + [s["completion"] for s in r.get("more_samples", [])]
assert samples(cpu[0]) == samples(dev[0]), f"parallel samples: {samples(dev[0])} vs the CPU's {samples(cpu[0])}"
ops, graphs = lines("greedy-ops.jsonl"), lines("greedy-graphs.jsonl")
assert len(ops) == 2 and ops == graphs, f"with step graphs: {graphs} vs op by op: {ops}"
said = [l for l in open(f"{d}/greedy-graphs.log") if l.startswith("step graphs:")]
assert said and " 0 replayed" not in said[-1] and " 0 failed" in said[-1], f"step graphs: {said}"
print(f"scores within {worst['gemv']:.1e} (GEMV) and {worst['gemm']:.1e} (GEMM) of the CPU's; {len(samples(cpu[0]))} samples equal; step graphs give the same generations")
PY
  rm -rf "$tmp"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  engine) engine_check "${2:-cuda:0}" "${3:-target/release/vellum}" ;;
  *) echo "usage: $0 prepare|run|engine [DEVICE [VELLUM]]" >&2; exit 2 ;;
esac
