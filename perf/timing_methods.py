"""One decode config timed every way we know, repeated in one process: is a time the kernel's or
the state it runs in? (Written for the B=1 timings that looked bimodal, perf/NOTES.md.) Per
repeat, for the decode config and for dense cuDNN SDPA: the do_bench median (L2 flushed, events
recorded from the host), the GPU time of _timing.gpu_time_ms (L2 flushed, host excluded), a
CUDA-graph replay of the decode call (warm L2), and the decode's per-kernel GPU times from
torch.profiler (back to back, warm). Writes JSON and prints one line per repeat.

    python perf/timing_methods.py --out perf/results/b1_repeat_h100.json [--batch 1 --tokens 32768]
        [--config BLOCK_N=64,num_warps=4,num_stages=2,num_splits=-4,SLOTS=popc,maxnreg=128]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import triton.testing

from common import environment, write_results  # noqa: E402 (puts the repo first)

import mustafar_triton as mt  # noqa: E402
from mustafar_triton import autotune  # noqa: E402
from mustafar_triton._timing import gpu_time_ms  # noqa: E402


def do_bench_us(fn) -> float:
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def kernel_times_us(fn, calls: int = 20) -> dict:
    """Mean GPU time per call of each kernel fn launches, from torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key[:60]: e.device_time_total / calls for e in prof.key_averages() if e.device_time_total > 0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="timing_methods.json")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--config", default="BLOCK_N=64,num_warps=4,num_stages=2,num_splits=-4,SLOTS=popc,maxnreg=128")
    args = ap.parse_args()
    cfg = {k: (v if v.isalpha() else int(v)) for k, v in (kv.split("=") for kv in args.config.split(","))}
    torch.manual_seed(0)
    dev = torch.device("cuda")
    q = torch.randn(args.batch, 32, 128, device=dev, dtype=torch.float16)
    k, v = (torch.randn(args.batch, 8, args.tokens, 128, device=dev, dtype=torch.float16) for _ in range(2))
    pk, pv = mt.prune_and_pack(k, 0.7), mt.prune_and_pack(v, 0.7)
    q4 = q[:, :, None, :]

    def sparse():
        with autotune.forced_config("decode", cfg):
            return mt.sparse_decode_attention(q, pk, pv)

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    rows = []
    for rep in range(args.repeats):
        row = dict(rep=rep, sparse_do_bench_us=do_bench_us(sparse), dense_do_bench_us=do_bench_us(dense),
                   sparse_gpu_us=1e3 * gpu_time_ms(sparse), dense_gpu_us=1e3 * gpu_time_ms(dense),
                   sparse_warm_graph_us=1e3 * gpu_time_ms(sparse, flush_l2=False))
        row["sparse_kernels_us"] = kernel_times_us(sparse)
        rows.append(row)
        kernels = ", ".join(f"{name[:28]} {us:.1f}" for name, us in row["sparse_kernels_us"].items())
        print(f"rep {rep}: do_bench sparse {row['sparse_do_bench_us']:.1f} dense {row['dense_do_bench_us']:.1f} | "
              f"gpu_time sparse {row['sparse_gpu_us']:.1f} dense {row['dense_gpu_us']:.1f} | "
              f"warm graph sparse {row['sparse_warm_graph_us']:.1f} | {kernels} (us)", flush=True)
    write_results(Path(args.out), dict(environment(dev), config=cfg, batch=args.batch, tokens=args.tokens,
                                             sparsity=0.7), rows)


if __name__ == "__main__":
    main()
