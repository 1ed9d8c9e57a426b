"""perf/sweep.py and perf/plot.py, run as a user runs them (subprocesses; no GPU needed)."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from mustafar_triton._gluon_compat import GLUON_CHECKED_VERSIONS, triton_minor_version

REPO = Path(__file__).resolve().parent.parent

# Stack bytes (spilled registers) that ptxas leaves in a Gluon kernel at its register cap, where a
# triton release goes past the budget the caps were set for on triton 3.6 (the GPU machine's: the
# walk at most 16 bytes, the popcount gather and the prune kernel none; 3.7 stays within it).
# Measured with perf/sass_report.py for sm_90 on 2026-12-02 (3.7.1, 3.8.0, 3.9.0): newer ptxas
# needs more registers for the same code, so at the same caps these cases spill. They compile, and
# the interpreter twins give the same results; their speed on a GPU is not measured (the GPU
# machine has triton 3.6 only). The walk at capacity 64 on 3.9 went from 32 to 48 bytes with the
# padded staged rows (ecf4b40: the row offsets multiply by 144 instead of 128); 3.7 / 3.8 were not
# re-measured after that change. The prune kernel's write_pages variant ("paged") measured on 3.9.0
# on 2026-12-03 (3.7 / 3.8 not measured). The walk on 3.9.0 after walk-overhead (merged in d58bae2,
# measured 2026-12-04): capacity 40 24 -> 40 bytes (two query tokens too), capacity 64 / group 8
# 48 -> 64, while its loop got shorter (997 -> 938 and 1002 -> 952 instructions; 6 -> 9 LDL in the
# loop at capacity 40); on 3.6 the same change took the spill to 0 and was 2-3% faster on the H200.
# walk_halves at its cap of 96 (2026-12-06, 3.9.0; 3.7 / 3.8 not measured): 72 and 88 bytes where 3.6
# spills 0 and 24. The fp8 walk ("walk_fp8": 0 bytes on 3.6) on 3.9.0, measured 2026-12-06 at 8a531c6;
# its bf16 cases again 2026-12-07 (6c48c2c: bf16 queries multiply in fp16), with the fp8 walk_halves'.
# The walks again after their run-start table (2026-12-07): the walk 40 -> 16 and 64 -> 40 bytes, its
# fp8 forms 0 (24-56 before), four query tokens 24, paged 24; walk_halves 72 -> 88, 88 -> 104, its
# fp8 forms 64-80 -> 80-112 (D=256: 0). The walks' zero slot (35d1ce4, 2026-12-08): walk_halves' fp8
# form at G=8, capacity 80 spills 0 -> 8 bytes on 3.6 (two local loads per tile; its loop 1009 -> 929);
# on 3.9 the fp8 walk spills 8-32 bytes where it spilled none (G=4, capacity 48: loop 864 -> 799
# instructions with 7 local accesses among them) and walk_halves' fp8 form 80 -> 88.
SPILLS_PAST_THE_3_6_BUDGET = {
    "3.8": {("prune", 256, 80, "fp16"): 432},
    "3.9": {("walk", 128, 4, 40): 16, ("walk", 128, 8, 64): 40, ("walk", 128, 4, 40, "lq4"): 24,
            ("walk", 128, 4, 40, "paged"): 24,
            ("walk_halves", 128, 4, 40): 88, ("walk_halves", 128, 8, 64): 104,
            ("walk_halves_fp8", 128, 4, 48, 0, "fp16"): 80, ("walk_halves_fp8", 128, 8, 80, 0, "fp16"): 88,
            ("walk_fp8", 128, 4, 48, 0, "fp16"): 32, ("walk_fp8", 128, 8, 80, 0, "fp16"): 24,
            ("walk_fp8", 128, 4, 48, 0, "bf16"): 24, ("walk_fp8", 64, 3, 48, 16, "bf16"): 8,
            ("walk_halves_fp8", 128, 4, 48, 0, "bf16"): 88, ("walk_halves_fp8", 128, 4, 80, 16, "bf16"): 112,
            ("prune", 128, 40, "fp16"): 24, ("prune", 256, 80, "fp16"): 464, ("prune", 128, 128, "bf16"): 16,
            ("prune", 128, 40, "fp16", "paged"): 16, ("prune", 256, 80, "fp16", "paged"): 456,
            ("prune", 128, 128, "bf16", "paged"): 24},
}


def stack_budget(case: tuple, budget_on_3_6: int) -> int:
    minor = triton_minor_version(triton.__version__)
    if minor not in GLUON_CHECKED_VERSIONS:
        pytest.fail(f"no register budget recorded for triton {triton.__version__}: measure both kernels "
                    "with perf/sass_report.py, record them above and in _gluon_compat.GLUON_CHECKED_VERSIONS")
    return SPILLS_PAST_THE_3_6_BUDGET.get(minor, {}).get(case, budget_on_3_6)


def run_script(*args, env=None):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def sass_report(*args) -> dict:
    """perf/sass_report.py --json: a real sm_90 compile (TRITON_INTERPRET removed), no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "perf/sass_report.py", "--json", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def test_plot_regenerates_every_committed_figure(tmp_path):
    """Issue 5's check: plot.py on the committed results writes the figures plots/ holds: the same
    names and, within 5% (text extents move with the matplotlib version), the same pixel sizes."""
    run_script("perf/plot.py", "--out-dir", tmp_path)
    committed = {p.name: png_size(p) for p in (REPO / "plots").glob("*.png")}
    written = {p.name: png_size(p) for p in tmp_path.glob("*.png")}
    assert committed, "no committed figures"
    assert written.keys() == committed.keys()
    for name, (width, height) in committed.items():
        assert written[name] == pytest.approx((width, height), rel=0.05), name


