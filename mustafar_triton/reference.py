"""Pure-torch references with the same signatures as the kernels (slow, any device, for tests).

`sparse_decode_attention` here computes in float64 by default.
"""
from __future__ import annotations

import math

import torch

from .format import (FP8_MAX, FP8_VALUES, PackedKV, PagedKV, check_value_format, default_capacity, kept_per_token,
                     round_up, value_row_multiple)


def _magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """|x| as an integer that orders like |x| (NaN above inf, -0.0 == 0), as in the kernel."""
    if x.dtype == torch.float32:
        return x.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    return x.view(torch.int16).to(torch.int64) & 0x7FFF


def topk_mask(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask of the kept entries: largest |x| first, lower index first among ties."""
    return keep_largest_mask(x, kept_per_token(x.shape[-1], sparsity))


def keep_largest_mask(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the `keep` largest |x| per row (topk_mask's order)."""
    d = x.shape[-1]
    # Stable sort of a key that is unique per row: magnitude * D + (D - 1 - index).
    idx = torch.arange(d, device=x.device)
    key = _magnitude_key(x) * d + (d - 1 - idx)
    order = key.argsort(dim=-1, descending=True)[..., :keep]
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    return mask.scatter_(-1, order, True)


def prune_topk(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    return torch.where(topk_mask(x, sparsity), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _int_view(x: torch.Tensor) -> torch.Tensor:
    """The bits of a float tensor as a same-size integer tensor (for bit-exact data movement)."""
    return x.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[x.element_size()])


def to_fp8(x: torch.Tensor, value_scale: float = 1.0) -> torch.Tensor:
    """x / value_scale as float8_e4m3fn, the packers' rounding: x times the float32 reciprocal of
    value_scale, in float32, rounded to the nearest e4m3 value (ties to even); finite values
    beyond +-448 saturate, NaN and +-inf become NaN (sign kept here; the kernels on a GPU may
    drop a NaN's sign)."""
    inv = torch.tensor(1.0 / value_scale, dtype=torch.float32)
    y = x.float() * inv.to(x.device)
    special = torch.isnan(y) | torch.isinf(y)
    y = torch.where(special, torch.copysign(torch.full_like(y, float("nan")), y), y.clamp(-FP8_MAX, FP8_MAX))
    return y.to(FP8_VALUES)


def from_fp8(values: torch.Tensor, value_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """fp8 values times value_scale in dtype: the product in float64 for float64, else in float32
    (as unpack's kernel computes it) rounded to dtype."""
    if dtype == torch.float64:
        return values.double() * value_scale
    return (values.float() * torch.tensor(value_scale, dtype=torch.float32)).to(dtype)


def _valid_tokens(shape, seq_lens, device) -> torch.Tensor | None:
    if seq_lens is None:
        return None
    t = torch.arange(shape[-2], device=device)
    return (t[None, :] < seq_lens[:, None].to(device))[:, None, :, None]  # [B, 1, T, 1]


def _pack_mask(x: torch.Tensor, mask: torch.Tensor, capacity: int, seq_lens, value_dtype=None,
               value_scale: float = 1.0) -> PackedKV:
    d = x.shape[-1]
    valid = _valid_tokens(x.shape, seq_lens, x.device)
    if valid is not None:
        mask = mask & valid
    weights = (1 << torch.arange(32, device=x.device, dtype=torch.int64))
    words = (mask.reshape(*mask.shape[:-1], d // 32, 32).to(torch.int64) * weights).sum(-1)
    bitmap = ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # reinterpret as int32
    slot = mask.to(torch.int64).cumsum(-1) - 1
    # Move the values as integers: float scatter may quiet or canonicalise NaN payloads
    # (fp16 sNaN 0x7C01 -> 0x7E01, every bf16 NaN -> 0xFFFF on CPU); packing is bit-exact.
    xi = _int_view(x)
    values = torch.zeros(x.shape[:-1] + (capacity + 1,), dtype=xi.dtype, device=x.device)
    values.scatter_(-1, torch.where(mask, slot, capacity), torch.where(mask, xi, 0))
    values = values[..., :capacity].contiguous().view(x.dtype)
    if value_dtype == FP8_VALUES:  # kept values rounded after the selection; empty slots stay 0
        values = to_fp8(values, value_scale)
    return PackedKV(bitmap.contiguous(), values, capacity, d, seq_lens, value_scale)


def prune_and_pack(x: torch.Tensor, sparsity: float, seq_lens=None, value_dtype=None,
                   value_scale: float = 1.0) -> PackedKV:
    value_dtype, value_scale = check_value_format(value_dtype, value_scale)
    return _pack_mask(x, topk_mask(x, sparsity), default_capacity(x.shape[-1], sparsity, value_dtype), seq_lens,
                      value_dtype, value_scale)


def pack(x: torch.Tensor, capacity: int | None = None, seq_lens=None, value_dtype=None,
         value_scale: float = 1.0) -> PackedKV:
    value_dtype, value_scale = check_value_format(value_dtype, value_scale)
    mask = x != 0
    valid = _valid_tokens(x.shape, seq_lens, x.device)
    counted = mask if valid is None else mask & valid
    max_nnz = int(counted.sum(-1).max()) if x.numel() else 0
    multiple = value_row_multiple(value_dtype)
    if capacity is None:
        capacity = max(multiple, round_up(max_nnz, multiple))
    elif max_nnz > capacity:
        raise ValueError(f"a row of x has {max_nnz} nonzeros, more than capacity={capacity}")
    return _pack_mask(x, mask, capacity, seq_lens, value_dtype, value_scale)


def bitmap_mask(packed: PackedKV) -> torch.Tensor:
    """Bool [*lead, T, D] of the set bits."""
    bits = (packed.bitmap.to(torch.int64)[..., None] >> torch.arange(32, device=packed.device)) & 1
    return bits.reshape(packed.shape).bool()


def unpack(packed: PackedKV, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense tensor; fp8 values come out times value_scale in dtype (default float32), other
    values bit-exactly in their own dtype."""
    mask = bitmap_mask(packed)
    slot = (mask.to(torch.int64).cumsum(-1) - 1).clamp(0, packed.capacity - 1)
    vals = _int_view(packed.values).gather(-1, slot)  # integers: bit-exact NaN payloads
    dense = torch.where(mask, vals, 0).view(packed.dtype)
    if packed.fp8:
        return from_fp8(dense, packed.value_scale, dtype or torch.float32)
    return dense


def gather_pages(paged: PagedKV) -> tuple[PackedKV, torch.Tensor]:
    """A PagedKV as the contiguous PackedKV [B, Hkv, max_pages * page_size] its block table
    describes (seq_lens kept), and bool [B, T]: the token's page entry is inside the pool (tokens
    on other entries read as empty rows here and are not attended by the decode)."""
    bt = paged.block_table.to(torch.int64)
    page_ok = (bt >= 0) & (bt < paged.num_pages)                              # [B, P]
    pages = torch.where(page_ok, bt, 0)
    b, p = bt.shape
    hkv, ps = paged.values.shape[1], paged.page_size

    def rows(pool):  # [pages, Hkv, ps, X] -> [B, Hkv, P * ps, X], empty where the entry is bad
        g = _int_view(pool)[pages] if pool.is_floating_point() else pool[pages]  # [B, P, Hkv, ps, X]
        g = torch.where(page_ok[:, :, None, None, None], g, 0)
        return g.permute(0, 2, 1, 3, 4).reshape(b, hkv, p * ps, pool.shape[-1]).contiguous()

    values = rows(paged.values).view(paged.dtype)
    packed = PackedKV(rows(paged.bitmap), values, paged.capacity, paged.head_dim, paged.seq_lens, paged.value_scale)
    return packed, page_ok.repeat_interleave(ps, dim=1)


def pages_from_packed(caches, page_size: int, extra_pages: int = 0, generator=None, shuffle: bool = True):
    """The inverse of gather_pages, for tests and benchmarks: contiguous PackedKV caches (same B,
    Hkv, T; seq_lens required, shared) copied into pools of page_size-token pages, each sequence's
    pages at random page ids (shuffle False: in order, sequence after sequence; one block table for
    all of them; `extra_pages` unused pages, which hold garbage, are added to the pool). Returns a
    list of PagedKV sharing block_table and seq_lens."""
    b, hkv, t, _ = caches[0].shape
    pages = -(-t // page_size)
    num_pages = b * pages + extra_pages
    dev = caches[0].device
    gen_dev = dev if generator is None else "cpu"  # a generator decides where the draws happen
    order = (torch.randperm(num_pages, generator=generator, device=gen_dev) if shuffle
             else torch.arange(num_pages, device=gen_dev)).to(dev)
    block_table = order[:b * pages].reshape(b, pages).to(torch.int32).contiguous()
    seq_lens = caches[0].seq_lens

    def pool(x):  # [B, Hkv, T, X] -> [num_pages, Hkv, page_size, X]
        width = x.shape[-1]
        xi = _int_view(x) if x.is_floating_point() else x
        xi = torch.nn.functional.pad(xi, (0, 0, 0, pages * page_size - t))
        bound = 2**7 if xi.element_size() == 1 else 2**15
        garbage = torch.randint(-bound, bound, (num_pages, hkv, page_size, width), generator=generator,
                                device=gen_dev)
        p = garbage.to(dev, xi.dtype)
        p[block_table.reshape(-1).long()] = xi.reshape(b, hkv, pages, page_size, width).transpose(1, 2).reshape(
            b * pages, hkv, page_size, width)
        return p.view(x.dtype)

    return [PagedKV(pool(c.bitmap), pool(c.values), c.capacity, c.head_dim, block_table, seq_lens, c.value_scale)
            for c in caches]


def write_pages(cache: PagedKV, x: torch.Tensor, slot_mapping: torch.Tensor, sparsity: float,
                validate: bool = False) -> None:
    """compress.write_pages in torch: top-k prune x [N, Hkv, D] and write each (token, head) row's
    bitmap and values (zeros up to cache.capacity) at its slot (page = slot // page_size, offset =
    slot % page_size); slots outside [0, num_pages * page_size) are skipped (validate: ValueError
    for those other than -1)."""
    if kept_per_token(x.shape[-1], sparsity) > cache.capacity:
        raise ValueError(f"sparsity {sparsity} keeps more values than the cache's capacity {cache.capacity}")
    num_slots = cache.num_pages * cache.page_size
    slots = slot_mapping.to(torch.int64)
    inside = (slots >= 0) & (slots < num_slots)
    if validate and bool((~inside & (slots != -1)).any()):
        raise ValueError(f"slot_mapping has slots outside [0, {num_slots}) other than -1")
    mask = topk_mask(x, sparsity)
    packed = _pack_mask(x, mask, cache.capacity, None, cache.dtype if cache.fp8 else None, cache.value_scale)
    page, offset = slots[inside] // cache.page_size, slots[inside] % cache.page_size
    # [n, Hkv, X] rows -> pool[page, :, offset]; the values move as integers (bit-exact NaN payloads)
    cache.bitmap[page, :, offset] = packed.bitmap[inside]
    _int_view(cache.values)[page, :, offset] = _int_view(packed.values)[inside]


def sparse_decode_attention(q, packed_k, packed_v, *, k_window=None, v_window=None, window_lens=None,
                            softmax_scale=None, return_lse=False, num_splits=0, max_seq_len=None,
                            compute_dtype=torch.float64, p_dtype=None):
    """Attention of q [B, Hq, D] over unpack(packed) tokens [0, seq_len) followed by window tokens
    [0, window_len), computed in `compute_dtype`. PagedKV caches: through gather_pages (tokens on
    block-table entries outside the pool are not attended). Returns out [B, Hq, D] (q's dtype) [, lse [B, Hq]].
    p_dtype: the attention weights are rounded to it before the P @ V product, relative to their
    maximum, as a tensor-core kernel rounds its P operand (perf/rounding_floor.py measures what
    that costs); None: not rounded.

    q [B, Lq, Hq, D]: the Lq new tokens are the window's last Lq; query i attends the compressed
    tokens and the window tokens [0, w_len - Lq + i + 1) (none if that is <= 0), w_len =
    min(window_lens[b], W). Returns out [B, Lq, Hq, D] [, lse [B, Lq, Hq]]."""
    if q.dim() == 4:
        lq, w = q.shape[1], (0 if k_window is None else k_window.shape[2])
        if k_window is None or w < lq:
            raise ValueError(f"q [B, Lq, Hq, D] with Lq={lq} needs a window of at least Lq tokens")
        w_len = torch.full((q.shape[0],), w, dtype=torch.int64, device=q.device)
        if window_lens is not None:
            w_len = window_lens.to(q.device, torch.int64).clamp(max=w)
        outs = [sparse_decode_attention(q[:, i], packed_k, packed_v, k_window=k_window, v_window=v_window,
                                        window_lens=(w_len - lq + i + 1).clamp(min=0),
                                        softmax_scale=softmax_scale, return_lse=True, max_seq_len=max_seq_len,
                                        compute_dtype=compute_dtype, p_dtype=p_dtype) for i in range(lq)]
        out, lse = torch.stack([o for o, _ in outs], 1), torch.stack([s for _, s in outs], 1)
        return (out, lse) if return_lse else out
    b, hq, d = q.shape
    attendable = None
    if isinstance(packed_k, PagedKV):
        (packed_k, attendable), (packed_v, _) = gather_pages(packed_k), gather_pages(packed_v)
    k, v = unpack(packed_k, compute_dtype), unpack(packed_v, compute_dtype)
    hkv, t = k.shape[1], k.shape[2]
    dev = q.device
    lens = packed_k.seq_lens.to(dev)[:, None] if packed_k.seq_lens is not None else torch.full((b, 1), t, device=dev)
    valid = torch.arange(t, device=dev)[None, :] < lens.clamp(max=t if max_seq_len is None else max_seq_len)
    if attendable is not None:
        valid = valid & attendable.to(dev)
    if k_window is not None:
        w = k_window.shape[2]
        wl = window_lens.to(dev) if window_lens is not None else torch.full((b,), w, device=dev)
        k = torch.cat([k.to(compute_dtype), k_window.to(compute_dtype)], dim=2)
        v = torch.cat([v.to(compute_dtype), v_window.to(compute_dtype)], dim=2)
        valid = torch.cat([valid, torch.arange(w, device=dev)[None, :] < wl[:, None]], dim=1)
    # tokens past seq_lens / window_lens are not attended: whatever they hold (NaN, inf) must not
    # reach the output through 0 * NaN in the P @ V product
    v = v.masked_fill(~valid[:, None, :, None], 0)
    group = hq // hkv
    k = k.to(compute_dtype).repeat_interleave(group, dim=1)
    v = v.to(compute_dtype).repeat_interleave(group, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    scores = torch.einsum("bhd,bhtd->bht", q.to(compute_dtype), k) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)[..., None]  # no token at all: all-zero output, lse -inf
    if p_dtype is None:
        probs = torch.where(empty, 0.0, torch.exp(scores - lse[..., None]))
    else:  # exp(s - max) rounded, then divided by the unrounded sum, as a kernel does
        top = scores.amax(-1, keepdim=True)
        rounded = torch.exp(scores - top).to(p_dtype).to(compute_dtype)
        probs = torch.where(empty, 0.0, rounded * torch.exp(top - lse[..., None]))
    out = torch.einsum("bht,bhtd->bhd", probs, v).to(q.dtype)
    return (out, lse.float()) if return_lse else out
