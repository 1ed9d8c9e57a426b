"""Query-weighted key selection folded into q_proj / k_proj (mustafar_triton.key_scales and
integrations.transformers.rescale_key_channels): the scales against a float64 loop, scores and
logits unchanged, keys scaled, idempotence, and the models / inputs it refuses."""
import pytest
import torch

from mustafar_triton.key_scales import key_channel_scales, rescale_query_key_


def scales_loop(q_weight, hkv, d, pairs):
    """float64 reference of key_channel_scales, one channel at a time."""
    w = q_weight.double().reshape(hkv, -1, d, q_weight.shape[-1])    # [Hkv, G, D, in]
    out = torch.empty(hkv, d, dtype=torch.float64)
    for h in range(hkv):
        for c in range(d):
            partner = {"half": (c + d // 2) % d, "interleaved": c ^ 1, "none": c}[pairs]
            channels = {c, partner}
            out[h, c] = sum(w[h, :, x].pow(2).sum() for x in channels).sqrt()
        out[h] /= out[h].log().mean().exp()
    return out


def rope(x, pairs, positions):
    """RoPE over the last dim of x [T, H, D] at `positions`: rotate_half ("half") or GPT-J's
    interleaved pairs."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d))
    ang = positions[:, None, None].double() * inv                    # [T, 1, D/2]
    cos, sin = ang.cos(), ang.sin()
    if pairs == "half":
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)


@pytest.mark.parametrize("pairs", ["half", "interleaved", "none"])
@pytest.mark.parametrize("hkv,group,d", [(1, 1, 8), (3, 2, 16), (2, 4, 6)])
def test_scales_match_loop(pairs, hkv, group, d):
    torch.manual_seed(hkv * 100 + d)
    q_weight = torch.randn(hkv * group * d, 24) * torch.rand(hkv * group * d, 1) * 3
    scales = key_channel_scales(q_weight, hkv, d, pairs)
    assert scales.dtype == torch.float32 and scales.shape == (hkv, d)
    torch.testing.assert_close(scales.double(), scales_loop(q_weight, hkv, d, pairs), rtol=1e-5, atol=0)
    assert not torch.allclose(scales, torch.ones_like(scales))     # random rows: the scales do something


@pytest.mark.parametrize("pairs", ["half", "interleaved"])
@pytest.mark.parametrize("bias", [False, True])
def test_scores_unchanged_keys_scaled_idempotent(pairs, bias, device):
    torch.manual_seed(7)
    hkv, group, d, hidden, t = 2, 3, 16, 40, 11
    q_proj = torch.nn.Linear(hidden, hkv * group * d, bias=bias, device=device, dtype=torch.float64)
    k_proj = torch.nn.Linear(hidden, hkv * d, bias=bias, device=device, dtype=torch.float64)
    with torch.no_grad():
        q_proj.weight.mul_(torch.rand(hkv * group * d, 1, device=device, dtype=torch.float64) * 4)
    x = torch.randn(t, hidden, device=device, dtype=torch.float64)
    positions = torch.arange(5, 5 + t, device=device)

    def scores_and_keys():
        q = rope(q_proj(x).reshape(t, hkv * group, d), pairs, positions)
        k = rope(k_proj(x).reshape(t, hkv, d), pairs, positions)
        k_per_query = k.repeat_interleave(group, 1)                   # GQA: query head h*G+g reads kv head h
        return torch.einsum("ihd,jhd->hij", q, k_per_query), k

    scores, keys = scores_and_keys()
    scales = rescale_query_key_(q_proj, k_proj, hkv, d, pairs)
    new_scores, new_keys = scores_and_keys()
    torch.testing.assert_close(new_scores, scores, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_keys, keys * scales.to(device, torch.float64), rtol=1e-6, atol=1e-9)
    again = rescale_query_key_(q_proj, k_proj, hkv, d, pairs)
    torch.testing.assert_close(again, torch.ones_like(again), rtol=0, atol=1e-5)


def test_bad_inputs_are_refused():
    q, k = torch.nn.Linear(8, 32), torch.nn.Linear(8, 16)
    with pytest.raises(ValueError, match="rotary_pairs"):
        key_channel_scales(q.weight, 2, 8, "neox")
    with pytest.raises(ValueError, match="not \\[Hq \\* head_dim"):
        key_channel_scales(q.weight, 3, 8)
    with pytest.raises(ValueError, match="even head_dim"):
        key_channel_scales(torch.randn(10, 8), 2, 5)
    with pytest.raises(ValueError, match="k_proj has 16 outputs"):
        rescale_query_key_(q, k, 1, 8)
    with pytest.raises(TypeError, match="k_proj must be a torch.nn.Linear"):
        rescale_query_key_(q, torch.nn.Identity(), 2, 8)
    with torch.no_grad():
        q.weight[[3, 7, 11, 15]] = 0   # channel 3 and its RoPE partner 7 in both query heads of kv head 0
    with pytest.raises(ValueError, match="all zero or not finite"):
        key_channel_scales(q.weight, 2, 8)
    for bad in (float("inf"), float("nan")):
        weight = torch.randn(32, 8)
        weight[5, 2] = bad
        with pytest.raises(ValueError, match="all zero or not finite"):
            key_channel_scales(weight, 2, 8)


# model types the transformers integration supports (KEY_SCALES_MODEL_TYPES, checked below)
SUPPORTED = ("llama", "mistral", "mixtral", "qwen2")
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf():
    """transformers and the integration module (the tests below skip without transformers)."""
    transformers = pytest.importorskip("transformers")
    from mustafar_triton.integrations import transformers as integration
    assert integration.KEY_SCALES_MODEL_TYPES == SUPPORTED
    return transformers, integration


def tiny_model(hf, model_type, device):
    torch.manual_seed(3)
    config = hf[0].AutoConfig.for_model(model_type, **TINY)
    return hf[0].AutoModelForCausalLM.from_config(config).eval().to(device)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_transformers_model_logits_unchanged_keys_scaled(hf, model_type, device):
    transformers, integration = hf
    model = tiny_model(hf, model_type, device)
    with torch.no_grad():   # a trained model's query rows differ in size; a fresh init's barely do
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(torch.rand(layer.self_attn.q_proj.out_features, 1, device=device) * 4)
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), device=device)

    def run():
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(ids, **{integration.cache_keyword(model): cache}, use_cache=True).logits
        return logits, [layer.keys for layer in cache.layers]

    logits, keys = run()
    scales = integration.rescale_key_channels(model)
    assert len(scales) == TINY["num_hidden_layers"]
    new_logits, new_keys = run()
    torch.testing.assert_close(new_logits, logits, rtol=1e-4, atol=1e-4)
    for s, k, new_k in zip(scales, keys, new_keys):         # keys [B, Hkv, T, D] after RoPE
        assert s.shape == (TINY["num_key_value_heads"], TINY["head_dim"])
        torch.testing.assert_close(new_k, k * s.to(device)[None, :, None, :], rtol=1e-4, atol=1e-5)
        assert s.max() / s.min() > 1.2        # the keys did change


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen3"])
def test_transformers_models_with_q_norm_are_refused(hf, model_type, device):
    with pytest.raises(ValueError, match=f"this model is '{model_type}'"):
        hf[1].rescale_key_channels(tiny_model(hf, model_type, device))


def test_transformers_partial_rope_is_refused(hf, device):
    model = tiny_model(hf, "llama", device)
    model.config.rope_parameters = dict(model.config.rope_parameters, partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match="partial_rotary_factor is 0.5"):
        hf[1].rescale_key_channels(model)
