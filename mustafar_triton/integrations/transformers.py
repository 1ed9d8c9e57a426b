"""transformers integration: `generate()` with dense prefill, then decode on a Mustafar cache.

    from mustafar_triton.integrations.transformers import MustafarCache, use_mustafar_attention
    use_mustafar_attention(model)                     # registers and selects attention "mustafar"
    cache = MustafarCache(model.config, k_sparsity=0.5, v_sparsity=0.5, window=32, max_tokens=4096)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)

The prompt is attended densely (torch SDPA) and then compressed into each layer's
`SparseKVCache` in one launch per K / V; every decoded token is appended to the dense window and
attended by the fused kernel over the compressed store and the window. Keys are cached after
RoPE, as the model computes them. Limits: one prompt per call (no padding mask), one new token
per decode step (no speculative / multi-token steps), no beam search.
"""
from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..cache import SparseKVCache

ATTENTION_NAME = "mustafar"
# Cache.update runs right before the attention call of the same layer: it leaves the layer here.
_current = threading.local()


class MustafarLayer(CacheLayerMixin):
    """One decoder layer's cache, backed by a SparseKVCache allocated on the first update."""

    is_compileable = False
    is_sliding = False

    def __init__(self, k_sparsity: float, v_sparsity: float, window: int, max_tokens: int):
        super().__init__()
        self.k_sparsity, self.v_sparsity = k_sparsity, v_sparsity
        self.window, self.max_tokens = window, max_tokens
        self.store: SparseKVCache | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hkv, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store = SparseKVCache(b, hkv, d, self.max_tokens, self.window, self.k_sparsity, self.v_sparsity,
                                   dtype=key_states.dtype, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill compresses the prompt (returned as is for dense attention); a decode step
        appends its one token. key_states, value_states: [B, Hkv, T, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[2]
        if self.length == 0:
            self.store.prefill(key_states, value_states)
        elif new == 1:
            self.store.append(key_states, value_states)
        else:
            raise NotImplementedError(f"MustafarCache appends one token per step after the prompt, got {new}")
        self.length += new
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_tokens + self.window

    def reset(self) -> None:
        if self.store is not None:
            self.store.reset()
        self.length = 0


class MustafarCache(Cache):
    """A transformers Cache whose every layer is a Mustafar compressed store plus dense window."""

    def __init__(self, config, k_sparsity: float = 0.5, v_sparsity: float = 0.5, window: int = 32,
                 max_tokens: int = 4096):
        layers = [MustafarLayer(k_sparsity, v_sparsity, window, max_tokens)
                  for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        _current.layer = self.layers[layer_idx]
        return keys, values


def mustafar_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Decode steps (one query token, a MustafarCache in use) run the fused sparse kernel; anything
    else (the prompt, or a forward without a MustafarCache) is plain SDPA."""
    layer = getattr(_current, "layer", None)
    _current.layer = None
    if layer is None or query.shape[2] != 1 or layer.length == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    out = layer.store.attend(query[:, :, 0], softmax_scale=scaling)       # [B, Hq, D]
    return out[:, None], None                                              # [B, 1, Hq, D]


def use_mustafar_attention(model) -> None:
    """Register the "mustafar" attention function and select it for `model`."""
    AttentionInterface.register(ATTENTION_NAME, mustafar_attention)
    model.set_attn_implementation(ATTENTION_NAME)
