"""transformers integration: `generate()` with dense prefill, then decode on a Mustafar cache.

    from mustafar_triton.integrations.transformers import MustafarCache, use_mustafar_attention
    use_mustafar_attention(model)                     # registers and selects attention "mustafar"
    cache = MustafarCache(model.config, k_sparsity=0.5, v_sparsity=0.5, window=32, max_tokens=4096)
    # or the measured equal-bytes settings (D=64 models): sparsities, sinks and window
    cache = MustafarCache(model.config, max_tokens=4096, **mustafar_triton.preset("K0.7V0.7", head_dim=64))
    out = model.generate(input_ids, attention_mask=attention_mask, cache=cache, max_new_tokens=64)

(`cache=` is the keyword of transformers 5.24; releases before the rename take
`past_key_values=cache`, see `cache_keyword`.)

The prompt is attended densely (torch SDPA) and then compressed into each layer's
`SparseKVCache` in one launch per K / V; every decoded token is appended to the dense window and
attended by the fused kernel over the compressed store and the window. Keys are cached after
RoPE, as the model computes them.

A batch of prompts of different lengths is left-padded (tokenizer.padding_side = "left") and
passed with its attention_mask: each sequence's cache holds only its own tokens (the ragged
lengths of SparseKVCache), so a prompt decodes in a batch as it does alone. With `sinks=S` each
sequence's own first S prompt tokens (after its padding) stay dense. The prompt's mask is
read on the host once per prefill. What the integration cannot serve raises ValueError naming it:
right padding or gaps in the mask, several new tokens per step after the prompt (assisted or
speculative decoding, chunked prefill, a second prompt on a used cache), beam search.

Compiled decode: `MustafarCache(..., static=True)` (max_tokens a multiple of 16) has compileable
layers, so generate() on CUDA compiles its decode step (torch.compile, CUDA graphs) as with
transformers' StaticCache. Each step is SparseKVCache.append_static and the attention custom op:
no host read, no Python int that changes per step (the lengths live on the device; the layer's
token count is a device tensor, as StaticLayer's), fixed buffers marked static. The prompt is
still attended and compressed eagerly, as generate() runs the prefill uncompiled. The static
cache moves one token per step from its ring-shaped window to the store, so it keeps other
tokens dense than the eager cache (SparseKVCache's "Static append"), and a sequence whose store
is full drops its oldest tokens instead of raising (counted on the device;
`MustafarCache.check_capacity()` raises after generate() if any were): size max_tokens for prompt
+ new tokens.
"""
from __future__ import annotations

import inspect
import threading
import weakref

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer, StaticSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ..cache import SparseKVCache, _check_count, value_scales
from ..compress import _check_sparsity
from ..custom_op import sparse_decode_attention_op
from ..key_scales import rescale_query_key_

ATTENTION_NAME = "mustafar"
# Model types whose attention is q_proj / k_proj, then transformers' rotate_half RoPE on the whole
# head, then q . k (no per-head q_norm / k_norm), each checked by tests/test_key_scales.py.
KEY_SCALES_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2")
# Cache.update runs right before the attention call of the same layer: it leaves the layer here.
# `prompt` keeps the lengths read from the last prefill mask, so the layers of one forward read
# the host once.
_current = threading.local()


def cache_keyword(model) -> str:
    """The keyword under which `model.generate()` / `model()` take a cache: "cache" in transformers
    5.24 (where "past_key_values" is deprecated), "past_key_values" before the rename."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prompt_lengths(attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """int32 [B] valid tokens of each left-padded prompt, read from the boolean [B, 1, T, T] mask
    the prefill attends with (None: no padding). Raises ValueError if a sequence's tokens are not
    the last ones of the prompt (right padding, or a gap inside the prompt)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        raise TypeError(f"MustafarCache needs the boolean [B, 1, T, T] prefill mask of attention "
                        f"'{ATTENTION_NAME}', got {attention_mask.dtype} {tuple(attention_mask.shape)}")
    memo = getattr(_current, "prompt", None)
    if memo is not None and memo[0]() is attention_mask:
        return memo[1]
    attended = attention_mask[:, 0, -1, -tokens:]  # what the last prompt token sees: [B, T]
    lens = attended.sum(-1, dtype=torch.int32)
    left_padded = torch.arange(tokens, device=lens.device) >= (tokens - lens)[:, None]
    if not torch.equal(attended, left_padded.expand_as(attended)):  # the one host read
        raise ValueError("MustafarCache serves left-padded prompts (tokenizer.padding_side = 'left'); "
                         "this attention_mask has padding after a prompt's tokens or a gap inside one")
    _current.prompt = (weakref.ref(attention_mask), lens)
    return lens


def _left_align(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] with sequence b's tokens in the last lens[b] positions -> in the first
    lens[b] (the later positions hold copies of the last token; SparseKVCache.prefill ignores them)."""
    b, h, t, d = x.shape
    src = (torch.arange(t, device=x.device) + (t - lens).long()[:, None]).clamp_max(t - 1)  # [B, T]
    return x.gather(2, src[:, None, :, None].expand(b, h, t, d))


class MustafarLayer(CacheLayerMixin):
    """One decoder layer's cache, backed by a SparseKVCache allocated on the first update."""

    is_compileable = False
    is_sliding = False

    def __init__(self, k_sparsity: float, v_sparsity: float, window: int, max_tokens: int, sinks: int = 0,
                 value_dtype: torch.dtype | None = None, value_scale: float | tuple[float, float] = 1.0,
                 exact_weights: bool = False):
        super().__init__()
        self.k_sparsity, self.v_sparsity = k_sparsity, v_sparsity
        self.window, self.max_tokens, self.sinks = window, max_tokens, sinks
        self.value_dtype, self.value_scale = value_dtype, value_scale
        self.exact_weights = exact_weights
        self.store: SparseKVCache | None = None
        self.length = 0
        self.has_prompt = False      # the prompt went through update()
        self.prompt_pending = False  # ... but is not compressed yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hkv, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store = SparseKVCache(b, hkv, d, self.max_tokens, self.window, self.k_sparsity, self.v_sparsity,
                                   dtype=key_states.dtype, device=key_states.device, sinks=self.sinks,
                                   value_dtype=self.value_dtype, value_scale=self.value_scale,
                                   exact_weights=self.exact_weights)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """The prompt is returned as is for dense attention (mustafar_attention compresses it, as
        only the attention sees the padding mask); a decode step appends its one token.
        key_states, value_states: [B, Hkv, T, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.prompt_pending:
            raise ValueError(f"MustafarCache: the prompt never reached attention '{ATTENTION_NAME}'; "
                             "call use_mustafar_attention(model) before generating")
        new = key_states.shape[2]
        if not self.has_prompt:
            self.has_prompt = self.prompt_pending = True
        elif new == 1:
            self.append(key_states, value_states)
        else:
            raise ValueError(
                f"MustafarCache takes one new token per sequence and step after the prompt, got {new} "
                "(assisted / speculative decoding, chunked prefill and a second prompt on a used cache "
                "are not supported)")
        self.advance(new)
        return key_states, value_states

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.store.append(key_states, value_states)

    def advance(self, new: int) -> None:
        self.length += new

    def attend(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Decode attention of the model's query [B, Hq, 1, D] over the layer's cache: [B, 1, Hq, D]
        (the kernel takes the query as a [B, 1, Hq, D] view: one token, no copy)."""
        return self.store.attend(query.transpose(1, 2), softmax_scale=scaling)

    def prefill(self, key_states: torch.Tensor, value_states: torch.Tensor, attention_mask) -> None:
        """Compress the prompt [B, Hkv, T, D], each sequence's valid tokens read from the prefill mask."""
        lens = prompt_lengths(attention_mask, key_states.shape[2])
        if lens is not None:
            key_states, value_states = _left_align(key_states, lens), _left_align(value_states, lens)
        self.store.prefill(key_states, value_states, lens)
        self.prompt_pending = False

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_tokens + self.sinks + self.window

    def reset(self) -> None:
        if self.store is not None:
            self.store.reset()
        self.length = 0
        self.has_prompt = self.prompt_pending = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("MustafarCache does not support beam search (reordering the cache's sequences); "
                         "use greedy decoding or sampling")


