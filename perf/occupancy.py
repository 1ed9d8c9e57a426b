"""How many one-warp programs of the Gluon decode kernel an SM really keeps resident, against the
launcher's plan (decode_gluon_launch.programs_per_sm): the CUDA occupancy API asked about the
compiled kernel (GPU only). perf/NOTES.md, 2026-12-05: they agreed at every capacity on the H100 and
the H200; what made plans of 13-14 scatter programs slow was their uneven spread over an SM's 4
schedulers (the launcher now plans 12 there).

    python perf/occupancy.py [--gathers scatter,walk] [--capacities 16,24,32,40,48,64] [--head-dim 128]
"""
from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sass_report  # noqa: E402 (perf/, beside this file)

from mustafar_triton._runtime import sm_shared_bytes  # noqa: E402
from mustafar_triton.kernels.decode_gluon_launch import gluon_block_h, programs_per_sm, shared_bytes  # noqa: E402


def resident_programs(kernel) -> int:
    """cuOccupancyMaxActiveBlocksPerMultiprocessor for a compiled one-warp kernel."""
    kernel._init_handles()  # loads the module into the current context
    libcuda = ctypes.CDLL("libcuda.so.1")
    blocks = ctypes.c_int()
    err = libcuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(blocks), ctypes.c_void_p(kernel.function), ctypes.c_int(32), ctypes.c_size_t(kernel.metadata.shared))
    if err:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed: CUresult {err}")
    return blocks.value


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gathers", default="scatter,walk")
    ap.add_argument("--capacities", default="16,24,32,40,48,64")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4)
    args = ap.parse_args()
    torch.zeros(1, device="cuda")  # a current CUDA context
    sm_shared = sm_shared_bytes(torch.device("cuda"))  # as the launcher plans
    print(f"{torch.cuda.get_device_name()}: {sm_shared} bytes of shared memory per SM")
    print(f"{'gather':>8s} {'cap':>4s} {'shared':>7s} {'planned':>8s} {'resident':>9s}")
    for gather in args.gathers.split(","):
        for cap in map(int, args.capacities.split(",")):
            kernel = sass_report.compile_decode(sass_report.parser().parse_args(
                ["--kernel", "gluon", "--gather", gather, "--capacity", str(cap), "--head-dim", str(args.head_dim),
                 "--group", str(args.group)]))
            shared = shared_bytes(gather, args.head_dim, cap, cap)
            planned = programs_per_sm(args.head_dim, gluon_block_h(args.group), gather, shared, sm_shared)
            resident = resident_programs(kernel)
            # fewer planned than resident: the scatter's balanced plan (decode_gluon_launch.programs_per_sm)
            flag = "" if planned == resident else ("   <- more planned than resident" if planned > resident
                                                   else "   (balanced over the 4 schedulers)")
            print(f"{gather:>8s} {cap:4d} {shared:7d} {planned:8d} {resident:9d}{flag}", flush=True)


if __name__ == "__main__":
    main()
