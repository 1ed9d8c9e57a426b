"""What SparseKVCache's window flush costs on the GPU, beside the per-step work it amortizes over.

Every `chunk` appends, SparseKVCache.append first flushes (kernels/window_flush.py: one program per
sequence, kv head and side prunes + packs the chunk into the store and shifts the window). This
times, per shape (batch, kv heads, head dim) at one context:
  flush_us     one flush launch (the window full, every sequence moving `chunk` tokens);
  per_step_us  flush_us / chunk: its share of every decode step;
  append_us    one token's append (the launch of every step);
  attend_us    one decode call of the cache (query heads = 4 x kv heads, as Llama-3-8B's group).
GPU times from CUDA-graph replays with the L2 flushed before each call (mustafar_triton._timing);
the flush graph restores both lengths before each launch, so every replay moves the same chunk,
and the restore alone is subtracted. On the CPU (interpreter) the script runs a small shape once
and times with perf_counter (a smoke run: the numbers say nothing about a GPU).

    python perf/flush_cost.py [--shapes 1x8x128,16x8x128,64x8x128] [--context 4096] [--window 32]
                              [--sparsity 0.7] [--out perf/results/flush_cost.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import bench_us, environment  # noqa: E402 (perf/ is on sys.path when run as a script)

from mustafar_triton import SparseKVCache  # noqa: E402


def measure(batch: int, hkv: int, d: int, context: int, window: int, sparsity: float, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    k, v = (torch.randn(batch, hkv, context, d, device=device, dtype=torch.float16, generator=gen) for _ in range(2))
    q = torch.randn(batch, 4 * hkv, d, device=device, dtype=torch.float16, generator=gen)
    new = torch.randn(batch, hkv, 1, d, device=device, dtype=torch.float16, generator=gen)
    cache = SparseKVCache(batch, hkv, d, context + 4 * window, window, sparsity, sparsity,
                          dtype=torch.float16, device=device)
    cache.prefill(k, v)
    while cache._max_window < cache.sinks + cache.window:  # fill the window: the next append flushes
        cache.append(new, new)
    full = (cache.window_lens.clone(), cache.seq_lens.clone())
    cache._flush()  # binds the launch

    def restore():
        cache.window_lens.copy_(full[0])
        cache.seq_lens.copy_(full[1])

    def flush():
        restore()
        cache._flush()

    flush_us = max(bench_us(flush, device) - bench_us(restore, device), 0.0)
    flush()  # a consistent state again: chunk tokens moved, the window half full
    before = cache.window_lens.clone()

    def append():
        cache.append(new, new)
        cache.window_lens.copy_(before)

    append_us = max(bench_us(append, device) - bench_us(lambda: cache.window_lens.copy_(before), device), 0.0)
    attend_us = bench_us(lambda: cache.attend(q, for_graph=device.type == "cuda"), device)
    return dict(batch=batch, hkv=hkv, hq=4 * hkv, d=d, context=context, window=window, chunk=cache.chunk,
                sparsity=sparsity, flush_us=flush_us, per_step_us=flush_us / cache.chunk, append_us=append_us,
                attend_us=attend_us)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="batch x kv heads x head dim, comma separated "
                    "(default 1x8x128,16x8x128,64x8x128,16x3x64 on a GPU, 2x2x32 on the CPU)")
    ap.add_argument("--context", type=int, default=None, help="tokens per sequence (default 4096; CPU 48)")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--out", default="perf/results/flush_cost.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    shapes = args.shapes or ("1x8x128,16x8x128,64x8x128,16x3x64" if on_gpu else "2x2x32")
    context = args.context or (4096 if on_gpu else 48)
    rows = []
    for spec in shapes.split(","):
        batch, hkv, d = map(int, spec.split("x"))
        rows.append(measure(batch, hkv, d, context, args.window, args.sparsity, device))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(dict(meta=environment(device), rows=rows), indent=1))
    print(f"\n{'B x Hkv x D':>12s} {'flush us':>9s} {'per step':>9s} {'append':>7s} {'attend':>7s}")
    for r in rows:
        print(f"{r['batch']:>4d}x{r['hkv']}x{r['d']:<5d} {r['flush_us']:9.1f} {r['per_step_us']:9.2f} "
              f"{r['append_us']:7.1f} {r['attend_us']:7.1f}")


if __name__ == "__main__":
    main()
