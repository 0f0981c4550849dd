#!/usr/bin/env python3
"""Build tests/golden/spm_llama.gguf and tests/golden/spm_llama.json.

spm_llama.gguf: a tiny random-weight llama model whose tokenizer is a llama.cpp
`llama` (SentencePiece BPE, byte fallback) vocabulary, with the tokenizer
metadata written the way llama.cpp's convert_hf_to_gguf.py
(`_set_vocab_sentencepiece` + `gguf.SpecialVocab`) writes it.

spm_llama.json: golden tokenizations of a set of strings, made by Hugging Face
transformers' own GGUF tokenizer loader (an implementation independent of
Vellum), cross-checked against the original sentencepiece model.

Usage (from the repository root):
    /path/to/venv/bin/python tests/golden/make_spm_llama.py
Needs: numpy, sentencepiece, gguf (gguf-py), transformers 5.x, tokenizers.
Scratch files (corpus, .model/.vocab) go to /tmp/spm_llama/.
"""

import importlib.metadata
import json
import os
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

import gguf

OUT_DIR = Path(__file__).resolve().parent
GGUF_NAME = "spm_llama.gguf"
JSON_NAME = "spm_llama.json"
TMP = Path("/tmp/spm_llama")

VOCAB_SIZE = 448  # 3 specials + 256 byte pieces + ~100 characters + merges

