"""Fused sparse decode attention in Gluon (GPU only): one warp per program, gathered values land
straight in the registers of the tensor-core (mma.sync) operands. The fastest decode kernels on the
H100 and the H200; attention.py picks them wherever `gluon_decode_supports` says they run and the GPU has
mma.sync m16n8k16 (Ampere or newer).

Same grid, arguments and partial outputs as `_sparse_decode_kernel` (decode.py), whose split merge
it reuses; Gluon has no interpreter, so decode.py's kernel is the reference that CI runs.

Why it is faster than decode.py's kernel:
  * Triton's tl picks the layouts itself: there the expanded tiles go through shared memory to
    reach the tensor cores, with barriers, and q is re-read from shared memory every tile.
    Here the gathered values land directly in the mma operand layouts (Gluon lets us name them).
  * A program is ONE warp that runs its own online softmax over its split, so warps never wait
    for each other; the grid has enough splits to fill every SM with whole waves of programs.
  * Both products are "swapped" so the padded query group (its GROUP heads times LQ query
    tokens per step) is the small N = 8 (or 16) side:
        S^T [BLOCK_N, H] = K [BLOCK_N, D] @ q^T [D, H]
        O^T [D, H]      += V^T [D, BLOCK_N] @ P^T [BLOCK_N, H]
    q^T stays in registers for the whole loop, the accumulator is [D, 8], and P^T comes out of
    S^T's accumulator with a few shuffles.
  * Registers are capped (decode_gluon_launch.register_cap) so that a known number of programs
    fit per SM and the splits fill whole waves.

Three ways to gather (GATHER; decode_gluon_launch.choose_gather picks per shape; perf/NOTES.md):
  * "walk" (HEAD_DIM 64 / 128 / 256): a tile's value rows and bitmap rows are copied into shared
    memory with cp.async one tile ahead (16-byte copies, no per-element work), and each lane walks
    runs of CONSECUTIVE channels: a kept channel's slot is the previous kept channel's slot + 1,
    so an element costs a bit test, a predicated shared load and a predicated add (no popcount, no
    64-bit address). The channels of the mma operands are permuted for this (dot products do not
    care; q is loaded through the same permutation, and the output's rows are put back in channel
    order in registers before its 16-byte stores: _walk_rows_in_channel_order): K lane q of a row's
    quad holds channels [q D/4, (q+1) D/4), V^T lane group g holds [g D/8, (g+1) D/8). A run
    starts at its row's kept count before its first word: once per tile each lane counts one
    staged bitmap row into a table in shared memory (_run_starts; a malformed row is zeroed there),
    and a run's start is one byte load. Its cost follows the dense elements: H100, B=16 T=16384,
    172 us at sparsity 0.7 and 156 at 0.95 (209 / 199 on the H200 before the table).
    The walks are the gathers that read fp8 (e4m3) values (FP8_VALUES): one-byte slots, each pair
    of outputs widened by one cvt.rn.f16x2.e4m3x2 into fp16 operands whatever q's dtype (bf16
    queries enter the fp16 products scaled per query row by a power of two: _fp16_query), K's
    value scale applied to the scores, V's to the float32 accumulator once after the walk.
  * "walk_halves" (HEAD_DIM 128 / 256): the walk with q^T in shared memory (read as the mma's B
    operand per half) and each operand gathered and multiplied as two halves of D/2 channels
    (acc as two [D/2, H] halves, joined after the loop), each half permuted as a walk of D/2.
    Fewer registers live at once: 96 without spilling at D=128, so 5 programs per scheduler
    instead of 4, for more instructions: 1.5-4% faster than the walk on an H100 at sparsity 0.7-0.9
    before the walk's run-start table (perf/NOTES.md, 2026-12-06), 10-18% slower since (2026-12-07).
  * "scatter" (HEAD_DIM 64 / 128): the same staging; then each lane stores the kept values of one
    staged row into a dense tile in shared memory (a bfind per value, section below), and
    ldmatrix reads the tiles into the mma operands, each register ANDed with a mask of its bitmap
    bits: the tiles are never zeroed. Its cost follows the kept values plus a fixed ldmatrix of the
    dense tiles: H200, B=16 T=16384, 222 us at 0.7, 157 at 0.9, 119 at 0.95 (4c61e11; 234 / 163 /
    133 when it zeroed the tiles). Issue 57% busy, L1 75% at 0.9 (3.5-way conflicts on its stores).
    Where decode_gluon_launch.scatter_undoes says (capacities <= D/16: 0.95 at D=128) it keeps the
    offsets of its stores (two per register) and, once the tile is read, stores zeros there: the
    tiles, zeroed once per program, hold zeros wherever a tile keeps nothing, and ldmatrix needs no
    masks (H200, B=16 T=16384 at 0.95: 110.5 against 118.9 us; at 0.9 it loses: the undo stores
    repeat the scatter's bank conflicts).
  * "popc" (any HEAD_DIM multiple of 32): each element's slot is a masked popcount of its bitmap
    word, and the value is loaded from global memory (L2-prefetched one tile ahead). Fewer fixed
    costs per split: used below 64 tokens per split (decode_gluon_launch.MIN_STAGED_SPLIT_TOKENS)
    and for other head dims.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .decode import _causal_start, _page_row, _split_ranges, _window_range
from .decode_gluon_launch import ZERO_SLOT_BYTES
from .decode_gluon_launch import (run_start_offsets, run_start_pitch, scatter_offsets, scatter_queue_entries,
                                  scatter_undoes, stage_offsets, staged_row_pitch)


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


@gluon.constexpr_function
def _walk_layout(head_dim, k_side):
    """The layout the walk gathers in: [16 tokens, runs, bytes per run, 8 bits]. A lane holds runs
    of consecutive channels (K: D/4 channels of each of its 2 tokens, lane % 4 = the run; V: D/8
    channels of each of its 4 tokens, lane / 4 = the run). The bits of a run's bytes are
    consecutive registers (one asm instance per run: _walk_asm); for V the token pairs come first,
    as V^T's registers pair tokens. It is the mma operand layout up to a renaming of registers
    (_k_operand, _v_operand)."""
    nb = head_dim // 32 if k_side else head_dim // 64
    byte_bases = [[0, 0, 1 << i, 0] for i in range(nb.bit_length() - 1)]
    bit_bases = [[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4]]
    if k_side:
        regs = bit_bases + byte_bases + [[8, 0, 0, 0]]
        lanes = [[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]]
        shape = [16, 4, nb, 8]
    else:
        regs = [[1, 0, 0, 0]] + bit_bases + byte_bases + [[8, 0, 0, 0]]
        lanes = [[2, 0, 0, 0], [4, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]]
        shape = [16, 8, nb, 8]
    return gl.DistributedLinearLayout(regs, lanes, [], [], shape)


@gluon.constexpr_function
def _stage_decl(nbytes, zero_slot=False):
    """PTX declaration of the gathers' shared staging buffer of nbytes (2 stages of a tile's K and V
    value rows and bitmap rows). Gluon's shared-memory descriptors move whole tiles only; the
    gathers need addresses. zero_slot: also mt_zero, 16 bytes that every lane zeroes here, before
    any read (the walk's channels that a row does not keep load from it: _walk_asm)."""
    decl = ".shared .align 16 .b8 mt_dstage[%d];" % nbytes
    if zero_slot:
        assert ZERO_SLOT_BYTES == 16, "mt_zero is zeroed by one 16-byte store"
        decl += (" .shared .align 16 .b8 mt_zero[%d];"
                 " { .reg .b32 z; mov.b32 z, 0; st.shared.v4.b32 [mt_zero], {z, z, z, z}; }" % ZERO_SLOT_BYTES)
    return decl + " mov.b32 $0, $1;"


@gluon.constexpr_function
def _walk_asm(pairs, nbytes, value_bytes=2):
    """PTX of one walk instance: nbytes consecutive bitmap bytes (8 nbytes channels, a run of
    _walk_layout) of one token (pairs False, 4 nbytes outputs holding channel pairs) or of two
    tokens (pairs True, 8 nbytes outputs holding token pairs). Inputs, one per element (n = 8
    nbytes per token, elements in register order: bit, byte, and for pairs the token first): the
    shared address of the run's first slot (only the first element's is read, per token), then
    the bits: byte b's element 0 holds a word whose bits 8 (b % 4) .. 8 (b % 4) + 7 are byte b.
    The slot address is carried from byte to byte (+value_bytes per kept channel), so only the
    run's start is computed outside. value_bytes 1: fp8 (e4m3) slots, each output pair widened to
    fp16 by one cvt.rn.f16x2.e4m3x2 (exact; sm_89+).
    A channel the row does not keep loads from mt_zero (_stage_decl's zero slot) instead of its
    slot: the load is unpredicated, so nothing zeroes its register first, and ptxas then turns the
    bit tests into R2P (seven predicates from a byte in one instruction), which it does not do
    for predicates that guard loads in a loop (perf/NOTES.md, 2026-12-07 evening): sm_90 loop
    808 -> 741 instructions per tile at capacity 40 (2026-12-08). All lanes that skip read the
    same address, a broadcast: at most one more bank access per load."""
    n = 8 * nbytes
    n_out, n_in, streams = (n, 2 * n, 2) if pairs else (n // 2, n, 1)
    load = "ld.shared.u16" if value_bytes == 2 else "ld.shared.u8"
    parts = ["{ .reg .pred p; .reg .b16 h; .reg .b32 t, a0, a1, z, s, v<%d>; mov.u32 z, mt_zero;"
             " mov.u32 t, mt_dstage; add.u32 a0, t, $%d;" % (streams * n, n_out)]
    if pairs:
        parts.append("add.u32 a1, t, $%d;" % (n_out + 1))
    for st in range(streams):
        for j in range(n):  # bit test, the slot's address or the zero's, load, predicated next slot
            bits = n_out + n_in + (st + 2 * 8 * (j // 8) if pairs else 8 * (j // 8))
            mask = 1 << (8 * ((j // 8) % 4) + j % 8)
            parts.append("and.b32 t, $%d, %d; setp.ne.b32 p, t, 0; selp.b32 s, a%d, z, p; %s v%d, [s];"
                         % (bits, mask, st, load, n * st + j))
            if j + 1 < n:
                parts.append("@p add.u32 a%d, a%d, %d;" % (st, st, value_bytes))
    for k in range(n_out):  # pack on the FMA pipe (a PRMT would take the busier ALU pipe)
        lo, hi = (k, n + k) if pairs else (2 * k, 2 * k + 1)
        if value_bytes == 2:
            parts.append("mad.lo.u32 $%d, v%d, 65536, v%d;" % (k, hi, lo))
        else:
            parts.append("mad.lo.u32 t, v%d, 256, v%d; cvt.u16.u32 h, t; cvt.rn.f16x2.e4m3x2 $%d, h;" % (hi, lo, k))
    parts.append("}")
    return " ".join(parts)


@gluon.constexpr_function
def _walk_constraints(pairs, nbytes):
    """inline asm constraints of _walk_asm(pairs, nbytes)."""
    n = 8 * nbytes * (2 if pairs else 1)
    return "=r," * (n // 2) + "r," * (2 * n - 1) + "r"


@gluon.constexpr_function
def _ld_words_ptx(words):
    """PTX lines loading the registers `words` (names) from consecutive 32-bit words at [a], up to
    four per vector load (a staged bitmap row is 8- or 16-byte aligned)."""
    lines = []
    for i in range(0, len(words), 4):
        grp = words[i:i + 4]
        vec, dst = ("", grp[0]) if len(grp) == 1 else (".v%d" % len(grp), "{%s}" % ", ".join(grp))
        lines.append("ld.shared%s.u32 %s, [a+%d];" % (vec, dst, 4 * i))
    return lines


@gluon.constexpr_function
def _lds_words_asm(n):
    """PTX loading the n words of a staged bitmap row at mt_dstage + $n ($0..$n-1)."""
    parts = ["{ .reg .b32 a; mov.u32 a, mt_dstage; add.u32 a, a, $%d;" % n]
    parts += _ld_words_ptx(["$%d" % i for i in range(n)])
    parts.append("}")
    return " ".join(parts)


@gluon.jit
def _lds_word(addr):
    """The staged word at mt_dstage + addr. Not pure: it must stay after the cp.async wait."""
    return gl.inline_asm_elementwise(_lds_words_asm(1), "=r,r", [addr], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _lds_byte(addr):
    """The staged byte at mt_dstage + addr (not pure, as _lds_word)."""
    return gl.inline_asm_elementwise("{ .reg .b32 a; mov.u32 a, mt_dstage; add.u32 a, a, $1; ld.shared.u8 $0, [a]; }",
                                     "=r,r", [addr], dtype=gl.int32, is_pure=False, pack=1)


@gluon.constexpr_function
def _count_row_ptx(num_words, words, capacity):
    """PTX lines of the gathers' per-row step (the walk's _run_starts_asm, the scatter's
    _row_words_asm): load the num_words words of the staged bitmap row at [a] into the registers
    `words` (names), count them (c_j: the bits of words 0..j), and zero a row with more bits than
    `capacity` (an operand: malformed, it could point past its value row) in place, setting p, so
    that every later read of it sees a row without kept channels. Needs .pred p, .b32 a, z (zero)
    and c0..c(num_words - 1) declared."""
    vec = min(num_words, 4)
    lines = _ld_words_ptx(words)
    lines.append("popc.b32 c0, %s;" % words[0])
    for j in range(1, num_words):
        lines.append("popc.b32 c%d, %s; add.u32 c%d, c%d, c%d;" % (j, words[j], j, j, j - 1))
    lines.append("setp.gt.u32 p, c%d, %s;" % (num_words - 1, capacity))
    for i in range(0, num_words, vec):
        lines.append("@p st.shared.v%d.b32 [a+%d], {%s};" % (vec, 4 * i, ", ".join(["z"] * vec)))
    return lines


@gluon.constexpr_function
def _run_starts_asm(num_words):
    """PTX of one lane's share of a tile's run-start table: its staged bitmap row ($1: offset in
    mt_dstage of its num_words words) is counted and, if malformed (more bits than $2, its
    capacity), zeroed (_count_row_ptx); the kept count before each word, one byte per word, goes to
    mt_dstage + $3. Then the warp syncs (bar.warp.sync orders the lanes' shared-memory accesses)."""
    ws = ["w%d" % j for j in range(num_words)]
    parts = ["{ .reg .pred p; .reg .b32 a, t, z, %s, c<%d>, e<%d>;" % (", ".join(ws), num_words, max(1, num_words // 4)),
             "mov.u32 t, mt_dstage; add.u32 a, t, $1; mov.b32 z, 0;"]
    parts += _count_row_ptx(num_words, ws, "$2")
    for j in range(num_words):  # byte j of the table: c_(j-1), the bits before word j
        e = "e%d" % (j // 4)
        if j % 4 == 0:
            parts.append("mov.b32 %s, %s;" % (e, "0" if j == 0 else "c%d" % (j - 1)))
        else:
            parts.append("mad.lo.u32 %s, c%d, %d, %s;" % (e, j - 1, 1 << (8 * (j % 4)), e))
    es = ["e%d" % i for i in range(max(1, num_words // 4))]
    parts.append("add.u32 a, t, $3; st.shared%s.b32 [a], %s;" % ("" if len(es) == 1 else ".v%d" % len(es),
                                                                 es[0] if len(es) == 1 else "{%s}" % ", ".join(es)))
    parts.append("bar.warp.sync -1; mov.b32 $0, 0; }")
    return " ".join(parts)


@gluon.constexpr_function
def _row_words_asm(num_words):
    """PTX of the scatter's per-row step: the words of the staged bitmap row at mt_dstage +
    $num_words ($0..$num_words-1), zeros if the row is malformed (more bits than $(num_words + 1),
    its capacity), which is then also zeroed in place (_count_row_ptx), so that the masks
    (_ldmatrix_asm) read it as a row without kept channels."""
    ws = ["$%d" % j for j in range(num_words)]
    parts = ["{ .reg .pred p; .reg .b32 a, z, c<%d>; mov.u32 a, mt_dstage; add.u32 a, a, $%d; mov.b32 z, 0;"
             % (num_words, num_words)]
    parts += _count_row_ptx(num_words, ws, "$%d" % (num_words + 1))
    parts += ["@p mov.b32 %s, 0;" % w for w in ws]
    parts.append("}")
    return " ".join(parts)


@gluon.jit
def _run_starts(bits_off, lane, K_CAPACITY: gl.constexpr, V_CAPACITY: gl.constexpr, HEAD_DIM: gl.constexpr,
                VALUE_BYTES: gl.constexpr):
    """The staged tile's run-start table (run_start_offsets), one staged bitmap row per lane (the
    K rows at mt_dstage + bits_off, the V rows right after them), malformed rows zeroed: once per
    tile, so that each gather's run start is one byte load instead of its row's popcounts."""
    NW: gl.constexpr = HEAD_DIM // 32
    TABLE: gl.constexpr = run_start_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY, VALUE_BYTES)[0]
    gl.inline_asm_elementwise(_run_starts_asm(NW), "=r,r,r,r",
                              [bits_off + lane * staged_row_pitch(NW * 4), gl.where(lane < 16, K_CAPACITY, V_CAPACITY),
                               TABLE + lane * run_start_pitch(HEAD_DIM)], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gather_walk(bits_off, stage_off, starts_off, CAPACITY: gl.constexpr, HEAD_DIM: gl.constexpr,
                 K_SIDE: gl.constexpr, SPAN: gl.constexpr, FIRST: gl.constexpr, VALUE_BYTES: gl.constexpr = 2):
    """The staged tile's dense values of the channels [FIRST, FIRST + SPAN) (all HEAD_DIM, or a half
    for "walk_halves") in _walk_layout(SPAN) (fp16-typed bits); its bitmap rows are at
    mt_dstage + bits_off, their run starts at mt_dstage + starts_off (_run_starts, which zeroed the
    malformed rows: more bits than CAPACITY), its value rows (VALUE_BYTES per slot: 1 for fp8
    values, widened to fp16) at mt_dstage + stage_off. Tokens past the tile's end (staged with zero
    bitmap rows: _stage_rows' ZFILL; their value rows are stale) and malformed tokens read as zeros."""
    L4: gl.constexpr = _walk_layout(SPAN, K_SIDE)
    PB: gl.constexpr = gl.SliceLayout(3, L4)
    P2: gl.constexpr = gl.SliceLayout(2, PB)
    NW: gl.constexpr = HEAD_DIM // 32
    RUNS: gl.constexpr = L4.shape[1]
    NB: gl.constexpr = L4.shape[2]
    tok = gl.arange(0, 16, layout=gl.SliceLayout(1, P2))[:, None]                  # [16, 1]
    run_idx = gl.arange(0, RUNS, layout=gl.SliceLayout(0, P2))[None, :]           # [1, RUNS]
    b = gl.arange(0, NB, layout=gl.SliceLayout(0, gl.SliceLayout(1, PB)))[None, None, :]
    # per token and run: the run's first bitmap word and the slots before it (FIRST: whole words)
    w0 = (run_idx * (NB // 4) if NB >= 4 else run_idx // (4 // NB)) + FIRST // 32
    row = bits_off + tok * staged_row_pitch(NW * 4)
    before = _lds_byte(starts_off + tok * run_start_pitch(HEAD_DIM) + w0)
    own = _lds_word(row + w0 * 4)
    # per token and run: the run's bits (its first byte at bit 0, or for K at D=256 each byte of
    # its two words at bit 8 (b % 4)) and the shared address of its first slot
    if NB > 4:  # two words per run (K at D=256): bytes 4-7 read the second
        own_b = _lds_word(row + w0 * 4 + 4)
        bits3 = gl.where((b // 4) == 1, own_b[:, :, None], own[:, :, None])
        slot = before
    elif NB == 4:
        bits3 = own[:, :, None] + b * 0
        slot = before
    else:  # several runs per word: this run's bits start at bit 8 NB (run % (4 / NB))
        shift = (run_idx % (4 // NB)) * (8 * NB)
        slot = before + _popc(own & ((gl.full_like(shift, 1) << shift) - 1))
        bits3 = (own >> shift)[:, :, None] + b * 0
    addr = stage_off + tok * staged_row_pitch(CAPACITY * VALUE_BYTES) + slot * VALUE_BYTES
    z = gl.zeros([16, RUNS, NB, 8], gl.int32, L4)
    addr4, _ = gl.broadcast(addr[:, :, None, None], z)
    bits4, _ = gl.broadcast(bits3[:, :, :, None], z)
    if K_SIDE:
        return gl.inline_asm_elementwise(_walk_asm(False, NB, VALUE_BYTES), _walk_constraints(False, NB),
                                         [addr4, bits4], dtype=gl.float16, is_pure=False, pack=8 * NB)
    else:
        return gl.inline_asm_elementwise(_walk_asm(True, NB, VALUE_BYTES), _walk_constraints(True, NB),
                                         [addr4, bits4], dtype=gl.float16, is_pure=False, pack=16 * NB)


# ---------------------------------------------------------------------------------------------
# The "scatter" gather: work per KEPT value, not per channel.
#
# Each lane owns one row of the staged tile (lanes 0-15: the K rows of tokens 0-15, lanes 16-31:
# the V rows) and walks its set bits, lowest channel first: the channel of its r-th kept value is
# the leading bit of the current (bit-reversed) bitmap word (`bfind.shiftamt`), so the r-th value
# (a register, r is static) is stored with one 2-byte shared store into a dense, zeroed [16, D]
# tile at that channel. The words with bits are queued in shared memory with their dense-row
# addresses (empty words never enter the queue, so every iteration stores exactly one value);
# after the last one the queue holds sentinel words that send the remaining iterations'
# (zero) values to a dummy area. The dense tiles then reach the mma operands by ldmatrix
# (ldmatrix.trans for V^T); the channels a tile does not keep still hold what earlier tiles (or
# nothing) stored there, so each operand register is ANDed with a mask built from the tile's
# staged bitmap words by one prmt (_ldmatrix_asm). Zeroing the tiles instead cost 16 more
# 16-byte stores per lane and tile (as many shared-memory wavefronts as the ldmatrix).
# Per kept value: bfind, address, store, clear the bit, test, and every ~10 values a queue
# step; per dense element the ldmatrix (1/8 of a 16-byte access) and 1/4 of a prmt and an and.
# ---------------------------------------------------------------------------------------------

@gluon.constexpr_function
def _scatter_asm(num_words, capacity, save=False):
    """PTX of one lane's scatter. Inputs: the row's bitmap words ($1..$num_words, zero for rows
    that must read as zeros), then the offsets in mt_dstage of its value row, its dense row, its
    queue (entries 256 bytes apart: the 32 lanes' entries are contiguous) and the dummy area.
    save: the inputs start at $(capacity / 2) instead, and outputs $0..$(capacity / 2 - 1) hold the
    offsets (from mt_dstage) of its `capacity` stores, two 16-bit offsets per register, low half
    first, in store order (_undo_asm zeroes them)."""
    outs = capacity // 2 if save else 1
    w = ["$%d" % (outs + i) for i in range(num_words)]
    vrow, drow, queue, dummy = ("$%d" % (outs + num_words + i) for i in range(4))
    nvals = capacity // 2
    sentinels = scatter_queue_entries(num_words * 32, capacity) - num_words
    parts = ["{ .reg .pred pz, ps; .reg .b32 t, q, b, x, cur, base, nw, nb, p, m, a, hb, o, v<%d>;" % nvals,
             "mov.u32 t, mt_dstage; add.u32 q, t, %s; mov.u32 hb, 0x7fffffff;" % queue]
    for i in range(num_words):  # queue the words that have bits (bit-reversed: lowest channel first)
        parts.append("brev.b32 x, %s; setp.ne.b32 pz, x, 0; add.u32 b, t, %s; add.u32 b, b, %d;"
                     " @pz st.shared.v2.b32 [q], {x, b}; @pz add.u32 q, q, 256;" % (w[i], drow, 64 * i))
    parts.append("add.u32 b, t, %s; mov.u32 x, 0xffffffff;" % dummy)
    for k in range(sentinels):
        parts.append("st.shared.v2.b32 [q+%d], {x, b};" % (256 * k))
    parts.append("add.u32 q, t, %s; ld.shared.v2.b32 {cur, base}, [q]; ld.shared.v2.b32 {nw, nb}, [q+256];"
                 " add.u32 q, q, 512; add.u32 a, t, %s;" % (queue, vrow))
    for c in range(0, nvals, 4):
        parts.append("ld.shared.v4.b32 {v%d, v%d, v%d, v%d}, [a+%d];" % (c, c + 1, c + 2, c + 3, 4 * c))
    for r in range(capacity):
        val = "v%d" % (r // 2)
        if r % 2:
            parts.append("shr.b32 x, %s, 16;" % val)
            val = "x"
        parts.append("bfind.shiftamt.u32 p, cur; mad.lo.u32 a, p, 2, base; st.shared.u16 [a], %s;" % val)
        if save:  # the store's offset into half r % 2 of output r // 2
            parts.append("sub.u32 o, a, t;" + (" prmt.b32 $%d, $%d, o, 0x5410;" % (r // 2, r // 2) if r % 2
                                                else " mov.b32 $%d, o;" % (r // 2)))
        if r + 1 < capacity:  # clear the bit; an empty word hands over to the next queue entry
            parts.append("shr.b32 m, hb, p; and.b32 cur, cur, m; setp.ne.b32 ps, cur, 0;"
                         " @!ps mov.b32 cur, nw; @!ps mov.b32 base, nb;"
                         " @!ps ld.shared.v2.b32 {nw, nb}, [q]; @!ps add.u32 q, q, 256;")
    parts.append("}" if save else "mov.b32 $0, 0; }")
    return " ".join(parts)


@gluon.constexpr_function
def _undo_asm(nregs):
    """PTX: store a zero half at mt_dstage + each of the 2 * nregs 16-bit offsets packed in $1..$nregs
    (_scatter_asm's saved stores), so that the dense tiles are all zeros again."""
    parts = ["{ .reg .b32 t, x; .reg .b16 z; mov.u32 t, mt_dstage; mov.b16 z, 0;"]
    for i in range(nregs):
        parts.append("and.b32 x, $%d, 0xffff; add.u32 x, x, t; st.shared.u16 [x], z;"
                     " shr.b32 x, $%d, 16; add.u32 x, x, t; st.shared.u16 [x], z;" % (i + 1, i + 1))
    parts.append("mov.b32 $0, 0; }")
    return " ".join(parts)


@gluon.constexpr_function
def _zero_area_asm(start, end):
    """PTX: the warp zeroes mt_dstage + [start, end) (16-byte aligned bounds), 16 bytes per lane
    and step ($1: the lane)."""
    assert start % 16 == 0 and end % 16 == 0
    parts = ["{ .reg .pred p; .reg .b32 a, z; mov.b32 z, 0; mov.u32 a, mt_dstage; mad.lo.u32 a, $1, 16, a;"]
    for off in range(start, end, 512):
        if end - off >= 512:
            parts.append("st.shared.v4.b32 [a+%d], {z, z, z, z};" % off)
        else:
            parts.append("setp.lt.u32 p, $1, %d; @p st.shared.v4.b32 [a+%d], {z, z, z, z};" % ((end - off) // 16, off))
    parts.append("mov.b32 $0, 0; }")
    return " ".join(parts)


@gluon.constexpr_function
def _ldmatrix_asm(trans):
    """PTX of one ldmatrix.x4 (four 8x8 fp16 matrices from mt_dstage + $4, this lane's row) whose
    registers are then ANDed with the masks of their bitmap bits, so that the channels a tile does
    not keep read as zeros whatever the dense tile held (the scatter stores only kept channels,
    and the tiles are never zeroed). Register k holds two elements (low half first), in the
    16-channel block b (r = lane / 4, q = lane % 4):
      K (not trans): token r + 8 (k % 2), channels 16 b + 8 (k // 2) + 2q, + 1;
      V (trans):     channel 16 b + 8 (k % 2) + r, tokens 8 (k // 2) + 2q, + 1.
    Mask inputs: bitmap words (of the word holding the block) shifted so that an element's bit is
    the sign bit of byte 2 (b % 2) + e of its operand (e: the register's channel offset / 8 in
    the block); prmt replicates a byte's sign bit over a half (a selector nibble with bit 3 set),
    one prmt and one and per register. K: token r's word shifted left by 7 - 2q ($12, its low
    halves) and 6 - 2q ($20, high halves), token r + 8's ($28, $36); V: the words of tokens 2q,
    2q + 1, 2q + 8, 2q + 9 shifted left by 7 - r ($12, $20, $28, $36). $44 / $52: the prmt
    selectors of e = 0 / 1 (0xCC88 + 0x1111 (2 (b % 2) + e))."""
    if trans:  # register k: tokens 8 (k // 2) + 2q, + 1 at channel offset 8 (k % 2)
        srcs = [("$12", "$20", "$44"), ("$12", "$20", "$52"), ("$28", "$36", "$44"), ("$28", "$36", "$52")]
    else:      # register k: token r + 8 (k % 2) at channel offset 8 (k // 2)
        srcs = [("$12", "$20", "$44"), ("$28", "$36", "$44"), ("$12", "$20", "$52"), ("$28", "$36", "$52")]
    parts = ["{ .reg .b32 a, r<4>, m; mov.u32 a, mt_dstage; add.u32 a, a, $4;",
             "ldmatrix.sync.aligned.m8n8.x4%s.shared.b16 {r0, r1, r2, r3}, [a];" % (".trans" if trans else "")]
    for k in range(4):
        parts.append("prmt.b32 m, %s, %s, %s; and.b32 $%d, r%d, m;" % (srcs[k] + (k, k)))
    parts.append("}")
    return " ".join(parts)


@gluon.constexpr_function
def _ldmatrix_plain_asm(trans):
    """PTX of one ldmatrix.x4 (_ldmatrix_asm's registers and address $4; $5..$11 are the other
    copies of it that pack=8 hands over) without masks: for dense tiles that hold zeros wherever a
    tile keeps nothing (the scatter's stores undone after every tile)."""
    return ("{ .reg .b32 a; mov.u32 a, mt_dstage; add.u32 a, a, $4;"
            " ldmatrix.sync.aligned.m8n8.x4%s.shared.b16 {$0, $1, $2, $3}, [a]; }" % (".trans" if trans else ""))


@gluon.constexpr_function
def _fragment_layout(blocks):
    """[blocks, 32 lanes, 8] where [b, l, e] is element e of lane l's ldmatrix.x4 fragment of
    16x16 block b: e = e0 + 2 e1 + 4 e2 with e0 the pair's second half, e1 the matrix 8 rows
    down, e2 the matrix 8 columns right (the mma.sync m16n8k16 A operand's register order)."""
    regs = [[0, 0, 1], [0, 0, 2], [0, 0, 4]] + [[1 << i, 0, 0] for i in range(blocks.bit_length() - 1)]
    lanes = [[0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 8, 0], [0, 16, 0]]
    return gl.DistributedLinearLayout(regs, lanes, [], [], [blocks, 32, 8])


@gluon.jit
def _dense_row(dense_off, row, HEAD_DIM: gl.constexpr):
    """Offset of dense row `row` (K rows 0-15, then V rows 16-31): rows 2 D + 16 bytes apart, so the
    8 rows an ldmatrix matrix reads start in 8 bank groups, and every 8 rows 32 bytes further, so
    the rows t, t + 8, 16 + t and 24 + t, which the scatter's lanes fill at similar channels, do not
    start in the same banks. (The scatter's stores still measured 3.6-way conflicts before that
    offset and the same time after it: perf/results/h200/decode_gathers_c3329ed_bank_offsets.json.)"""
    return dense_off + row * (2 * HEAD_DIM + 16) + 32 * (row // 8)


@gluon.jit
def _fragment_words(bits_off, tok, shift, z, HEAD_DIM: gl.constexpr):
    """The staged bitmap word of token `tok` (a lane tensor) at mt_dstage + bits_off that holds
    each 16-channel block b, shifted left by `shift` and by `shift - 1` (lane tensors; the K side
    uses both, V the first), each broadcast like z [NB, 32, 8] (one value per block and lane).
    The row is loaded once."""
    NW: gl.constexpr = HEAD_DIM // 32
    blk = gl.arange(0, HEAD_DIM // 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, z.type.layout)))[:, None]
    words = gl.inline_asm_elementwise(_lds_words_asm(NW), "=r," * NW + "r",
                                      [bits_off + tok * staged_row_pitch(NW * 4)], dtype=(gl.int32,) * NW,
                                      is_pure=False, pack=1)
    w = blk * 0 + words[0][None, :]
    for j in gl.static_range(1, NW):  # each register holds one block: LLVM folds the selects
        w = gl.where(blk // 2 == j, words[j][None, :], w)
    w0, _ = gl.broadcast((w << shift[None, :])[:, :, None], z)
    w1, _ = gl.broadcast((w << (shift - 1)[None, :])[:, :, None], z)
    return w0, w1


@gluon.jit
def _ldmatrix_operand(dense_off, bits_off, A_OP: gl.constexpr, HEAD_DIM: gl.constexpr, V_SIDE: gl.constexpr,
                      MASKED: gl.constexpr = True):
    """The staged dense [16 tokens, HEAD_DIM] K tile (rows 0-15 at dense_off, _dense_row) as the
    mma A operand [16, D], or (V_SIDE) the V tile (rows 16-31) as V^T [D, 16] by ldmatrix.trans,
    with the channels that the tile's bitmap rows (at mt_dstage + bits_off) do not keep read as
    zeros (_ldmatrix_asm); not MASKED: as the tiles hold them (zeros there: _undo_asm)."""
    NB: gl.constexpr = HEAD_DIM // 16
    FL: gl.constexpr = _fragment_layout(NB)
    blk = gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, FL)))[:, None, None]
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, FL)))[None, :, None]
    lanes = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, FL)))
    z = gl.zeros([NB, 32, 8], gl.int32, FL)
    sel0, _ = gl.broadcast(0xCC88 + 0x2222 * (blk % 2), z)
    sel1 = sel0 + 0x1111
    if V_SIDE:  # matrix m = lane // 8: tokens + 8 (m // 2), channels + 8 (m % 2)
        addr = _dense_row(dense_off, 16 + (lane % 8) + 8 * (lane // 16), HEAD_DIM) + 32 * blk + 16 * ((lane // 8) % 2)
    else:       # matrix m: tokens + 8 (m % 2), channels + 8 (m // 2)
        addr = _dense_row(dense_off, (lane % 8) + 8 * ((lane // 8) % 2), HEAD_DIM) + 32 * blk + 16 * (lane // 16)
    addr, _ = gl.broadcast(addr, z)
    if not MASKED:
        frag = gl.inline_asm_elementwise(_ldmatrix_plain_asm(V_SIDE), "=r,=r,=r,=r," + "r," * 7 + "r", [addr],
                                         dtype=gl.float16, is_pure=False, pack=8)
    elif V_SIDE:
        tok = 2 * (lanes % 4)
        shift = 7 - lanes // 4
        frag = gl.inline_asm_elementwise(
            _ldmatrix_asm(True), "=r,=r,=r,=r," + "r," * 55 + "r",
            [addr, _fragment_words(bits_off, tok, shift, z, HEAD_DIM)[0], _fragment_words(bits_off, tok + 1, shift, z, HEAD_DIM)[0],
             _fragment_words(bits_off, tok + 8, shift, z, HEAD_DIM)[0], _fragment_words(bits_off, tok + 9, shift, z, HEAD_DIM)[0],
             sel0, sel1], dtype=gl.float16, is_pure=False, pack=8)
    else:
        tok = lanes // 4
        shift = 7 - 2 * (lanes % 4)
        lo_r, hi_r = _fragment_words(bits_off, tok, shift, z, HEAD_DIM)
        lo_r8, hi_r8 = _fragment_words(bits_off, tok + 8, shift, z, HEAD_DIM)
        frag = gl.inline_asm_elementwise(
            _ldmatrix_asm(False), "=r,=r,=r,=r," + "r," * 55 + "r",
            [addr, lo_r, hi_r, lo_r8, hi_r8, sel0, sel1], dtype=gl.float16, is_pure=False, pack=8)
    # [block, l4, l3, l2, l1, l0, e2, e1, e0]: rows (K: tokens) l2 + 2 l3 + 4 l4 + 8 e1, columns
    # l0 .. as 2 l0 + 4 l1 + e0 + 8 e2 (+ 16 block on the block's axis)
    f = gl.reshape(frag, [NB, 2, 2, 2, 2, 2, 2, 2, 2])
    if V_SIDE:
        t = gl.reshape(gl.permute(f, (0, 7, 1, 2, 3, 6, 4, 5, 8)), [HEAD_DIM, 16])
    else:
        t = gl.reshape(gl.permute(f, (7, 1, 2, 3, 0, 6, 4, 5, 8)), [16, HEAD_DIM])
    return gl.convert_layout(t, A_OP, assert_trivial=True)


@gluon.jit
def _scatter_tile(stage, lane, dense_off, queue_off, dummy_off,
                  K_CAPACITY: gl.constexpr, V_CAPACITY: gl.constexpr, HEAD_DIM: gl.constexpr,
                  UNDO: gl.constexpr = False):
    """Each lane stores its staged row's kept values into the dense tiles (lanes < 16: K row
    `lane` into the tile at dense_off; lanes >= 16: V row `lane - 16` into the next one). Rows of
    tokens past the tile's end (staged with zero bitmaps: _stage_rows' ZFILL) and malformed rows
    (more bits than their capacity) store nothing, and a malformed row's staged bitmap is zeroed
    (_row_words_asm), so that the masks read it as a row without kept channels. UNDO
    (decode_gluon_launch.scatter_undoes): returns the stores' offsets instead, packed
    (_scatter_asm's save), for _undo_asm."""
    NW: gl.constexpr = HEAD_DIM // 32
    V_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[0]
    KB_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[1]
    VB_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[2]
    CAP: gl.constexpr = K_CAPACITY if K_CAPACITY > V_CAPACITY else V_CAPACITY
    tok = lane % 16
    is_v = lane >= 16
    row = stage + gl.where(is_v, VB_OFF, KB_OFF) + tok * staged_row_pitch(NW * 4)
    # the row's words (zeros if malformed: then the staged row is zeroed too, for the masks)
    words = gl.inline_asm_elementwise(_row_words_asm(NW), "=r," * NW + "r,r",
                                      [row, gl.where(is_v, V_CAPACITY, K_CAPACITY)], dtype=(gl.int32,) * NW,
                                      is_pure=False, pack=1)
    vrow = stage + gl.where(is_v, V_OFF + tok * staged_row_pitch(2 * V_CAPACITY), tok * staged_row_pitch(2 * K_CAPACITY))
    args = [w for w in words]
    args = args + (vrow, _dense_row(dense_off, lane, HEAD_DIM), queue_off + lane * 8, dummy_off + lane * 0)
    if UNDO:
        return gl.inline_asm_elementwise(_scatter_asm(NW, CAP, True), "=r," * (CAP // 2) + "r," * (NW + 3) + "r",
                                         args, dtype=(gl.int32,) * (CAP // 2), is_pure=False, pack=1)
    gl.inline_asm_elementwise(_scatter_asm(NW, CAP), "=r," + "r," * (NW + 3) + "r", args,
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _k_operand(k4, A_OP: gl.constexpr, HEAD_DIM: gl.constexpr):
    """[16, 4 (run q), NB (byte b), 8 (bit i = 4 i2 + 2h + e)] -> the mma A operand [16, D]: its
    column 32b + 16 i2 + 8h + 2q + e holds channel q D/4 + 8b + i. Registers only (asserted)."""
    NB: gl.constexpr = HEAD_DIM // 32
    k = gl.reshape(gl.permute(gl.reshape(k4, [16, 4, NB, 2, 2, 2]), (0, 2, 3, 4, 1, 5)), [16, HEAD_DIM])
    return gl.convert_layout(k, A_OP, assert_trivial=True)


@gluon.jit
def _v_operand(v4, A_OP: gl.constexpr, HEAD_DIM: gl.constexpr):
    """[16 tokens, 8 (run g), NB (byte b), 8 (bit i = 2 i1 + hh)] -> the mma A operand V^T [D, 16]:
    its row 16 (4b + i1) + 8 hh + g holds channel g D/8 + 8b + i. Registers only (asserted)."""
    NB: gl.constexpr = HEAD_DIM // 64
    v = gl.reshape(gl.permute(gl.reshape(v4, [16, 8, NB, 4, 2]), (2, 3, 4, 1, 0)), [HEAD_DIM, 16])
    return gl.convert_layout(v, A_OP, assert_trivial=True)


@gluon.jit
def _operand_channel(idx, HEAD_DIM: gl.constexpr, K_SIDE: gl.constexpr, GATHER: gl.constexpr):
    """The channel in column idx of the K operand (and row idx of q^T; K_SIDE) or in row idx of V^T
    (the output O^T's rows are put back in channel order: _walk_rows_in_channel_order): the walk's
    permutation (decode_gluon.py's docstring), or idx itself."""
    if GATHER == "walk_halves":  # each half of the channels permuted as a walk of D / 2
        HALF: gl.constexpr = HEAD_DIM // 2
        return (idx // HALF) * HALF + _walk_channel(idx % HALF, HALF, K_SIDE)
    elif GATHER == "walk":
        return _walk_channel(idx, HEAD_DIM, K_SIDE)
    else:
        return idx


@gluon.constexpr_function
def _rows_first(layout):
    """The linear layout with the same lanes as `layout` and its registers reordered rows first
    (ascending), then columns: a lane's consecutive rows in consecutive registers (vector stores)."""
    rows = sorted((b for b in layout.reg_bases if b[1] == 0), key=lambda b: b[0])
    cols = [b for b in layout.reg_bases if b[1] != 0]
    return gl.DistributedLinearLayout(reg_bases=rows + cols, lane_bases=layout.lane_bases,
                                      warp_bases=layout.warp_bases, block_bases=layout.block_bases,
                                      shape=layout.shape)


@gluon.jit
def _walk_rows_in_channel_order(x, SPAN: gl.constexpr):
    """O^T [D, H] in the MMA layout with its rows in the walks' V order (_walk_channel over SPAN
    channels: row 16 b + 8 e + r, r = lane // 4, holds channel 16 r + 2 b + e at SPAN=128) -> the
    same elements with row i holding channel i, in a blocked layout where each lane holds SPAN / 8
    consecutive channels of its two (or four) columns. A relabelling of registers: the final
    convert_layout must be trivial (checked at compile time), so a wrong derivation fails to
    compile instead of storing channels in the wrong place."""
    D: gl.constexpr = x.shape[0]
    H: gl.constexpr = x.shape[1]
    t = gl.reshape(x, [D // SPAN, SPAN // 16, 2, 8, H])    # [half, b, e, r, H]
    t = gl.reshape(gl.permute(t, (0, 3, 1, 2, 4)), [D, H])  # row = half * SPAN + r * SPAN / 8 + 2 b + e
    return gl.convert_layout(t, _rows_first(t.type.layout))


@gluon.jit
def _walk_channel(idx, SPAN: gl.constexpr, K_SIDE: gl.constexpr):
    """_operand_channel of the walk's operands over SPAN channels (_k_operand, _v_operand)."""
    if K_SIDE:
        return ((idx // 2) % 4) * (SPAN // 4) + (idx // 16) * 4 + ((idx // 8) % 2) * 2 + idx % 2
    else:
        return (idx % 8) * (SPAN // 8) + (idx // 16) * 2 + (idx // 8) % 2


@gluon.jit
def _stage_rows(src_ptr, tile_start, c_hi, stage_off, lane, ROW: gl.constexpr, ZFILL: gl.constexpr = False):
    """cp.async of a tile's rows of ROW elements (16 contiguous rows from src_ptr, the row of token
    tile_start: value slots or bitmap words; rows of tokens past c_hi are not read) to
    mt_dstage + stage_off, rows _row_pitch apart, one 16-byte (8 for 8-byte rows, whose stream may be
    only 8-byte aligned) copy per lane and step. ZFILL: the rows past c_hi are staged as zeros
    (cp.async's src-size 0, its source the tile's first row), unless the tile has no token before
    c_hi (such a tile is never gathered); else they keep what the stage held."""
    ROW_BYTES: gl.constexpr = ROW * src_ptr.dtype.element_ty.primitive_bitwidth // 8
    CHUNK: gl.constexpr = 16 if ROW_BYTES % 16 == 0 else 8
    PER_ROW: gl.constexpr = ROW_BYTES // CHUNK
    NCH: gl.constexpr = 16 * PER_ROW
    PAD: gl.constexpr = staged_row_pitch(ROW_BYTES) - ROW_BYTES
    nbytes = _rows_in_tile(c_hi, tile_start, 16) * ROW_BYTES
    src = src_ptr.to(gl.pointer_type(gl.int8), bitcast=True)
    for i in gl.static_range(0, NCH, 32):
        c = i + lane
        if ZFILL:
            gl.inline_asm_elementwise(_cp_async_zfill_asm(CHUNK, NCH * CHUNK if NCH % 32 else 0), "=r,l,r,r,r",
                                      [src, stage_off + c * CHUNK + (c // PER_ROW) * PAD, c * CHUNK, nbytes],
                                      dtype=gl.int32, is_pure=False, pack=1)
        else:
            gl.inline_asm_elementwise(_cp_async_asm(CHUNK), "=r,l,r,r,r",
                                      [src + gl.minimum(c, NCH - 1) * CHUNK,
                                       stage_off + c * CHUNK + (c // PER_ROW) * PAD,
                                       c * CHUNK, nbytes],
                                      dtype=gl.int32, is_pure=False, pack=1)


@gluon.constexpr_function
def _cp_async_asm(chunk):
    """PTX: copy `chunk` bytes from global $1 to mt_dstage + $2 if $3 < $4."""
    return ("{ .reg .pred p; .reg .b32 a; setp.lt.s32 p, $3, $4; mov.u32 a, mt_dstage; add.u32 a, a, $2;"
            " @p cp.async.%s.shared.global [a], [$1], %d; mov.b32 $0, 0; }" % ("cg" if chunk == 16 else "ca", chunk))


@gluon.constexpr_function
def _cp_async_zfill_asm(chunk, limit):
    """PTX: if $4 > 0 and $3 (the chunk's offset in the tile) < limit (0: no limit): to
    mt_dstage + $2, `chunk` bytes from global $1 + $3 if $3 < $4, else `chunk` zeros (src-size 0,
    the source $1, the tile's first row: a valid address, of which nothing is read)."""
    return ("{ .reg .pred p, q; .reg .b32 a, n, o; .reg .b64 s; setp.lt.s32 p, $3, $4; setp.gt.s32 q, $4, 0;"
            " %s selp.b32 n, %d, 0, p; selp.b32 o, $3, 0, p; cvt.u64.u32 s, o; add.s64 s, $1, s;"
            " mov.u32 a, mt_dstage; add.u32 a, a, $2; @q cp.async.%s.shared.global [a], [s], %d, n; mov.b32 $0, 0; }"
            % ("setp.lt.and.s32 q, $3, %d, q;" % limit if limit else "", chunk, "cg" if chunk == 16 else "ca", chunk))


@gluon.jit
def _stage_tile(k_vals, v_vals, k_bits, v_bits, tile_start, c_hi, base, lane,
                K_CAPACITY: gl.constexpr, V_CAPACITY: gl.constexpr, HEAD_DIM: gl.constexpr,
                VALUE_BYTES: gl.constexpr = 2):
    """cp.async of a tile's rows (the four pointers: its first token's rows, _tile_source) into the
    stage at mt_dstage + base, as one commit group. A stage holds 16 K value rows, 16 V value
    rows, 16 K bitmap rows and 16 V bitmap rows, at stage_offsets, each row staged_row_pitch bytes
    apart (VALUE_BYTES: the value pointers' element size)."""
    NW: gl.constexpr = HEAD_DIM // 32
    V_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY, VALUE_BYTES)[0]
    KB_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY, VALUE_BYTES)[1]
    VB_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY, VALUE_BYTES)[2]
    _stage_rows(k_vals, tile_start, c_hi, base, lane, K_CAPACITY)
    _stage_rows(v_vals, tile_start, c_hi, base + V_OFF, lane, V_CAPACITY)
    _stage_rows(k_bits, tile_start, c_hi, base + KB_OFF, lane, NW, True)
    _stage_rows(v_bits, tile_start, c_hi, base + VB_OFF, lane, NW, True)
    _lane_asm("cp.async.commit_group; mov.b32 $0, $1;", lane)


@gluon.jit
def _tile_source(k_vals, v_vals, k_bits, v_bits, start, c_hi, block_table_row, num_pages, num_kv_heads,
                 K_CAPACITY: gl.constexpr, V_CAPACITY: gl.constexpr, HEAD_DIM: gl.constexpr,
                 PAGE_SIZE: gl.constexpr):
    """The rows of the 16-token tile at `start`: pointers to its first token's K / V value and
    bitmap rows, and the end of its attended tokens (c_hi, or `start` where a paged cache's
    block-table entry is outside the pool: the tile is then neither read nor attended). Paged
    caches: one block-table lookup per tile (PAGE_SIZE is a multiple of 16, so a tile never
    crosses a page)."""
    NW: gl.constexpr = HEAD_DIM // 32
    if PAGE_SIZE > 0:
        row, ok = _page_row(start, start < c_hi, block_table_row, num_pages, num_kv_heads, PAGE_SIZE)
        tile_hi = gl.where(ok, c_hi, start)
    else:
        row = start
        tile_hi = c_hi
    return (k_vals + row * K_CAPACITY, v_vals + row * V_CAPACITY, k_bits + row * NW, v_bits + row * NW,
            tile_hi)


@gluon.jit
def _stage_next(k_vals, v_vals, k_bits, v_bits, start, stage, c_hi, lane, STAGE: gl.constexpr,
                K_CAPACITY: gl.constexpr, V_CAPACITY: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                VALUE_BYTES: gl.constexpr = 2):
    """The staged gathers' pipeline step for the tile at `start`, staged at `stage` (0 or STAGE,
    the loop's toggle): the next tile's rows (the four pointers and c_hi: _tile_source of
    start + BLOCK_N) go into the other stage (cp.async), this tile's are waited for and made
    visible to the warp."""
    _stage_tile(k_vals, v_vals, k_bits, v_bits, start + BLOCK_N, c_hi, STAGE - stage, lane,
                K_CAPACITY, V_CAPACITY, HEAD_DIM, VALUE_BYTES)
    _lane_asm("cp.async.wait_group 1; bar.warp.sync -1; mov.b32 $0, $1;", lane)


@gluon.jit
def _lane_asm(asm: gl.constexpr, lane):
    """An asm statement run once per lane, kept in program order (returns a dummy)."""
    return gl.inline_asm_elementwise(asm, "=r,r", [lane], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _rows_in_tile(hi, start, ROWS: gl.constexpr):
    """How many of the ROWS tokens from start lie before hi (0 for a tile at or past hi)."""
    return gl.minimum(gl.maximum(hi - start, 0), ROWS)


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
    return _softmax_step(mma_v2(k, q_t, gl.zeros([k.shape[0], q_t.shape[1]], gl.float32, MMA)), valid, m, l,
                         qk_scale)


@gluon.jit
def _softmax_step(s, valid, m, l, qk_scale):
    """_scores' step from the unscaled scores S^T [BLOCK_N, H]."""
    s = gl.where(valid[:, None], s * qk_scale, float("-inf"))
    m_new = gl.maximum(m, gl.max(s, axis=0))
    alpha = gl.exp2(m - m_new)
    p = gl.exp2(s - m_new[None, :])
    return p, m_new, l * alpha + gl.sum(p, axis=0), alpha


@gluon.jit
def _accumulate(v_t, p, acc, alpha, B_OP: gl.constexpr, EXACT_WEIGHTS: gl.constexpr = False):
    """acc = O^T [D, H] rescaled, plus V^T [D, BLOCK_N] (A operand) @ P^T. Called after the V
    gather, which is issued after the scores: gathering K and V first costs ~30 more registers.
    (Skipping the rescale when no running max moved measured within noise on the H200.)
    EXACT_WEIGHTS: a second product with P's rounding remainder (decode.py's _online_softmax_step)."""
    p_op = p.to(v_t.dtype)
    acc = mma_v2(v_t, gl.convert_layout(p_op, B_OP), acc * alpha[None, :])
    if EXACT_WEIGHTS:
        acc = mma_v2(v_t, gl.convert_layout((p - p_op.to(gl.float32)).to(v_t.dtype), B_OP), acc)
    return acc


@gluon.jit
def _walk_tile(stage, start, tile_hi, lane, q_t, m, l, acc, qk_scale, tok_s, A_OP: gl.constexpr, B_OP: gl.constexpr,
               MMA: gl.constexpr, K_CAPACITY: gl.constexpr, V_CAPACITY: gl.constexpr, HEAD_DIM: gl.constexpr,
               VALUE_BYTES: gl.constexpr = 2, HALVES: gl.constexpr = False, EXACT_WEIGHTS: gl.constexpr = False):
    """One staged tile of the walk (tokens [start, tile_hi) attended): the online softmax step.
    fp8 values (VALUE_BYTES 1): q_t is fp16 (_fp16_query), qk_scale carries K's value scale (and
    q's per-row factors); V's value scale is the kernel's, on the accumulator after the walk.
    HALVES ("walk_halves"): q_t is q^T in shared memory, acc a pair of [D/2, H] halves, and each
    operand is gathered and multiplied as two D/2 halves, so fewer registers are live at once
    (_sparse_decode_gluon_kernel's comment)."""
    V_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY, VALUE_BYTES)[0]
    KB_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY, VALUE_BYTES)[1]
    VB_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY, VALUE_BYTES)[2]
    KS_OFF: gl.constexpr = run_start_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY, VALUE_BYTES)[0]
    VS_OFF: gl.constexpr = KS_OFF + 16 * run_start_pitch(HEAD_DIM)
    DT: gl.constexpr = q_t.dtype
    gl.static_assert((VALUE_BYTES == 2) or (DT == gl.float16), "fp8 values widen to fp16 operands")
    valid = start + tok_s < tile_hi
    _run_starts(stage + KB_OFF, lane, K_CAPACITY, V_CAPACITY, HEAD_DIM, VALUE_BYTES)
    if HALVES:
        H: gl.constexpr = HEAD_DIM // 2
        BLOCK_H: gl.constexpr = q_t.shape[1]
        k4 = _gather_walk(stage + KB_OFF, stage, KS_OFF, K_CAPACITY, HEAD_DIM, True, H, 0, VALUE_BYTES)
        s = mma_v2(_k_operand(k4, A_OP, H).to(DT, bitcast=True), q_t.slice(0, H).load(B_OP),
                   gl.zeros([16, BLOCK_H], gl.float32, MMA))
        k4 = _gather_walk(stage + KB_OFF, stage, KS_OFF, K_CAPACITY, HEAD_DIM, True, H, H, VALUE_BYTES)
        s = mma_v2(_k_operand(k4, A_OP, H).to(DT, bitcast=True), q_t.slice(H, H).load(B_OP), s)
        p, m, l, alpha = _softmax_step(s, valid, m, l, qk_scale)
        acc_lo, acc_hi = acc
        v4 = _gather_walk(stage + VB_OFF, stage + V_OFF, VS_OFF, V_CAPACITY, HEAD_DIM, False, H, 0, VALUE_BYTES)
        acc_lo = _accumulate(_v_operand(v4, A_OP, H).to(DT, bitcast=True), p, acc_lo, alpha, B_OP, EXACT_WEIGHTS)
        v4 = _gather_walk(stage + VB_OFF, stage + V_OFF, VS_OFF, V_CAPACITY, HEAD_DIM, False, H, H, VALUE_BYTES)
        acc_hi = _accumulate(_v_operand(v4, A_OP, H).to(DT, bitcast=True), p, acc_hi, alpha, B_OP, EXACT_WEIGHTS)
        acc = (acc_lo, acc_hi)
    else:
        k4 = _gather_walk(stage + KB_OFF, stage, KS_OFF, K_CAPACITY, HEAD_DIM, True, HEAD_DIM, 0, VALUE_BYTES)
        k = _k_operand(k4, A_OP, HEAD_DIM)
        p, m, l, alpha = _scores(k.to(DT, bitcast=True), valid, q_t, m, l, qk_scale, MMA)
        v4 = _gather_walk(stage + VB_OFF, stage + V_OFF, VS_OFF, V_CAPACITY, HEAD_DIM, False, HEAD_DIM, 0, VALUE_BYTES)
        v_t = _v_operand(v4, A_OP, HEAD_DIM)
        acc = _accumulate(v_t.to(DT, bitcast=True), p, acc, alpha, B_OP, EXACT_WEIGHTS)
    return m, l, acc


@gluon.jit
def _walk_tiles(k_vals, v_vals, k_bits, v_bits, lo, c_hi, lane, q_t, m, l, acc, qk_scale, tok_s,
                block_table_row, num_pages, num_kv_heads,
                A_OP: gl.constexpr, B_OP: gl.constexpr, MMA: gl.constexpr, K_CAPACITY: gl.constexpr,
                V_CAPACITY: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
                VALUE_BYTES: gl.constexpr = 2, HALVES: gl.constexpr = False, EXACT_WEIGHTS: gl.constexpr = False):
    """The walk over the tiles [lo, c_hi) (staged one tile ahead in mt_dstage's two stages):
    returns the online softmax's running max and sum and the accumulator O^T. A paged cache's
    block-table row, num_pages and num_kv_heads go to _tile_source. VALUE_BYTES / HALVES /
    EXACT_WEIGHTS: as in _walk_tile."""
    gl.static_assert(BLOCK_N == 16, "the walk stages 16-token tiles")
    STAGE: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY, VALUE_BYTES)[3]
    kv, vv, kb, vb, tile_hi = _tile_source(k_vals, v_vals, k_bits, v_bits, lo, c_hi, block_table_row, num_pages,
                                           num_kv_heads, K_CAPACITY, V_CAPACITY, HEAD_DIM, PAGE_SIZE)
    _stage_tile(kv, vv, kb, vb, lo, tile_hi, 0, lane, K_CAPACITY, V_CAPACITY, HEAD_DIM, VALUE_BYTES)
    stage = lo * 0  # this tile's stage offset: 0, STAGE, 0, ... (a toggle, not a division per tile)
    for start in range(lo, c_hi, BLOCK_N):
        kv, vv, kb, vb, next_hi = _tile_source(k_vals, v_vals, k_bits, v_bits, start + BLOCK_N, c_hi, block_table_row,
                                               num_pages, num_kv_heads, K_CAPACITY, V_CAPACITY, HEAD_DIM, PAGE_SIZE)
        _stage_next(kv, vv, kb, vb, start, stage, next_hi, lane, STAGE, K_CAPACITY, V_CAPACITY, HEAD_DIM, BLOCK_N,
                    VALUE_BYTES)
        # skips a paged tile outside the pool (all -inf scores: NaN from a -inf running max); always
        # true in a contiguous cache, where ptxas drops it (the same SASS as without it)
        if start < tile_hi:
            m, l, acc = _walk_tile(stage, start, tile_hi, lane, q_t, m, l, acc, qk_scale, tok_s, A_OP, B_OP, MMA,
                                   K_CAPACITY, V_CAPACITY, HEAD_DIM, VALUE_BYTES, HALVES, EXACT_WEIGHTS)
        tile_hi = next_hi
        stage = STAGE - stage
    return m, l, acc


@gluon.jit
def _scatter_step(stage, start, tile_hi, lane, q_t, m, l, acc, qk_scale, tok_s, A_OP: gl.constexpr,
                  B_OP: gl.constexpr, MMA: gl.constexpr, K_CAPACITY: gl.constexpr, V_CAPACITY: gl.constexpr,
                  HEAD_DIM: gl.constexpr, EXACT_WEIGHTS: gl.constexpr = False):
    """One staged tile of the scatter (tokens [start, tile_hi) attended): the kept values into the
    dense tiles, the tiles read back masked by the bitmap rows (or unmasked, and the stores undone
    afterwards: scatter_undoes), the online softmax step (EXACT_WEIGHTS: _accumulate's)."""
    DENSE: gl.constexpr = scatter_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[0]
    DUMMY: gl.constexpr = scatter_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[1]
    QUEUE: gl.constexpr = scatter_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[2]
    KB_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[1]
    VB_OFF: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[2]
    UNDO: gl.constexpr = scatter_undoes(HEAD_DIM, K_CAPACITY, V_CAPACITY)
    saved = _scatter_tile(stage, lane, DENSE, QUEUE, DUMMY, K_CAPACITY, V_CAPACITY, HEAD_DIM, UNDO)
    _lane_asm("bar.warp.sync -1; mov.b32 $0, $1;", lane)
    k = _ldmatrix_operand(DENSE, stage + KB_OFF, A_OP, HEAD_DIM, False, not UNDO)
    p, m, l, alpha = _scores(k.to(q_t.dtype, bitcast=True), start + tok_s < tile_hi, q_t, m, l, qk_scale, MMA)
    v_t = _ldmatrix_operand(DENSE, stage + VB_OFF, A_OP, HEAD_DIM, True, not UNDO)
    acc = _accumulate(v_t.to(q_t.dtype, bitcast=True), p, acc, alpha, B_OP, EXACT_WEIGHTS)
    # the next tile's scatter overwrites the dense tiles only after every lane has read them
    _lane_asm("bar.warp.sync -1; mov.b32 $0, $1;", lane)
    if UNDO:  # each lane zeroes what it stored: the next tile's rows start from zeros
        gl.inline_asm_elementwise(_undo_asm(len(saved)), "=r," + "r," * (len(saved) - 1) + "r", list(saved),
                                  dtype=gl.int32, is_pure=False, pack=1)
    return m, l, acc


@gluon.jit
def _scatter_tiles(k_vals, v_vals, k_bits, v_bits, lo, c_hi, lane, q_t, m, l, acc, qk_scale, tok_s,
                   block_table_row, num_pages, num_kv_heads,
                   A_OP: gl.constexpr, B_OP: gl.constexpr, MMA: gl.constexpr, K_CAPACITY: gl.constexpr,
                   V_CAPACITY: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
                   EXACT_WEIGHTS: gl.constexpr = False):
    """The scatter over the tiles [lo, c_hi): the same staging as the walk, then dense tiles and
    ldmatrix (mt_dstage laid out by scatter_offsets); returns what _walk_tiles returns."""
    gl.static_assert(BLOCK_N == 16, "the scatter stages 16-token tiles")
    STAGE: gl.constexpr = stage_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[3]
    kv, vv, kb, vb, tile_hi = _tile_source(k_vals, v_vals, k_bits, v_bits, lo, c_hi, block_table_row, num_pages,
                                           num_kv_heads, K_CAPACITY, V_CAPACITY, HEAD_DIM, PAGE_SIZE)
    _stage_tile(kv, vv, kb, vb, lo, tile_hi, 0, lane, K_CAPACITY, V_CAPACITY, HEAD_DIM)
    if scatter_undoes(HEAD_DIM, K_CAPACITY, V_CAPACITY):  # unmasked tiles: zeros before the first scatter
        DENSE: gl.constexpr = scatter_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[0]
        DUMMY: gl.constexpr = scatter_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[1]
        _lane_asm(_zero_area_asm(DENSE, DUMMY), lane)
    stage = lo * 0  # this tile's stage offset: 0, STAGE, 0, ... (a toggle, not a division per tile)
    for start in range(lo, c_hi, BLOCK_N):
        kv, vv, kb, vb, next_hi = _tile_source(k_vals, v_vals, k_bits, v_bits, start + BLOCK_N, c_hi, block_table_row,
                                               num_pages, num_kv_heads, K_CAPACITY, V_CAPACITY, HEAD_DIM, PAGE_SIZE)
        _stage_next(kv, vv, kb, vb, start, stage, next_hi, lane, STAGE, K_CAPACITY, V_CAPACITY, HEAD_DIM, BLOCK_N)
        if start < tile_hi:  # as in _walk_tiles
            m, l, acc = _scatter_step(stage, start, tile_hi, lane, q_t, m, l, acc, qk_scale, tok_s, A_OP, B_OP, MMA,
                                      K_CAPACITY, V_CAPACITY, HEAD_DIM, EXACT_WEIGHTS)
        tile_hi = next_hi
        stage = STAGE - stage
    return m, l, acc


@gluon.jit
def _fp16_query(q_t, COL: gl.constexpr):
    """bf16 q^T [D, H] as the fp16 operand of the fp8 walks (fp8 values widen to fp16 in one
    instruction per pair, to bf16 in four), each column scaled by the power of two that puts its
    largest |q| in [2^14, 2^15): exact for every element within 2^28 of its column's largest (a bf16
    value's 8 significant bits fit fp16's 11), smaller ones rounded as fp16 subnormals (errors under
    2^-39 of the column's largest, below the float32 accumulation's rounding). Returns it and the
    [H] factors (COL) that undo the scale on the scores (powers of two: every product q k is the
    bf16 operands' exactly). A column holding inf keeps it (a tiny scale: its scores are inf or NaN
    either way), NaN stays NaN; all-zero (padding) columns stay zero."""
    qf = q_t.to(gl.float32)
    amax = gl.max(gl.abs(qf), axis=0)
    # biased exponent e of amax, clamped to [15, 255]: scale 2^(141 - e), unscale 2^(e - 141), both normal
    e = gl.minimum(gl.maximum((amax.to(gl.int32, bitcast=True) >> 23) & 255, 15), 255)
    scale = ((268 - e) << 23).to(gl.float32, bitcast=True)
    unscale = ((e - 14) << 23).to(gl.float32, bitcast=True)
    return (qf * scale[None, :]).to(gl.float16), gl.convert_layout(unscale, COL)


@gluon.jit
def _load_q_t(q_ptr, b, h, stride_qb, stride_qh, stride_qt, GROUP: gl.constexpr, BLOCK_H: gl.constexpr,
              HEAD_DIM: gl.constexpr, LQ: gl.constexpr, GATHER: gl.constexpr, B_OP: gl.constexpr):
    """q^T [D, BLOCK_H] of kv head h of sequence b in the mma B operand layout, its rows in the
    gather's channel order (_operand_channel), its columns the LQ * GROUP (token, head) rows."""
    d_q = _operand_channel(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, B_OP)), HEAD_DIM, True, GATHER)
    h_q = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, B_OP))
    if LQ == 1:
        return gl.load(q_ptr + b * stride_qb + (h * GROUP + h_q)[None, :] * stride_qh + d_q[:, None],
                       mask=(h_q < GROUP)[None, :], other=0.0)
    q_rows = (h_q // GROUP) * stride_qt + (h * GROUP + h_q % GROUP) * stride_qh
    return gl.load(q_ptr + b * stride_qb + q_rows[None, :] + d_q[:, None], mask=(h_q < LQ * GROUP)[None, :], other=0.0)


@gluon.jit
def _sparse_decode_gluon_kernel(
    q_ptr, k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr, seq_lens_ptr,
    k_window_ptr, v_window_ptr, window_lens_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_wb, stride_wh, stride_wt,
    num_kv_heads, tokens, seq_bound, window, tokens_per_split, qk_scale, stride_qt,
    GROUP: gl.constexpr, BLOCK_H: gl.constexpr, HEAD_DIM: gl.constexpr,
    K_CAPACITY: gl.constexpr, V_CAPACITY: gl.constexpr, BLOCK_N: gl.constexpr,
    HAS_SEQ_LENS: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_WINDOW_LENS: gl.constexpr,
    GATHER: gl.constexpr, LQ: gl.constexpr = 1,
    block_table_ptr=None, max_pages=0, num_pages=0, PAGE_SIZE: gl.constexpr = 0,
    k_value_scale=1.0, v_value_scale=1.0, FP8_VALUES: gl.constexpr = False, EXACT_WEIGHTS: gl.constexpr = False,
):
    # FP8_VALUES (the walks only): the value pointers hold float8_e4m3fn bits (uint8), widened to
    # fp16 two at a time (bf16 queries scaled into fp16: _fp16_query); K's scale multiplies the
    # compressed tiles' scores, V's the accumulator once after them.
    # EXACT_WEIGHTS: every P @ V as two products (_accumulate; sparse_decode_attention's exact_weights).
    # LQ query tokens (decode._sparse_decode_kernel): the mma's N columns are the LQ * GROUP
    # (token, head) rows, column r = token r // GROUP, head r % GROUP (LQ * GROUP <= BLOCK_H <= 16);
    # the window up to decode._causal_start as for one token, then each causal tail token as a
    # step whose update only later query tokens' columns keep. LQ = 1: the one-token code.
    # PAGE_SIZE > 0: a paged cache (format.PagedKV), a block-table lookup per 16-token tile.
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    B_OP: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
    split = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads

    ROWS: gl.constexpr = LQ * GROUP
    q_t = _load_q_t(q_ptr, b, h, stride_qb, stride_qh, stride_qt, GROUP, BLOCK_H, HEAD_DIM, LQ, GATHER, B_OP)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    m = gl.full([BLOCK_H], float("-inf"), gl.float32, COL)
    l = gl.zeros([BLOCK_H], gl.float32, COL)
    acc = gl.zeros([HEAD_DIM, BLOCK_H], gl.float32, MMA)

    tok_k = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, A_OP))               # K rows: tokens
    chan_k = _operand_channel(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, A_OP)), HEAD_DIM, True, GATHER)[None, :]
    chan_v = _operand_channel(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, A_OP)), HEAD_DIM, False, GATHER)[:, None]
    tok_v = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, A_OP))               # V^T columns: tokens
    tok_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))

    lo, c_hi, k_bits, k_vals, v_bits, v_vals = _split_ranges(
        split, bh, num_kv_heads, tokens, seq_bound, tokens_per_split, seq_lens_ptr,
        k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr, HEAD_DIM, K_CAPACITY, V_CAPACITY, HAS_SEQ_LENS,
        PAGE_SIZE)
    block_table_row = block_table_ptr  # None unless paged
    if PAGE_SIZE > 0:
        block_table_row = block_table_ptr + b.to(gl.int64) * max_pages
    lane = gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0]))
    if (GATHER == "walk") or (GATHER == "walk_halves"):
        VALUE_BYTES: gl.constexpr = 1 if FP8_VALUES else 2
        _lane_asm(_stage_decl(run_start_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY, VALUE_BYTES)[1], True), lane)
        qk_stored = qk_scale  # the compressed tiles' (the window's stays qk_scale)
        q_w = q_t  # q^T as the walk multiplies it
        WIDEN_Q: gl.constexpr = FP8_VALUES and (q_t.dtype == gl.bfloat16)
        if FP8_VALUES:
            qk_stored = qk_scale * k_value_scale
        if WIDEN_Q:  # fp8 values widen to fp16 operands; bf16 queries join them there
            q_w, q_unscale = _fp16_query(q_t, COL)
            qk_stored = qk_stored * q_unscale[None, :]  # [1, H]: the scores are [16, H]
        if GATHER == "walk_halves":
            gl.static_assert(HEAD_DIM >= 128, "walk_halves: HEAD_DIM 128 or 256")
            # q^T in shared memory and O^T as two [D/2, H] halves: ~32 registers fewer in the loop
            # (decode_gluon_launch.register_cap); q^T is loaded again for the window, so that the
            # registers of the first load are free during the walk
            q_s = gl.allocate_shared_memory(q_w.dtype, [HEAD_DIM, BLOCK_H], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                                            q_w)
            halves = (gl.zeros([HEAD_DIM // 2, BLOCK_H], gl.float32, MMA),
                      gl.zeros([HEAD_DIM // 2, BLOCK_H], gl.float32, MMA))
            m, l, halves = _walk_tiles(k_vals, v_vals, k_bits, v_bits, lo, c_hi, lane, q_s, m, l, halves, qk_stored,
                                       tok_s, block_table_row, num_pages, num_kv_heads, A_OP, B_OP, MMA, K_CAPACITY,
                                       V_CAPACITY, HEAD_DIM, BLOCK_N, PAGE_SIZE, VALUE_BYTES, True, EXACT_WEIGHTS)
            joined = gl.permute(gl.join(halves[0], halves[1]), (2, 0, 1))  # [2, D/2, H]: the half is a register bit
            acc = gl.convert_layout(gl.reshape(joined, [HEAD_DIM, BLOCK_H]), MMA, assert_trivial=True)
            q_t = _load_q_t(q_ptr, b, h, stride_qb, stride_qh, stride_qt, GROUP, BLOCK_H, HEAD_DIM, LQ, GATHER, B_OP)
        else:
            m, l, acc = _walk_tiles(k_vals, v_vals, k_bits, v_bits, lo, c_hi, lane, q_w, m, l, acc, qk_stored, tok_s,
                                    block_table_row, num_pages, num_kv_heads, A_OP, B_OP, MMA, K_CAPACITY, V_CAPACITY,
                                    HEAD_DIM, BLOCK_N, PAGE_SIZE, VALUE_BYTES, False, EXACT_WEIGHTS)
            if WIDEN_Q:  # the window's q^T, loaded again so that the walk did not hold both
                q_t = _load_q_t(q_ptr, b, h, stride_qb, stride_qh, stride_qt, GROUP, BLOCK_H, HEAD_DIM, LQ, GATHER,
                                B_OP)
        if FP8_VALUES:  # V's value scale, once on the float32 accumulator (P is rounded unscaled)
            acc = acc * v_value_scale
    elif FP8_VALUES:
        gl.static_assert(False, "fp8 values are read by the walks only")
    elif GATHER == "scatter":
        _lane_asm(_stage_decl(scatter_offsets(HEAD_DIM, K_CAPACITY, V_CAPACITY)[3]), lane)
        m, l, acc = _scatter_tiles(k_vals, v_vals, k_bits, v_bits, lo, c_hi, lane, q_t, m, l, acc, qk_scale,
                                   tok_s, block_table_row, num_pages, num_kv_heads, A_OP, B_OP, MMA, K_CAPACITY,
                                   V_CAPACITY, HEAD_DIM, BLOCK_N, PAGE_SIZE, EXACT_WEIGHTS)
    else:
        WORD_BYTES: gl.constexpr = HEAD_DIM // 8
        below_k, own_k = _channel_masks(chan_k)
        below_v, own_v = _channel_masks(chan_v)
        if PAGE_SIZE > 0:  # the tile's rows from its page, looked up once per tile (no L2 prefetch)
            for start in range(lo, c_hi, BLOCK_N):
                kv, vv, kb, vb, tile_hi = _tile_source(k_vals, v_vals, k_bits, v_bits, start, c_hi, block_table_row,
                                                       num_pages, num_kv_heads, K_CAPACITY, V_CAPACITY, HEAD_DIM,
                                                       PAGE_SIZE)
                if start < tile_hi:  # not a page outside the pool (as in _walk_tiles)
                    k = _gather_tile(kb, kv, tok_k, start + tok_k < tile_hi, chan_k, below_k, own_k, K_CAPACITY,
                                     HEAD_DIM, 0)
                    p, m, l, alpha = _scores(k, start + tok_s < tile_hi, q_t, m, l, qk_scale, MMA)
                    v_t = _gather_tile(vb, vv, tok_v, start + tok_v < tile_hi, chan_v, below_v, own_v, V_CAPACITY,
                                       HEAD_DIM, 1)
                    acc = _accumulate(v_t, p, acc, alpha, B_OP, EXACT_WEIGHTS)
        else:
            for start in range(lo, c_hi, BLOCK_N):
                # the next tile's bitmap words and value rows: 1.07-1.10x (2 tiles ahead: less; L1: same)
                nxt = start + BLOCK_N
                n_next = _rows_in_tile(c_hi, nxt, BLOCK_N)
                _prefetch_l2(k_bits + nxt * (HEAD_DIM // 32), n_next * WORD_BYTES, lane)
                _prefetch_l2(v_bits + nxt * (HEAD_DIM // 32), n_next * WORD_BYTES, lane)
                _prefetch_l2(k_vals + nxt * K_CAPACITY, n_next * (K_CAPACITY * k_vals.dtype.element_ty.primitive_bitwidth // 8), lane)
                _prefetch_l2(v_vals + nxt * V_CAPACITY, n_next * (V_CAPACITY * v_vals.dtype.element_ty.primitive_bitwidth // 8), lane)
                tk = start + tok_k
                k = _gather_tile(k_bits, k_vals, tk, tk < c_hi, chan_k, below_k, own_k, K_CAPACITY, HEAD_DIM, 0)
                p, m, l, alpha = _scores(k, start + tok_s < c_hi, q_t, m, l, qk_scale, MMA)
                tv = start + tok_v
                v_t = _gather_tile(v_bits, v_vals, tv, tv < c_hi, chan_v, below_v, own_v, V_CAPACITY, HEAD_DIM, 1)
                acc = _accumulate(v_t, p, acc, alpha, B_OP, EXACT_WEIGHTS)

    if HAS_WINDOW:
        w_lo, w_hi = _window_range(lo, b, seq_bound, window, tokens_per_split, window_lens_ptr, HAS_WINDOW_LENS)
        base = b.to(gl.int64) * stride_wb + h * stride_wh
        w_end = w_hi
        if LQ > 1:  # the tokens every query sees; the causal tail follows
            causal_start = _causal_start(b, window, window_lens_ptr, LQ, HAS_WINDOW_LENS)
            w_end = gl.minimum(w_hi, causal_start)
        for start in range(w_lo, w_end, BLOCK_N):
            tk = start + tok_k
            k = gl.load(k_window_ptr + base + tk[:, None] * stride_wt + chan_k, mask=(tk < w_end)[:, None], other=0.0)
            p, m, l, alpha = _scores(k, start + tok_s < w_end, q_t, m, l, qk_scale, MMA)
            tv = start + tok_v
            v_t = gl.load(v_window_ptr + base + tv[None, :] * stride_wt + chan_v, mask=(tv < w_end)[None, :], other=0.0)
            acc = _accumulate(v_t, p, acc, alpha, B_OP, EXACT_WEIGHTS)
        if LQ > 1:
            sees_after = gl.arange(0, BLOCK_H, layout=COL) // GROUP  # a column's query token
            for j in gl.static_range(LQ - 1):  # tail token t: seen by query tokens j + 1 .. LQ - 1
                t = causal_start + j
                if (t >= w_lo) & (t < w_hi):  # in this split (and >= 0)
                    k = gl.load(k_window_ptr + base + t * stride_wt + tok_k[:, None] * 0 + chan_k,
                                mask=(tok_k == 0)[:, None], other=0.0)
                    p, m_t, l_t, alpha = _scores(k, tok_s == 0, q_t, m, l, qk_scale, MMA)
                    v_t = gl.load(v_window_ptr + base + t * stride_wt + tok_v[None, :] * 0 + chan_v,
                                  mask=(tok_v == 0)[None, :], other=0.0)
                    acc_t = _accumulate(v_t, p, acc, alpha, B_OP, EXACT_WEIGHTS)
                    sees = sees_after > j
                    m = gl.where(sees, m_t, m)
                    l = gl.where(sees, l_t, l)
                    acc = gl.where(sees[None, :], acc_t, acc)

    empty = l == 0  # no token in this split (NaN in l is not empty: it must propagate)
    out = acc / gl.where(empty, 1.0, l)[None, :]
    lse = gl.where(empty, float("-inf"), m + gl.log2(gl.where(empty, 1.0, l)))
    heads = gl.arange(0, BLOCK_H, layout=COL)
    part = (bh.to(gl.int64) * gl.num_programs(0) + split) * ROWS + heads
    gl.store(part_lse_ptr + part, lse, mask=heads < ROWS)
    if (GATHER == "walk") or (GATHER == "walk_halves"):
        # each lane holds runs of consecutive channels of O^T (16 at D=128): stored in channel
        # order, vector stores (the permuted order took one 4-byte store per element)
        out = _walk_rows_in_channel_order(out, HEAD_DIM if GATHER == "walk" else HEAD_DIM // 2)
    # O^T's rows are in channel order for every gather (the walks reordered theirs above)
    OUT_L: gl.constexpr = out.type.layout
    heads = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, OUT_L))
    part = (bh.to(gl.int64) * gl.num_programs(0) + split) * ROWS + heads
    chans = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, OUT_L))
    gl.store(part_out_ptr + part[None, :] * HEAD_DIM + chans[:, None], out, mask=(heads < ROWS)[None, :])
