"""Public decode API: sparse_decode_attention (forward only, no autograd, no host sync)."""
from __future__ import annotations

import math

import torch

from . import autotune
from ._fast_launch import CompiledLauncher
from ._gluon_compat import gluon_runs_on
from ._runtime import (cdiv, check_device, current_raw_stream, interpreting, next_pow2, num_sms, remember,
                       sm_shared_bytes)
from .format import PackedKV, PagedKV
from .kernels import decode_gluon_launch as gluon_launch
from .kernels.decode import MERGE_BLOCK_D, _merge_splits_kernel, _sparse_decode_kernel, byte_slot_table, choose_num_splits

_slot_tables: dict[torch.device, torch.Tensor] = {}


def _slot_table(device: torch.device) -> torch.Tensor:
    """The per-byte lookup table of decode.py's "lut" expansion (1 KB int32), one copy per device."""
    if device not in _slot_tables:
        _slot_tables[device] = torch.tensor(byte_slot_table(), dtype=torch.int32, device=device)
    return _slot_tables[device]


def _check_packed(name: str, p, q: torch.Tensor) -> None:
    if not isinstance(p, (PackedKV, PagedKV)):
        raise TypeError(f"{name} must be a PackedKV or PagedKV, got {type(p).__name__}")
    if p.values.dim() != 4:
        raise ValueError(f"{name} must hold a [B, Hkv, T, D] cache, got dense shape {p.shape}")
    if p.dtype != q.dtype and not p.fp8:
        raise TypeError(f"{name} dtype {p.dtype} != q dtype {q.dtype}")
    if p.device != q.device:
        raise ValueError(f"{name} is on {p.device} but q is on {q.device}")
    if p.head_dim != q.shape[-1]:
        raise ValueError(f"{name} head_dim {p.head_dim} != q head dim {q.shape[-1]} (q shape {tuple(q.shape)})")
    if p.shape[0] != q.shape[0]:
        raise ValueError(f"{name} batch {p.shape[0]} != q batch {q.shape[0]}")
    if q.shape[-2] % p.shape[1] != 0:
        raise ValueError(f"q heads {q.shape[-2]} not a multiple of {name} kv heads {p.shape[1]}")


def _check_pages(packed_k, packed_v) -> None:
    """K and V caches are both contiguous or both paged; paged ones share one block table and
    seq_lens (the same tensors) and page ids (the same page count and size)."""
    if isinstance(packed_k, PagedKV) != isinstance(packed_v, PagedKV):
        raise TypeError(f"packed_k is a {type(packed_k).__name__} but packed_v a {type(packed_v).__name__}: "
                        "give two PackedKV or two PagedKV")
    if not isinstance(packed_k, PagedKV):
        return
    if not (_same_tensor(packed_k.block_table, packed_v.block_table)
            and _same_tensor(packed_k.seq_lens, packed_v.seq_lens)):
        raise ValueError("paged packed_k and packed_v must share one block_table and one seq_lens tensor "
                         "(under torch.compile: the same tensor objects)")
    if (packed_k.num_pages, packed_k.page_size) != (packed_v.num_pages, packed_v.page_size):
        raise ValueError(f"paged packed_k has {packed_k.num_pages} pages of {packed_k.page_size} tokens, packed_v "
                         f"{packed_v.num_pages} of {packed_v.page_size}: a page id must mean the same tokens in both")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if torch.compiler.is_compiling():  # dynamo in torch 2.11 cannot compare data_ptr()s: objects only
        return False
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _check_window(k_window, v_window, window_lens, packed_k: PackedKV, q: torch.Tensor) -> None:
    if (k_window is None) != (v_window is None):
        raise ValueError("give both k_window and v_window, or neither")
    if k_window is None:
        if window_lens is not None:
            raise ValueError("window_lens given without k_window / v_window")
        return
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
    if window_lens is not None:
        if not isinstance(window_lens, torch.Tensor) or window_lens.dtype != torch.int32:
            raise TypeError(f"window_lens must be an int32 tensor, got {getattr(window_lens, 'dtype', type(window_lens))}")
        if tuple(window_lens.shape) != (b,):
            raise ValueError(f"window_lens shape {tuple(window_lens.shape)} != [B] = [{b}]")
        if window_lens.device != q.device:
            raise ValueError(f"window_lens is on {window_lens.device} but q is on {q.device}")


