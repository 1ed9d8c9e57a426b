"""The compressed KV-cache formats: `PackedKV` (one contiguous stream per sequence and kv head) and
`PagedKV` (pages from a pool and block tables, for serving engines).

Layout (HND, one contiguous stream per (batch, kv head)):

    bitmap   int32  [*lead, T, D // 32]   bit (d % 32) of word (d // 32) is set where channel d is kept
    values   dtype  [*lead, T, capacity]  the kept elements of each token in increasing d;
                                          unused slots are zero
    seq_lens int32  [B] or None           valid tokens per sequence (ragged batches); tokens
                                          at or past seq_lens[b] are all-zero and never attended

`lead` is usually [B, H]. `capacity` is a multiple of 8, so every row stays 16-byte aligned.
Bytes per token per head: D / 8 + capacity * itemsize. At D=128 fp16 and sparsity 0.7
(39 kept, capacity 40) that is 96 B against 256 B dense (37.5%); at 0.5 it is 144 B (56.25%).

fp8 values (opt-in): values may be float8_e4m3fn, one byte per kept value, with capacity a
multiple of 16 (16-byte rows again) and a `value_scale` s: a stored byte e stands for e * s. The
packers write x / s rounded to the nearest e4m3 value (ties to even), finite values beyond
+-448 saturate to +-448, and NaN and +-inf (which e4m3 cannot hold) become NaN, so they still
reach the outputs they touch. The decode kernels widen e exactly and apply s in float32. Halving
the value bytes buys twice the kept values at the same bytes, which measured far more accurate
than fp16 values at 37.5% and below (perf/NOTES.md, "kept values in fp8"). At D=128, sparsity 0.5
with fp8 values is 16 + 64 = 80 B per token and head (31.25% of dense fp16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_VALUES = torch.float8_e4m3fn  # the one 1-byte value format (see the module docstring)
FP8_MAX = 448.0                   # its largest finite magnitude
SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)  # 96: tl kernels only (D/32 = 3 bitmap words)


def round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def kept_per_token(head_dim: int, sparsity: float) -> int:
    """Number of values top-k pruning keeps per token: D - floor(sparsity * D)."""
    return head_dim - int(sparsity * head_dim)


def value_row_multiple(value_dtype: torch.dtype | None) -> int:
    """Capacities are multiples of this, so that every value row is 16-byte aligned: 8 slots of
    2 or 4 bytes, 16 of fp8's 1."""
    return 16 if value_dtype == FP8_VALUES else 8


def default_capacity(head_dim: int, sparsity: float, value_dtype: torch.dtype | None = None) -> int:
    return round_up(kept_per_token(head_dim, sparsity), value_row_multiple(value_dtype))


def check_value_format(value_dtype, value_scale) -> tuple[torch.dtype | None, float]:
    """(value_dtype, value_scale) as given to the packers and caches: value_dtype None (the dense
    dtype) or torch.float8_e4m3fn, value_scale a positive finite float (only fp8 values may use
    one other than 1)."""
    if value_dtype is not None and value_dtype != FP8_VALUES:
        raise TypeError(f"value_dtype must be None (the dense dtype) or {FP8_VALUES}, got {value_dtype}")
    if isinstance(value_scale, bool) or not isinstance(value_scale, (int, float)):
        raise TypeError(f"value_scale must be a float, got {type(value_scale).__name__}")
    value_scale = float(value_scale)
    if not (0.0 < value_scale < float("inf")):
        raise ValueError(f"value_scale must be positive and finite, got {value_scale}")
    if value_dtype is None and value_scale != 1.0:
        raise ValueError(f"value_scale={value_scale} needs value_dtype={FP8_VALUES} (fp16 / bf16 / fp32 values "
                         "are stored as they are)")
    return value_dtype, value_scale


