"""Benchmark sweep: sparse decode attention vs dense attention, and prune_and_pack throughput.

    python perf/sweep.py [--quick | --head-dim-96] [--out perf/results/NAME.json] [--max-seconds N]
                         [--autotune {library,off}]
    python perf/sweep.py --device cpu --out /tmp/cpu.json     # smoke test, Triton interpreter

Every decode shape draws fresh random normal K, V, q; the dense backends and
mustafar_triton.sparse_decode_attention (on prune_and_pack of the same K and V, at each sparsity)
run on that same data. Sparsities: 0.5 and 0.7, and the whole SPARSITY_AXIS at the four shapes
of SPARSITY_AXIS_SHAPES (the plot of time against sparsity, with dense and the byte bound). The compressed cache has no dense recent window (W=0), so every token is
read compressed. Shapes whose dense K+V exceeds 40% of device memory are skipped.

Tuning: with --autotune library (default) sparse_decode_attention behaves as for a user: shipped
table, else the user cache (~/.cache/mustafar_triton), else it tunes the shape bucket on its first
call. That first call is timed separately (first_call_s: compile + tuning) and never counted in
median_us. --autotune off uses the heuristic configs (MUSTAFAR_TRITON_AUTOTUNE=0).

Budget: cases run in priority order (the --quick cases first); before each case the sweep stops if
the previous case's duration would overrun --max-seconds, and it rewrites the result file after
every case, so an interrupted run keeps what it measured.

Row fields: op (decode | prune_and_pack), kernel (mustafar | sdpa | flash_attn | flashinfer),
backend, model, batch, T, hq, hkv, d, dtype, sparsity (None for dense), window, median_us, bytes
(ours: compressed K+V + q + out; dense: K+V as passed to the kernel; prune_and_pack: read +
written), gbps, bw_frac (bytes/time over the measured copy bandwidth), speedup (fastest dense SDPA
backend of the shape / this row), dense_kv_bytes, gqa (native | expanded), first_call_s, config, gather (the Gluon gather the launcher ran, if
any), byte_bound_us (ours: the compressed K+V bytes over the copy bandwidth),
max_abs_err (ours vs a float32 torch reference on the same pruned cache, batch 0 / kv head 0),
error (a backend that could not run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset (~1-2 minutes on an H100)")
    p.add_argument("--out", help="result JSON (default perf/results/<gpu>_<utc time>[_quick].json; "
                                 "required with --device cpu)")
    p.add_argument("--max-seconds", type=float,
                   help="start no new case after this many seconds (default 300 quick, 480 full, "
                        "no limit on cpu)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: tiny shapes through the Triton interpreter, to check the script runs")
    p.add_argument("--head-dim-96", action="store_true",
                   help="only Phi-3-mini's attention (32 query = kv heads, D=96, the tl kernels), "
                        "B 1 / 16 x T 4k / 16k, and its prune_and_pack")
    p.add_argument("--autotune", choices=("library", "off"), default="library",
                   help="library: the package's own lookup/tuning; off: heuristic configs")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.out:
        p.error("--device cpu needs --out (CPU results do not belong in perf/results/)")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
# Both variables are read by Triton / mustafar_triton; TRITON_INTERPRET must be set before
# triton is first imported (DESIGN.md section 5).
if ARGS is not None and ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
if ARGS is not None and ARGS.autotune == "off":
    os.environ["MUSTAFAR_TRITON_AUTOTUNE"] = "0"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from common import (LLAMA3_8B, PHI3_MINI, RESULTS_DIR, SMOLLM2_135M, Model, bench_us,  # noqa: E402
                    copy_bandwidth, device_memory_bytes, environment, synchronize, write_results)

import mustafar_triton as mt  # noqa: E402  (common.py put the repository first on sys.path)
from mustafar_triton import attention, autotune, reference  # noqa: E402

SPARSITIES = (0.5, 0.7)
SPARSITY_AXIS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# Llama-3-8B fp16 (batch, tokens) measured at every sparsity of SPARSITY_AXIS
SPARSITY_AXIS_SHAPES = ((1, 32 * 1024), (16, 16 * 1024), (64, 4 * 1024), (4, 128 * 1024))
MAX_DENSE_FRACTION = 0.4  # of device memory, for the dense K+V of one shape
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
FP16, BF16 = torch.float16, torch.bfloat16
KILO = 1024


@dataclass(frozen=True)
class DecodeCase:
    model: Model
    batch: int
    tokens: int
    dtype: torch.dtype

    @property
    def dense_kv_bytes(self) -> int:
        m = self.model
        return 2 * self.batch * m.hkv * self.tokens * m.d * self.dtype.itemsize

    def __str__(self):
        return f"decode {self.model.name} {dtype_name(self.dtype)} B={self.batch} T={self.tokens}"


@dataclass(frozen=True)
class PackCase:
    shape: tuple[int, int, int, int]  # [B, H, T, D]
    dtype: torch.dtype
    sparsity: float

    @property
    def dense_kv_bytes(self) -> int:
        b, h, t, d = self.shape
        return b * h * t * d * self.dtype.itemsize

    def __str__(self):
        return f"prune_and_pack {list(self.shape)} {dtype_name(self.dtype)} s={self.sparsity}"


@dataclass(frozen=True)
class Rig:
    """Where and against what we measure."""
    device: torch.device
    copy_bw: float  # bytes/s, read + written


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def decode_grid(model, batches, contexts, dtype):
    return [DecodeCase(model, b, t, dtype) for b in batches for t in contexts]


def cases_for(mode: str) -> list:
    """Cases in priority order (duplicates removed, first occurrence kept). Full mode: the quick
    cases, more prune_and_pack shapes, the Llama-3-8B fp16 grid (B 1..64 x T 1k..128k, batch 16
    and 1 first), then fewer bf16, SmolLM2-135M and Phi-3-mini (D=96) shapes, so a run cut short by
    the time budget loses the least important shapes. Mode "head-dim-96": the Phi-3-mini cases."""
    head_dim_96 = (decode_grid(PHI3_MINI, (16, 1), (4 * KILO, 16 * KILO), FP16)
                   + [PackCase((16, 32, 4 * KILO, 96), FP16, 0.7)])
    if mode == "head-dim-96":
        return head_dim_96
    quick = ([PackCase((16, 8, 16 * KILO, 128), FP16, 0.7), PackCase((16, 8, 16 * KILO, 128), FP16, 0.5)]
             + [DecodeCase(LLAMA3_8B, b, t, FP16) for b, t in SPARSITY_AXIS_SHAPES])
    if mode == "cpu":
        cases = (decode_grid(LLAMA3_8B, (1, 2), (64, 128), FP16)
                 + decode_grid(SMOLLM2_135M, (2,), (128,), BF16) + [DecodeCase(PHI3_MINI, 1, 32, FP16)]
                 + [PackCase((2, 8, 256, 128), FP16, 0.7), PackCase((2, 3, 256, 64), BF16, 0.5)])
    elif mode == "quick":
        cases = quick
    else:
        contexts = [KILO * 2 ** i for i in range(8)]  # 1k .. 128k
        cases = (quick
                 + [PackCase((64, 8, 4 * KILO, 128), FP16, 0.7), PackCase((16, 8, 16 * KILO, 128), BF16, 0.7),
                    PackCase((1, 8, 128 * KILO, 128), FP16, 0.7), PackCase((16, 3, 16 * KILO, 64), FP16, 0.7)]
                 + decode_grid(LLAMA3_8B, (16, 1, 64, 4), contexts, FP16)
                 + decode_grid(LLAMA3_8B, (1, 16), (4 * KILO, 32 * KILO), BF16)
                 + [DecodeCase(LLAMA3_8B, 64, 4 * KILO, BF16)]
                 + decode_grid(SMOLLM2_135M, (1, 16, 64), (2 * KILO, 8 * KILO, 32 * KILO), FP16)
                 + decode_grid(SMOLLM2_135M, (16,), (8 * KILO,), BF16)
                 + head_dim_96)
    return list(dict.fromkeys(cases))


def describe_error(err: Exception, caught: list) -> str:
    """One line: the exception and the warnings raised with it (SDPA says there why a backend refused)."""
    reasons = [str(w.message).splitlines()[0] for w in caught]
    return " | ".join([f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"] + reasons)[:600]


def measure(row: dict, fn, nbytes: int, rig: Rig) -> dict:
    """Fill row with fn's median time and bandwidth, or with the error fn raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            us = bench_us(fn, rig.device)
        except Exception as err:  # a backend that cannot run this shape or dtype: record why
            row["error"] = describe_error(err, caught)
            return row
    gbps = nbytes / (us * 1e-6) / 1e9
    row.update(median_us=us, bytes=nbytes, gbps=gbps, bw_frac=gbps * 1e9 / rig.copy_bw)
    return row


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def repeat_heads(k, v, group: int, rig: Rig, cache: list) -> list | None:
    """K and V with every kv head repeated `group` times (built once per shape, kept in cache);
    None when they would not fit in free device memory."""
    if not cache:
        if rig.device.type == "cuda" and 1.2 * group * nbytes(k, v) > torch.cuda.mem_get_info(rig.device)[0]:
            return None
        cache += [k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)]
    return cache