def _sparse_decode_gluon_kernel():
    from .kernels.decode_gluon import _sparse_decode_gluon_kernel  # imports Gluon on first use
    return _sparse_decode_gluon_kernel


def sparse_decode_attention(q: torch.Tensor, packed_k: PackedKV, packed_v: PackedKV, *,
                            k_window: torch.Tensor | None = None, v_window: torch.Tensor | None = None,
                            window_lens: torch.Tensor | None = None, softmax_scale: float | None = None,
                            return_lse: bool = False, num_splits: int = 0, max_seq_len: int | None = None,
                            exact_weights: bool = False):
    """One decode step of attention over a compressed cache plus a dense window of recent tokens.

    q:        [B, Hq, D] fp16 / bf16 / fp32, one query token per sequence, or [B, Lq, Hq, D] with
              1 <= Lq <= MAX_QUERY_TOKENS (8): several new tokens per sequence and step
              (speculative decoding, multi-token prediction, chunked prefill); see below.
    packed_k, packed_v: PackedKV of [B, Hkv, T, D] caches (same B, Hkv, T, D and q's dtype, or
              both with fp8 values: format.py; widened exactly to q's dtype, with their
              value_scale; the Gluon walk reads them for fp16 and bf16 queries, decode.py's
              kernel for fp32 ones; such layouts never tune);
              sequence b attends its first packed_k.seq_lens[b] tokens (all T when seq_lens is
              None; packed_v must use the same lengths). 0 compressed tokens is allowed.
              Or two PagedKV (serving engines: pages from a pool, one block table and seq_lens
              shared by K and V; format.PagedKV): the same kernels, the page of each 16-token
              tile looked up once per tile; tokens whose block-table entry is outside the pool
              are not attended (nothing outside the pools is read). T = max_pages * page_size.
    k_window, v_window: optional dense [B, Hkv, W, D] recent tokens, later in time than every
              compressed token; window_lens int32 [B] valid window tokens (default all W).
    softmax_scale: default 1 / sqrt(D).
    num_splits: sequence splits (flash-decoding); 0 picks from tuning / the grid size.
    max_seq_len: a host-side upper bound of packed_k.seq_lens (default T). Splits are sized on it,
              so a cache allocated far beyond its contents still spreads its work over the GPU;
              compressed tokens at or past it are not attended.
    exact_weights: fp16 / bf16 caches only: P @ V as two tensor-core products, the attention
              weights rounded to the cache dtype and the rounding's remainder, so the weights keep
              ~16 significant bits instead of the dtype's (8 for bf16, as in dense flash kernels);
              the outputs are then the correctly rounded result almost everywhere. It costs up to 8%
              of decode time (H100, perf/NOTES.md, 2026-12-07); default False.
              Layouts with it never tune (they run their bucket's tuned config).
    GQA: query head h reads kv head h // (Hq // Hkv); MQA (Hkv=1) and MHA work.
    Several query tokens (q [B, Lq, Hq, D], out [B, Lq, Hq, D], lse [B, Lq, Hq]): the Lq new
              tokens are the LAST Lq tokens of each sequence's window (already written to k_window
              / v_window), so a window of W >= Lq tokens is required (ValueError otherwise). With
              w_len = min(window_lens[b], W), query i (0-based) attends every compressed token of
              its sequence and the window tokens p < w_len - Lq + i + 1 (causal among the new
              tokens). window_lens[b] < Lq is not checked (a host sync): the window's w_len tokens
              are then taken as the last w_len new tokens, so queries i < Lq - w_len attend no
              window token and query i >= Lq - w_len the window tokens up to its own; nothing
              outside [0, w_len) of the window is read. (New tokens already moved to the
              compressed cache are seen by every query there: keep all Lq in the window.)
              Lq = 1 gives bit for bit the [B, Hq, D] call's result (the same kernel). Kernels:
              the Lq * G (token, head) pairs of a kv head are the rows of its program's query
              tile; the Gluon kernel takes up to 16 (Lq * Hq / Hkv <= 16), decode.py's kernel the
              rest. The window tokens every query sees run as for one token, then the <= Lq - 1
              tokens after them one step each (in the split holding them). Tuning: Lq > 1 uses
              its GQA group's (one-token) config and never tunes on its own.
    Returns out shaped like q in q's dtype, and lse [B, Hq] (or [B, Lq, Hq]) float32 (natural
    log) if return_lse.
    A sequence with no token at all gets out = 0 and lse = -inf. NaN / inf in q or the caches
    propagate to the affected heads' outputs (as in dense attention), never to other heads (nor,
    with Lq > 1, to the queries that do not see the token).
    Forward only; no host sync; allocates only out and lse. The checks, the config and the split
    sizing are resolved once per argument layout (shapes, strides, dtypes, devices) and bound, and
    the float32 split buffers are kept per layout and CUDA stream (_DecodePlan).
    """
    plan = plan_for(q, packed_k, packed_v, k_window, v_window, window_lens, softmax_scale, num_splits, exact_weights)
    return plan(q, packed_k, packed_v, k_window, v_window, window_lens, max_seq_len, return_lse)


