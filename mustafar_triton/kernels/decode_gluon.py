"""Fused sparse decode attention in Gluon (GPU only): one warp per program, value gathers straight
into the registers of the tensor-core (mma.sync) operands. The fastest decode kernel on the H100
(B=16 T=16384 K0.7V0.7, tuned: 296 us against 355 us for dense cuDNN and ~430 us for decode.py's
kernel; perf/NOTES.md, session 6); attention.py picks it wherever `gluon_decode_supports` says it
runs and the GPU has mma.sync m16n8k16 (Ampere or newer).

Same grid, arguments and partial outputs as `_sparse_decode_kernel` (decode.py), whose split merge
it reuses; Gluon has no interpreter, so decode.py's kernel is the reference that CI runs.

Why it is faster than decode.py's kernel, which does the same arithmetic per dense element:
  * Triton's tl picks the layouts itself: there the expanded tiles go through shared memory to
    reach the tensor cores, with barriers, and q is re-read from shared memory every tile.
    Here the gathered values land directly in the mma operand layouts (Gluon lets us name them),
    so the loop touches no shared memory and needs no barrier.
  * A program is ONE warp that runs its own online softmax over its split, so warps never wait
    for each other; the grid has enough splits to fill every SM with ~12 such programs.
  * Both products are "swapped" so the padded query group is the small N = 8 (or 16) side:
        S^T [BLOCK_N, H] = K [BLOCK_N, D] @ q^T [D, H]
        O^T [D, H]      += V^T [D, BLOCK_N] @ P^T [BLOCK_N, H]
    q^T stays in registers (16 of them) for the whole loop, the accumulator is [D, 8], and P^T
    comes out of S^T's accumulator with a few shuffles.
  * The next tile's bitmap words and value rows are prefetched into L2 (one line per lane), so
    the two dependent memory round trips of a tile (words, then values) rarely wait on DRAM.
  * Registers are capped (decode.gluon_register_cap: 168 at D=128) so that a known number of
    programs fit per SM and the splits fill whole waves.
Per dense element: one masked popcount (slot), one add, a 64-bit address, a bit test and a
predicated 2-byte load. Nsight Compute (B=16 T=4096, before the prefetch): issue slots 54% busy,
the ALU pipe 60%, ~10 of the 12 resident warps per SM active: the integer work per element is
the limit.

Shapes: fp16 / bf16, HEAD_DIM a multiple of 32, GROUP <= 16 (decode.gluon_decode_supports).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .decode import _split_ranges, _window_range


@gluon.jit
def _popc(x):
    return gl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _channel_masks(chan):
    """Per channel: the bits of its bitmap word below it, and its own bit (loop-invariant)."""
    bit = (chan % 32).to(gl.uint32)
    own = gl.full_like(bit, 1) << bit
    return (own - 1).to(gl.int32, bitcast=True), own.to(gl.int32, bitcast=True)


@gluon.jit
def _gather_tile(bits_ptr, vals_ptr, tok, ok, chan, below, own,
                 CAPACITY: gl.constexpr, HEAD_DIM: gl.constexpr, TOK_AXIS: gl.constexpr):
    """Dense values at (tok, chan) of one (batch, kv head) stream, in the layout of the broadcast
    of tok (1-D, along TOK_AXIS) and chan (2-D, one channel index per register): an mma operand
    layout. Tokens with `ok` False, and malformed tokens (more bits than CAPACITY, which could
    point past their row), read as zeros."""
    NUM_WORDS: gl.constexpr = HEAD_DIM // 32
    kept = tok * 0
    for j in gl.static_range(NUM_WORDS):  # the token's kept count (LLVM reuses these loads below)
        kept += _popc(gl.load(bits_ptr + tok * NUM_WORDS + j, mask=ok, other=0))
    fits = kept <= CAPACITY
    # row start + slots before word j, per token; opaque, or LLVM re-derives it per element
    run = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [tok * CAPACITY], dtype=gl.int32,
                                    is_pure=True, pack=1)
    cw = chan // 32
    word = tok[:, None] * 0 + cw * 0 if TOK_AXIS == 0 else tok[None, :] * 0 + cw * 0
    first = word
    # every register holds one fixed channel, so LLVM folds these selects to plain moves
    for j in gl.static_range(NUM_WORDS):
        wj = gl.load(bits_ptr + tok * NUM_WORDS + j, mask=ok, other=0)
        run_j = run
        run += _popc(wj)
        wj = gl.where(fits, wj, 0)
        if TOK_AXIS == 0:
            word = gl.where(cw == j, wj[:, None], word)
            first = gl.where(cw == j, run_j[:, None], first)
        else:
            word = gl.where(cw == j, wj[None, :], word)
            first = gl.where(cw == j, run_j[None, :], first)
    # The predicated 2-byte load in asm: a boolean mask tensor makes LLVM pack the predicates
    # into bytes and unpack them again (~2 extra instructions per element). It loads into a
    # zeroed 32-bit register: ptxas zeroes that with a move on the FMA pipe, where a 16-bit
    # destination took a PRMT on the busier ALU pipe (7-8% faster at K0.7:
    # decode_gluon_ab_h100_3_zext.json). The int32 offset is formed first: adding the popcount to
    # a per-word 64-bit pointer has fewer instructions but measured 2-3% slower at K0.7
    # (decode_gluon_ab_h100_1.json).
    raw = gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b32 $0, 0; @p ld.global.u16 $0, [$1]; }",
        "=r,l,r", [vals_ptr + (first + _popc(word & below)), word & own],
        dtype=gl.int32, is_pure=True, pack=1)
    return raw.to(gl.int16).to(vals_ptr.dtype.element_ty, bitcast=True)


@gluon.jit
def _prefetch_l2(ptr, nbytes, lane):
    """Ask L2 for the bytes [ptr, ptr + nbytes): one 128-byte line per lane of the warp (up to 32
    lines; lane k touches byte min(128 k, nbytes - 1), so the line of the last byte is included
    however ptr is aligned); nothing when nbytes is 0. No registers are held until the data is
    used, and no address outside the range is touched."""
    wanted = gl.where(nbytes > 0, nbytes + 127 - lane * 128, 0)  # > 0: this lane prefetches
    gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r", [ptr.to(gl.pointer_type(gl.int8), bitcast=True) + gl.minimum(lane * 128, nbytes - 1), wanted],
        dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _scores(k, valid, q_t, m, l, qk_scale, MMA: gl.constexpr):
    """Online-softmax step, base 2, transposed: k [BLOCK_N, D] (A operand) against q_t [D, H]
    (B operand); valid [BLOCK_N] masks tokens. Returns the weights P^T [BLOCK_N, H], the new
    running max and sum, and the factor that rescales the accumulator."""
    s = mma_v2(k, q_t, gl.zeros([k.shape[0], q_t.shape[1]], gl.float32, MMA)) * qk_scale
    s = gl.where(valid[:, None], s, float("-inf"))
    m_new = gl.maximum(m, gl.max(s, axis=0))
    alpha = gl.exp2(m - m_new)
    p = gl.exp2(s - m_new[None, :])
    return p, m_new, l * alpha + gl.sum(p, axis=0), alpha


@gluon.jit
def _accumulate(v_t, p, acc, alpha, B_OP: gl.constexpr):
    """acc = O^T [D, H] rescaled, plus V^T [D, BLOCK_N] (A operand) @ P^T. Called after the V
    gather, which is issued after the scores: gathering K and V first costs ~30 more registers."""
    return mma_v2(v_t, gl.convert_layout(p.to(v_t.dtype), B_OP), acc * alpha[None, :])


@gluon.jit
def _sparse_decode_gluon_kernel(
    q_ptr, k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr, seq_lens_ptr,
    k_window_ptr, v_window_ptr, window_lens_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_wb, stride_wh, stride_wt,
    num_kv_heads, tokens, seq_bound, window, tokens_per_split, qk_scale,
    GROUP: gl.constexpr, BLOCK_H: gl.constexpr, HEAD_DIM: gl.constexpr,
    K_CAPACITY: gl.constexpr, V_CAPACITY: gl.constexpr, BLOCK_N: gl.constexpr,
    HAS_SEQ_LENS: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_WINDOW_LENS: gl.constexpr,
):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    B_OP: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
    split = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads

    d_q = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, B_OP))
    h_q = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, B_OP))
    q_t = gl.load(q_ptr + b * stride_qb + (h * GROUP + h_q)[None, :] * stride_qh + d_q[:, None],
                  mask=(h_q < GROUP)[None, :], other=0.0)                    # [D, BLOCK_H]
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    m = gl.full([BLOCK_H], float("-inf"), gl.float32, COL)
    l = gl.zeros([BLOCK_H], gl.float32, COL)
    acc = gl.zeros([HEAD_DIM, BLOCK_H], gl.float32, MMA)

    tok_k = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, A_OP))               # K rows: tokens
    chan_k = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, A_OP))[None, :]
    chan_v = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, A_OP))[:, None]    # V^T rows: channels
    tok_v = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, A_OP))
    tok_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    below_k, own_k = _channel_masks(chan_k)
    below_v, own_v = _channel_masks(chan_v)

    lo, c_hi, k_bits, k_vals, v_bits, v_vals = _split_ranges(
        split, bh, num_kv_heads, tokens, seq_bound, tokens_per_split, seq_lens_ptr,
        k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr, HEAD_DIM, K_CAPACITY, V_CAPACITY, HAS_SEQ_LENS)
    lane = gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0]))
    for start in range(lo, c_hi, BLOCK_N):
        # the next tile's bitmap words and value rows: 1.07-1.10x (2 tiles ahead: less; L1: same)
        nxt = start + BLOCK_N
        n_next = gl.maximum(gl.minimum(BLOCK_N, c_hi - nxt), 0)
        _prefetch_l2(k_bits + nxt * (HEAD_DIM // 32), n_next * (HEAD_DIM // 8), lane)
        _prefetch_l2(v_bits + nxt * (HEAD_DIM // 32), n_next * (HEAD_DIM // 8), lane)
        _prefetch_l2(k_vals + nxt * K_CAPACITY, n_next * (K_CAPACITY * k_vals.dtype.element_ty.primitive_bitwidth // 8), lane)
        _prefetch_l2(v_vals + nxt * V_CAPACITY, n_next * (V_CAPACITY * v_vals.dtype.element_ty.primitive_bitwidth // 8), lane)
        tk = start + tok_k
        k = _gather_tile(k_bits, k_vals, tk, tk < c_hi, chan_k, below_k, own_k, K_CAPACITY, HEAD_DIM, 0)
        p, m, l, alpha = _scores(k, start + tok_s < c_hi, q_t, m, l, qk_scale, MMA)
        tv = start + tok_v
        v_t = _gather_tile(v_bits, v_vals, tv, tv < c_hi, chan_v, below_v, own_v, V_CAPACITY, HEAD_DIM, 1)
        acc = _accumulate(v_t, p, acc, alpha, B_OP)

    if HAS_WINDOW:
        w_lo, w_hi = _window_range(lo, b, seq_bound, window, tokens_per_split, window_lens_ptr, HAS_WINDOW_LENS)
        base = b.to(gl.int64) * stride_wb + h * stride_wh
        for start in range(w_lo, w_hi, BLOCK_N):
            tk = start + tok_k
            k = gl.load(k_window_ptr + base + tk[:, None] * stride_wt + chan_k, mask=(tk < w_hi)[:, None], other=0.0)
            p, m, l, alpha = _scores(k, start + tok_s < w_hi, q_t, m, l, qk_scale, MMA)
            tv = start + tok_v
            v_t = gl.load(v_window_ptr + base + tv[None, :] * stride_wt + chan_v, mask=(tv < w_hi)[None, :], other=0.0)
            acc = _accumulate(v_t, p, acc, alpha, B_OP)

    empty = l == 0  # no token in this split (NaN in l is not empty: it must propagate)
    out = acc / gl.where(empty, 1.0, l)[None, :]
    lse = gl.where(empty, float("-inf"), m + gl.log2(gl.where(empty, 1.0, l)))
    heads = gl.arange(0, BLOCK_H, layout=COL)
    part = (bh.to(gl.int64) * gl.num_programs(0) + split) * GROUP + heads
    chans = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, MMA))
    gl.store(part_out_ptr + part[None, :] * HEAD_DIM + chans[:, None], out, mask=(heads < GROUP)[None, :])
    gl.store(part_lse_ptr + part, lse, mask=heads < GROUP)
