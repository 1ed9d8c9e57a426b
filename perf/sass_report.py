"""Compile a decode or prune kernel for an H100 (sm_90) on a machine WITHOUT a GPU and report what the
hardware will execute: registers, spills, shared memory, and SASS instruction counts, for the
whole kernel and for its main loop's body (the longest backward branch: what repeats per tile).

    python perf/sass_report.py [--kernel tl|gluon|prune] [--gather walk|walk_halves|popc|scatter] [--slots popc] [--block-n 64] [--warps 4]
                               [--stages 2] [--prefetch 2] [--capacity 40] [--head-dim 128]
                               [--group 4] [--lq 1] [--window] [--page-size 16] [--dtype fp16] [--fp8] [--exact-weights] [--maxnreg N]
                               [--dump DIR] [--source FILE]

--kernel gluon compiles decode_gluon.py's kernel as the launcher does (one warp, BLOCK_N 16 by
default, its register cap; --block-n / --maxnreg override). --lq N: N query tokens per step (q
[B, N, Hq, D], N * group query rows), which needs the dense window: it compiles with the window
and window_lens, as --window does for one token. Costs no device time: use it to
check an idea's instruction count before spending a GPU run (the one-warp Gluon kernel's
measurements up to 2f21df9 showed the ALU-pipe share of the loop, not its length, to be what
predicts its speed). It also sums the loop's fixed stall cycles (the control codes' stall counts:
what one warp waits per iteration on fixed latencies alone); a 28% cut of those in the walk
(2026-12-06, chains of 2 slot steps) did not make it faster on an H100: treat it as a diagnostic.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mustafar_triton.kernels import decode, decode_gluon_launch as gluon_launch

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTER_ARGS = {"k_bitmap_ptr": "*i32", "v_bitmap_ptr": "*i32", "seq_lens_ptr": "*i32", "lut_ptr": "*i32",
                "window_lens_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
                "block_table_ptr": "*i32"}


def compile_decode(args):
    gluon = args.kernel == "gluon"
    window = args.window or args.lq > 1
    common = dict(GROUP=args.group, HEAD_DIM=args.head_dim, K_CAPACITY=args.capacity, V_CAPACITY=args.capacity,
                  HAS_SEQ_LENS=args.page_size > 0, HAS_WINDOW=window, HAS_WINDOW_LENS=window, LQ=args.lq,
                  PAGE_SIZE=args.page_size, FP8_VALUES=args.fp8, EXACT_WEIGHTS=args.exact_weights)
    if not args.page_size:  # contiguous: the block table is None (a constexpr)
        common["block_table_ptr"] = None
    rows = args.group * args.lq
    if gluon:
        from mustafar_triton._gluon_compat import GluonASTSource
        if args.source:  # another copy of decode_gluon.py (perf/scatter_ablations.py writes some)
            sys.path.insert(0, str(Path(__file__).parent))
            from common import load_kernel_copy
            decode_gluon = load_kernel_copy(args.source)
        else:
            from mustafar_triton.kernels import decode_gluon
        kernel, source = decode_gluon._sparse_decode_gluon_kernel, GluonASTSource
        block_h = gluon_launch.gluon_block_h(rows)
        constexprs = dict(common, BLOCK_H=block_h, BLOCK_N=args.block_n or gluon_launch.GLUON_CONFIG["BLOCK_N"],
                          GATHER=args.gather)
        options = dict(num_warps=1, maxnreg=args.maxnreg or gluon_launch.register_cap(args.head_dim, block_h, args.gather))
    else:
        kernel, source = decode._sparse_decode_kernel, ASTSource
        constexprs = dict(common, BLOCK_H=max(16, triton.next_power_of_2(rows)), BLOCK_N=args.block_n or 64,
                          SLOTS=args.slots, PREFETCH=args.prefetch, FP32_MATH=False)
        options = dict(num_warps=args.warps, num_stages=args.stages)
        if args.maxnreg:
            options["maxnreg"] = args.maxnreg
    names = kernel.arg_names
    if "EXACT_WEIGHTS" not in names:  # a --source copy from before it: compiled without it (its default)
        if args.exact_weights:
            raise SystemExit("--exact-weights: this kernel (a --source copy?) has no EXACT_WEIGHTS")
        del constexprs["EXACT_WEIGHTS"]
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("k_values_ptr", "v_values_ptr") and args.fp8:
            signature[name] = "*u8"
        elif name.endswith("_ptr"):
            signature[name] = POINTER_ARGS.get(name, f"*{args.dtype}")
        elif name in ("qk_scale", "k_value_scale", "v_value_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # pointers 16-byte aligned, as the launcher specializes torch allocations
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name.endswith("_ptr")}
    src = source(fn=kernel, signature=signature,
                 constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_prune(args):
    """prune_pack_gluon.py's kernel as compress.py launches it: prune_and_pack with seq_lens (its
    larger variant), or with --paged write_pages (no seq_lens, a slot mapping)."""
    from mustafar_triton._gluon_compat import GluonASTSource
    from mustafar_triton.kernels import prune_pack_gluon as pp
    kernel = pp._prune_pack_gluon_kernel
    names = kernel.arg_names
    stage = pp.ROWS * args.capacity * 2 + pp.ROWS * args.head_dim // 8
    constexprs = dict(HEAD_DIM=args.head_dim, CAPACITY=args.capacity, HAS_SEQ_LENS=not args.paged,
                      PAGED=args.paged,
                      STAGE_DECL=f".shared .align 16 .b8 mt_stage[{stage}]; mov.b32 $0, $1; mov.b32 $0, $2;")
    signature = {n: "constexpr" if n in constexprs else ("*i32" if n in ("bitmap_ptr", "seq_lens_ptr") else
                 "*i64" if n == "slot_mapping_ptr" else
                 f"*{args.dtype}" if n.endswith("_ptr") else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr")}
    src = GluonASTSource(fn=kernel, signature=signature,
                         constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    options = dict(num_warps=1, maxnreg=args.maxnreg or pp.register_cap(args.head_dim))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def loop_body(sass: str) -> list[str]:
    """The SASS lines of the longest backward branch's body (the main loop)."""
    lines = sass.splitlines()
    best = (0, 0)
    for i, line in enumerate(lines):
        jump = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if jump:
            starts = [j for j in range(i) if lines[j].startswith(jump.group(1) + ":")]
            if starts and i - starts[0] > best[1] - best[0]:
                best = (starts[0], i)
    return lines[best[0]:best[1] + 1]


