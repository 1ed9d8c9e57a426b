"""Regenerate every figure from sweep result files (no GPU needed).

    python perf/plot.py [RESULT.json ...] [--out-dir plots]

Without files: the newest GPU result of perf/sweep.py in perf/results/, together with the other
GPU results there of the same GPU and commit (a quick and a full run, say); where two files
measured the same row, the newer one wins.

Figures, per model and dtype of the decode rows (<tag> = model_dtype):
    latency_vs_context_<tag>.png   ours at each sparsity vs every dense backend, a panel per batch
    speedup_vs_context_<tag>.png   over the fastest dense SDPA backend of each shape
    speedup_vs_batch_<tag>.png
    speedup_vs_sparsity_<tag>.png  measured, and the bytes ratio dense / compressed
    time_vs_sparsity_<tag>.png     ours at each sparsity, the fastest dense backend and the byte
                                   bound (compressed bytes / copy bandwidth), a panel per shape
                                   measured at 3+ sparsities: does the time follow the bytes?
    bandwidth_fraction_<tag>.png   bytes moved / time, as a fraction of the measured copy bandwidth
and once:
    kv_memory.png                  KV-cache size and largest batch per context in 80 GB (analytic)
    prune_and_pack_throughput.png  (bytes read + written) / time
From the newest equal-bytes result of perf/accuracy.py per model (or the accuracy files given):
    accuracy_vs_bytes_<model>.png  perplexity change vs bytes ratio, a point per configuration and
                                   text, the Pareto front, the references and the library's presets
"""
from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from common import MODELS, REPO_ROOT, RESULTS_DIR, read_results  # noqa: E402

from mustafar_triton.format import default_capacity  # noqa: E402

SWEEP_SCRIPT = "perf/sweep.py"
ACCURACY_SCRIPT = "perf/accuracy.py"
MEMORY_BUDGET = 80e9  # bytes, for kv_memory.png
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
OURS_COLORS = {0.5: "tab:orange", 0.6: "gold", 0.7: "tab:red", 0.8: "tab:pink", 0.9: "tab:brown", 0.95: "maroon"}
DENSE_STYLES = {"cudnn": ("tab:blue", "s"), "flash": ("tab:cyan", "^"), "efficient": ("tab:purple", "v"),
                "flash_attn": ("tab:green", "D"), "flashinfer": ("tab:olive", "P")}
ROW_KEY = ("op", "kernel", "backend", "model", "batch", "T", "hq", "hkv", "d", "dtype", "sparsity")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="sweep result files (default: newest GPU results)")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "plots")
    return p.parse_args()


def script_of(path: Path) -> str | None:
    try:
        return read_results(path)["meta"].get("script")
    except ValueError:  # not JSON, or not a result file
        return None


def default_accuracy_files() -> list[Path]:
    """The newest equal-bytes result of perf/accuracy.py in perf/results/ per model, if any."""
    newest: dict[str, tuple[str, Path]] = {}
    for path in sorted(RESULTS_DIR.glob("accuracy_*.json")):
        meta = read_results(path)["meta"]
        if meta.get("script") == ACCURACY_SCRIPT and meta.get("grid", "").startswith("equal-bytes"):
            newest[meta["model"]] = max(newest.get(meta["model"], ("", path)), (meta["date_utc"], path))
    return [path for _, path in newest.values()]


def default_files() -> list[Path]:
    """The newest GPU sweep result and the others of the same GPU and commit, oldest first."""
    found = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        try:
            meta = read_results(path)["meta"]
        except ValueError:  # not JSON, or another script's file
            continue
        if meta.get("script") == SWEEP_SCRIPT and meta.get("device_type") == "cuda":
            found.append((meta["date_utc"], path, meta))
    if not found:
        raise SystemExit(f"no GPU results of {SWEEP_SCRIPT} in {RESULTS_DIR}; pass result files explicitly")
    newest = max(found, key=lambda f: f[0])[2]
    return [path for _, path, meta in sorted(found, key=lambda f: f[0])
            if (meta["gpu"], meta["commit"]) == (newest["gpu"], newest["commit"])]


