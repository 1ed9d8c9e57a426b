"""mustafar_triton.preset: the equal-bytes presets cost no more than their reference, build caches,
and are what perf/accuracy.py's selection picks from the committed measurements."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import mustafar_triton as mt

REPO = Path(__file__).resolve().parent.parent
# the committed equal-bytes measurements, one file per model (head dim)
RESULTS = [REPO / "perf" / "results" / name for name in ("accuracy_equal_bytes_smollm2.json",
                                                         "accuracy_equal_bytes_d256_gemma3.json")]
# the same at SmolLM2's full context, 8192 tokens (--grid long-context / long-context-d256)
LONG_CONTEXT_RESULTS = [REPO / "perf" / "results" / name for name in ("accuracy_long_context_smollm2.json",
                                                                      "accuracy_long_context_d256_gemma3.json")]


def load_accuracy_script():
    spec = importlib.util.spec_from_file_location("perf_accuracy", REPO / "perf" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def store_bytes_per_token(head_dim, k_sparsity, v_sparsity, device):
    cache = mt.SparseKVCache(1, 1, head_dim, 1, 0, k_sparsity, v_sparsity, device=device)
    return cache.packed_k.values[0, 0, 0].nbytes + cache.packed_v.values[0, 0, 0].nbytes + 2 * head_dim // 8


@pytest.mark.parametrize("name", sorted(mt.PRESETS))
def test_presets_cost_their_reference_bytes_and_build_caches(name, device):
    k_ref, v_ref = (float(x) for x in name[1:].split("V"))
    for head_dim in mt.PRESETS[name]:
        p = mt.preset(name, head_dim=head_dim)
        assert set(p) == {"k_sparsity", "v_sparsity", "sinks", "window"}
        p["sinks"] = -1
        assert mt.preset(name, head_dim)["sinks"] >= 0, "preset() returns a copy"
        p = mt.preset(name, head_dim)
        assert (store_bytes_per_token(head_dim, p["k_sparsity"], p["v_sparsity"], device)
                <= store_bytes_per_token(head_dim, k_ref, v_ref, device))
        cache = mt.SparseKVCache(2, 1, head_dim, 8, dtype=torch.float16, device=device, **p)
        assert (cache.sinks, cache.window) == (p["sinks"], p["window"])


@pytest.mark.parametrize("name", sorted(mt.presets.FP8_PRESETS))
def test_fp8_presets_cost_their_reference_bytes_and_build_caches(name, device):
    """fp8 kept values: the same store bytes per token as the fp16 reference, twice the slots."""
    k_ref, v_ref = (float(x) for x in name[1:].split("V"))
    for head_dim in mt.presets.FP8_PRESETS[name]:
        p = mt.preset(name, head_dim, fp8=True)
        assert set(p) == {"k_sparsity", "v_sparsity", "sinks", "window", "value_dtype"}
        assert p["value_dtype"] == torch.float8_e4m3fn
        cache = mt.SparseKVCache(2, 1, head_dim, 8, dtype=torch.bfloat16, device=device, **p)
        reference = mt.SparseKVCache(2, 1, head_dim, 8, dtype=torch.bfloat16, device=device,
                                     k_sparsity=k_ref, v_sparsity=v_ref, window=p["window"])
        assert cache.packed_k.nbytes + cache.packed_v.nbytes == reference.packed_k.nbytes + reference.packed_v.nbytes
        assert mt.preset(name, head_dim, context_tokens=8192, fp8=True)["window"] == 64


def test_preset_arguments_are_checked():
    with pytest.raises(ValueError, match="'K0.5V0.5' is not a preset with fp8 values"):
        mt.preset("K0.5V0.5", head_dim=64, fp8=True)
    with pytest.raises(TypeError, match="fp8 must be a bool"):
        mt.preset("K0.7V0.7", head_dim=64, fp8="yes")
    with pytest.raises(ValueError, match="name 'K0.9V0.9' is not a preset"):
        mt.preset("K0.9V0.9", head_dim=64)
    with pytest.raises(ValueError, match="head_dim 128: .*measured for head dims \\[64, 256\\]"):
        mt.preset("K0.7V0.7", head_dim=128)
    with pytest.raises(TypeError, match="name must be a str"):
        mt.preset(0.375, head_dim=64)
    with pytest.raises(TypeError, match="head_dim must be an int, got float"):
        mt.preset("K0.7V0.7", head_dim=64.0)
    with pytest.raises(TypeError, match="head_dim must be an int, got NoneType"):
        mt.preset("K0.7V0.7", head_dim=None)
    with pytest.raises(TypeError, match="context_tokens must be an int, got float"):
        mt.preset("K0.7V0.7", head_dim=64, context_tokens=8192.0)
    with pytest.raises(ValueError, match="context_tokens must be >= 0, got -1"):
        mt.preset("K0.7V0.7", head_dim=64, context_tokens=-1)


@pytest.mark.parametrize("results,context_tokens", [(RESULTS, None), (RESULTS, 2048), (RESULTS, 8191),
                                                    (LONG_CONTEXT_RESULTS, 8192), (LONG_CONTEXT_RESULTS, 131072)])
def test_presets_are_the_measured_choice(results, context_tokens):
    """The library's table is choose_presets of the committed equal-bytes measurements (2048
    tokens); with context_tokens >= 8192, of the 8192-token measurements."""
    choose_presets = load_accuracy_script().choose_presets
    chosen: dict = {}
    for path in results:
        for name, per_d in choose_presets(json.loads(path.read_text())["rows"]).items():
            chosen.setdefault(name, {}).update(per_d)
    assert chosen.keys() == mt.PRESETS.keys()
    for name, per_d in chosen.items():
        assert per_d.keys() == mt.PRESETS[name].keys()
        for d, c in per_d.items():
            assert mt.preset(name, d, context_tokens=context_tokens) == {
                k: c[k] for k in ("k_sparsity", "v_sparsity", "sinks", "window")}
