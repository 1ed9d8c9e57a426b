"""Launch policy of the Gluon decode kernel (decode_gluon.py): which shapes it runs, which gather
each config uses, its register cap, its shared memory, and so how many one-warp programs fit on
an SM (the split count fills whole waves of them). No Gluon import: attention.py, the tuner and
the tests use it on machines where Gluon cannot run.

The gathers (decode_gluon.py's module docstring has the details):
  "popc"    a popcount per element, values loaded from global memory: no staging, so the fewest
            fixed costs per split (short splits), any HEAD_DIM multiple of 32;
  "walk"    per element a bit test, predicated shared load and add, on rows staged in shared
            memory: its cost follows the DENSE elements (D 64 / 128 / 256);
  "walk_halves" the walk with q^T in shared memory and each operand gathered and multiplied as two
            D/2 halves: more instructions, 96 registers at D=128 (5 programs per scheduler instead
            of 4; D 128 / 256); since the walk's run-start table slower than the walk at every
            sparsity measured (H100): run where a config names it;
  "scatter" per KEPT value a bfind and a 2-byte store into a dense tile in shared memory, read
            back by ldmatrix and masked by the bitmap: its cost follows the stored values (D 64 / 128).
"""
from __future__ import annotations

from triton.language.core import constexpr
from triton.runtime.jit import constexpr_function

from .._runtime import H100_SM_SHARED_BYTES, next_pow2

# One warp per program, 16 tokens per tile; num_splits=-k: k full waves of programs (see
# decode.choose_num_splits). BLOCK_N 32 was slower (584 vs 457 us at B=16 T=16k, 251 registers).
# Optional key gather: one of GATHERS; without it, choose_gather picks per shape.
GLUON_CONFIG = dict(kernel="gluon", BLOCK_N=16, num_warps=1, num_splits=-1)
GATHERS = ("walk", "walk_halves", "popc", "scatter")

# The revision of the gathers' kernels as a tuning run compares them: bumped when a gather changes
# enough that a tuned choice among them is stale. A tuned file written at an older revision keeps its
# decode configs' split counts but not the gathers they name (autotune.load_entries; default_gather
# picks instead). 1: the walk's run-start table (377c504: the walk 14-20% faster on an H100 at
# sparsity 0.7-0.9, faster than walk_halves everywhere measured); 0: files without the field.
GATHERS_REVISION = 1

# Splits shorter than this many tokens use the popcount gather: staging is a fixed cost per split.
# H100, Llama-3-8B shape, K0.7, with the walk's bitmap rows staged (commit aaca482,
# perf/results/decode_gluon_ab_h100_aaca482_bits_merge.json): 64 tokens per split (B=1 T=8192) walk
# 19.2-20.1 us against popc 19.3-19.4; 124 tokens (B=1 T=32768) 42.1 against 51.0.
MIN_STAGED_SPLIT_TOKENS = 64

# The scatter gather where the larger of the K and V capacities is at most this fraction of D.
# H100, Llama-3-8B shape fp16, one wave of programs, the walk with its run-start table (perf/results/
# h100/gathers_runstarts_*.json, 2026-12-07), scatter / walk us: B=16 T=16k capacity 16 (sparsity 0.9)
# 144.7 / 159.4, 24 (0.85) 168.8 / 159.3, 32 (0.8) 190.6 / 163.4; B=4 T=128k 274.2 / 301.9, 325.4 /
# 299.6, 366.9 / 305.3; B=64 T=4k 150.6 / 167.7, 176.7 / 166.8; B=1 T=32k 25.3 / 30.4, 27.7 / 30.7
# (the scatter's one win at 24). Before that table (H200, 4c61e11) the walk lost up to capacity 32
# (0.25 D). Since the walk's zero slot (35d1ce4, 2026-12-08; H100, perf/results/h100/
# walk_vs_scatter_35d1ce4.json) the walk wins at capacity 16 too, walk / scatter us: B=16 T=16k 142.0
# / 146.5, B=1 T=32k 24.3 / 25.1, B=4 T=128k 266.7 / 273.7; at 8 (0.95) the scatter: 140.6 / 108.9,
# 23.8 / 18.8, 264.2 / 207.3. Not measured on an H200. D=64 not measured.
SCATTER_MAX_CAPACITY_FRACTION = 0.0625

