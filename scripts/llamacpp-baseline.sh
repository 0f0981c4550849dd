#!/usr/bin/env bash
# llama.cpp as a CPU performance baseline for Vellum.
#
# Builds llama.cpp's own benchmark tools (llama-bench, llama-batched-bench, llama-quantize,
# llama-completion) once into .cache/llamacpp, from the llama.cpp source vendored in the pinned
# PyPI sdist llama-cpp-python==0.3.36 (nothing prebuilt ships its CLI tools; no GitHub needed).
# The first run takes ~10 minutes on 2 cores; later runs reuse the build.
#
#   scripts/llamacpp-baseline.sh MODEL.gguf [MODEL.gguf ...]   # decode benchmark (default)
#   scripts/llamacpp-baseline.sh bench MODEL.gguf [...]         # same
#   scripts/llamacpp-baseline.sh setup                          # only build the tools
#   scripts/llamacpp-baseline.sh f16 IN.gguf OUT.gguf           # re-type IN to F16 (llama-quantize)
#   scripts/llamacpp-baseline.sh quantize IN.gguf OUT.gguf TYPE # every tensor to Q4_0, Q8_0, ...
#   scripts/llamacpp-baseline.sh synthetic OUT.gguf [ARGS...]   # random TinyLlama-1.1B-shape F16
#   scripts/llamacpp-baseline.sh generate MODEL.gguf "PROMPT"   # greedy 24 tokens, sanity check
#
# The benchmark prints one line per measurement, e.g.
#   llamacpp decode threads=2 seqs=1 tok_s=123.4 src=llama-bench model=X.gguf
#   llamacpp decode threads=2 seqs=16 tok_s=456.7 src=llama-batched-bench model=X.gguf
# seqs=1 is llama-bench -p 0 -n $N_GEN (median of $REPS runs, empty context, so no prompt);
# seqs=16 is llama-batched-bench's aggregate generation speed (S_TG: 16 x $N_GEN tokens over
# the generation time, after a $N_PROMPT-token prompt per sequence, prompt time excluded).
# Where llama-batched-bench crashes (its AMX path on AMX CPUs), it runs again with -nr and
# says src=llama-batched-bench-nr.
# A prefill line (llama-bench -p $PP -n 0, prompt processing tokens/s) comes first:
#   llamacpp prefill threads=2 tokens=512 tok_s=675.4 src=llama-bench model=X.gguf
# Knobs (environment): THREADS=2 N_GEN=128 REPS=3 SEQS=16 N_PROMPT=16 PP=512 (0: none) VERBOSE=0
# VELLUM_CACHE=dir moves .cache. load1= on each line is the load average before it ran.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36" # vendors llama.cpp / ggml 0.25.3, commit 0c1e570
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PY_PINS=(cmake==4.4.5 ninja==1.13.2 numpy==2.4.6 pyyaml==6.0.4 tqdm==4.70.1 requests==2.34.2)
TARGETS=(llama-bench llama-batched-bench llama-quantize llama-completion)

THREADS="${THREADS:-2}"
N_GEN="${N_GEN:-128}"
REPS="${REPS:-3}"
SEQS="${SEQS:-16}"
N_PROMPT="${N_PROMPT:-16}"
PP="${PP:-512}"
VERBOSE="${VERBOSE:-0}"

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${VELLUM_CACHE:-$root/.cache}/llamacpp"
venv="$cache/venv"
src="$cache/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
build="$cache/build-$LLAMA_CPP_PYTHON_VERSION"
bin="$build/bin"
stamp="$build/.vellum-built"

log() { echo "[llamacpp-baseline] $*" >&2; }

setup() {
  [[ -f "$stamp" ]] && return 0
  mkdir -p "$cache"
  if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet "${PY_PINS[@]}" >&2
  if [[ ! -f "$src/CMakeLists.txt" ]]; then
    local dl="$cache/dl" sdist
    sdist="$dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    if [[ ! -f "$sdist" ]]; then
      log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist from PyPI"
      # --no-binary for this package only: build deps still come as wheels (metadata is quick).
      "$venv/bin/python" -m pip download --quiet --no-deps \
        --no-binary llama-cpp-python -d "$dl" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
    fi
    if [[ "$(sha256sum "$sdist" | cut -d' ' -f1)" != "$SDIST_SHA256" ]]; then
      echo "error: $sdist does not have sha256 $SDIST_SHA256" >&2
      exit 1
    fi
    tar -xzf "$sdist" -C "$cache"
  fi
  log "building ${TARGETS[*]} (GGML_NATIVE=ON, ~10 min on 2 cores)"
  PATH="$venv/bin:$PATH" cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_EXAMPLES=ON >"$cache/cmake.log" 2>&1 ||
    { tail -30 "$cache/cmake.log" >&2; exit 1; }
  nice -n 10 "$venv/bin/ninja" -C "$build" -j "${JOBS:-$(nproc)}" "${TARGETS[@]}" >"$cache/build.log" 2>&1 ||
    { tail -30 "$cache/build.log" >&2; exit 1; }
  touch "$stamp"
}

# Runs a tool quietly (its log goes to stderr only with VERBOSE=1).
quiet() {
  if [[ "$VERBOSE" == 1 ]]; then "$@"; else "$@" 2>/dev/null; fi
}

# 1-minute load average before a measurement: the tools' threads spin-wait, so any other
# load on the cores (e.g. a compile) cuts their speed several-fold. Compare only quiet runs.
load1() { cut -d' ' -f1 /proc/loadavg; }

