"""MustafarCache on a model with sliding-window layers: a two-layer random Gemma 3 (one sliding
layer of 5 tokens, one full layer; head dim 32). The sliding layer keeps its window dense in
transformers' own layer and attends through SDPA with the model's mask; the full layer is
compressed. At sparsity 0 in float32 greedy tokens and logits must equal dense generation's,
with prompts longer than the sliding window (a left-padded batch), eager, static and compiled."""
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mustafar_triton.integrations.transformers import (  # noqa: E402
    MustafarCache, MustafarLayer, attention_layers, cache_keyword)
from test_compiled_generate import GREEDY, check_dense, compile_config, with_dense_reference  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19, 20, 21]]
SETTINGS = dict(k_sparsity=0.0, v_sparsity=0.0, window=2, sinks=1, max_tokens=32)


@pytest.fixture(scope="module")
def gemma(request):
    device = request.getfixturevalue("device")
    config = transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128)
    torch.manual_seed(0)
    return with_dense_reference(transformers.Gemma3ForCausalLM(config).eval().to(device), PROMPTS, device)


@pytest.mark.parametrize("mode", ["eager", "static", "static-compiled"])
def test_sliding_layers_generate_as_dense(gemma, mode):
    model, ids, mask, dense = gemma
    cache = MustafarCache(model.config, static=mode != "eager", **SETTINGS)
    assert [isinstance(layer, MustafarLayer) for layer in cache.layers] == [False, True]
    kwargs = {}
    if mode == "static-compiled":
        torch._dynamo.reset()
        kwargs["compile_config"] = compile_config("aot_eager")
    check_dense(model.generate(ids, attention_mask=mask, **{cache_keyword(model): cache}, **kwargs, **GREEDY), dense)
    if mode == "static-compiled":
        assert hasattr(model, "_compiled_call"), "generate() took the compiled path"
        del model._compiled_call
    cache.check_capacity()
    store = cache.layers[1].store
    assert (store.seq_lens + store.window_lens).tolist() == (mask.sum(-1) + GREEDY["max_new_tokens"] - 1).tolist()


def test_layer_types_the_cache_cannot_serve():
    def config(**kw):
        return SimpleNamespace(num_hidden_layers=2, **kw)
    assert attention_layers(config(layer_types=["sliding_attention", "full_attention"], sliding_window=7)) == [
        ("sliding_attention", 7), ("full_attention", None)]
    assert attention_layers(config()) == [("full_attention", None)] * 2
    with pytest.raises(ValueError, match="chunked_attention"):
        attention_layers(config(layer_types=["chunked_attention", "full_attention"]))
    with pytest.raises(ValueError, match="sliding window of 4096 tokens"):  # Mistral-style: no layer_types
        attention_layers(config(sliding_window=4096))
