"""Decode with fp8 kept values (format.py) against fp16 values and dense SDPA, in one run on the
same data: GPU time per call (perf/common.bench_us), bytes, and the output's distance from the
fp16-values call at the same sparsity ("bf16" in the labels with --dtype bf16). fp8 values run the
library's own choice (the Gluon walk for fp16 and bf16 queries, since 9a59b48); "fp16 tl" is
decode.py's kernel on values in the queries' dtype, for scale.

    python perf/fp8_decode.py --out perf/results/h200/fp8_decode.json [--shapes 16x16384,1x32768] [--dtype bf16]

Shapes are B x T of the Llama-3-8B attention (Hq=32, Hkv=8, D=128), fp16 (or --dtype bf16)
queries and caches, K and V at the same sparsity, no window. "fp8 K0.375V0.375" keeps 80 of 128
channels in 80 bytes: the bytes of fp16 K0.7V0.7 (40 slots of 2 bytes).
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import LLAMA3_8B, bench_us, decode_inputs, environment, write_results  # noqa: E402 (repo first)

import mustafar_triton as mt  # noqa: E402
from mustafar_triton import autotune  # noqa: E402

SHAPES = ("16x16384", "1x32768", "64x4096")
FP8 = torch.float8_e4m3fn
# (label, sparsity, fp8 values, forced config: None = the library's own choice, "tl" = the config
# fp8 values run with)
VARIANTS = (("fp16 K0.7V0.7", 0.7, False, None), ("fp16 tl K0.7V0.7", 0.7, False, "tl"),
            ("fp8 K0.7V0.7", 0.7, True, None), ("fp16 K0.375V0.375", 0.375, False, None),
            ("fp8 K0.375V0.375", 0.375, True, None))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="fp8_decode.json")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated BxT")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"), help="the queries' and caches' dtype")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m = LLAMA3_8B
    variants = [(label.replace("fp16", args.dtype), *rest) for label, *rest in VARIANTS]
    meta = dict(environment(dev), variants=[v[0] for v in variants])
    rows = []
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        q, k, v, base = decode_inputs(m, b, t, dev, dtype)
        dense = float("inf")
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    dense = min(dense, bench_us(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q[:, :, None], k, v, enable_gqa=True), dev))
            except RuntimeError:  # a backend that refuses the shape
                continue
        rows.append(dict(base, variant="dense SDPA", us=dense, bytes=2 * k.numel() * 2))
        fp16_out = {}
        for label, sparsity, fp8, forced in variants:
            kw = dict(value_dtype=FP8) if fp8 else {}
            pk, pv = mt.prune_and_pack(k, sparsity, **kw), mt.prune_and_pack(v, sparsity, **kw)
            cfg = autotune.heuristic_config("decode", dev) if forced == "tl" else None
            with autotune.forced_config("decode", cfg) if cfg else contextlib.nullcontext():
                out = mt.sparse_decode_attention(q, pk, pv).float()
                us = bench_us(lambda: mt.sparse_decode_attention(q, pk, pv), dev)
            if not fp8:
                fp16_out.setdefault(sparsity, out)
            diff = (out - fp16_out[sparsity]).abs().max().item() if sparsity in fp16_out else None
            rows.append(dict(base, variant=label, sparsity=sparsity, fp8_values=fp8, us=us, bytes=pk.nbytes + pv.nbytes,
                             dense_us=dense, speedup=dense / us, max_abs_diff_vs_fp16_values=diff))
            print(f"{shape:>9s} {label:18s} {us:8.1f} us  {dense / us:5.2f}x dense  "
                  f"{(pk.nbytes + pv.nbytes) / (2 * k.numel() * 2):.3f} of the bytes", flush=True)
            del pk, pv
            write_results(Path(args.out), meta, rows)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
