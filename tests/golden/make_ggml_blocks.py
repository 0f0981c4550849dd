#!/usr/bin/env python3
"""Build tests/golden/ggml_blocks.json: GGUF blocks of the formats Vellum decodes at load
(Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS; vellum_quant::ggml), with the values the `gguf` Python package's
decoders give them (an implementation independent of Vellum's, from llama.cpp's authors).

Blocks are random bytes, except the f16 scales: random finite values, both signs, so
that every code, scale and offset bit is exercised without NaN or infinity.

Usage (from the repository root):
    python3 -m venv /tmp/ggufvenv && /tmp/ggufvenv/bin/pip install gguf==0.19.0 numpy
    /tmp/ggufvenv/bin/python tests/golden/make_ggml_blocks.py
"""

import importlib.metadata
import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = Path(__file__).resolve().parent / "ggml_blocks.json"
BLOCKS = 4
# Byte offsets of each format's f16 scale fields within a block.
SCALES = {
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
}


def main():
    rng = np.random.default_rng(20261205)
    out = {
        "generator": f"gguf {importlib.metadata.version('gguf')}, numpy {np.__version__}",
        "formats": {},
    }
    for name, offsets in SCALES.items():
        qtype = getattr(T, name)
        block_values, block_bytes = quants.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(BLOCKS, block_bytes), dtype=np.uint8)
        for at in offsets:
            scale = (rng.uniform(-0.05, 0.05, size=BLOCKS)).astype(np.float16)
            raw[:, at : at + 2] = scale.view(np.uint8).reshape(BLOCKS, 2)
        values = quants.dequantize(raw.reshape(-1), qtype).astype(np.float32)
        assert values.shape == (BLOCKS * block_values,), values.shape
        assert np.isfinite(values).all()
        out["formats"][name] = {
            "ggml_type": int(qtype),
            "block_values": int(block_values),
            "block_bytes": int(block_bytes),
            "bytes_hex": raw.tobytes().hex(),
            # f32 values as Python floats: the shortest repr of each, exact once read back.
            "values": [float(v) for v in values],
        }
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