def load(files: list[Path]) -> tuple[dict, list[dict]]:
    """Meta of the last file and the measured rows of all (later files override equal rows)."""
    rows, metas = {}, []
    for path in files:
        data = read_results(path)
        metas.append(data["meta"])
        for r in data["rows"]:
            if r.get("median_us") is not None:
                rows[tuple(r.get(k) for k in ROW_KEY)] = r
    if len({m["gpu"] for m in metas}) > 1:
        print(f"warning: mixing results of {sorted({m['gpu'] for m in metas})}")
    return metas[-1], list(rows.values())


def bytes_ratio(d: int, dtype: str, sparsity: float) -> float:
    """Dense over compressed bytes per token and head: D * itemsize / (D/8 + capacity * itemsize)."""
    item = ITEMSIZE[dtype]
    return d * item / (d / 8 + default_capacity(d, sparsity) * item)


def tokens_label(t: float, _pos=None) -> str:
    return f"{t / 1024 / 1024:g}M" if t >= 1024 * 1024 else f"{t / 1024:g}k" if t >= 1024 else f"{t:g}"


def log2_axis(ax, axis: str, tokens: bool) -> None:
    getattr(ax, f"set_{axis}scale")("log", base=2)
    fmt = FuncFormatter(tokens_label) if tokens else FuncFormatter(lambda v, _p: f"{v:g}")
    getattr(ax, f"{axis}axis").set_major_formatter(fmt)


def subtitle(meta: dict) -> str:
    return (f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit'][:10]}"
            f" | {meta['timing'].split(',')[0]}")


def save(fig, out_dir: Path, name: str) -> None:
    fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out_dir / name}")


def series(rows, x_key: str):
    """(x values, rows), sorted by x_key."""
    rows = sorted(rows, key=lambda r: r[x_key])
    return [r[x_key] for r in rows], rows


def line_label(r: dict) -> str:
    if r["kernel"] == "mustafar":
        return f"ours, sparsity {r['sparsity']}"
    if r["kernel"] == "sdpa":
        return f"SDPA {r['backend']}" + (" (heads repeated)" if r.get("gqa") == "expanded" else "")
    return r["kernel"]


def line_style(r: dict) -> dict:
    if r["kernel"] == "mustafar":
        return dict(color=OURS_COLORS.get(r["sparsity"], "tab:brown"), marker="o", lw=2)
    color, marker = DENSE_STYLES.get(r["backend"], ("gray", "x"))
    return dict(color=color, marker=marker, lw=1.2, ls="--")