@pytest.mark.interpreter_only
def test_sweep_smoke_run_feeds_the_plots(tmp_path):
    """sweep.py --device cpu runs every op through the interpreter, its decode rows are accurate,
    and plot.py turns its file into figures."""
    out = tmp_path / "cpu.json"
    run_script("perf/sweep.py", "--device", "cpu", "--out", out, env={"TRITON_INTERPRET": "1"})
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r.get("op") == "decode" and r.get("kernel") == "mustafar"]
    assert ours and all("error" not in r for r in ours)
    assert all(r["median_us"] > 0 and r["max_abs_err"] < 1e-2 for r in ours)
    assert any(r.get("op") == "prune_and_pack" and r.get("median_us", 0) > 0 for r in rows)
    run_script("perf/plot.py", out, "--out-dir", tmp_path / "plots")
    assert len(list((tmp_path / "plots").glob("speedup_vs_context_*.png"))) >= 1


@pytest.mark.interpreter_only
def test_multi_query_smoke_run_with_forced_gathers(tmp_path):
    """perf/multi_query.py --gathers on the CPU (the interpreter's kernels stand in for the Gluon
    gathers): a row per gather and query-token count, every time positive, Lq=1 the unit."""
    out = tmp_path / "mq.json"
    run_script("perf/multi_query.py", "--device", "cpu", "--shapes", "1x16", "--lqs", "2", "--sparsities", "0.7",
               "--window", 4, "--gathers", "walk,scatter", "--out", out, env={"TRITON_INTERPRET": "1"})
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["gather"], r["lq"]) for r in rows) == [("scatter", 1), ("scatter", 2), ("walk", 1), ("walk", 2)]
    assert all(r["us"] > 0 and r["dense_us"] > 0 for r in rows)
    assert all(r["vs_lq1"] == 1.0 for r in rows if r["lq"] == 1)


def test_layer_host_smoke_run(tmp_path):
    """perf/layer_host.py (launches stubbed): a short run measures both caches, counts their torch
    ops (dense: DynamicCache's two cats, SDPA, transpose + contiguous: 5 with transformers 5.24 on
    the CPU, 4 with 5.17 on the H200's image) and writes its JSON."""
    out = tmp_path / "layer_host.json"
    run_script("perf/layer_host.py", "--layers", 2, "--steps", 20, "--rounds", 1, "--prompt", 300,
               "--out", out)
    data = json.loads(out.read_text())
    assert data["shapes"]["layers"] == 2 and data["meta"]["transformers"]
    assert Path(data["meta"]["package"]) == REPO / "mustafar_triton"
    for name in ("dense", "mustafar"):
        row = data["results"][name]
        assert row["us_per_layer_step"] > 0 and row["mean_us_per_layer_step"] > 0
    assert data["results"]["dense"]["torch_ops_per_layer_step"] in (4, 5)
    assert 0 < data["results"]["mustafar"]["torch_ops_per_layer_step"] < 12


def test_flush_cost_smoke_run(tmp_path):
    """perf/flush_cost.py at one small shape (the CPU's default; named, so a GPU run of the suite
    runs it too): every time measured and positive, the flush's per-step share its time over the chunk."""
    out = tmp_path / "flush_cost.json"
    run_script("perf/flush_cost.py", "--shapes", "2x2x32", "--context", 48, "--out", out)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["flush_us"] > 0 and row["append_us"] > 0 and row["attend_us"] > 0
    assert row["per_step_us"] == pytest.approx(row["flush_us"] / row["chunk"])


