#!/usr/bin/env bash
# The main job on the real default model: fetch SmolLM2-135M-Instruct (once), build,
# score the bundled sample file, and answer a chat prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(scripts/fetch-model.sh)"
cargo build --release --quiet
echo "== vellum score (samples/score.jsonl)"
./target/release/vellum score --model "$model" --input samples/score.jsonl --quiet
echo "== vellum generate --chat"
./target/release/vellum generate --model "$model" --chat --max-tokens 48 \
  --prompt "What is the capital of France? Answer in one sentence."