def by_kernel(rows) -> dict:
    """Rows grouped per line: (kernel, backend, gqa, sparsity)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["backend"], r.get("gqa"), r["sparsity"])].append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0] != "mustafar", str(kv[0]))))


def plot_latency_vs_context(rows, tag, title, meta, out_dir):
    batches = sorted({r["batch"] for r in rows})
    cols = min(2, len(batches))
    n_rows = math.ceil(len(batches) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(6 * cols, 4.2 * n_rows), squeeze=False)
    for ax, batch in zip(axes.flat, batches):
        in_batch = [r for r in rows if r["batch"] == batch]
        for group in by_kernel(in_batch).values():
            xs, rs = series(group, "T")
            ax.plot(xs, [r["median_us"] for r in rs], label=line_label(rs[0]), **line_style(rs[0]))
        xs, rs = series({r["T"]: r for r in in_batch}.values(), "T")
        bound = [r["dense_kv_bytes"] / meta["copy_bandwidth_bytes_per_s"] * 1e6 for r in rs]
        ax.plot(xs, bound, color="black", ls=":", lw=1, label="dense K+V bytes / copy bandwidth")
        log2_axis(ax, "x", tokens=True)
        ax.set_yscale("log")
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context T (tokens)")
        ax.set_ylabel("latency per decode step (us)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(batches):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Decode attention latency vs context: {title}\n{subtitle(meta)}", fontsize=10)
    fig.tight_layout()
    save(fig, out_dir, f"latency_vs_context_{tag}.png")


def ours_rows(rows):
    return [r for r in rows if r["kernel"] == "mustafar" and "speedup" in r]


def add_ideal_lines(ax, rows):
    """Horizontal lines at speedup 1 and at the bytes ratio of each sparsity."""
    ax.axhline(1.0, color="black", lw=1)
    r0 = rows[0]
    for s in sorted({r["sparsity"] for r in rows}):
        ratio = bytes_ratio(r0["d"], r0["dtype"], s)
        ax.axhline(ratio, color=OURS_COLORS.get(s, "tab:brown"), ls=":", lw=1.2,
                   label=f"bytes ratio at sparsity {s} ({ratio:.2f}x)")


def plot_speedup_vs(rows, x_key, line_key, tag, title, meta, out_dir):
    """Speedup of ours over the fastest dense SDPA backend against x_key ('T' or 'batch'), a line
    per (line_key value, sparsity)."""
    ours = ours_rows(rows)
    if not ours:
        return
    values = sorted({r[line_key] for r in ours})
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, value in enumerate(values):
        for s in sorted({r["sparsity"] for r in ours}):
            xs, rs = series([r for r in ours if r[line_key] == value and r["sparsity"] == s], x_key)
            if not rs:
                continue
            name = f"T={tokens_label(value)}" if line_key == "T" else f"B={value}"
            ax.plot(xs, [r["speedup"] for r in rs], color=cmap(i / max(1, len(values) - 1)),
                    ls="--" if s < 0.7 else "-", marker="o",
                    label=f"{name}, sparsity {s}")
    add_ideal_lines(ax, ours)
    log2_axis(ax, "x", tokens=x_key == "T")
    ax.set_xlabel("context T (tokens)" if x_key == "T" else "batch size")
    ax.set_ylabel("speedup over fastest dense SDPA (x)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=1 + len(values) // 6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    against = "context" if x_key == "T" else "batch"
    ax.set_title(f"Speedup vs {against}: {title}\n{subtitle(meta)}", fontsize=9)
    fig.tight_layout()
    save(fig, out_dir, f"speedup_vs_{'context' if x_key == 'T' else 'batch'}_{tag}.png")


def plot_speedup_vs_sparsity(rows, tag, title, meta, out_dir):
    ours = ours_rows(rows)
    if not ours:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    shapes = sorted({(r["batch"], r["T"]) for r in ours})
    norm = LogNorm(min(b * t for b, t in shapes), max(b * t for b, t in shapes) * 1.001)
    cmap = plt.get_cmap("viridis")
    for b, t in shapes:
        xs, rs = series([r for r in ours if (r["batch"], r["T"]) == (b, t)], "sparsity")
        ax.plot(xs, [r["speedup"] for r in rs], marker="o", lw=1, color=cmap(norm(b * t)))
    measured = sorted({r["sparsity"] for r in ours})
    grid = [i / 100 for i in range(round(100 * max(0.0, measured[0] - 0.2)), round(100 * min(0.9, measured[-1] + 0.1)) + 1)]
    r0 = ours[0]
    ax.plot(grid, [bytes_ratio(r0["d"], r0["dtype"], s) for s in grid], color="black", ls=":",
            label="bytes ratio dense / compressed (ideal at equal bandwidth)")
    ax.axhline(1.0, color="black", lw=1)
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="B x T (tokens in the batch), one line per shape")
    ax.set_xlabel("sparsity (fraction of K and V values pruned)")
    ax.set_ylabel("speedup over fastest dense SDPA (x)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Speedup vs sparsity: {title}\n{subtitle(meta)}", fontsize=9)
    fig.tight_layout()
    save(fig, out_dir, f"speedup_vs_sparsity_{tag}.png")


def plot_time_vs_sparsity(rows, tag, title, meta, out_dir):
    ours = [r for r in ours_rows(rows) if "byte_bound_us" in r]
    shapes = sorted(shape for shape in {(r["batch"], r["T"]) for r in ours}
                    if len({r["sparsity"] for r in ours if (r["batch"], r["T"]) == shape}) >= 3)
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.6 * len(shapes), 4.0), squeeze=False)
    for ax, (b, t) in zip(axes[0], shapes):
        xs, rs = series([r for r in ours if (r["batch"], r["T"]) == (b, t)], "sparsity")
        ax.plot(xs, [r["median_us"] for r in rs], marker="o", color="tab:red", label="ours")
        ax.plot(xs, [r["byte_bound_us"] for r in rs], ls=":", color="black", label="byte bound (compressed)")
        dense = [r for r in rows if r["kernel"] == "sdpa" and (r["batch"], r["T"]) == (b, t)]
        if dense:
            best = min(dense, key=lambda r: r["median_us"])
            ax.axhline(best["median_us"], color="tab:blue", label=f"dense SDPA ({best['backend']})")
        for x, r in zip(xs, rs):
            if r.get("gather"):
                ax.annotate(r["gather"], (x, r["median_us"]), fontsize=6, textcoords="offset points", xytext=(0, 4))
        ax.set_ylim(bottom=0)
        ax.set_title(f"B={b} T={tokens_label(t)}", fontsize=9)
        ax.set_xlabel("sparsity (K and V)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("GPU time per call (us)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Decode time vs sparsity: {title}\n{subtitle(meta)}", fontsize=9)
    fig.tight_layout()
    save(fig, out_dir, f"time_vs_sparsity_{tag}.png")


def plot_bandwidth_fraction(rows, tag, title, meta, out_dir):
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for group in by_kernel(rows).values():
        xs, rs = series(group, "dense_kv_bytes")
        ax.plot([x / 1e6 for x in xs], [r["bw_frac"] for r in rs], ls="none", alpha=0.8,
                label=line_label(rs[0]), **{k: v for k, v in line_style(rs[0]).items() if k != "ls"})
    ax.axhline(1.0, color="black", lw=1, label=f"copy bandwidth {meta['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s")
    ax.set_xscale("log")
    ax.set_xlabel("dense K+V size of the shape (MB)")
    ax.set_ylabel("achieved bandwidth / copy bandwidth")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Achieved bandwidth (bytes each kernel must move / time): {title}\n{subtitle(meta)}", fontsize=9)
    fig.tight_layout()
    save(fig, out_dir, f"bandwidth_fraction_{tag}.png")


def plot_kv_memory(out_dir, sparsities=(0.5, 0.7)):
    """Analytic: KV bytes per token = layers * Hkv * 2 (K, V) * bytes per token per head."""
    contexts = [1024 * 2 ** (i / 4) for i in range(41)]  # 1k .. 1M
    fig, axes = plt.subplots(len(MODELS), 2, figsize=(12, 4.2 * len(MODELS)), squeeze=False)
    for (ax_size, ax_batch), model in zip(axes, MODELS.values()):
        per_head = {"dense fp16": 2 * model.d}
        for s in sparsities:
            per_head[f"sparsity {s}"] = model.d / 8 + 2 * default_capacity(model.d, s)
        for i, (name, head_bytes) in enumerate(per_head.items()):
            per_token = model.layers * model.hkv * 2 * head_bytes
            color = ["black", *[OURS_COLORS[s] for s in sparsities]][i]
            ax_size.plot(contexts, [t * per_token / 1e9 for t in contexts], color=color,
                         label=f"{name}: {head_bytes:g} B/token/head")
            fits = [(t, math.floor(MEMORY_BUDGET / (t * per_token))) for t in contexts]
            fits = [(t, b) for t, b in fits if b >= 1]
            ax_batch.plot([t for t, _ in fits], [b for _, b in fits], color=color, drawstyle="steps-post",
                          label=f"{name}: batch x context <= {MEMORY_BUDGET / per_token / 1e6:.2f}M tokens")
        for ax in (ax_size, ax_batch):
            log2_axis(ax, "x", tokens=True)
            ax.set_xlabel("context T (tokens)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        ax_size.set_yscale("log")
        ax_size.set_ylabel("KV cache of one sequence (GB)")
        ax_size.set_title(f"{model.name} ({model.layers} layers, Hkv={model.hkv}, D={model.d}): KV size")
        log2_axis(ax_batch, "y", tokens=False)
        ax_batch.set_ylabel("largest batch")
        ax_batch.set_title(f"{model.name}: largest batch whose KV cache fits in {MEMORY_BUDGET / 1e9:.0f} GB")
    fig.text(0.5, -0.02,
             "Computed from the PackedKV format, not measured: bytes/token/head = D/8 (bitmap) + 2*capacity "
             "(fp16 values), capacity = D - floor(sparsity*D) rounded up to 8; dense = 2*D. K and V both "
             f"pruned; all {MEMORY_BUDGET / 1e9:.0f} GB given to the KV cache (weights, activations and "
             "the dense recent window not counted).", ha="center", fontsize=8, wrap=True)
    fig.tight_layout()
    save(fig, out_dir, "kv_memory.png")


def plot_prune_and_pack(rows, meta, out_dir):
    rows = sorted(rows, key=lambda r: (r["d"], r["dtype"], r["sparsity"], r["batch"] * r["T"]))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.8))
    labels = [f"[{r['batch']}, {r['hkv']}, {r['T']}, {r['d']}] {r['dtype']} s={r['sparsity']}" for r in rows]
    bars = ax.barh(range(len(rows)), [r["gbps"] for r in rows], color="tab:red")
    for bar, r in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {r['median_us']:.0f} us, {r['bw_frac']:.0%}", va="center", fontsize=8)
    copy_gbps = meta["copy_bandwidth_bytes_per_s"] / 1e9
    ax.axvline(copy_gbps, color="black", ls=":", label=f"copy bandwidth {copy_gbps:.0f} GB/s")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("(bytes read + bytes written) / time (GB/s)")
    ax.set_xlim(0, copy_gbps * 1.25)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"prune_and_pack throughput ([B, H, T, D] input, % of copy bandwidth)\n{subtitle(meta)}",
                 fontsize=9)
    fig.tight_layout()
    save(fig, out_dir, "prune_and_pack_throughput.png")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both bytes and perplexity change, by increasing bytes."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def newest_study_rows(grids: tuple[str, ...], meta: dict, tokens: int, keep) -> list[dict]:
    """The rows at `tokens` tokens for which keep(row) holds, from the newest perf/accuracy.py
    results file in RESULTS_DIR of one of `grids` (its --grid) that has such rows and the model,
    path (dtype) and head dim of `meta`; [] if none. (A study's long-context file is not the
    2048-token figure's.)"""
    found = []
    for path in sorted(RESULTS_DIR.glob("accuracy_*.json")):
        data = read_results(path)
        m = data["meta"]
        rows = [r for r in data["rows"] if r["tokens"] == tokens and keep(r)]
        if rows and m.get("grid") in grids and (m.get("script"), m["model"], m["path"], m["head_dim"]) == (
                ACCURACY_SCRIPT, meta["model"], meta["path"], meta["head_dim"]):
            found.append((m["date_utc"], rows))
    return max(found, key=lambda f: f[0])[1] if found else []


def key_scales_rows(meta: dict, tokens: int) -> list[dict]:
    """The pruned rows measured after rescale_key_channels (perf/accuracy.py --grid key-scales)."""
    return newest_study_rows(("key-scales", "key-scales-long-context"), meta, tokens,
                             lambda r: r.get("key_scales") and (r["k_sparsity"] or r["v_sparsity"]))


def fp8_rows(meta: dict, tokens: int) -> list[dict]:
    """The rows with fp8 (e4m3) values of the study (perf/accuracy.py --grid fp8 / fp8-d256: an
    oracle per-layer scale; the presets' own runs are fp8_preset_rows)."""
    return newest_study_rows(("fp8", "fp8-d256", "fp8-long-context", "fp8-long-context-d256"), meta, tokens,
                             lambda r: r.get("value_format", "fp16") != "fp16")


def fp8_preset_rows(meta: dict, tokens: int) -> list[dict]:
    """The fp8 presets as the library serves them (--grid fp8-presets / fp8-presets-d256: value
    scale 1)."""
    return newest_study_rows(("fp8-presets", "fp8-presets-d256"), meta, tokens,
                             lambda r: r.get("value_format") == "e4m3-unit")


def plot_accuracy_vs_bytes(path: Path, out_dir: Path) -> None:
    """A panel per text: perplexity change vs bytes ratio (SparseKVCache.nbytes at the evaluated
    length over dense fp16), colour = sinks, marker = window; the Pareto front of the measured
    configurations as a staircase, its points named, as are the reference configurations (S=0,
    W=32) and the library's presets (mustafar_triton.presets, green). Stars: the same configurations
    after rescale_key_channels, where measured (key_scales_rows), an arrow from the plain point.
    Orange triangles and a dashed front: kept values rounded to fp8 e4m3 (fp8_rows, the study),
    beside them what serving engines offer (a dense fp8 cache); green triangles: the fp8 presets as
    served (fp8_preset_rows). Log y when every change is > 0."""
    from mustafar_triton.presets import FP8_PRESETS, PRESETS

    data = read_results(path)
    meta, rows = data["meta"], [r for r in data["rows"] if r["k_sparsity"] or r["v_sparsity"]]
    rescaled = key_scales_rows(meta, rows[0]["tokens"])
    fp8 = fp8_rows(meta, rows[0]["tokens"])
    fp8_presets = fp8_preset_rows(meta, rows[0]["tokens"])
    d = meta["head_dim"]
    texts = list(dict.fromkeys(r["text"] for r in rows))
    sink_colors = {0: "tab:gray", 4: "tab:blue", 8: "tab:purple", 16: "tab:red"}
    window_markers = {32: "o", 28: "P", 24: "s", 16: "v", 64: "^", 128: "D"}
    refs = {"K0.7V0.7 S0 W32": "K0.7V0.7 (S=0)", "K0.5V0.5 S0 W32": "K0.5V0.5 (S=0)"}
    presets = {f"K{p['k_sparsity']:g}V{p['v_sparsity']:g} S{p['sinks']} W{p['window']}": name
               for name, per_d in PRESETS.items() for dim, p in per_d.items() if dim == d}
    fp8_names = {f"K{p['k_sparsity']:g}V{p['v_sparsity']:g} S{p['sinks']} W{p['window']} e4m3-unit": name
                 for name, per_d in FP8_PRESETS.items() for dim, p in per_d.items() if dim == d}
    fig, axes = plt.subplots(1, len(texts), figsize=(7.2 * len(texts), 5.6), squeeze=False)
    for ax, text in zip(axes[0], texts):
        group = [r for r in rows if r["text"] == text]
        for r in group:
            ax.scatter(r["bytes_ratio"], 100 * r["perplexity_change"], s=34, zorder=3,
                       color=sink_colors.get(r["sinks"], "tab:olive"),
                       marker=window_markers.get(r["window"], "x"), edgecolor="black", linewidth=0.4)
        plain = {r["config"]: r for r in group}
        for r in (r for r in rescaled if r["text"] == text):
            xy = (r["bytes_ratio"], 100 * r["perplexity_change"])
            ax.scatter(*xy, s=90, zorder=4, marker="*", color=sink_colors.get(r["sinks"], "tab:olive"),
                       edgecolor="black", linewidth=0.5)
            before = plain.get(r["config"].removesuffix(" key-scales"))
            if before:
                ax.annotate("", xy, (before["bytes_ratio"], 100 * before["perplexity_change"]), zorder=2,
                            arrowprops=dict(arrowstyle="->", color="tab:green", lw=0.8, alpha=0.7))
            if r["config"].removesuffix(" key-scales") in presets:
                ax.annotate("+ rescale_key_channels", xy, fontsize=7, color="tab:green", xytext=(-6, -13),
                            textcoords="offset points", ha="right", va="top")
        group_fp8 = [r for r in fp8 if r["text"] == text]
        if group_fp8:
            fp8_xy = [(r["bytes_ratio"], 100 * r["perplexity_change"]) for r in group_fp8]
            ax.scatter(*zip(*fp8_xy), s=40, zorder=3, marker="^", color="tab:orange", edgecolor="black", linewidth=0.4)
            fp8_front = pareto_front(fp8_xy)
            ax.step(*zip(*fp8_front), where="post", color="tab:orange", lw=1, ls="--", alpha=0.8)
            for r in group_fp8:
                if (r["bytes_ratio"], 100 * r["perplexity_change"]) in fp8_front or not r["k_sparsity"]:
                    ax.annotate(r["config"], (r["bytes_ratio"], 100 * r["perplexity_change"]), fontsize=7,
                                color="tab:orange", xytext=(5, 3), textcoords="offset points")
        for r in (r for r in fp8_presets if r["text"] == text and r["config"] in fp8_names):
            xy = (r["bytes_ratio"], 100 * r["perplexity_change"])
            ax.scatter(*xy, s=60, zorder=4, marker="^", color="tab:green", edgecolor="black", linewidth=0.5)
            ax.annotate(f"fp8 preset {fp8_names[r['config']]!r} = {r['config'].removesuffix(' e4m3-unit')}", xy,
                        fontsize=7, color="tab:green", xytext=(5, -10), textcoords="offset points")
            group_fp8 = group_fp8 + [r]
        front = pareto_front([(r["bytes_ratio"], 100 * r["perplexity_change"]) for r in group])
        xs, ys = zip(*front)
        all_x = [r["bytes_ratio"] for r in group + group_fp8]
        all_y = [100 * r["perplexity_change"] for r in group + group_fp8]
        ax.step(xs, ys, where="post", color="black", lw=1, alpha=0.7)
        rank = {xy: i for i, xy in enumerate(front)}
        for r in group:
            xy = (r["bytes_ratio"], 100 * r["perplexity_change"])
            if r["config"] in presets:  # left of the point, in green
                ax.annotate(f"preset {presets[r['config']]!r} = {r['config']}", xy, fontsize=7, color="tab:green",
                            xytext=(-6, -3), textcoords="offset points", ha="right", va="top")
            elif r["config"] in refs:
                ax.annotate(refs[r["config"]], xy, fontsize=7, xytext=(-6, 3), textcoords="offset points", ha="right")
            elif xy in rank:  # front points: right of the point, alternately below and above
                ax.annotate(r["config"], xy, fontsize=7, xytext=(5, -9 if rank[xy] % 2 else 3),
                            textcoords="offset points")
        if min(all_y) > 0:
            ax.set_yscale("log")
            ax.set_yticks([t for t in (0.2, 0.5, 1, 2, 5, 10, 20, 40) if min(all_y) / 2 < t < 2 * max(all_y)])
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
        ax.set_xlim(min(all_x) - 0.03, max(all_x) + 0.06)
        ax.set_xlabel(f"bytes vs dense fp16 (SparseKVCache.nbytes, {group[0]['tokens']} tokens)")
        ax.set_ylabel(f"perplexity change vs dense, % (dense: {group[0]['dense_perplexity']:.3f} at 1.0)")
        ax.set_title(f"{text}", fontsize=10)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=f"S={s} sinks") for s, c in sink_colors.items()]
    handles += [plt.Line2D([], [], ls="", marker=m, color="gray", label=f"W={w} window") for w, m in window_markers.items()]
    handles += [plt.Line2D([], [], color="black", lw=1, label="Pareto front")]
    if rescaled:
        handles += [plt.Line2D([], [], ls="", marker="*", markersize=9, color="gray",
                               label="after rescale_key_channels (Llama-style models)")]
    if fp8:
        handles += [plt.Line2D([], [], ls="--", marker="^", color="tab:orange",
                               label="values in fp8 e4m3 (study: per-layer scale)")]
    if fp8_presets:
        handles += [plt.Line2D([], [], ls="", marker="^", color="tab:green", label="fp8 preset as served (scale 1)")]
    fig.legend(handles=handles, fontsize=7, loc="upper center", ncol=len(handles), bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"{meta['model']}, Hkv={meta['num_kv_heads']} D={d}: accuracy per byte, K/V split, sinks, window\n"
                 f"teacher-forced, {meta['path'].split(',')[0]} | torch {meta['torch']} | commit {meta['commit'][:10]}",
                 fontsize=9)
    fig.tight_layout()
    tag = re.sub(r"[^A-Za-z0-9]+", "_", meta["model"].split(" ")[0])
    save(fig, out_dir, f"accuracy_vs_bytes_{tag}.png")