@pytest.mark.parametrize("gather", ["walk", "walk_halves", "popc", "scatter"])
@pytest.mark.parametrize("head_dim,group,capacity", [(128, 4, 40), (128, 8, 64), (64, 3, 24), (128, 16, 40)])
def test_gluon_decode_compiles_within_its_register_cap(head_dim, group, capacity, gather):
    """The Gluon decode kernel compiled for sm_90 as the launcher compiles it (perf/sass_report.py;
    no GPU needed): within its register cap (decode_gluon_launch.register_cap), which the split
    count relies on (a grid one program over a wave cost ~1.5x on the H100). The popcount gather
    does not spill and its main loop has no shared memory or barriers; the walk's loop stages rows
    with cp.async (LDGSTS) and gathers from shared memory, and spills at most a few words (its cap
    of 128 at D=128 spills 0 bytes at capacity 40 and 16 at 64; at 12 programs per SM without a
    cap it measured 1.2x slower); the scatter's loop stores one value per kept bit (a bfind and a
    2-byte store per iteration of its unrolled capacity) and reads the dense tiles by ldmatrix,
    masked by the bitmap words (the scatter that undoes its stores instead: the ablations test
    below); the walks store their output with 16-byte stores; walk_halves (D >= 128) is the walk
    in two halves at a cap of 96
    (at D=128 with 8 query rows), spilling at most 24 bytes (capacity 64);
    per triton version: stack_budget."""
    from mustafar_triton.kernels.decode_gluon_launch import gather_supports, gluon_block_h, register_cap
    if not gather_supports(gather, head_dim, 16):
        pytest.skip(f"{gather} does not run at D={head_dim}")
    report = sass_report("--kernel", "gluon", "--gather", gather, "--head-dim", head_dim, "--group", group,
                         "--capacity", capacity)
    assert report["registers"] <= register_cap(head_dim, gluon_block_h(group), gather)
    loop = report["loop_ops"]
    assert loop.get("HMMA.16816.F32", 0) > 0, "not the main loop"
    budget = stack_budget((gather, head_dim, group, capacity), {"walk": 16, "walk_halves": 24}.get(gather, 0))
    assert report["stack"] <= budget and report["local"] == 0, f"spills {report['stack']} bytes"
    if gather == "popc":
        assert loop.get("LDG.E.U16", 0) > 0, "not the main loop"
        assert not [op for op in loop if op.split(".")[0] in ("LDS", "STS", "LDSM", "BAR")], loop
    elif gather in ("walk", "walk_halves"):
        # one predicated load per dense element: 2 x 16 tokens x D over 32 lanes; a run's start
        # is one byte of the run-start table per token (K 2, V 4 tokens per lane, each half again)
        assert loop.get("LDS.U16", 0) == head_dim and loop.get("LDGSTS.E.BYPASS.128", 0) > 0, loop
        assert loop.get("LDS.U8", 0) == 6 * (2 if gather == "walk_halves" else 1), loop
        assert loop.get("POPC", 0) * 2 < loop["LDS.U16"], "a popcount per element"
        # O^T stored in channel order, 16-byte stores (decode_gluon._walk_rows_in_channel_order):
        # D x padded rows fp32 over 32 lanes, 4 per store; 4-byte stores only for the lse (an odd
        # group's two; else one 8-byte store)
        ops = report["ops"]
        assert ops.get("STG.E.128", 0) == head_dim * gluon_block_h(group) // 128 and ops.get("STG.E", 0) <= 2, ops
    else:
        assert loop.get("FLO.U32.SH", 0) == loop.get("STS.U16", 0) == capacity, loop
        assert loop.get("LDSM.16.M88.4", 0) == loop.get("LDSM.16.MT88.4", 0) == head_dim // 16, loop
        assert loop.get("LDGSTS.E.BYPASS.128", 0) > 0 and "LDS.U16" not in loop, loop
        # the dense tiles are masked on their way out (a prmt per operand register), never zeroed
        # (at D=128 the one 16-byte store left zeroes a malformed row's staged bitmap)
        assert loop.get("PRMT", 0) >= head_dim // 2 and loop.get("STS.128", 0) <= 1, loop


@pytest.mark.parametrize("gather,head_dim,group,capacity,page_size,dtype,stack_on_3_6", [
    ("walk", 128, 4, 48, 0, "fp16", 0), ("walk", 128, 8, 80, 0, "fp16", 0), ("walk", 64, 3, 48, 16, "fp16", 0),
    ("walk", 256, 4, 192, 0, "fp16", 0), ("walk", 128, 4, 48, 0, "bf16", 0), ("walk", 64, 3, 48, 16, "bf16", 0),
    ("walk", 256, 4, 192, 0, "bf16", 0),
    ("walk_halves", 128, 4, 48, 0, "fp16", 16), ("walk_halves", 128, 8, 80, 0, "fp16", 8),
    ("walk_halves", 128, 4, 48, 0, "bf16", 16), ("walk_halves", 128, 4, 80, 16, "bf16", 16),
    ("walk_halves", 256, 4, 192, 0, "bf16", 0)])
