"""Host (CPU) work of one layer's decode step in transformers' eager loop, without the GPU: the
cache update (`Cache.update`) and the attention call (`ALL_ATTENTION_FUNCTIONS[...]`), as
LlamaAttention.forward makes them, with every Triton launch stubbed out (perf/host_cost.py's
stubs: decode, merge, prefill's prune_and_pack, append's and the flush's kernels), so CPU tensors
stand in for the GPU's.

    python perf/layer_host.py [--layers 30] [--steps 128] [--rounds 7] [--prompt 8000]
                              [--sparsity 0.7] [--window 32] [--out perf/results/layer_host_cpu.json]

Dense: transformers' DynamicCache + its SDPA attention; Mustafar: MustafarCache +
mustafar_attention. Reported per layer and step: CPU thread time (time.thread_time_ns, so other
processes on the machine do not count; one torch thread), median over a round's steps, then the
median over rounds that alternate dense / Mustafar (also the mean step, which counts the window
flushes and the launches resolved per new bound, once every few steps); and the torch ops
dispatched (a counting TorchDispatchMode, in a separate untimed pass).

The Mustafar cache is prefilled once with --prompt tokens and keeps growing over the rounds, as
a long generation does (every window flush raises the store's host bound, so the launches the
decode plan resolves per bound are in the timing). The dense cache is prefilled with
--dense-prompt tokens afresh every round: on a GPU its host work does not depend on the length,
but here torch.cat and SDPA really run on the CPU, so its context is kept short. float32 by
default: the CPU's fp16 SDPA computes slowly enough to hide the host work (Mustafar's stubbed
path is the same in every dtype).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# this checkout's package, not whichever one is installed (a worktree measures its own code)
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from host_cost import stub_launches  # importing it sets TRITON_INTERPRET: CPU tensors pass the device checks

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from common import environment  # noqa: E402



class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched under it."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class Side:
    """One cache kind: its transformers Cache, attention function and per-layer modules."""

    def __init__(self, name, args, config, dtype):
        from transformers import DynamicCache
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from mustafar_triton.integrations.transformers import MustafarCache, mustafar_attention

        self.name, self.args, self.config, self.dtype = name, args, config, dtype
        hq, hkv, d = args.hq, args.hkv, args.head_dim
        self.modules = [SimpleNamespace(num_key_value_groups=hq // hkv, is_causal=True, layer_idx=i,
                                        head_dim=d, training=False) for i in range(args.layers)]
        self.scaling = d ** -0.5
        if name == "dense":
            self.make = lambda: DynamicCache(config=config)
            self.attention = sdpa_attention_forward
            self.prompt = args.dense_prompt
        else:
            total = args.prompt + args.steps * (args.rounds + 2) + 64
            self.make = lambda: MustafarCache(config, k_sparsity=args.sparsity, v_sparsity=args.sparsity,
                                              window=args.window, max_tokens=total)
            self.attention = mustafar_attention
            self.prompt = args.prompt
        self.cache = None
        b = args.batch
        # the layouts LlamaAttention hands over: projections viewed [B, 1, H, D], transposed, RoPE'd
        self.q = torch.randn(b, 1, hq, d, dtype=dtype).transpose(1, 2) * 1.0
        self.k = torch.randn(b, 1, hkv, d, dtype=dtype).transpose(1, 2) * 1.0
        self.v = torch.randn(b, 1, hkv, d, dtype=dtype).transpose(1, 2)
        # generate()'s 2D mask through the model's mask function (made once per step, not timed)
        self.mask = None

    def prefill(self):
        """A fresh cache holding `prompt` tokens per layer (the prompt's attention is not run: the
        Mustafar layers compress it as mustafar_attention would)."""
        args, b = self.args, self.args.batch
        self.cache = self.make()
        kp = torch.randn(b, args.hkv, self.prompt, args.head_dim, dtype=self.dtype)
        for i, layer in enumerate(self.modules):
            self.cache.update(kp, kp, i)
            if self.name != "dense":
                self.cache.layers[i].prefill(kp, kp, None)
        self.length = self.prompt
        if self.name != "dense":
            self.mask_2d = torch.ones(b, self.prompt + 10 ** 5, dtype=torch.bool)

    def step_mask(self):
        if self.name == "dense":
            return None   # B=1 without padding: transformers' sdpa_mask skips the mask (is_causal path)
        from mustafar_triton.integrations.transformers import mustafar_mask
        self.length += 1
        return mustafar_mask(self.args.batch, 1, self.length, attention_mask=self.mask_2d[:, :self.length])

    def step(self, mask) -> None:
        cache, attn, q, k, v, scaling = self.cache, self.attention, self.q, self.k, self.v, self.scaling
        for i, module in enumerate(self.modules):
            key, value = cache.update(k, v, i, kwargs={})
            attn(module, q, key, value, mask, dropout=0.0, scaling=scaling)

    def round(self, steps: int) -> list[float]:
        """us per layer of each of `steps` decode steps (CPU thread time)."""
        if self.name == "dense":
            self.prefill()
        gc.collect()
        per_layer = []
        layers = len(self.modules)
        for _ in range(steps):
            mask = self.step_mask()
            start = time.thread_time_ns()
            self.step(mask)
            per_layer.append((time.thread_time_ns() - start) / 1e3 / layers)
        return per_layer

    def count_ops(self, steps: int) -> float:
        """Torch ops dispatched per layer and step, averaged over `steps` steps."""
        if self.name == "dense":
            self.prefill()
        with CountOps() as counter:
            for _ in range(steps):
                mask = self.step_mask()   # outside the per-layer work, but cheap: subtracted below
                self.step(mask)
        with CountOps() as masks:
            for _ in range(steps):
                self.step_mask()
        if self.name != "dense":
            self.length -= steps
        return (counter.ops - masks.ops) / steps / len(self.modules)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=128, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per cache kind (alternating)")
    ap.add_argument("--prompt", type=int, default=8000, help="Mustafar prompt tokens")
    ap.add_argument("--dense-prompt", type=int, default=16, help="dense prompt tokens (see the docstring)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", default="9,3,64", help="query heads, kv heads, head dim (SmolLM2-135M)")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    args.hq, args.hkv, args.head_dim = map(int, args.heads.split(","))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stub_launches(cache=True)
    from transformers import LlamaConfig
    config = LlamaConfig(vocab_size=128, hidden_size=args.hq * args.head_dim, num_hidden_layers=args.layers,
                         num_attention_heads=args.hq, num_key_value_heads=args.hkv, head_dim=args.head_dim,
                         max_position_embeddings=args.prompt + args.steps * (args.rounds + 4) + 64)
    dtype = getattr(torch, args.dtype)
    sides = [Side("dense", args, config, dtype), Side("mustafar", args, config, dtype)]
    sides[1].prefill()
    with torch.no_grad():
        for side in sides:       # warm-up: plans, configs, the first launches
            side.round(args.steps)
        medians = {side.name: [] for side in sides}
        means = {side.name: [] for side in sides}
        for _ in range(args.rounds):
            for side in sides:
                times = side.round(args.steps)
                medians[side.name].append(statistics.median(times))
                means[side.name].append(statistics.fmean(times))
        ops = {side.name: side.count_ops(args.steps) for side in sides}
    results = {}
    for side in sides:
        med, mean = medians[side.name], means[side.name]
        results[side.name] = dict(us_per_layer_step=statistics.median(med), mean_us_per_layer_step=statistics.median(mean),
                                  round_medians_us=[round(x, 2) for x in med], round_means_us=[round(x, 2) for x in mean],
                                  torch_ops_per_layer_step=ops[side.name])
        print(f"{side.name:9s} {statistics.median(med):6.1f} us per layer and step (median step; mean step "
              f"{statistics.median(mean):.1f}; medians over {args.rounds} rounds of {args.steps} steps, round "
              f"medians {min(med):.1f}-{max(med):.1f}), {ops[side.name]:.2f} torch ops")
    store = sides[1].cache.layers[0].store
    if args.out:
        meta = environment(torch.device("cpu"))
        import transformers
        import mustafar_triton
        meta["transformers"] = transformers.__version__
        meta["package"] = str(Path(mustafar_triton.__file__).parent)
        shapes = dict(batch=args.batch, layers=args.layers, query_heads=args.hq, kv_heads=args.hkv,
                      head_dim=args.head_dim, dtype=args.dtype, mustafar_prompt=args.prompt,
                      dense_prompt=args.dense_prompt, steps_per_round=args.steps, rounds=args.rounds,
                      sparsity=args.sparsity, window=args.window, mustafar_tokens_at_end=int(store._max_store))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, shapes=shapes, results=results), indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
