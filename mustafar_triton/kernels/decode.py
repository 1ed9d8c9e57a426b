"""Fused sparse decode attention ("load compressed, compute dense"), flash-decoding style.

Grid: (split of the sequence, batch * kv head). One program serves all GROUP query heads of its kv
head, times LQ query tokens per step (the LQ * GROUP rows padded to BLOCK_H >= 16 for tl.dot), so
every compressed byte is read once per step.
Each split covers a range of the virtual sequence [compressed tokens | dense window tokens]; per
tile of BLOCK_N tokens it loads the bitmap words and value rows, expands them to a dense
[BLOCK_N, D] tile in registers, and runs QK^T and PV on tensor cores with an online softmax.
`_merge_splits_kernel` combines the splits by log-sum-exp (for both decode kernels).

On GPUs with fp16 / bf16 caches the Gluon kernel (decode_gluon.py) is the default: 1.3-1.45x faster
on the H100 at sparsity 0.7. This one runs everywhere else (the interpreter, and so CI; fp32) and
stays in the tuner's space, which still picks it at a few small shapes.

Slot computation (SLOTS), i.e. where in the value row the kept channel d lives:
  "popc"   popcount of the word below d plus a per-word prefix (libdevice, GPU only; fastest
           measured on the H100)
  "lut"    a 256-entry table per bitmap byte (slot offsets and keep bits as nibbles); runs in the
           interpreter too (slower on the H100: 640-704 us vs 466-545 us, see perf/NOTES.md)
The bitmap words of the next tile are loaded one tile ahead. Triton does not pipeline the value
gathers, and pipelining them by hand measured slower (645 us vs 466 us; perf/NOTES.md).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._runtime import cdiv
from .decode_gluon_launch import GATHERS, GLUON_CONFIG, gather_supports, gluon_bucket
from .fp8 import fp8_e4m3_value
from .prune_pack import _in_head

try:  # libdevice popc: GPU only (the interpreter cannot run it)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

SLOT_MODES = ("popc", "lut")


def byte_slot_table():
    """lut[b] for every byte b: nibble i = 8 * bit_i(b) + popcount(b & ((1 << i) - 1))."""
    table = []
    for b in range(256):
        entry = 0
        for i in range(8):
            nibble = (8 if (b >> i) & 1 else 0) + bin(b & ((1 << i) - 1)).count("1")
            entry |= nibble << (4 * i)
        table.append(entry - (1 << 32) if entry >= 1 << 31 else entry)  # as int32
    return table


@triton.jit
def _load_words(bitmap_ptr, tok, tok_valid, HEAD_DIM: tl.constexpr):
    """Bitmap words [HEAD_DIM // 32 (padded to a power of two), BLOCK_N] of tokens `tok`; 0 (nothing
    kept) where invalid or padded."""
    NUM_WORDS: tl.constexpr = HEAD_DIM // 32
    w = tl.arange(0, triton.next_power_of_2(HEAD_DIM) // 32)
    words = tl.load(bitmap_ptr + tok[None, :] * NUM_WORDS + w[:, None],
                    mask=_in_head(tok_valid[None, :], 32 * w[:, None], HEAD_DIM), other=0)
    return words.to(tl.uint32, bitcast=True)


@triton.jit
def _expand_tile_t(words, values_ptr, lut_ptr, tok,
                   HEAD_DIM: tl.constexpr, CAPACITY: tl.constexpr, BLOCK_N: tl.constexpr,
                   SLOTS: tl.constexpr, FP8_VALUES: tl.constexpr = False):
    """Dense TRANSPOSED tile [HEAD_DIM (padded to a power of two), BLOCK_N] of tokens `tok` (int32
    indices into one (batch, kv head) stream whose values start at values_ptr) from their bitmap
    words.

    Channels run along dim 0 on purpose: Triton then puts a warp's lanes along the channels of
    one token, so each gathered value load touches one 80-byte value row instead of 32 rows.
    A token whose bitmap has more than CAPACITY bits (a malformed PackedKV) reads as all zeros,
    so no load ever leaves its own value row. FP8_VALUES: the values are float8_e4m3fn bits
    (uint8), returned as the float32 values they hold (unscaled).
    """
    D_TILE: tl.constexpr = triton.next_power_of_2(HEAD_DIM)
    if SLOTS == "lut":
        # Per bitmap byte, lut[byte] holds 8 nibbles: bit 3 = channel kept, bits 0-2 = its slot
        # offset within the byte's run of values. Per element: one shift, two masks, one add.
        NUM_BYTES: tl.constexpr = D_TILE // 8
        byte_shift = (tl.arange(0, 4) * 8).to(tl.uint32)
        byte = tl.reshape((words[:, None, :] >> byte_shift[None, :, None]) & 0xFF, [NUM_BYTES, BLOCK_N])
        entry = tl.load(lut_ptr + byte).to(tl.uint32, bitcast=True)            # [NB, BN]
        count = ((entry >> 28) & 7) + (entry >> 31)                            # popcount of the byte
        entry = tl.where(tl.sum(count, axis=0)[None, :] <= CAPACITY, entry, 0)
        byte_base = (tl.cumsum(count, axis=0) - count).to(tl.int32) + tok[None, :] * CAPACITY
        nibble_shift = (tl.arange(0, 8) * 4).to(tl.uint32)
        nibble = ((entry[:, None, :] >> nibble_shift[None, :, None]) & 0xF).to(tl.int32)  # [NB, 8, BN]
        offset = tl.reshape(byte_base[:, None, :] + (nibble & 7), [D_TILE, BLOCK_N])
        keep = tl.reshape(nibble >= 8, [D_TILE, BLOCK_N])
    else:
        counts = libdevice.popc(words.to(tl.int32, bitcast=True))                # [NW, BN]
        words = tl.where(tl.sum(counts, axis=0)[None, :] <= CAPACITY, words, 0)
        shifts = tl.arange(0, 32).to(tl.uint32)
        word_base = tl.cumsum(counts, axis=0) - counts + tok[None, :] * CAPACITY
        below = (tl.full([32], 1, tl.uint32) << shifts) - 1
        in_word = libdevice.popc((words[:, None, :] & below[None, :, None]).to(tl.int32, bitcast=True))
        offset = tl.reshape(word_base[:, None, :] + in_word, [D_TILE, BLOCK_N])
        keep = tl.reshape(((words[:, None, :] >> shifts[None, :, None]) & 1) != 0, [D_TILE, BLOCK_N])
    # offsets are token * CAPACITY + slot, formed in int32 so each element needs one 64-bit add
    if FP8_VALUES:
        values = fp8_e4m3_value(tl.load(values_ptr + offset, mask=keep, other=0))
    else:
        values = tl.load(values_ptr + offset, mask=keep, other=0.0)
    return values


@triton.jit
def _prefetch_rows(values_ptr, first_tok, end_tok, CAPACITY: tl.constexpr, BLOCK_N: tl.constexpr):
    """Ask L2 for the value rows of tokens [first_tok, min(first_tok + BLOCK_N, end_tok)): one
    `prefetch.global.L2` per 128-byte line (GPU only: inline PTX), so their gathers, tiles later,
    do not wait on DRAM, and no registers are held meanwhile. Lines outside the range are skipped."""
    LINE: tl.constexpr = 128 // (values_ptr.dtype.element_ty.primitive_bitwidth // 8)  # elements
    LINES: tl.constexpr = triton.next_power_of_2(triton.cdiv(BLOCK_N * CAPACITY, LINE) + 1)
    first = first_tok * CAPACITY
    offs = first - first % LINE + tl.arange(0, LINES) * LINE
    inside = (offs < end_tok * CAPACITY) & (offs + LINE > first)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r", [values_ptr + tl.maximum(offs, first), inside.to(tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _split_ranges(split, bh, num_kv_heads, tokens, seq_bound, tokens_per_split, seq_lens_ptr,
                  k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr,
                  HEAD_DIM: tl.constexpr, K_CAPACITY: tl.constexpr, V_CAPACITY: tl.constexpr,
                  HAS_SEQ_LENS: tl.constexpr, PAGE_SIZE: tl.constexpr = 0):
    """Scalar set-up shared by the decode kernels (this one and decode_gluon.py's).

    A split covers [lo, lo + tokens_per_split) of the virtual sequence [compressed tokens | window
    tokens], where the window starts at seq_bound: the host's upper bound of every sequence's
    compressed length (at most the allocation `tokens`), so splits cover what is there, not what
    is allocated. Returns the split's compressed tokens [lo, c_hi) and the (batch, kv head)
    stream's bitmap / value pointers (token offsets inside a stream stay int32). Paged caches
    (PAGE_SIZE > 0): the pointers are the pools' rows of kv head h in page 0 (a token's row is then
    _page_row's), and `tokens` is max_pages * PAGE_SIZE."""
    lo = split * tokens_per_split
    seq_len = seq_bound
    if HAS_SEQ_LENS:
        seq_len = tl.minimum(tl.load(seq_lens_ptr + bh // num_kv_heads), seq_bound)
    if PAGE_SIZE > 0:
        stream = (bh % num_kv_heads).to(tl.int64) * PAGE_SIZE
    else:
        stream = bh.to(tl.int64) * tokens
    return (lo, tl.minimum(lo + tokens_per_split, seq_len),
            k_bitmap_ptr + stream * (HEAD_DIM // 32), k_values_ptr + stream * K_CAPACITY,
            v_bitmap_ptr + stream * (HEAD_DIM // 32), v_values_ptr + stream * V_CAPACITY)


@triton.jit
def _page_row(tok, in_seq, block_table_row, num_pages, num_kv_heads, PAGE_SIZE: tl.constexpr):
    """Paged caches: the pool row (int64, from the kv head's row in page 0) of tokens `tok` of one
    sequence (block_table_row: its block-table row), and whether it is attended: in_seq and its
    block-table entry inside the pool [0, num_pages). Rows of other entries are row tok % PAGE_SIZE
    of page 0, in the pool, and must be masked by the caller."""
    page = tl.load(block_table_row + tok // PAGE_SIZE, mask=in_seq, other=-1)
    ok = in_seq & (page >= 0) & (page < num_pages)
    return tl.where(ok, page, 0).to(tl.int64) * (num_kv_heads * PAGE_SIZE) + tok % PAGE_SIZE, ok


@triton.jit
def _window_range(lo, b, seq_bound, window, tokens_per_split, window_lens_ptr, HAS_WINDOW_LENS: tl.constexpr):
    """The split's window tokens [w_lo, w_hi): window token j sits at virtual position seq_bound + j."""
    win_len = window
    if HAS_WINDOW_LENS:
        win_len = tl.minimum(tl.load(window_lens_ptr + b), window)
    return tl.maximum(lo - seq_bound, 0), tl.minimum(lo + tokens_per_split - seq_bound, win_len)


@triton.jit
def _causal_start(b, window, window_lens_ptr, LQ: tl.constexpr, HAS_WINDOW_LENS: tl.constexpr):
    """LQ query tokens: the first window token that not every query sees, w_len - LQ + 1. Query
    token i is window token w_len - LQ + i and sees the window tokens [0, w_len - LQ + i + 1):
    all of [0, w_len - LQ + 1), then the "causal tail" tokens w_len - LQ + 1 + j for j < i (those
    >= 0: a window shorter than LQ leaves the first queries fewer window tokens, or none). (w_len
    as in _window_range, which is left as it was, so the one-token kernels' SASS is unchanged.)"""
    win_len = window
    if HAS_WINDOW_LENS:
        win_len = tl.minimum(tl.load(window_lens_ptr + b), window)
    return win_len - LQ + 1


@triton.jit
def _online_softmax_step(q, k_t, v, valid, m, l, acc, qk_scale, FP32_MATH: tl.constexpr, v_scale=1.0,
                         SCALE_V: tl.constexpr = False, EXACT_WEIGHTS: tl.constexpr = False):
    """One tile of flash attention, base-2 softmax: q [BLOCK_H, D], k_t [D, BLOCK_N], v [BLOCK_N, D].
    SCALE_V: the tile's P @ V is multiplied by v_scale (fp8 values' scale).
    EXACT_WEIGHTS (16-bit v): P @ V as two products, P rounded to v's dtype and the rounding's
    remainder, so the weights keep ~16 significant bits instead of 8 (bf16) or 11 (fp16)."""
    if FP32_MATH:  # interpreter: its bf16 math is wrong, so do everything in fp32
        k_t = k_t.to(tl.float32)
        v = v.to(tl.float32)
    if k_t.dtype == tl.float32:  # fp32 caches get fp32 products, not the GPU's default tf32
        s = tl.dot(q.to(tl.float32), k_t, input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q.to(k_t.dtype), k_t) * qk_scale  # qk_scale = softmax_scale * log2(e)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if v.dtype == tl.float32:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        p_op = p.to(v.dtype)
        pv = tl.dot(p_op, v)
        if EXACT_WEIGHTS:
            pv = tl.dot((p - p_op.to(tl.float32)).to(v.dtype), v, pv)
    if SCALE_V:
        pv = pv * v_scale
    return m_new, l, acc * alpha[:, None] + pv


@triton.jit
def _sparse_decode_kernel(
    q_ptr, k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr, seq_lens_ptr, lut_ptr,
    k_window_ptr, v_window_ptr, window_lens_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_wb, stride_wh, stride_wt,
    num_kv_heads, tokens, seq_bound, window, tokens_per_split, qk_scale, stride_qt,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    K_CAPACITY: tl.constexpr, V_CAPACITY: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ_LENS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_WINDOW_LENS: tl.constexpr,
    SLOTS: tl.constexpr, PREFETCH: tl.constexpr, FP32_MATH: tl.constexpr, LQ: tl.constexpr = 1,
    block_table_ptr=None, max_pages=0, num_pages=0, PAGE_SIZE: tl.constexpr = 0,
    k_value_scale=1.0, v_value_scale=1.0, FP8_VALUES: tl.constexpr = False, EXACT_WEIGHTS: tl.constexpr = False,
):
    """FP8_VALUES: both caches hold float8_e4m3fn values (as uint8), widened exactly to q's dtype;
    K's scale multiplies the compressed tiles' scores, V's their P @ V. EXACT_WEIGHTS:
    _online_softmax_step's (sparse_decode_attention's exact_weights).
    LQ query tokens per sequence (q [B, LQ, Hq, D], token stride stride_qt): the program's rows
    are the LQ * GROUP (token, head) pairs, row r = token r // GROUP, head r % GROUP (padded to
    BLOCK_H). They all attend every compressed token and the window tokens before _causal_start;
    each of the (at most LQ - 1) causal tail tokens after it is then a step of its own, whose
    update only the rows of later query tokens keep (a select, not a masked P @ V, so a NaN / inf
    in a tail token's V never reaches a query that does not see it). LQ = 1 is the one-token
    kernel (stride_qt unused). PAGE_SIZE > 0: a paged cache (format.PagedKV), tokens looked up per
    token in block_table_ptr [B, max_pages] (this kernel's tiles may cross pages)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    offs_h = tl.arange(0, BLOCK_H)
    D_TILE: tl.constexpr = triton.next_power_of_2(HEAD_DIM)  # D=96 runs as 128, channels 96+ zero
    offs_d = tl.arange(0, D_TILE)
    ROWS: tl.constexpr = LQ * GROUP
    head_ok = offs_h < ROWS
    if LQ == 1:
        q_rows = q_ptr + b * stride_qb + (h * GROUP + offs_h)[:, None] * stride_qh
    else:
        q_rows = q_ptr + b * stride_qb + ((offs_h // GROUP) * stride_qt + (h * GROUP + offs_h % GROUP) * stride_qh)[:, None]
    q = tl.load(q_rows + offs_d[None, :], mask=_in_head(head_ok[:, None], offs_d[None, :], HEAD_DIM), other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_TILE], tl.float32)

    lo, c_hi, k_bits, k_vals, v_bits, v_vals = _split_ranges(
        split, bh, num_kv_heads, tokens, seq_bound, tokens_per_split, seq_lens_ptr,
        k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr, HEAD_DIM, K_CAPACITY, V_CAPACITY, HAS_SEQ_LENS,
        PAGE_SIZE)
    if PAGE_SIZE > 0:
        block_table_row = block_table_ptr + b.to(tl.int64) * max_pages
        for start in range(lo, c_hi, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            row, ok = _page_row(tok, tok < c_hi, block_table_row, num_pages, num_kv_heads, PAGE_SIZE)
            if tl.max(ok.to(tl.int32), axis=0) > 0:  # pages outside the pool only: all -inf scores, skipped
                k_t = _expand_tile_t(_load_words(k_bits, row, ok, HEAD_DIM), k_vals, lut_ptr, row,
                                     HEAD_DIM, K_CAPACITY, BLOCK_N, SLOTS, FP8_VALUES).to(q.dtype)
                v_t = _expand_tile_t(_load_words(v_bits, row, ok, HEAD_DIM), v_vals, lut_ptr, row,
                                     HEAD_DIM, V_CAPACITY, BLOCK_N, SLOTS, FP8_VALUES).to(q.dtype)
                m, l, acc = _online_softmax_step(q, k_t, tl.trans(v_t), ok, m, l, acc, qk_scale * k_value_scale,
                                                 FP32_MATH, v_value_scale, FP8_VALUES, EXACT_WEIGHTS)
    else:
        tok = lo + tl.arange(0, BLOCK_N)
        k_words = _load_words(k_bits, tok, tok < c_hi, HEAD_DIM)
        v_words = _load_words(v_bits, tok, tok < c_hi, HEAD_DIM)
        for start in range(lo, c_hi, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            k_t = _expand_tile_t(k_words, k_vals, lut_ptr, tok, HEAD_DIM, K_CAPACITY, BLOCK_N, SLOTS,
                                 FP8_VALUES).to(q.dtype)
            v_t = _expand_tile_t(v_words, v_vals, lut_ptr, tok, HEAD_DIM, V_CAPACITY, BLOCK_N, SLOTS,
                                 FP8_VALUES).to(q.dtype)
            # Prefetch the next tile's bitmap now, so only the value gathers wait on memory each step.
            k_words = _load_words(k_bits, tok + BLOCK_N, tok + BLOCK_N < c_hi, HEAD_DIM)
            v_words = _load_words(v_bits, tok + BLOCK_N, tok + BLOCK_N < c_hi, HEAD_DIM)
            if PREFETCH > 0:  # and the value rows PREFETCH tiles ahead
                _prefetch_rows(k_vals, start + PREFETCH * BLOCK_N, c_hi, K_CAPACITY, BLOCK_N)
                _prefetch_rows(v_vals, start + PREFETCH * BLOCK_N, c_hi, V_CAPACITY, BLOCK_N)
            m, l, acc = _online_softmax_step(q, k_t, tl.trans(v_t), tok < c_hi, m, l, acc, qk_scale * k_value_scale,
                                             FP32_MATH, v_value_scale, FP8_VALUES, EXACT_WEIGHTS)

    if HAS_WINDOW:
        w_lo, w_hi = _window_range(lo, b, seq_bound, window, tokens_per_split, window_lens_ptr, HAS_WINDOW_LENS)
        base = b.to(tl.int64) * stride_wb + h * stride_wh
        w_end = w_hi
        if LQ > 1:  # the tokens every query sees; the causal tail follows
            causal_start = _causal_start(b, window, window_lens_ptr, LQ, HAS_WINDOW_LENS)
            w_end = tl.minimum(w_hi, causal_start)
        for start in range(w_lo, w_end, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            valid = tok < w_end
            offs = base + tok[:, None] * stride_wt + offs_d[None, :]
            in_tile = _in_head(valid[:, None], offs_d[None, :], HEAD_DIM)
            k = tl.load(k_window_ptr + offs, mask=in_tile, other=0.0)
            v = tl.load(v_window_ptr + offs, mask=in_tile, other=0.0)
            m, l, acc = _online_softmax_step(q, tl.trans(k), v, valid, m, l, acc, qk_scale, FP32_MATH,
                                             EXACT_WEIGHTS=EXACT_WEIGHTS)
        if LQ > 1:
            for j in tl.static_range(LQ - 1):  # tail token t: seen by query tokens j + 1 .. LQ - 1
                t = causal_start + j
                if (t >= w_lo) & (t < w_hi):  # in this split (and >= 0)
                    valid = tl.arange(0, BLOCK_N) == 0
                    offs = base + t * stride_wt + (tl.arange(0, BLOCK_N) * 0)[:, None] + offs_d[None, :]
                    in_tile = _in_head(valid[:, None], offs_d[None, :], HEAD_DIM)
                    k = tl.load(k_window_ptr + offs, mask=in_tile, other=0.0)
                    v = tl.load(v_window_ptr + offs, mask=in_tile, other=0.0)
                    m_t, l_t, acc_t = _online_softmax_step(q, tl.trans(k), v, valid, m, l, acc, qk_scale, FP32_MATH,
                                                           EXACT_WEIGHTS=EXACT_WEIGHTS)
                    sees = offs_h // GROUP > j
                    m = tl.where(sees, m_t, m)
                    l = tl.where(sees, l_t, l)
                    acc = tl.where(sees[:, None], acc_t, acc)

    empty = l == 0  # no token in this split (NaN in l is not empty: it must propagate)
    out = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l)))
    part = (bh.to(tl.int64) * tl.num_programs(0) + split) * ROWS + offs_h
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out,
             mask=_in_head(head_ok[:, None], offs_d[None, :], HEAD_DIM))
    tl.store(part_lse_ptr + part, lse, mask=head_ok)


# Channels per split-merge program (head dims are multiples of 32).
MERGE_BLOCK_D = 32


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_splits, stride_ob, stride_oh, num_q_heads, stride_ot,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    MAX_SPLITS_POW2: tl.constexpr, LQ: tl.constexpr = 1,
):
    """out[b, (i,) hq, d block] = sum_s 2^(lse_s - lse) * out_s over the splits; lse returned in
    natural log (by the first d block). Grid (B * LQ * Hq, HEAD_DIM // BLOCK_D): at B=1 a program
    per query head alone (32 programs, 264 splits) took 17 us, a third of the whole call.
    LQ > 1: query token i = (pid // Hq) % LQ, at out's token stride stride_ot (lse contiguous
    [B, LQ, Hq]); a decode program wrote LQ * GROUP partial rows per split, row i * GROUP + g."""
    ROWS: tl.constexpr = LQ * GROUP
    pid = tl.program_id(0)
    d_block = tl.program_id(1)
    hq = pid % num_q_heads
    if LQ == 1:
        b = pid // num_q_heads
        row = hq % GROUP
        out_row = out_ptr + b * stride_ob + hq * stride_oh
    else:
        b = pid // num_q_heads // LQ
        i = (pid // num_q_heads) % LQ
        row = i * GROUP + hq % GROUP
        out_row = out_ptr + b * stride_ob + i * stride_ot + hq * stride_oh
    bh = b * (num_q_heads // GROUP) + hq // GROUP
    first = bh.to(tl.int64) * num_splits * ROWS + row   # partial row of split 0
    s_all = tl.arange(0, MAX_SPLITS_POW2)
    lse_all = tl.load(part_lse_ptr + first + s_all * ROWS, mask=s_all < num_splits, other=float("-inf"))
    m = tl.max(lse_all, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    denom = 0.0
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = s < num_splits
        lse_s = tl.load(part_lse_ptr + first + s * ROWS, mask=ok, other=float("-inf"))
        weight = tl.exp2(lse_s - m_safe)
        # not masked by weight > 0: the rows load alongside the weights instead of after them (an
        # empty split's row holds zeros)
        part = tl.load(part_out_ptr + (first + s * ROWS)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=ok[:, None], other=0.0)
        acc += tl.sum(weight[:, None] * part, axis=0)
        denom += tl.sum(weight, axis=0)
    empty = denom == 0  # every split empty; NaN must propagate, so test equality, not > 0
    out = acc / tl.where(empty, 1.0, denom)
    tl.store(out_row + offs_d, out.to(out_ptr.dtype.element_ty))
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(tl.where(empty, 1.0, denom))) * 0.6931471805599453)
    tl.store(lse_ptr + pid, lse, mask=d_block == 0)


def decode_heuristic_config(n_sms: int, interpreting: bool, **bucket) -> dict:
    """Defaults when nothing tuned applies; splits=0 means 'choose from the grid size'.
    Optional keys: maxnreg (register cap of the decode kernel), prefetch (value rows prefetched
    this many tiles ahead, GPU only; default 0), merge_warps (warps of the
    split-merge kernel, default 4), merge_block (splits it merges per step; default all of them
    up to 128). The Gluon kernel (decode_gluon.py) wherever it runs: it was the fastest at every
    H100 shape we measured."""
    if interpreting:
        return dict(BLOCK_N=32, num_warps=4, num_stages=1, num_splits=0, SLOTS="lut")
    if gluon_bucket(bucket, interpreting):
        return dict(GLUON_CONFIG)
    return dict(BLOCK_N=64, num_warps=4, num_stages=2, num_splits=0, SLOTS="popc")


def decode_config_space(**bucket) -> list[dict]:
    # Measured on the H100 (perf/results/decode_variants_h100_*.json): 8 warps, BLOCK_N=128 and the
    # "lut" expansion were slower at every shape we looked at, and stages 1 vs 2 made no difference,
    # so the space spends its time on tile length, splits, a register cap and the value prefetch.
    space = []
    for block_n in (32, 64):
        for splits in (0, -2, -4):  # fill ~2, ~4 or ~8 waves of programs (see choose_num_splits)
            for maxnreg in (None, 128):
                for prefetch in (0, 2):
                    cfg = dict(BLOCK_N=block_n, num_warps=4, num_stages=2, num_splits=splits, SLOTS="popc",
                               prefetch=prefetch)
                    if maxnreg:
                        cfg["maxnreg"] = maxnreg
                    space.append(cfg)
    # The Gluon kernel: 1-3 whole waves of one-warp programs (0, ~2 programs per SM, leaves most
    # SMs idle: 1069 us at B=16 T=16k where one wave took 364 us).
    if gluon_bucket(bucket, False):
        space += [dict(GLUON_CONFIG, num_splits=s, gather=g) for g in GATHERS for s in (-1, -2, -3)
                  if gather_supports(g, bucket["head_dim"], GLUON_CONFIG["BLOCK_N"])]
    return space


def choose_num_splits(requested: int, n_sms: int, batch_heads: int, context: int, block_n: int,
                      programs_per_sm: int = 0) -> int:
    """requested > 0: use it. Otherwise, with programs_per_sm (how many programs fit on an SM at
    once), -k: k whole waves, i.e. the largest split count whose grid fits k waves (a grid just
    over a wave nearly doubles the time: 13 splits measured 534 us where 12 took 347); without
    it, or for 0: enough splits for ~2 / ~2k programs per SM."""
    if requested > 0:
        return max(1, min(requested, cdiv(max(context, 1), block_n)))
    most = max(1, cdiv(context, 4 * block_n))  # keep >= 4 tiles per split
    if programs_per_sm and requested < 0:
        return max(1, min(-requested * programs_per_sm * n_sms // batch_heads, most, 512))
    waves = 2 if requested == 0 else -2 * requested
    want = cdiv(waves * n_sms, batch_heads)
    return max(1, min(want, most, 512))