# Training corpus. SentencePiece reads it line by line, so "\n" never becomes a
# piece (it is always byte-fallback <0x0A>); tabs are deliberately absent too.
# Non-ASCII here (café, naïve, 日本, 🙂, ...) becomes character pieces because
# character_coverage=1.0; the test strings use other CJK / emoji that are NOT
# in the vocabulary so that byte fallback is exercised.
CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog was not amused.
Hello world! Hello, world? Hello again, my old friend.
It's a truth universally acknowledged that a model needs a tokenizer.
We'll see what they've done; you're right, I'm sure it isn't theirs.
She said: "Don't worry, we'll be there by 10:30 on Monday."
In 2024 the team shipped 3 releases, 17 fixes and 128 small changes.
Pi is roughly 3.14159, and e is about 2.71828; the answer is 42.
Prices rose 5% to $19.99 (before tax) on 12/05/2023 - see item #7.
Email me at someone@example.com or visit https://example.org/path?q=1&r=2.
A café on the corner serves naïve coffee drinkers a crème brûlée.
The word résumé has accents; so does façade, and so does jalapeño.
Tokyo is in 日本, and 日本語 is the language spoken there.
I love this 🙂 and that 🙂 too, she wrote with a smile.
def main(): return [x * 2 for x in range(10) if x % 3 == 0]
let mut total = 0; for i in 0..100 { total += i; } // sum
Rust, Python, C++ and Go are programming languages; SQL is a query language.
The model reads tokens, predicts the next token, and repeats until done.
Large language models are trained on text from books, code and the web.
Once upon a time, there was a little robot who wanted to learn to read.
Every morning it opened a book, looked at the letters, and tried again.
The letters became words, the words became sentences, and the sentences stories.
Numbers were harder: 1, 2, 3, 4, 5, 6, 7, 8, 9, 0 and then 10, 11, 12.
Questions? Answers! Semicolons; colons: dashes - and underscores_too.
UPPER CASE and lower case and Title Case and camelCase and snake_case.
The weather today is sunny with a high of 25 degrees and a light breeze.
Tomorrow there will be rain in the morning and clouds in the afternoon.
He couldn't believe it; they'd already left, and we'd missed the train.
What's the time? It's half past nine, or 9:30 if you prefer digits.
Good morning, good afternoon, good evening and good night to everyone.
This is the end of the training text, thank you for reading it all.
"""

# Strings to tokenize. Leading/trailing/double spaces, newlines, tabs, digits,
# punctuation, contractions, byte fallback (🦀, 東京 and ß are not in the
# vocabulary), a lone space, and the literal text "<s>".
CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "double  space",
    "   three leading",
    "line one\nline two\n\nline four",
    "tab\tseparated\tvalues",
    "2024 and 3.14",
    "Hello, world! (yes?) [no] {maybe}; a-b_c @#$%^&*",
    "I'm sure it isn't theirs, we'll see; they've done it.",
    "café naïve 日本",
    "crab 🦀 in 東京, straße",
    " ",
    "text with <s> inside </s> it",
    "\n",
]
WITH_BOS_TEXT = "Hello world"


def train_spm():
    """Train a Llama-style SentencePiece BPE model; returns the processor."""
    TMP.mkdir(parents=True, exist_ok=True)
    corpus = TMP / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(TMP / "spm_llama"),
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=1.0,
        # Llama's tokenizer.model settings: identity normalizer, dummy "▁"
        # prefix, whitespace kept verbatim, digits split one by one.
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(TMP / "spm_llama.model"))


def vocab_from_spm(sp):
    """tokens / scores / token types exactly as llama.cpp's
    `_create_vocab_sentencepiece` derives them from a SentencePiece model."""
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN  # 2
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL  # 3
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED  # 5
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE  # 6
        else:
            t = gguf.TokenType.NORMAL  # 1
        types.append(t)
    return tokens, scores, types


def write_gguf(path, tokens, scores, types):
    n_vocab, n_embd, n_ff, n_head, n_head_kv, n_ctx = len(tokens), 32, 64, 4, 2, 128
    head_dim = n_embd // n_head  # 8
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("spm-llama-tiny")
    # Model hyperparameters (llama.* keys).
    w.add_vocab_size(n_vocab)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    # 2-D weights F16, 1-D norms F32: what `convert_hf_to_gguf.py --outtype f16`
    # writes. (All-F32 would not fit in 100 KB with this vocabulary.)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # Tokenizer, in the order `_set_vocab_sentencepiece` + SpecialVocab write it.
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    rng = np.random.default_rng(0)

    def mat(rows, cols, std):  # numpy [out, in]; gguf stores dims as [in, out]
        return (rng.standard_normal((rows, cols)) * std).astype(np.float16)

    def norm():
        return rng.uniform(0.5, 1.5, n_embd).astype(np.float32)

    kv = n_head_kv * head_dim  # 16
    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd, 1.0))
    w.add_tensor("blk.0.attn_norm.weight", norm())
    w.add_tensor("blk.0.attn_q.weight", mat(n_embd, n_embd, n_embd ** -0.5))
    w.add_tensor("blk.0.attn_k.weight", mat(kv, n_embd, n_embd ** -0.5))
    w.add_tensor("blk.0.attn_v.weight", mat(kv, n_embd, n_embd ** -0.5))
    w.add_tensor("blk.0.attn_output.weight", mat(n_embd, n_embd, n_embd ** -0.5))
    w.add_tensor("blk.0.ffn_norm.weight", norm())
    w.add_tensor("blk.0.ffn_gate.weight", mat(n_ff, n_embd, n_embd ** -0.5))
    w.add_tensor("blk.0.ffn_up.weight", mat(n_ff, n_embd, n_embd ** -0.5))
    w.add_tensor("blk.0.ffn_down.weight", mat(n_embd, n_ff, n_ff ** -0.5))
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", mat(n_vocab, n_embd, 2.5 * n_embd ** -0.5))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    sp = train_spm()
    tokens, scores, types = vocab_from_spm(sp)
    write_gguf(OUT_DIR / GGUF_NAME, tokens, scores, types)

    tok = AutoTokenizer.from_pretrained(str(OUT_DIR), gguf_file=GGUF_NAME)
    (TMP / "hf_tokenizer.json").write_text(tok.backend_tokenizer.to_str(pretty=True))

    cases, mismatches = [], 0
    for text in CASES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        case = {"text": text, "ids": ids, "decoded": tok.decode(ids)}
        # With split_special_tokens=True, "<s>" in the text is plain text
        # (llama.cpp's parse_special=false); recorded only where it differs.
        split_ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if split_ids != ids:
            case["ids_split_special"] = split_ids
        sp_ids = sp.encode(text)
        if sp_ids != ids:
            # Recorded so a consumer can see where HF and sentencepiece differ.
            mismatches += 1
            case["sentencepiece_ids"] = sp_ids
            case["sentencepiece_decoded"] = sp.decode(sp_ids)
            print(f"MISMATCH {text!r}\n  hf {ids}\n  sp {sp_ids}", file=sys.stderr)
        cases.append(case)

    golden = {
        "generator": (
            f"transformers {transformers.__version__} (AutoTokenizer gguf_file loader), "
            f"tokenizers {tokenizers.__version__}, sentencepiece {spm.__version__}, "
            f"gguf-py {importlib.metadata.version('gguf')}, numpy {np.__version__}; "
            "tests/golden/make_spm_llama.py"
        ),
        "gguf": GGUF_NAME,
        "vocab_size": len(tokens),
        "bos_id": 1, "eos_id": 2, "unk_id": 0,
        "cases": cases,
        "with_bos": {
            "text": WITH_BOS_TEXT,
            "ids": tok(WITH_BOS_TEXT, add_special_tokens=True)["input_ids"],
        },
    }
    # One case per line keeps the file short and diffable.
    cases_json = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in golden.pop("cases"))
    with_bos = json.dumps(golden.pop("with_bos"), ensure_ascii=False)
    head = json.dumps(golden, ensure_ascii=False, indent=1)[:-2]  # drop "\n}"
    with open(OUT_DIR / JSON_NAME, "w", encoding="utf-8") as f:
        f.write(f'{head},\n "with_bos": {with_bos},\n "cases": [\n  {cases_json}\n ]\n}}\n')
    json.loads((OUT_DIR / JSON_NAME).read_text(encoding="utf-8"))  # well-formed
    print(f"{len(cases)} cases, {mismatches} HF/sentencepiece mismatches; "
          f"{GGUF_NAME} {os.path.getsize(OUT_DIR / GGUF_NAME)} bytes")


if __name__ == "__main__":
    main()
