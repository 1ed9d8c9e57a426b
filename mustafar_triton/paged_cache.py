"""`PagedSparseKVCache`: one attention layer's paged compressed KV cache for continuous batching
(sequences join and finish at different times), with a dense window of recent tokens per sequence.

Conventions (those of format.PagedKV):
  * pools    K and V, each bitmap int32 [num_pages, Hkv, page_size, D/32] and values
             [num_pages, Hkv, page_size, capacity] (vLLM's head-major pages), allocated once;
  * tables   block_table int32 [max_seqs, max_pages_per_seq] (flash-attn's `block_table`: sequence
             slot s's compressed tokens [i * page_size, (i + 1) * page_size) live in page
             block_table[s, i]; unused entries -1) and seq_lens int32 [max_seqs] (flash-attn's
             `cache_seqlens`: compressed tokens per slot), one pair shared by K and V, persistent
             on the device;
  * writes   through compress.write_pages with vLLM's slot mapping (slot = page * page_size +
             offset);
  * window   k_window / v_window [max_seqs, Hkv, window, D] dense, valid rows [0, window_lens[s]),
             in time order: the newest token is the last valid row.

A sequence of n tokens holds its last min(n, window) tokens dense in its window and its first
max(n - window, 0) tokens pruned (top-k per token and kv head) and packed in its pages, in order.
`append` adds one token: while the window is full, its oldest token moves to the pages (one
write_pages launch per K / V for all sequences of the call) and the window shifts down by one; a
page is allocated only when a sequence's compressed length crosses a page boundary. Pages are
never copied or moved, and no buffer is reallocated.

Bookkeeping on the host, as serving engines keep it (Python ints and lists, no device reads; the
index tensors go to the GPU from pinned memory, without a sync): the free page list (a stack: a
finished sequence's pages are the next ones handed out), each slot's page list, each slot's
compressed and window lengths. The device tables follow through small
index writes. Running out of pages (RuntimeError), of sequence slots (RuntimeError) or of a
sequence's block-table row (ValueError) raises before any state changes. Forward only.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._runtime import cdiv, check_device, check_same_device
from .attention import sparse_decode_attention
from .cache import _check_count, value_scales
from .compress import _check_sparsity, write_pages
from .format import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, PagedKV, default_capacity


class PagedSparseKVCache:
    """Paged compressed K / V store plus a dense recent window, for sequences in slots
    [0, max_seqs) that join and finish at any step.

    Args:
        num_kv_heads, head_dim: Hkv, D (D in 32 / 64 / 96 / 128 / 256).
        num_pages, page_size: the pools (page_size a multiple of 16).
        max_seqs: sequence slots (rows of the block table).
        max_pages_per_seq: block-table columns: a sequence holds at most
            max_pages_per_seq * page_size compressed tokens plus its window.
        k_sparsity, v_sparsity: fraction of each token's channels pruned, in [0, 1).
        window: dense recent tokens per sequence (>= 0; 0: every token goes to the pages).
        dtype: fp16 / bf16 / fp32. device: a CUDA device, or the CPU under the interpreter.
        writer: the function that writes pages, with compress.write_pages' signature (default
            write_pages; reference.write_pages runs the same semantics in torch).
        value_dtype, value_scale: fp8 kept values in the pools, as in SparseKVCache.
        exact_weights: attend with sparse_decode_attention's exact_weights, as in SparseKVCache.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int, max_seqs: int,
                 max_pages_per_seq: int, k_sparsity: float, v_sparsity: float, window: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cuda",
                 writer: Callable[..., None] = write_pages, value_dtype: torch.dtype | None = None,
                 value_scale: float | tuple[float, float] = 1.0, exact_weights: bool = False):
        self.num_kv_heads = _check_count("num_kv_heads", num_kv_heads, 1)
        self.num_pages = _check_count("num_pages", num_pages, 1)
        self.page_size = _check_count("page_size", page_size, 16)
        if page_size % 16:
            raise ValueError(f"page_size must be a multiple of 16, got {page_size}")
        self.max_seqs = _check_count("max_seqs", max_seqs, 1)
        self.max_pages_per_seq = _check_count("max_pages_per_seq", max_pages_per_seq, 1)
        self.window = _check_count("window", window, 0)
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype {dtype} not in {SUPPORTED_DTYPES}")
        self.head_dim, self.dtype = head_dim, dtype
        self.k_sparsity = _check_sparsity(k_sparsity)
        self.v_sparsity = _check_sparsity(v_sparsity)
        scales = value_scales(value_dtype, value_scale)
        if not isinstance(exact_weights, bool):
            raise TypeError(f"exact_weights must be a bool, got {type(exact_weights).__name__}")
        self.exact_weights = exact_weights
        self._writer = writer

        self.block_table = torch.full((max_seqs, max_pages_per_seq), -1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)

        def pool(sparsity, scale):
            cap = default_capacity(head_dim, sparsity, value_dtype)
            lead = (num_pages, num_kv_heads, page_size)
            return PagedKV(torch.zeros(lead + (head_dim // 32,), dtype=torch.int32, device=device),
                           torch.zeros(lead + (cap,), dtype=value_dtype or dtype, device=device), cap, head_dim,
                           self.block_table, self.seq_lens, scale)

        self._paged_k, self._paged_v = pool(self.k_sparsity, scales[0]), pool(self.v_sparsity, scales[1])
        self.k_window = torch.zeros((max_seqs, num_kv_heads, window, head_dim), dtype=dtype, device=device)
        self.v_window = torch.zeros_like(self.k_window)
        self.window_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        check_device("PagedSparseKVCache buffers", self.k_window)

        self._free_pages = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out page 0 first
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}  # live slot -> its pages, in block-table order
        self._stored: dict[int, int] = {}       # live slot -> compressed tokens (= seq_lens[slot])
        self._windowed: dict[int, int] = {}     # live slot -> window tokens (= window_lens[slot])

    # -- views and counts ----------------------------------------------------------------------
    @property
    def paged_k(self) -> PagedKV:
        """The K pools under the persistent block_table / seq_lens (every slot; free ones are empty)."""
        return self._paged_k

    @property
    def paged_v(self) -> PagedKV:
        return self._paged_v

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def live_slots(self) -> list[int]:
        return sorted(self._pages)

    def pages_of(self, slot: int) -> list[int]:
        """The pages of a live sequence, in block-table order (a copy)."""
        return list(self._pages[self._live(slot)])

    def num_tokens(self, slot: int) -> int:
        """Tokens of a live sequence: compressed plus window."""
        return self._stored[self._live(slot)] + self._windowed[slot]

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer: both pools, the tables, both windows and window_lens."""
        pools = sum(t.numel() * t.element_size() for p in (self._paged_k, self._paged_v) for t in (p.bitmap, p.values))
        return (pools + self.block_table.numel() * 4 + self.seq_lens.numel() * 4
                + 2 * self.k_window.numel() * self.k_window.element_size() + self.window_lens.numel() * 4)

    # -- checks --------------------------------------------------------------------------------
    def _live(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"slot must be an int, got {type(slot).__name__}")
        if slot not in self._pages:
            raise ValueError(f"slot {slot} holds no sequence (live slots: {self.live_slots})")
        return slot

    def _check_tokens(self, name: str, x: torch.Tensor, shape: tuple, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} dtype {x.dtype} != cache dtype {self.dtype}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} must be {what}")
        check_same_device(cache=self.k_window, **{name: x})

    def _take_pages(self, count: int, what: str) -> list[int]:
        """`count` pages off the free stack; RuntimeError (nothing taken) if there are fewer."""
        if count > len(self._free_pages):
            raise RuntimeError(f"PagedSparseKVCache out of pages: {what} needs {count} new page(s), "
                               f"{len(self._free_pages)} of {self.num_pages} are free")
        return [self._free_pages.pop() for _ in range(count)]

    def _write(self, k_rows: torch.Tensor, v_rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Prune + pack k_rows / v_rows [N, Hkv, D] into the pools at vLLM slots (one launch each)."""
        if slot_mapping.numel():
            self._writer(self._paged_k, k_rows, slot_mapping, self.k_sparsity)
            self._writer(self._paged_v, v_rows, slot_mapping, self.v_sparsity)

    def _tensor(self, values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Host ints on the cache's device without a host sync: on a GPU from pinned memory,
        copied asynchronously (torch's pinned-memory cache keeps the buffer until the copy is done;
        a pageable copy would wait for the stream)."""
        if self.block_table.is_cuda:
            return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.block_table.device, non_blocking=True)
        return torch.tensor(values, dtype=dtype, device=self.block_table.device)

    def _set(self, table: torch.Tensor, index: list, values: list) -> None:
        """table[index] = values: a small index write from host lists."""
        if values:
            table[tuple(self._tensor(i) for i in index)] = self._tensor(values, table.dtype)

    # -- sequences -----------------------------------------------------------------------------
    def join(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Add a sequence from its prompt's keys and values k, v [Hkv, T, D] (keys after RoPE, T >= 0).
        Its last min(T, window) tokens stay dense in its window, the others are pruned and written
        into freshly allocated pages (one write_pages launch per K / V). Returns its slot.
        RuntimeError when no slot or too few pages are free, ValueError when the prompt needs more
        than max_pages_per_seq pages; nothing changes then."""
        h, d = self.num_kv_heads, self.head_dim
        t = k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 3 else None
        self._check_tokens("k", k, (h, t, d), f"[Hkv={h}, T, D={d}]")
        self._check_tokens("v", v, (h, t, d), f"k's [Hkv={h}, T={t}, D={d}]")
        stored = max(t - self.window, 0)
        n_pages = cdiv(stored, self.page_size)
        if n_pages > self.max_pages_per_seq:
            raise ValueError(f"a prompt of {t} tokens stores {stored} (window {self.window}): {n_pages} pages, "
                             f"more than max_pages_per_seq={self.max_pages_per_seq} (page_size {self.page_size})")
        if not self._free_slots:
            raise RuntimeError(f"PagedSparseKVCache out of sequence slots: all max_seqs={self.max_seqs} are live")
        pages = self._take_pages(n_pages, f"a prompt of {t} tokens")
        slot = self._free_slots.pop()
        self._pages[slot], self._stored[slot], self._windowed[slot] = pages, stored, t - stored

        pos = torch.arange(stored, device=k.device)
        slot_mapping = self._tensor(pages)[pos // self.page_size] * self.page_size + pos % self.page_size
        self._write(k[:, :stored].transpose(0, 1), v[:, :stored].transpose(0, 1), slot_mapping)
        w = t - stored
        self.k_window[slot, :, :w] = k[:, stored:]
        self.v_window[slot, :, :w] = v[:, stored:]
        self._set(self.block_table, ([slot] * n_pages, list(range(n_pages))), pages)
        self._set(self.seq_lens, ([slot],), [stored])
        self._set(self.window_lens, ([slot],), [w])
        return slot

    def append(self, slots: Sequence[int], k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add one token to each listed live sequence: k_new, v_new [n, Hkv, D], row i for slots[i]
        (distinct Python ints). A sequence whose window is full moves its oldest window token to its pages
        (with window == 0: the new token itself), allocating a page only when it crosses a page
        boundary; all moved tokens of the call are written by one write_pages launch per K / V.
        RuntimeError when too few pages are free, ValueError when a sequence would need more than
        max_pages_per_seq pages; nothing changes then."""
        slots = [self._live(s) for s in slots]
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, got {slots}")
        n, h, d = len(slots), self.num_kv_heads, self.head_dim
        self._check_tokens("k_new", k_new, (n, h, d), f"[n={n}, Hkv={h}, D={d}] for {n} slot(s)")
        self._check_tokens("v_new", v_new, (n, h, d), f"[n={n}, Hkv={h}, D={d}] for {n} slot(s)")
        w, ps = self.window, self.page_size
        moving = [i for i, s in enumerate(slots) if self._windowed[s] == w]  # rows whose oldest token moves
        crossing = [slots[i] for i in moving if self._stored[slots[i]] % ps == 0]
        for s in crossing:
            if self._stored[s] // ps >= self.max_pages_per_seq:
                raise ValueError(f"sequence in slot {s} is full: {self._stored[s]} compressed tokens fill its "
                                 f"max_pages_per_seq={self.max_pages_per_seq} pages of {ps}")
        new_pages = self._take_pages(len(crossing), f"append to {n} sequence(s)")

        table_idx, table_pages = ([], []), []
        for s, p in zip(crossing, new_pages):
            table_idx[0].append(s)
            table_idx[1].append(len(self._pages[s]))
            table_pages.append(p)
            self._pages[s].append(p)
        write_slots = []
        for i in moving:
            s = slots[i]
            write_slots.append(self._pages[s][self._stored[s] // ps] * ps + self._stored[s] % ps)
            self._stored[s] += 1
        if w == 0:
            self._write(k_new, v_new, self._tensor(write_slots))
        elif moving:
            # full windows: the oldest token to the pages, the rest shift down, the new token last
            seq, rows = self._tensor([slots[i] for i in moving]), self._tensor(moving)
            self._write(self.k_window[seq, :, 0], self.v_window[seq, :, 0], self._tensor(write_slots))
            for win, new in ((self.k_window, k_new), (self.v_window, v_new)):
                win[seq] = torch.cat([win[seq, :, 1:], new[rows, :, None]], dim=2)
        rest = [i for i, s in enumerate(slots) if self._windowed[s] < w]
        if rest:  # windows with room: the new token after their last one
            seq, rows = self._tensor([slots[i] for i in rest]), self._tensor(rest)
            pos = self._tensor([self._windowed[slots[i]] for i in rest])
            self.k_window[seq, :, pos] = k_new[rows]
            self.v_window[seq, :, pos] = v_new[rows]
            for i in rest:
                self._windowed[slots[i]] += 1
        self._set(self.block_table, table_idx, table_pages)
        self._set(self.seq_lens, ([slots[i] for i in moving],), [self._stored[slots[i]] for i in moving])
        self._set(self.window_lens, (slots,), [self._windowed[s] for s in slots])

    def finish(self, slot: int) -> None:
        """End a sequence: its pages go back to the free list (the next ones handed out), its slot
        is free, its table row is reset (-1, lengths 0)."""
        self._live(slot)
        self._free_pages.extend(reversed(self._pages.pop(slot)))
        del self._stored[slot], self._windowed[slot]
        self._free_slots.append(slot)
        self.block_table[slot] = -1
        self.seq_lens[slot] = 0
        self.window_lens[slot] = 0

    # -- attention -----------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, slots: Sequence[int] | None = None, softmax_scale: float | None = None,
               return_lse: bool = False):
        """Decode attention of q over its sequences' pages and windows: q [max_seqs, Hq, D] for
        every slot (free slots: out 0, lse -inf), or [len(slots), Hq, D] for the listed live slots
        (their table rows and windows are gathered first). q [B, Lq, Hq, D] as in
        sparse_decode_attention: the window's last Lq tokens are the queries' own. GQA: query head
        h reads kv head h // (Hq // Hkv). Returns out like q, and lse float32 if return_lse."""
        paged_k, paged_v, k_win, v_win, win_lens = self._paged_k, self._paged_v, self.k_window, self.v_window, \
            self.window_lens
        stored = self._stored.values()
        if slots is not None:
            slots = [self._live(s) for s in slots]
            idx = self._tensor(slots)
            table, lens = self.block_table[idx], self.seq_lens[idx]
            paged_k, paged_v = paged_k.with_tables(table, lens), paged_v.with_tables(table, lens)
            k_win, v_win, win_lens = k_win[idx], v_win[idx], win_lens[idx]
            stored = [self._stored[s] for s in slots]
        window = dict(k_window=k_win, v_window=v_win, window_lens=win_lens) if self.window else {}
        return sparse_decode_attention(q, paged_k, paged_v, softmax_scale=softmax_scale, return_lse=return_lse,
                                       max_seq_len=max(stored, default=0), exact_weights=self.exact_weights, **window)
