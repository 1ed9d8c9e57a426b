"""MustafarCache(static=True), the compileable cache, on a two-layer random Llama (head dim 32).

At sparsity 0 in float32 compression is lossless, so greedy tokens must equal dense generation's
(a left-padded batch of two prompts of different lengths, sinks and a ring window that wraps).
On the CPU generate() does not compile by itself: CompileConfig._compile_all_devices makes it
take the compiled path (fullgraph=True: any graph break fails), and one decode step compiled by
hand must equal the eager step, cache state included."""
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mustafar_triton.integrations.transformers import MustafarCache, cache_keyword, use_mustafar_attention  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
GREEDY = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
SETTINGS = dict(k_sparsity=0.0, v_sparsity=0.0, window=2, sinks=1, max_tokens=16)


@pytest.fixture(scope="module")
def llama(request):
    device = request.getfixturevalue("device")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    return with_dense_reference(transformers.LlamaForCausalLM(config).eval().to(device), PROMPTS, device)


def with_dense_reference(model, prompts, device):
    """(model, left-padded ids, mask, dense greedy generation of them): dense generation runs with
    the model's own attention and cache, before attention "mustafar" is selected."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    dense = model.generate(ids, attention_mask=mask, **GREEDY)
    use_mustafar_attention(model)
    return model, ids, mask, dense


def with_cache(model, cache) -> dict:
    """The cache keyword of this transformers release (`cache=` from 5.24, `past_key_values=` before)."""
    return {cache_keyword(model): cache}


def compile_config(backend):
    config = transformers.CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True   # compile on the CPU too
    return config


def check_dense(out, dense):
    assert torch.equal(out.sequences, dense.sequences), "greedy tokens must match dense in float32"
    for step, (got, want) in enumerate(zip(out.logits, dense.logits)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"logits of step {step}")


def test_static_cache_generates_as_dense(llama):
    model, ids, mask, dense = llama
    cache = MustafarCache(model.config, static=True, **SETTINGS)
    assert cache.is_compileable and not MustafarCache(model.config).is_compileable
    check_dense(model.generate(ids, attention_mask=mask, **with_cache(model, cache), **GREEDY), dense)
    store = cache.layers[0].store
    own_tokens = mask.sum(-1) + GREEDY["max_new_tokens"] - 1
    assert (store.seq_lens + store.window_lens).tolist() == own_tokens.tolist()
    assert store.window_lens.tolist() == [3, 3] and store.seq_lens.min() > 0
    assert int(cache.get_seq_length()) == ids.shape[1] + GREEDY["max_new_tokens"] - 1


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not any(map(shutil.which, ("c++", "g++", "clang++"))), reason="inductor's CPU code needs a C++ compiler"))])
def test_compiled_generate_matches_dense(llama, backend):
    """generate()'s own compiled decode (fullgraph), one compile for two caches (no recompile)."""
    model, ids, mask, dense = llama
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(2):
        cache = MustafarCache(model.config, static=True, **SETTINGS)
        check_dense(model.generate(ids, attention_mask=mask, **with_cache(model, cache), compile_config=compile_config(backend),
                                   **GREEDY), dense)
    assert hasattr(model, "_compiled_call"), "generate() took the compiled path"
    del model._compiled_call   # later tests compile their own
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@torch.no_grad()   # forward only: the custom ops have no autograd formula
@pytest.mark.parametrize("value_dtype", [None, torch.float8_e4m3fn])
def test_compiled_decode_step_equals_eager(llama, value_dtype):
    """One decode step of the model forward with a pruned static cache (sparsity 0.5; fp16 or
    fp8 kept values), compiled with fullgraph=True, equals the eager step: logits and every cache
    buffer."""
    model, ids, mask, _ = llama
    torch._dynamo.reset()
    settings = {**SETTINGS, "k_sparsity": 0.5, "v_sparsity": 0.5, "window": 1, "value_dtype": value_dtype,
                "value_scale": 1.0 if value_dtype is None else 0.01}
    caches = [MustafarCache(model.config, static=True, **settings) for _ in range(2)]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    for cache in caches:   # the prompt: eager, dense attention, then compression
        model(ids, attention_mask=mask, position_ids=position_ids, **with_cache(model, cache))
    step = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    token = torch.tensor([[3], [4]], device=ids.device)
    for i in range(3):
        kw = dict(input_ids=token + i, position_ids=position_ids[:, -1:] + 1 + i)
        got, want = step(**kw, **with_cache(model, caches[0])).logits, model(**kw, **with_cache(model, caches[1])).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches[0].layers, caches[1].layers):
        for name in ("seq_lens", "window_lens", "ring_start", "k_window", "v_window"):
            assert torch.equal(getattr(a.store, name), getattr(b.store, name)), name
        for x, y in ((a.store.packed_k, b.store.packed_k), (a.store.packed_v, b.store.packed_v)):
            assert x.values.dtype == (value_dtype or model.dtype)
            assert torch.equal(x.bitmap, y.bitmap) and torch.equal(x.values.view(torch.uint8), y.values.view(torch.uint8))
        assert int(a.cumulative_length) == int(b.cumulative_length) == ids.shape[1] + 3
    assert int(caches[0].layers[0].store.seq_lens.min()) > 0


@torch.no_grad()
def test_static_cache_arguments_are_checked(llama):
    model, ids, mask, _ = llama
    with pytest.raises(ValueError, match="static=True\\) needs max_tokens a positive multiple of 16"):
        MustafarCache(model.config, static=True, max_tokens=20)
    with pytest.raises(TypeError, match="static must be a bool"):
        MustafarCache(model.config, static=1)
    with pytest.raises(ValueError, match="needs value_dtype"):
        MustafarCache(model.config, value_scale=0.5)
    with pytest.raises(TypeError, match="value_dtype must be None"):
        MustafarCache(model.config, value_dtype=torch.float16)
    cache = MustafarCache(model.config, static=True, **SETTINGS)
    model(ids, attention_mask=mask, **with_cache(model, cache))
    with pytest.raises(ValueError, match="one new token per sequence and step after the prompt, got 2"):
        model(ids[:, -2:], **with_cache(model, cache))


@torch.no_grad()
def test_check_capacity_reports_dropped_tokens(llama):
    """A static cache too small for the generation drops tokens (no device-side raise);
    check_capacity() names the sequences afterwards, and passes when everything fit."""
    model, ids, mask, _ = llama
    fits = MustafarCache(model.config, static=True, **SETTINGS)
    model.generate(ids, attention_mask=mask, **with_cache(model, fits), **GREEDY)
    fits.check_capacity()
    small = MustafarCache(model.config, static=True, **{**SETTINGS, "window": 0, "sinks": 0})
    model.generate(ids, attention_mask=mask, **with_cache(model, small), **{**GREEDY, "max_new_tokens": 12})
    with pytest.raises(ValueError, match=r"sequences \[0\] lost"):
        small.check_capacity()