def plan_for(q, packed_k, packed_v, k_window, v_window, window_lens, softmax_scale, num_splits,
             exact_weights=False) -> "_DecodePlan":
    """The checked plan of this argument layout, made on its first call and kept (_plans)."""
    try:
        key = _plan_key(q, packed_k, packed_v, k_window, v_window, window_lens, softmax_scale, num_splits,
                        exact_weights)
        plan = _plans.get(key)
    except (AttributeError, TypeError):  # not tensors / PackedKV, or unhashable: the checks say which
        key = plan = None
    if plan is None:
        plan = _DecodePlan(q, packed_k, packed_v, k_window, v_window, window_lens, softmax_scale, num_splits,
                           exact_weights)
        if key is not None:
            remember(_plans, key, plan, _MAX_PLANS)
    return plan


def launched_gather(q, packed_k, packed_v, *, k_window=None, v_window=None, window_lens=None,
                    softmax_scale=None, num_splits=0, max_seq_len=None, exact_weights=False) -> str | None:
    """The Gluon gather the last sparse_decode_attention call with this argument layout ran
    ("walk", "popc" or "scatter"); None where it ran decode.py's kernel or no such call was
    planned yet. For benchmarks that report what they measured (perf/sweep.py)."""
    plan = _plans.get(_plan_key(q, packed_k, packed_v, k_window, v_window, window_lens, softmax_scale, num_splits,
                                exact_weights))
    launch = plan and plan.launches.get(plan.tokens if max_seq_len is None else max_seq_len)
    return launch.gather if launch and launch.gluon else None


def _plan_key(q, packed_k, packed_v, k_window, v_window, window_lens, softmax_scale, num_splits,
              exact_weights=False) -> tuple:
    """q's key holds its shape, so its rank and Lq (the query tokens, a kernel constexpr) too."""
    return (_tensor_key(q), _packed_key(packed_k), _packed_key(packed_v), _tensor_key(k_window),
            _tensor_key(v_window), _tensor_key(window_lens), softmax_scale, type(num_splits), num_splits,
            type(exact_weights), exact_weights)


def _tensor_key(t):
    return None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device)


def _packed_key(p):
    """What the checks read of a PackedKV (its constructor checked the rest: bitmap and seq_lens
    shapes, dtypes and devices against the values)."""
    v = p.values
    key = (type(p), v.shape, v.dtype, v.device, p.capacity, p.head_dim, p.seq_lens is None, p.value_scale)
    return key + (p.block_table.shape,) if isinstance(p, PagedKV) else key


_plans: dict[tuple, "_DecodePlan"] = {}
_MAX_PLANS = 256

# Query tokens per sequence and step (q [B, Lq, Hq, D]): the kernels give each (token, head) pair
# of a kv head's group a row of their query tile.
MAX_QUERY_TOKENS = 8