def sdpa_rows(q, k, v, base: dict, rig: Rig) -> list[dict]:
    """Dense SDPA, one row per backend. GQA runs natively (enable_gqa=True) where the backend
    supports it, else on K/V with the heads repeated Hq / Hkv times (outside the timed region)."""
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
    group = q.shape[1] // k.shape[1]
    repeated = []
    rows = []
    for name, backend in SDPA_BACKENDS.items():
        with sdpa_kernel([backend]):
            row = measure(dict(base, kernel="sdpa", backend=name, gqa="native"),
                          lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True), nbytes(k, v), rig)
            if "error" in row and group > 1:
                row = dict(base, kernel="sdpa", backend=name, gqa="expanded", native_error=row["error"])
                kv = repeat_heads(k, v, group, rig, repeated)
                if kv is None:
                    row["error"] = "no GQA path, and K/V with repeated heads would not fit in free memory"
                else:
                    ek, ev = kv
                    row = measure(row, lambda: F.scaled_dot_product_attention(q4, ek, ev), nbytes(ek, ev), rig)
        rows.append(row)
    return rows


def flash_attn_decode(q, k, v):
    """flash-attn's decode entry point on the HND cache viewed as NHD (no copy)."""
    from flash_attn import flash_attn_with_kvcache

    return lambda: flash_attn_with_kvcache(q.unsqueeze(1), k.transpose(1, 2), v.transpose(1, 2))


