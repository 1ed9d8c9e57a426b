"""Tile configs for every kernel: shipped tuned files, tuning on request, heuristic defaults.

Lookup order for a launch on a GPU (a "shape" is a bucket's categorical keys, e.g. decode's
head_dim, GQA group, dtype and capacity; its numeric keys are batch x heads and context):
  1. the tuned file for this GPU, `<dir>/<normalised device name>.json`, where <dir> is
     $MUSTAFAR_TRITON_AUTOTUNE_DIR if set, else the repository's `autotune_cache/`: the entry of
     the nearest bucket of the same shape (numeric keys nearest in log2);
  2. the user's cache, `~/.cache/mustafar_triton/<name>.json` ($MUSTAFAR_TRITON_USER_CACHE), the
     same way: so a context that grows into a new bucket reuses the nearest tuned one;
  3. nothing tuned for the shape: with $MUSTAFAR_TRITON_AUTOTUNE=1, the first launch of the shape
     (outside CUDA-graph capture and torch.compile tracing) times the kernel's config space (GPU
     time, L2 flushed: `_timing.gpu_time_ms`), announced by a warning, and stores the fastest in
     the user cache; without it, the heuristic default, with ONE warning per shape saying how
     to tune it. Launches never tune unannounced, and a shape tunes at most once.
The heuristic default also serves the interpreter, CUDA-graph capture and
$MUSTAFAR_TRITON_AUTOTUNE=0 (which skips both files). We time whole launches ourselves rather
than use `triton.autotune`, because the decode split count changes the grid and the split
buffers, which `triton.autotune` cannot vary. A missing file falls through silently; a corrupt
file falls through with one warning. A shipped file tuned with another triton version is used
with one warning (its configs are tile sizes and split counts, valid on any version; only the GPU
machine's triton can tune them); a user cache tuned with another triton version is ignored with
one warning, and its shapes are tuned again. A file tuned before the Gluon decode gathers last
changed (its "gathers_revision" below decode_gluon_launch.GATHERS_REVISION) keeps its decode split
counts but drops the gathers it names, with one warning: the launch policy picks the gather.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
import triton

from ._timing import gpu_time_ms
from ._gluon_compat import gluon_runs_on
from ._runtime import device_name, interpreting, next_pow2, num_sms
from .kernels.decode_gluon_launch import GATHERS_REVISION

REPO_CACHE_DIR = Path(__file__).resolve().parent.parent / "autotune_cache"

# Per kernel: which bucket keys must match exactly, which are matched by nearest log2 distance.
BUCKET_KEYS = {
    "select": (("head_dim", "dtype"), ("rows",)),
    "unpack": (("head_dim", "dtype"), ("rows",)),
    "decode": (("head_dim", "group", "dtype", "capacity"), ("batch_heads", "context")),
}


def normalised_device_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def config_space(kernel: str, **bucket) -> list[dict]:
    """Every config worth timing for a kernel and bucket (filtered by what the tile can hold)."""
    if kernel in ("select", "unpack"):
        big = bucket["head_dim"] >= 256
        space = [dict(BLOCK_T=bt, num_warps=w, num_stages=1)
                 for bt in (16, 32, 64, 128) for w in (2, 4, 8)
                 if not (big and bt == 128 and w < 4)]
        if kernel == "select" and _gluon_select_bucket(bucket, False):  # what a GPU can tune, as for decode
            space.append(dict(GLUON_SELECT_CONFIG))
        return space
    if kernel == "decode":
        from .kernels.decode import decode_config_space
        return decode_config_space(**bucket)
    raise KeyError(kernel)


def runnable_space(kernel: str, device: torch.device, **bucket) -> list[dict]:
    """config_space without the Gluon configs where Gluon cannot run (_gluon_compat.gluon_runs_on:
    an unchecked triton, a GPU before Ampere): tuning must not launch them there."""
    gluon_ok = gluon_runs_on(device)
    return [c for c in config_space(kernel, **bucket) if gluon_ok or c.get("kernel") != "gluon"]


def heuristic_config(kernel: str, device: torch.device, **bucket) -> dict:
    if kernel == "select":
        if _gluon_select_bucket(bucket, interpreting()) and gluon_runs_on(device):
            return dict(GLUON_SELECT_CONFIG)
        return tl_select_config(interpreting())
    if kernel == "unpack":
        if interpreting():
            return dict(BLOCK_T=64, num_warps=4, num_stages=1)
        # the H100 tuning (perf/results/tune_h100_quick.json) preferred these at every measured bucket
        return dict(BLOCK_T=64 if bucket["head_dim"] <= 128 else 32, num_warps=2, num_stages=1)
    if kernel == "decode":
        from .kernels.decode import decode_heuristic_config
        return decode_heuristic_config(num_sms(device), interpreting(), **bucket)
    raise KeyError(kernel)


# prune_and_pack by kernels/prune_pack_gluon.py (~3.8x the tl kernel on the H100 at 16x8x16384x128
# fp16); a "select" config of this kind makes prune_topk and pack use tl_select_config.
GLUON_SELECT_CONFIG = dict(kernel="gluon")


def _gluon_select_bucket(bucket: dict, interpreter: bool) -> bool:
    from .kernels.prune_pack import gluon_prune_supports
    return gluon_prune_supports(bucket.get("dtype"), bucket.get("head_dim", 0), interpreter)


def tl_select_config(interpreter: bool) -> dict:
    """prune_pack.py's kernel: the H100 tuning (perf/results/tune_h100_quick.json) preferred
    BLOCK_T 16, 4 warps at every measured bucket."""
    if interpreter:
        return dict(BLOCK_T=64, num_warps=4, num_stages=1)
    return dict(BLOCK_T=16, num_warps=4, num_stages=1)


def bucket_of(kernel: str, **bucket) -> dict:
    """Normalise a bucket: dtypes as strings, numeric keys rounded to powers of two."""
    exact, numeric = BUCKET_KEYS[kernel]
    out = {k: str(bucket[k]).replace("torch.", "") for k in exact}
    for k in numeric:
        out[k] = next_pow2(max(1, int(bucket[k])))
    return out


def _log_distance(a: dict, b: dict, numeric) -> float:
    return sum(abs(math.log2(max(1, a[k])) - math.log2(max(1, b[k]))) for k in numeric)


def nearest_entry(entries: list[dict], kernel: str, bucket: dict) -> dict | None:
    exact, numeric = BUCKET_KEYS[kernel]
    candidates = [e for e in entries if e.get("kernel") == kernel
                  and all(str(e["bucket"].get(k)) == str(bucket[k]) for k in exact)]
    if not candidates:
        return None
    return min(candidates, key=lambda e: _log_distance(e["bucket"], bucket, numeric))["config"]


_warned: set = set()  # messages, or the keys warnings are deduplicated by
_file_cache: dict[Path, list[dict]] = {}


def _warn_once(msg: str, once_per=None) -> None:
    """Warn with msg unless this process already warned it (or already warned about once_per)."""
    once_per = msg if once_per is None else once_per
    if once_per not in _warned:
        _warned.add(once_per)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def load_entries(path: Path, other_triton_ok: bool = False) -> list[dict]:
    """Entries of a tuned file; [] (with one warning) if it is corrupt, or from another triton
    version unless other_triton_ok (then used, with one warning). Decode configs of a file tuned at
    an older GATHERS_REVISION lose their "gather" key (with one warning)."""
    if path in _file_cache:
        return _file_cache[path]
    entries: list[dict] = []
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            tuned_with = data.get("triton_version")
            if tuned_with == triton.__version__ or other_triton_ok:
                entries = [e for e in data["entries"] if {"kernel", "bucket", "config"} <= e.keys()]
                entries = _without_stale_gathers(entries, data.get("gathers_revision", 0), path)
            if tuned_with != triton.__version__:
                _warn_once(f"mustafar_triton: {'using' if other_triton_ok else 'ignoring'} {path}: tuned "
                           f"with triton {tuned_with}, running {triton.__version__}"
                           + (" (python -m mustafar_triton.tune re-tunes for it)" if other_triton_ok else ""))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            _warn_once(f"mustafar_triton: ignoring corrupt autotune file {path}: {err}")
    _file_cache[path] = entries
    return entries


def _without_stale_gathers(entries: list[dict], revision: int, path: Path) -> list[dict]:
    """entries, with the gathers that decode configs name dropped if they were chosen at a gathers
    revision older than GATHERS_REVISION (the kernels compared then have changed since)."""
    if revision >= GATHERS_REVISION or not any(e["kernel"] == "decode" and "gather" in e["config"] for e in entries):
        return entries
    _warn_once(f"mustafar_triton: {path} chose decode gathers before they changed (gathers revision {revision}, "
               f"now {GATHERS_REVISION}): using its split counts and the default gathers (python -m "
               "mustafar_triton.tune re-tunes)")
    return [dict(e, config={k: v for k, v in e["config"].items() if k != "gather"}) if e["kernel"] == "decode" else e
            for e in entries]


def shipped_dir() -> Path:
    return Path(os.environ.get("MUSTAFAR_TRITON_AUTOTUNE_DIR", REPO_CACHE_DIR))


def user_cache_path(device: torch.device) -> Path:
    root = Path(os.environ.get("MUSTAFAR_TRITON_USER_CACHE",
                               Path.home() / ".cache" / "mustafar_triton"))
    return root / f"{normalised_device_name(device_name(device))}.json"


def write_entries(path: Path, entries: list[dict], device: torch.device) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"device": device_name(device), "triton_version": triton.__version__,
            "torch_version": torch.__version__, "gathers_revision": GATHERS_REVISION, "entries": entries}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    _file_cache[path] = entries


def time_config(run, cfg: dict) -> float:
    """Median GPU ms of run(cfg), L2 flushed before each call, host cost excluded (_timing.py: the
    same timing as perf/sweep.py). A decode step finds its layer's cache evicted by the other
    layers; timing warm (CUDA-graph replays without a flush) favoured configs that only win
    while a small cache stays in the 50 MB L2 (measured: 61 us warm vs 156 us cold at B=1), and
    do_bench's host-side events timed the host at B=1 (151-207 us for ~67 us of GPU work)."""
    run(cfg)  # compile first
    return gpu_time_ms(lambda: run(cfg))