def main() -> None:
    args = parse_args()
    accuracy = [f for f in args.files if script_of(f) == ACCURACY_SCRIPT]
    files = [f for f in args.files if f not in accuracy]
    if not args.files:
        files, accuracy = default_files(), default_accuracy_files()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path in accuracy:
        print("accuracy results:", path)
        plot_accuracy_vs_bytes(path, args.out_dir)
    if not files:
        return
    print("results:", ", ".join(str(f) for f in files))
    meta, rows = load(files)

    decode = defaultdict(list)
    for r in rows:
        if r["op"] == "decode":
            decode[(r["model"], r["dtype"])].append(r)
    for (model, dtype), group in sorted(decode.items()):
        tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{model}_{dtype}")
        r0 = group[0]
        title = f"{model} (Hq={r0['hq']}, Hkv={r0['hkv']}, D={r0['d']}) {dtype}, no dense window (W=0)"
        plot_latency_vs_context(group, tag, title, meta, args.out_dir)
        plot_speedup_vs(group, "T", "batch", tag, title, meta, args.out_dir)
        plot_speedup_vs(group, "batch", "T", tag, title, meta, args.out_dir)
        plot_speedup_vs_sparsity(group, tag, title, meta, args.out_dir)
        plot_time_vs_sparsity(group, tag, title, meta, args.out_dir)
        plot_bandwidth_fraction(group, tag, title, meta, args.out_dir)
    plot_kv_memory(args.out_dir)
    plot_prune_and_pack([r for r in rows if r["op"] == "prune_and_pack"], meta, args.out_dir)


if __name__ == "__main__":
    main()
