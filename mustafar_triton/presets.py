"""Equal-bytes presets: the cache settings that measured most accurate at a given byte budget.

    cache = SparseKVCache(B, Hkv, 64, max_tokens, dtype=..., device=..., **preset("K0.7V0.7", head_dim=64))
    cache = MustafarCache(model.config, max_tokens=4096, **preset("K0.7V0.7", head_dim=64))

A preset is named after the plain configuration whose bytes it spends (K and V sparsity, no
sinks, a dense window of 32): "K0.7V0.7" costs what K0.7V0.7 costs (0.4375 of dense fp16 per
compressed token at D=64, 0.375 at D=128), "K0.5V0.5" what K0.5V0.5 costs (0.5625 at both).
It returns k_sparsity, v_sparsity, sinks and window; every other argument, and any of these, can
still be set by hand.

How they were chosen: `perf/accuracy.py --grid equal-bytes` (results in
perf/results/accuracy_equal_bytes_smollm2.json, figure plots/accuracy_vs_bytes_SmolLM2_135M_Instruct.png)
measured teacher-forced perplexity of SmolLM2-135M-Instruct (D=64, 3 kv heads) on 2048 tokens
each of prose (the Python language reference) and code (CPython's argparse.py), on the torch
reference path, for K/V splits of the same value slots, sinks 0 / 4 / 16 and windows 16-128.
Bytes are `SparseKVCache.nbytes` (fp16) of a cache holding those 2048 tokens. The preset is the
configuration with the lowest mean perplexity change over the two texts among those costing at
most 1% more bytes than the reference at 2048 tokens (16 sinks cost 0.98% there, less at longer
contexts). Capacity rounding is why splits help: values are stored in rows of a multiple of 8
slots, so at D=64 K0.7 keeps 20 values in 24 slots, as many bytes as keeping 24 (K0.625); keys
are worth more than values, so K0.5V0.75 (32 + 16 slots) beats K0.625V0.625 (24 + 24).

A larger recent window was the strongest lever measured, but it costs dense tokens and so more
than the 1%: with K0.5V0.75 and 16 sinks, window 64 (+2.9% bytes at 2048 tokens) gave +4.2% /
+5.4% perplexity on prose / code, window 128 (+6.9%) +3.0% / +3.4%. At SmolLM2's full context,
8192 tokens (`--grid long-context`, perf/results/accuracy_long_context_smollm2.json), window 64
costs +0.6% bytes, within the 1%, and the same selection picks it: the "K0.7V0.7" settings
measured +9.3% / +14.2% with window 32 and +7.1% / +9.7% with 64 (+5.5% / +6.4% with 128, +1.6%
bytes), against K0.7V0.7's +22.0% / +34.0%; "K0.5V0.5" +2.0% / +4.1% -> +1.6% / +2.8% (K0.5V0.5
+3.0% / +5.3%). Gemma 3 at 8192 tokens (`--grid long-context-d256`; window 64 +0.7% bytes):
"K0.7V0.7" +5.27% / +3.85% with window 32, +4.81% / +3.22% with 64 (K0.7V0.7 +6.56% / +5.45%);
"K0.5V0.5" +0.88% / +0.45% -> +0.80% / +0.28% (K0.5V0.5 +0.75% / +0.51%). So
`preset(name, head_dim, context_tokens=n)` with n >= 8192 returns window 64 (the same selection
on the 8192-token measurements; between 2048 and 8192 tokens nothing was measured, and window 32
is kept).

Llama-style models (no q_norm) gain more at the same bytes from
`integrations.transformers.rescale_key_channels(model)`, which makes top-k weigh each key channel
by its queries' weights (`perf/accuracy.py --grid key-scales`): "K0.7V0.7" at D=64 +7.08% /
+10.31% -> +6.52% / +8.39%, "K0.5V0.5" +1.22% / +3.09% -> +1.18% / +2.50%. The presets were
chosen without it.

fp8 kept values (`preset(name, head_dim, fp8=True)`, which adds value_dtype=torch.float8_e4m3fn):
one byte per kept value buys twice the kept values at the same bytes. `perf/accuracy.py --grid
fp8` / `--model gemma3 --grid fp8-d256` (perf/results/accuracy_fp8_smollm2.json,
accuracy_fp8_d256_gemma3.json) measured, at the bytes of K0.7V0.7, K0.25V0.25 with 4 sinks at
D=64 (+0.31% / +0.44%, against the fp16 preset's +7.08% / +10.31%) and K0.25V0.5 with 4 sinks at
D=256 (+0.36% / +0.34%, against +3.53% / +3.12%) as the best configurations with fp8 values, and
the same held at 8192 tokens with window 64 (perf/results/accuracy_fp8_long_context_*.json:
+0.42% / +0.70% and +0.51% / -0.04%). Those rows scaled each layer's and kv head's values by
amax / 448 over the text (an oracle calibration); the library has one value_scale per cache and
the presets leave it at 1. Scale 1 against amax / 448 measured within 0.4 points on the rows
without sinks that have both (K0.25V0.25: +0.49% / +0.63% against +0.57% / +0.31%; Gemma 3
K0.375V0.375: +1.16% / -0.02% against +1.10% / +0.03%), and the presets as served (scale 1,
`--grid fp8-presets` / `fp8-presets-d256`, perf/results/accuracy_fp8_presets_*.json, 2026-12-06):
D=64 +0.14% / +0.46%, D=256 +0.47% / +0.07% (K0.7V0.7: +20.34% / +24.84% and +5.02% / +4.99%),
at 0.4474 / 0.3860 of the dense bytes against K0.7V0.7's 0.4463 / 0.3848 (the 4 sinks). Only
"K0.7V0.7" was measured with fp8 values. The Gluon walk decodes them for fp16 queries at about
fp16 K0.7V0.7's speed, and for bf16 queries (Gemma 3) 5-7% slower (H100, perf/NOTES.md, 9a59b48).

Head dim 256: `perf/accuracy.py --model gemma3 --grid equal-bytes-d256` (Gemma 3 270M, one kv
head; 5 of 6 layers attend a 512-token sliding window and stay dense, as MustafarCache serves
them, so the pruning reaches the other 3 of 18; the same texts and selection; results in
perf/results/accuracy_equal_bytes_d256_gemma3.json): capacities round to 8 of 256 channels, so
the splits with K0.7V0.7's 160 value slots are K0.6875V0.6875, K0.625V0.75, K0.59375V0.78125,
K0.5625V0.8125 and K0.5V0.875; K0.59375V0.78125 with 4 sinks measured best (K0.625V0.75 within
0.06 points: a milder split than D=64's, where K0.5V0.75 keeps 32 + 16 of 64, here 104 + 56 of
256). 8 sinks, or 16 sinks with a window of 16, measured no better on this model. Other head
dims (128 included) raise ValueError: their capacity rounding differs, so the equal-bytes splits
differ; set the four values by hand there.
"""
from __future__ import annotations

