"""Query-weighted key pruning at no cost: move each channel's query weight into the keys.

Magnitude top-k keeps a key's largest |k_d|, but channel d adds q_d * k_d to the score, so a
channel whose queries are large matters more than its |k_d| says. Scaling key channel d by s_d
and query channel d by 1 / s_d leaves every score q . k unchanged, and top-k of the scaled keys
keeps the largest |k_d| * s_d. With s_d the norm of the q_proj rows that produce query channel d
(over the query heads sharing the kv head, RoPE's two channels of a rotation pair together, so
that the scaling commutes with the rotation), the cache keeps the channels with the largest
expected contribution |q_d k_d| for an isotropic input. Folded into q_proj and k_proj once, it
costs nothing per step, needs no change to the cache or the kernels, and serves every cache of
this library.

    scales = rescale_query_key_(attn.q_proj, attn.k_proj, num_kv_heads=8, head_dim=128)

`mustafar_triton.integrations.transformers.rescale_key_channels` applies it to a transformers
model, with the measured gains. Exactness: the scores are those of the original model up to one
rounding of the rescaled weights in their dtype (SmolLM2-135M, 2048 tokens: float32 perplexity
unchanged to 1e-6; bfloat16 +0.02% / +0.10% on prose / code, about the noise of bf16 itself).
Per-channel magnitudes of the keys change by the scales (0.44-2.2x on SmolLM2): mind fp16's
range if a model's keys are already near it.
"""
from __future__ import annotations

import torch

ROTARY_PAIRS = ("half", "interleaved", "none")


def key_channel_scales(q_weight: torch.Tensor, num_kv_heads: int, head_dim: int,
                       rotary_pairs: str = "half") -> torch.Tensor:
    """float32 [num_kv_heads, head_dim] scales s: s[h, d] is the root of the summed squared norms
    of the q_proj rows (q_weight [Hq * D, in], query heads grouped by kv head as GQA repeats them)
    that produce query channel d, over the query heads of kv head h and the two channels of d's
    RoPE pair ("half": channels d and d + D/2, transformers' rotate_half; "interleaved": 2i and
    2i + 1; "none": no pairing), normalised to a geometric mean of 1 per kv head. Applying
    rescale_query_key_ twice scales by 1 the second time: after it, every pair's rows have the
    same norm."""
    if rotary_pairs not in ROTARY_PAIRS:
        raise ValueError(f"rotary_pairs must be one of {ROTARY_PAIRS}, got {rotary_pairs!r}")
    if q_weight.dim() != 2 or num_kv_heads <= 0 or head_dim <= 0 or q_weight.shape[0] % (num_kv_heads * head_dim):
        raise ValueError(f"q_weight {tuple(q_weight.shape)} is not [Hq * head_dim, in] with Hq a multiple of "
                         f"num_kv_heads={num_kv_heads}, head_dim={head_dim}")
    if rotary_pairs != "none" and head_dim % 2:
        raise ValueError(f"RoPE pairs need an even head_dim, got {head_dim}")
    squares = q_weight.detach().float().pow(2).sum(-1).reshape(num_kv_heads, -1, head_dim).sum(1)
    if rotary_pairs == "half":
        squares = squares + squares.roll(head_dim // 2, -1)
    elif rotary_pairs == "interleaved":
        squares = squares.reshape(num_kv_heads, head_dim // 2, 2).sum(-1).repeat_interleave(2, -1)
    if not bool(((squares > 0) & squares.isfinite()).all()):   # one-time setup: not on the decode path
        raise ValueError("q_weight has a query channel whose rows are all zero or not finite: no scale for it")
    log_norms = squares.log() / 2
    return (log_norms - log_norms.mean(-1, keepdim=True)).exp()


@torch.no_grad()
def rescale_query_key_(q_proj: torch.nn.Linear, k_proj: torch.nn.Linear, num_kv_heads: int, head_dim: int,
                       rotary_pairs: str = "half") -> torch.Tensor:
    """In place: k_proj's output channel d of kv head h times s[h, d], q_proj's channel d of each
    query head of kv head h divided by it (biases too), s = key_channel_scales(q_proj.weight, ...).
    q . k is unchanged (up to rounding the weights to their dtype); the keys a cache stores, and
    so which channels top-k keeps, change. Returns s."""
    for name, proj in (("q_proj", q_proj), ("k_proj", k_proj)):
        if not isinstance(proj, torch.nn.Linear):
            raise TypeError(f"{name} must be a torch.nn.Linear, got {type(proj).__name__}")
    if k_proj.out_features != num_kv_heads * head_dim:
        raise ValueError(f"k_proj has {k_proj.out_features} outputs, not num_kv_heads * head_dim = "
                         f"{num_kv_heads} * {head_dim}")
    scales = key_channel_scales(q_proj.weight, num_kv_heads, head_dim, rotary_pairs)
    per_query_row = scales[:, None, :].expand(num_kv_heads, q_proj.out_features // k_proj.out_features,
                                              head_dim).reshape(-1)
    for proj, factor, power in ((k_proj, scales.reshape(-1), 1), (q_proj, per_query_row, -1)):
        work = torch.promote_types(proj.weight.dtype, torch.float32)    # fp16 / bf16: one rounding
        factor = factor.to(proj.weight.device, work) ** power            # 1 / s in the weights' precision
        proj.weight.copy_(proj.weight.to(work) * factor[:, None])
        if proj.bias is not None:
            proj.bias.copy_(proj.bias.to(work) * factor)
    return scales
