"""Several query tokens per decode step (q [B, Lq, Hq, D], speculative decoding): GPU time of one
call at Lq = 1, 2, 4, 8 against the same call at Lq = 1, against Lq one-token calls (what a user
without Lq support would run), and against dense SDPA over the same tokens (best backend, the
Lq queries causal over the last Lq keys). Writes JSON (meta + rows) and prints a table.

    python perf/multi_query.py --out perf/results/h200/multi_query.json
    python perf/multi_query.py --device cpu --shapes 1x64 --lqs 1,2 --sparsities 0.7   # smoke run
    python perf/multi_query.py --shapes 1x32768 --lqs 4 --sparsities 0.7 --gathers walk,scatter

--gathers: each named Gluon gather forced (autotune.forced_config, one wave of programs: num_splits
-1, as perf/decode_gathers.py does) and timed as its own rows, instead of the library's choice.

Llama-3-8B attention (Hq=32, Hkv=8, D=128), fp16 (fp32 on the CPU), K and V at the same sparsity,
a full dense window of --window tokens; configs as a user gets them (the shipped tuning).
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import LLAMA3_8B, bench_us, environment, write_results  # noqa: E402 (repo first)

import mustafar_triton as mt  # noqa: E402
from mustafar_triton import autotune  # noqa: E402
from mustafar_triton.kernels.decode_gluon_launch import GLUON_CONFIG  # noqa: E402


def dense_us(q, k, v, lq: int, dev) -> float:
    """Best SDPA backend: Lq queries over all keys, query i sees keys < T - Lq + i + 1."""
    t = k.shape[2]
    mask = torch.ones(lq, t, dtype=torch.bool, device=dev).tril(t - lq)
    qd = q.transpose(1, 2)  # [B, Hq, Lq, D]
    best = float("inf")
    backends = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION) \
        if dev.type == "cuda" else (SDPBackend.MATH,)
    for backend in backends:
        try:
            with sdpa_kernel(backend):
                best = min(best, bench_us(lambda: torch.nn.functional.scaled_dot_product_attention(
                    qd, k, v, attn_mask=None if lq == 1 else mask, enable_gqa=True), dev))
        except RuntimeError:  # a backend that refuses the shape or the mask
            continue
    return best


def forced(gather: str):
    """The library's choice of config ("library"), or the Gluon config with `gather` forced, one wave."""
    if gather == "library":
        return contextlib.nullcontext()
    return autotune.forced_config("decode", dict(GLUON_CONFIG, gather=gather, num_splits=-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="multi_query.json")
    ap.add_argument("--shapes", default="16x16384,1x32768,64x4096", help="comma-separated BxT (T: compressed tokens)")
    ap.add_argument("--lqs", default="1,2,4,8")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--gathers", default="", help="Gluon gathers to force, comma-separated (default: the library's)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    m, w = LLAMA3_8B, args.window
    lqs = sorted({1} | {int(x) for x in args.lqs.split(",")})  # Lq = 1 first: the others are timed against it
    gathers = [g for g in args.gathers.split(",") if g] or ["library"]
    rows = []
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        k, v = (torch.randn(b, m.hkv, t, m.d, device=dev, dtype=dtype) for _ in range(2))
        k_win, v_win = (torch.randn(b, m.hkv, w, m.d, device=dev, dtype=dtype) for _ in range(2))
        k_all, v_all = torch.cat([k, k_win], 2), torch.cat([v, v_win], 2)
        for sparsity in map(float, args.sparsities.split(",")):
            pk, pv = mt.prune_and_pack(k, sparsity), mt.prune_and_pack(v, sparsity)
            for gather, lq in ((g, lq) for g in gathers for lq in lqs):
                q = torch.randn(b, lq, m.hq, m.d, device=dev, dtype=dtype)

                def call(q=q):
                    return mt.sparse_decode_attention(q, pk, pv, k_window=k_win, v_window=v_win)

                def one_token_calls(q=q, lq=lq):  # query i as its own step over the first w - lq + i + 1 window tokens
                    for i in range(lq):
                        end = w - lq + i + 1
                        mt.sparse_decode_attention(q[:, i], pk, pv, k_window=k_win[:, :, :end], v_window=v_win[:, :, :end])

                with forced(gather):
                    us = bench_us(call, dev)
                    if lq == 1:
                        one_token_us = us
                    calls_us = bench_us(one_token_calls, dev) if lq > 1 else us
                row = dict(batch=b, tokens=t, window=w, hq=m.hq, hkv=m.hkv, d=m.d, dtype=str(dtype).replace("torch.", ""),
                           sparsity=sparsity, gather=gather, lq=lq, us=us, vs_lq1=us / one_token_us,
                           lq_one_token_calls_us=calls_us, dense_us=dense_us(q, k_all, v_all, lq, dev))
                row["speedup_vs_dense"] = row["dense_us"] / us
                rows.append(row)
                print(f"{shape:>9s} s={sparsity:.2f} {gather:>8s} Lq={lq} {us:8.1f} us  {row['vs_lq1']:4.2f}x Lq=1  "
                      f"{row['lq_one_token_calls_us']:8.1f} us as {lq} calls  dense {row['dense_us']:8.1f} us", flush=True)
            write_results(Path(args.out), dict(environment(dev), window=w), rows)
            del pk, pv
        del k, v, k_win, v_win, k_all, v_all
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'shape':>9s} {'s':>4s} {'gather':>8s} " + " ".join(f"{'Lq=' + str(lq):>24s}" for lq in lqs))
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        for s, gather in ((s, g) for s in map(float, args.sparsities.split(",")) for g in gathers):
            cells = [next(f"{r['us']:7.1f} ({r['vs_lq1']:4.2f}x, {r['speedup_vs_dense']:4.2f}xd)" for r in rows
                          if (r["batch"], r["tokens"], r["sparsity"], r["gather"], r["lq"]) == (b, t, s, gather, lq))
                     for lq in lqs]
            print(f"{shape:>9s} {s:4.2f} {gather:>8s} " + " ".join(f"{c:>24s}" for c in cells))


if __name__ == "__main__":
    main()
