"""Every Gluon decode gather across sparsities, in one run on the same data: GPU time per call
against dense SDPA (best backend) and the byte bound (packed bytes / copy bandwidth), plus each
gather's output checked against the others' at every point. Writes JSON (meta + rows) and prints a
table. Optionally a second copy of decode_gluon.py (an older commit's, --baseline FILE) runs as
gather "base-walk" / "base-popc", so a change is measured against its parent in the same run.

    python perf/decode_gathers.py --out perf/results/h200/decode_gathers.json
    python perf/decode_gathers.py --baseline .gen/decode_gluon_base.py --shapes 16x16384 --sparsities 0.7
    python perf/decode_gathers.py --baseline old.py --baseline other.py --baseline-gathers scatter --gathers scatter
    python perf/decode_gathers.py --dtype bf16 --exact-weights   # each gather also as <gather>-exact
    python perf/decode_gathers.py --fp8 --gathers walk --baseline old.py --dtype bf16 --sparsities 0.375,0.7

Shapes are B x T of the Llama-3-8B attention (Hq=32, Hkv=8, D=128), fp16 (--dtype bf16), K and V at the same
sparsity, no window (--window N: N dense recent tokens besides the T compressed ones, as a cache
serves them; dense SDPA then attends T + N tokens); --fp8: kept values in fp8 (e4m3, value scale 1;
only the walks read them). Configs are forced (autotune.forced_config), one wave of programs
(num_splits=-1; --num-splits) for every gather.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import (LLAMA3_8B, bench_us, copy_bandwidth, decode_inputs, environment,  # noqa: E402 (repo first)
                    load_kernel_copy, write_results)

import mustafar_triton as mt  # noqa: E402
from mustafar_triton import attention, autotune  # noqa: E402
from mustafar_triton.kernels.decode_gluon_launch import GATHERS, GLUON_CONFIG  # noqa: E402

SHAPES = ("1x32768", "16x16384", "64x4096", "4x131072")
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)


def load_baseline(path: Path):
    """The kernel of another copy of decode_gluon.py (its relative imports made absolute), wrapped
    to take this launcher's GATHER argument (older copies took WALK)."""
    kernel = load_kernel_copy(path)._sparse_decode_gluon_kernel
    takes_walk = "WALK" in kernel.arg_names

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, GATHER, **kwargs):
                if takes_walk:
                    kwargs["WALK"] = GATHER == "walk"
                else:
                    kwargs["GATHER"] = GATHER
                return kernel[grid](*args, **kwargs)
            return launch
    return Launcher()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="decode_gathers.json")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated BxT")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--gathers", default=",".join(GATHERS))
    ap.add_argument("--baseline", type=Path, action="append", default=[],
                    help="another decode_gluon.py, timed as base-<gather> (repeatable: <file stem>-<gather>)")
    ap.add_argument("--baseline-gathers", default="walk")
    ap.add_argument("--window", type=int, default=0, help="dense recent tokens beside the compressed ones")
    ap.add_argument("--num-splits", type=int, default=GLUON_CONFIG["num_splits"],
                    help="splits for every gather (-k: k waves of programs)")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"), help="the queries' and caches' dtype")
    ap.add_argument("--fp8", action="store_true", help="kept values in fp8 (e4m3): the walks only")
    ap.add_argument("--exact-weights", action="store_true",
                    help="also time each gather with sparse_decode_attention's exact_weights (as <gather>-exact)")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bw = copy_bandwidth(dev, 2**30)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    own_kernel = attention._sparse_decode_gluon_kernel
    variants = [(g, g, own_kernel, False) for g in args.gathers.split(",")]
    if args.exact_weights:
        variants += [(f"{g}-exact", g, own_kernel, True) for g in args.gathers.split(",")]
    for path in args.baseline:
        base = load_baseline(path)
        prefix = "base" if len(args.baseline) == 1 else path.stem
        variants += [(f"{prefix}-{g}", g, lambda base=base: base, False) for g in args.baseline_gathers.split(",")]
    fmt = dict(value_dtype=torch.float8_e4m3fn) if args.fp8 else {}  # how prune_and_pack stores kept values
    m = LLAMA3_8B
    meta = dict(environment(dev), copy_bandwidth_Bps=bw, gathers=[v[0] for v in variants], num_splits=args.num_splits,
                baseline=[str(p) for p in args.baseline] or None, window=args.window, dtype=args.dtype,
                fp8_values=args.fp8)
    rows = []
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        q, k_all, v_all, base_row = decode_inputs(m, b, t + args.window, dev, dtype)
        base_row.update(tokens=t, window=args.window)  # T compressed tokens (+ the window)
        k, v = k_all[:, :, :t].contiguous(), v_all[:, :, :t].contiguous()
        windows = {}
        if args.window:
            windows = dict(k_window=k_all[:, :, t:].contiguous(), v_window=v_all[:, :, t:].contiguous())
        dense_bytes = 2 * k_all.numel() * 2
        best_dense = float("inf")
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    us = bench_us(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q[:, :, None], k_all, v_all, enable_gqa=True), dev)
            except RuntimeError as err:  # a backend that refuses the shape
                print(f"{shape} sdpa {name}: {str(err)[:80]}", flush=True)
                continue
            best_dense = min(best_dense, us)
            rows.append(dict(base_row, kind="dense", variant=name, us=us, bytes=dense_bytes))
        for sparsity in map(float, args.sparsities.split(",")):
            pk, pv = mt.prune_and_pack(k, sparsity, **fmt), mt.prune_and_pack(v, sparsity, **fmt)
            nbytes = pk.nbytes + pv.nbytes + sum(w.numel() * w.element_size() for w in windows.values())
            byte_bound_us = nbytes / bw * 1e6
            outs = {}
            for label, gather, kernel, exact in variants:
                attention._sparse_decode_gluon_kernel = kernel
                try:
                    with autotune.forced_config("decode", dict(GLUON_CONFIG, gather=gather, num_splits=args.num_splits)):
                        outs[label] = mt.sparse_decode_attention(q, pk, pv, exact_weights=exact, **windows).float()
                        us = bench_us(lambda: mt.sparse_decode_attention(q, pk, pv, exact_weights=exact, **windows), dev)
                finally:
                    attention._sparse_decode_gluon_kernel = own_kernel
                diff = max((outs[label] - o).abs().max().item() for o in outs.values())
                rows.append(dict(base_row, kind="sparse", variant=label, sparsity=sparsity, us=us, bytes=nbytes,
                                 byte_bound_us=byte_bound_us, dense_us=best_dense, speedup=best_dense / us,
                                 max_abs_diff_vs_other_gathers=diff))
                print(f"{shape:>9s} s={sparsity:.2f} {label:17s} {us:8.1f} us  {best_dense / us:5.2f}x dense"
                      f"  bound {byte_bound_us:6.1f} us  diff {diff:.1e}", flush=True)
            del pk, pv
            write_results(Path(args.out), meta, rows)  # after every point: a run cut short keeps them
        del q, k, v, k_all, v_all, windows
        torch.cuda.empty_cache()
    print(f"\n{'shape':>9s} {'dense':>7s} " + " ".join(f"{s:>22s}" for s in args.sparsities.split(",")))
    labels = [v[0] for v in variants]
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        sel = [r for r in rows if r["batch"] == b and r["tokens"] == t]
        dense = min(r["us"] for r in sel if r["kind"] == "dense")
        for label in labels:
            cells = []
            for s in map(float, args.sparsities.split(",")):
                r = next((r for r in sel if r.get("variant") == label and r.get("sparsity") == s), None)
                cells.append(f"{r['us']:7.1f} ({r['speedup']:4.2f}x)" if r else "-")
            print(f"{shape:>9s} {dense:7.1f} {label:>17s} " + " ".join(f"{c:>18s}" for c in cells))


if __name__ == "__main__":
    main()
