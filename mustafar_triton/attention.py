"""Public decode API: sparse_decode_attention (forward only, no autograd, no host sync)."""
from __future__ import annotations

import math

import torch

from . import autotune
from ._gluon_compat import gluon_runs_on
from ._runtime import cdiv, check_device, interpreting, next_pow2, num_sms, sm_shared_bytes
from .format import PackedKV
from .kernels.decode import (MERGE_BLOCK_D, _merge_splits_kernel, _sparse_decode_kernel, byte_slot_table,
                             choose_num_splits, gluon_block_h, gluon_decode_supports, gluon_programs_per_sm,
                             gluon_register_cap, gluon_use_walk, gluon_walk_shared_bytes)

_slot_tables: dict[torch.device, torch.Tensor] = {}


def _slot_table(device: torch.device) -> torch.Tensor:
    """The per-byte lookup table of decode.py's "lut" expansion (1 KB int32), one copy per device."""
    if device not in _slot_tables:
        _slot_tables[device] = torch.tensor(byte_slot_table(), dtype=torch.int32, device=device)
    return _slot_tables[device]


def _check_packed(name: str, p, q: torch.Tensor) -> None:
    if not isinstance(p, PackedKV):
        raise TypeError(f"{name} must be a PackedKV, got {type(p).__name__}")
    if p.values.dim() != 4:
        raise ValueError(f"{name} must hold a [B, Hkv, T, D] cache, got dense shape {p.shape}")
    if p.dtype != q.dtype:
        raise TypeError(f"{name} dtype {p.dtype} != q dtype {q.dtype}")
    if p.device != q.device:
        raise ValueError(f"{name} is on {p.device} but q is on {q.device}")
    if p.head_dim != q.shape[-1]:
        raise ValueError(f"{name} head_dim {p.head_dim} != q head dim {q.shape[-1]} (q shape {tuple(q.shape)})")
    if p.shape[0] != q.shape[0]:
        raise ValueError(f"{name} batch {p.shape[0]} != q batch {q.shape[0]}")
    if q.shape[1] % p.shape[1] != 0:
        raise ValueError(f"q heads {q.shape[1]} not a multiple of {name} kv heads {p.shape[1]}")


def _check_window(k_window, v_window, window_lens, packed_k: PackedKV, q: torch.Tensor):
    if (k_window is None) != (v_window is None):
        raise ValueError("give both k_window and v_window, or neither")
    if k_window is None:
        if window_lens is not None:
            raise ValueError("window_lens given without k_window / v_window")
        return None, None, None
    b, hkv, _, d = packed_k.shape
    for name, w in (("k_window", k_window), ("v_window", v_window)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
        if w.dtype != q.dtype:
            raise TypeError(f"{name} dtype {w.dtype} != q dtype {q.dtype}")
        if w.device != q.device:
            raise ValueError(f"{name} is on {w.device} but q is on {q.device}")
        if w.dim() != 4 or w.shape[0] != b or w.shape[1] != hkv or w.shape[3] != d:
            raise ValueError(f"{name} shape {tuple(w.shape)} must be [B={b}, Hkv={hkv}, W, D={d}]")
    if k_window.shape != v_window.shape:
        raise ValueError(f"k_window shape {tuple(k_window.shape)} != v_window shape {tuple(v_window.shape)}")
    k_window, v_window = k_window.contiguous(), v_window.contiguous()
    if window_lens is not None:
        if not isinstance(window_lens, torch.Tensor) or window_lens.dtype != torch.int32:
            raise TypeError(f"window_lens must be an int32 tensor, got {getattr(window_lens, 'dtype', type(window_lens))}")
        if tuple(window_lens.shape) != (b,):
            raise ValueError(f"window_lens shape {tuple(window_lens.shape)} != [B] = [{b}]")
        if window_lens.device != q.device:
            raise ValueError(f"window_lens is on {window_lens.device} but q is on {q.device}")
        window_lens = window_lens.contiguous()
    return k_window, v_window, window_lens


def _sparse_decode_gluon_kernel():
    from .kernels.decode_gluon import _sparse_decode_gluon_kernel  # imports Gluon on first use
    return _sparse_decode_gluon_kernel


def sparse_decode_attention(q: torch.Tensor, packed_k: PackedKV, packed_v: PackedKV, *,
                            k_window: torch.Tensor | None = None, v_window: torch.Tensor | None = None,
                            window_lens: torch.Tensor | None = None, softmax_scale: float | None = None,
                            return_lse: bool = False, num_splits: int = 0, max_seq_len: int | None = None):
    """One decode step of attention over a compressed cache plus a dense window of recent tokens.

    q:        [B, Hq, D] fp16 / bf16 / fp32, one query token per sequence.
    packed_k, packed_v: PackedKV of [B, Hkv, T, D] caches (same B, Hkv, T, D and q's dtype);
              sequence b attends its first packed_k.seq_lens[b] tokens (all T when seq_lens is
              None; packed_v must use the same lengths). 0 compressed tokens is allowed.
    k_window, v_window: optional dense [B, Hkv, W, D] recent tokens, later in time than every
              compressed token; window_lens int32 [B] valid window tokens (default all W).
    softmax_scale: default 1 / sqrt(D).
    num_splits: sequence splits (flash-decoding); 0 picks from tuning / the grid size.
    max_seq_len: a host-side upper bound of packed_k.seq_lens (default T). Splits are sized on it,
              so a cache allocated far beyond its contents still spreads its work over the GPU;
              compressed tokens at or past it are not attended.
    GQA: query head h reads kv head h // (Hq // Hkv); MQA (Hkv=1) and MHA work.
    Returns out [B, Hq, D] in q's dtype, and lse [B, Hq] float32 (natural log) if return_lse.
    A sequence with no token at all gets out = 0 and lse = -inf. NaN / inf in q or the caches
    propagate to the affected heads' outputs (as in dense attention), never to other heads.
    Forward only; no host sync; allocates only the [B, Hkv, splits, G, D] float32 split buffers.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q dtype {q.dtype} not supported (fp16, bf16, fp32)")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    check_device("q", q)
    _check_packed("packed_k", packed_k, q)
    _check_packed("packed_v", packed_v, q)
    if packed_k.shape[:3] != packed_v.shape[:3]:
        raise ValueError(f"packed_k dense shape {packed_k.shape} != packed_v dense shape {packed_v.shape}")
    if (packed_k.seq_lens is None) != (packed_v.seq_lens is None):
        raise ValueError("packed_k and packed_v must both have seq_lens or both not")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    tokens = packed_k.shape[2]
    if max_seq_len is None:
        max_seq_len = tokens
    elif isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or not 0 <= max_seq_len <= tokens:
        raise ValueError(f"max_seq_len must be an int in [0, T={tokens}], got {max_seq_len!r}")
    k_window, v_window, window_lens = _check_window(k_window, v_window, window_lens, packed_k, q)
    if q.stride(-1) != 1:
        q = q.contiguous()

    batch, hq, d = q.shape
    hkv = packed_k.shape[1]
    window = 0 if k_window is None else k_window.shape[2]
    context = max_seq_len + window  # the virtual sequence the splits divide
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    out = torch.empty_like(q)
    lse = torch.empty((batch, hq), dtype=torch.float32, device=q.device)
    if batch == 0 or hq == 0:
        return (out, lse) if return_lse else out

    on_interpreter = interpreting()

    def splits_for(cfg, programs_per_sm):
        return choose_num_splits(num_splits or cfg["num_splits"], num_sms(q.device), batch * hkv, context,
                                 cfg["BLOCK_N"], programs_per_sm)

    walk_shared = gluon_walk_shared_bytes(d, packed_k.capacity, packed_v.capacity)

    def run(cfg):
        gluon = cfg.get("kernel") == "gluon"
        block_h = gluon_block_h(group)
        walk = False
        if gluon:  # the walk's split count decides its gather; the popcount gather has its own
            splits = splits_for(cfg, gluon_programs_per_sm(d, block_h, True, walk_shared, sm_shared_bytes(q.device)))
            walk = gluon_use_walk(cfg, d, context, splits)
            if not walk:
                splits = splits_for(cfg, gluon_programs_per_sm(d, block_h))
        else:
            splits = splits_for(cfg, 0)
        per_split = max(1, cdiv(cdiv(context, splits), cfg["BLOCK_N"])) * cfg["BLOCK_N"]
        splits = max(1, cdiv(context, per_split))
        part_out = torch.empty((batch * hkv, splits, group, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch * hkv, splits, group), dtype=torch.float32, device=q.device)
        wstride = k_window.stride() if k_window is not None else (0, 0, 0, 1)
        common = (q, packed_k.bitmap, packed_k.values, packed_v.bitmap, packed_v.values, packed_k.seq_lens)
        rest = (k_window, v_window, window_lens, part_out, part_lse,
                q.stride(0), q.stride(1), wstride[0], wstride[1], wstride[2],
                hkv, tokens, max_seq_len, window, per_split, scale * 1.4426950408889634)
        flags = dict(GROUP=group, HEAD_DIM=d,
                     K_CAPACITY=packed_k.capacity, V_CAPACITY=packed_v.capacity,
                     HAS_SEQ_LENS=packed_k.seq_lens is not None, HAS_WINDOW=k_window is not None,
                     HAS_WINDOW_LENS=window_lens is not None)
        if gluon:  # its register cap is part of the kernel: the splits count on it
            _sparse_decode_gluon_kernel()[(splits, batch * hkv)](
                *common, *rest, **flags, BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], WALK=walk, num_warps=1,
                maxnreg=gluon_register_cap(d, block_h, walk))
        else:
            extra = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}
            _sparse_decode_kernel[(splits, batch * hkv)](
                *common, _slot_table(q.device), *rest, **flags,
                BLOCK_H=max(16, next_pow2(group)), BLOCK_N=cfg["BLOCK_N"], SLOTS=cfg["SLOTS"],
                PREFETCH=0 if on_interpreter else cfg.get("prefetch", 0), FP32_MATH=on_interpreter,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
        # splits merged per step: all of them in one step up to 128 (a merge is latency-bound; 128
        # against 64 at B=1 T=32768, 264 splits: 38.2 against 41.8 us per call)
        block_s = cfg.get("merge_block", min(128, max(16, next_pow2(splits))))
        block_d = min(d, MERGE_BLOCK_D)
        _merge_splits_kernel[(batch * hq, d // block_d)](
            part_out, part_lse, out, lse, splits, out.stride(0), out.stride(1), hq,
            GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=block_s, MAX_SPLITS_POW2=max(block_s, next_pow2(splits)),
            num_warps=cfg.get("merge_warps", 4),
        )

    cfg = autotune.config_for("decode", q.device, run=run, head_dim=d, group=group, dtype=q.dtype,
                              capacity=max(packed_k.capacity, packed_v.capacity),
                              batch_heads=batch * hkv, context=context)
    if cfg.get("kernel") == "gluon" and not (gluon_decode_supports(q.dtype, d, group, on_interpreter)
                                              and gluon_runs_on(q.device)):
        cfg = autotune.heuristic_config("decode", q.device)  # e.g. the interpreter, an fp32 cache, a T4
    run(cfg)
    return (out, lse) if return_lse else out