def test_gluon_decode_fp8_walk_compiles_within_its_register_cap(gather, head_dim, group, capacity, page_size, dtype,
                                                                stack_on_3_6):
    """fp8 kept values (FP8_VALUES: the walks only) compile for sm_90 within the walk's register
    cap, spilling at most the bytes recorded per triton version (stack_budget; walk_halves at its
    cap of 96 spills 8-16 bytes on 3.6 where its fp16 form spills up to 24 too): a one-byte shared load
    per element and one F2FP (cvt.rn.f16x2.e4m3x2) per pair of elements, no two-byte loads; bf16
    queries too multiply in fp16 (decode_gluon._fp16_query: fp16 HMMAs, no bf16 conversion in the
    loop)."""
    args = ["--kernel", "gluon", "--gather", gather, "--head-dim", head_dim, "--group", group, "--capacity",
            capacity, "--fp8", "--page-size", page_size, "--dtype", dtype]
    report = sass_report(*args)
    from mustafar_triton.kernels.decode_gluon_launch import gluon_block_h, register_cap
    assert report["registers"] <= register_cap(head_dim, gluon_block_h(group), gather)
    budget = stack_budget((f"{gather}_fp8", head_dim, group, capacity, page_size, dtype), stack_on_3_6)
    assert report["stack"] <= budget and report["local"] == 0, f"spills {report['stack']} bytes"
    loop = report["loop_ops"]
    assert any(op.startswith("HMMA.16816.F32") for op in loop), "not the main loop"
    # per token a byte of the run-start table (K 2, V 4 tokens per lane; each half again)
    starts = 6 * (2 if gather == "walk_halves" else 1)
    assert loop.get("LDS.U8", 0) == head_dim + starts and "LDS.U16" not in loop, loop
    assert loop.get("F2FP.F16.E4M3.UNPACK_B", 0) == head_dim // 2, loop
    assert "HADD2.F32" not in loop and "F2FP.BF16.F32.PACK_AB" not in loop, loop
    assert not any(op.startswith("HMMA.16816.F32.BF16") for op in loop), loop


@pytest.mark.parametrize("args", [("--dtype", "bf16", "--head-dim", 256, "--capacity", 192),
                                  ("--head-dim", 64, "--capacity", 48, "--page-size", 16)])
def test_tl_decode_fp8_compiles(args):
    """decode.py's kernel with fp8 values (bf16 queries and other shapes the Gluon walk leaves to
    it) compiles for sm_90: the interpreter runs its fp8 path but does not type-check it as the
    compiler does (an early return of another type passed the interpreter and failed here)."""
    report = sass_report("--kernel", "tl", "--fp8", *args)
    assert any(op.startswith("HMMA.16816.F32") for op in report["loop_ops"]), "not the main loop"


@pytest.mark.parametrize("gather", ["walk", "popc", "scatter"])
@pytest.mark.parametrize("group,lq", [(4, 2), (4, 4), (2, 8)])
def test_gluon_decode_multi_query_compiles_within_its_register_cap(group, lq, gather):
    """The Gluon decode kernel with lq query tokens per step (sass_report --lq: with the window,
    whose causal tail it unrolls; lq * group rows, the mma's N: 8 or 16) compiles for sm_90 within
    the register cap of its padded rows and spills no more than the one-token kernel's budget
    (triton 3.6: walk 0 bytes, scatter and popc 0; 3.9: stack_budget; 3.7 / 3.8 not measured)."""
    report = sass_report("--kernel", "gluon", "--gather", gather, "--head-dim", 128, "--group", group,
                         "--capacity", 40, "--lq", lq)
    from mustafar_triton.kernels.decode_gluon_launch import gluon_block_h, register_cap
    assert report["registers"] <= register_cap(128, gluon_block_h(group * lq), gather)
    assert report["loop_ops"].get("HMMA.16816.F32", 0) == 16 * gluon_block_h(group * lq) // 8, "not the main loop"
    budget = stack_budget((gather, 128, group, 40, f"lq{lq}"), 16 if gather == "walk" else 0)
    assert report["stack"] <= budget and report["local"] == 0, f"spills {report['stack']} bytes"


@pytest.mark.parametrize("gather", ["walk", "popc", "scatter"])
def test_gluon_decode_paged_compiles_within_its_register_cap(gather):
    """The Gluon decode kernel over a paged cache (sass_report --page-size 16: a block-table lookup
    per tile) compiles for sm_90 within the one-token kernel's register cap and stack budget
    (2026-12-03: triton 3.6 and 3.9 both 0 bytes of stack, walk 8 on 3.9)."""
    report = sass_report("--kernel", "gluon", "--gather", gather, "--head-dim", 128, "--group", 4,
                         "--capacity", 40, "--page-size", 16)
    from mustafar_triton.kernels.decode_gluon_launch import gluon_block_h, register_cap
    assert report["registers"] <= register_cap(128, gluon_block_h(4), gather)
    assert report["loop_ops"].get("HMMA.16816.F32", 0) > 0, "not the main loop"
    budget = stack_budget((gather, 128, 4, 40, "paged"), 16 if gather == "walk" else 0)
    assert report["stack"] <= budget and report["local"] == 0, f"spills {report['stack']} bytes"


@pytest.mark.parametrize("paged", [False, True], ids=["prune_and_pack", "write_pages"])
@pytest.mark.parametrize("head_dim,capacity,dtype", [(128, 40, "fp16"), (64, 32, "bf16"), (256, 80, "fp16"),
                                                     (128, 128, "bf16")])
def test_gluon_prune_compiles_within_its_register_cap(head_dim, capacity, dtype, paged):
    """prune_pack_gluon.py's kernel compiled for sm_90 as compress.py launches it (no GPU needed),
    for prune_and_pack and write_pages (PAGED): within its register cap, without spills on triton
    3.6 (a spill in its bisection would cost more than the cap saves; other versions: stack_budget)."""
    report = sass_report("--kernel", "prune", "--dtype", dtype, "--head-dim", head_dim, "--capacity", capacity,
                         *(["--paged"] if paged else []))
    from mustafar_triton.kernels.prune_pack_gluon import register_cap
    assert report["registers"] <= register_cap(head_dim)
    budget = stack_budget(("prune", head_dim, capacity, dtype) + (("paged",) if paged else ()), 0)
    assert report["stack"] <= budget and report["local"] == 0, f"spills {report['stack']} bytes"
    assert report["instructions"] > 1000, "not the kernel"