class _DecodePlan:
    """One argument layout of sparse_decode_attention, checked once: its constants, a launch per
    bound (max_seq_len) and the float32 split buffers per CUDA stream (calls on one stream run in
    order, so they can share them; a graph captured on its own stream gets its own)."""

    def __init__(self, q, packed_k, packed_v, k_window, v_window, window_lens, softmax_scale, num_splits,
                 exact_weights=False):
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"q dtype {q.dtype} not supported (fp16, bf16, fp32)")
        if q.dim() not in (3, 4):
            raise ValueError(f"q must be [B, Hq, D] or [B, Lq, Hq, D], got shape {tuple(q.shape)}")
        self.lq = 1 if q.dim() == 3 else q.shape[1]
        if not 1 <= self.lq <= MAX_QUERY_TOKENS:
            raise ValueError(f"several query tokens per step: q [B, Lq, Hq, D] needs 1 <= Lq <= "
                             f"{MAX_QUERY_TOKENS}, got Lq={self.lq} (shape {tuple(q.shape)})")
        check_device("q", q)
        _check_packed("packed_k", packed_k, q)
        _check_packed("packed_v", packed_v, q)
        _check_pages(packed_k, packed_v)
        if packed_k.shape[:3] != packed_v.shape[:3]:
            raise ValueError(f"packed_k dense shape {packed_k.shape} != packed_v dense shape {packed_v.shape}")
        if (packed_k.seq_lens is None) != (packed_v.seq_lens is None):
            raise ValueError("packed_k and packed_v must both have seq_lens or both not")
        if packed_k.fp8 != packed_v.fp8:
            raise TypeError(f"packed_k values are {packed_k.dtype} but packed_v values {packed_v.dtype}: fp8 "
                            "values are supported in both caches or in neither")
        self.fp8 = packed_k.fp8
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
            raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
        if not isinstance(exact_weights, bool):
            raise TypeError(f"exact_weights must be a bool, got {type(exact_weights).__name__}")
        # fp32 caches multiply fp32 weights already: only 16-bit P @ V products change
        self.exact_weights = exact_weights and q.dtype != torch.float32
        _check_window(k_window, v_window, window_lens, packed_k, q)
        if self.lq > 1 and k_window is None:
            raise ValueError(f"several query tokens per step (q [B, Lq, Hq, D], Lq={self.lq}) need a dense "
                             "window (k_window / v_window) whose last Lq tokens are the new ones")
        if self.lq > 1 and k_window.shape[2] < self.lq:
            raise ValueError(f"several query tokens per step (q [B, Lq, Hq, D], Lq={self.lq}) need a window "
                             f"of at least Lq tokens holding the new ones, got W={k_window.shape[2]}")
        self.copy_q = q.stride(-1) != 1
        self.copy_window = k_window is not None and not (
            k_window.is_contiguous() and v_window.is_contiguous()
            and (window_lens is None or window_lens.is_contiguous()))
        self.batch, self.hq, self.d = q.shape[0], q.shape[-2], q.shape[-1]
        self.hkv = packed_k.shape[1]
        self.group = self.hq // self.hkv
        self.rows = self.lq * self.group  # query rows per kv head: (token, head) pairs
        self.tokens = packed_k.shape[2]
        self.window = 0 if k_window is None else k_window.shape[2]
        self.window_stride = k_window.contiguous().stride() if k_window is not None else (0, 0, 0, 1)
        self.scale = 1.0 / math.sqrt(self.d) if softmax_scale is None else float(softmax_scale)
        self.num_splits = num_splits
        self.k_capacity, self.v_capacity = packed_k.capacity, packed_v.capacity
        self.device = q.device
        self.lse_shape = q.shape[:-1]
        # the strides the kernels get, from stand-ins on the meta device: q as launched (contiguous
        # if copied) and out = torch.empty_like(q)
        q_meta = torch.empty_strided(q.shape, q.stride(), device="meta")
        q_meta = q_meta.contiguous() if self.copy_q else q_meta
        self.q_stride, self.out_stride = q_meta.stride(), torch.empty_like(q_meta).stride()
        self.on_interpreter = interpreting()
        self.flags = dict(GROUP=self.group, HEAD_DIM=self.d, K_CAPACITY=self.k_capacity,
                          V_CAPACITY=self.v_capacity, HAS_SEQ_LENS=packed_k.seq_lens is not None,
                          HAS_WINDOW=k_window is not None, HAS_WINDOW_LENS=window_lens is not None, LQ=self.lq)
        self.paged = isinstance(packed_k, PagedKV)
        if self.exact_weights:  # only where asked: the default launches keep their compiled kernels
            self.flags.update(EXACT_WEIGHTS=True)
        if self.fp8:  # both kernels take them; the scales are part of the layout (_packed_key)
            self.flags.update(FP8_VALUES=True, k_value_scale=packed_k.value_scale, v_value_scale=packed_v.value_scale)
        if self.paged:  # the block table's row length and the pool's pages are constant per layout
            self.flags.update(PAGE_SIZE=packed_k.page_size, max_pages=packed_k.block_table.shape[1],
                              num_pages=packed_k.num_pages)
        self.launches: dict[int, _Launch] = {}
        self.launches_from = autotune.config_for  # forced_config and tests swap it: resolve again then
        self.split_buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, q, packed_k, packed_v, k_window, v_window, window_lens, max_seq_len, return_lse,
                 keep_split_buffers=True):
        """keep_split_buffers=False allocates the split buffers (and lse) for this call only: the
        custom op's way, since CUDA-graph trees (torch.compile's "reduce-overhead") refuse a tensor
        that a graph allocates and something outside it keeps."""
        if self.paged:  # which tensors K and V share is not part of the layout: checked per call
            _check_pages(packed_k, packed_v)
        if self.copy_q:
            q = q.contiguous()
        if self.copy_window:
            k_window, v_window = k_window.contiguous(), v_window.contiguous()
            window_lens = None if window_lens is None else window_lens.contiguous()
        out = torch.empty_like(q)
        if self.batch == 0 or self.hq == 0:
            return (out, self.new_lse()) if return_lse else out
        bound = self.tokens if max_seq_len is None else max_seq_len
        if self.launches_from is not autotune.config_for:
            self.launches.clear()
            self.launches_from = autotune.config_for
        launch = self.launches.get(bound) if type(bound) is int else None
        if launch is None:
            if isinstance(bound, bool) or not isinstance(bound, int) or not 0 <= bound <= self.tokens:
                raise ValueError(f"max_seq_len must be an int in [0, T={self.tokens}], got {max_seq_len!r}")
            tensors = (q, packed_k, packed_v, k_window, v_window, window_lens, out, self.new_lse())
            launch = self._resolve(bound, tensors)
            if not autotune.tracing(self.device):  # a config picked while capturing may be tuned later
                self.launches[bound] = launch
        stream = self.stream()
        part_out, part_lse, kept_lse = self.buffers(stream, launch.splits, keep_split_buffers)
        lse = self.new_lse() if return_lse or kept_lse is None else kept_lse
        launch(stream, q, packed_k, packed_v, k_window, v_window, window_lens, out, lse, part_out, part_lse)
        return (out, lse) if return_lse else out

    def _resolve(self, bound: int, tensors) -> "_Launch":
        """The launch for a bound: its config (looked up once per bound; tuning, when requested,
        times run(cfg) on this call's tensors) and split sizing."""
        context = bound + self.window  # the virtual sequence the splits divide
        dtype = tensors[0].dtype

        def runnable(cfg):
            if cfg.get("kernel") == "gluon" and not (
                    gluon_launch.gluon_decode_supports(dtype, self.d, self.rows, self.on_interpreter)
                    and gluon_runs_on(self.device)
                    and (not self.fp8 or gluon_launch.gluon_fp8_supports(dtype, self.d))):
                # e.g. the interpreter, an fp32 cache, fp8 values at D=32, a T4, more than
                # 16 (token, head) rows
                return autotune.heuristic_config("decode", self.device)
            if cfg.get("kernel") == "gluon" and self.fp8:  # the walks are the gathers that read fp8 values
                return dict(cfg, gather=gluon_launch.fp8_gather(cfg.get("gather"), self.d,
                                                                gluon_launch.gluon_block_h(self.rows)))
            wider = gluon_launch.gluon_block_h(self.rows) > gluon_launch.gluon_block_h(self.group)
            if cfg.get("kernel") == "gluon" and wider:
                # Lq > 1 on more padded rows than the group's config was tuned on: its gather does not
                # carry over (16 rows: the walk's registers), so default_gather picks
                cfg = {key: value for key, value in cfg.items() if key != "gather"}
            return cfg
        # Several query tokens take their GQA group's (one-token) config and never tune: a config
        # tuned on them would be stored under the same bucket and serve one-token calls. fp8 values
        # neither (their bucket's entry is the fp16 cache's; they run its kernel's fp8 form), nor
        # exact weights (the bucket's entry is the default product's).
        def run(cfg):  # one call of cfg's launch on this call's tensors (the tuner times it)
            launch, stream = _Launch(self, runnable(cfg), context), self.stream()
            part_out, part_lse, _ = self.buffers(stream, launch.splits, True)
            launch(stream, *tensors, part_out, part_lse)
        tunes = self.lq == 1 and not (self.fp8 or self.exact_weights)
        cfg = autotune.config_for("decode", self.device, run=run if tunes else None, head_dim=self.d,
                                  group=self.group, dtype=dtype, capacity=max(self.k_capacity, self.v_capacity),
                                  batch_heads=self.batch * self.hkv, context=context)
        return _Launch(self, runnable(cfg), context)

    def new_lse(self) -> torch.Tensor:
        """A float32 lse tensor shaped like q without its last axis ([B, Hq] or [B, Lq, Hq])."""
        return torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)

    def stream(self) -> int:
        """The current raw CUDA stream (0 off CUDA): the launches' stream and the buffers' key."""
        return current_raw_stream(self.device)

    def buffers(self, stream: int, splits: int, keep: bool):
        """Flat float32 split buffers holding at least [B * Hkv, splits, Lq * G, (D)] and an lse
        buffer for calls that do not return lse: kept per CUDA stream, or (keep=False) this call's
        own split buffers and no lse buffer (None)."""
        rows = self.batch * self.hkv * splits * self.rows
        if not keep:
            return (torch.empty(rows * self.d, dtype=torch.float32, device=self.device),
                    torch.empty(rows, dtype=torch.float32, device=self.device), None)
        bufs = self.split_buffers.get(stream)
        if bufs is None or bufs[1].numel() < rows:
            bufs = (torch.empty(rows * self.d, dtype=torch.float32, device=self.device),
                    torch.empty(rows, dtype=torch.float32, device=self.device), self.new_lse())
            self.split_buffers[stream] = bufs
        return bufs


