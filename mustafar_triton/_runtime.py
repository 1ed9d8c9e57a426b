"""Where kernels run: the GPU, or the Triton CPU interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import torch


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). triton.cdiv and triton.next_power_of_2 are constexpr functions in
    triton 3.6 and cost microseconds per call, which the decode step pays on every call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def current_raw_stream(device: torch.device) -> int:
    """The current raw CUDA stream of device (0 off CUDA): the stream _fast_launch's launches take."""
    return torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0


def remember(cache: dict, key, value, limit: int):
    """cache[key] = value (returned), the oldest entry dropped first once `limit` are kept: the
    per-layout caches of decode plans (attention._plans) and of the cache's launches."""
    if len(cache) >= limit:
        del cache[next(iter(cache))]
    cache[key] = value
    return value


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (read at import time by Triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(name: str, t: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"{name} is on {t.device}: mustafar_triton kernels need CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1 set before importing triton)")


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a handful of programs keeps CPU tests fast


H100_SM_SHARED_BYTES = 228 << 10


def sm_shared_bytes(device: torch.device) -> int:
    """Shared memory per SM (228 KB on an H100); what limits the resident programs of kernels that
    stage data there."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_multiprocessor",
                       H100_SM_SHARED_BYTES)
    return H100_SM_SHARED_BYTES


def has_mma_v2(device: torch.device) -> bool:
    """The Gluon kernels (decode, prune_and_pack) use mma.sync m16n8k16: compute capability 8.0 (Ampere) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "interpreter"