def test_generation_reference_path_runs_the_cache_on_the_reference(monkeypatch):
    """perf/generation.py's reference_path() (its kernel-vs-reference perplexity) swaps the two
    kernel entry points SparseKVCache calls for mustafar_triton.reference: inside it a cache gives
    the float64 reference over the reference's own pruning, outside it the kernels' result again."""
    import torch

    from conftest import DEVICE, INTERPRETING
    from mustafar_triton import SparseKVCache, cache as cache_module, reference
    from mt_testutils import randn, rel_err
    monkeypatch.syspath_prepend(str(REPO / "perf"))
    import generation
    k, v = (randn((2, 3, 45, 64), torch.float32, seed, DEVICE) for seed in (1, 2))
    k_new, v_new = (randn((2, 3, 1, 64), torch.float32, seed, DEVICE) for seed in (3, 4))
    q = randn((2, 1, 6, 64), torch.float32, 5, DEVICE)       # transformers' [B, 1, Hq, D] view

    def decode():
        cache = SparseKVCache(2, 3, 64, 64, 8, 0.7, 0.5, dtype=torch.float32, device=DEVICE, sinks=2)
        cache.prefill(k, v)
        cache.append(k_new, v_new)
        return cache, cache.attend(q, return_lse=True)

    kernels = decode()[1]
    with generation.reference_path():
        cache, (out, lse) = decode()
    assert cache_module.plan_for.__module__ == "mustafar_triton.attention"
    # the reference's own pruning of the stored tokens (sinks 2, window 8: tokens 2..37 stored)
    stored = reference.prune_topk(k[:, :, 2:38], 0.7)
    assert torch.equal(reference.unpack(cache.packed_k)[:, :, :36], stored)
    want, want_lse = reference.sparse_decode_attention(q[:, 0], cache.packed_k, cache.packed_v,
                                                       **cache.window_kwargs(), return_lse=True)
    assert torch.equal(out[:, 0], want) and torch.equal(lse[:, 0], want_lse)
    # perf/rounding_floor.py's float32 run: the reference in the compute dtype asked for
    with generation.reference_path(torch.float32):
        cache32, (out32, _) = decode()
    want32 = reference.sparse_decode_attention(q[:, 0], cache32.packed_k, cache32.packed_v, **cache32.window_kwargs(),
                                               compute_dtype=torch.float32)
    assert torch.equal(out32[:, 0], want32) and not torch.equal(out32, out)
    # and its third arm: float32 with the weights rounded to p_dtype before P @ V
    with generation.reference_path(torch.float32, torch.bfloat16):
        cache_p, (out_p, _) = decode()
    want_p = reference.sparse_decode_attention(q[:, 0], cache_p.packed_k, cache_p.packed_v, **cache_p.window_kwargs(),
                                               compute_dtype=torch.float32, p_dtype=torch.bfloat16)
    assert torch.equal(out_p[:, 0], want_p) and not torch.equal(out_p, out32)
    tol = 1e-5 if INTERPRETING else 3e-3  # a GPU's fp32 dots run as tf32 (test_decode.FLOOR)
    assert rel_err(kernels[0], out) < tol and rel_err(kernels[1], lse) < tol


def test_generation_host_counters_count_jit_path_launches(monkeypatch):
    """perf/generation.py's host_counters: every launch that takes Triton's JIT path (a
    CompiledLauncher's first call, or one whose kept launcher cannot serve) is counted, launches
    outside the block are not, and CompiledLauncher is left as it was."""
    import torch

    from mustafar_triton._fast_launch import CompiledLauncher
    monkeypatch.syspath_prepend(str(REPO / "perf"))
    import generation
    calls = []

    class Stub:  # a JIT function's [grid](...) that compiles nothing (its launches always take the JIT path)
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append(args)

    launcher = CompiledLauncher(Stub(), (1,))
    launcher(0, 1)
    keep, counts = CompiledLauncher._keep, {}
    with generation.host_counters(torch.device("cpu"), counts):
        launcher(0, 2)
        launcher(0, 3)
    launcher(0, 4)
    assert len(calls) == 4 and counts["jit_launches"] == 2
    assert counts["num_device_alloc"] == 0 and CompiledLauncher._keep is keep


