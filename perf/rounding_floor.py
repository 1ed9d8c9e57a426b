"""The rounding floor of perf/generation.py's kernel-vs-reference check: the same teacher-forced
run three times on the reference path (torch, no Triton), attention in float64, in float32, and in
float32 with the weights P rounded to the model's dtype before P @ V (as the kernels' tensor-core
P operand is), the model in --dtype. Any kernel accumulating in float32 differs from the float64
reference by roundings of this kind, so a kernel-vs-reference perplexity gap of the size measured
here is rounding noise, not a kernel error. Runs on the CPU (no Triton kernel runs;
TRITON_INTERPRET=1 lets the cache take CPU tensors).

    PYTHONPATH=$PWD:$PWD/perf python perf/rounding_floor.py --model gemma3 --dtype bf16 --batch 1 \\
        --out perf/results/rounding_floor_gemma3_bf16.json

--outputs: no model; for random Llama-3-8B-shaped caches pruned at 0.7, the fraction of attention
outputs (in --dtype) that differ from the float64 result rounded to --dtype, with attention in
float32, P exact or rounded.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the cache's device checks

import torch  # noqa: E402

from accuracy import load_model  # noqa: E402
from common import environment, write_results  # noqa: E402
from generation import make_cache, perplexity, reference_path, run, runs, text_batch  # noqa: E402


def output_rounding(dtype: torch.dtype) -> list[dict]:
    """--outputs: per (q scale, tokens), the share of outputs off the correctly rounded result."""
    from mustafar_triton import reference
    rows = []
    gen = torch.Generator().manual_seed(0)
    for q_scale in (1.0, 3.0, 6.0):
        for tokens in (256, 2048):
            k, v = (torch.randn(3, 2, tokens, 128, generator=gen).to(dtype) for _ in range(2))
            q = (torch.randn(3, 8, 128, generator=gen) * q_scale).to(dtype)
            pk, pv = reference.prune_and_pack(k, 0.7), reference.prune_and_pack(v, 0.7)
            want = reference.sparse_decode_attention(q.double(), pk, pv).to(dtype)
            row = dict(dtype=str(dtype).replace("torch.", ""), q_scale=q_scale, tokens=tokens, sparsity=0.7)
            for label, p_dtype in (("p_exact", None), ("p_rounded", dtype)):
                got = reference.sparse_decode_attention(q.float(), pk, pv, compute_dtype=torch.float32,
                                                        p_dtype=p_dtype).to(dtype)
                row[f"off_{label}"] = (got != want).float().mean().item()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3", choices=("smollm2", "gemma3"))
    ap.add_argument("--dtype", default="bf16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--runs", default="preset-K0.7V0.7,preset-K0.5V0.5",
                    help="generation.py's runs, or K0V0: sparsity 0 (dense attention on the same paths)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--outputs", action="store_true", help="per-output rounding of random caches, no model")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.outputs:
        write_results(args.out, environment(torch.device("cpu")), output_rounding(dtype))
        return
    tokenizer, model = load_model(args.model)
    model = model.to(dtype)
    ids = text_batch(tokenizer, args.batch, args.prompt + args.steps + 1)
    targets = ids[:, args.prompt + 1:]
    rows = []
    # K0V0: nothing pruned, so the three arms are dense attention's own rounding floor
    for name, settings in runs(model.config.head_dim) + [("K0V0", dict(k_sparsity=0.0, v_sparsity=0.0))]:
        if name not in args.runs.split(","):
            continue
        result = {}
        for label, compute, p_dtype in (("float64", torch.float64, None), ("float32", torch.float32, None),
                                        ("float32_p_rounded", torch.float32, dtype)):
            with reference_path(compute, p_dtype):
                logits = run(model, ids, args.prompt, make_cache(model, ids.shape[1], settings, args.window, False), False)[0]
            result[label] = (perplexity(logits, targets), logits)
        (p64, l64), (p32, l32), (pr, lr) = result["float64"], result["float32"], result["float32_p_rounded"]
        row = dict(run=name, batch=args.batch, prompt=args.prompt, steps=args.steps, dtype=args.dtype, **settings,
                   perplexity_float64_attention=p64, perplexity_float32_attention=p32,
                   relative_gap=p32 / p64 - 1, max_logit_diff=(l32 - l64).abs().max().item(),
                   top1_agreement=(l32.argmax(-1) == l64.argmax(-1)).float().mean().item(),
                   perplexity_float32_p_rounded=pr, relative_gap_p_rounded=pr / p64 - 1,
                   top1_agreement_p_rounded=(lr.argmax(-1) == l64.argmax(-1)).float().mean().item())
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_results(args.out, dict(environment(torch.device("cpu")), model=args.model), rows)


if __name__ == "__main__":
    main()
