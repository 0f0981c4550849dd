#!/usr/bin/env python3
"""Writes a synthetic F16 GGUF of a given Llama shape with random weights (default: the
TinyLlama-1.1B shape: 22 layers, hidden 2048, ffn 5632, 32 heads / 4 kv heads, vocab 32000).

The tokenizer (gpt2 byte-level BPE, the only GGUF tokenizer Vellum reads) is borrowed from a
real GGUF (default: SmolLM2-135M-Instruct), truncated to the requested vocab size, with the
merges that no longer fit dropped. The text it generates is garbage; it exists to measure
speed at a realistic size, in Vellum and in llama.cpp.

    python3 scripts/make-synthetic-gguf.py --tokenizer-from SRC.gguf OUT.gguf

Needs numpy and llama.cpp's gguf-py on PYTHONPATH (scripts/llamacpp-baseline.sh sets both up).
"""
import argparse
import sys

import numpy as np
import gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--tokenizer-from", required=True, help="a GGUF with a gpt2 tokenizer")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    src = gguf.GGUFReader(args.tokenizer_from)
    f = src.fields
    if f["tokenizer.ggml.model"].contents() != "gpt2":
        sys.exit("--tokenizer-from must hold a gpt2 (byte-level BPE) tokenizer")
    tokens = f["tokenizer.ggml.tokens"].contents()
    if len(tokens) < args.vocab:
        sys.exit(f"source vocab {len(tokens)} < --vocab {args.vocab}")
    tokens = tokens[: args.vocab]
    vocab = set(tokens)
    merges = []
    for m in f["tokenizer.ggml.merges"].contents():
        a, b = m.split(" ", 1)
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    token_type = f["tokenizer.ggml.token_type"].contents()[: args.vocab]

    head_dim = args.hidden // args.heads
    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(f"synthetic-llama-{args.layers}x{args.hidden}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(args.ctx)
    w.add_embedding_length(args.hidden)
    w.add_block_count(args.layers)
    w.add_feed_forward_length(args.ffn)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(args.heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(args.vocab)
    w.add_tokenizer_model("gpt2")
    if "tokenizer.ggml.pre" in f:
        w.add_tokenizer_pre(f["tokenizer.ggml.pre"].contents())
    w.add_token_list(tokens)
    w.add_token_types(token_type)
    w.add_token_merges(merges)
    for key, add in [
        ("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
        ("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
        ("tokenizer.ggml.unknown_token_id", w.add_unk_token_id),
        ("tokenizer.ggml.padding_token_id", w.add_pad_token_id),
    ]:
        if key in f and f[key].contents() < args.vocab:
            add(f[key].contents())
    w.add_add_bos_token(False)

    # Random data: one pool of N(0, 0.02) values, each tensor a window of it at a random
    # offset (fast, and the values only need to be finite and of a plausible scale).
    rng = np.random.default_rng(args.seed)
    pool = (rng.standard_normal(1 << 25, dtype=np.float32) * 0.02).astype(np.float16)

    def rand(rows: int, cols: int) -> np.ndarray:
        n = rows * cols
        off = int(rng.integers(0, pool.size))
        if off + n <= pool.size:
            return pool[off:off + n].reshape(rows, cols)
        return np.resize(np.roll(pool, -off), n).reshape(rows, cols)

    ones = np.ones(args.hidden, dtype=np.float32)
    H, F, KV = args.hidden, args.ffn, args.kv_heads * head_dim
    w.add_tensor("token_embd.weight", rand(args.vocab, H))
    for i in range(args.layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_q.weight", rand(H, H))
        w.add_tensor(p + "attn_k.weight", rand(KV, H))
        w.add_tensor(p + "attn_v.weight", rand(KV, H))
        w.add_tensor(p + "attn_output.weight", rand(H, H))
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_gate.weight", rand(F, H))
        w.add_tensor(p + "ffn_up.weight", rand(F, H))
        w.add_tensor(p + "ffn_down.weight", rand(H, F))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", rand(args.vocab, H))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(args.out)


if __name__ == "__main__":
    main()
