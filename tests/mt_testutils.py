"""Shared helpers of the mustafar_triton tests (data generation, bit views, error metrics)."""
from __future__ import annotations

import math

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (32, 64, 128, 256)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, seed, device, scale=1.0) -> torch.Tensor:
    """Fresh normal data, drawn on the CPU (reproducible on every device), then moved."""
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float32) * scale).to(dtype).to(device)


def rand_ties(shape, dtype, seed, device, levels=3) -> torch.Tensor:
    """Integers in [-levels, levels]: many exact ties in magnitude, signs mixed, zeros included."""
    return torch.randint(-levels, levels + 1, shape, generator=gen(seed)).to(dtype).to(device)


def random_pattern(shape, seed, device, min_nnz=0, max_nnz=None, force_extremes=True) -> torch.Tensor:
    """Bool mask [*lead, D] with a random number of set entries per row at random positions.

    With force_extremes, the first row is all-False and the last row all-True (when allowed)."""
    g = gen(seed)
    d = shape[-1]
    max_nnz = d if max_nnz is None else max_nnz
    rows = math.prod(shape[:-1])
    counts = torch.randint(min_nnz, max_nnz + 1, (rows, 1), generator=g)
    if force_extremes and rows >= 2:
        counts[0] = min_nnz
        counts[-1] = max_nnz
    rank = torch.rand(rows, d, generator=g).argsort(-1).argsort(-1)  # random permutation per row
    return (rank < counts).reshape(shape).to(device)


def sparse_values(shape, dtype, seed, device, **pattern_kw) -> torch.Tensor:
    """Random nonzero values on a random pattern (zeros elsewhere)."""
    mask = random_pattern(shape, seed, device, **pattern_kw)
    vals = randn(shape, dtype, seed + 1, device)
    vals = torch.where(vals == 0, torch.ones((), dtype=dtype, device=device), vals)  # exact nonzeros
    return torch.where(mask, vals, torch.zeros((), dtype=dtype, device=device))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor as integers (bit-exact comparisons, NaN payloads, -0.0)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def popcount_rows(bitmap: torch.Tensor) -> torch.Tensor:
    """Set bits per token of an int32 bitmap [..., D // 32]."""
    b = (bitmap.to(torch.int64)[..., None] >> torch.arange(32, device=bitmap.device)) & 1
    return b.sum((-1, -2))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere makes it NaN, so comparisons fail)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


def rounded_as_kernels_round(exact: torch.Tensor, dtype: torch.dtype, interpreting: bool) -> torch.Tensor:
    """A float64 result rounded to dtype as a correctly rounding kernel returns it: to nearest, but
    in the interpreter (whose kernels compute 16-bit caches in fp32) bf16 by truncating fp32."""
    if interpreting and dtype == torch.bfloat16:
        return (exact.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    return exact.to(dtype)


def keep_count(d: int, sparsity: float) -> int:
    return d - math.floor(sparsity * d)


def seed_of(*parts) -> int:
    """A deterministic seed per test case (hash() of strings changes between processes)."""
    import zlib
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF
