"""mustafar_triton: Mustafar KV-cache compression (arXiv 2505.22913) as Triton kernels.

    prune_topk(x, sparsity)                      per-token magnitude top-k pruning
    pack(x, capacity=None, seq_lens=None)        bitmap + values of any sparsity pattern
    prune_and_pack(x, sparsity, seq_lens=None)   both in one pass
    unpack(packed)                               exact inverse of packing
    write_pages(cache, x, slot_mapping, sparsity)  prune_and_pack new tokens into a PagedKV's pages
    sparse_decode_attention(q, packed_k, packed_v, ...)  fused decode attention
    reference                                    pure-torch versions of all of the above
    sparse_decode_attention_op(...)              sparse_decode_attention through the custom op
                                                 torch.ops.mustafar_triton.sparse_decode_attention
    write_pages_op(...)                          write_pages through torch.ops.mustafar_triton.write_pages
    SparseKVCache(...)                           per-layer cache: compressed store + dense window
    PagedSparseKVCache(...)                      per-layer paged cache for continuous batching
    preset(name, head_dim, context_tokens=None)  measured equal-bytes settings for SparseKVCache
    rescale_query_key_(q_proj, k_proj, ...)      query-weighted key selection folded into the weights
"""
from . import reference
from .attention import sparse_decode_attention
from .cache import SparseKVCache
from .compress import pack, prune_and_pack, prune_topk, unpack, write_pages
from .custom_op import sparse_decode_attention_op, write_pages_op
from .format import PackedKV, PagedKV, default_capacity, kept_per_token
from .key_scales import key_channel_scales, rescale_query_key_
from .paged_cache import PagedSparseKVCache
from .presets import PRESETS, preset

__all__ = ["PackedKV", "PagedKV", "pack", "prune_and_pack", "prune_topk", "unpack", "write_pages",
           "sparse_decode_attention", "sparse_decode_attention_op", "write_pages_op", "SparseKVCache", "PagedSparseKVCache", "reference",
           "kept_per_token", "default_capacity", "preset", "PRESETS", "key_channel_scales", "rescale_query_key_"]
__version__ = "0.1.0"
