"""prune_and_pack in Gluon (GPU only): per-token top-k counted on the tensor cores.

On the H100 at [16, 8, 16384, 128] fp16, sparsity 0.7, it takes 348 us (~70% of the copy bandwidth;
perf/results/prune_gluon_ab_36c5839_variants.json); prune_pack.py's `_select_kernel` took 1313 us
(perf/results/prune_gluon_ab_ba17925.json). Same output, bit for bit: compress.py picks this
kernel for prune_and_pack wherever `prune_pack.gluon_prune_supports` says it runs, and
`_select_kernel` (which CI runs under the interpreter) stays the reference.

One warp per program, 16 tokens (rows) per program, each row's D values spread over the four
lanes of a quad in the layout of an mma.sync A operand (8 consecutive channels per register
group, so the loads are 16-byte vectors):
  * Top-k threshold tau: the largest 15-bit magnitude m with count(m >= tau) >= keep, found one
    bit at a time, with every row's count from mmas against a ones matrix. The count lands in
    every lane of the row's quad, so a step needs no shuffle (`_lanes_view`: the same registers
    seen as [rows, quad lane, D/4]). Compares are the cost, so most of them run on bytes:
      - bits 14..8 on the magnitudes' high bytes, bits 7..1 on the low bytes of m clamped to the
        row's 256-value bucket, >> 1. Both are 7-bit integers packed four per register, and one
        add per register and step counts them (`_bisect_bytes`: an int8 sign trick; the add runs
        on the FMA pipe, the fp16 compares it replaces on the ALU pipe, which bound this kernel);
      - bit 0 compares whole values, two at a time (HSET2 on the magnitude bits read as fp16:
        for non-NaN bit patterns fp16 order is integer order; "unordered" geu counts NaN patterns
        above everything, as the integer order does).
    The byte steps are exact integer compares. The fp16 ones are exact unless a row's threshold
    reaches the inf / NaN patterns (>= keep such magnitudes; bf16 values >= 2^121 too): then
    the whole block redoes the search with exact integer compares (a branch real data never
    takes).
  * Ties at the threshold go to the lowest channels: per element, v = 1 above the threshold,
    256 tied, 0 below; two more mmas give per byte of channels (8 channels) the above / tied
    counts of the bytes after it and the byte's own bits, from which each byte knows its kept
    bits and its first value slot without any cross-lane scan.
  * Values are scattered into a shared-memory staging row (2-byte stores at consecutive slots,
    unused slots zeroed first) and leave as 16-byte stores, like the bitmap words.
The shared staging buffer is declared in PTX (`mt_stage`): Gluon's shared-memory descriptors
only load and store whole tiles, and the scatter needs per-element addresses.

Shapes: fp16 / bf16, HEAD_DIM 64, 128 or 256 (the per-byte mma needs N = D / 8 >= 8).

PAGED (compress.write_pages): as prune_pack.py's `_select_kernel` with PAGED, each row goes to the
row of its slot in a page pool, and rows whose slot is outside the pool are neither read nor
written. Only the final stores' addresses and masks change (prune_pack._paged_rows, a tl function).
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .decode_gluon import _popc
from .prune_pack import GLUON_PRUNE_HEAD_DIMS, _paged_rows

ROWS = 16  # tokens per program: 32 (two mma row tiles) needed 213 registers and spilled under a cap


def register_cap(head_dim: int) -> int:
    """No spills with or without seq_lens (sm_90, ptxas of triton 3.6; 90 registers at D=128).
    Occupancy is not the limit: at D=128 a cap of 88 ran as fast as this one (348 us, at 36c5839)."""
    return 112 if head_dim <= 128 else 160



@gluon.jit
def _pair_op(asm: gl.constexpr, a, b):
    """An asm op on fp16 pairs (two values per 32-bit register)."""
    return gl.inline_asm_elementwise(asm, "=r,r,r", [a, b], dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _smem_op(asm: gl.constexpr, offset, value):
    """An asm op on the staging buffer; returns a dummy int32 so it is not dropped."""
    return gl.inline_asm_elementwise(asm, "=r,r,r", [offset, value], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _warp_sync(lane):
    """Orders this warp's shared-memory stores before its loads (the program is one warp)."""
    gl.inline_asm_elementwise("bar.warp.sync -1; mov.b32 $0, $1;", "=r,r", [lane], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _lanes_view(t, HEAD_DIM: gl.constexpr):
    """[R, D] in the mma A layout -> [R, 4, D/4], dim 1 = the lane within the row's quad.
    Reshapes and a permute only: the registers stay where they are."""
    R: gl.constexpr = t.shape[0]
    return gl.reshape(gl.permute(gl.reshape(t, [R, HEAD_DIM // 32, 4, 8]), (0, 2, 1, 3)), [R, 4, HEAD_DIM // 4])


@gluon.jit
def _operand_view(t4, A_OP: gl.constexpr, HEAD_DIM: gl.constexpr):
    """The inverse of _lanes_view, as an mma A operand (asserted free of data movement)."""
    R: gl.constexpr = t4.shape[0]
    t = gl.reshape(gl.permute(gl.reshape(t4, [R, 4, HEAD_DIM // 32, 8]), (0, 2, 1, 3)), [R, HEAD_DIM])
    return gl.convert_layout(t, A_OP, assert_trivial=True)


@gluon.jit
def _ge01(m4, cand, EXACT: gl.constexpr):
    """fp16 1.0 where the magnitude bits m4 [R, 4, D/4] are >= the row's cand [R, 4] (int32,
    <= 0x8000), else 0.0. EXACT: m4 carries bit 15 set, and m - c per 16-bit half keeps bit 15
    exactly when m >= c (no borrow crosses into the other half)."""
    cf = cand.to(gl.int16).to(gl.float16, bitcast=True)
    cb, _ = gl.broadcast(cf[:, :, None], m4)
    if EXACT:
        return _pair_op("{ .reg .b32 t, c; mov.b32 c, $2; sub.u32 t, $1, c; shr.u32 t, t, 15;"
                        " and.b32 t, t, 0x00010001; mul.lo.u32 $0, t, 0x3C00; }", m4, cb)
    else:
        return _pair_op("set.geu.f16x2.f16x2 $0, $1, $2;", m4, cb)


@gluon.jit
def _above_or_tied(m4, tau, EXACT: gl.constexpr):
    """Per element, fp16: 1.0 above the row's threshold tau, 256.0 equal to it, 0.0 below."""
    ge = _ge01(m4, tau, EXACT)
    gt = _ge01(m4, tau + 1, EXACT)
    return _pair_op("{ .reg .b32 t, k; mov.b32 k, 0x5BF85BF8; sub.f16x2 t, $1, $2; fma.rn.f16x2 $0, t, k, $1; }",
                    ge, gt)  # ge + 255 * (ge - gt)


@gluon.jit
def _halves(t4):
    """[R, 4, W] (W a register dim) -> its two [R, 4, W / 2] halves, registers only."""
    R: gl.constexpr = t4.shape[0]
    W: gl.constexpr = t4.shape[2]
    return gl.split(gl.permute(gl.reshape(t4, [R, 4, 2, W // 2]), (0, 1, 3, 2)))


@gluon.jit
def _per_quad_lane(acc, QUAD: gl.constexpr):
    """An mma accumulator [R, 8] whose columns all hold the row's value -> [R, 4] in QUAD: lane q
    of the row's quad holds columns 2q, 2q + 1, so this only picks registers."""
    R: gl.constexpr = acc.shape[0]
    c, _ = gl.split(gl.reshape(acc, [R, 4, 2]))
    return gl.convert_layout(c, QUAD, assert_trivial=True)


@gluon.jit
def _row_sum(t4, A_OP: gl.constexpr, MMA: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Per row: the sum of t4 [R, 4, HEAD_DIM / 4] (fp16, or int8 read as signed), as [R, 4] in the
    quad layout (fp32 / int32), from mmas against ones. Each half of the row is its own chain of
    mmas: one chain of D / 16 dependent mmas was a bisection step's latency (9baba16: 433 ->
    414 us)."""
    R: gl.constexpr = t4.shape[0]
    ACC: gl.constexpr = gl.int32 if t4.dtype == gl.int8 else gl.float32
    ones = gl.full([HEAD_DIM // 2, 8], 1, t4.dtype, gl.DotOperandLayout(1, MMA, 8))
    lo, hi = _halves(t4)
    zero = gl.zeros([R, 8], ACC, MMA)
    acc = (mma_v2(_operand_view(lo, A_OP, HEAD_DIM // 2), ones, zero)
           + mma_v2(_operand_view(hi, A_OP, HEAD_DIM // 2), ones, zero))
    return _per_quad_lane(acc, gl.SliceLayout(2, t4.type.layout))


@gluon.jit
def _compare_step(m4, tau, bit, keep, EXACT: gl.constexpr, A_OP: gl.constexpr, MMA: gl.constexpr,
                  HEAD_DIM: gl.constexpr):
    """One bisection step on whole values: tau | bit if count(m >= tau | bit) >= keep, else tau."""
    cand = tau | bit
    return gl.where(_row_sum(_ge01(m4, cand, EXACT), A_OP, MMA, HEAD_DIM) >= keep, cand, tau)


@gluon.jit
def _bisect_bytes(x, keep, A_OP: gl.constexpr, MMA: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Per row: the largest 7-bit t with count(x >= t) >= keep, for x int8 [R, 4, D / 4] in
    [0, 127] (four per register). A byte x + 128 - c (x, c < 128) has bit 7 set exactly when
    x >= c, so read as int8 it is x + 128 - c - 256 [x >= c]: the row's int8 sum gives the count,
    with one 32-bit add per four values (ptxas puts it on the FMA pipe) where fp16 compares
    take two ALU-pipe instructions. H100, [16, 8, 16384, 128] fp16 s=0.7: 414 us with 15 fp16
    steps, 367 with bits 14..8 on bytes, 348 with bits 14..1
    (perf/results/prune_gluon_ab_36c5839_*.json)."""
    R: gl.constexpr = x.shape[0]
    QUAD: gl.constexpr = gl.SliceLayout(2, x.type.layout)
    base = _row_sum(x, A_OP, MMA, HEAD_DIM) + 128 * HEAD_DIM - 256 * keep
    t = gl.zeros([R, 4], gl.int32, QUAD)
    for i in gl.static_range(7):
        cand = t | (1 << (6 - i))
        k, _ = gl.broadcast(((128 - cand) * 0x01010101)[:, :, None], x)
        b = gl.inline_asm_elementwise("add.u32 $0, $1, $2;", "=r,r,r,r,r,r", [x, k], dtype=gl.int8,
                                      is_pure=True, pack=4)
        # 256 count = sum(x) + n (128 - cand) - sum(b) >= 256 keep
        t = gl.where(base - HEAD_DIM * cand - _row_sum(b, A_OP, MMA, HEAD_DIM) >= 0, cand, t)
    return t


@gluon.jit
def _threshold(m4, keep, A_OP: gl.constexpr, MMA: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Per row: tau (see the module docstring) as [R, 4], every lane of a row's quad holding the
    row's value; exact unless tau >= 0x7C00 (then `_bisect_exact`)."""
    high = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7531;", "=r,r,r", [m4], dtype=gl.int8,
                                     is_pure=True, pack=4)  # bits 14..8 of four magnitudes
    lo = _bisect_bytes(high, keep, A_OP, MMA, HEAD_DIM) << 8
    lo_pair, _ = gl.broadcast((lo | (lo << 16))[:, :, None], m4)
    # the low byte of clamp(m, lo, lo + 255) (m - lo inside the bucket, 0 below it, 255 above it) >> 1
    low = gl.inline_asm_elementwise(
        "{ .reg .b32 a, b, h; or.b32 h, $3, 0x00ff00ff; max.u16x2 a, $1, $3; min.u16x2 a, a, h;"
        " max.u16x2 b, $2, $3; min.u16x2 b, b, h; prmt.b32 a, a, b, 0x6420; shr.b32 a, a, 1; and.b32 $0, a, 0x7f7f7f7f; }",
        "=r,r,r,r,r,r,r", [m4, lo_pair], dtype=gl.int8, is_pure=True, pack=4)
    tau = lo | (_bisect_bytes(low, keep, A_OP, MMA, HEAD_DIM) << 1)
    return _compare_step(m4, tau, 1, keep, False, A_OP, MMA, HEAD_DIM)


@gluon.jit
def _bisect_exact(m4, keep, A_OP: gl.constexpr, MMA: gl.constexpr, HEAD_DIM: gl.constexpr):
    """tau by 15 integer-exact compare steps (m4 with bit 15 set, see _ge01)."""
    QUAD: gl.constexpr = gl.SliceLayout(2, m4.type.layout)
    tau = gl.zeros([m4.shape[0], 4], gl.int32, QUAD)
    for i in gl.static_range(15):
        tau = _compare_step(m4, tau, 1 << (14 - i), keep, True, A_OP, MMA, HEAD_DIM)
    return tau


@gluon.jit
def _drop_high_bits(t, n):
    """t with its n highest set bits cleared (n <= popcount(t)); n is almost always 0."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 w, c, h; .reg .pred p; mov.b32 w, $1; mov.b32 c, $2;"
        " LOOP${:uid}: setp.le.s32 p, c, 0; @p bra DONE${:uid};"
        " bfind.u32 h, w; shl.b32 h, 1, h; xor.b32 w, w, h; sub.s32 c, c, 1; bra LOOP${:uid};"
        " DONE${:uid}: mov.b32 $0, w; }",
        "=r,r,r", [t, n], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _scatter_byte(x8, info):
    """Per (row, byte of 8 channels): the kept values among x8 (8 fp16-typed values) go to
    consecutive 2-byte slots of the staging buffer. info = kept bits | first slot's byte offset / 2 << 8."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 a, k, t, u; .reg .pred p; .reg .b16 h;"
        " mov.u32 a, mt_stage; shr.u32 t, $12, 7; and.b32 t, t, -2; add.u32 a, a, t; and.b32 k, $12, 255;"
        " and.b32 t, k, 1; setp.ne.b32 p, t, 0; cvt.u16.u32 h, $8; @p st.shared.b16 [a], h; @p add.u32 a, a, 2;"
        " and.b32 t, k, 2; setp.ne.b32 p, t, 0; mul.hi.u32 u, $8, 65536; cvt.u16.u32 h, u; @p st.shared.b16 [a], h; @p add.u32 a, a, 2;"
        " and.b32 t, k, 4; setp.ne.b32 p, t, 0; cvt.u16.u32 h, $9; @p st.shared.b16 [a], h; @p add.u32 a, a, 2;"
        " and.b32 t, k, 8; setp.ne.b32 p, t, 0; mul.hi.u32 u, $9, 65536; cvt.u16.u32 h, u; @p st.shared.b16 [a], h; @p add.u32 a, a, 2;"
        " and.b32 t, k, 16; setp.ne.b32 p, t, 0; cvt.u16.u32 h, $10; @p st.shared.b16 [a], h; @p add.u32 a, a, 2;"
        " and.b32 t, k, 32; setp.ne.b32 p, t, 0; mul.hi.u32 u, $10, 65536; cvt.u16.u32 h, u; @p st.shared.b16 [a], h; @p add.u32 a, a, 2;"
        " and.b32 t, k, 64; setp.ne.b32 p, t, 0; cvt.u16.u32 h, $11; @p st.shared.b16 [a], h; @p add.u32 a, a, 2;"
        " and.b32 t, k, 128; setp.ne.b32 p, t, 0; mul.hi.u32 u, $11, 65536; cvt.u16.u32 h, u; @p st.shared.b16 [a], h;"
        " mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0; mov.b32 $4, 0; mov.b32 $5, 0;"
        " mov.b32 $6, 0; mov.b32 $7, 0; }",
        "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r",
        [x8, info], dtype=gl.int32, is_pure=False, pack=8)


@gluon.jit
def _prune_pack_gluon_kernel(
    x_ptr, bitmap_ptr, values_ptr, seq_lens_ptr, slot_mapping_ptr,
    n_rows, tokens_per_seq, rows_per_batch, keep, num_heads, page_size, num_slots,
    HEAD_DIM: gl.constexpr, CAPACITY: gl.constexpr, HAS_SEQ_LENS: gl.constexpr, PAGED: gl.constexpr,
    STAGE_DECL: gl.constexpr,
):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(0, MMA, 8)  # 8 consecutive channels per lane: 16-byte loads
    B_OP: gl.constexpr = gl.DotOperandLayout(1, MMA, 8)
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    LANE: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    NB: gl.constexpr = HEAD_DIM // 8  # bitmap bytes per row
    STAGE_VALUES: gl.constexpr = 16 * CAPACITY * 2  # staging: the block's value rows, then its bitmap bytes

    lane = gl.arange(0, 32, layout=LANE)
    _smem_op(STAGE_DECL, lane, lane)  # declares mt_stage (one instance: one register per lane)

    row0 = gl.program_id(0) * 16
    rows = row0 + gl.arange(0, 16, layout=gl.SliceLayout(1, A_OP))
    valid = rows < n_rows
    if HAS_SEQ_LENS:
        seq_len = gl.load(seq_lens_ptr + rows // rows_per_batch, mask=valid, other=0)
        valid = valid & ((rows % tokens_per_seq) < seq_len)
    if PAGED:  # rows that are not written are not read
        _, written = _paged_rows(rows, n_rows, slot_mapping_ptr, num_heads, page_size, num_slots)
        valid = valid & written
    ch = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, A_OP))
    x_ptrs = x_ptr + rows.to(gl.int64)[:, None] * HEAD_DIM + ch[None, :]
    x = gl.load(x_ptrs, mask=valid[:, None], other=0.0).to(gl.float16, bitcast=True)
    m4 = _lanes_view(_pair_op("and.b32 $0, $1, 0x7fff7fff;", x, x), HEAD_DIM)  # magnitude bits

    tau = _threshold(m4, keep, A_OP, MMA, HEAD_DIM)
    if gl.max(gl.max(tau, axis=1), axis=0) >= 0x7C00:  # see the module docstring
        m4 = _pair_op("or.b32 $0, $1, 0x80008000;", m4, m4)
        tau = _bisect_exact(m4, keep, A_OP, MMA, HEAD_DIM)
        v = _operand_view(_above_or_tied(m4, tau, True), A_OP, HEAD_DIM)
    else:
        v = _operand_view(_above_or_tied(m4, tau, False), A_OP, HEAD_DIM)

    # Per byte n of a row: above + 256 * tied counted over the bytes after n, and n's own bits.
    k = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, B_OP))[:, None]
    n = gl.arange(0, NB, layout=gl.SliceLayout(0, B_OP))[None, :]
    b_after = gl.where(k // 8 > n, 1.0, 0.0).to(gl.float16)
    b_bits = gl.where(k // 8 == n, (1 << (k % 8)).to(gl.float32), 0.0).to(gl.float16)
    zero = gl.zeros([16, NB], gl.float32, MMA)
    after = mma_v2(v, b_after, zero).to(gl.int32)
    bits = mma_v2(v, b_bits, zero).to(gl.int32)
    a_after = after & 255
    t_after = after >> 8
    t_bits = bits >> 8
    # ties beyond keep are dropped from the highest channel down: excess = count(m >= tau) - keep,
    # from one more count on the tensor cores (above + 256 * tied, summed over the row)
    ones = gl.full([HEAD_DIM, 8], 1.0, gl.float16, B_OP)
    total = gl.max(mma_v2(v, ones, gl.zeros([16, 8], gl.float32, MMA)), axis=1).to(gl.int32)
    excess = ((total & 255) + (total >> 8) - keep)[:, None]
    drop = gl.minimum(gl.maximum(excess - t_after, 0), _popc(t_bits))
    kept = (bits & 255) | _drop_high_bits(t_bits, drop)
    kept = gl.where(gl.convert_layout(valid, ROW)[:, None], kept, 0)  # invalid rows: all zero
    slot_end = keep - a_after - gl.maximum(t_after - excess, 0)  # keep - (kept values after byte n)
    r_local = gl.arange(0, 16, layout=ROW)[:, None]
    info = kept | ((r_local * CAPACITY + slot_end - _popc(kept)) << 8)

    # Stage: zero the value rows, scatter the kept values and the bitmap bytes.
    NZ: gl.constexpr = STAGE_VALUES // 16
    for i in gl.static_range(0, NZ, 32):
        zi = i + gl.arange(0, 32, layout=LANE)
        _smem_op("{ .reg .pred p; .reg .b32 a; setp.ge.s32 p, $1, 0; mov.u32 a, mt_stage; add.u32 a, $1, a;"
                 " @p st.shared.v4.b32 [a], {0, 0, 0, 0}; mov.b32 $0, $2; }", gl.where(zi < NZ, zi * 16, -1), zi)
    _warp_sync(lane)
    # x again (an L1 / L2 hit): keeping it through the bisection cost 32 registers per thread
    x3 = gl.reshape(gl.load(x_ptrs, mask=valid[:, None], other=0.0).to(gl.float16, bitcast=True), [16, NB, 8])
    info3 = gl.convert_layout(info, gl.SliceLayout(2, x3.type.layout))
    info3, _ = gl.broadcast(info3[:, :, None], x3)
    _scatter_byte(x3, info3)
    byte_offset = r_local * NB + gl.arange(0, NB, layout=gl.SliceLayout(0, MMA))[None, :] + STAGE_VALUES
    _smem_op("{ .reg .b32 a; mov.u32 a, mt_stage; add.u32 a, a, $1; st.shared.b8 [a], $2; mov.b32 $0, 0; }",
             byte_offset, kept)
    _warp_sync(lane)

    # Out in 16-byte chunks; rows past n_rows (PAGED: rows without a slot in the pool) are not written.
    CL: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [1, 1], [1, 0])
    CHUNKS_PER_ROW: gl.constexpr = CAPACITY * 2 // 16
    NCH: gl.constexpr = 16 * CHUNKS_PER_ROW
    values_i32 = values_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    for i in gl.static_range(0, NCH, 32):
        c = i + gl.arange(0, 32, layout=gl.SliceLayout(1, CL))
        j4 = gl.arange(0, 4, layout=gl.SliceLayout(0, CL))[None, :]
        cw, _ = gl.broadcast(c[:, None] * 4 + j4, gl.zeros([32, 4], gl.int32, CL))
        vals = gl.inline_asm_elementwise(
            "{ .reg .b32 a; .reg .pred p; setp.ge.s32 p, $4, 0; mov.u32 a, mt_stage; mad.lo.u32 a, $4, 4, a;"
            " mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0; @p ld.shared.v4.b32 {$0, $1, $2, $3}, [a]; }",
            "=r,=r,=r,=r,r,r,r,r", [gl.where(cw < NCH * 4, cw, -1)], dtype=gl.int32, is_pure=False, pack=4)
        if PAGED:
            out_row, written = _paged_rows(row0 + c // CHUNKS_PER_ROW, n_rows, slot_mapping_ptr, num_heads,
                                           page_size, num_slots)
            ok = ((c < NCH) & written)[:, None]
            dst = values_i32 + out_row[:, None] * (CAPACITY // 2) + ((c % CHUNKS_PER_ROW)[:, None] * 4 + j4)
        else:
            ok = ((c < NCH) & (row0 + c // CHUNKS_PER_ROW < n_rows))[:, None]
            dst = values_i32 + row0.to(gl.int64) * (CAPACITY // 2) + cw
        gl.store(dst, vals, mask=ok)
    BW: gl.constexpr = HEAD_DIM // 32
    BL: gl.constexpr = gl.BlockedLayout([1, BW], [32, 1], [1, 1], [1, 0])
    br = gl.arange(0, 32, layout=gl.SliceLayout(1, BL))
    bw = gl.arange(0, BW, layout=gl.SliceLayout(0, BL))[None, :]
    bo, _ = gl.broadcast(br[:, None] * BW + bw, gl.zeros([32, BW], gl.int32, BL))
    words = gl.inline_asm_elementwise(
        "{ .reg .b32 a; .reg .pred p; setp.ge.s32 p, $1, 0; mov.u32 a, mt_stage; add.u32 a, $1, a;"
        " mov.b32 $0, 0; @p ld.shared.b32 $0, [a]; }",
        "=r,r", [gl.where(br[:, None] < 16, bo * 4 + STAGE_VALUES, -1)], dtype=gl.int32, is_pure=False, pack=1)
    if PAGED:
        out_row, written = _paged_rows(row0 + br, n_rows, slot_mapping_ptr, num_heads, page_size, num_slots)
        gl.store(bitmap_ptr + out_row[:, None] * BW + bw, words, mask=((br < 16) & written)[:, None])
    else:
        gl.store(bitmap_ptr + row0.to(gl.int64) * BW + bo, words, mask=((br < 16) & (row0 + br < n_rows))[:, None])


def launch_prune_and_pack(x, bitmap, values, seq_lens, n_rows: int, tokens: int, rows_per_batch: int,
                          keep: int, capacity: int, pages=None) -> None:
    """x contiguous [*lead, T, D] fp16 / bf16 on a GPU with mma.sync (gluon_prune_supports).
    pages: None, or (slot_mapping, num_heads, page_size, num_slots) to write x [N, Hkv, D] into
    the page pools bitmap / values (PAGED, see the module docstring)."""
    head_dim = x.shape[-1]
    if head_dim not in GLUON_PRUNE_HEAD_DIMS:
        raise ValueError(f"the Gluon prune_and_pack kernel handles head dims {GLUON_PRUNE_HEAD_DIMS}, got "
                         f"{head_dim} (x shape {tuple(x.shape)}); compress.prune_and_pack runs the tl kernel there")
    stage_bytes = ROWS * capacity * 2 + ROWS * head_dim // 8
    decl = f".shared .align 16 .b8 mt_stage[{stage_bytes}]; mov.b32 $0, $1; mov.b32 $0, $2;"
    slot_mapping, num_heads, page_size, num_slots = pages if pages is not None else (None, 0, 0, 0)
    _prune_pack_gluon_kernel[(triton.cdiv(n_rows, ROWS),)](
        x, bitmap, values, seq_lens, slot_mapping, n_rows, tokens, rows_per_batch, keep,
        num_heads, page_size, num_slots,
        HEAD_DIM=head_dim, CAPACITY=capacity, HAS_SEQ_LENS=seq_lens is not None, PAGED=pages is not None,
        STAGE_DECL=decl, num_warps=1, maxnreg=register_cap(head_dim))
