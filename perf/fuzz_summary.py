"""Adds up GPU fuzz records (tests/test_gpu_fuzz.py's MUSTAFAR_FUZZ_RECORD files: one per pytest-xdist
worker, from one or several runs) per kernel: cases, failed cases, seconds, and every shard with its
seed, so a run's counts fit in one file. Prints a table; --out writes the merged JSON.

    python perf/fuzz_summary.py OUT/gpu_fuzz-all.json.gw* --out perf/results/h200/gpu_fuzz_<commit>.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def merge(paths: list[Path]) -> dict:
    kernels = defaultdict(lambda: dict(cases=0, failed_cases=0, seconds=0.0, wall_seconds=0.0, shards=[]))
    runs = {}
    for path in sorted(paths):
        record = json.loads(path.read_text())
        run = (record["seed"], record["shards"], record["max_examples"])
        runs[run] = {k: record.get(k) for k in ("seed", "shards", "max_examples", "examples_per_shard", "gpu",
                                                "device", "triton", "torch", "commit")}
        for name, tally in record["kernels"].items():
            total = kernels[name]
            total["cases"] += tally["cases"]
            total["failed_cases"] += tally["failed_cases"]
            total["seconds"] = round(total["seconds"] + tally["seconds"], 1)
            total["wall_seconds"] = round(total["wall_seconds"] + tally["wall_seconds"], 1)
            total["shards"] += [dict(shard=int(s), worker_file=path.name, **info) for s, info in tally["shards"].items()]
    return dict(runs=list(runs.values()), files=[p.name for p in sorted(paths)], kernels=dict(kernels))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    merged = merge(args.records)
    if args.out:
        args.out.write_text(json.dumps(merged, indent=1))
    # wall seconds add up over the workers that ran a kernel's shards: a rate per worker-second
    print(f"{'kernel':16} {'cases':>8} {'failed':>7} {'case s':>8} {'per worker-s':>12}")
    for name, t in sorted(merged["kernels"].items()):
        rate = t["cases"] / t["wall_seconds"] if t["wall_seconds"] else 0.0
        print(f"{name:16} {t['cases']:8d} {t['failed_cases']:7d} {t['seconds']:8.1f} {rate:12.1f}")


if __name__ == "__main__":
    main()