class StaticMustafarLayer(MustafarLayer):
    """MustafarLayer whose decode step torch.compile(fullgraph=True) and CUDA graphs capture: it
    appends with SparseKVCache.append_static, attends through the custom op, and counts tokens in
    a device tensor (transformers builds positions from it, as from StaticLayer's)."""

    is_compileable = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cumulative_length = torch.zeros((), dtype=torch.int64)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            # fixed addresses: CUDA graphs then replay over them instead of copying them in
            for buf in (*self.store.buffers(), self.cumulative_length):
                torch._dynamo.mark_static_address(buf)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.store.append_static(key_states, value_states)

    def advance(self, new: int) -> None:
        self.cumulative_length.add_(new)

    def attend(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        store = self.store
        out = sparse_decode_attention_op(query[:, :, 0], store.packed_k, store.packed_v, softmax_scale=scaling,
                                         max_seq_len=store.max_tokens, exact_weights=store.exact_weights,
                                         **store.window_kwargs())
        return out[:, None]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the prompt's mask covers the prompt; a decode step's has one fixed width (no recompiles)
        return (self.get_max_length() if self.has_prompt else query_length), 0

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self.cumulative_length.zero_()


class MustafarCache(Cache):
    """A transformers Cache whose full-attention layers are Mustafar compressed stores plus dense
    windows; sliding-window layers (Gemma 2 / 3, ...) keep their at most `sliding_window`
    tokens dense in transformers' own sliding layers and attend through SDPA with the model's mask.

    k_sparsity, v_sparsity, window, max_tokens, sinks (the first `sinks` tokens of every
    sequence kept dense, default 0), value_dtype and value_scale (fp8 kept values) and
    exact_weights are those of `SparseKVCache`, checked on construction;
    `mustafar_triton.preset(name, head_dim, context_tokens)` gives measured equal-bytes settings to
    pass as **kwargs.
    static=True: compileable layers (StaticMustafarLayer), for generate()'s compiled decode; needs
    max_tokens a positive multiple of 16, and enough of it: a full store drops tokens (no error
    inside a compiled step); `check_capacity()` after generate() raises if any were dropped.
    """

    def __init__(self, config, k_sparsity: float = 0.5, v_sparsity: float = 0.5, window: int = 32,
                 max_tokens: int = 4096, sinks: int = 0, static: bool = False,
                 value_dtype: torch.dtype | None = None, value_scale: float | tuple[float, float] = 1.0,
                 exact_weights: bool = False):
        _check_count("sinks", sinks, 0)
        value_scales(value_dtype, value_scale)
        _check_count("window", window, 0)
        _check_count("max_tokens", max_tokens, 0)
        _check_sparsity(k_sparsity)
        _check_sparsity(v_sparsity)
        if not isinstance(static, bool):
            raise TypeError(f"static must be a bool, got {type(static).__name__}")
        if not isinstance(exact_weights, bool):
            raise TypeError(f"exact_weights must be a bool, got {type(exact_weights).__name__}")
        if static and (max_tokens == 0 or max_tokens % 16):
            raise ValueError(f"MustafarCache(static=True) needs max_tokens a positive multiple of 16 (the store is "
                             f"written as pages of max_tokens tokens), got {max_tokens}")
        layer = StaticMustafarLayer if static else MustafarLayer
        layers = []
        for kind, sliding_window in attention_layers(config):
            if kind == "full_attention":
                layers.append(layer(k_sparsity, v_sparsity, window, max_tokens, sinks, value_dtype, value_scale,
                                    exact_weights))
            elif static:  # at most sliding_window dense tokens: transformers' own layers, as StaticCache's
                layers.append(StaticSlidingWindowLayer(max_tokens + sinks + window, sliding_window))
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window))
        super().__init__(layers=layers)

    def check_capacity(self) -> None:
        """Raise ValueError if a static cache dropped tokens because a sequence's store was full
        (append_static cannot raise inside a compiled step). One host read: call it after
        generate(), not per step."""
        stores = [layer.store for layer in self.layers if isinstance(layer, MustafarLayer) and layer.store is not None]
        if not stores:
            return
        dropped = torch.stack([store.dropped for store in stores]).amax(0).tolist()
        lost = [b for b, n in enumerate(dropped) if n]
        if lost:
            raise ValueError(f"MustafarCache: sequences {lost} lost {[dropped[b] for b in lost]} tokens to a full "
                             f"store; allocate max_tokens for the prompt plus every generated token")

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        _current.layer = layer if isinstance(layer, MustafarLayer) else None  # None: SDPA, the model's mask
        return keys, values