def test_generation_round_summary_pairs_each_round_with_its_dense_run(monkeypatch):
    """perf/generation.py's round_summary: each round's ratio divides by the dense run of the same
    batch and round (compiled runs by dense_compiled's), the medians are over the rounds, and
    dense itself gets no ratio. A whole round running slow (both runs alike) leaves its ratio fair."""
    monkeypatch.syspath_prepend(str(REPO / "perf"))
    import generation
    ms = {("dense", 0): 20.0, ("K0.7V0.7", 0): 22.0, ("dense", 1): 40.0, ("K0.7V0.7", 1): 42.0,
          ("dense", 2): 21.0, ("K0.7V0.7", 2): 26.25, ("dense_compiled", 0): 10.0, ("K0.7V0.7_compiled", 0): 5.0}
    rows = [dict(run=run, batch=1, round=r, decode_ms_per_step=t) for (run, r), t in ms.items()]
    rows.append(dict(run="K0.7V0.7", batch=16, round=0, decode_ms_per_step=30.0))  # no dense at B=16
    summary = {(e["run"], e["batch"]): e for e in generation.round_summary(rows)}
    assert "median_ratio_to_dense" not in summary[("dense", 1)]
    k = summary[("K0.7V0.7", 1)]
    assert k["rounds"] == 3 and k["median_ms_per_step"] == 26.25
    assert k["ratios_to_dense"] == pytest.approx([1.1, 1.05, 1.25]) and k["median_ratio_to_dense"] == pytest.approx(1.1)
    assert summary[("K0.7V0.7_compiled", 1)]["median_ratio_to_dense"] == pytest.approx(0.5)
    assert "median_ratio_to_dense" not in summary[("K0.7V0.7", 16)]


def test_rounding_floor_outputs_mode(tmp_path):
    """perf/rounding_floor.py --outputs: one row per (q scale, tokens) and P arm; P rounded once to
    bf16 puts far more outputs off the correctly rounded result than P exact."""
    out = tmp_path / "outputs.json"
    subprocess.run([sys.executable, str(REPO / "perf" / "rounding_floor.py"), "--outputs", "--dtype", "bf16",
                    "--out", str(out)], check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'perf'}"))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6
    assert all(r["off_p_exact"] < 0.01 and r["off_p_rounded"] > 0.1 for r in rows)


def test_accuracy_nm_mask_keeps_the_largest_of_each_group(monkeypatch):
    """perf/accuracy.py's N:M key pruning (its --grid nm): n kept in every m consecutive channels,
    the largest |x| of the group, ties to the lower index."""
    import torch

    from mt_testutils import randn
    monkeypatch.syspath_prepend(str(REPO / "perf"))
    import accuracy
    x = randn((3, 2, 5, 64), torch.float32, 7, "cpu")
    x[0, 0, 0, :4] = torch.tensor([1.0, -2.0, 2.0, 0.5])   # a tie: channel 1 (lower index) wins
    mask = accuracy.nm_mask(x, 2, 4)
    groups, kept = x.abs().reshape(3, 2, 5, 16, 4), mask.reshape(3, 2, 5, 16, 4)
    assert torch.equal(kept.sum(-1), torch.full((3, 2, 5, 16), 2))
    assert (groups.masked_fill(~kept, float("inf")).amin(-1) >= groups.masked_fill(kept, -1).amax(-1)).all()
    assert mask[0, 0, 0, :4].tolist() == [False, True, True, False]
    cfg = accuracy.Config(0.5, 0.75, 4, k_pattern="2:4")
    assert cfg.name == "K2:4V0.75 S4 W32"
    pruned = accuracy.prune_keys(x, cfg)
    assert torch.equal(pruned, torch.where(mask, x, 0.0))


def test_accuracy_nm_keys_after_a_channel_order(monkeypatch):
    """perf/accuracy.py's 2:4 after a channel permutation: 2 kept in each group of the permuted
    channels ("strided": channels g, g + 16, g + 32, g + 48 at D=64), mapped back in place."""
    import torch

    from mt_testutils import randn
    monkeypatch.syspath_prepend(str(REPO / "perf"))
    import accuracy
    x = randn((2, 3, 7, 64), torch.float32, 11, "cpu")
    pruned = accuracy.prune_keys(x, accuracy.Config(0.5, 0.5, k_pattern="2:4-strided"))
    groups = torch.arange(64).reshape(4, 16).t()                       # group g: g, g + 16, g + 32, g + 48
    assert torch.equal(pruned[..., groups], torch.where(accuracy.nm_mask(x[..., groups].flatten(-2), 2, 4)
                                                        .reshape(2, 3, 7, 16, 4), x[..., groups], 0.0))
    sorted_ = accuracy.prune_keys(x, accuracy.Config(0.5, 0.5, k_pattern="2:4-sorted"))
    assert torch.equal((sorted_ != 0).sum(-1), torch.full((2, 3, 7), 32))
    order = accuracy.nm_channel_order(x, 4, "sorted")
    assert torch.equal(order.sort(-1).values, torch.arange(64).expand(3, 64))   # a permutation per head