def flashinfer_decode(q, k, v):
    """FlashInfer batch decode; the [B, Hkv, T, D] cache is an HND paged cache of one T-token page
    per sequence (no copy)."""
    import flashinfer

    b, hkv, t, d = k.shape
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND")
    pages = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    last_page_len = torch.full((b,), t, dtype=torch.int32, device=q.device)
    wrapper.plan(pages, pages[:-1], last_page_len, q.shape[1], hkv, d, t,
                 q_data_type=q.dtype, kv_data_type=k.dtype)
    return lambda: wrapper.run(q, (k, v))


OTHER_LIBRARIES = {"flash_attn": flash_attn_decode, "flashinfer": flashinfer_decode}


def other_library_rows(q, k, v, base: dict, rig: Rig, importable: dict) -> list[dict]:
    rows = []
    for name, make in OTHER_LIBRARIES.items():
        if importable[name] is not True:
            continue
        row = dict(base, kernel=name, backend=name, gqa="native")
        try:
            fn = make(q, k, v)
        except Exception as err:  # an API version we do not drive correctly: record it
            row["error"] = describe_error(err, [])
        else:
            row = measure(row, fn, nbytes(k, v), rig)
        rows.append(row)
    return rows


def sparsities_for(case: DecodeCase) -> tuple[float, ...]:
    on_axis = case.model == LLAMA3_8B and case.dtype == FP16 and (case.batch, case.tokens) in SPARSITY_AXIS_SHAPES
    return SPARSITY_AXIS if on_axis else SPARSITIES


def first_kv_head(p: mt.PackedKV) -> mt.PackedKV:
    return mt.PackedKV(p.bitmap[:1, :1].contiguous(), p.values[:1, :1].contiguous(), p.capacity, p.head_dim)


def mustafar_row(q, k, v, sparsity: float, base: dict, rig: Rig) -> dict:
    """Our decode on prune_and_pack(K), prune_and_pack(V), no dense window."""
    row = dict(base, kernel="mustafar", backend="triton", sparsity=sparsity)
    group = q.shape[1] // k.shape[1]
    try:
        pk, pv = mt.prune_and_pack(k, sparsity), mt.prune_and_pack(v, sparsity)
        synchronize(rig.device)
        start = time.perf_counter()
        out = mt.sparse_decode_attention(q, pk, pv)  # compiles and, for a new shape bucket, tunes
        synchronize(rig.device)
        first_call_s = time.perf_counter() - start
        expected = reference.sparse_decode_attention(q[:1, :group], first_kv_head(pk), first_kv_head(pv),
                                                     compute_dtype=torch.float32)
    except Exception as err:  # a kernel that does not compile or launch for this shape: record it, go on
        row["error"] = describe_error(err, [])
        return row
    # The config the call above used: the same lookup as attention.py (after tuning, the tuned one).
    config = autotune.config_for("decode", rig.device, head_dim=q.shape[-1], group=group, dtype=q.dtype,
                                 capacity=max(pk.capacity, pv.capacity), batch_heads=k.shape[0] * k.shape[1],
                                 context=k.shape[2])
    row.update(capacity=pk.capacity, first_call_s=first_call_s, config=config,
               gather=attention.launched_gather(q, pk, pv), byte_bound_us=(pk.nbytes + pv.nbytes) / rig.copy_bw * 1e6,
               max_abs_err=(out[:1, :group].float() - expected.float()).abs().max().item())
    return measure(row, lambda: mt.sparse_decode_attention(q, pk, pv), pk.nbytes + pv.nbytes + nbytes(q, out), rig)


