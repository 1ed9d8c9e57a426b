"""GPU fuzzing: >= 10,000 hypothesis cases per kernel in a few minutes, for the kernels CI cannot run
(the Gluon prune_and_pack, the Gluon decode with its walk, scatter and popcount gathers, both over
paged caches too, the Gluon write_pages) and for pack / unpack.

The compiled shapes are a bounded set (head dim, dtype, capacity, GQA group and the kernels' flags,
in the *_SHAPES lists below), so the GPU compiles each once; within them hypothesis draws freely
what the kernels take at run time: token counts, ragged lengths, windows and their lengths, split
counts, the sparsity within a capacity, patterns and values (ties, zeros, -0.0, denormals, NaN /
inf, raw bit patterns, scales 2^-24..2^15). Every case is checked exactly (packing) or against
float64 with the 2x rule of test_decode.py (decode).

Each kernel's test is parametrized by shard (test_fuzz_<kernel>[shard<i>]), so pytest -n spreads
one kernel over several workers: shard i runs ceil(EXAMPLES / SHARDS) cases of its own hypothesis
search, seeded SEED + i.

    MUSTAFAR_TEST_DEVICE=cuda MUSTAFAR_FUZZ_RECORD=fuzz.json python -m pytest -q tests/test_gpu_fuzz.py
    MUSTAFAR_TEST_DEVICE=cuda MUSTAFAR_FUZZ_SHARDS=3 python -m pytest -q -n 16 tests/test_gpu_fuzz.py
    MUSTAFAR_TEST_DEVICE=cuda MUSTAFAR_FUZZ_EXAMPLES=50 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \\
        compute-sanitizer --tool memcheck python -m pytest -q tests/test_gpu_fuzz.py     # a sample

(`perf/gpu_session.sh fuzz-all`, or fuzz-compress / fuzz-decode / fuzz-memcheck, runs these as
device-call stages, with a Triton cache in .gen/triton_cache.) To re-run a shard, give the
record's seed, shards and max_examples back and select it with -k, e.g. -k "walk and shard3".
Environment: MUSTAFAR_FUZZ_EXAMPLES cases per kernel (default 10,000 on the GPU; 2 under the CPU
interpreter, where Gluon cannot run and only the harness is checked, cheaply), MUSTAFAR_FUZZ_SHARDS
(default 1), MUSTAFAR_FUZZ_SEED (default: drawn at random, by each process), MUSTAFAR_FUZZ_RECORD:
a JSON file that gets, per kernel, the cases run and failed, the seconds in the cases (in total and
per block of 500 cases) and in the shards' tests, the shards run with their seeds, and the seed,
the versions, the GPU and $MUSTAFAR_COMMIT (under pytest -n, one file per worker: the path + "." +
the worker's name; a kernel's shards that ran in one worker add up in its file).
"""
import functools
import json
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
import torch
import triton
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis import given

import mustafar_triton as mt
from mustafar_triton import attention, autotune
from mustafar_triton import reference as ref
from mustafar_triton.format import PagedKV, default_capacity
from mustafar_triton.kernels import decode_gluon_launch as gluon_launch
from conftest import DEVICE_NAME, INTERPRETING
from mt_testutils import bit_equal, popcount_rows, random_pattern
from test_compress import assert_packed_equal
from test_decode import check_decode

FUZZ_EXAMPLES = int(os.environ.get("MUSTAFAR_FUZZ_EXAMPLES", 2 if INTERPRETING else 10_000))
FUZZ_SHARDS = int(os.environ.get("MUSTAFAR_FUZZ_SHARDS", 1))
if FUZZ_SHARDS < 1:
    raise ValueError(f"MUSTAFAR_FUZZ_SHARDS must be >= 1, got {FUZZ_SHARDS}")
