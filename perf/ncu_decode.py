"""One decode call per variant, for Nsight Compute: run it under ncu to see each kernel's stall
reasons, occupancy and pipe use (the sweep only gives times).

    ncu --kernel-name regex:sparse_decode --section WarpStateStats --section Occupancy \\
        --section ComputeWorkloadAnalysis python perf/ncu_decode.py [--batch 16 --tokens 4096 --gathers walk,scatter]
"""
from __future__ import annotations

import argparse

import torch

import mustafar_triton as mt
from mustafar_triton import autotune
from mustafar_triton.kernels.decode_gluon_launch import GLUON_CONFIG


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--gathers", default="walk,popc,scatter", help="Gluon gathers, one call each (and 'tl')")
    args = ap.parse_args()
    torch.manual_seed(0)
    q = torch.randn(args.batch, 32, 128, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(args.batch, 8, args.tokens, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    pk, pv = mt.prune_and_pack(k, args.sparsity), mt.prune_and_pack(v, args.sparsity)
    tl = dict(BLOCK_N=64, num_warps=4, num_stages=2, num_splits=0, SLOTS="popc", maxnreg=128)
    for name in args.gathers.split(","):
        cfg = tl if name == "tl" else dict(GLUON_CONFIG, gather=name)
        with autotune.forced_config("decode", cfg):
            mt.sparse_decode_attention(q, pk, pv)
        torch.cuda.synchronize()
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
