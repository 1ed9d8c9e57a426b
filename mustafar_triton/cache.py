"""`SparseKVCache`: one attention layer's KV cache, compressed store + dense window of recent tokens
(+ optional dense attention sinks: the first tokens of every sequence).

State (all preallocated at construction; no buffer is ever reallocated or re-concatenated, so the
addresses stay fixed for CUDA graphs):

    packed_k, packed_v  PackedKV [B, Hkv, max_tokens, ...] sharing one int32 seq_lens [B]: the
                        pruned + packed older tokens of every sequence, valid in [0, seq_lens[b])
    k_window, v_window  [B, Hkv, sinks + window, D] dense tokens, valid in [0, window_lens[b]):
                        rows [0, sinks) the sinks, rows [sinks, sinks + window) the recent ring
    window_lens         int32 [B]

Sequence b is, in time order, its first min(length, sinks) tokens (dense, window rows
[0, sinks)), then its seq_lens[b] store tokens, then its recent window tokens (window rows
[sinks, window_lens[b])). A sequence's store is empty until its sinks are full, so its dense rows
are always one contiguous valid prefix [0, window_lens[b]), and the newest token is always the
last valid row. Decode attention has no positional mask (RoPE is already in the cached keys), so
the order of the attended tokens does not matter: `attend` runs `sparse_decode_attention` over the
store plus the dense buffer, sinks included, with no kernel change. sinks == 0 (the default) is
the cache without sinks, bit for bit.

Flush policy (when window tokens move to the store). Every `append` adds one token to every
sequence, so the host can track, without reading the device, an upper bound `F` on the dense fill
(sinks + recent) of every sequence (exact for sequences prefilled with all T tokens). Before an
append with F == sinks + window (some window may be full), the cache flushes: every sequence whose
recent window holds more than `window - chunk` tokens moves its oldest min(recent, chunk) recent
tokens to the store and shifts the rest of its recent window down (pruned + packed and shifted
by one launch, kernels/window_flush.py, O(chunk) work; never the sinks); the other sequences are
left alone. Afterwards every
recent window holds at most `window - chunk` tokens, so the next `chunk` appends fit. For a batch
prefilled without `lens` (all sequences equally long) this is exactly "compress the oldest chunk
tokens when the window is full". No step reads a device value on the host, and no step loops
over batch or heads.

Capacity: the host likewise tracks an upper bound on seq_lens (exact for sequences prefilled with
all T tokens): `prefill` and `append` raise ValueError, before changing any state, when that bound
would exceed max_tokens. So capacity is checked against the largest possible length, and a
ragged batch whose longest sequence is shorter than the padded prefill length T can be refused
a little early.

window == 0 is allowed: no recent dense tokens, every appended token past the sinks is pruned +
packed immediately.

CUDA graphs: a graph of `attend` captured once replays over the cache as it grows (fixed buffers,
lengths read on the device). `append` updates the host-side bounds, so run it eagerly (a captured
append would replay without them). Forward only, no autograd.

Static append (`append_static`, for torch.compile(fullgraph=True) and CUDA graphs): every call is
the same fixed sequence of device ops, with no host read and no Python state that changes per
step. The recent window is a ring of `window` rows after the sinks: while a sequence's ring has
room the token takes the next row; once it is full, the ring's oldest token (row sinks +
ring_start[b]) is pruned + packed into the store at position seq_lens[b] (one write_pages per
K / V over all sequences: the contiguous store [B, Hkv, max_tokens, ...] is a PagedKV pool of B
pages of max_tokens tokens, page b = sequence b, so max_tokens must be a positive multiple of 16;
sequences with nothing to store get slot -1, which write_pages skips) and the new token takes its
row. The ring is the same token set as the eager window, only its rows are rotated, which decode
attention does not see. It compresses one token per step where `append` compresses `chunk` at
once, so the two keep different tokens dense (the same tokens when window is 0). Capacity cannot
be checked without a host read: a sequence whose store is full gets slot -1 (never a row of
another sequence) and drops the token instead, counted in `dropped` [B] (on the device): the
caller sizes max_tokens for the whole generation and may check `dropped` afterwards (one host
read, e.g. `MustafarCache.check_capacity()`). After `append_static`, `append` raises until the
next `prefill` / `reset` (the host bounds it needs are no longer kept), and `attend` sizes on
max_tokens.
"""
from __future__ import annotations