SHARD_EXAMPLES = -(-FUZZ_EXAMPLES // FUZZ_SHARDS)  # ceil
FUZZ_SEED = int(os.environ.get("MUSTAFAR_FUZZ_SEED", random.SystemRandom().randrange(2**32)))
settings.register_profile(
    "mustafar-gpu-fuzz", max_examples=SHARD_EXAMPLES, deadline=None, database=None, derandomize=False,
    print_blob=True, suppress_health_check=list(HealthCheck))
settings.register_profile(  # the CPU interpreter: a smoke run of the harness (the tl kernels)
    "mustafar-cpu-fuzz-smoke", max_examples=SHARD_EXAMPLES, deadline=None, database=None, derandomize=True,
    print_blob=True, suppress_health_check=list(HealthCheck))
FUZZ = settings.get_profile("mustafar-cpu-fuzz-smoke" if INTERPRETING else "mustafar-gpu-fuzz")

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# prune_and_pack (the Gluon kernel on a GPU): (head dim, dtype, capacity); keep is drawn in
# (capacity - 8, capacity], with and without seq_lens
PRUNE_SHAPES = [(64, F16, 32), (64, BF16, 24), (128, F16, 40), (128, BF16, 64), (128, F16, 128),
                (256, F16, 80), (256, BF16, 32)]
# pack / unpack (tl kernels): (head dim, dtype, explicit capacity)
PACK_SHAPES = [(64, F16, 24), (128, BF16, 48), (128, F32, 128), (256, F16, 64), (96, F16, 40)]
# decode (the Gluon kernel, gather forced): (head dim, dtype, Hq, Hkv, K capacity, V capacity,
# seq_lens given, window: None / "full" / "lens" (window_lens given))
DECODE_SHAPES = [(128, F16, 32, 8, 40, 40, True, "lens"), (128, BF16, 32, 8, 64, 64, True, "lens"),
                 (64, F16, 9, 3, 32, 24, True, "lens"), (128, F16, 16, 1, 40, 16, False, None),
                 (256, BF16, 8, 2, 80, 128, True, "full"), (64, BF16, 4, 4, 8, 32, False, "full"),
                 (128, F16, 8, 8, 128, 40, True, "lens")]

# The compress cases draw their inputs on the CPU and run only the kernel under test on the device
# (copies in, one launch, copies out); the reference and the checks run on the CPU (exact, device-
# independent: reference.topk_mask's key is unique per row). A case made of dozens of small GPU ops
# and syncs held every pytest-xdist worker to one process's rate (perf/NOTES.md, 2026-12-03).
HOST = torch.device("cpu")

BLOCK = 500  # cases per progress block (block_seconds) and per rewrite of the record file
RECORD_EVERY_S = 15.0  # ... and at least this often, so a run a time limit kills keeps its counts


@dataclass
class Tally:
    """One kernel's cases in this process (all its shards that ran here), as the record gives them."""
    cases: int = 0
    failed_cases: int = 0
    seconds: float = 0.0  # inside the cases: the kernels and the checks
    wall_seconds: float = 0.0  # in the kernel's shard tests: also hypothesis's drawing and shrinking
    block_seconds: list = field(default_factory=list)  # `seconds` of each consecutive BLOCK cases
    block_wall_seconds: list = field(default_factory=list)  # wall seconds of each consecutive BLOCK cases
    shards: dict = field(default_factory=dict)  # shard -> dict(seed=, cases=, finished=)
    block_start: tuple = (0.0, 0.0)  # (seconds, wall) at the last block's end
    shard_start: float | None = None  # perf_counter() at the start of the shard running now

    def wall(self) -> float:
        running = 0.0 if self.shard_start is None else time.perf_counter() - self.shard_start
        return self.wall_seconds + running

    def end_block(self):
        seconds, wall = self.seconds, self.wall()
        self.block_seconds.append(round(seconds - self.block_start[0], 2))
        self.block_wall_seconds.append(round(wall - self.block_start[1], 2))
        self.block_start = (seconds, wall)

    def as_record(self, kernel: str) -> dict:
        return dict(cases=self.cases, failed_cases=self.failed_cases, seconds=round(self.seconds, 1),
                    wall_seconds=round(self.wall(), 1), block_cases=BLOCK, block_seconds=self.block_seconds,
                    block_wall_seconds=self.block_wall_seconds, shards=self.shards,
                    gluon_launches=GLUON_LAUNCHES[kernel] if kernel != "pack_unpack" else None)


TALLIES: defaultdict[str, Tally] = defaultdict(Tally)
GLUON_LAUNCHES: Counter = Counter()
LAST_RECORD = [0.0]  # perf_counter() at the last write_record()


@pytest.fixture(scope="module", autouse=True)
def record_and_spy():
    """Counts Gluon launches (each GPU case must run the kernel it fuzzes) and, at the end, writes
    the record file."""
    from mustafar_triton.kernels import prune_pack_gluon
    prune_launch = prune_pack_gluon.launch_prune_and_pack
    decode_kernel = attention._sparse_decode_gluon_kernel

    class DecodeSpy:
        def __getitem__(self, grid):
            launch = decode_kernel()[grid]

            def counted(*args, **kwargs):
                GLUON_LAUNCHES[("paged_" if kwargs.get("PAGE_SIZE") else "") + kwargs["GATHER"]] += 1
                return launch(*args, **kwargs)
            return counted

    def prune_counted(*args, **kwargs):
        GLUON_LAUNCHES["prune_and_pack" if kwargs.get("pages") is None else "write_pages"] += 1
        return prune_launch(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_pack_gluon, "launch_prune_and_pack", prune_counted)
        mp.setattr(attention, "_sparse_decode_gluon_kernel", DecodeSpy)
        yield
    write_record()


def write_record():
    """The record file (MUSTAFAR_FUZZ_RECORD), rewritten at each shard's start and end, every BLOCK
    cases of a kernel, every RECORD_EVERY_S seconds and at the end, so a run cut short by a time
    limit keeps (nearly) all its counts."""
    path = os.environ.get("MUSTAFAR_FUZZ_RECORD")
    if path and os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: a file per worker
        path += "." + os.environ["PYTEST_XDIST_WORKER"]
    LAST_RECORD[0] = time.perf_counter()
    if path:
        record = dict(seed=FUZZ_SEED, shards=FUZZ_SHARDS, max_examples=FUZZ_EXAMPLES,
                      examples_per_shard=SHARD_EXAMPLES, device=DEVICE_NAME,
                      gpu=torch.cuda.get_device_name() if torch.cuda.is_available() and not INTERPRETING else None,
                      triton=triton.__version__, torch=torch.__version__, commit=os.environ.get("MUSTAFAR_COMMIT"),
                      triton_cache_dir=os.environ.get("TRITON_CACHE_DIR"),
                      kernels={k: t.as_record(k) for k, t in TALLIES.items()})
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


class counted_case:
    """Counts a case of `kernel` (in its shard `shard`), its time, and whether it failed (hypothesis
    re-runs a failing case while shrinking it, so failed_cases counts those runs too)."""

    def __init__(self, kernel, shard):
        self.tally, self.shard = TALLIES[kernel], shard

    def __enter__(self):
        self.tally.cases += 1
        self.tally.shards[self.shard]["cases"] += 1
        self.start = time.perf_counter()

    def __exit__(self, kind, *_):
        self.tally.seconds += time.perf_counter() - self.start
        if kind is not None:
            self.tally.failed_cases += 1
        if self.tally.cases % BLOCK == 0:
            self.tally.end_block()
            write_record()
        elif time.perf_counter() - LAST_RECORD[0] > RECORD_EVERY_S:
            write_record()


def fuzz_test(kernel: str, cases: st.SearchStrategy, run_case):
    """The fuzz test of `kernel`, parametrized by shard: shard i runs SHARD_EXAMPLES cases of its own
    hypothesis search, seeded FUZZ_SEED + i, each run_case(c, device) with c drawn from `cases`."""
    @pytest.mark.parametrize("shard", range(FUZZ_SHARDS), ids=lambda i: f"shard{i}")
    def test(shard, device):
        @FUZZ
        @seed(FUZZ_SEED + shard)
        @given(c=cases)
        def fuzz_case(c):
            with counted_case(kernel, shard):
                run_case(c, device)

        tally = TALLIES[kernel]
        tally.shards[shard] = dict(seed=FUZZ_SEED + shard, cases=0, finished=False)
        tally.shard_start = time.perf_counter()
        write_record()
        try:
            fuzz_case()
        finally:  # passed or failed (a run cut short leaves finished False)
            tally.wall_seconds, tally.shard_start = tally.wall(), None
            tally.shards[shard]["finished"] = True
            write_record()
    return test


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------
@st.composite
def value_recipes(draw):
    return dict(mode=draw(st.sampled_from(["normal", "ties", "bits"])), scale_exp=draw(st.integers(-24, 15)),
                levels=draw(st.integers(1, 4)), special_rate=draw(st.sampled_from([0.0, 0.0, 0.01, 0.2])),
                seed=draw(st.integers(0, 2**31 - 1)))


def make_values(shape, dtype, recipe, device) -> torch.Tensor:
    """Values drawn on the CPU from a recipe (reproducible on any device), then moved: normal or
    integer ties times 2^scale_exp, or raw bit patterns (every finite, denormal, inf and NaN value),
    with NaN / +-inf / -0.0 / denormals sprinkled at special_rate."""
    g = torch.Generator().manual_seed(recipe["seed"])
    if recipe["mode"] == "bits":
        int_dtype = torch.int32 if dtype == F32 else torch.int16
        info = torch.iinfo(int_dtype)
        x = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(int_dtype).view(dtype)
    else:
        if recipe["mode"] == "normal":
            x = torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            x = torch.randint(-recipe["levels"], recipe["levels"] + 1, shape, generator=g).double()
        x = (x * 2.0 ** recipe["scale_exp"]).to(dtype)
    if recipe["special_rate"]:
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, torch.finfo(dtype).tiny / 4],
                                dtype=dtype)
        where = torch.rand(shape, generator=g) < recipe["special_rate"]
        x = torch.where(where, specials[torch.randint(0, len(specials), shape, generator=g)], x)
    return x.to(device)


