"""Public compression API: prune_topk, pack, prune_and_pack, unpack, and write_pages (prune_and_pack
of new tokens straight into a PagedKV's pools) (forward only, no autograd).

Inputs are dense caches [*lead, T, D], usually [B, H, T, D] (HND). Non-contiguous inputs are copied
once. prune_and_pack runs kernels/prune_pack_gluon.py on GPUs with mma.sync (fp16 / bf16, D 64 / 128
/ 256; ~3.8x faster on the H100) and kernels/prune_pack.py's kernel everywhere else (the
interpreter, fp32, D=32); both produce the same bits. NaN and inf: magnitudes order as |x| with NaN
above inf, so NaN and +-inf are kept before any finite value and are packed and unpacked
bit-exactly. -0.0 has magnitude 0: `pack` treats it as zero (it unpacks to +0.0); top-k may keep it
when a row has fewer nonzeros than `keep`, and then packs it as is.

fp8 values (value_dtype=torch.float8_e4m3fn, format.py): the selection is the same (on x itself);
the kept values are written as x / value_scale rounded to e4m3 (NaN and +-inf as NaN, finite
values beyond 448 * value_scale saturated), by prune_pack.py's kernel on every device, and
unpack returns them times value_scale.
"""
from __future__ import annotations

import torch

from . import autotune
from ._gluon_compat import gluon_runs_on
from ._runtime import cdiv, check_device, check_same_device, interpreting, next_pow2
from .format import (FP8_VALUES, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, PackedKV, PagedKV, check_value_format,
                     default_capacity, kept_per_token, round_up, value_row_multiple)
from .kernels.prune_pack import _select_kernel, _unpack_kernel, gluon_prune_supports


def _check_dense(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} dtype {x.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [..., T, D], got {tuple(x.shape)}")
    if x.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name} head dim D={x.shape[-1]} (shape {tuple(x.shape)}) not in {SUPPORTED_HEAD_DIMS}")
    check_device(name, x)


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1), got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def _check_seq_lens(seq_lens, x: torch.Tensor):
    if seq_lens is None:
        return None
    if x.dim() != 4:
        raise ValueError(f"seq_lens needs x of shape [B, H, T, D], got {tuple(x.shape)}")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype != torch.int32:
        raise TypeError(f"seq_lens must be an int32 tensor, got {getattr(seq_lens, 'dtype', type(seq_lens))}")
    if tuple(seq_lens.shape) != (x.shape[0],):
        raise ValueError(f"seq_lens shape {tuple(seq_lens.shape)} != [B] = [{x.shape[0]}]")
    check_same_device(x=x, seq_lens=seq_lens)
    return seq_lens.contiguous()


