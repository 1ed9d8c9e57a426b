"""Host-side cost of one `sparse_decode_attention` call and of one `SparseKVCache.attend`: by
default with their two kernel launches stubbed out (argument checks, config lookup, split sizing,
allocations and _fast_launch's path to the compiled launcher; no GPU needed, CPU tensors); with
--gpu, on a GPU with the real launches, at a shape whose kernels take a few microseconds, so the
loop measures the host (the GPU never makes it wait).

    python perf/host_cost.py [--calls 2000] [--profile] [--gpu]

At small shapes this cost, plus two Triton launches, is the whole step (perf/NOTES.md).
"""
from __future__ import annotations

import argparse
import cProfile
import inspect
import os
import pstats
import statistics
import time
from types import SimpleNamespace

import sys

if "--gpu" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the device checks

import torch  # noqa: E402

import mustafar_triton as mt  # noqa: E402
from mustafar_triton import attention  # noqa: E402


def host_us(fn, calls: int, gpu: bool, rounds: int = 10) -> float:
    """Median over `rounds` rounds of calls / rounds calls each (a round with a garbage collection
    of the interpreter's objects would otherwise move a mean by tens of us)."""
    for _ in range(10):
        fn()
    per_round = []
    for _ in range(rounds):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(max(1, calls // rounds)):
            fn()
        per_round.append((time.perf_counter() - start) / max(1, calls // rounds))
    if gpu:
        torch.cuda.synchronize()
    return statistics.median(per_round) * 1e6


class _StubKernel:
    """A kernel's stand-in: a launch runs nothing and returns a compiled-kernel stand-in, so the
    launches after the first take _fast_launch's path to the compiled launcher, as on a GPU."""

    def __init__(self, kernel):
        # the interpreter's function has no JIT params: the signature gives the same names
        sig = inspect.signature(kernel.fn)
        self.params = [SimpleNamespace(name=p.name, default=p.default) for p in sig.parameters.values()]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _StubCompiled()


class _StubCompiled:
    packed_metadata = None

    def __getitem__(self, grid):
        return lambda *args, stream=None: None


def stub_launches(cache: bool = False) -> None:
    """Replace the decode and merge kernels (and with cache, SparseKVCache's own: prefill's prune
    kernel, append's and the flush's) by stand-ins, so the host path runs on CPU tensors (perf/layer_host.py
    uses it too)."""
    attention._sparse_decode_kernel = _StubKernel(attention._sparse_decode_kernel)
    attention._merge_splits_kernel = _StubKernel(attention._merge_splits_kernel)
    if cache:
        from mustafar_triton import cache as cache_module, compress
        compress._select_kernel = _StubKernel(compress._select_kernel)
        cache_module._append_token_kernel = _StubKernel(cache_module._append_token_kernel)
        cache_module._flush_kernel = _StubKernel(cache_module._flush_kernel)
    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):  # a CPU-only torch build
        torch._C._cuda_getCurrentRawStream = lambda index: 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="also print the top functions by own time")
    ap.add_argument("--gpu", action="store_true", help="real launches on the GPU instead of stubs")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                    help="float16: the Gluon decode kernel on a GPU (float32: the tl kernel)")
    ap.add_argument("--jit-launches", action="store_true",
                    help="every launch through the JIT (as before _fast_launch), for comparison")
    args = ap.parse_args()
    dev = torch.device("cuda" if args.gpu else "cpu")
    if args.jit_launches:
        from mustafar_triton import _fast_launch
        _fast_launch.CompiledLauncher._keep = lambda *_: None
    if not args.gpu:
        stub_launches()
    dtype = getattr(torch, args.dtype)
    q = torch.randn(1, 9, 64, device=dev, dtype=dtype)
    k, v = torch.randn(2, 1, 3, 256, 64, device=dev, dtype=dtype)
    pk, pv = mt.prune_and_pack(k, 0.5), mt.prune_and_pack(v, 0.5)
    kw, vw = torch.randn(2, 1, 3, 32, 64, device=dev, dtype=dtype)
    window_lens = torch.tensor([5], dtype=torch.int32, device=dev)
    call = lambda: mt.sparse_decode_attention(q, pk, pv, k_window=kw, v_window=vw, window_lens=window_lens)
    # the same shape as one layer's cache (empty: the host path does not depend on the contents)
    cache = mt.SparseKVCache(1, 3, 64, 256, 32, 0.5, 0.5, dtype=q.dtype, device=dev)
    attend = lambda: cache.attend(q)
    what = "with its two launches (GPU)" if args.gpu else "without launches"
    for name, fn in (("sparse_decode_attention", call), ("SparseKVCache.attend", attend)):
        print(f"{name} {what}: {host_us(fn, args.calls, args.gpu):.1f} us of host time per call")
    if args.gpu:  # for scale: dense SDPA over the same tokens, unpruned
        kk, vv = torch.cat([k, kw], 2), torch.cat([v, vw], 2)
        dense = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, enable_gqa=True)
        print(f"dense SDPA (same tokens): {host_us(dense, args.calls, True):.1f} us of host time per call")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [call() for _ in range(args.calls)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