def draw_lens(draw, b, t, allowed) -> list[int] | None:
    return draw(st.lists(st.integers(0, t), min_size=b, max_size=b)) if allowed else None


# ------------------------------------------------------------------------------------------------
# prune_and_pack
# ------------------------------------------------------------------------------------------------
@st.composite
def prune_cases(draw):
    d, dtype, capacity = draw(st.sampled_from(PRUNE_SHAPES))
    keep = draw(st.integers(max(1, capacity - 7), capacity))
    b, h, t = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 400))
    return dict(d=d, dtype=dtype, capacity=capacity, sparsity=(d - keep + 0.5) / d, keep=keep, shape=(b, h, t, d),
                lens=draw_lens(draw, b, t, draw(st.booleans())), values=draw(value_recipes()))


def run_prune_case(c, device):
    x = make_values(c["shape"], c["dtype"], c["values"], HOST)
    lens = None if c["lens"] is None else torch.tensor(c["lens"], dtype=torch.int32)
    launches = GLUON_LAUNCHES["prune_and_pack"]
    packed = mt.prune_and_pack(x.to(device), c["sparsity"], seq_lens=None if lens is None else lens.to(device)).to(HOST)
    assert GLUON_LAUNCHES["prune_and_pack"] == launches + (0 if INTERPRETING else 1), "not the Gluon kernel"
    assert packed.capacity == c["capacity"] == default_capacity(c["d"], c["sparsity"])
    assert_packed_equal(packed, ref.prune_and_pack(x, c["sparsity"], seq_lens=lens))
    counts = popcount_rows(packed.bitmap)
    valid = torch.arange(c["shape"][2])[None, None, :] < (lens[:, None, None] if lens is not None else c["shape"][2])
    assert torch.all(counts[valid.expand_as(counts)] == c["keep"])