def _launch_select(x, *, keep, capacity, seq_lens, select_topk, write_packed, value_dtype=None, value_scale=1.0):
    x = x.contiguous()
    head_dim = x.shape[-1]
    if write_packed:
        out = None
        bitmap = torch.empty(x.shape[:-1] + (head_dim // 32,), dtype=torch.int32, device=x.device)
        values = torch.empty(x.shape[:-1] + (capacity,), dtype=value_dtype or x.dtype, device=x.device)
    else:
        out = torch.empty_like(x)
        bitmap = values = None
    _run_select(x, out, bitmap, values, keep=keep, capacity=capacity, seq_lens=seq_lens,
                select_topk=select_topk, write_packed=write_packed, value_scale=value_scale)
    if write_packed:
        return PackedKV(bitmap, values, capacity, head_dim, seq_lens, value_scale)
    return out


def _run_select(x, out, bitmap, values, *, keep, capacity, seq_lens, select_topk, write_packed, pages=None,
                value_scale=1.0):
    """One launch of the select kernel (prune_pack_gluon.py's where it runs and the config says so,
    else prune_pack.py's) over the rows of contiguous x. pages: None (row r of x -> row r of out /
    bitmap / values), or (slot_mapping, num_heads, page_size, num_slots): row n * Hkv + h of x
    [N, Hkv, D] -> its slot's row of the pools bitmap / values (write_pages). fp8 values (their
    dtype says so) are written by prune_pack.py's kernel."""
    fp8 = values is not None and values.dtype == FP8_VALUES
    head_dim = x.shape[-1]
    n_rows = x.numel() // head_dim
    tokens = x.shape[-2]
    # x.shape[0] may be 0 (empty batch): nothing is launched then, avoid dividing by it.
    rows_per_batch = n_rows // x.shape[0] if x.dim() == 4 and x.shape[0] > 0 else n_rows
    cfg = autotune.config_for("select", x.device, head_dim=head_dim, dtype=x.dtype, rows=n_rows)
    if cfg.get("kernel") == "gluon":
        if select_topk and write_packed and not fp8 and _gluon_prune_runs(x):
            if n_rows > 0:
                _prune_pack_gluon().launch_prune_and_pack(x, bitmap, values, seq_lens, n_rows, tokens,
                                                          rows_per_batch, keep, capacity, pages=pages)
            return
        cfg = autotune.tl_select_config(interpreting())  # prune_topk, pack, fp32, pre-Ampere GPUs
    slot_mapping, num_heads, page_size, num_slots = pages if pages is not None else (None, 0, 0, 0)
    block_t = cfg["BLOCK_T"]
    if n_rows > 0:
        fp8_args = dict(inv_value_scale=1.0 / value_scale, FP8_VALUES=True) if fp8 else {}
        _select_kernel[(cdiv(n_rows, block_t),)](
            x, out, bitmap, values.view(torch.uint8) if fp8 else values, seq_lens, slot_mapping,
            n_rows, tokens, rows_per_batch, keep, num_heads, page_size, num_slots,
            HEAD_DIM=head_dim, CAPACITY=capacity,
            CAPACITY_POW2=next_pow2(capacity),
            MAG_BITS=31 if x.dtype == torch.float32 else 15,
            BLOCK_T=block_t, SELECT_TOPK=select_topk, WRITE_PACKED=write_packed,
            HAS_SEQ_LENS=seq_lens is not None, PAGED=pages is not None,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **fp8_args,
        )


def _prune_pack_gluon():
    from .kernels import prune_pack_gluon  # imports Gluon on first use
    return prune_pack_gluon


def _gluon_prune_runs(x: torch.Tensor) -> bool:
    return gluon_prune_supports(x.dtype, x.shape[-1], interpreting()) and gluon_runs_on(x.device)


def prune_topk(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-token magnitude top-k: keep the D - floor(sparsity * D) entries of largest |x| in every
    row of the last dimension (ties: lower index wins), zero the rest.

    x: [*lead, T, D], fp16 / bf16 / fp32. Returns a tensor of x's shape and dtype.
    """
    _check_dense("x", x)
    sparsity = _check_sparsity(sparsity)
    keep = kept_per_token(x.shape[-1], sparsity)
    return _launch_select(x, keep=keep, capacity=8, seq_lens=None, select_topk=True, write_packed=False)


def prune_and_pack(x: torch.Tensor, sparsity: float, seq_lens: torch.Tensor | None = None, *,
                   value_dtype: torch.dtype | None = None, value_scale: float = 1.0) -> PackedKV:
    """Top-k prune and pack in one pass over x (no dense intermediate).

    x: [B, H, T, D] (any leading dims without seq_lens). seq_lens: int32 [B] valid tokens per
    sequence; tokens past it are not read and pack to all-zero rows. Every valid token keeps
    exactly D - floor(sparsity * D) values (its bitmap popcount), capacity = that rounded up to 8.
    unpack(prune_and_pack(x, s)) == prune_topk(x, s) on valid tokens.
    value_dtype=torch.float8_e4m3fn stores the kept values in one byte each, as x / value_scale
    rounded to e4m3 (module docstring; capacity rounded up to 16); unpack then returns them
    times value_scale, within e4m3's rounding of prune_topk(x, s).
    """
    _check_dense("x", x)
    sparsity = _check_sparsity(sparsity)
    seq_lens = _check_seq_lens(seq_lens, x)
    value_dtype, value_scale = check_value_format(value_dtype, value_scale)
    head_dim = x.shape[-1]
    return _launch_select(x, keep=kept_per_token(head_dim, sparsity),
                          capacity=default_capacity(head_dim, sparsity, value_dtype), seq_lens=seq_lens,
                          select_topk=True, write_packed=True, value_dtype=value_dtype, value_scale=value_scale)


def pack(x: torch.Tensor, capacity: int | None = None, seq_lens: torch.Tensor | None = None, *,
         value_dtype: torch.dtype | None = None, value_scale: float = 1.0) -> PackedKV:
    """Pack ANY sparsity pattern: bitmap of the nonzeros of x and their values.

    capacity: value slots per token; default the largest nonzero count of a row rounded up to a
    multiple of 8 (16 for fp8 values; at least that). A row with more nonzeros than an explicit
    capacity raises ValueError. Finding the default / checking the bound reads one count back to
    the host, so pack is a prefill-time op; the decode path never calls it. value_dtype /
    value_scale: as in prune_and_pack (the bitmap is that of x's nonzeros before rounding).
    """
    _check_dense("x", x)
    seq_lens = _check_seq_lens(seq_lens, x)
    value_dtype, value_scale = check_value_format(value_dtype, value_scale)
    multiple = value_row_multiple(value_dtype)
    head_dim = x.shape[-1]
    nnz = (x != 0)
    if seq_lens is not None:
        t = torch.arange(x.shape[-2], device=x.device)
        nnz = nnz & (t[None, None, :, None] < seq_lens[:, None, None, None])
    max_nnz = int(nnz.sum(-1).max()) if x.numel() else 0
    if capacity is None:
        capacity = max(multiple, round_up(max_nnz, multiple))
    else:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity % multiple != 0 or not multiple <= capacity <= head_dim:
            raise ValueError(f"capacity must be a multiple of {multiple} in [{multiple}, {head_dim}], got {capacity}")
        if max_nnz > capacity:
            raise ValueError(f"a row of x has {max_nnz} nonzeros, more than capacity={capacity}")
    return _launch_select(x, keep=0, capacity=capacity, seq_lens=seq_lens, select_topk=False, write_packed=True,
                          value_dtype=value_dtype, value_scale=value_scale)


def write_pages(cache: PagedKV, x: torch.Tensor, slot_mapping: torch.Tensor, sparsity: float,
                validate: bool = False) -> None:
    """Prune new tokens to their top-k and write them into a PagedKV's pools, in place (vLLM's
    `reshape_and_cache` for the compressed format).

    x: [N, Hkv, D] new tokens of any mix of sequences, in the cache's dtype and on its device.
    slot_mapping: int32 or int64 [N], vLLM's convention: token n goes to page
    slot_mapping[n] // page_size at offset slot_mapping[n] % page_size (which page a sequence's
    token lives in is the caller's block table: block_table[b, pos // page_size]); -1 (any slot
    outside [0, num_pages * page_size)) skips the token, so padded batches need no compaction.
    Each (token, kv head) row keeps kept_per_token(D, sparsity) values, chosen as by
    prune_and_pack (largest |x|, ties to the lower channel, bit-exact values), and its bitmap row
    and value row (kept values, then zeros up to cache.capacity) replace the slot's rows in
    cache.bitmap / cache.values. Nothing else in the pools changes; block_table and seq_lens are
    not touched (the caller advances its lengths). Two tokens with the same slot: one of them is
    written (unspecified which), as in vLLM.

    One kernel launch for all N tokens, no dense intermediate, no host sync. validate=True also
    checks every slot on the host (a sync) and raises ValueError naming the slots outside the
    pool other than -1. Runs prune_pack_gluon.py's kernel where prune_and_pack does (GPU, fp16 /
    bf16, D 64 / 128 / 256), else prune_pack.py's; both give the same bits.
    Raises ValueError if kept_per_token(D, sparsity) > cache.capacity.
    """
    if not isinstance(cache, PagedKV):
        raise TypeError(f"cache must be a PagedKV, got {type(cache).__name__}")
    _check_dense("x", x)
    sparsity = _check_sparsity(sparsity)
    heads, d = cache.values.shape[1], cache.head_dim
    if x.dim() != 3 or tuple(x.shape[1:]) != (heads, d):
        raise ValueError(f"x must be [N, Hkv={heads}, D={d}] for this cache, got {tuple(x.shape)}")
    if x.dtype != cache.dtype and not cache.fp8:
        raise TypeError(f"x dtype {x.dtype} != cache dtype {cache.dtype}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be an int32 or int64 tensor, got "
                        f"{getattr(slot_mapping, 'dtype', type(slot_mapping).__name__)}")
    if tuple(slot_mapping.shape) != (x.shape[0],):
        raise ValueError(f"slot_mapping shape {tuple(slot_mapping.shape)} != [N] = [{x.shape[0]}]")
    check_same_device(cache=cache.values, x=x, slot_mapping=slot_mapping)
    keep = kept_per_token(d, sparsity)
    if keep > cache.capacity:
        raise ValueError(f"sparsity {sparsity} keeps {keep} of D={d} values per token, more than the "
                         f"cache's capacity {cache.capacity}")
    num_slots = cache.num_pages * cache.page_size
    if validate:
        bad = slot_mapping[(slot_mapping != -1) & ((slot_mapping < 0) | (slot_mapping >= num_slots))]
        if bad.numel():
            raise ValueError(f"slot_mapping has {bad.numel()} slot(s) outside [0, {num_slots}) (num_pages "
                             f"{cache.num_pages} x page_size {cache.page_size}) other than -1: from "
                             f"{int(bad.min())} to {int(bad.max())}, e.g. {bad[:8].tolist()}")
    _run_select(x.contiguous(), None, cache.bitmap, cache.values, keep=keep, capacity=cache.capacity,
                seq_lens=None, select_topk=True, write_packed=True,
                pages=(slot_mapping.contiguous(), heads, cache.page_size, num_slots), value_scale=cache.value_scale)


def unpack(packed: PackedKV, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact inverse of pack / prune_and_pack: the dense [*lead, T, D] tensor (zeros past seq_lens).
    fp8 values come out as value * value_scale (float32 math) rounded to dtype, default float32;
    dtype is for fp8 values only."""
    if not isinstance(packed, PackedKV):
        raise TypeError(f"unpack expects a PackedKV, got {type(packed).__name__}")
    check_device("packed.values", packed.values)
    if dtype is not None and (not packed.fp8 or dtype not in SUPPORTED_DTYPES):
        raise TypeError(f"unpack: dtype={dtype} is for fp8 values only, one of {SUPPORTED_DTYPES} "
                        f"(these values are {packed.dtype})")
    # fp8: the kernel writes float32 and torch rounds it to dtype (the interpreter's float32 ->
    # bf16 cast does not round to nearest)
    out_dtype = torch.float32 if packed.fp8 else packed.dtype
    out = torch.empty(packed.shape, dtype=out_dtype, device=packed.device)
    n_rows = out.numel() // packed.head_dim
    cfg = autotune.config_for("unpack", packed.device, head_dim=packed.head_dim, dtype=out_dtype, rows=n_rows)
    fp8_args = dict(value_scale=packed.value_scale, FP8_VALUES=True) if packed.fp8 else {}
    if n_rows > 0:
        _unpack_kernel[(cdiv(n_rows, cfg["BLOCK_T"]),)](
            packed.bitmap, packed.values.view(torch.uint8) if packed.fp8 else packed.values, out, n_rows,
            HEAD_DIM=packed.head_dim, CAPACITY=packed.capacity, BLOCK_T=cfg["BLOCK_T"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **fp8_args,
        )
    return out.to(dtype) if dtype is not None else out
