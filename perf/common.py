"""Helpers shared by perf/sweep.py and perf/plot.py: model shapes, environment metadata, timing,
copy bandwidth and result files.

Timing (`bench_us`): on CUDA, GPU time of one call with the L2 flushed before it and the host's
share excluded (`mustafar_triton._timing.gpu_time_ms`: CUDA-graph replays of flush + call minus
flush alone; the tuner times the same way). Cold L2, because a decode step finds its layer's KV
cache evicted by the other layers. Until 24c43f7 (2026-11-23) this was `triton.testing.do_bench`, which
times from the host: at B=1 T=32768 it measured 151-207 us for ~67 us of GPU work (the host took
longer per call than flush + kernel), so small-shape results older than that include host time.
On CPU (the interpreter smoke mode) the time is the median of a few `time.perf_counter`
measurements.

Result files are JSON: {"meta": {...}, "rows": [{...}, ...]}; see perf/sweep.py for the fields.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "perf" / "results"
# Benchmark the checked-out package, not whichever copy happens to be installed.
sys.path.insert(0, str(REPO_ROOT))


@dataclass(frozen=True)
class Model:
    """Attention shape of a model: query heads, kv heads, head dim, layers (for memory sizing)."""
    name: str
    hq: int
    hkv: int
    d: int
    layers: int


LLAMA3_8B = Model("Llama-3-8B", hq=32, hkv=8, d=128, layers=32)
SMOLLM2_135M = Model("SmolLM2-135M", hq=9, hkv=3, d=64, layers=30)
PHI3_MINI = Model("Phi-3-mini", hq=32, hkv=32, d=96, layers=32)  # head dim 96: the tl kernels only
MODELS = {m.name: m for m in (LLAMA3_8B, SMOLLM2_135M)}  # the KV-memory figure's models


def decode_inputs(model: Model, batch: int, tokens: int, device: torch.device, dtype=torch.float16):
    """Random q [B, Hq, D] and k, v [B, Hkv, T, D] of a model's attention, and the result-row fields
    that name the shape."""
    q = torch.randn(batch, model.hq, model.d, device=device, dtype=dtype)
    k, v = (torch.randn(batch, model.hkv, tokens, model.d, device=device, dtype=dtype) for _ in range(2))
    return q, k, v, dict(batch=batch, tokens=tokens, hq=model.hq, hkv=model.hkv, d=model.d,
                         dtype=str(dtype).replace("torch.", ""))


def load_kernel_copy(path: Path):
    """Another copy of a module of mustafar_triton/kernels/ (an older commit's, or a variant such as
    perf/scatter_ablations.py writes), its relative imports made absolute, as a module of its own
    (its source written to .gen/kernel_copies/, never beside `path`, which may be in the package)."""
    source = path.read_text().replace("from .", "from mustafar_triton.kernels.")
    tmp = REPO_ROOT / ".gen" / "kernel_copies" / (path.stem + "_loaded.py")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(source)
    spec = importlib.util.spec_from_file_location(f"kernel_copy_{path.stem}", tmp)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git_commit() -> str:
    """MUSTAFAR_COMMIT if set (a copy of the tree without its real .git, as on a lent GPU), else git's HEAD."""
    if os.environ.get("MUSTAFAR_COMMIT"):
        return os.environ["MUSTAFAR_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> bool | None:
    """True when tracked files differ from HEAD (the numbers then belong to no commit)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True, timeout=10).stdout
        return bool(out.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def environment(device: torch.device) -> dict:
    import triton

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = dict(gpu=props.name, sm_count=props.multi_processor_count,
                   compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        gpu = dict(gpu=f"CPU ({platform.processor() or platform.machine()}, Triton interpreter)")
    return dict(
        device_type=device.type, **gpu, memory_bytes=device_memory_bytes(device),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        commit=git_commit(), dirty=git_dirty(),
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_us(fn, device: torch.device, cpu_reps: int = 3) -> float:
    """Median time of one call of fn in microseconds (method in the module docstring)."""
    if device.type == "cuda":
        from mustafar_triton._timing import gpu_time_ms

        fn()  # warm-up: compiles, tunes, allocates
        return 1e3 * gpu_time_ms(fn)
    fn()  # warm-up: compiles / traces
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + bytes written of dst.copy_(src).
    Timed eagerly with do_bench, not with bench_us: through bench_us's CUDA graphs the copy
    measured 2.47 TB/s against 3.0 TB/s eagerly (H100; presumably because a captured copy_ is a
    memcpy node, not verified), and a ~0.7 ms copy leaves the host no room to distort do_bench."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing

        seconds = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median") * 1e-3
    else:
        seconds = bench_us(lambda: dst.copy_(src), device) * 1e-6
    return 2 * nbytes / seconds


def write_results(path: Path, meta: dict, rows: list[dict]) -> None:
    """Write {"meta", "rows"} atomically (a run killed mid-write keeps the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(path)


def read_results(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not {"meta", "rows"} <= data.keys():
        raise ValueError(f"{path} is not a sweep result file (needs 'meta' and 'rows')")
    return data