test_fuzz_prune_and_pack = fuzz_test("prune_and_pack", prune_cases(), run_prune_case)


# ------------------------------------------------------------------------------------------------
# pack / unpack
# ------------------------------------------------------------------------------------------------
@st.composite
def pack_cases(draw):
    d, dtype, capacity = draw(st.sampled_from(PACK_SHAPES))
    b, h, t = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 300))
    return dict(dtype=dtype, capacity=capacity, shape=(b, h, t, d), max_nnz=draw(st.integers(0, capacity)),
                pattern_seed=draw(st.integers(0, 2**31 - 1)), lens=draw_lens(draw, b, t, draw(st.booleans())),
                values=draw(value_recipes()))


def run_pack_case(c, device):
    pattern = random_pattern(c["shape"], c["pattern_seed"], HOST, max_nnz=c["max_nnz"])
    x = make_values(c["shape"], c["dtype"], c["values"], HOST)
    x = torch.where(pattern, x, torch.zeros((), dtype=c["dtype"]))
    lens = None if c["lens"] is None else torch.tensor(c["lens"], dtype=torch.int32)
    packed = mt.pack(x.to(device), capacity=c["capacity"], seq_lens=None if lens is None else lens.to(device))
    unpacked = mt.unpack(packed).to(HOST)
    packed = packed.to(HOST)
    assert_packed_equal(packed, ref.pack(x, capacity=c["capacity"], seq_lens=lens))
    assert bit_equal(unpacked, ref.unpack(packed))