def test_accuracy_pairs_keep_whole_pairs_of_largest_energy(monkeypatch):
    """perf/accuracy.py's channel-pair study (--grid pairs): per token, the kept channels are whole
    pairs (j, j + D/2) for "rope", (2j, 2j + 1) for "adjacent", as many pairs as the top-k row's
    value slots / 2, those of largest a^2 + b^2 (a small pair with a large partner beats a pair of
    two middling channels); a side's bytes count a bitmap bit per pair."""
    import torch

    from mt_testutils import randn
    monkeypatch.syspath_prepend(str(REPO / "perf"))
    import accuracy
    x = randn((2, 3, 5, 64), torch.float32, 13, "cpu")
    x[0, 0, 0] = 0.1
    x[0, 0, 0, [3, 35]] = torch.tensor([4.0, 0.0])     # rope pair 3: energy 16
    x[0, 0, 0, [5, 37]] = torch.tensor([2.0, 2.0])     # rope pair 5: energy 8
    for how in ("rope", "adjacent"):
        cfg = accuracy.Config(0.7, 0.7, k_pattern=f"pairs-{how}", v_pattern=f"pairs-{how}")
        kept = accuracy.pair_mask(x, 12, how)
        assert torch.equal(accuracy.prune_keys(x, cfg), torch.where(kept, x, 0.0))
        a, b = (kept[..., :32], kept[..., 32:]) if how == "rope" else (kept[..., 0::2], kept[..., 1::2])
        assert torch.equal(a, b)                                        # whole pairs
        assert torch.equal(a.sum(-1), torch.full((2, 3, 5), 12))         # D=64 K0.7: 24 slots, 12 pairs
        energy = ((x[..., :32] ** 2 + x[..., 32:] ** 2) if how == "rope" else (x[..., 0::2] ** 2 + x[..., 1::2] ** 2))
        assert (energy.masked_fill(~a, float("inf")).amin(-1) >= energy.masked_fill(a, -1).amax(-1)).all()
    assert accuracy.pair_mask(x, 2, "rope")[0, 0, 0].nonzero().flatten().tolist() == [3, 5, 35, 37]
    assert accuracy.pair_mask(x, 1, "rope")[0, 0, 0].nonzero().flatten().tolist() == [3, 35]
    assert accuracy.Config(0.7, 0.625, k_pattern="pairs-rope").name == "Kpairs-rope@0.7V0.625 S0 W32"
    assert accuracy.pattern_row_bytes(64, 0.7, "pairs-rope") == 4 + 48      # vs 8 + 48 for top-k
    assert accuracy.pattern_row_bytes(64, 0.7, "topk") == 8 + 48
    assert accuracy.pattern_row_bytes(256, 0.0, "pairs-rope") == 512


def test_accuracy_attention_keeps_sliding_layers_dense(monkeypatch):
    """perf/accuracy.py's pruning attention prunes full-attention layers only: a call with
    `sliding_window` (Gemma 3's local layers, which MustafarCache keeps dense) equals the dense
    configuration's, and a call without it differs from it."""
    import torch

    from mt_testutils import randn
    monkeypatch.syspath_prepend(str(REPO / "perf"))
    import accuracy
    q, k, v = (randn((1, 2, 80, 64), torch.float32, seed, "cpu") for seed in (1, 2, 3))
    pruned, dense = (accuracy.make_attention(accuracy.Config(s, s, 0, 8)) for s in (0.7, 0.0))
    out = pruned(None, q, k, v, None, scaling=0.125, sliding_window=40)[0]
    assert torch.equal(out, dense(None, q, k, v, None, scaling=0.125, sliding_window=40)[0])
    assert not torch.allclose(pruned(None, q, k, v, None, scaling=0.125)[0],
                              dense(None, q, k, v, None, scaling=0.125)[0], atol=1e-3)


def test_accuracy_fp8_values_round_to_e4m3_and_count_one_byte(monkeypatch):
    """perf/accuracy.py's fp8 study (--grid fp8): the compressed span's values are exactly the
    e4m3 numbers times the per-kv-head scale (amax / 448: the largest |x| survives, up to float rounding), or saturated
    e4m3 at scale 1; zeros stay zeros; the window is untouched; a row costs D/8 + slots rounded up
    to 16 bytes (D bytes dense), so K0.25V0.25 at D=64 costs what K0.7V0.7 costs in fp16."""
    import torch

    from mt_testutils import randn
    monkeypatch.syspath_prepend(str(REPO / "perf"))
    import accuracy
    x = randn((1, 3, 40, 64), torch.float32, 5, "cpu") * torch.tensor([0.01, 1.0, 600.0])[None, :, None, None]
    x[0, 1, 0, :3] = 0.0
    y = accuracy.round_e4m3(x, "e4m3")
    scale = x.abs().amax(dim=(0, 2, 3), keepdim=True) / 448
    assert torch.equal((y / scale).to(torch.float8_e4m3fn).float() * scale, y)   # on the scaled e4m3 grid
    assert torch.allclose(y.abs().amax(dim=(0, 2, 3)), x.abs().amax(dim=(0, 2, 3)), rtol=1e-6, atol=0)
    assert ((y - x).abs() <= x.abs() / 16 + scale * 2 ** -9).all()                 # half an ulp (3 mantissa bits)
    assert torch.equal(y[0, 1, 0, :3], torch.zeros(3))
    unit = accuracy.round_e4m3(x, "e4m3-unit")
    assert unit[0, 2].abs().max() == 448 and torch.equal(unit[0, 1], x[0, 1].to(torch.float8_e4m3fn).float())
    assert [accuracy.fp8_row_bytes(64, s) for s in (0.0, 0.25, 0.5, 0.7)] == [64, 56, 40, 40]
    assert accuracy.fp8_row_bytes(256, 0.375) == 32 + 160 == 2 * 80 + 32            # D=256 K0.7's fp16 row
    q = randn((1, 3, 40, 64), torch.float32, 6, "cpu")
    cfg = accuracy.Config(0.25, 0.25, 0, 8, value_format="e4m3")
    assert cfg.name == "K0.25V0.25 S0 W8 e4m3"
    out = accuracy.make_attention(cfg)(None, q, x, x, None, scaling=0.125)[0]
    plain = accuracy.make_attention(accuracy.Config(0.25, 0.25, 0, 8))(None, q, x, x, None, scaling=0.125)[0]
    assert torch.equal(out[:, :9], plain[:, :9]) and not torch.equal(out, plain)  # the first 9 see no compressed token