def tune(kernel: str, run, bucket: dict, space: list[dict]) -> tuple[dict, list[tuple[dict, float]]]:
    """Time run(config) for every config; re-time the three fastest back to back and return the
    fastest of those with every first-pass timing."""
    timings = []
    for cfg in space:
        try:
            timings.append((cfg, time_config(run, cfg)))
        except Exception:  # a config the GPU cannot hold (shared memory, registers): skip it
            continue
    if not timings:
        raise RuntimeError(f"no config of {kernel} ran for bucket {bucket}")
    finalists = [cfg for cfg, _ in sorted(timings, key=lambda t: t[1])[:3]]
    return min(finalists, key=lambda cfg: time_config(run, cfg)), timings


_resolved: dict[tuple, dict] = {}


def _shape_text(kernel: str, key: dict) -> str:
    return " ".join(f"{k}={key[k]}" for k in BUCKET_KEYS[kernel][0])


def _tuning_requested() -> bool:
    return os.environ.get("MUSTAFAR_TRITON_AUTOTUNE") == "1"


def tracing(device: torch.device) -> bool:
    """Inside a torch.compile trace or a CUDA-graph capture on `device`, where timing launches is impossible."""
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def config_for(kernel: str, device: torch.device, run=None, **bucket) -> dict:
    """The launch config for `kernel` on `device` for a problem described by `bucket`.

    run(config), when given, launches the kernel with that config: with
    MUSTAFAR_TRITON_AUTOTUNE=1 it tunes a shape nothing is tuned for (see the module docstring).
    """
    if interpreting() or device.type != "cuda" or os.environ.get("MUSTAFAR_TRITON_AUTOTUNE") == "0":
        return heuristic_config(kernel, device, **bucket)
    key = bucket_of(kernel, **bucket)
    memo = (kernel, str(device), tuple(sorted(key.items())))
    if memo in _resolved:  # decode runs every step: resolve a bucket once per process
        return _resolved[memo]
    found = _lookup(kernel, device, key, run, bucket)
    if found is None:  # nothing tuned and no tuning now: heuristic, not memoized (a later call may tune)
        return heuristic_config(kernel, device, **bucket)
    _resolved[memo] = found
    return found