test_fuzz_pack_unpack = fuzz_test("pack_unpack", pack_cases(), run_pack_case)


# ------------------------------------------------------------------------------------------------
# decode, every gather (the scatter on the shapes it takes: D 64 / 128)
# ------------------------------------------------------------------------------------------------
def gather_shapes(gather: str) -> list:
    return [s for s in DECODE_SHAPES if gluon_launch.gather_supports(gather, s[0], gluon_launch.GLUON_CONFIG["BLOCK_N"])]


@st.composite
def decode_cases(draw, gather):
    d, dtype, hq, hkv, k_cap, v_cap, has_lens, window = draw(st.sampled_from(gather_shapes(gather)))
    b, t = draw(st.integers(1, 4)), draw(st.integers(0, 600))
    w = draw(st.integers(0, 40)) if window else None
    lens = draw_lens(draw, b, t, has_lens)
    bound = max(lens) if lens else t
    return dict(d=d, dtype=dtype, hq=hq, hkv=hkv, b=b, t=t, lens=lens, w=w,
                window_lens=draw_lens(draw, b, w, window == "lens") if window else None,
                k_keep=draw(st.integers(max(1, k_cap - 7), k_cap)),
                v_keep=draw(st.integers(max(1, v_cap - 7), v_cap)),
                splits=draw(st.sampled_from([0, 0, 1, 2, 3, 7, 16, 64, 200])),
                max_seq_len=draw(st.one_of(st.none(), st.integers(bound, t))),
                q_scale_exp=draw(st.integers(-4, 3)), seed=draw(st.integers(0, 2**31 - 1)))


def packed_pair(rand, c, lens, device):
    """The case's K and V caches, pruned and packed by the reference on the CPU (bit-equal to the
    kernel, which its own fuzz test covers; decode workers then compile only decode kernels), on
    `device`."""
    b, hkv, t, d = c["b"], c["hkv"], c["t"], c["d"]
    host_lens = None if lens is None else lens.to(HOST)
    return (ref.prune_and_pack(rand(b, hkv, t, d, on=HOST), (d - c[keep] + 0.5) / d, seq_lens=host_lens).to(device)
            for keep in ("k_keep", "v_keep"))


