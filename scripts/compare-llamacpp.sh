#!/usr/bin/env bash
# Vellum vs llama.cpp, decode tokens/s, side by side in one run on this machine (2 threads).
# For each model: llama.cpp (scripts/llamacpp-baseline.sh) then `vellum bench` with the same
# shape of work (16-token prompts, 128 generated tokens, 1 and 16 sequences). Run it on a quiet
# machine: anything else on the cores distorts both.
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
printf '%-45s %5s %12s %12s %7s\n' model seqs llama.cpp vellum ratio
for m in "${models[@]}"; do
  # A llama.cpp tool that crashes (llama-batched-bench segfaults on some quantized models on
  # some CPUs) leaves its cell empty instead of ending the comparison.
  base="$(THREADS=2 N_GEN=128 N_PROMPT=16 SEQS=16 scripts/llamacpp-baseline.sh "$m" || true)"
  ours="$(./target/release/vellum bench --model "$m" --threads 2 --prompt-len 16 --gen-len 128 --concurrency 1,16 --json)"
  for seqs in 1 16; do
    l="$(grep -o "seqs=$seqs tok_s=[0-9.]*" <<<"$base" | cut -d= -f3 || true)"
    # llama.cpp measured without its repacked weights (see llamacpp-baseline.sh): marked *.
    nr="$(grep -q "seqs=$seqs tok_s=[0-9.]* src=[a-z-]*-nr" <<<"$base" && echo '*' || true)"
    [[ -n "$nr" ]] && any_nr=1
    v="$(python3 -c 'import json,sys; s=int(sys.argv[1]); print(next(json.loads(x)["decode_tok_s"] for x in sys.stdin if json.loads(x)["concurrency"]==s))' "$seqs" <<<"$ours")"
    if [[ -z "$l" ]]; then
      printf '%-45s %5s %12s %12.1f %7s\n' "$(basename "$m")" "$seqs" "crashed" "$v" "-"
    else
      printf '%-45s %5s %11.1f%1s %12.1f %6.2fx\n' "$(basename "$m")" "$seqs" "$l" "$nr" "$v" "$(python3 -c "print($v/$l)")"
    fi
  done
done
if [[ -n "${any_nr:-}" ]]; then
  echo "* llama.cpp with -nr: its default (AMX / repacked weights) crashed on this model and CPU"
fi
