"""Append one decode token to every sequence's dense window: SparseKVCache.append's eager step.

One program per sequence b reads its fill window_lens[b], copies the token's K and V rows (all
kv heads) to that window row and stores window_lens[b] + 1. Only program b touches sequence b's
row and length, so the read-then-increment needs no atomics (a barrier orders the program's own
threads). One launch instead of the four torch ops it replaces (two scatter_ of the rows, two
increments of the lengths): an eager decode step is host-bound, ~10-30 us per launched op
(perf/NOTES.md, 2026-12-04).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _append_token_kernel(k_new_ptr, v_new_ptr, k_window_ptr, v_window_ptr, window_lens_ptr,
                         stride_kb, stride_kh, stride_kd, stride_vb, stride_vh, stride_vd,
                         stride_wb, stride_wh, stride_wt, rows,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    # k_new, v_new [B, HEADS, 1, HEAD_DIM] (any strides); k_window, v_window [B, HEADS, rows,
    # HEAD_DIM] with the same strides, HEAD_DIM contiguous. The cache flushes before a window can be
    # full; a full one (a broken invariant) is left as it is rather than written past its end.
    b = tl.program_id(0).to(tl.int64)
    row = tl.load(window_lens_ptr + b)
    room = (row >= 0) & (row < rows)
    i = tl.arange(0, BLOCK)
    head = i // HEAD_DIM
    chan = i % HEAD_DIM
    # room as a block: triton 3.9's interpreter refuses a block mask ANDed with a scalar one
    row_i = row + i * 0
    ok = (i < HEADS * HEAD_DIM) & (row_i >= 0) & (row_i < rows)
    dst = b * stride_wb + head * stride_wh + row.to(tl.int64) * stride_wt + chan
    k = tl.load(k_new_ptr + b * stride_kb + head * stride_kh + chan * stride_kd, mask=ok)
    v = tl.load(v_new_ptr + b * stride_vb + head * stride_vh + chan * stride_vd, mask=ok)
    tl.store(k_window_ptr + dst, k, mask=ok)
    tl.store(v_window_ptr + dst, v, mask=ok)
    # every thread of the program has read the old length before one thread overwrites it
    tl.debug_barrier()
    tl.store(window_lens_ptr + b, row + 1, mask=room)