import torch

from ._fast_launch import CompiledLauncher
from ._runtime import check_device, check_same_device, current_raw_stream, next_pow2, remember
from .attention import _tensor_key, plan_for
from .compress import _check_sparsity, _launch_select, prune_and_pack
from .custom_op import write_pages_op
from .format import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, PackedKV, PagedKV, check_value_format, default_capacity,
                     kept_per_token)
from .kernels.window_append import _append_token_kernel
from .kernels.window_flush import _flush_kernel


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bound_bucket(n: int, limit: int) -> int:
    """n rounded up to a multiple of 1/32 of its power of two (at most limit): the bound attend
    sizes its splits on, so that a new launch is resolved once per ~n/32 stored tokens (every ~128
    at 4k-8k) instead of at every window flush. The splits then cover up to ~3% more tokens than
    stored; those lie past every sequence's seq_lens and are masked, as in any ragged batch."""
    step = (1 << (n.bit_length() - 1)) >> 5 if n >= 64 else 1
    return min(-(-n // step) * step, limit)


def value_scales(value_dtype, value_scale) -> tuple[float, float]:
    """SparseKVCache's value_scale (one float, or a (K, V) pair) as (K scale, V scale), checked
    with value_dtype (format.check_value_format)."""
    scales = value_scale if isinstance(value_scale, tuple) else (value_scale, value_scale)
    if len(scales) != 2:
        raise ValueError(f"value_scale must be a float or a (K scale, V scale) pair, got {value_scale!r}")
    return tuple(check_value_format(value_dtype, scale)[1] for scale in scales)


# append's and the flush's launches per layout (SparseKVCache._shared_launch), oldest dropped first
_shared_launches: dict[tuple, CompiledLauncher] = {}
_MAX_SHARED_LAUNCHES = 256


class SparseKVCache:
    """Per-layer KV cache: pruned + packed store of older tokens, dense window of recent ones.

    Args:
        batch, num_kv_heads, head_dim: B, Hkv, D (D in 32 / 64 / 128 / 256).
        max_tokens: store capacity per sequence, in compressed tokens (>= 0). A sequence holds at
            most max_tokens + sinks + window tokens.
        window: dense recent tokens per sequence (>= 0).
        k_sparsity, v_sparsity: fraction of each token's channels pruned, in [0, 1).
        dtype: fp16 / bf16 / fp32, of the cache and of the queries.
        device: a CUDA device, or the CPU under the Triton interpreter.
        chunk: window tokens moved to the store per flush, in [1, max(window, 1)]; default
            max(1, window // 2).
        sinks: the first `sinks` tokens of every sequence stay dense (attention sinks, >= 0;
            default 0, no sinks). Each sequence's own first tokens in a ragged batch; a sequence
            shorter than `sinks` fills its sinks as it grows. They cost `sinks` dense tokens per
            sequence and head: at D=64 fp16, 4 sinks = 1 KiB per sequence and kv head (K and V).
        value_dtype: None (the store keeps values in `dtype`) or torch.float8_e4m3fn: one byte
            per kept value (format.py: capacity rounded to 16, NaN / inf stored as NaN, values
            beyond 448 * scale saturated); the sinks and the window stay in `dtype`. Decode reads
            them in the Gluon walk for fp16 and bf16 queries, else in decode.py's kernel.
        value_scale: fp8 only, the scale of both stores, or a (K scale, V scale) pair: a stored
            byte e stands for e * scale, so scale ~ max |value| / 448 uses e4m3's whole range
            (default 1.0: values up to 448 in magnitude).
        exact_weights: attend with sparse_decode_attention's exact_weights (fp16 / bf16: the
            attention weights to ~16 bits in P @ V, for up to 8% more decode time; default False).

    See the module docstring for the flush policy and the capacity check.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, max_tokens: int, window: int,
                 k_sparsity: float, v_sparsity: float, dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "cuda", chunk: int | None = None, sinks: int = 0,
                 value_dtype: torch.dtype | None = None, value_scale: float | tuple[float, float] = 1.0,
                 exact_weights: bool = False):
        self.batch = _check_count("batch", batch, 1)
        self.num_kv_heads = _check_count("num_kv_heads", num_kv_heads, 1)
        self.max_tokens = _check_count("max_tokens", max_tokens, 0)
        self.window = _check_count("window", window, 0)
        self.sinks = _check_count("sinks", sinks, 0)
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype {dtype} not in {SUPPORTED_DTYPES}")
        chunk = _check_count("chunk", max(1, window // 2) if chunk is None else chunk, 1)
        if chunk > max(window, 1):
            raise ValueError(f"chunk must be in [1, max(window, 1)] = [1, {max(window, 1)}], got {chunk}")
        self.chunk = chunk
        self.head_dim = head_dim
        self.dtype = dtype
        self.k_sparsity = _check_sparsity(k_sparsity)
        self.v_sparsity = _check_sparsity(v_sparsity)
        scales = value_scales(value_dtype, value_scale)
        self.value_dtype = value_dtype
        if not isinstance(exact_weights, bool):
            raise TypeError(f"exact_weights must be a bool, got {type(exact_weights).__name__}")
        self.exact_weights = exact_weights

        lead = (batch, num_kv_heads, max_tokens)
        seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)

        def store(sparsity, scale):
            cap = default_capacity(head_dim, sparsity, value_dtype)
            return PackedKV(torch.zeros(lead + (head_dim // 32,), dtype=torch.int32, device=device),
                            torch.zeros(lead + (cap,), dtype=value_dtype or dtype, device=device), cap, head_dim,
                            seq_lens, scale)

        self.packed_k, self.packed_v = store(self.k_sparsity, scales[0]), store(self.v_sparsity, scales[1])
        dense = self.sinks + window
        self.k_window = torch.zeros((batch, num_kv_heads, dense, head_dim), dtype=dtype, device=device)
        self.v_window = torch.zeros_like(self.k_window)
        self.window_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.ring_start = torch.zeros(batch, dtype=torch.int32, device=device)  # append_static's oldest ring row
        self.dropped = torch.zeros(batch, dtype=torch.int32, device=device)  # append_static's drops (full store)
        check_device("SparseKVCache buffers", self.k_window)
        self._append_launches = {}  # append's launch per (k_new, v_new) strides: _append_launch
        self._flush_launch = None   # _flush's launch and its tensors, bound at the first flush
        self._flush_done = torch.zeros_like(self.window_lens)  # its programs' count per sequence, zero between flushes
        self._flush_args = ()
        self._token_shape = (batch, num_kv_heads, 1, head_dim)
        self._device = self.k_window.device
        self._plan = None     # attend's decode plan and the query layout it was made for
        self._plan_key = None
        self._max_store = 0   # host upper bound on seq_lens (exact for the longest sequence)
        self._max_window = 0  # host upper bound on window_lens
        self._static = False  # append_static was used since the last prefill / reset
        self._pages = None
        if max_tokens % 16 == 0 and max_tokens > 0:
            # the store as PagedKV pools of B pages (append_static's write_pages; the table is unused)
            table = torch.arange(batch, dtype=torch.int32, device=device)[:, None]
            self._pages = tuple(PagedKV(p.bitmap, p.values, p.capacity, head_dim, table, seq_lens, p.value_scale)
                                for p in (self.packed_k, self.packed_v))

    @property
    def seq_lens(self) -> torch.Tensor:
        """int32 [B] compressed tokens per sequence (the store's seq_lens)."""
        return self.packed_k.seq_lens

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer: both stores (one shared seq_lens), both dense buffers (sinks and
        recent window), window_lens."""
        return (self.packed_k.nbytes + self.packed_v.nbytes - self.seq_lens.numel() * 4
                + 2 * self.k_window.numel() * self.k_window.element_size() + self.window_lens.numel() * 4)

    def reset(self) -> None:
        """Empty every sequence (zeroes the store, so tokens past seq_lens stay all-zero rows)."""
        for buf in (self.packed_k.bitmap, self.packed_k.values, self.packed_v.bitmap,
                    self.packed_v.values, self.seq_lens, self.window_lens, self.ring_start, self.dropped):
            buf.zero_()
        self._max_store = self._max_window = 0
        self._static = False

    def _check_tokens(self, name: str, x: torch.Tensor, tokens: int | None = None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} dtype {x.dtype} != cache dtype {self.dtype}")
        b, h, d = self.batch, self.num_kv_heads, self.head_dim
        t = x.shape[2] if tokens is None and x.dim() == 4 else tokens
        if tuple(x.shape) != (b, h, t, d):
            raise ValueError(f"{name} shape {tuple(x.shape)} must be [B={b}, Hkv={h}, {t or 'T'}, D={d}]")
        check_same_device(cache=self.k_window, **{name: x})

    def _check_capacity(self, what: str, store_tokens: int) -> None:
        if store_tokens > self.max_tokens:
            raise ValueError(
                f"SparseKVCache overflow: {what} needs up to {store_tokens} compressed tokens per "
                f"sequence, but max_tokens={self.max_tokens} (window={self.window}, sinks={self.sinks}); "
                f"allocate a larger cache")

    def _store(self, k_chunk: torch.Tensor, v_chunk: torch.Tensor, n: torch.Tensor) -> None:
        """Prune + pack the first n[b] tokens of k_chunk / v_chunk [B, Hkv, C, D] (int32 n [B])
        and write them at store positions [seq_lens[b], seq_lens[b] + n[b]).

        All C rows are written at [seq_lens[b], seq_lens[b] + C): rows past n[b] come out of
        prune_and_pack as all-zero rows, which keeps the store zero past seq_lens. The caller
        guarantees max(seq_lens) + C <= max_tokens (the host capacity check).
        """
        d, c = self.head_dim, k_chunk.shape[2]
        # prune_and_pack without its argument checks (the chunks are the cache's own, checked on entry)
        pk, pv = (_launch_select(x, keep=kept_per_token(d, sparsity), capacity=p.capacity, seq_lens=n,
                                 select_topk=True, write_packed=True, value_dtype=self.value_dtype,
                                 value_scale=p.value_scale)
                  for x, sparsity, p in ((k_chunk, self.k_sparsity, self.packed_k),
                                         (v_chunk, self.v_sparsity, self.packed_v)))
        # the store rows, int64 [B, 1, C, 1]; one token (window 0's appends): seq_lens alone, one op
        pos = self.seq_lens.view(-1, 1, 1, 1)
        pos = pos + torch.arange(c, device=n.device).view(1, 1, c, 1) if c > 1 else pos.long()
        index = {}   # one expanded index per destination shape (K's and V's bitmaps share one)
        as_bits = self._value_bits  # fp8 values move as their bytes (torch has no fp8 scatter)
        for dst, src in ((self.packed_k.bitmap, pk.bitmap), (as_bits(self.packed_k.values), as_bits(pk.values)),
                         (self.packed_v.bitmap, pv.bitmap), (as_bits(self.packed_v.values), as_bits(pv.values))):
            idx = index.get(src.shape)
            if idx is None:
                idx = index[src.shape] = pos.expand(src.shape)
            dst.scatter_(2, idx, src)
        self.seq_lens.add_(n)

    def _value_bits(self, values: torch.Tensor) -> torch.Tensor:
        """Stored values as the kernels and scatters move them: fp8 as their bytes (uint8), else as they are."""
        return values.view(torch.uint8) if self.value_dtype is not None else values

    def prefill(self, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor | None = None) -> None:
        """Replace the cache contents with a prompt.

        k, v: [B, Hkv, T, D] in the cache dtype (keys after RoPE). lens: int32 [B] valid tokens of
        each sequence (the first lens[b] of k[b]; values are clamped to [0, T]); default all T.
        Sequence b keeps its first min(lens[b], sinks) tokens dense as sinks and its last
        min(max(lens[b] - sinks, 0), window) tokens dense in the recent window; the
        max(lens[b] - sinks - window, 0) between them are pruned + packed into the store (one
        prune_and_pack launch per K / V). Raises ValueError if T - sinks - window > max_tokens.
        """
        self._check_tokens("k", k)
        self._check_tokens("v", v, k.shape[2])
        b, h, t, d = k.shape
        s, w = self.sinks, self.window
        dense = s + w
        if lens is None:
            lens = torch.full((b,), t, dtype=torch.int32, device=k.device)
        if not isinstance(lens, torch.Tensor) or lens.dtype != torch.int32:
            raise TypeError(f"lens must be an int32 tensor, got {getattr(lens, 'dtype', type(lens).__name__)}")
        if tuple(lens.shape) != (b,):
            raise ValueError(f"lens shape {tuple(lens.shape)} != [B] = [{b}]")
        check_same_device(k=k, lens=lens)
        self._check_capacity(f"prefill of T={t} tokens", max(t - dense, 0))
        self.reset()
        lens = lens.clamp(0, t)
        if t > dense:
            n = (lens - dense).clamp_min(0)
            self._store(k[:, :, s:t - w], v[:, :, s:t - w], n)
        if min(t, dense) > 0:
            # dense slot j holds token j if j < sinks (a sink), else token lens[b] - fill[b] + j (the
            # recent window: a sequence with recent tokens has all its sinks); slots past fill[b]
            # are zeroed
            fill = lens.clamp_max(dense)
            slot = torch.arange(dense, device=k.device)
            src = (lens - fill).long()[:, None] + slot  # [B, S + W]
            if s:
                src = torch.where(slot < s, slot, src)
            valid = (slot < fill[:, None])[:, None, :, None]
            idx = src.clamp_max(t - 1)[:, None, :, None].expand(b, h, dense, d)
            zero = torch.zeros((), dtype=k.dtype, device=k.device)
            self.k_window.copy_(torch.where(valid, k.gather(2, idx), zero))
            self.v_window.copy_(torch.where(valid, v.gather(2, idx), zero))
            self.window_lens.copy_(fill)
        self._max_store = max(t - dense, 0)
        self._max_window = min(t, dense)

    def _flush(self) -> None:
        """Move the oldest min(recent, chunk) recent-window tokens of every sequence whose recent
        window holds more than window - chunk tokens to the store, and shift its remaining recent
        tokens down (the sinks, rows [0, sinks), never move): one launch (kernels/window_flush.py)."""
        if self._flush_launch is None:
            ws = self.k_window.stride()
            self._flush_args = (self.k_window, self.v_window, self.window_lens, self.seq_lens, self._flush_done) + tuple(
                t for p in (self.packed_k, self.packed_v) for t in (p.bitmap, self._value_bits(p.values)))
            self._flush_launch = self._shared_launch(
                _flush_kernel, ("k_window_ptr", "v_window_ptr", "window_lens_ptr", "seq_lens_ptr", "done_ptr",
                                "k_bitmap_ptr", "k_values_ptr", "v_bitmap_ptr", "v_values_ptr"),
                grid=(self.batch, self.num_kv_heads, 2),
                num_heads=self.num_kv_heads, max_tokens=self.max_tokens,
                k_keep=kept_per_token(self.head_dim, self.k_sparsity),
                v_keep=kept_per_token(self.head_dim, self.v_sparsity),
                stride_wb=ws[0], stride_wh=ws[1], stride_wt=ws[2],
                k_inv_value_scale=1.0 / self.packed_k.value_scale, v_inv_value_scale=1.0 / self.packed_v.value_scale,
                SINKS=self.sinks, WINDOW=self.window, CHUNK=self.chunk, HEAD_DIM=self.head_dim,
                K_CAPACITY=self.packed_k.capacity, V_CAPACITY=self.packed_v.capacity,
                MAG_BITS=31 if self.dtype == torch.float32 else 15, FP8_VALUES=self.value_dtype is not None,
                num_warps=4)
        self._flush_launch(current_raw_stream(self._device), *self._flush_args)
        self._max_store += self.chunk
        self._max_window = self.sinks + self.window - self.chunk

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add one decode token to every sequence. k_new, v_new: [B, Hkv, 1, D] (keys after RoPE).

        The token goes into the dense buffer at slot window_lens[b] (a sink while the sequence has
        fewer than `sinks` tokens, else the newest recent token); a flush runs first when the
        window could be full (see the module docstring). With window == 0 a token past the sinks
        is pruned + packed straight into the store. No host sync. Raises ValueError, leaving the
        cache unchanged, if the store could overflow.
        """
        shape, dtype, device = self._token_shape, self.dtype, self._device
        if not (isinstance(k_new, torch.Tensor) and isinstance(v_new, torch.Tensor) and k_new.shape == shape
                and v_new.shape == shape and k_new.dtype == dtype and v_new.dtype == dtype
                and k_new.device == device and v_new.device == device):  # the usual case in a few comparisons
            self._check_tokens("k_new", k_new, 1)
            self._check_tokens("v_new", v_new, 1)
        if self._static:
            raise ValueError("SparseKVCache.append after append_static: the host-side bounds append needs are "
                             "not kept by append_static; keep using append_static, or prefill / reset first")
        s, w = self.sinks, self.window
        if w == 0:
            self._append_without_window(k_new, v_new)
            return
        if self._max_window == s + w:
            self._check_capacity("append (window flush)", self._max_store + self.chunk)
            self._flush()
        self._append_launch(k_new, v_new)(current_raw_stream(self._device), k_new, v_new, self.k_window,
                                          self.v_window, self.window_lens)
        self._max_window += 1

    def _append_launch(self, k_new: torch.Tensor, v_new: torch.Tensor) -> CompiledLauncher:
        """append's kernel (kernels/window_append.py) with everything but the tensors bound, per
        layout of the new tokens (transformers hands over transposed views)."""
        key = (k_new.stride(), v_new.stride())
        launch = self._append_launches.get(key)
        if launch is None:
            heads, d = self.num_kv_heads, self.head_dim
            ks, vs, ws = k_new.stride(), v_new.stride(), self.k_window.stride()
            block = next_pow2(heads * d)
            launch = self._shared_launch(_append_token_kernel, (), stride_kb=ks[0], stride_kh=ks[1],
                                         stride_kd=ks[3], stride_vb=vs[0], stride_vh=vs[1], stride_vd=vs[3],
                                         stride_wb=ws[0], stride_wh=ws[1], stride_wt=ws[2],
                                         rows=self.k_window.shape[2], HEADS=heads, HEAD_DIM=d, BLOCK=block,
                                         num_warps=max(1, min(8, block // 256)))
            self._append_launches[key] = launch
        return launch

    def _shared_launch(self, kernel, fresh: tuple, grid: tuple | None = None, **constants) -> CompiledLauncher:
        """kernel's launch over the grid (default (batch,)) with these constants, shared by every
        cache of the same device and dtypes (a model's layers): only the first one's first call takes
        Triton's JIT path. What a launch takes per call (the cache's own buffers, append's new tokens
        of the strides in the constants) has the same shapes and dtypes in every such cache."""
        grid = grid or (self.batch,)
        key = (kernel, grid, fresh, self._device, self.dtype, self.value_dtype, tuple(sorted(constants.items())))
        launch = _shared_launches.get(key)
        if launch is None:
            launch = remember(_shared_launches, key, CompiledLauncher(kernel, grid, fresh, **constants),
                              _MAX_SHARED_LAUNCHES)
        return launch

    def _append_without_window(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """window == 0: a sequence with fewer than `sinks` tokens takes the token as a sink, every
        other sequence stores it pruned + packed."""
        s = self.sinks
        if s == 0:
            self._check_capacity("append", self._max_store + 1)
            self._store(k_new, v_new, torch.ones_like(self.seq_lens))
            self._max_store += 1
            return
        to_sink = self.window_lens < s  # [B]
        if self._max_window == s:  # some sequence may have all its sinks: it stores the token
            self._check_capacity("append", self._max_store + 1)
            self._store(k_new, v_new, (~to_sink).to(torch.int32))
            self._max_store += 1
        idx = self.window_lens.clamp_max(s - 1).long()[:, None, None, None].expand(k_new.shape)
        keep = to_sink[:, None, None, None]
        self.k_window.scatter_(2, idx, torch.where(keep, k_new, self.k_window.gather(2, idx)))
        self.v_window.scatter_(2, idx, torch.where(keep, v_new, self.v_window.gather(2, idx)))
        self.window_lens.add_(to_sink.to(torch.int32))
        self._max_window = min(self._max_window + 1, s)

    def append_static(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add one decode token to every sequence with a fixed sequence of device ops (no host read,
        no shape or Python-state change): torch.compile(fullgraph=True) and CUDA graphs can capture
        it. k_new, v_new: [B, Hkv, 1, D]. See "Static append" in the module docstring: a sink while
        the sequence has fewer than `sinks` tokens, else the ring's next row, storing the ring's
        oldest token first when the ring is full (window 0: the token itself is stored). A
        sequence whose store is full drops that token (counted in `dropped`). Raises ValueError
        unless max_tokens is a positive multiple of 16.
        """
        self._check_tokens("k_new", k_new, 1)
        self._check_tokens("v_new", v_new, 1)
        if self._pages is None:
            raise ValueError(f"SparseKVCache.append_static needs max_tokens a positive multiple of 16 (the store "
                             f"is written as pages of max_tokens tokens), got {self.max_tokens}")
        self._static = True
        s, w, t = self.sinks, self.window, self.max_tokens
        lens, store = self.window_lens, self.seq_lens
        sink = lens < s                                  # [B] the token is a sink
        to_store = ~sink if w == 0 else lens == s + w    # [B] a token moves to the store
        if s + w:   # the dense row the token goes to (window 0: a sink's, where(sink) below)
            row = torch.where(to_store, self.ring_start + s, lens) if w else lens.clamp_max(s - 1)
            idx = row.long()[:, None, None, None].expand(k_new.shape)
        room = to_store & (store < t)
        batch = torch.arange(self.batch, device=store.device)
        slot = torch.where(room, batch * t + store.long(), -1)  # -1: skipped by write_pages
        for pages, window, new, sparsity in ((self._pages[0], self.k_window, k_new, self.k_sparsity),
                                             (self._pages[1], self.v_window, v_new, self.v_sparsity)):
            leaving = new if w == 0 else window.gather(2, idx)   # [B, Hkv, 1, D]
            write_pages_op(pages, leaving[:, :, 0], slot, sparsity)
            if w:
                window.scatter_(2, idx, new)
            elif s:
                keep = sink[:, None, None, None]
                window.scatter_(2, idx, torch.where(keep, new, window.gather(2, idx)))
        store.add_(room.to(torch.int32))
        self.dropped.add_((to_store & ~room).to(torch.int32))
        if w:
            self.ring_start.copy_(torch.where(to_store, (self.ring_start + 1) % w, self.ring_start))
            lens.add_((~to_store).to(torch.int32))
        else:
            lens.add_(sink.to(torch.int32))

    def attend(self, q: torch.Tensor, softmax_scale: float | None = None, return_lse: bool = False,
               for_graph: bool = False):
        """Decode attention of q [B, Hq, D] over every cached token (store, sinks and window).

        GQA: query head h reads kv head h // (Hq // Hkv). softmax_scale default 1 / sqrt(D).
        Returns out [B, Hq, D] in the cache dtype, and lse [B, Hq] float32 if return_lse.
        The kernel's splits are sized on the host's bound of the stored length, so a cache
        allocated far beyond its contents still uses the whole GPU. A CUDA graph captured now
        would keep that bound; capture with for_graph=True, which sizes on max_tokens instead
        (as every call does after append_static, which keeps no host bound). q may also be
        [B, 1, Hq, D] (out [B, 1, Hq, D], lse [B, 1, Hq]): a transposed view of transformers'
        query, with no copy.

        The bound is rounded up (_bound_bucket: at most ~3% more tokens, masked), so a new launch
        is resolved every ~n/32 stored tokens rather than at every flush; the decode plan is kept
        while q's layout and softmax_scale stay the same (the cache's own buffers never change).
        """
        bound = self.max_tokens if for_graph or self._static else _bound_bucket(self._max_store, self.max_tokens)
        key = (_tensor_key(q), softmax_scale) if isinstance(q, torch.Tensor) else None
        window = self._window_args()
        plan = self._plan
        if key is None or key != self._plan_key:
            plan = plan_for(q, self.packed_k, self.packed_v, *window, softmax_scale, 0, self.exact_weights)
            if key is not None:
                self._plan, self._plan_key = plan, key
        return plan(q, self.packed_k, self.packed_v, *window, bound, return_lse)

    def _window_args(self) -> tuple:
        """k_window, v_window, window_lens as sparse_decode_attention takes them (None without
        sinks and window)."""
        if self.sinks + self.window == 0:
            return None, None, None
        return self.k_window, self.v_window, self.window_lens

    def window_kwargs(self) -> dict:
        """The dense buffer as sparse_decode_attention's k_window / v_window / window_lens (none
        without sinks and window)."""
        k_window, v_window, window_lens = self._window_args()
        return {} if k_window is None else dict(k_window=k_window, v_window=v_window, window_lens=window_lens)

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every device tensor of the cache (stores, dense buffers, lengths, append_static's ring
        start and drop counts): their addresses never change."""
        return (self.packed_k.bitmap, self.packed_k.values, self.packed_v.bitmap, self.packed_v.values,
                self.seq_lens, self.k_window, self.v_window, self.window_lens, self.ring_start, self.dropped)