# 16 query rows (Lq * G padded to 16, e.g. 4 query tokens of Llama-3-8B's group of 4: both gathers at
# 224 registers, 8 programs per SM): the scatter where the larger capacity is at most this fraction
# of D, or where the walk's splits would be shorter than WIDE_WALK_MIN_SPLIT_TOKENS; else the walk.
# H100, c0f611c, Llama-3-8B shape fp16, Lq=4, a 32-token window, default configs (perf/results/h100/
# multi_query_lq4_*_c0f611c.json), scatter / walk us at sparsity 0.5 / 0.7 / 0.8 / 0.85 (capacity
# 64 / 40 / 32 / 24): B=16 T=16k (2048 tokens per split) 351.6 / 256.5, 268.4 / 228.0, 240.7 / 227.5,
# 216.4 / 223.6; B=64 T=4k (2048) 386.2 / 290.2, 302.3 / 260.8, 273.6 / 256.8, 247.4 / 254.5; B=1
# T=128k (528) 175.1 / 146.1, 131.3 / 126.5 at 0.5 / 0.7; B=4 T=32k (~1000) 175.2 / 148.2, 134.7 /
# 129.5; B=1 T=32k (248) 53.3 / 69.1, 41.1 / 60.4, 39.0 / 60.9. (Until c0f611c the scatter ran at
# every capacity here, chosen against the walk before its run-start table.)
WIDE_SCATTER_MAX_CAPACITY_FRACTION = 0.1875
WIDE_WALK_MIN_SPLIT_TOKENS = 384

# Where at least 12 scatter programs fit on an SM, the plan is a multiple of the 4 schedulers: one-warp
# programs that do not split evenly over them leave one scheduler with a warp more, and the scatter
# waits for it. Llama-3-8B shape fp16, capacity 16 (sparsity 0.9), 14 programs fit, explicit split
# counts (perf/NOTES.md, 2026-12-05): H200, B=16 T=16k, 12 programs per SM 148.0 us, 14 (the plan
# before) 157.8; B=4 T=128k 280.4 against 298.6; B=1 T=32k 26.1 against 26.8; H100, B=16 T=16k, 12
# 147.0, 13 165.3, 14 156.8. Below 12 it keeps what fits: capacity 56, 11 fit, H200, B=16 T=16k,
# sparsity 0.6: 11 programs 278.2 us, 8 294.5. The walk gains from every program it gets (H100,
# capacity 40: 12 232.8, 14 227.9, 16 201.6).
SCATTER_BALANCED_PROGRAMS = 12

# Powers of two only: its layouts span D. D=96 (three bitmap words) runs the tl kernel.
GLUON_DECODE_HEAD_DIMS = (32, 64, 128, 256)


def gluon_decode_supports(dtype, head_dim: int, group: int, interpreting: bool) -> bool:
    """Whether decode_gluon.py's kernel handles a shape: GPU only (Gluon has no interpreter),
    fp16 / bf16 (mma.sync operands), HEAD_DIM in GLUON_DECODE_HEAD_DIMS, query rows per kv head
    <= 16 (the padded rows are the mma's N): `group` is the GQA group times the query tokens per
    step (attention.py passes Lq * G; a tuning bucket its G)."""
    return (not interpreting and str(dtype).replace("torch.", "") in ("float16", "bfloat16")
            and head_dim in GLUON_DECODE_HEAD_DIMS and group <= 16)


def gluon_fp8_supports(dtype, head_dim: int) -> bool:
    """Whether the Gluon kernel reads fp8 (e4m3) values for queries of `dtype`: the walks only, fp16
    or bf16 queries (cvt.rn.f16x2.e4m3x2 widens two values per instruction into fp16 mma operands;
    bf16 queries are scaled into fp16 once per program: decode_gluon._fp16_query)."""
    return (str(dtype).replace("torch.", "") in ("float16", "bfloat16")
            and gather_supports("walk", head_dim, GLUON_CONFIG["BLOCK_N"]))


def fp8_gather(named: str | None, head_dim: int, block_h: int) -> str:
    """The gather that reads fp8 values (the walks: the others have no fp8 form) for a config naming
    `named` (fp8 caches take their bucket's config, tuned on fp16 values): a named walk_halves where
    it runs (D 128 / 256, 8 padded rows), else the walk. H100, Llama-3-8B shape, bf16 queries, fp8 K =
    V sparsity 0.375 / 0.5 / 0.7, walk against walk_halves (perf/results/h100/
    fp8_bf16_runstarts_*.json, 2026-12-07): 16x16k 193.3 / 198.9 / 166.6 against 226.1 / 203.4 /
    192.4 us, 4x128k 359.0 / 376.5 / 314.3 against 418.8 / 378.3 / 362.4."""
    runs = gather_supports("walk_halves", head_dim, GLUON_CONFIG["BLOCK_N"]) and block_h <= 8
    return "walk_halves" if named == "walk_halves" and runs else "walk"


