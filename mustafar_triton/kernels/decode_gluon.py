"""Fused sparse decode attention in Gluon (GPU only): value gathers from shared memory.
EXPERIMENTAL: correct (GPU tests, memcheck) but slower than decode.py's kernel on the H100
(B=16 T=16384 K0.7V0.7: 524 us at 4 warps vs 447 us; perf/NOTES.md), so it is not in the
tuner's space; a config dict(kernel="gluon", BLOCK_N=32 * warps, num_warps=warps,
num_splits=...) in a tuned file or autotune.forced_config selects it.

Same grid, arguments and partial outputs as `_sparse_decode_kernel` (decode.py), whose split
merge it reuses; Gluon has no interpreter, so decode.py's kernel is the reference and the one
CI runs. Why a second kernel: in Triton's tl the per-channel slot arithmetic plus a 64-bit
gathered global load cost ~6-7 integer instructions per dense element, and the decode is bound
by that (perf/NOTES.md). Gluon lets us pick every layout, so here:

  * one thread owns one token of the tile (BLOCK_N = 32 * num_warps tokens), so slot prefix sums
    run in registers and per-byte work is shared by the byte's 4 channel pairs;
  * the token's value row is staged, as 32-bit words holding the PAIR of values starting at each
    slot, in a [BLOCK_N, CAPP] tile that `gl.gather` stores to shared memory (the gather axis
    spans warps, so it lowers to "store, barrier, one LDS per element" rather than shuffles); the
    store is slot-major (dim 0 fastest), so the 32 lanes of one gather hit 32 different banks;
  * a channel pair (2c, 2c + 1) then costs one 32-bit LDS at its first slot and one `prmt` that
    keeps, moves or zeroes the two halves, its selector read from a 256-entry table per bitmap byte.
The loop has about half the integer instructions of decode.py's per token, but needs ~243
registers (one token's 64 pairs, their slots and selectors, the staged words), so only 8 warps
fit per SM and the loop is latency-bound (Nsight Compute: 1.1 instructions per cycle per SM vs
2.05 for decode.py's kernel); capping registers spills and is slower still.

Shapes: fp16 / bf16, HEAD_DIM a multiple of 32, capacity at most 248 (slots fit a byte), GROUP <= 16
(decode.gluon_decode_supports).
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .decode import _split_ranges, _window_range

# prmt selectors of a channel pair from the word (value[s], value[s + 1]) at its first slot s:
# both kept, only the low channel, only the high one (its value is at s too), none.
_KEEP_BOTH, _KEEP_LO, _KEEP_HI, _KEEP_NONE = 0x3210, 0x4410, 0x1044, 0x4444
_KEEP_NONE_2 = gl.constexpr(_KEEP_NONE * 0x10001)  # two pairs' worth, as in table fields 1 and 2


def pair_table() -> list[int]:
    """table[4 * b + f] for every bitmap byte b (channels 8k..8k+7 of a token), as int32:
    f = 0: byte i = kept channels of b below channel 2i (the in-byte slot of pair i);
    f = 1 / 2: prmt selectors of pairs 0, 1 / 2, 3 (16 bits each) turning the 32-bit word at that
    slot, (value[s], value[s + 1]), into the pair's two dense halves; f = 3: byte i = 0xFF if
    pair i keeps a channel, else 0 (such a pair reads slot 0, so no slot ever leaves the tile);
    f = 0 is 0 there too."""
    out = []
    for b in range(256):
        offs, reads, sels = 0, 0, []
        for i in range(4):
            lo, hi = (b >> 2 * i) & 1, (b >> 2 * i + 1) & 1
            if lo or hi:
                offs |= bin(b & ((1 << 2 * i) - 1)).count("1") << 8 * i
                reads |= 0xFF << 8 * i
            sels.append(_KEEP_BOTH if lo and hi else _KEEP_LO if lo else _KEEP_HI if hi else _KEEP_NONE)
        words = [offs, sels[0] | sels[1] << 16, sels[2] | sels[3] << 16, reads]
        out += [w - (1 << 32) if w >= 1 << 31 else w for w in words]
    return out


@gluon.jit
def _pair_words(values_ptr, start, end, CAPACITY: gl.constexpr, CAPP: gl.constexpr, NUM_WARPS: gl.constexpr):
    """[BLOCK_N, CAPP] int32, slots split over the warps: word s of token t = (value[t, s],
    value[t, s + 1]) as two 16-bit halves (0 past the row), from the row's aligned words
    w[k] = (value[2k], value[2k + 1]): word 2k = w[k], word 2k + 1 = prmt(w[k], w[k + 1])."""
    BLOCK_N: gl.constexpr = 32 * NUM_WARPS
    HALF: gl.constexpr = CAPP // 2
    W2: gl.constexpr = gl.BlockedLayout([1, HALF // NUM_WARPS], [32, 1], [1, NUM_WARPS], [1, 0])
    SRC: gl.constexpr = gl.BlockedLayout([1, CAPP // NUM_WARPS], [32, 1], [1, NUM_WARPS], [1, 0])
    t = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, W2))[:, None]
    k = gl.arange(0, HALF, layout=gl.SliceLayout(0, W2))[None, :]
    rows = values_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + t * (CAPACITY // 2)
    w = gl.load(rows + k, mask=(t < end) & (k < CAPACITY // 2), other=0)
    w_next = gl.load(rows + k + 1, mask=(t < end) & (k + 1 < CAPACITY // 2), other=0)
    odd = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5432;", "=r,r,r", [w, w_next],
                                    dtype=gl.int32, is_pure=True, pack=1)
    return gl.convert_layout(gl.reshape(gl.join(w, odd), [BLOCK_N, CAPP]), SRC)


@gluon.jit
def _expand_pairs(bitmap_ptr, values_ptr, table_ptr, start, end,
                  HEAD_DIM: gl.constexpr, CAPACITY: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Dense tile [BLOCK_N, HEAD_DIM] of tokens [start, start + BLOCK_N) (0 at and past `end`),
    one token's row per thread (layout _row_layout)."""
    BLOCK_N: gl.constexpr = 32 * NUM_WARPS
    CAPP: gl.constexpr = triton.next_power_of_2(CAPACITY)  # staged slots per token
    NB: gl.constexpr = HEAD_DIM // 8
    # a thread owns one token: [its bitmap bytes] x [4 table fields, or the byte's 4 channel pairs]
    P3: gl.constexpr = gl.BlockedLayout([1, NB, 4], [32, 1, 1], [NUM_WARPS, 1, 1], [2, 1, 0])
    LB: gl.constexpr = gl.SliceLayout(2, P3)            # [BLOCK_N, NB]
    t = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LB))[:, None]
    b_idx = gl.arange(0, NB, layout=gl.SliceLayout(0, LB))[None, :]
    byte = gl.load(bitmap_ptr.to(gl.pointer_type(gl.uint8), bitcast=True) + t * NB + b_idx,
                   mask=t < end, other=0).to(gl.int32)                              # [BN, NB]
    f = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, P3)))[None, None, :]
    entry = gl.load(table_ptr + byte[:, :, None] * 4 + f)                           # [BN, NB, 4]
    offs = gl.sum(gl.where(f == 0, entry, 0), axis=2)
    sel01 = gl.sum(gl.where(f == 1, entry, 0), axis=2)
    sel23 = gl.sum(gl.where(f == 2, entry, 0), axis=2)
    reads = gl.sum(gl.where(f == 3, entry, 0), axis=2)
    count = gl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [byte], dtype=gl.int32, is_pure=True, pack=1)
    # slots before each byte (the scan needs a plain blocked layout: the same registers)
    SCAN: gl.constexpr = gl.BlockedLayout([1, NB], [32, 1], [NUM_WARPS, 1], [1, 0])
    count_b = gl.convert_layout(count, SCAN)
    first = gl.convert_layout(gl.associative_scan(count_b, 1, _add) - count_b, LB)
    ok_tok = gl.sum(count, axis=1)[:, None] <= CAPACITY   # a malformed token (too many bits) reads zeros
    sel01 = gl.where(ok_tok, sel01, _KEEP_NONE_2)
    sel23 = gl.where(ok_tok, sel23, _KEEP_NONE_2)
    # byte i: first slot of pair i (0 for pairs that keep nothing and for malformed tokens, whose
    # slots could point past the staged row)
    slots = gl.where(ok_tok, ((first * 0x01010101) & reads) + offs, 0)
    i = f                                                 # axis 2 now indexes the byte's 4 pairs
    # byte i of slots (prmt keeps ptxas from folding the gather's address scale into the extract)
    slot = gl.inline_asm_elementwise("prmt.b32 $0, $1, 0, $2;", "=r,r,r",
                                     [slots[:, :, None] + 0 * i, 0x4440 + i + 0 * slots[:, :, None]],
                                     dtype=gl.int32, is_pure=True, pack=1)          # [BN, NB, 4]
    sel = gl.where(i < 2, sel01[:, :, None], sel23[:, :, None]) >> (16 * (i % 2))
    P2: gl.constexpr = gl.BlockedLayout([1, HEAD_DIM // 2], [32, 1], [NUM_WARPS, 1], [1, 0])
    slot = gl.convert_layout(gl.reshape(slot, [BLOCK_N, HEAD_DIM // 2]), P2)
    sel = gl.convert_layout(gl.reshape(sel, [BLOCK_N, HEAD_DIM // 2]), P2)
    words = gl.gather(_pair_words(values_ptr, start, end, CAPACITY, CAPP, NUM_WARPS), slot, 1)
    lo, hi = gl.inline_asm_elementwise(
        "{ .reg .b32 t; prmt.b32 t, $2, 0, $3; mov.b32 {$0, $1}, t; }", "=h,=h,r,r", [words, sel],
        dtype=(values_ptr.dtype.element_ty, values_ptr.dtype.element_ty), is_pure=True, pack=1)
    return gl.convert_layout(gl.reshape(gl.join(lo, hi), [BLOCK_N, HEAD_DIM]), _row_layout(HEAD_DIM, NUM_WARPS))


@gluon.constexpr_function
def _row_layout(head_dim, num_warps):
    """[BLOCK_N, HEAD_DIM] with one token's row per thread."""
    return gl.BlockedLayout([1, head_dim], [32, 1], [num_warps, 1], [1, 0])


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _scores(q_op, k, valid, m, l, qk_scale, MMA: gl.constexpr):
    """Online-softmax step on mma.sync for a key tile k [BLOCK_N, D]: returns p (the tile's
    weights as an A operand), the new max and sum, and the factor that rescales the accumulator."""
    s = mma_v2(q_op, gl.convert_layout(gl.permute(k, (1, 0)), gl.DotOperandLayout(1, MMA, 2)),
               gl.zeros([q_op.shape[0], k.shape[0]], gl.float32, MMA)) * qk_scale
    s = gl.where(valid[None, :], s, float("-inf"))
    m_new = gl.maximum(m, gl.max(s, axis=1))
    alpha = gl.exp2(m - m_new)
    p = gl.exp2(s - m_new[:, None])
    l = l * alpha + gl.sum(p, axis=1)
    return gl.convert_layout(p.to(k.dtype), gl.DotOperandLayout(0, MMA, 2)), m_new, l, alpha


@gluon.jit
def _accumulate(p_op, v, acc, alpha, MMA: gl.constexpr):
    v_op = gl.convert_layout(v, gl.DotOperandLayout(1, MMA, 2))
    return mma_v2(p_op, v_op, acc * alpha[:, None])


@gluon.jit
def _query_and_state(q_ptr, b, h, stride_qb, stride_qh, GROUP: gl.constexpr, BLOCK_H: gl.constexpr,
                     HEAD_DIM: gl.constexpr, NUM_WARPS: gl.constexpr, MMA: gl.constexpr):
    """The GROUP query heads of kv head h (rows padded to BLOCK_H) as an mma.sync A operand, and
    the empty online-softmax state: running max, running sum, accumulator."""
    QL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
    offs_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, QL))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, QL))
    q = gl.load(q_ptr + b * stride_qb + (h * GROUP + offs_h)[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_h < GROUP)[:, None], other=0.0)
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    return (gl.convert_layout(q, gl.DotOperandLayout(0, MMA, 2)),
            gl.full([BLOCK_H], float("-inf"), gl.float32, ROW), gl.zeros([BLOCK_H], gl.float32, ROW),
            gl.zeros([BLOCK_H, HEAD_DIM], gl.float32, MMA))


@gluon.jit
def _sparse_decode_gluon_kernel(
    q_ptr, k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr, seq_lens_ptr, table_ptr,
    k_window_ptr, v_window_ptr, window_lens_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_wb, stride_wh, stride_wt,
    num_kv_heads, tokens, seq_bound, window, tokens_per_split, qk_scale,
    GROUP: gl.constexpr, BLOCK_H: gl.constexpr, HEAD_DIM: gl.constexpr,
    K_CAPACITY: gl.constexpr, V_CAPACITY: gl.constexpr,
    HAS_SEQ_LENS: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_WINDOW_LENS: gl.constexpr,
    NUM_WARPS: gl.constexpr,
):
    BLOCK_N: gl.constexpr = 32 * NUM_WARPS
    DR: gl.constexpr = _row_layout(HEAD_DIM, NUM_WARPS)
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS], instr_shape=[16, 8])
    TOK: gl.constexpr = gl.SliceLayout(1, DR)

    split = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    q_op, m, l, acc = _query_and_state(q_ptr, b, h, stride_qb, stride_qh, GROUP, BLOCK_H, HEAD_DIM, NUM_WARPS, MMA)
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)

    lo, c_hi, k_bits, k_vals, v_bits, v_vals = _split_ranges(
        split, bh, num_kv_heads, tokens, seq_bound, tokens_per_split, seq_lens_ptr,
        k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr, HEAD_DIM, K_CAPACITY, V_CAPACITY, HAS_SEQ_LENS)
    for start in range(lo, c_hi, BLOCK_N):
        valid = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA)) < c_hi
        k = _expand_pairs(k_bits, k_vals, table_ptr, start, c_hi, HEAD_DIM, K_CAPACITY, NUM_WARPS)
        p_op, m, l, alpha = _scores(q_op, k, valid, m, l, qk_scale, MMA)
        v = _expand_pairs(v_bits, v_vals, table_ptr, start, c_hi, HEAD_DIM, V_CAPACITY, NUM_WARPS)
        acc = _accumulate(p_op, v, acc, alpha, MMA)

    if HAS_WINDOW:
        w_lo, w_hi = _window_range(lo, b, seq_bound, window, tokens_per_split, window_lens_ptr, HAS_WINDOW_LENS)
        base = b.to(gl.int64) * stride_wb + h * stride_wh
        d_row = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, DR))[None, :]
        for start in range(w_lo, w_hi, BLOCK_N):
            tok = start + gl.arange(0, BLOCK_N, layout=TOK)
            ok = (tok < w_hi)[:, None]
            offs = base + tok[:, None] * stride_wt + d_row
            valid = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA)) < w_hi
            k = gl.load(k_window_ptr + offs, mask=ok, other=0.0)
            p_op, m, l, alpha = _scores(q_op, k, valid, m, l, qk_scale, MMA)
            v = gl.load(v_window_ptr + offs, mask=ok, other=0.0)
            acc = _accumulate(p_op, v, acc, alpha, MMA)

    empty = l == 0
    out = acc / gl.where(empty, 1.0, l)[:, None]
    lse = gl.where(empty, float("-inf"), m + gl.log2(gl.where(empty, 1.0, l)))
    rows = gl.arange(0, BLOCK_H, layout=ROW)
    part = (bh.to(gl.int64) * gl.num_programs(0) + split) * GROUP + rows
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, MMA))
    gl.store(part_out_ptr + part[:, None] * HEAD_DIM + cols[None, :], out, mask=(rows < GROUP)[:, None])
    gl.store(part_lse_ptr + part, lse, mask=rows < GROUP)
