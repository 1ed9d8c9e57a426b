"""Host-side cost of one `sparse_decode_attention` call with its two kernel launches stubbed out:
argument checks, config lookup, split sizing and allocations. No GPU needed (CPU tensors).

    python perf/host_cost.py [--calls 2000] [--profile]

At small shapes this cost, plus two Triton launches, is the whole step (perf/NOTES.md).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the device checks

import torch  # noqa: E402

import mustafar_triton as mt  # noqa: E402
from mustafar_triton import attention  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="also print the top functions by own time")
    args = ap.parse_args()
    attention._sparse_decode_kernel = attention._merge_splits_kernel = _NoLaunch()
    q = torch.randn(1, 9, 64)
    k, v = torch.randn(2, 1, 3, 256, 64)
    pk, pv = mt.prune_and_pack(k, 0.5), mt.prune_and_pack(v, 0.5)
    kw, vw = torch.randn(2, 1, 3, 32, 64)
    window_lens = torch.tensor([5], dtype=torch.int32)
    call = lambda: mt.sparse_decode_attention(q, pk, pv, k_window=kw, v_window=vw, window_lens=window_lens)
    for _ in range(10):
        call()
    start = time.perf_counter()
    for _ in range(args.calls):
        call()
    print(f"sparse_decode_attention without launches: {(time.perf_counter() - start) / args.calls * 1e6:.1f} us per call")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [call() for _ in range(args.calls)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