def run_decode_case(case: DecodeCase, rig: Rig, importable: dict) -> list[dict]:
    m, dev = case.model, rig.device
    q = torch.randn(case.batch, m.hq, m.d, dtype=case.dtype, device=dev)
    k = torch.randn(case.batch, m.hkv, case.tokens, m.d, dtype=case.dtype, device=dev)
    v = torch.randn_like(k)
    base = dict(op="decode", model=m.name, batch=case.batch, T=case.tokens, hq=m.hq, hkv=m.hkv, d=m.d,
                dtype=dtype_name(case.dtype), sparsity=None, window=0, dense_kv_bytes=case.dense_kv_bytes)
    rows = sdpa_rows(q, k, v, base, rig) + other_library_rows(q, k, v, base, rig, importable)
    rows += [mustafar_row(q, k, v, s, base, rig) for s in sparsities_for(case)]
    dense = [r["median_us"] for r in rows if r["kernel"] == "sdpa" and "median_us" in r]
    for r in rows:
        if dense and "median_us" in r:
            r["speedup"] = min(dense) / r["median_us"]
    return rows


def run_pack_case(case: PackCase, rig: Rig) -> list[dict]:
    b, h, t, d = case.shape
    x = torch.randn(case.shape, dtype=case.dtype, device=rig.device)
    packed = mt.prune_and_pack(x, case.sparsity)
    row = dict(op="prune_and_pack", kernel="mustafar", backend="triton", model=None, batch=b, T=t, hq=None,
               hkv=h, d=d, dtype=dtype_name(case.dtype), sparsity=case.sparsity, capacity=packed.capacity,
               dense_kv_bytes=case.dense_kv_bytes)
    return [measure(row, lambda: mt.prune_and_pack(x, case.sparsity), nbytes(x) + packed.nbytes, rig)]


def probe_other_libraries() -> dict:
    """True for each importable library, else why not."""
    found = {}
    for name in OTHER_LIBRARIES:
        try:
            __import__(name)
            found[name] = True
        except Exception as err:  # ImportError, or a broken build raising anything at import
            found[name] = f"not importable: {type(err).__name__}: {err}"[:300]
    return found


def case_summary(rows: list[dict]) -> str:
    parts = []
    dense = [r for r in rows if r["kernel"] == "sdpa" and "median_us" in r]
    if dense:
        best = min(dense, key=lambda r: r["median_us"])
        parts.append(f"dense {best['median_us']:.0f} us ({best['backend']})")
    for r in rows:
        if r["kernel"] == "mustafar" and "median_us" in r:
            extra = f" {r['speedup']:.2f}x" if "speedup" in r else f" {r['bw_frac']:.0%} of copy bw"
            if "max_abs_err" in r:
                extra += f" (max abs err {r['max_abs_err']:.1e})"
            parts.append(f"s={r['sparsity']}: {r['median_us']:.0f} us{extra}")
        elif "error" in r and r["kernel"] == "mustafar":
            parts.append(f"s={r['sparsity']}: ERROR")
    return " | ".join(parts)


def print_table(rows: list[dict]) -> None:
    shapes = {}
    for r in rows:
        if r["op"] == "decode":
            shapes.setdefault((r["model"], r["dtype"], r["batch"], r["T"]), []).append(r)
    sparsities = sorted({r["sparsity"] for r in rows if r["op"] == "decode" and r["sparsity"] is not None})
    head = f"{'model':<13} {'dtype':<8} {'B':>3} {'T':>7} | {'best dense':>18}"
    head += "".join(f" | {'s=' + str(s):>16}" for s in sparsities)
    print("\n" + head + "\n" + "-" * len(head))
    for (model, dtype, b, t), group in shapes.items():
        dense = [r for r in group if r["kernel"] == "sdpa" and "median_us" in r]
        best = min(dense, key=lambda r: r["median_us"]) if dense else None
        line = f"{model:<13} {dtype:<8} {b:>3} {t:>7} | "
        line += f"{best['median_us']:>8.1f} us {best['backend']:>6}" if best else f"{'-':>18}"
        for s in sparsities:
            ours = [r for r in group if r["kernel"] == "mustafar" and r["sparsity"] == s and "median_us" in r]
            cell = f"{ours[0]['median_us']:.1f} us {ours[0].get('speedup', float('nan')):.2f}x" if ours else "-"
            line += f" | {cell:>16}"
        print(line)
    for r in rows:
        if r["op"] == "prune_and_pack" and "median_us" in r:
            print(f"prune_and_pack {[r['batch'], r['hkv'], r['T'], r['d']]} {r['dtype']} s={r['sparsity']}: "
                  f"{r['median_us']:.1f} us, {r['gbps']:.0f} GB/s, {r['bw_frac']:.0%} of copy bandwidth")