def gluon_bucket(bucket: dict, interpreting: bool) -> bool:
    """Whether a tuning bucket (which may lack dtype, as when a shipped file is validated) is one
    the Gluon kernel handles."""
    return "dtype" in bucket and gluon_decode_supports(bucket["dtype"], bucket["head_dim"], bucket["group"],
                                                        interpreting)


def gluon_block_h(group: int) -> int:
    """The Gluon kernel's padded query rows (GQA group times query tokens): the mma's N, at least 8."""
    return max(8, next_pow2(group))


def gather_supports(gather: str, head_dim: int, block_n: int) -> bool:
    """Whether a gather handles the shape (the staged gathers work on 16-token tiles)."""
    if gather == "popc":
        return True
    if gather == "walk":
        return head_dim in (64, 128, 256) and block_n == 16
    if gather == "walk_halves":
        return head_dim in (128, 256) and block_n == 16
    if gather == "scatter":
        return head_dim in (64, 128) and block_n == 16
    raise ValueError(f"unknown gather {gather!r}; expected one of {GATHERS}")


def register_cap(head_dim: int, block_h: int, gather: str) -> int:
    """Registers per thread the kernel is compiled with (maxnreg). Each is at or just above what
    ptxas (sm_90, triton 3.6) wants without a cap, so nothing spills, except D=256 (a few words)
    and the walk at D=128 with an 8-wide group (0 bytes of stack at capacity 40, 16 at 64;
    ~176 registers uncapped: 4 programs per scheduler instead of 3 made it 1.2x faster,
    perf/results/decode_gluon_ab_h100_5_walk.json; a cap of 96, 5 per scheduler, spills 120 bytes
    and measured 1.13-1.24x slower, decode_gluon_ab_h100_aaca482_bits_merge.json; "walk_halves" fits 96
    without spilling in its loop: 0 bytes at capacity 40, 16-24 at 24 / 64). The scatter needs
    111-124 at D=128 (capacities 16-64). Fixing the cap makes the resident programs, and so the
    waves, exact."""
    staged = gather != "popc"
    if head_dim <= 32:
        return 96
    if head_dim <= 64:
        return (96 if staged else 128) if block_h <= 8 else 152
    if head_dim <= 128:
        if block_h > 8:
            return 224
        return 96 if gather == "walk_halves" else 128 if staged else 168
    return 255


