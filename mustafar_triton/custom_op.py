"""`sparse_decode_attention` as a torch.library custom op, for torch.compile and CUDA graphs.

    torch.ops.mustafar_triton.sparse_decode_attention(
        q, k_bitmap, k_values, v_bitmap, v_values, seq_lens=None, k_window=None, v_window=None,
        window_lens=None, softmax_scale=None, num_splits=0, max_seq_len=None, block_table=None,
        k_value_scale=1.0, v_value_scale=1.0, exact_weights=False)
        -> (out, lse)

takes the PackedKV fields as plain tensors (capacities are the values' last dims, head_dim is q's;
with block_table, the bitmaps and values are a PagedKV's pools and seq_lens is required) and always
returns lse. It is registered when the package is imported, with a fake (meta)
implementation, so torch.compile(fullgraph=True) traces through it without running the kernels.
`sparse_decode_attention_op` is the same call with PackedKV (or PagedKV) arguments. Forward only.

    torch.ops.mustafar_triton.write_pages(bitmap, values, x, slot_mapping, sparsity, value_scale=1.0) -> ()

is compress.write_pages on a PagedKV's pools, in place (a mutating op: torch.compile keeps it in
order with the decode op); `write_pages_op(cache, x, slot_mapping, sparsity)` calls it.
"""
from __future__ import annotations

import torch

from .attention import _check_pages, plan_for
from .compress import write_pages
from .format import PackedKV, PagedKV


@torch.library.custom_op("mustafar_triton::sparse_decode_attention", mutates_args=())
def _sparse_decode_attention(
    q: torch.Tensor, k_bitmap: torch.Tensor, k_values: torch.Tensor, v_bitmap: torch.Tensor,
    v_values: torch.Tensor, seq_lens: torch.Tensor | None = None, k_window: torch.Tensor | None = None,
    v_window: torch.Tensor | None = None, window_lens: torch.Tensor | None = None,
    softmax_scale: float | None = None, num_splits: int = 0, max_seq_len: int | None = None,
    block_table: torch.Tensor | None = None, k_value_scale: float = 1.0, v_value_scale: float = 1.0,
    exact_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] or [B, Lq, Hq, D]; k/v_bitmap int32 [B, Hkv, T, D // 32]; k/v_values [B, Hkv, T,
    capacity]; seq_lens int32 [B] (used for K and V); windows [B, Hkv, W, D]; window_lens int32 [B].
    block_table int32 [B, max_pages]: the bitmaps and values are pools [pages, Hkv, page_size, ...]
    (format.PagedKV). k/v_value_scale: the caches' value_scale (fp8 values). exact_weights: as in
    sparse_decode_attention. Returns out shaped like
    q (contiguous, q's dtype) and lse q.shape[:-1] float32."""
    d = q.shape[-1]
    if block_table is not None:
        if seq_lens is None:
            raise ValueError("a paged cache (block_table given) needs seq_lens")
        packed_k = PagedKV(k_bitmap, k_values, k_values.shape[-1], d, block_table, seq_lens, k_value_scale)
        packed_v = PagedKV(v_bitmap, v_values, v_values.shape[-1], d, block_table, seq_lens, v_value_scale)
    else:
        packed_k = PackedKV(k_bitmap, k_values, k_values.shape[-1], d, seq_lens, k_value_scale)
        packed_v = PackedKV(v_bitmap, v_values, v_values.shape[-1], d, seq_lens, v_value_scale)
    # contiguous q: the output then is contiguous too, as the fake implementation says
    q = q.contiguous()
    plan = plan_for(q, packed_k, packed_v, k_window, v_window, window_lens, softmax_scale, num_splits, exact_weights)
    # split buffers per call: under CUDA-graph trees nothing allocated in the op may outlive it
    return plan(q, packed_k, packed_v, k_window, v_window, window_lens, max_seq_len, return_lse=True,
                keep_split_buffers=False)


@_sparse_decode_attention.register_fake
def _(q, k_bitmap, k_values, v_bitmap, v_values, seq_lens=None, k_window=None, v_window=None,
      window_lens=None, softmax_scale=None, num_splits=0, max_seq_len=None, block_table=None,
      k_value_scale=1.0, v_value_scale=1.0, exact_weights=False):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def sparse_decode_attention_op(q: torch.Tensor, packed_k: PackedKV, packed_v: PackedKV, *,
                               k_window: torch.Tensor | None = None, v_window: torch.Tensor | None = None,
                               window_lens: torch.Tensor | None = None, softmax_scale: float | None = None,
                               return_lse: bool = False, num_splits: int = 0,
                               max_seq_len: int | None = None, exact_weights: bool = False):
    """`mustafar_triton.sparse_decode_attention` (same arguments and results) through the custom
    op torch.ops.mustafar_triton.sparse_decode_attention: traceable by torch.compile(fullgraph=True).

    packed_k and packed_v must both have seq_lens or both not; packed_k.seq_lens is used for both.
    Two PagedKV must share one block_table and seq_lens (checked here: the op takes one pair).
    """
    paged = isinstance(packed_k, PagedKV) and isinstance(packed_v, PagedKV)
    if not paged and not (isinstance(packed_k, PackedKV) and isinstance(packed_v, PackedKV)):
        raise TypeError(f"packed_k and packed_v must be two PackedKV or two PagedKV, got "
                        f"{type(packed_k).__name__} and {type(packed_v).__name__}")
    if (packed_k.seq_lens is None) != (packed_v.seq_lens is None):
        raise ValueError("packed_k and packed_v must both have seq_lens or both not")
    if paged:
        _check_pages(packed_k, packed_v)
    out, lse = torch.ops.mustafar_triton.sparse_decode_attention(
        q, packed_k.bitmap, packed_k.values, packed_v.bitmap, packed_v.values, packed_k.seq_lens,
        k_window, v_window, window_lens, softmax_scale, num_splits, max_seq_len,
        packed_k.block_table if paged else None, packed_k.value_scale, packed_v.value_scale, exact_weights)
    return (out, lse) if return_lse else out


@torch.library.custom_op("mustafar_triton::write_pages", mutates_args=("bitmap", "values"))
def _write_pages(bitmap: torch.Tensor, values: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor,
                 sparsity: float, value_scale: float = 1.0) -> None:
    """bitmap int32 [pages, Hkv, page_size, D // 32] and values [pages, Hkv, page_size, capacity]:
    a PagedKV's pools (value_scale: theirs), written in place; x [N, Hkv, D]; slot_mapping int32 /
    int64 [N]."""
    # write_pages reads neither the block table nor seq_lens: a view of the bitmap pool stands in
    # for both (a tensor allocated here and kept would break CUDA-graph trees)
    lens = bitmap.as_strided((1,), (1,))
    write_pages(PagedKV(bitmap, values, values.shape[-1], x.shape[-1], lens.view(1, 1), lens, value_scale), x,
                slot_mapping, sparsity)


@_write_pages.register_fake
def _(bitmap, values, x, slot_mapping, sparsity, value_scale=1.0):
    return None


def write_pages_op(cache: PagedKV, x: torch.Tensor, slot_mapping: torch.Tensor, sparsity: float) -> None:
    """`mustafar_triton.write_pages` (without validate) through the custom op
    torch.ops.mustafar_triton.write_pages: traceable by torch.compile(fullgraph=True)."""
    if not isinstance(cache, PagedKV):
        raise TypeError(f"cache must be a PagedKV, got {type(cache).__name__}")
    torch.ops.mustafar_triton.write_pages(cache.bitmap, cache.values, x, slot_mapping, sparsity, cache.value_scale)