def test_scatter_ablations_apply_to_the_kernel_and_compile():
    """perf/scatter_ablations.py's copies of decode_gluon.py: every edit still matches the kernel's
    source (a kernel change that moves one fails here, not on a lent GPU), each copy is valid
    Python, and copies compile for sm_90 through sass_report.py --source: the conflict-free one
    with its stores intact and one more instruction per kept value than main, the one that always
    undoes its stores as that path should."""
    sys.path.insert(0, str(REPO / "perf"))
    import scatter_ablations
    main_source = scatter_ablations.SOURCE.read_text()
    for name in scatter_ablations.ABLATIONS:
        text = scatter_ablations.ablated_source(name)
        assert text != main_source, name
        compile(text, f"scatter_{name}.py", "exec")
    out = REPO / ".gen" / "test_ablation"
    run_script("perf/scatter_ablations.py", "--out-dir", out, "--ablations", "conflict_free,undo_always")
    copy = sass_report("--kernel", "gluon", "--gather", "scatter", "--capacity", 40,
                       "--source", out / "scatter_conflict_free.py")
    main = sass_report("--kernel", "gluon", "--gather", "scatter", "--capacity", 40)
    assert copy["loop_ops"]["STS.U16"] == main["loop_ops"]["STS.U16"] == 40
    assert sum(copy["loop_ops"].values()) - sum(main["loop_ops"].values()) >= 40
    # the scatter that undoes its stores (decode_gluon_launch.scatter_undoes, forced at capacity 16): a
    # second store per value, no masks, within the register cap without spilling, a shorter loop
    undo = sass_report("--kernel", "gluon", "--gather", "scatter", "--capacity", 16,
                       "--source", out / "scatter_undo_always.py")
    masked = sass_report("--kernel", "gluon", "--gather", "scatter", "--capacity", 16)
    assert undo["loop_ops"]["STS.U16"] == 2 * masked["loop_ops"]["STS.U16"] == 32
    assert undo["loop_ops"].get("PRMT", 0) < 32 <= masked["loop_ops"]["PRMT"]
    assert undo["registers"] <= 128 and undo["stack"] == 0 and undo["local"] == 0
    assert sum(undo["loop_ops"].values()) < sum(masked["loop_ops"].values())


def test_bank_model_reproduces_the_measured_scatter_conflicts():
    """perf/bank_model.py's shared-memory model gives the scatter's kept-value stores the ~3.5
    wavefronts per instruction that Nsight Compute measured (H200, 815d7b9), and its q^T gathers
    at least the bytes' own minimum (8 or 16 bytes from 32 lanes: 2 or 4 wavefronts)."""
    out = run_script("perf/bank_model.py", "--rows", "60")
    per_instruction = [float(line.split(": ")[1].split()[0]) for line in out.splitlines()]
    stores, q16, q32 = per_instruction
    assert 3.3 <= stores <= 3.7
    assert 2 < q16 < q32 and q32 > 4


def test_bank_model_reproduces_the_measured_walk_conflicts():
    """The model's walk: the predicated value loads' bank conflicts per tile near Nsight Compute's
    (H100, before 35d1ce4: ~86 wavefronts per tile at capacity 40, 0.7; ~163 at 0.5's full 64
    slots), chunks dealt round-robin to a token's lanes in fewer wavefronts than the walk's runs,
    and the reads of mt_zero in place of skipped lanes in at least as many."""
    for capacity, kept, measured in ((40, 38, 86), (64, 64, 163)):
        out = run_script("perf/bank_model.py", "--walk", "--capacity", str(capacity), "--kept", str(kept),
                         "--rows", "20").splitlines()
        per_load = {line.split(": ")[0]: float(line.split(": ")[1].split()[0]) for line in out}
        assert 0.8 * measured <= per_load["walk conflicts (runs)"] <= 1.2 * measured
        # the unkept channels' reads of one zero word (since 35d1ce4) only add conflicts
        assert per_load["walk conflicts (runs, mt_zero reads)"] >= per_load["walk conflicts (runs)"]
        for side in ("K", "V"):
            runs = per_load[f"walk loads {side}, runs (the walk)"]
            assert runs > per_load[f"walk loads {side}, chunks of 8"] > per_load[f"walk loads {side}, chunks of 4"] >= 1