@constexpr_function  # also called by the kernel at compile time
def staged_row_pitch(row_bytes: int) -> int:
    """Bytes between two rows staged in shared memory: rows of whole 16-byte chunks take an odd
    number of chunks, so the rows that 8 lanes read at once start in 8 different bank groups (a
    128-byte row, K0.5V0.5 at D=128, put every row in the same banks)."""
    if row_bytes % 16:
        return row_bytes
    return 16 * ((row_bytes // 16) | 1)


@constexpr_function
def stage_offsets(head_dim: int, k_capacity: int, v_capacity: int, value_bytes: int = 2) -> tuple[int, int, int, int]:
    """Byte offsets of a staged tile's V value rows, K bitmap rows and V bitmap rows, and the
    stage's size (16 rows of each; the K value rows come first). value_bytes: 2 (fp16 / bf16) or
    1 (fp8 values, the walks only)."""
    v_off = 16 * staged_row_pitch(value_bytes * k_capacity)
    kb_off = v_off + 16 * staged_row_pitch(value_bytes * v_capacity)
    vb_off = kb_off + 16 * staged_row_pitch(head_dim // 8)
    return v_off, kb_off, vb_off, vb_off + 16 * staged_row_pitch(head_dim // 8)


@constexpr_function
def run_start_pitch(head_dim: int) -> int:
    """Bytes per row of the walks' run-start table: one per bitmap word, in whole 32-bit words."""
    return 4 * -(-head_dim // 128)


# The walks' shared zero (decode_gluon._stage_decl's mt_zero): the channels a row does not keep load it.
ZERO_SLOT_BYTES = 16


@constexpr_function
def run_start_offsets(head_dim: int, k_capacity: int, v_capacity: int, value_bytes: int = 2) -> tuple[int, int]:
    """The walks' table of run starts, after their two stages (stage_offsets): its byte offset and
    the walks' shared-memory total. Per tile each lane writes its staged bitmap row's (K rows 0-15,
    then the V rows) kept count before each bitmap word, one byte per word, run_start_pitch bytes a
    row (decode_gluon._run_starts_asm)."""
    table = 2 * stage_offsets(head_dim, k_capacity, v_capacity, value_bytes)[3]
    return table, table + 32 * run_start_pitch(head_dim)


@constexpr_function
def scatter_queue_entries(head_dim: int, capacity: int) -> int:
    """The scatter's queue entries per lane: every bitmap word, the sentinels that cover up to
    `capacity` iterations past the last kept value (32 each), and the two entries loaded ahead."""
    return head_dim // 32 + capacity // 32 + 3


# The scatter can zero the channels a tile does not keep by UNDOING its stores (a zero stored at
# each saved offset once the tile is read: two 16-bit offsets per register, capacity / 2 registers)
# instead of masking the ldmatrix registers with the bitmap: it does where the larger capacity is
# at most this fraction of D. sm_90 loop instructions per tile, D=128, masked -> undone: capacity
# 8 479 -> 328, 16 558 -> 436, 24 647 -> 557, 32 723 -> 665; but each undo store repeats its
# scatter store's bank conflicts. H200, Llama-3-8B shape fp16, one wave, masked / undone us
# (perf/results/h200/scatter_undo_ab_815d7b9.json): B=16 T=16k capacity 8 (sparsity 0.95) 118.9 /
# 110.5, 16 (0.9) 148.1 / 149.4, 24 (0.85) 173.2 / 186.8, 32 (0.8) 194.5 / 224.0; B=1 T=32k
# 21.6 / 20.4 at 8, 25.8 / 26.1 at 16. At 16 Nsight Compute puts issue-active at 43% against 55%
# (short-scoreboard stalls 2.96 against 1.31 per issue; ncu_stalls_scatter_0.9_*_815d7b9.txt).
# A constexpr: Triton's cache key holds the kernels' constexpr globals only, so a plain float
# changed here would leave compiled kernels of the old choice in its cache.
SCATTER_UNDO_MAX_CAPACITY_FRACTION = constexpr(0.0625)


@constexpr_function
def scatter_undoes(head_dim: int, k_capacity: int, v_capacity: int) -> bool:
    """Whether the scatter undoes its stores instead of masking its tiles
    (SCATTER_UNDO_MAX_CAPACITY_FRACTION)."""
    return max(k_capacity, v_capacity) <= SCATTER_UNDO_MAX_CAPACITY_FRACTION.value * head_dim


@constexpr_function
def scatter_offsets(head_dim: int, k_capacity: int, v_capacity: int) -> tuple[int, int, int, int]:
    """Byte offsets of the scatter's dense tiles (after the two stages: 32 rows, K then V,
    decode_gluon._dense_row: 2 D + 16 bytes apart and 32 more every 8 rows), of the 64 dummy bytes
    its sentinels store to, of the lanes' word queues (256 bytes per entry), and its total."""
    dense = 2 * stage_offsets(head_dim, k_capacity, v_capacity)[3]
    dummy = dense + 32 * (2 * head_dim + 16) + 32 * 3
    queue = dummy + 64
    return dense, dummy, queue, queue + 256 * scatter_queue_entries(head_dim, max(k_capacity, v_capacity))


def shared_bytes(gather: str, head_dim: int, k_capacity: int, v_capacity: int, value_bytes: int = 2,
                 block_h: int = 8) -> int:
    """Shared memory of one program, with the 1 KB the driver reserves per block (sm_90: ptxas
    reports the PTX-declared buffer + 1024 bytes; Gluon allocates dynamic shared memory only for
    walk_halves' q^T, head_dim x block_h in 2 bytes).
    walk: two stages of a tile's K and V value rows and bitmap rows (decode_gluon._stage_tile), the
    run-start table (run_start_offsets) and the zero slot (ZERO_SLOT_BYTES);
    scatter: scatter_offsets; popc: none."""
    if gather == "popc":
        return 0
    if gather in ("walk", "walk_halves"):
        q_t = 2 * head_dim * block_h if gather == "walk_halves" else 0
        return run_start_offsets(head_dim, k_capacity, v_capacity, value_bytes)[1] + ZERO_SLOT_BYTES + 1024 + q_t
    return scatter_offsets(head_dim, k_capacity, v_capacity)[3] + 1024


def programs_per_sm(head_dim: int, block_h: int, gather: str, shared: int = 0,
                    sm_shared_bytes: int = H100_SM_SHARED_BYTES) -> int:
    """One-warp programs per SM that the launcher plans: those that fit. Each of the 4 schedulers
    has 16K registers, allocated per warp in units of 256, and an SM holds at most 32 programs (12
    at D=128 with the popcount gather, 16 with the walk). (65536 // per-warp registers over-counts:
    at 144 registers it gives 14 where 12 fit, and a grid planned for 14 took two waves: 493
    against 250 us.) shared: shared memory per program (shared_bytes), which limits the staged
    gathers at large capacities (16 walk programs need <= 14.25 KB each on an H100: capacity <= 96
    at D=128). The scatter's count, where it is at least SCATTER_BALANCED_PROGRAMS, is then
    rounded down to a multiple of the 4 schedulers."""
    per_warp = -(-register_cap(head_dim, block_h, gather) * 32 // 256) * 256
    programs = min(32, 4 * (16384 // per_warp))
    if shared:
        programs = min(programs, sm_shared_bytes // shared)
    if gather == "scatter" and programs >= SCATTER_BALANCED_PROGRAMS:
        programs -= programs % 4
    return programs


def default_gather(head_dim: int, k_capacity: int, v_capacity: int, block_h: int = 8,
                   split_tokens: int | None = None) -> str:
    """The staged gather for a cache when the config names none: the scatter where the stored
    values are few enough for its per-value cost to beat the walk's per-element cost
    (SCATTER_MAX_CAPACITY_FRACTION; for 16 query rows, block_h, WIDE_SCATTER_MAX_CAPACITY_FRACTION,
    and also where the walk's splits hold fewer than WIDE_WALK_MIN_SPLIT_TOKENS tokens,
    split_tokens); else the walk. (walk_halves, 20 programs per SM at D=128 against the walk's 16,
    lost to the walk everywhere once the run-start table took the walk from 927 to 813 loop
    instructions per tile and its own only from 1003 to 971: it runs where a config names it.)"""
    capacity = max(k_capacity, v_capacity)
    if not gather_supports("scatter", head_dim, GLUON_CONFIG["BLOCK_N"]):
        return "walk"
    if block_h > 8:
        short = split_tokens is not None and split_tokens < WIDE_WALK_MIN_SPLIT_TOKENS
        return "scatter" if short or capacity <= WIDE_SCATTER_MAX_CAPACITY_FRACTION * head_dim else "walk"
    return "scatter" if capacity <= SCATTER_MAX_CAPACITY_FRACTION * head_dim else "walk"


def choose_gather(cfg: dict, head_dim: int, k_capacity: int, v_capacity: int, context: int,
                  splits_for, block_h: int = 8) -> str:
    """The gather a Gluon config runs: its "gather" key where that gather supports the shape;
    otherwise the default staged gather, unless its splits (splits_for(gather) of them) would
    hold fewer than MIN_STAGED_SPLIT_TOKENS tokens; then (and where nothing staged runs) popc."""
    block_n = cfg["BLOCK_N"]
    named = cfg.get("gather")
    if named is not None:
        return named if gather_supports(named, head_dim, block_n) else "popc"
    gather = default_gather(head_dim, k_capacity, v_capacity, block_h,
                            context // splits_for("walk") if block_h > 8 else None)
    if not gather_supports(gather, head_dim, block_n):
        return "popc"
    return gather if context >= MIN_STAGED_SPLIT_TOKENS * splits_for(gather) else "popc"


def plan(cfg: dict, head_dim: int, group: int, k_capacity: int, v_capacity: int, context: int,
         splits_for, sm_shared_bytes: int, value_bytes: int = 2) -> tuple[str, int, int]:
    """(gather, splits, register cap) of a launch of a Gluon config (group: its query rows per kv
    head, Lq * G). splits_for(programs_per_sm) sizes the splits (decode.choose_num_splits) for
    the programs per SM planned for a gather (programs_per_sm: its registers and shared memory).
    value_bytes 1: fp8 values, which only the walks read (attention.py: fp8_gather)."""
    block_h = gluon_block_h(group)

    def splits_with(gather):
        shared = shared_bytes(gather, head_dim, k_capacity, v_capacity, value_bytes, block_h)
        return splits_for(programs_per_sm(head_dim, block_h, gather, shared, sm_shared_bytes))

    gather = choose_gather(cfg, head_dim, k_capacity, v_capacity, context, splits_with, block_h)
    return gather, splits_with(gather), register_cap(head_dim, block_h, gather)