def run_decode_case(gather, c, device):
    g = torch.Generator().manual_seed(c["seed"])

    def rand(*shape, scale=1.0, on=device):
        return (torch.randn(shape, generator=g) * scale).to(c["dtype"]).to(on)
    b, hkv, t, d = c["b"], c["hkv"], c["t"], c["d"]
    lens = None if c["lens"] is None else torch.tensor(c["lens"], dtype=torch.int32, device=device)
    pk, pv = packed_pair(rand, c, lens, device)
    q = rand(b, c["hq"], d, scale=2.0 ** c["q_scale_exp"])
    kw = dict(num_splits=c["splits"], max_seq_len=c["max_seq_len"])
    if c["w"] is not None:
        kw.update(k_window=rand(b, hkv, c["w"], d), v_window=rand(b, hkv, c["w"], d))
        if c["window_lens"] is not None:
            kw["window_lens"] = torch.tensor(c["window_lens"], dtype=torch.int32, device=device)
    launches = GLUON_LAUNCHES[gather]
    with autotune.forced_config("decode", dict(gluon_launch.GLUON_CONFIG, gather=gather)):
        check_decode(q, pk, pv, **kw)
    assert GLUON_LAUNCHES[gather] == launches + (0 if INTERPRETING else 1), f"not the Gluon {gather} gather"


def fuzz_decode_test(gather):
    return fuzz_test(gather, decode_cases(gather), functools.partial(run_decode_case, gather))


test_fuzz_decode_walk = fuzz_decode_test("walk")
test_fuzz_decode_scatter = fuzz_decode_test("scatter")
test_fuzz_decode_popc = fuzz_decode_test("popc")


# ------------------------------------------------------------------------------------------------
# decode over a paged cache (every gather), and write_pages
# ------------------------------------------------------------------------------------------------
@st.composite
def paged_decode_cases(draw):
    gather = draw(st.sampled_from(gluon_launch.GATHERS))
    c = draw(decode_cases(gather))
    rewires = draw(st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 2**16), st.integers(0, 5)), max_size=3))
    return dict(c, gather=gather, page_size=draw(st.sampled_from([16, 32, 64, 256])), rewires=rewires)


def run_paged_decode_case(c, device):
    """The case's caches in shuffled pages (seq_lens: all T where the case has none), some entries
    rewired to another used page or outside the pool: the float64 reference of the paged view, and
    without rewiring bit for bit the contiguous call."""
    g = torch.Generator().manual_seed(c["seed"])

    def rand(*shape, scale=1.0, on=device):
        return (torch.randn(shape, generator=g) * scale).to(c["dtype"]).to(on)
    b, hkv, t, d = c["b"], c["hkv"], c["t"], c["d"]
    lens = torch.tensor(c["lens"] or [t] * b, dtype=torch.int32, device=device)
    pk, pv = packed_pair(rand, c, lens, device)
    q = rand(b, c["hq"], d, scale=2.0 ** c["q_scale_exp"])
    kw = dict(num_splits=c["splits"], max_seq_len=t if c["max_seq_len"] is None else c["max_seq_len"])
    if c["w"] is not None:
        kw.update(k_window=rand(b, hkv, c["w"], d), v_window=rand(b, hkv, c["w"], d))
        if c["window_lens"] is not None:
            kw["window_lens"] = torch.tensor(c["window_lens"], dtype=torch.int32, device=device)
    gk, gv = ref.pages_from_packed([pk, pv], c["page_size"], extra_pages=2, generator=g)
    table = gk.block_table.clone()
    used = sorted(set(table.flatten().tolist()))
    for i, j, kind in c["rewires"]:
        if table.shape[1]:
            entry = used[kind % len(used)] if kind < 3 else (-1, gk.num_pages, 2**31 - 1)[kind - 3]
            table[i % b, j % table.shape[1]] = entry
    gk, gv = gk.with_tables(table, lens), gv.with_tables(table, lens)
    launches = GLUON_LAUNCHES["paged_" + c["gather"]]
    with autotune.forced_config("decode", dict(gluon_launch.GLUON_CONFIG, gather=c["gather"])):
        out = check_decode(q, gk, gv, **kw)
        if not c["rewires"]:
            for got, want in zip(out, mt.sparse_decode_attention(q, pk, pv, return_lse=True, **kw)):
                assert bit_equal(got, want)
    assert GLUON_LAUNCHES["paged_" + c["gather"]] == launches + (0 if INTERPRETING else 1), "not the Gluon kernel"