class _Launch:
    """The two launches of one config at one context: split sizing, grid, constants."""

    def __init__(self, plan: _DecodePlan, cfg: dict, context: int):
        d, rows, batch, hkv = plan.d, plan.rows, plan.batch, plan.hkv
        self.cfg = cfg
        self.context = context
        self.gluon = cfg.get("kernel") == "gluon"

        def splits_for(programs_per_sm):
            return choose_num_splits(plan.num_splits or cfg["num_splits"], num_sms(plan.device), batch * hkv,
                                     context, cfg["BLOCK_N"], programs_per_sm)

        if self.gluon:
            self.block_h = gluon_launch.gluon_block_h(rows)
            self.gather, splits, self.maxnreg = gluon_launch.plan(
                cfg, d, rows, plan.k_capacity, plan.v_capacity, context, splits_for, sm_shared_bytes(plan.device),
                value_bytes=1 if plan.fp8 else 2)
        else:
            splits = splits_for(0)
            # the "lut" expansion's table (never picked on a GPU); any int32 tensor stands in where
            # the kernel does not read it, so a first call inside a CUDA graph keeps no new tensor
            self.slot_table = _slot_table(plan.device) if cfg.get("SLOTS") == "lut" else None
            self.block_h = max(16, next_pow2(rows))  # tl.dot's smallest M
        self.per_split = max(1, cdiv(cdiv(context, splits), cfg["BLOCK_N"])) * cfg["BLOCK_N"]
        self.splits = max(1, cdiv(context, self.per_split))
        # splits merged per step: all of them in one step up to 128 (a merge is latency-bound; 128
        # against 64 at B=1 T=32768, 264 splits: 38.2 against 41.8 us per call)
        self.block_s = cfg.get("merge_block", min(128, max(16, next_pow2(self.splits))))
        self.block_d = min(d, MERGE_BLOCK_D)
        self.max_splits_pow2 = max(self.block_s, next_pow2(self.splits))
        # every int and constexpr of both launches is constant per layout and bound: bound once
        qs, os_ = plan.q_stride, plan.out_stride
        ints = dict(stride_qb=qs[0], stride_qh=qs[-2], stride_wb=plan.window_stride[0],
                    stride_wh=plan.window_stride[1], stride_wt=plan.window_stride[2], num_kv_heads=hkv,
                    tokens=plan.tokens, seq_bound=context - plan.window, window=plan.window,
                    tokens_per_split=self.per_split, qk_scale=plan.scale * 1.4426950408889634,
                    # q [B, Hq, D] or [B, Lq, Hq, D]; Lq = 1 passes the one-token strides (the same
                    # kernel). stride_qt comes last: the one-token kernel's parameters keep their offsets
                    stride_qt=qs[1] if plan.lq > 1 else 0)
        fresh = ("part_out_ptr", "part_lse_ptr")  # allocated by the plan: always 16-byte aligned
        if self.gluon:  # its register cap is part of the kernel: the splits count on it
            self.decode = CompiledLauncher(
                _sparse_decode_gluon_kernel(), (self.splits, batch * hkv), fresh, **ints, **plan.flags,
                BLOCK_H=self.block_h, BLOCK_N=cfg["BLOCK_N"], GATHER=self.gather, num_warps=1, maxnreg=self.maxnreg)
        else:
            extra = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}
            self.decode = CompiledLauncher(
                _sparse_decode_kernel, (self.splits, batch * hkv), fresh, **ints, **plan.flags,
                BLOCK_H=self.block_h, BLOCK_N=cfg["BLOCK_N"], SLOTS=cfg["SLOTS"],
                PREFETCH=0 if plan.on_interpreter else cfg.get("prefetch", 0), FP32_MATH=plan.on_interpreter,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
        self.merge = CompiledLauncher(
            _merge_splits_kernel, (batch * plan.lq * plan.hq, d // self.block_d),
            ("part_out_ptr", "part_lse_ptr", "out_ptr", "lse_ptr"),
            num_splits=self.splits, stride_ob=os_[0], stride_oh=os_[-2], num_q_heads=plan.hq,
            stride_ot=os_[1] if plan.lq > 1 else 0, LQ=plan.lq, GROUP=plan.group, HEAD_DIM=d,
            BLOCK_D=self.block_d, BLOCK_S=self.block_s, MAX_SPLITS_POW2=self.max_splits_pow2,
            num_warps=cfg.get("merge_warps", 4))
        self.paged = plan.paged
        self.fp8 = plan.fp8

    def __call__(self, stream, q, packed_k, packed_v, k_window, v_window, window_lens, out, lse, part_out, part_lse):
        pages = {"block_table_ptr": packed_k.block_table} if self.paged else {}
        k_values, v_values = packed_k.values, packed_v.values
        if self.fp8:  # the kernels read fp8 values as their bits
            k_values, v_values = k_values.view(torch.uint8), v_values.view(torch.uint8)
        if self.gluon:
            self.decode(stream, q, packed_k.bitmap, k_values, packed_v.bitmap, v_values,
                        packed_k.seq_lens, k_window, v_window, window_lens, part_out, part_lse, **pages)
        else:
            lut = self.slot_table if self.slot_table is not None else packed_k.bitmap  # a stand-in, not read
            self.decode(stream, q, packed_k.bitmap, k_values, packed_v.bitmap, v_values,
                        packed_k.seq_lens, lut, k_window, v_window, window_lens, part_out, part_lse, **pages)
        self.merge(stream, part_out, part_lse, out, lse)