def loop_stall_cycles(sass_hex: str, loop: list[str]) -> int:
    """Sum of the control codes' stall counts (bits 105-108 of each 128-bit sm_90 instruction) over
    the loop's instructions: the cycles one warp needs per iteration from fixed latencies alone (an
    instruction that issues right after its predecessor counts 1; variable latencies such as shared
    loads are not in it). sass_hex: `nvdisasm -hex` output, whose second line per instruction holds
    the control word."""
    addrs = [int(m.group(1), 16) for line in loop for m in [re.search(r"/\*([0-9a-f]{4,})\*/", line)] if m]
    if not addrs:  # no loop
        return 0
    lines = sass_hex.splitlines()
    total = 0
    for i, line in enumerate(lines):
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+\S.*;\s*/\*\s*0x[0-9a-f]{16}", line)
        if m and addrs[0] <= int(m.group(1), 16) <= addrs[-1]:
            control = int(re.search(r"0x([0-9a-f]{16})", lines[i + 1]).group(1), 16)
            total += (control >> 41) & 0xF
    return total


def op_counts(sass: str) -> collections.Counter:
    return collections.Counter(m.group(1) for m in re.finditer(
        r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass))


def parser() -> argparse.ArgumentParser:
    """The command line; other scripts parse their compile options with it (perf/occupancy.py)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="tl", choices=("tl", "gluon", "prune"),
                    help="prune: prune_pack_gluon.py's prune_and_pack kernel (--head-dim, --capacity, --dtype)")
    ap.add_argument("--slots", default="popc", choices=decode.SLOT_MODES)
    ap.add_argument("--gather", default="walk", choices=gluon_launch.GATHERS, help="the Gluon kernel's gather")
    ap.add_argument("--block-n", type=int, default=None, help="default 64 (tl) / 16 (gluon)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--prefetch", type=int, default=0, help="value rows prefetched this many tiles ahead")
    ap.add_argument("--capacity", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--lq", type=int, default=1, help="query tokens per step (> 1 implies --window)")
    ap.add_argument("--window", action="store_true", help="compile with the dense window and window_lens")
    ap.add_argument("--page-size", type=int, default=0, help="a paged cache (format.PagedKV) of this page size")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--fp8", action="store_true", help="decode kernels: fp8 (e4m3) kept values (FP8_VALUES)")
    ap.add_argument("--exact-weights", action="store_true",
                    help="decode kernels: P @ V as two products (EXACT_WEIGHTS: sparse_decode_attention's exact_weights)")
    ap.add_argument("--dump", help="write ttgir, ptx and sass here")
    ap.add_argument("--source", type=Path, help="--kernel gluon: compile this copy of decode_gluon.py instead")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead (tests read it)")
    ap.add_argument("--paged", action="store_true", help="--kernel prune: its write_pages variant (PAGED)")
    return ap


def main():
    args = parser().parse_args()
    compiled = compile_prune(args) if args.kernel == "prune" else compile_decode(args)
    # a file of its own: parallel runs (pytest -n) once read each other's cubin through a shared name
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "decode.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([NVIDIA_BIN / "nvdisasm", "-c", cubin], capture_output=True, text=True, check=True).stdout
        sass_hex = subprocess.run([NVIDIA_BIN / "nvdisasm", "-hex", "-c", cubin], capture_output=True, text=True,
                                  check=True).stdout
        usage = subprocess.run([NVIDIA_BIN / "cuobjdump", "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
    if args.dump:
        out = Path(args.dump)
        out.mkdir(parents=True, exist_ok=True)
        for kind in ("ttgir", "ptx"):
            (out / f"decode.{kind}").write_text(compiled.asm[kind])
        (out / "decode.sass").write_text(sass)
    ops = op_counts(sass)
    body = loop_body(sass)
    loop = op_counts("\n".join(body))
    stalls = loop_stall_cycles(sass_hex, body)
    resources = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if args.json:
        print(json.dumps(dict(zip(("registers", "stack", "shared", "local"), map(int, resources.groups())),
                              instructions=sum(ops.values()), ops=dict(ops), loop_ops=dict(loop),
                              loop_stall_cycles=stalls)))
        return
    print(resources.group(0))
    print(f"{sum(ops.values())} SASS instructions, {sum(loop.values())} in the main loop ({stalls} cycles of fixed"
          " stalls per iteration); loop's most frequent:")
    for op, n in loop.most_common(24):
        print(f"  {op:24s} {n}")


if __name__ == "__main__":
    main()
