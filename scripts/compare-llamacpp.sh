#!/usr/bin/env bash
# Vellum vs llama.cpp, tokens/s side by side in one run on this machine (2 threads). For each
# model: llama.cpp (scripts/llamacpp-baseline.sh) then `vellum bench` with the same shape of
# work: prompt processing of a $PP-token prompt (default 512), and decode with 16-token prompts
# and 128 generated tokens for 1 and 16 sequences. Run it on a quiet machine: anything else on
# the cores distorts both. `VELLUM_INT_DOT=8 scripts/compare-llamacpp.sh ...` measures
# Vellum with int8 activations (llama.cpp's rounding), `=0` with the weights decoded to f32.
#
#   scripts/compare-llamacpp.sh [MODEL.gguf ...]
# Default models: SmolLM2 F16 and Q4_1 (.cache/models; the F16 one is made with
# `scripts/llamacpp-baseline.sh f16 IN OUT` if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
models=("$@")
if [[ ${#models[@]} -eq 0 ]]; then
  q41="$(scripts/fetch-model.sh)"
  f16=".cache/models/SmolLM2-135M-Instruct.F16.gguf"
  [[ -f "$f16" ]] || scripts/llamacpp-baseline.sh f16 "$q41" "$f16"
  models=("$f16" "$q41")
fi
cargo build --release --quiet
PP="${PP:-512}"
# Both sides report the median of REPS runs (llamacpp-baseline.sh reads it too).
export REPS="${REPS:-3}"
# One table row: model, what was measured, llama.cpp's line from llamacpp-baseline.sh (empty if
# its tool crashed), Vellum's figure.
row() {
  local model="$1" what="$2" line="$3" v="$4" l nr=""
  l="$(grep -o 'tok_s=[0-9.]*' <<<"$line" | cut -d= -f2 || true)"
  # llama.cpp measured without its repacked weights (see llamacpp-baseline.sh): marked *.
  if grep -q 'src=[a-z-]*-nr' <<<"$line"; then nr='*'; any_nr=1; fi
  if [[ -z "$l" ]]; then
    printf '%-40s %-10s %12s %12.1f %7s\n' "$model" "$what" "crashed" "$v" "-"
  else
    printf '%-40s %-10s %11.1f%1s %12.1f %6.2fx\n' "$model" "$what" "$l" "$nr" "$v" \
      "$(python3 -c "print($v/$l)")"
  fi
}
field() { # FIELD CONCURRENCY < vellum bench --json lines
  python3 -c 'import json,sys; print(next(d[sys.argv[1]] for d in map(json.loads, sys.stdin) if d["concurrency"]==int(sys.argv[2])))' "$@"
}
printf '%-40s %-10s %12s %12s %7s\n' model tok/s llama.cpp vellum ratio
for m in "${models[@]}"; do
  name="$(basename "$m")"
  # A llama.cpp tool that crashes leaves its cell empty instead of ending the comparison.
  base="$(THREADS=2 N_GEN=128 N_PROMPT=16 SEQS=16 PP="$PP" scripts/llamacpp-baseline.sh "$m" || true)"
  ours="$(./target/release/vellum bench --model "$m" --threads 2 --prompt-len 16 --gen-len 128 --concurrency 1,16 --repeat "$REPS" --json)"
  if [[ "$PP" -gt 0 ]]; then
    pre="$(./target/release/vellum bench --model "$m" --threads 2 --prompt-len "$PP" --gen-len 1 --concurrency 1 --repeat "$REPS" --json)"
    row "$name" "prefill$PP" "$(grep 'llamacpp prefill' <<<"$base" || true)" "$(field prefill_tok_s 1 <<<"$pre")"
  fi
  for seqs in 1 16; do
    row "$name" "decode x$seqs" "$(grep "llamacpp decode .* seqs=$seqs " <<<"$base" || true)" \
      "$(field decode_tok_s "$seqs" <<<"$ours")"
  done
done
if [[ -n "${any_nr:-}" ]]; then
  echo "* llama.cpp without repacked weights (-nr / --repack 0): its default (AMX) crashed here"
fi