@dataclass
class PackedKV:
    """A bitmap-compressed K or V cache (forward only, no autograd).

    Attributes:
        bitmap:   int32 [*lead, T, D // 32].
        values:   [*lead, T, capacity], the dtype of the dense cache, or float8_e4m3fn.
        capacity: value slots per token (multiple of 8, of 16 for fp8 values; at most D).
        head_dim: D, the dense last dimension.
        seq_lens: int32 [B] valid tokens per sequence, or None when every token is valid.
        value_scale: fp8 values only: a stored value e stands for e * value_scale (default 1).
    """

    bitmap: torch.Tensor
    values: torch.Tensor
    capacity: int
    head_dim: int
    seq_lens: torch.Tensor | None = None
    value_scale: float = 1.0

    def __post_init__(self):
        d, cap = self.head_dim, self.capacity
        if d % 32 != 0:
            raise ValueError(f"PackedKV: head_dim must be a multiple of 32, got {d}")
        if self.values.dtype not in SUPPORTED_DTYPES + (FP8_VALUES,):
            raise TypeError(f"PackedKV: values dtype {self.values.dtype} not in {SUPPORTED_DTYPES + (FP8_VALUES,)}")
        multiple = value_row_multiple(self.values.dtype)
        if cap % multiple != 0 or not multiple <= cap <= d:
            raise ValueError(f"PackedKV: capacity must be a multiple of {multiple} in [{multiple}, {d}], got {cap}"
                             + (" (fp8 values: 16-byte rows)" if self.fp8 else ""))
        check_value_format(self.values.dtype if self.fp8 else None, self.value_scale)
        if self.bitmap.dtype != torch.int32:
            raise TypeError(f"PackedKV: bitmap must be int32, got {self.bitmap.dtype}")
        lead = tuple(self.values.shape[:-1])
        if tuple(self.values.shape) != lead + (cap,):
            raise ValueError(f"PackedKV: values shape {tuple(self.values.shape)} does not end in capacity {cap}")
        if tuple(self.bitmap.shape) != lead + (d // 32,):
            raise ValueError(
                f"PackedKV: bitmap shape {tuple(self.bitmap.shape)} != {lead + (d // 32,)} "
                f"(values shape {tuple(self.values.shape)}, head_dim {d})")
        if self.bitmap.device != self.values.device:
            raise ValueError(f"PackedKV: bitmap on {self.bitmap.device}, values on {self.values.device}")
        if not (self.bitmap.is_contiguous() and self.values.is_contiguous()):
            raise ValueError("PackedKV: bitmap and values must be contiguous")
        if self.seq_lens is not None:
            if self.values.dim() != 4:
                raise ValueError(f"PackedKV: seq_lens needs a [B, H, T, capacity] cache, got {tuple(self.values.shape)}")
            if self.seq_lens.dtype != torch.int32 or tuple(self.seq_lens.shape) != (self.values.shape[0],):
                raise ValueError(
                    f"PackedKV: seq_lens must be int32 [{self.values.shape[0]}], got "
                    f"{self.seq_lens.dtype} {tuple(self.seq_lens.shape)}")
            if self.seq_lens.device != self.values.device:
                raise ValueError(f"PackedKV: seq_lens on {self.seq_lens.device}, values on {self.values.device}")

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def fp8(self) -> bool:
        """Whether the values are float8_e4m3fn (scaled by value_scale)."""
        return self.values.dtype == FP8_VALUES

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense shape [*lead, T, D] this cache unpacks to."""
        return tuple(self.values.shape[:-1]) + (self.head_dim,)

    @property
    def num_tokens(self) -> int:
        """Allocated tokens T (seq_lens says how many are valid per sequence)."""
        return self.values.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer: bitmap, values and seq_lens."""
        total = self.bitmap.numel() * 4 + self.values.numel() * self.values.element_size()
        if self.seq_lens is not None:
            total += self.seq_lens.numel() * 4
        return total

    def to(self, device) -> "PackedKV":
        return PackedKV(self.bitmap.to(device), self.values.to(device), self.capacity, self.head_dim,
                        None if self.seq_lens is None else self.seq_lens.to(device), self.value_scale)


@dataclass
class PagedKV:
    """A paged compressed K or V cache, for serving engines: pages of `page_size` tokens from a pool,
    and a block table per sequence (forward only, no autograd).

    Layout (vLLM's head-major pages; flash-attn's `flash_attn_with_kvcache(..., cache_seqlens=,
    block_table=)` convention for the table):

        bitmap      int32 [num_pages, Hkv, page_size, D // 32]   as PackedKV's, per page and kv head
        values      dtype [num_pages, Hkv, page_size, capacity]
        block_table int32 [B, max_pages]  sequence b's tokens [i * page_size, (i + 1) * page_size)
                                          live in page block_table[b, i]
        seq_lens    int32 [B]             tokens of sequence b (required)

    page_size is a multiple of 16, so a decode tile of 16 tokens never crosses a page. fp8 values
    (and value_scale) as in PackedKV. A K and a V
    cache are two PagedKV over their own pools that share one block_table and seq_lens (the same
    tensors). Block-table entries outside [0, num_pages) for tokens below seq_lens are never read
    through: the decode kernels skip those tokens (not attended) and the writes skip them.
    Several sequences may list the same page (prefix caching).
    """

    bitmap: torch.Tensor
    values: torch.Tensor
    capacity: int
    head_dim: int
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    value_scale: float = 1.0

    def __post_init__(self):
        PackedKV(self.bitmap, self.values, self.capacity, self.head_dim, value_scale=self.value_scale)  # the pools' own checks
        if self.values.dim() != 4:
            raise ValueError(f"PagedKV: values must be [num_pages, Hkv, page_size, capacity], got "
                             f"{tuple(self.values.shape)}")
        if self.page_size % 16 != 0 or self.page_size == 0:
            raise ValueError(f"PagedKV: page_size (values.shape[2]) must be a positive multiple of 16, "
                             f"got {self.page_size}")
        for name, t in (("block_table", self.block_table), ("seq_lens", self.seq_lens)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
                raise TypeError(f"PagedKV: {name} must be an int32 tensor, got {getattr(t, 'dtype', type(t))}")
            if t.device != self.values.device:
                raise ValueError(f"PagedKV: {name} on {t.device}, values on {self.values.device}")
        if self.block_table.dim() != 2 or not self.block_table.is_contiguous():
            raise ValueError(f"PagedKV: block_table must be a contiguous [B, max_pages], got "
                             f"{tuple(self.block_table.shape)} strides {self.block_table.stride()}")
        if tuple(self.seq_lens.shape) != (self.block_table.shape[0],):
            raise ValueError(f"PagedKV: seq_lens shape {tuple(self.seq_lens.shape)} != [B] = "
                             f"[{self.block_table.shape[0]}] (block_table {tuple(self.block_table.shape)})")

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def fp8(self) -> bool:
        """Whether the values are float8_e4m3fn (scaled by value_scale)."""
        return self.values.dtype == FP8_VALUES

    @property
    def page_size(self) -> int:
        return self.values.shape[2]

    @property
    def num_pages(self) -> int:
        return self.values.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens a sequence's block table can address: max_pages * page_size."""
        return self.block_table.shape[1] * self.page_size

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense shape [B, Hkv, max_pages * page_size, D] of the sequences' caches."""
        return (self.block_table.shape[0], self.values.shape[1], self.num_tokens, self.head_dim)

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer: the pools, the block table and seq_lens."""
        return (self.bitmap.numel() * 4 + self.values.numel() * self.values.element_size()
                + self.block_table.numel() * 4 + self.seq_lens.numel() * 4)

    def check_tables(self) -> None:
        """Validation mode (a host sync: for debugging and engines' checked paths, not the decode hot
        path): every block-table entry that holds tokens below seq_lens lies in [0, num_pages), and
        seq_lens fits the table. ValueError names the first bad entry. (Unchecked, the kernels
        still never read outside the pools: they skip such tokens.)"""
        lens = self.seq_lens.to(torch.int64)
        if bool(((lens < 0) | (lens > self.num_tokens)).any()):
            raise ValueError(f"PagedKV: seq_lens outside [0, max_pages * page_size = {self.num_tokens}]: "
                             f"{lens.tolist()}")
        used = torch.arange(self.block_table.shape[1], device=lens.device)[None, :] < (
            (lens + self.page_size - 1) // self.page_size)[:, None]
        bad = used & ((self.block_table < 0) | (self.block_table >= self.num_pages))
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"PagedKV: block_table[{b}, {i}] = {int(self.block_table[b, i])} is outside the pool "
                             f"[0, {self.num_pages}) but holds tokens of sequence {b} (seq_lens {int(lens[b])})")

    def with_tables(self, block_table: torch.Tensor, seq_lens: torch.Tensor) -> "PagedKV":
        """The same pools under another batch's block table and lengths (no copy)."""
        return PagedKV(self.bitmap, self.values, self.capacity, self.head_dim, block_table, seq_lens, self.value_scale)
