#!/usr/bin/env python3
"""Build tests/golden/kquant_llama.gguf and tests/golden/kquant_llama_f16.gguf.

kquant_llama.gguf: a one-layer llama (hidden 256, 4 heads of 64, 2 KV heads, FFN 256) with
spm_llama.gguf's tokenizer, whose matrices are in every GGUF format Vellum decodes at load:
Q6_K embeddings, IQ4_NL Q, Q5_K K, Q3_K V, Q2_K attention output, Q5_0 gate, Q5_1 up, Q4_K
down, IQ4_XS output. The blocks are random bytes with scales chosen so the weights have a
plausible size (the model's text is garbage; what matters is that every bit is read).

kquant_llama_f16.gguf: the same model with each matrix decoded by the `gguf` Python package
(an implementation independent of Vellum's) and stored as F16. Vellum rounds its own decode
to f16 too, so the two files must give the same log-probabilities, bit for bit.

Usage (from the repository root):
    python3 -m venv /tmp/ggufvenv && /tmp/ggufvenv/bin/pip install gguf==0.19.0 numpy
    /tmp/ggufvenv/bin/python tests/golden/make_kquant_llama.py
"""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants

DIR = Path(__file__).resolve().parent
HIDDEN, HEADS, KV_HEADS, FFN = 256, 4, 2, 256
HEAD_DIM = HIDDEN // HEADS

# Per format: byte offsets of its f16 scale fields, and their size (so that weights come
# out with a spread of a few hundredths), an f16 offset field's value where it has one.
SCALES = {
    T.Q5_0: ([0], 0.008),
    T.Q5_1: ([0, 2], 0.004),
    T.Q2_K: ([80, 82], 0.005),
    T.Q3_K: ([108], 0.002),
    T.Q4_K: ([0, 2], 2.5e-4),
    T.Q5_K: ([0, 2], 1.3e-4),
    T.Q6_K: ([208], 6e-5),
    T.IQ4_NL: ([0], 8e-4),
    T.IQ4_XS: ([0], 5e-5),
}


def random_blocks(rng, qtype, rows, cols):
    block_values, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    assert cols % block_values == 0
    blocks = rows * cols // block_values
    raw = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
    offsets, size = SCALES[qtype]
    for i, at in enumerate(offsets):
        scale = rng.uniform(0.5, 1.5, size=blocks) * size
        if qtype == T.Q5_1 and i == 1:  # the offset m: centres the codes' range
            scale = -16 * SCALES[T.Q5_1][1] * rng.uniform(0.8, 1.2, size=blocks)
        raw[:, at : at + 2] = scale.astype(np.float16).view(np.uint8).reshape(blocks, 2)
    return raw.reshape(rows, -1)


def main():
    src = GGUFReader(DIR / "spm_llama.gguf")
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    kv_dim = KV_HEADS * HEAD_DIM
    matrices = [
        ("token_embd.weight", T.Q6_K, vocab, HIDDEN),
        ("blk.0.attn_q.weight", T.IQ4_NL, HIDDEN, HIDDEN),
        ("blk.0.attn_k.weight", T.Q5_K, kv_dim, HIDDEN),
        ("blk.0.attn_v.weight", T.Q3_K, kv_dim, HIDDEN),
        ("blk.0.attn_output.weight", T.Q2_K, HIDDEN, HIDDEN),
        ("blk.0.ffn_gate.weight", T.Q5_0, FFN, HIDDEN),
        ("blk.0.ffn_up.weight", T.Q5_1, FFN, HIDDEN),
        ("blk.0.ffn_down.weight", T.Q4_K, HIDDEN, FFN),
        ("output.weight", T.IQ4_XS, vocab, HIDDEN),
    ]
    rng = np.random.default_rng(20261205)
    blocks = {name: random_blocks(rng, q, r, c) for name, q, r, c in matrices}
    for out, decoded in (("kquant_llama.gguf", False), ("kquant_llama_f16.gguf", True)):
        w = GGUFWriter(DIR / out, "llama")
        for field in src.fields.values():
            if field.name.startswith("GGUF.") or field.name.startswith("llama."):
                continue
            if field.name in ("general.architecture", "general.file_type"):
                continue
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), field.types[0], sub)
        w.add_context_length(512)
        w.add_embedding_length(HIDDEN)
        w.add_block_count(1)
        w.add_feed_forward_length(FFN)
        w.add_rope_dimension_count(HEAD_DIM)
        w.add_head_count(HEADS)
        w.add_head_count_kv(KV_HEADS)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_vocab_size(vocab)
        for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
            w.add_tensor(name, np.ones(HIDDEN, dtype=np.float32))
        for name, qtype, rows, cols in matrices:
            raw = blocks[name]
            if decoded:
                values = quants.dequantize(raw, qtype).astype(np.float32)
                assert values.shape == (rows, cols) and np.isfinite(values).all()
                w.add_tensor(name, values.astype(np.float16))
            else:
                w.add_tensor(name, raw, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(f"wrote {DIR / out} ({(DIR / out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
