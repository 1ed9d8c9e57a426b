"""mustafar_triton: Mustafar KV-cache compression (arXiv 2505.22913) as Triton kernels.

    prune_topk(x, sparsity)                      per-token magnitude top-k pruning
    pack(x, capacity=None, seq_lens=None)        bitmap + values of any sparsity pattern
    prune_and_pack(x, sparsity, seq_lens=None)   both in one pass
    unpack(packed)                               exact inverse of packing
    sparse_decode_attention(q, packed_k, packed_v, ...)  fused decode attention
    reference                                    pure-torch versions of all of the above
"""
from . import reference
from .attention import sparse_decode_attention
from .compress import pack, prune_and_pack, prune_topk, unpack
from .format import PackedKV, default_capacity, kept_per_token

__all__ = ["PackedKV", "pack", "prune_and_pack", "prune_topk", "unpack", "sparse_decode_attention",
           "reference", "kept_per_token", "default_capacity"]
__version__ = "0.1.0"
