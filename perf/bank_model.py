"""Shared-memory wavefronts of the scatter's per-value accesses, from a model of sm_90's banks
(32 banks of 4 bytes; a warp's 2-byte and 4-byte accesses in one phase, 8-byte ones per half-warp,
16-byte ones per quarter-warp; lanes touching the same 4-byte word share it; a phase takes as many
wavefronts as its most-loaded bank has distinct words), with kept channels drawn uniformly
(top-k of random data: each row keeps `capacity` of D channels, in ascending order).

    python perf/bank_model.py [--capacity 16] [--head-dim 128] [--rows 400]
    python perf/bank_model.py --walk --capacity 40 [--kept 38] [--rows 100]

Prints wavefronts per warp instruction for
  * the scatter's kept-value stores (decode_gluon._scatter_asm: lane l stores its r-th kept value
    into dense row l at _dense_row's offsets) -- Nsight Compute measured ~3.5 on the H200 (815d7b9),
    which calibrates the model;
  * the gathers of q^T rows that scoring K in the kept domain would issue (perf/NOTES.md,
    2026-12-07: lanes 2t / 2t + 1 take the slots [0, C/2) / [C/2, C) of token t's K row and load
    q^T[channel] for the G = 4 heads: 8 bytes in fp16, 16 in fp32).
--walk instead: the walk's 2-byte value loads (decode_gluon._walk_asm), per warp instruction and
their excess over one wavefront per tile, for the lanes' channels as the walk owns them (K: 4 lanes
per token, 8 tokens an instruction; V: 8 lanes per token, 4 tokens; each lane a run of consecutive
channels) and for runs split into interleaved chunks of 8 / 4 channels (lane k of a token owning
chunks k, k + lanes, ...), a layout not built (perf/NOTES.md, 2026-12-07 late). Those lines model
the walk before 35d1ce4, whose lanes skipped the channels their row does not keep (predicated
loads): Nsight Compute measured its bank conflicts at ~86 wavefronts per tile at capacity 40 and
~163 at 64 (H100, 93112bf / 1c9b062), which calibrates this part. Since 35d1ce4 those lanes read
one shared zero word instead (mt_zero): the last lines add that word, in a bank of its own choosing
(ptxas places mt_zero; the model takes bank 28).
"""
from __future__ import annotations

import argparse

import numpy as np

import common  # noqa: F401 (puts the repository first on sys.path)
from mustafar_triton.kernels.decode_gluon_launch import staged_row_pitch  # noqa: E402

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


def walk_load_wavefronts(rng, head_dim: int, capacity: int, kept: int, samples: int, k_side: bool,
                         chunk: int = 0, zero_word: int | None = None) -> float:
    """Mean wavefronts per value load of the walk over `samples` tiles (a load with no lane active
    counts 0): the 16 value rows at the stage's row pitch, each keeping `kept` of head_dim channels
    in `capacity` slots; lane l reads its token's row at the slot of its j-th channel, or for a
    channel its row does not keep nothing (predicated) or, given zero_word, that word (mt_zero).
    chunk 0: each lane owns head_dim / lanes_per_token consecutive
    channels (the walk); else chunks of `chunk` channels dealt round-robin to the token's lanes."""
    per_token = 4 if k_side else 8
    run = head_dim // per_token
    step = chunk or run
    own = [[c for base in range(k * step, head_dim, step * per_token) for c in range(base, base + step)]
           for k in range(per_token)]
    pitch = staged_row_pitch(2 * capacity)
    skip = [] if zero_word is None else [zero_word]  # what a lane reads for a channel its row drops
    counts = []
    for _ in range(samples):
        bits = np.zeros((16, head_dim), bool)
        for t in range(16):
            bits[t, rng.choice(head_dim, kept, replace=False)] = True
        slot = np.cumsum(bits, axis=1) - bits
        for group in range(2 if k_side else 4):  # the instructions' token sets
            for j in range(run):
                words = []
                for lane in range(LANES):
                    t = (lane // 4 + 8 * group) if k_side else (2 * (lane % 4) + group % 2 + 8 * (group // 2))
                    c = own[lane % 4 if k_side else lane // 4][j]
                    words.append([(t * pitch + 2 * int(slot[t, c])) // 4] if bits[t, c] else skip)
                counts.append(wavefronts(words, LANES) if any(words) else 0)
    return float(np.mean(counts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rows", type=int, default=400, help="sampled tiles")
    ap.add_argument("--walk", action="store_true", help="the walk's value loads instead")
    ap.add_argument("--kept", type=int, default=0,
                    help="--walk: kept channels per row (default: capacity - 2, as sparsity 0.7 keeps 38 in 40)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    c, d = args.capacity, args.head_dim
    if args.walk:
        excess = 0.0  # the walk's (runs'): each lane issues d / 2 loads per side and tile
        for k_side in (True, False):
            for chunk in (0, 8, 4):
                w = walk_load_wavefronts(rng, d, c, args.kept or c - 2, args.rows, k_side, chunk)
                name = ("K" if k_side else "V") + (f", chunks of {chunk}" if chunk else ", runs (the walk)")
                print(f"walk loads {name}: {w:.2f} wavefronts per instruction")
                if chunk == 0:
                    excess += (w - 1) * d / 2
        print(f"walk conflicts (runs): {excess:.0f} wavefronts per tile over one per load")
        zero_excess = 0.0  # the same runs with the unkept channels' reads of mt_zero (since 35d1ce4)
        for k_side in (True, False):
            w = walk_load_wavefronts(rng, d, c, args.kept or c - 2, args.rows, k_side, zero_word=-4)
            print(f"walk loads {'K' if k_side else 'V'}, runs, unkept channels read mt_zero: {w:.2f} wavefronts per instruction")
            zero_excess += (w - 1) * d / 2
        print(f"walk conflicts (runs, mt_zero reads): {zero_excess:.0f} wavefronts per tile over one per load")
        return
    stores = scatter_store_wavefronts(rng, d, c, args.rows)
    print(f"scatter stores: {stores:.2f} wavefronts per instruction, {stores * c:.0f} per tile ({c} instructions)")
    for row_bytes, name in ((8, "fp16"), (16, "fp32")):
        q = q_gather_wavefronts(rng, d, c, args.rows, row_bytes)
        print(f"q^T gathers ({name}): {q:.2f} wavefronts per instruction, {q * c / 2:.0f} per tile ({c // 2} instructions)")


if __name__ == "__main__":
    main()
