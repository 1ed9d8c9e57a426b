"""Shared-memory wavefronts of the scatter's per-value accesses, from a model of sm_90's banks
(32 banks of 4 bytes; a warp's 2-byte and 4-byte accesses in one phase, 8-byte ones per half-warp,
16-byte ones per quarter-warp; lanes touching the same 4-byte word share it; a phase takes as many
wavefronts as its most-loaded bank has distinct words), with kept channels drawn uniformly
(top-k of random data: each row keeps `capacity` of D channels, in ascending order).

    python perf/bank_model.py [--capacity 16] [--head-dim 128] [--rows 400]

Prints wavefronts per warp instruction for
  * the scatter's kept-value stores (decode_gluon._scatter_asm: lane l stores its r-th kept value
    into dense row l at _dense_row's offsets) -- Nsight Compute measured ~3.5 on the H200 (815d7b9),
    which calibrates the model;
  * the gathers of q^T rows that scoring K in the kept domain would issue (perf/NOTES.md,
    2026-12-07: lanes 2t / 2t + 1 take the slots [0, C/2) / [C/2, C) of token t's K row and load
    q^T[channel] for the G = 4 heads: 8 bytes in fp16, 16 in fp32).
"""
from __future__ import annotations

import argparse

import numpy as np

LANES = 32


def wavefronts(words: list[list[int]], phase: int) -> int:
    """Wavefronts of one warp instruction: words[l] = the 4-byte words lane l touches; lanes are
    served `phase` at a time."""
    total = 0
    for start in range(0, LANES, phase):
        banks: dict[int, set[int]] = {}
        for lane_words in words[start:start + phase]:
            for w in lane_words:
                banks.setdefault(w % 32, set()).add(w)
        total += max(len(s) for s in banks.values())
    return total


def kept_channels(rng, rows: int, head_dim: int, capacity: int) -> np.ndarray:
    """[rows, capacity] ascending kept channels, uniform."""
    return np.sort(np.stack([rng.choice(head_dim, capacity, replace=False) for _ in range(rows)]), axis=1)


def scatter_store_wavefronts(rng, head_dim: int, capacity: int, samples: int) -> float:
    """Mean over the scatter's `capacity` store instructions of `samples` tiles (lanes 0-15: K rows,
    16-31: V rows, one dense row each, _dense_row's pitch and 32-byte step every 8 rows)."""
    pitch, counts = 2 * head_dim + 16, []
    for _ in range(samples):
        ch = kept_channels(rng, LANES, head_dim, capacity)
        for r in range(capacity):
            counts.append(wavefronts([[(row * pitch + 32 * (row // 8) + 2 * int(ch[row, r])) // 4]
                                      for row in range(LANES)], LANES))
    return float(np.mean(counts))


def q_gather_wavefronts(rng, head_dim: int, capacity: int, samples: int, row_bytes: int) -> float:
    """Mean over the C / 2 q^T loads per lane and tile: lane 2t + h reads q^T[channel] (row_bytes
    per channel: 8 = G=4 fp16 heads, 16 = fp32) of token t's slot h C/2 + i."""
    phase = {8: 16, 16: 8}[row_bytes]
    counts = []
    for _ in range(samples):
        ch = kept_channels(rng, LANES // 2, head_dim, capacity)
        for i in range(capacity // 2):
            chans = [int(ch[lane // 2, (lane % 2) * (capacity // 2) + i]) for lane in range(LANES)]
            counts.append(wavefronts([[c * row_bytes // 4 + k for k in range(row_bytes // 4)] for c in chans], phase))
    return float(np.mean(counts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rows", type=int, default=400, help="sampled tiles")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    c, d = args.capacity, args.head_dim
    stores = scatter_store_wavefronts(rng, d, c, args.rows)
    print(f"scatter stores: {stores:.2f} wavefronts per instruction, {stores * c:.0f} per tile ({c} instructions)")
    for row_bytes, name in ((8, "fp16"), (16, "fp32")):
        q = q_gather_wavefronts(rng, d, c, args.rows, row_bytes)
        print(f"q^T gathers ({name}): {q:.2f} wavefronts per instruction, {q * c / 2:.0f} per tile ({c // 2} instructions)")


if __name__ == "__main__":
    main()
