"""Demo: prune + pack a KV cache, run fused sparse decode attention, print error, compression, speed.

    python -m mustafar_triton.demo [--batch 16 --tokens 16384 --sparsity 0.7]

On a machine without CUDA it re-runs itself under the Triton CPU interpreter at a small size.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # TRITON_INTERPRET is read when triton is imported (already done by the package): start afresh.
    os.environ["TRITON_INTERPRET"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "mustafar_triton.demo", *sys.argv[1:]])

import mustafar_triton as mt  # noqa: E402
from mustafar_triton import reference  # noqa: E402
from mustafar_triton._timing import gpu_time_ms  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16 if gpu else 2)
    ap.add_argument("--tokens", type=int, default=16384 if gpu else 200)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.7)
    args = ap.parse_args()
    dev = torch.device("cuda" if gpu else "cpu")
    gen = torch.Generator(device=dev).manual_seed(0)
    b, t, w, d = args.batch, args.tokens, args.window, args.head_dim
    print(f"device: {torch.cuda.get_device_name() if gpu else 'CPU (Triton interpreter)'}; "
          f"B={b} T={t} window={w} Hq={args.q_heads} Hkv={args.kv_heads} D={d} fp16 "
          f"K{args.sparsity}V{args.sparsity}")

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.float16, generator=gen)

    q = randn(b, args.q_heads, d)
    k, v = randn(b, args.kv_heads, t, d), randn(b, args.kv_heads, t, d)
    k_win, v_win = randn(b, args.kv_heads, w, d), randn(b, args.kv_heads, w, d)

    start = time.perf_counter()
    packed_k, packed_v = mt.prune_and_pack(k, args.sparsity), mt.prune_and_pack(v, args.sparsity)
    if gpu:
        torch.cuda.synchronize()
    print(f"prune_and_pack K and V: {time.perf_counter() - start:.3f} s (first call includes compilation)")
    dense_bytes = 2 * k.numel() * k.element_size()
    packed_bytes = packed_k.nbytes + packed_v.nbytes
    print(f"compressed cache: {packed_bytes / 2**20:.1f} MiB vs dense {dense_bytes / 2**20:.1f} MiB "
          f"({packed_bytes / dense_bytes:.1%}); {mt.kept_per_token(d, args.sparsity)} of {d} values kept per token")

    out = mt.sparse_decode_attention(q, packed_k, packed_v, k_window=k_win, v_window=v_win)
    ref = reference.sparse_decode_attention(q, packed_k, packed_v, k_window=k_win, v_window=v_win)
    same_dtype = reference.sparse_decode_attention(q, packed_k, packed_v, k_window=k_win, v_window=v_win,
                                                   compute_dtype=torch.float16)
    print(f"decode attention rel. error vs float64 on the same pruned cache: {rel_err(out, ref):.2e} "
          f"(fp16 torch: {rel_err(same_dtype, ref):.2e})")
    dense_out = reference.sparse_decode_attention(q, mt.pack(k), mt.pack(v), k_window=k_win, v_window=v_win)
    print(f"effect of pruning itself on this random data (vs unpruned float64 attention): "
          f"{rel_err(out, dense_out):.2e}; on real models see the README (accuracy column) and perf/NOTES.md")

    if gpu:
        # GPU time per call, L2 flushed before each call, host excluded (_timing.py)
        sparse_us = gpu_time_ms(
            lambda: mt.sparse_decode_attention(q, packed_k, packed_v, k_window=k_win, v_window=v_win)) * 1e3
        kk, vv = torch.cat([k, k_win], 2), torch.cat([v, v_win], 2)
        dense_us = gpu_time_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, enable_gqa=True)) * 1e3
        print(f"decode step: sparse {sparse_us:.1f} us, dense SDPA {dense_us:.1f} us "
              f"(speedup {dense_us / sparse_us:.2f}x)")
    else:
        start = time.perf_counter()
        mt.sparse_decode_attention(q, packed_k, packed_v, k_window=k_win, v_window=v_win)
        print(f"decode step under the interpreter: {time.perf_counter() - start:.2f} s "
              "(CPU emulation; run on a GPU for real speed)")


if __name__ == "__main__":
    main()
