"""Prune / pack / unpack kernels.

One streaming kernel, `_select_kernel`, reads a tile of tokens once and either
  * selects each token's top-k by magnitude (SELECT_TOPK) or its nonzeros (pattern given), and
  * writes the result dense (prune_topk) or as bitmap + values (pack, prune_and_pack).
`_unpack_kernel` is the exact inverse of packing.

PAGED (compress.write_pages): input row r = n * Hkv + h (token n, kv head h) is written to the row
of its slot in a PagedKV pool [num_pages, Hkv, page_size, ...]: slot = slot_mapping[n] (vLLM's
convention, slot = page * page_size + offset), output row (page * Hkv + h) * page_size + offset.
Rows whose slot is outside [0, num_slots) (-1: padding) are neither read nor written. Without
PAGED the output row is the input row, and the kernel compiles to the code it had before.

Exact per-token top-k without sorting: the k-th largest magnitude is found by bisection on the
bit pattern of |x| (non-negative floats order like their bit patterns), one `tl.sum` count per
bit; ties at the threshold go to the lowest channel index via a `tl.cumsum`.

Head dims that are not a power of two (96: three bitmap words) run in tiles of the next power of
two, the extra channels masked (`_in_head`); powers of two compile to the same code as without it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .fp8 import fp8_e4m3_bits, fp8_e4m3_value

# Head dims of prune_pack_gluon.py's kernel (its per-byte mma needs N = D / 8 >= 8, a power of two)
GLUON_PRUNE_HEAD_DIMS = (64, 128, 256)


def gluon_prune_supports(dtype, head_dim: int, interpreting: bool) -> bool:
    """Whether prune_pack_gluon.py's kernel handles a shape (GPU only: Gluon has no interpreter).
    Here, beside its tl twin, so that asking needs no Gluon import."""
    return (not interpreting and str(dtype).replace("torch.", "") in ("float16", "bfloat16")
            and head_dim in GLUON_PRUNE_HEAD_DIMS)


@triton.jit
def _in_head(mask, channel, HEAD_DIM: tl.constexpr):
    """mask & (channel < HEAD_DIM) in tiles padded to the next power of two; mask itself where
    HEAD_DIM is one (nothing is padded)."""
    if HEAD_DIM == triton.next_power_of_2(HEAD_DIM):
        inside = mask
    else:
        inside = mask & (channel < HEAD_DIM)
    return inside


@triton.jit
def _paged_rows(rows, n_rows, slot_mapping_ptr, num_heads, page_size, num_slots):
    """Output rows int64 of input rows (token n = row // num_heads, kv head row % num_heads) in a
    head-major page pool, and whether each is written (its slot in [0, num_slots))."""
    slot = tl.load(slot_mapping_ptr + rows // num_heads, mask=rows < n_rows, other=-1).to(tl.int64)
    writable = (slot >= 0) & (slot < num_slots) & (rows < n_rows)
    page = slot // page_size
    return (page * num_heads + rows % num_heads) * page_size + slot % page_size, writable


@triton.jit
def _magnitude_bits(x, MAG_BITS: tl.constexpr):
    """|x| as a non-negative integer that orders like |x| (NaN above inf, -0.0 equal to 0)."""
    if MAG_BITS == 31:
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        return x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF


@triton.jit
def _kept_topk(mag, keep, BLOCK_T: tl.constexpr, MAG_BITS: tl.constexpr):
    """Each row's top-`keep` entries of mag [BLOCK_T, D] (_magnitude_bits), ties to the lowest channel."""
    # Largest tau with count(mag >= tau) >= keep, built from the top bit down. 15-bit
    # magnitudes are exact in fp32, so their counting runs on the (twice as wide) fp32 pipe.
    if MAG_BITS == 31:
        key = mag
    else:
        key = mag.to(tl.float32)
    tau = tl.zeros([BLOCK_T], dtype=tl.int32)
    for bit in tl.static_range(MAG_BITS - 1, -1, -1):
        candidate = tau | (1 << bit)
        count = tl.sum((key >= candidate.to(key.dtype)[:, None]).to(key.dtype), axis=1)
        tau = tl.where(count >= keep, candidate, tau)
    above = mag > tau[:, None]
    n_above = tl.sum(above.to(tl.int32), axis=1)
    at_tau = mag == tau[:, None]
    tie_rank = tl.cumsum(at_tau.to(tl.int32), axis=1)  # ties: lowest index first
    return above | (at_tau & (tie_rank <= (keep - n_above)[:, None]))


@triton.jit
def _store_packed(x, kept, out_rows, written, bitmap_ptr, values_ptr, inv_value_scale, BLOCK_T: tl.constexpr,
                  HEAD_DIM: tl.constexpr, CAPACITY: tl.constexpr, CAPACITY_POW2: tl.constexpr,
                  FP8_VALUES: tl.constexpr):
    """Rows x [BLOCK_T, D_TILE] with their kept masks as bitmap + values rows out_rows (int64
    [BLOCK_T]) of bitmap_ptr / values_ptr, where `written`; zeros fill each row's slots past its
    kept count (FP8_VALUES: values_ptr holds e4m3 bits of x * inv_value_scale)."""
    NUM_WORDS: tl.constexpr = HEAD_DIM // 32
    D_TILE: tl.constexpr = triton.next_power_of_2(HEAD_DIM)
    kept_i = kept.to(tl.int32)
    slot = tl.cumsum(kept_i, axis=1) - 1
    count = tl.sum(kept_i, axis=1)
    # Kept values go to slots [0, count); zeros to [count, CAPACITY): disjoint stores, no race.
    if FP8_VALUES:
        stored = fp8_e4m3_bits(x, inv_value_scale)
    else:
        stored = x
    tl.store(values_ptr + out_rows[:, None] * CAPACITY + slot, stored,
             mask=kept & (slot < CAPACITY) & written[:, None])
    j = tl.arange(0, CAPACITY_POW2)
    zero_slots = (j[None, :] >= count[:, None]) & (j[None, :] < CAPACITY) & written[:, None]
    tl.store(values_ptr + out_rows[:, None] * CAPACITY + j[None, :],
             tl.zeros([BLOCK_T, CAPACITY_POW2], dtype=stored.dtype), mask=zero_slots)
    bits = tl.reshape(kept_i, [BLOCK_T, D_TILE // 32, 32]).to(tl.uint32)
    shifts = tl.arange(0, 32).to(tl.uint32)
    words = tl.sum(bits << shifts[None, None, :], axis=2).to(tl.int32, bitcast=True)
    w = tl.arange(0, D_TILE // 32)
    tl.store(bitmap_ptr + out_rows[:, None] * NUM_WORDS + w[None, :], words,
             mask=_in_head(written[:, None], 32 * w[None, :], HEAD_DIM))


@triton.jit
def _select_kernel(
    x_ptr, out_ptr, bitmap_ptr, values_ptr, seq_lens_ptr, slot_mapping_ptr,
    n_rows, tokens_per_seq, rows_per_batch, keep, num_heads, page_size, num_slots,
    HEAD_DIM: tl.constexpr, CAPACITY: tl.constexpr, CAPACITY_POW2: tl.constexpr,
    MAG_BITS: tl.constexpr, BLOCK_T: tl.constexpr,
    SELECT_TOPK: tl.constexpr, WRITE_PACKED: tl.constexpr, HAS_SEQ_LENS: tl.constexpr,
    PAGED: tl.constexpr, inv_value_scale=1.0, FP8_VALUES: tl.constexpr = False,
):
    """FP8_VALUES: values_ptr holds float8_e4m3fn bits (uint8): each kept value is written as
    x * inv_value_scale rounded to e4m3 (fp8.py); the selection reads x itself."""
    D_TILE: tl.constexpr = triton.next_power_of_2(HEAD_DIM)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = rows < n_rows
    if HAS_SEQ_LENS:
        seq_len = tl.load(seq_lens_ptr + rows // rows_per_batch, mask=valid, other=0)
        valid = valid & ((rows % tokens_per_seq) < seq_len)
    if PAGED:  # with WRITE_PACKED only
        out_rows, written = _paged_rows(rows, n_rows, slot_mapping_ptr, num_heads, page_size, num_slots)
        valid = valid & written
    else:
        out_rows, written = rows, rows < n_rows
    d = tl.arange(0, D_TILE)
    in_row = _in_head(valid[:, None], d[None, :], HEAD_DIM)   # padded channels read 0, never kept
    x = tl.load(x_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=in_row, other=0.0)
    mag = _magnitude_bits(x, MAG_BITS)

    if SELECT_TOPK:
        kept = _kept_topk(mag, keep, BLOCK_T, MAG_BITS)
    else:
        kept = mag != 0
    kept = kept & in_row

    if WRITE_PACKED:
        _store_packed(x, kept, out_rows, written, bitmap_ptr, values_ptr, inv_value_scale,
                      BLOCK_T, HEAD_DIM, CAPACITY, CAPACITY_POW2, FP8_VALUES)
    else:
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :], tl.where(kept, x, 0.0),
                 mask=_in_head((rows < n_rows)[:, None], d[None, :], HEAD_DIM))


@triton.jit
def _unpack_kernel(
    bitmap_ptr, values_ptr, out_ptr, n_rows,
    HEAD_DIM: tl.constexpr, CAPACITY: tl.constexpr, BLOCK_T: tl.constexpr,
    value_scale=1.0, FP8_VALUES: tl.constexpr = False,
):
    """FP8_VALUES: values_ptr holds float8_e4m3fn bits (uint8); out (float32) gets value * value_scale."""
    NUM_WORDS: tl.constexpr = HEAD_DIM // 32
    D_TILE: tl.constexpr = triton.next_power_of_2(HEAD_DIM)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = rows < n_rows
    w = tl.arange(0, D_TILE // 32)
    words = tl.load(bitmap_ptr + rows[:, None] * NUM_WORDS + w[None, :],
                    mask=_in_head(valid[:, None], 32 * w[None, :], HEAD_DIM), other=0)
    shifts = tl.arange(0, 32)
    bits = (words[:, :, None] >> shifts[None, None, :]) & 1          # [BLOCK_T, D_TILE // 32, 32]
    bits = tl.reshape(bits, [BLOCK_T, D_TILE])
    slot = tl.cumsum(bits, axis=1) - 1
    keep = (bits != 0) & (slot < CAPACITY) & valid[:, None]
    if FP8_VALUES:
        raw = tl.load(values_ptr + rows[:, None] * CAPACITY + slot, mask=keep, other=0)
        vals = fp8_e4m3_value(raw) * value_scale
    else:
        vals = tl.load(values_ptr + rows[:, None] * CAPACITY + slot, mask=keep, other=0.0)
    d = tl.arange(0, D_TILE)
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :], vals,
             mask=_in_head(valid[:, None], d[None, :], HEAD_DIM))
