#!/usr/bin/env python3
"""Golden-output generator for Vellum's numerical tests.

Hugging Face transformers (fp32, eager attention) is the independent reference.

  make_golden.py tiny            # tiny random models -> models/<name>/ + tiny.json
  make_golden.py real --gguf P   # SmolLM2 GGUF       -> smollm2.json

All output paths default to this script's folder. See README.md here.
"""
import argparse
import hashlib
import json
import math
import os
import shutil

import torch
import transformers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
GENERATOR = f"transformers {transformers.__version__}, torch {torch.__version__}"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

PROMPT_LENGTHS = [1, 5, 16, 17, 33, 40]  # crosses the 16-token KV block boundary
N_GREEDY_TINY = 8
N_GREEDY_REAL = 20


def r6(x):
    """Round floats to 6 decimals (keeps JSON small; far below test tolerances)."""
    return round(float(x), 6)


# ---------------------------------------------------------------------------
# Reference computations (shared by both subcommands)
# ---------------------------------------------------------------------------

@torch.no_grad()
def logits_of(model, ids):
    """fp32 logits [L, vocab] of one full (no KV cache) forward pass."""
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def prompt_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i = 1..L-1, plus the final log-softmax row."""
    lp = torch.log_softmax(logits_of(model, ids), dim=-1)
    scored = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    return scored, lp[-1]


@torch.no_grad()
def greedy(model, ids, n):
    """n greedy tokens via full re-forward each step (no cache, no EOS stop)."""
    ids = list(ids)
    toks, lps = [], []
    for _ in range(n):
        lp = torch.log_softmax(logits_of(model, ids)[-1], dim=-1)
        t = int(torch.argmax(lp).item())
        top2 = torch.topk(lp, 2).values
        greedy.min_margin = min(greedy.min_margin, (top2[0] - top2[1]).item())
        toks.append(t)
        lps.append(lp[t].item())
        ids.append(t)
    return toks, lps


greedy.min_margin = float("inf")  # smallest top1-top2 logprob gap seen (diagnostic)


# ---------------------------------------------------------------------------
# `tiny`: random-weight models
# ---------------------------------------------------------------------------

# Sizes shared by every tiny model.
BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False)


def tiny_specs():
    """name -> (model class, config, save dtype). rope_theta/rope scaling go in
    `rope_parameters` (transformers 5.x name for the old rope_theta/rope_scaling)."""
    def rope(theta, **extra):
        return dict(rope_parameters=dict(rope_type="default", rope_theta=theta, **extra))

    return {
        "llama_gqa": (LlamaForCausalLM, LlamaConfig(**BASE, **rope(10000.0)), torch.float32),
        "qwen2_bias": (Qwen2ForCausalLM,
                       Qwen2Config(**{**BASE, "num_key_value_heads": 1}, **rope(10000.0),
                                   use_sliding_window=False, sliding_window=None),
                       torch.float32),
        "mistral": (MistralForCausalLM,
                    MistralConfig(**{**BASE, "num_key_value_heads": 4}, **rope(10000.0),
                                  sliding_window=None),
                    torch.float32),
        "llama3_rope": (LlamaForCausalLM,
                        LlamaConfig(**{**BASE, "head_dim": 32, "num_attention_heads": 2,
                                       "num_key_value_heads": 1},
                                    rope_parameters=dict(
                                        rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=64)),
                        torch.float32),
        "tied_bf16": (LlamaForCausalLM,
                      LlamaConfig(**{**BASE, "tie_word_embeddings": True}, **rope(10000.0)),
                      torch.bfloat16),
    }


@torch.no_grad()
def reinit(model):
    """Default init (std 0.02) gives near-uniform logits that test nothing.
    Use std 1/sqrt(fan_in) for linears (+biases), 2.5/sqrt(fan_in) for lm_head
    (logit std ~2.5), N(0,1) embeddings (N(0, 2.5/sqrt(hidden)) when tied, since
    they double as lm_head), and RMSNorm weights ~ U[0.5, 1.5]."""
    tied = model.config.tie_word_embeddings
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            gain = 2.5 if name == "lm_head" else 1.0
            std = gain / math.sqrt(mod.in_features)
            mod.weight.normal_(0.0, std)
            if mod.bias is not None:
                mod.bias.normal_(0.0, std)
        elif isinstance(mod, torch.nn.Embedding):
            mod.weight.normal_(0.0, 2.5 / math.sqrt(mod.embedding_dim) if tied else 1.0)
        elif "norm" in type(mod).__name__.lower() and hasattr(mod, "weight"):
            mod.weight.uniform_(0.5, 1.5)
    if tied:
        model.tie_weights()  # lm_head shares embed_tokens (re-tie after init)


def add_legacy_keys(cfg_path):
    """transformers 5.x writes `rope_parameters` and `dtype`. Most configs on the
    Hub still use the 4.x keys `rope_theta`, `rope_scaling` and `torch_dtype`, so
    also write those (same values) so either spelling can be parsed."""
    with open(cfg_path) as f:
        cfg = json.load(f)
    rp = dict(cfg["rope_parameters"])
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
    cfg["torch_dtype"] = cfg["dtype"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def cmd_tiny(args):
    models_dir = os.path.join(args.out_dir, "models")
    out = {"generator": GENERATOR, "models": {}}
    for idx, (name, (cls, cfg, save_dtype)) in enumerate(tiny_specs().items()):
        torch.manual_seed(1234 + idx)
        model = cls(cfg).float().eval()
        reinit(model)

        # Save (bf16 model: cast weights; config then records dtype bfloat16).
        d = os.path.join(models_dir, name)
        shutil.rmtree(d, ignore_errors=True)
        model.to(save_dtype).save_pretrained(d, safe_serialization=True)
        gc = os.path.join(d, "generation_config.json")
        if os.path.exists(gc):
            os.remove(gc)
        add_legacy_keys(os.path.join(d, "config.json"))

        # Reference = the saved weights reloaded and computed in fp32
        # (for tied_bf16 this is fp32 math on bf16-rounded weights).
        ref = cls.from_pretrained(d, dtype=torch.float32,
                                  attn_implementation="eager").eval()

        gen = torch.Generator().manual_seed(99 + idx)
        prompts = []
        for L in PROMPT_LENGTHS:
            ids = torch.randint(0, cfg.vocab_size, (L,), generator=gen).tolist()
            plp, last = prompt_logprobs(ref, ids)
            top = torch.topk(last, 5)
            g, glp = greedy(ref, ids, N_GREEDY_TINY)
            prompts.append({
                "prompt": ids,
                "prompt_logprobs": [r6(x) for x in plp],
                "last_top5": {"ids": top.indices.tolist(),
                              "logprobs": [r6(x) for x in top.values.tolist()]},
                "greedy": g,
                "greedy_logprobs": [r6(x) for x in glp],
            })
            # Sanity: logits must not be near-uniform; greedy must not be constant.
            spread = last.std().item()
            assert spread > 1.0, f"{name} L={L}: last logprob std {spread:.3f} too small"
            print(f"{name:12s} L={L:2d} std={spread:5.2f} top1={top.values[0]:7.3f} greedy={g}")
        assert any(len(set(p["greedy"])) > 1 for p in prompts), f"{name}: greedy constant"
        print(f"{name}: min greedy top1-top2 margin {greedy.min_margin:.4f}")
        greedy.min_margin = float("inf")
        out["models"][name] = {"dtype": "bf16" if save_dtype == torch.bfloat16 else "f32",
                               "prompts": prompts}

    path = os.path.join(args.out_dir, "tiny.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


# ---------------------------------------------------------------------------
# `real`: SmolLM2-135M-Instruct GGUF via transformers' GGUF loader
# ---------------------------------------------------------------------------

TOKENIZER_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces    here",
    "line one\nline two\n\nline four",
    "12345 and 3.14159",
    "Wait... what?! (Yes; no.) [ok] {x} #1 @me $5 50% a&b",
    "don't I'll they're we've",
    "café naïve 日本語 🙂",
    'fn main() { println!("hi"); }',
    "<|im_start|>user\nHi<|im_end|>\n",
]

CHAT_PROMPTS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "Name the largest planet in the solar system.",
]

SCORING_TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
    "France. It is named after the engineer Gustave Eiffel, whose company designed "
    "and built the tower.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the "
    "air pressure is lower, so water boils at a lower temperature and cooking takes longer.",
]


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cmd_real(args):
    gguf = os.path.abspath(args.gguf)
    d, fname = os.path.dirname(gguf), os.path.basename(gguf)
    sha = sha256_of(gguf)
    if sha != SMOLLM2_SHA256:
        print(f"WARNING: sha256 {sha} != expected {SMOLLM2_SHA256}")

    tok = AutoTokenizer.from_pretrained(d, gguf_file=fname)
    # transformers dequantizes every GGUF tensor to fp32.
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=fname, dtype=torch.float32, attn_implementation="eager").eval()

    tokenizer = []
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        rt = tok.decode(ids) == text
        tokenizer.append({"text": text, "ids": ids, "roundtrip": rt})
        print(f"tok rt={rt!s:5s} {text!r} -> {ids}")

    chat = []
    for p in CHAT_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}],
                                       tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        g, glp = greedy(model, ids, N_GREEDY_REAL)
        gtext = tok.decode(g)
        chat.append({"prompt_text": text, "prompt_ids": ids, "greedy": g,
                     "greedy_logprobs": [r6(x) for x in glp], "greedy_text": gtext})
        print(f"chat {p!r} -> {gtext!r} (min margin {greedy.min_margin:.4f})")
        greedy.min_margin = float("inf")

    scoring = []
    for text in SCORING_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        plp, _ = prompt_logprobs(model, ids)
        scoring.append({"text": text, "ids": ids, "prompt_logprobs": [r6(x) for x in plp]})
        print(f"score L={len(ids)} mean logprob={sum(plp) / len(plp):.3f}")

    out = {"generator": GENERATOR, "gguf": fname, "gguf_sha256": sha,
           "tokenizer": tokenizer, "chat": chat, "scoring": scoring}
    path = os.path.join(args.out_dir, "smollm2.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=HERE)
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("tiny")
    real = sub.add_parser("real")
    real.add_argument("--gguf", required=True)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.cmd in (None, "tiny"):
        cmd_tiny(args)
    else:
        cmd_real(args)


if __name__ == "__main__":
    main()