test_fuzz_paged_decode = fuzz_test("paged_decode", paged_decode_cases(), run_paged_decode_case)


@st.composite
def write_pages_cases(draw):
    d, dtype, capacity = draw(st.sampled_from(PRUNE_SHAPES))
    keep = draw(st.integers(max(1, capacity - 7), capacity))
    page_size, pages = draw(st.sampled_from([16, 64, 256])), draw(st.integers(1, 12))
    return dict(d=d, dtype=dtype, capacity=capacity, sparsity=(d - keep + 0.5) / d, heads=draw(st.integers(1, 4)),
                n=draw(st.integers(1, 300)), page_size=page_size, pages=pages,
                skip=draw(st.sampled_from([0.0, 0.1, 0.5])), outside=draw(st.sampled_from([0.0, 0.05])),
                int64=draw(st.booleans()), values=draw(value_recipes()), seed=draw(st.integers(0, 2**31 - 1)))


def run_write_pages_case(c, device):
    """Distinct slots (some -1, some outside the pool), pools of random bits: the kernel's pools
    equal reference.write_pages' byte for byte (untouched rows included)."""
    g = torch.Generator().manual_seed(c["seed"])
    num_slots = c["pages"] * c["page_size"]
    slots = torch.randperm(max(num_slots, c["n"]), generator=g)[:c["n"]]
    u = torch.rand(c["n"], generator=g)
    slots = torch.where(u < c["skip"], -1, torch.where(u < c["skip"] + c["outside"], num_slots + slots, slots))
    slots = torch.where(slots >= num_slots, slots + 2**40 * c["int64"], slots)  # int64: past 32 bits
    slots = slots.to(torch.int64 if c["int64"] else torch.int32)
    x = make_values((c["n"], c["heads"], c["d"]), c["dtype"], c["values"], HOST)
    garbage = torch.randint(-2**15, 2**15, (c["pages"], c["heads"], c["page_size"], c["d"] // 32 + c["capacity"]),
                            generator=g, dtype=torch.int16)
    bitmap = garbage[..., :c["d"] // 32].to(torch.int32).contiguous()
    values = garbage[..., c["d"] // 32:].contiguous().view(c["dtype"])

    def pool(on):
        table, lens = torch.zeros(1, 1, dtype=torch.int32, device=on), torch.zeros(1, dtype=torch.int32, device=on)
        return PagedKV(bitmap.clone().to(on), values.clone().to(on), c["capacity"], c["d"], table, lens)
    cache, want = pool(device), pool(HOST)
    launches = GLUON_LAUNCHES["write_pages"]
    mt.write_pages(cache, x.to(device), slots.to(device), c["sparsity"])
    assert GLUON_LAUNCHES["write_pages"] == launches + (0 if INTERPRETING else 1), "not the Gluon kernel"
    ref.write_pages(want, x, slots, c["sparsity"])
    assert torch.equal(cache.bitmap.to(HOST), want.bitmap) and bit_equal(cache.values.to(HOST), want.values)


test_fuzz_write_pages = fuzz_test("write_pages", write_pages_cases(), run_write_pages_case)


def test_fuzz_shapes_are_the_gluon_kernels():
    """Every fuzzed prune / decode shape is one the Gluon kernels take, so no case falls back."""
    from mustafar_triton.kernels.prune_pack import gluon_prune_supports
    assert all(gluon_prune_supports(dtype, d, False) for d, dtype, _ in PRUNE_SHAPES)
    for d, dtype, hq, hkv, *_ in DECODE_SHAPES:
        assert gluon_launch.gluon_decode_supports(dtype, d, hq // hkv, False)
        assert gluon_launch.gather_supports("walk", d, gluon_launch.GLUON_CONFIG["BLOCK_N"])
    assert len(gather_shapes("scatter")) >= 4
