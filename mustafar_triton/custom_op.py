"""`sparse_decode_attention` as a torch.library custom op, for torch.compile and CUDA graphs.

    torch.ops.mustafar_triton.sparse_decode_attention(
        q, k_bitmap, k_values, v_bitmap, v_values, seq_lens=None, k_window=None, v_window=None,
        window_lens=None, softmax_scale=None, num_splits=0, max_seq_len=None) -> (out, lse)

takes the PackedKV fields as plain tensors (capacities are the values' last dims, head_dim is q's)
and always returns lse. It is registered when the package is imported, with a fake (meta)
implementation, so torch.compile(fullgraph=True) traces through it without running the kernels.
`sparse_decode_attention_op` is the same call with PackedKV arguments. Forward only.
"""
from __future__ import annotations

import torch

from .attention import sparse_decode_attention
from .format import PackedKV


@torch.library.custom_op("mustafar_triton::sparse_decode_attention", mutates_args=())
def _sparse_decode_attention(
    q: torch.Tensor, k_bitmap: torch.Tensor, k_values: torch.Tensor, v_bitmap: torch.Tensor,
    v_values: torch.Tensor, seq_lens: torch.Tensor | None = None, k_window: torch.Tensor | None = None,
    v_window: torch.Tensor | None = None, window_lens: torch.Tensor | None = None,
    softmax_scale: float | None = None, num_splits: int = 0, max_seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] or [B, Lq, Hq, D]; k/v_bitmap int32 [B, Hkv, T, D // 32]; k/v_values [B, Hkv, T,
    capacity]; seq_lens int32 [B] (used for K and V); windows [B, Hkv, W, D]; window_lens int32 [B].
    Returns out shaped like q (contiguous, q's dtype) and lse q.shape[:-1] float32."""
    d = q.shape[-1]
    packed_k = PackedKV(k_bitmap, k_values, k_values.shape[-1], d, seq_lens)
    packed_v = PackedKV(v_bitmap, v_values, v_values.shape[-1], d, seq_lens)
    # contiguous q: the output then is contiguous too, as the fake implementation says
    return sparse_decode_attention(q.contiguous(), packed_k, packed_v, k_window=k_window, v_window=v_window,
                                   window_lens=window_lens, softmax_scale=softmax_scale,
                                   return_lse=True, num_splits=num_splits, max_seq_len=max_seq_len)


@_sparse_decode_attention.register_fake
def _(q, k_bitmap, k_values, v_bitmap, v_values, seq_lens=None, k_window=None, v_window=None,
      window_lens=None, softmax_scale=None, num_splits=0, max_seq_len=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def sparse_decode_attention_op(q: torch.Tensor, packed_k: PackedKV, packed_v: PackedKV, *,
                               k_window: torch.Tensor | None = None, v_window: torch.Tensor | None = None,
                               window_lens: torch.Tensor | None = None, softmax_scale: float | None = None,
                               return_lse: bool = False, num_splits: int = 0,
                               max_seq_len: int | None = None):
    """`mustafar_triton.sparse_decode_attention` (same arguments and results) through the custom
    op torch.ops.mustafar_triton.sparse_decode_attention: traceable by torch.compile(fullgraph=True).

    packed_k and packed_v must both have seq_lens or both not; packed_k.seq_lens is used for both.
    """
    if not isinstance(packed_k, PackedKV) or not isinstance(packed_v, PackedKV):
        raise TypeError(f"packed_k and packed_v must be PackedKV, got {type(packed_k).__name__} "
                        f"and {type(packed_v).__name__}")
    if (packed_k.seq_lens is None) != (packed_v.seq_lens is None):
        raise ValueError("packed_k and packed_v must both have seq_lens or both not")
    out, lse = torch.ops.mustafar_triton.sparse_decode_attention(
        q, packed_k.bitmap, packed_k.values, packed_v.bitmap, packed_v.values, packed_k.seq_lens,
        k_window, v_window, window_lens, softmax_scale, num_splits, max_seq_len)
    return (out, lse) if return_lse else out