def attention_layers(config) -> list[tuple[str, int | None]]:
    """(layer type, sliding window) of each decoder layer, read from the config as transformers'
    DynamicCache reads it: `layer_types`, else every layer sliding if `sliding_window` is set.
    Raises ValueError for a type MustafarCache cannot serve (chunked attention, shared or absent
    caches, ...) and for a model without a full-attention layer (nothing to compress)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    sliding_window = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None)
    if kinds is None:
        kinds = ["full_attention" if sliding_window is None else "sliding_attention"] * text.num_hidden_layers
    unknown = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"MustafarCache serves full-attention and sliding-window layers; this model has "
                         f"layer types {unknown}")
    if "full_attention" not in kinds:
        raise ValueError("MustafarCache compresses full-attention layers; every layer of this model attends "
                         f"a sliding window of {sliding_window} tokens (use the model's own cache)")
    return [(kind, sliding_window if kind == "sliding_attention" else None) for kind in kinds]


def mustafar_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Decode steps (one query token, a MustafarCache in use) run the fused sparse kernel; the
    prompt is compressed into the cache and attended by plain SDPA, as is every forward without a
    MustafarCache."""
    layer = getattr(_current, "layer", None)
    _current.layer = None
    if layer is not None and layer.prompt_pending:
        layer.prefill(key, value, attention_mask)
    elif layer is not None:
        return layer.attend(query, scaling), None                          # [B, 1, Hq, D]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                  dropout=dropout, **kwargs)


def mustafar_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                  local_size: int | None = None, **kwargs):
    """Masks of attention "mustafar": transformers' SDPA masks, except that a causal step of one
    query token gets the 2D padding mask as a [B, 1, 1, kv] view (no launch, no host sync): the
    fused kernel reads the cache's own lengths, the SDPA fallback (no MustafarCache) applies it."""
    if (q_length == 1 and mask_function is causal_mask_function and local_size is None
            and attention_mask is not None and attention_mask.shape[-1] == kv_offset + kv_length):
        return attention_mask[:, None, None, kv_offset:]
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, **kwargs)


def use_mustafar_attention(model) -> None:
    """Register the "mustafar" attention and mask functions and select them for `model`."""
    AttentionInterface.register(ATTENTION_NAME, mustafar_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, mustafar_mask)
    model.set_attn_implementation(ATTENTION_NAME)


def rescale_key_channels(model) -> list[torch.Tensor]:
    """Fold query-weighted key selection into `model` (in place, once, before generate()): each
    attention layer's k_proj output channels are scaled by the norms of the q_proj rows feeding the
    same channel and q_proj's divided by them (mustafar_triton.key_scales), so the model computes
    the same scores while a Mustafar cache's magnitude top-k keeps the key channels that weigh most
    in them. No change to the cache, its bytes or its speed; applying it again changes nothing.
    The scores change only by rounding the rescaled weights to their dtype.

    Measured (perf/accuracy.py --grid key-scales, SmolLM2-135M-Instruct, 2048 tokens, perplexity
    change vs dense, prose / code, float32): K0.7V0.7 +20.3 / +24.8% -> +17.1 / +21.9%;
    preset("K0.7V0.7") +7.1 / +10.3% -> +6.5 / +8.4%; K0.5V0.5 +2.6 / +4.1% -> +1.7 / +2.3%. In
    bfloat16 (--dtype bf16), rounding included: the preset +7.5 / +10.3% -> +6.9 / +8.3%, while
    the rescaled dense model differs from the original by +0.02 / +0.10%.
    Supported: model types in KEY_SCALES_MODEL_TYPES (Llama-style attention). Models that
    normalise queries per head (q_norm: Gemma 3, Qwen 3) raise ValueError: on Gemma 3 weighting the
    key selection by the queries' own per-channel size measured worse than plain top-k.
    Returns each attention layer's float32 [num_kv_heads, head_dim] scales."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in KEY_SCALES_MODEL_TYPES:
        raise ValueError(f"rescale_key_channels supports model types {KEY_SCALES_MODEL_TYPES} (q_proj / k_proj and "
                         f"RoPE over the whole head, no q_norm); this model is {model_type!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"rescale_key_channels needs RoPE over the whole head; this model's partial_rotary_factor "
                         f"is {partial}")
    layers = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not layers:
        raise ValueError("rescale_key_channels found no attention module with q_proj and k_proj")
    return [rescale_query_key_(m.q_proj, m.k_proj, config.num_key_value_heads, m.head_dim) for m in layers]
