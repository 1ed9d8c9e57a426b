"""The compressed KV-cache format, `PackedKV`.

Layout (HND, one contiguous stream per (batch, kv head)):

    bitmap   int32  [*lead, T, D // 32]   bit (d % 32) of word (d // 32) is set where channel d is kept
    values   dtype  [*lead, T, capacity]  the kept elements of each token in increasing d;
                                          unused slots are zero
    seq_lens int32  [B] or None           valid tokens per sequence (ragged batches); tokens
                                          at or past seq_lens[b] are all-zero and never attended

`lead` is usually [B, H]. `capacity` is a multiple of 8, so every row stays 16-byte aligned.
Bytes per token per head: D / 8 + capacity * itemsize. At D=128 fp16 and sparsity 0.7
(39 kept, capacity 40) that is 96 B against 256 B dense (37.5%); at 0.5 it is 144 B (56.25%).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)  # 96: tl kernels only (D/32 = 3 bitmap words)


def round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def kept_per_token(head_dim: int, sparsity: float) -> int:
    """Number of values top-k pruning keeps per token: D - floor(sparsity * D)."""
    return head_dim - int(sparsity * head_dim)


def default_capacity(head_dim: int, sparsity: float) -> int:
    return round_up(kept_per_token(head_dim, sparsity), 8)


@dataclass
class PackedKV:
    """A bitmap-compressed K or V cache (forward only, no autograd).

    Attributes:
        bitmap:   int32 [*lead, T, D // 32].
        values:   [*lead, T, capacity], the dtype of the dense cache.
        capacity: value slots per token (multiple of 8, at most D).
        head_dim: D, the dense last dimension.
        seq_lens: int32 [B] valid tokens per sequence, or None when every token is valid.
    """

    bitmap: torch.Tensor
    values: torch.Tensor
    capacity: int
    head_dim: int
    seq_lens: torch.Tensor | None = None

    def __post_init__(self):
        d, cap = self.head_dim, self.capacity
        if d % 32 != 0:
            raise ValueError(f"PackedKV: head_dim must be a multiple of 32, got {d}")
        if cap % 8 != 0 or not 8 <= cap <= d:
            raise ValueError(f"PackedKV: capacity must be a multiple of 8 in [8, {d}], got {cap}")
        if self.bitmap.dtype != torch.int32:
            raise TypeError(f"PackedKV: bitmap must be int32, got {self.bitmap.dtype}")
        if self.values.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"PackedKV: values dtype {self.values.dtype} not in {SUPPORTED_DTYPES}")
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
                        None if self.seq_lens is None else self.seq_lens.to(device))