import torch

from .cache import _check_count

# {reference configuration: {head dim: settings}}; in the comments the perplexity change vs dense
# (prose / code, 2048 tokens; D=64 SmolLM2-135M-Instruct, D=256 Gemma 3 270M) of the preset and of
# its reference, and the preset's bytes at 2048 tokens relative to the reference's.
PRESETS: dict[str, dict[int, dict]] = {
    # +7.08% / +10.31% vs +20.34% / +24.84%; +0.25% bytes
    "K0.7V0.7": {64: dict(k_sparsity=0.5, v_sparsity=0.75, sinks=4, window=32),
                 # Gemma 3 270M: +3.53% / +3.12% vs +5.02% / +4.99%; +0.31% bytes
                 256: dict(k_sparsity=0.59375, v_sparsity=0.78125, sinks=4, window=32)},
    # +1.22% / +3.09% vs +2.62% / +4.06%; +0.16% bytes
    "K0.5V0.5": {64: dict(k_sparsity=0.375, v_sparsity=0.625, sinks=4, window=32),
                 # Gemma 3 270M: +1.03% / -0.01% vs +0.96% / +0.20%; +0.16% bytes
                 256: dict(k_sparsity=0.4375, v_sparsity=0.5625, sinks=4, window=32)},
}


# The same, with fp8 kept values (value_dtype is added): {reference configuration: {head dim: settings}}
FP8_PRESETS: dict[str, dict[int, dict]] = {
    # SmolLM2: +0.31% / +0.44% vs +20.34% / +24.84%; Gemma 3: +0.36% / +0.34% vs +5.02% / +4.99%
    "K0.7V0.7": {64: dict(k_sparsity=0.25, v_sparsity=0.25, sinks=4, window=32),
                 256: dict(k_sparsity=0.25, v_sparsity=0.5, sinks=4, window=32)},
}


# From this many context tokens on, the presets' window is LONG_CONTEXT_WINDOW (measured at 8192
# tokens: perf/results/accuracy_long_context_*.json).
LONG_CONTEXT_TOKENS = 8192
LONG_CONTEXT_WINDOW = 64


def preset(name: str, head_dim: int, context_tokens: int | None = None, fp8: bool = False) -> dict:
    """The measured most accurate settings at the bytes of the configuration `name` ("K0.7V0.7" or
    "K0.5V0.5") for `head_dim`: a new dict of k_sparsity, v_sparsity, sinks and window (and
    value_dtype with fp8=True: kept values in fp8, "K0.7V0.7" only), to pass as keyword arguments
    to SparseKVCache or MustafarCache. `context_tokens`, the tokens a sequence will hold (prompt +
    generated), if given and >= LONG_CONTEXT_TOKENS, selects the window measured best there (64).
    See the module docstring for how they were chosen. Raises TypeError / ValueError naming the
    argument for another name or an unmeasured head dim."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise TypeError(f"head_dim must be an int, got {type(head_dim).__name__}")
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8 must be a bool, got {type(fp8).__name__}")
    if context_tokens is not None:
        _check_count("context_tokens", context_tokens, 0)
    table = FP8_PRESETS if fp8 else PRESETS
    if name not in table:
        raise ValueError(f"name {name!r} is not a preset{' with fp8 values' if fp8 else ''}; presets: {sorted(table)}")
    if head_dim not in table[name]:
        raise ValueError(f"head_dim {head_dim}: preset {name!r}{' with fp8 values' if fp8 else ''} was measured for "
                         f"head dims {sorted(table[name])} only; set k_sparsity, v_sparsity, sinks and window by hand")
    settings = dict(table[name][head_dim])
    if fp8:
        settings["value_dtype"] = torch.float8_e4m3fn
    if context_tokens is not None and context_tokens >= LONG_CONTEXT_TOKENS:
        settings["window"] = LONG_CONTEXT_WINDOW
    return settings