bench() {
  local model="$1" name
  name="$(basename "$model")"
  [[ -f "$model" ]] || { echo "error: no such model $model" >&2; exit 1; }
  quiet "$bin/llama-bench" -m "$model" -p 0 -n "$N_GEN" -t "$THREADS" -r "$REPS" -o jsonl |
    "$venv/bin/python" -c '
import json, statistics, sys
for line in sys.stdin:
    r = json.loads(line)
    med = statistics.median(r["samples_ts"])  # robust to a rep slowed by other load
    print("llamacpp decode threads=%d seqs=1 tok_s=%.1f src=llama-bench model=%s load1=%s (median; mean %.1f +-%.1f, n=%d, reps=%d)"
          % (r["n_threads"], med, sys.argv[1], sys.argv[2], r["avg_ts"], r["stddev_ts"], r["n_gen"], len(r["samples_ts"])))
' "$name" "$(load1)"
  if [[ "$PP" -gt 0 ]]; then
    local pout psrc=llama-bench
    prefill() {
      quiet "$bin/llama-bench" -m "$model" -p "$PP" -n 0 -t "$THREADS" -r "$REPS" -o jsonl "$@"
    }
    # Prompt batches go through the AMX kernel on AMX CPUs, which crashes there (see below).
    if ! pout="$(prefill)"; then
      log "llama-bench -p $PP crashed on $name; measuring again with --repack 0"
      pout="$(prefill --repack 0)"
      psrc=llama-bench-nr
    fi
    printf '%s\n' "$pout" | "$venv/bin/python" -c '
import json, statistics, sys
for line in sys.stdin:
    r = json.loads(line)
    print("llamacpp prefill threads=%d tokens=%d tok_s=%.1f src=%s model=%s load1=%s (median of %d)"
          % (r["n_threads"], r["n_prompt"], statistics.median(r["samples_ts"]), sys.argv[3], sys.argv[1], sys.argv[2], len(r["samples_ts"])))
' "$name" "$(load1)" "$psrc"
  fi
  if [[ "$SEQS" -gt 1 ]]; then
    local ctx=$(( SEQS * (N_PROMPT + N_GEN) + 256 )) out src=llama-batched-bench
    batched() {
      quiet "$bin/llama-batched-bench" -m "$model" -c "$ctx" -b 2048 -ub 512 -t "$THREADS" \
        -tb "$THREADS" -npp "$N_PROMPT" -ntg "$N_GEN" -npl "$SEQS" --output-format jsonl "$@"
    }
    # On CPUs with AMX, llama.cpp moves Q4_0/Q8_0/... weights into its AMX buffers, and its
    # AMX matmul segfaults on batches here (ggml_backend_amx_mul_mat, ggml 0.25.3). Without
    # repacked weights (-nr: no AMX, no interleaved CPU layouts) it runs: reported as such.
    if ! out="$(batched)"; then
      log "llama-batched-bench crashed on $name; measuring again with -nr (no weight repacking)"
      out="$(batched -nr)"
      src=llama-batched-bench-nr
    fi
    printf '%s\n' "$out" |
      "$venv/bin/python" -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    print("llamacpp decode threads=%d seqs=%d tok_s=%.1f src=%s model=%s load1=%s (prompt=%d/seq, n=%d/seq)"
          % (r["n_threads"], r["pl"], r["speed_tg"], sys.argv[3], sys.argv[1], sys.argv[2], r["pp"], r["tg"]))
' "$name" "$(load1)" "$src"
  fi
}

cmd="${1:-}"
case "$cmd" in
  setup)
    setup
    log "tools in $bin"
    ;;
  f16)
    [[ $# -eq 3 ]] || { echo "usage: $0 f16 IN.gguf OUT.gguf" >&2; exit 2; }
    setup
    quiet "$bin/llama-quantize" --allow-requantize "$2" "$3" F16 "$THREADS" >&2
    echo "$3"
    ;;
  quantize)
    [[ $# -eq 4 ]] || { echo "usage: $0 quantize IN.gguf OUT.gguf TYPE (Q4_0, Q4_1, Q8_0, ...)" >&2; exit 2; }
    setup
    # --pure: every tensor to TYPE. By default llama-quantize gives output.weight a K-quant
    # (Q6_K), which Vellum does not read; both sides must run the same file.
    quiet "$bin/llama-quantize" --allow-requantize --pure "$2" "$3" "$4" "$THREADS" >&2
    echo "$3"
    ;;
  synthetic)
    [[ $# -ge 2 ]] || { echo "usage: $0 synthetic OUT.gguf [make-synthetic-gguf.py args]" >&2; exit 2; }
    setup
    out="$2"; shift 2
    tok="$("$root/scripts/fetch-model.sh")"
    PYTHONPATH="$src/gguf-py" "$venv/bin/python" "$root/scripts/make-synthetic-gguf.py" \
      --tokenizer-from "$tok" "$@" "$out"
    ;;
  generate)
    [[ $# -eq 3 ]] || { echo "usage: $0 generate MODEL.gguf PROMPT" >&2; exit 2; }
    setup
    quiet "$bin/llama-completion" -m "$2" -p "$3" -n 24 --temp 0 -t "$THREADS" -no-cnv --no-warmup </dev/null
    echo
    ;;
  ""|-h|--help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    ;;
  *)
    [[ "$cmd" == bench ]] && shift
    [[ $# -ge 1 ]] || { echo "usage: $0 [bench] MODEL.gguf [...]" >&2; exit 2; }
    setup
    for m in "$@"; do bench "$m"; done
    ;;
esac
