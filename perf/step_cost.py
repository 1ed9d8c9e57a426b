"""What one decode step of a whole model costs in attention + cache work alone, without the model:
per layer, append one token and attend, for every layer, step after step, as an eager decode
loop does. Dense: a transformers-style growing cache (torch.cat) + SDPA. Mustafar: SparseKVCache
append + attend, eagerly and replayed as one CUDA graph per step.

    python perf/step_cost.py [--batches 1,16] [--context 4096] [--layers 30] [--steps 64]
                             [--heads 9,3,64] [--profile DIR] [--out perf/results/step_cost_h100.json]

The eager times are host-bound at small shapes (the GPU waits on Python); the CUDA-graph time is
the GPU's. Default shape: SmolLM2-135M (30 layers, 9 query / 3 kv heads, D=64), fp16.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import environment  # noqa: E402 (perf/ is on sys.path when run as a script)

from mustafar_triton import SparseKVCache  # noqa: E402


def dense_loop(layers, q, new, steps):
    """transformers' DynamicCache + SDPA: concatenate the new token, attend over everything."""
    caches = [list(kv) for kv in layers]
    for _ in range(steps):
        for kv in caches:
            kv[0] = torch.cat([kv[0], new], 2)
            kv[1] = torch.cat([kv[1], new], 2)
            F.scaled_dot_product_attention(q[:, :, None], kv[0], kv[1], enable_gqa=True)


def sparse_loop(caches, q, new, steps):
    for _ in range(steps):
        for cache in caches:
            cache.append(new, new)
            cache.attend(q)


def rewind(cache: SparseKVCache) -> None:
    """Set every sequence's window fill back to half the window (captured in the graph, so each
    replay appends into the same rows)."""
    cache.window_lens.fill_(cache.window // 2)


def timed(fn) -> float:
    """Wall seconds of fn() between two GPU syncs."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--heads", default="9,3,64", help="query heads, kv heads, head dim")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--profile", help="write a cProfile of each eager Mustafar loop to this folder")
    ap.add_argument("--out", default="perf/results/step_cost.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    hq, hkv, d = map(int, args.heads.split(","))
    rows = []
    for batch in map(int, args.batches.split(",")):
        gen = torch.Generator(device=dev).manual_seed(0)
        prompt = torch.randn(batch, hkv, args.context, d, device=dev, dtype=torch.float16, generator=gen)
        q = torch.randn(batch, hq, d, device=dev, dtype=torch.float16, generator=gen)
        new = torch.randn(batch, hkv, 1, d, device=dev, dtype=torch.float16, generator=gen)
        dense = [(prompt, prompt)] * args.layers
        dense_loop(dense, q, new, args.steps)  # warm-up: the identical loop
        t = timed(lambda: dense_loop(dense, q, new, args.steps))
        rows.append(dict(run="dense", mode="eager", batch=batch, ms_per_step=t * 1e3 / args.steps))
        for sparsity in (0.5, 0.7):
            name = f"K{sparsity}V{sparsity}"

            def fresh():
                caches = [SparseKVCache(batch, hkv, d, args.context + 2 * args.steps, args.window,
                                        sparsity, sparsity, dtype=torch.float16, device=dev)
                          for _ in range(args.layers)]
                for cache in caches:
                    cache.prefill(prompt, prompt)
                return caches
            sparse_loop(fresh(), q, new, args.steps)  # warm-up: the identical loop
            caches = fresh()
            t = timed(lambda: sparse_loop(caches, q, new, args.steps))
            rows.append(dict(run=name, mode="eager", batch=batch, ms_per_step=t * 1e3 / args.steps))
            if args.profile:
                caches = fresh()
                profiler = cProfile.Profile()
                profiler.runcall(lambda: sparse_loop(caches, q, new, args.steps))
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                (Path(args.profile) / f"step_cost_{name}_b{batch}.txt").write_text(text.getvalue())
            # The GPU's share: one step (every layer's append + attend) captured as a CUDA graph.
            # Each layer first rewinds its window fill, so replays repeat the same step; the flush
            # (every `chunk` steps) is not in the graph; attend sizes its splits on max_tokens.
            caches = fresh()
            for c in caches:
                c.append(new, new)  # flushes now, so the captured append does not
            step = lambda: [(rewind(c), c.append(new, new), c.attend(q, for_graph=True)) for c in caches]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            graph.replay()
            t = timed(lambda: [graph.replay() for _ in range(args.steps)])
            rows.append(dict(run=name, mode="cuda_graph", batch=batch, ms_per_step=t * 1e3 / args.steps))
        for r in rows[-5:]:
            print(json.dumps(r), flush=True)
    meta = dict(environment(dev), shape=dict(hq=hq, hkv=hkv, head_dim=d, layers=args.layers, context=args.context,
                                             steps=args.steps, window=args.window, dtype="fp16"))
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\n{'run':9s} {'mode':10s} {'batch':>5s} {'ms/step':>8s}")
    for r in rows:
        print(f"{r['run']:9s} {r['mode']:10s} {r['batch']:5d} {r['ms_per_step']:8.3f}")


if __name__ == "__main__":
    main()