def _lookup(kernel: str, device: torch.device, key: dict, run, bucket: dict) -> dict | None:
    name = normalised_device_name(device_name(device))
    found = nearest_entry(load_entries(shipped_dir() / f"{name}.json", other_triton_ok=True), kernel, key)
    if found is not None:
        return found
    user_path = user_cache_path(device)
    user_entries = load_entries(user_path)
    found = nearest_entry(user_entries, kernel, key)
    if found is not None:
        return found
    shape = _shape_text(kernel, key)
    if run is None or not _tuning_requested():
        how = (f"run one call of it (a warm-up step) with MUSTAFAR_TRITON_AUTOTUNE=1: it tunes for seconds, "
               f"once, and saves to {user_path}" if run is not None else
               f"`python -m mustafar_triton.tune --kernels {kernel}` tunes the buckets it lists")
        _warn_once(f"mustafar_triton: no tuned {kernel} config for {shape} on {device_name(device)}; "
                   f"using the default config. To tune this shape ahead: {how}",
                   once_per=(kernel, device_name(device), shape))
        return None
    if tracing(device):
        return None
    _warn_once(f"mustafar_triton: tuning {kernel} for {shape} on {device_name(device)} "
               f"(MUSTAFAR_TRITON_AUTOTUNE=1): this call takes seconds; the config serves every bucket "
               f"of the shape and is saved to {user_path}")
    best, _ = tune(kernel, run, key, runnable_space(kernel, device, **bucket))
    write_entries(user_path, user_entries + [{"kernel": kernel, "bucket": key, "config": best}], device)
    return best


@contextlib.contextmanager
def forced_config(kernel: str, cfg: dict):
    """Within the block, launches of `kernel` use cfg instead of the looked-up config (other
    kernels are unaffected). For tuning and experiments, not for production code."""
    global config_for
    original = config_for

    def forced(name, device, run=None, **bucket):
        return dict(cfg) if name == kernel else original(name, device, run=run, **bucket)
    config_for = forced
    try:
        yield
    finally:
        config_for = original