def default_out(meta: dict, quick: bool) -> str:
    gpu = "".join(c if c.isalnum() else "_" for c in meta["gpu"]).strip("_")
    stamp = meta["date_utc"].replace("-", "").replace(":", "")
    return str(RESULTS_DIR / f"{gpu}_{stamp}{'_quick' if quick else ''}.json")


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu for the interpreter smoke test)")
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("TRITON_INTERPRET is set: unset it for a GPU sweep (or pass --device cpu)")
    mode = ("cpu" if device.type == "cpu" else "head-dim-96" if args.head_dim_96 else "quick" if args.quick
            else "full")
    max_seconds = args.max_seconds if args.max_seconds is not None else {
        "cpu": 0, "quick": 300, "full": 480, "head-dim-96": 300}[mode]
    torch.manual_seed(0)
    start = time.perf_counter()

    meta = environment(device)
    out = Path(args.out or default_out(meta, args.quick))
    rig = Rig(device, copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20)))
    importable = probe_other_libraries()
    memory_limit = MAX_DENSE_FRACTION * device_memory_bytes(device)
    cases = cases_for(mode)
    skipped = [str(c) for c in cases if c.dense_kv_bytes > memory_limit]
    cases = [c for c in cases if c.dense_kv_bytes <= memory_limit]
    meta.update(
        script="perf/sweep.py", mode=mode, argv=sys.argv[1:], copy_bandwidth_bytes_per_s=rig.copy_bw,
        sparsities=list(SPARSITIES), sparsity_axis=list(SPARSITY_AXIS),
        sparsity_axis_shapes=[list(s) for s in SPARSITY_AXIS_SHAPES],
        window=0, window_note="no dense recent window: every token of the cache is compressed",
        timing=("GPU time per call, L2 flushed before each call, host excluded (mustafar_triton._timing."
                "gpu_time_ms: CUDA-graph replays)" if device.type == "cuda"
                else "median of time.perf_counter, Triton interpreter"),
        autotune=args.autotune, max_seconds=max_seconds, other_libraries=importable,
        skipped_memory=skipped, skipped_memory_rule=f"dense K+V > {MAX_DENSE_FRACTION:.0%} of device memory")
    print(f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit'][:12]} | "
          f"copy bandwidth {rig.copy_bw / 1e12:.2f} TB/s | {len(cases)} cases | results -> {out}", flush=True)

    rows, not_run, previous = [], [], 0.0
    for i, case in enumerate(cases):
        elapsed = time.perf_counter() - start
        if max_seconds and elapsed + previous > max_seconds:
            not_run = [str(c) for c in cases[i:]]
            print(f"time budget: {elapsed:.0f} s used of {max_seconds:.0f} s, {len(not_run)} cases not run", flush=True)
            break
        print(f"[{i + 1}/{len(cases)} {elapsed:4.0f}s] {case}", flush=True)
        case_start = time.perf_counter()
        new = run_decode_case(case, rig, importable) if isinstance(case, DecodeCase) else run_pack_case(case, rig)
        previous = time.perf_counter() - case_start
        rows += new
        print(f"    {case_summary(new)}  ({previous:.1f} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next shape may need the whole device
        meta.update(elapsed_s=time.perf_counter() - start, not_run=[str(c) for c in cases[i + 1:]], complete=False)
        write_results(out, meta, rows)
    meta.update(elapsed_s=time.perf_counter() - start, not_run=not_run, complete=not not_run,
                first_call_total_s=sum(r.get("first_call_s", 0.0) for r in rows))
    write_results(out, meta, rows)

    print_table(rows)
    print(f"\n{len(rows)} rows in {meta['elapsed_s']:.0f} s (first calls, compile + tuning: "
          f"{meta['first_call_total_s']:.0f} s) -> {out}")
    failed = sorted({(r["kernel"], r["backend"], r["error"][:120]) for r in rows if "error" in r})
    for kernel, backend, error in failed:
        print(f"failed: {kernel}/{backend}: {error}")


if __name__ == "__main__":
    main(ARGS)
