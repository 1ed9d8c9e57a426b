"""Move the oldest recent-window tokens of every sequence to the compressed store: SparseKVCache's
window flush as one launch.

One program per (sequence b, kv head h, side K or V): with recent = window_lens[b] - sinks (>= 0)
and n = min(recent, CHUNK) where recent > WINDOW - CHUNK (else 0), it prunes + packs the chunk rows
[sinks, sinks + CHUNK) of its window (top-k by magnitude as prune_pack.py's kernel, rows past n as
all-zero rows) into store rows [seq_lens[b], seq_lens[b] + CHUNK) and shifts the recent rows down
by n (rows [sinks + j] <- [sinks + j + n]; the last n rows keep stale data past the new fill, never
attended). The lengths are stored (seq_lens[b] + n, window_lens[b] - n) by the last of sequence b's
2 x num_heads programs to finish, counted in done_ptr[b] (an int32 per sequence, zero between
flushes: the last program resets it): every program has read both lengths before its count, so
none reads an updated one. A barrier orders each program's own threads (every read of a row before
its overwrite). The caller guarantees seq_lens[b] + CHUNK <= max_tokens (the cache's host capacity
check). One launch instead of the ~20 torch ops and two prune/pack launches of the torch flush:
an eager step is host-bound, ~10-30 us per launched op (perf/NOTES.md, 2026-12-06). The grid:
one program per sequence walking its heads in turn took 81-85 us per flush for 8 kv heads at
D=128, B=1-64, on an H100; this one 5.0-17.2 us in the same run
(perf/results/h100/flush_cost_{one_program_b6dd3b4,grid_0205016}.json).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .prune_pack import _in_head, _kept_topk, _magnitude_bits, _store_packed


@triton.jit
def _flush_side(window_ptr, bitmap_ptr, values_ptr, base, store_row, n, keep, inv_value_scale,
                stride_wt, SINKS: tl.constexpr, WINDOW: tl.constexpr, CHUNK: tl.constexpr,
                HEAD_DIM: tl.constexpr, CAPACITY: tl.constexpr, MAG_BITS: tl.constexpr,
                FP8_VALUES: tl.constexpr):
    """One kv head's K or V side: its chunk into the store at store_row, its recent rows shifted."""
    D_TILE: tl.constexpr = triton.next_power_of_2(HEAD_DIM)
    CHUNK_POW2: tl.constexpr = triton.next_power_of_2(CHUNK)
    WINDOW_POW2: tl.constexpr = triton.next_power_of_2(WINDOW)
    d = tl.arange(0, D_TILE)[None, :]
    t = tl.arange(0, CHUNK_POW2)
    in_chunk = _in_head((t < n)[:, None], d, HEAD_DIM)  # rows past n pack to all-zero rows
    x = tl.load(window_ptr + base + (SINKS + t.to(tl.int64))[:, None] * stride_wt + d, mask=in_chunk, other=0.0)
    kept = _kept_topk(_magnitude_bits(x, MAG_BITS), keep, CHUNK_POW2, MAG_BITS) & in_chunk
    _store_packed(x, kept, store_row + t, t < CHUNK, bitmap_ptr, values_ptr, inv_value_scale, CHUNK_POW2,
                  HEAD_DIM, CAPACITY, triton.next_power_of_2(CAPACITY), FP8_VALUES)
    j = tl.arange(0, WINDOW_POW2)
    moved = _in_head(((j + n) < WINDOW)[:, None], d, HEAD_DIM)
    recent = tl.load(window_ptr + base + (SINKS + j + n).to(tl.int64)[:, None] * stride_wt + d, mask=moved)
    tl.debug_barrier()  # every thread has read the chunk and the rows it moves before any row is overwritten
    tl.store(window_ptr + base + (SINKS + j).to(tl.int64)[:, None] * stride_wt + d, recent, mask=moved)


@triton.jit
def _flush_kernel(k_window_ptr, v_window_ptr, window_lens_ptr, seq_lens_ptr, done_ptr,
                  k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr,
                  num_heads, max_tokens, k_keep, v_keep, stride_wb, stride_wh, stride_wt,
                  k_inv_value_scale=1.0, v_inv_value_scale=1.0,
                  SINKS: tl.constexpr = 0, WINDOW: tl.constexpr = 1, CHUNK: tl.constexpr = 1,
                  HEAD_DIM: tl.constexpr = 64, K_CAPACITY: tl.constexpr = 8, V_CAPACITY: tl.constexpr = 8,
                  MAG_BITS: tl.constexpr = 15, FP8_VALUES: tl.constexpr = False):
    # grid (B, num_heads, 2); windows [B, num_heads, SINKS + WINDOW, HEAD_DIM] (strides given,
    # HEAD_DIM contiguous); the stores' bitmap / values [B, num_heads, max_tokens, HEAD_DIM / 32 or
    # capacity], contiguous; done [B] int32, zero on entry
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    fill = tl.load(window_lens_ptr + b)
    start = tl.load(seq_lens_ptr + b)
    recent = tl.maximum(fill - SINKS, 0)
    n = tl.where(recent > WINDOW - CHUNK, tl.minimum(recent, CHUNK), 0)
    base = b * stride_wb + h * stride_wh
    store_row = (b * num_heads + h) * max_tokens + start
    if tl.program_id(2) == 0:
        _flush_side(k_window_ptr, k_bitmap_ptr, k_values_ptr, base, store_row, n, k_keep, k_inv_value_scale,
                    stride_wt, SINKS, WINDOW, CHUNK, HEAD_DIM, K_CAPACITY, MAG_BITS, FP8_VALUES)
    else:
        _flush_side(v_window_ptr, v_bitmap_ptr, v_values_ptr, base, store_row, n, v_keep, v_inv_value_scale,
                    stride_wt, SINKS, WINDOW, CHUNK, HEAD_DIM, V_CAPACITY, MAG_BITS, FP8_VALUES)
    tl.debug_barrier()  # every thread has read both lengths before this program is counted
    if tl.atomic_add(done_ptr + b, 1, sem="acq_rel") == 2 * num_heads - 1:  # the last of sequence b's
        tl.store(seq_lens_ptr + b, start + n)
        tl.store(window_lens_ptr + b, fill - n)
        tl.store(done_ptr + b, 0)
