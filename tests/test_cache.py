"""SparseKVCache against a dense model of the same cache.

`DenseModel` keeps every token dense in Python lists, one per sequence, and applies the flush
policy of the SparseKVCache docstring on the host. After every step the cache state must equal
the model exactly (lengths, window tokens bit for bit, the store equal to reference.prune_topk of
the model's store tokens, all-zero rows past seq_lens); attend() is compared with a float64
attention over [pruned store tokens | window tokens] built from the model alone.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mustafar_triton as mt
from mustafar_triton import reference as ref
from conftest import INTERPRETING
from mt_testutils import bit_equal, randn, rel_err, rounded_as_kernels_round, seed_of

SK, SV = 0.7, 0.5
HQ, HKV, D = 4, 2, 64
# rel. error floors of attend() vs float64 (the interpreter's dots are exact fp32; GPU fp32 is tf32)
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5 if INTERPRETING else 3e-3}


class DenseModel:
    """Host model of a SparseKVCache: dense [Hkv, D] tokens per sequence, store and window lists
    (the window list holds the sinks first, then the recent window, as the cache's dense rows)."""

    def __init__(self, batch, window, chunk, sinks=0):
        self.window, self.chunk, self.sinks = window, chunk, sinks
        self.store_k = [[] for _ in range(batch)]
        self.store_v = [[] for _ in range(batch)]
        self.win_k = [[] for _ in range(batch)]
        self.win_v = [[] for _ in range(batch)]
        self.history = [[] for _ in range(batch)]  # every (k, v) token of the sequence, in order
        self.max_window = 0  # the cache's host bound on the dense fill (sinks + recent)

    def prefill(self, k, v, lens):
        w, s = self.window, self.sinks
        t = k.shape[2]
        for b, n in enumerate(lens):
            sink = min(n, s)
            split = max(n - w, sink)
            self.store_k[b] = [k[b, :, i] for i in range(sink, split)]
            self.store_v[b] = [v[b, :, i] for i in range(sink, split)]
            self.win_k[b] = [k[b, :, i] for i in [*range(sink), *range(split, n)]]
            self.win_v[b] = [v[b, :, i] for i in [*range(sink), *range(split, n)]]
            self.history[b] = [(k[b, :, i], v[b, :, i]) for i in range(n)]
        self.max_window = min(t, s + w)

    def append(self, k_new, v_new):
        w, c, s = self.window, self.chunk, self.sinks
        for b in range(len(self.win_k)):
            self.history[b].append((k_new[b, :, 0], v_new[b, :, 0]))
            if w == 0 and len(self.win_k[b]) >= s:
                self.store_k[b].append(k_new[b, :, 0])
                self.store_v[b].append(v_new[b, :, 0])
                continue
            recent = len(self.win_k[b]) - s
            if w > 0 and self.max_window == s + w and recent > w - c:
                n = min(recent, c)
                self.store_k[b] += self.win_k[b][s:s + n]
                self.store_v[b] += self.win_v[b][s:s + n]
                del self.win_k[b][s:s + n], self.win_v[b][s:s + n]
            self.win_k[b].append(k_new[b, :, 0])
            self.win_v[b].append(v_new[b, :, 0])
        if w > 0:
            self.max_window = (s + w - c if self.max_window == s + w else self.max_window) + 1
        else:
            self.max_window = min(self.max_window + 1, s)

    def seq_lens(self):
        return [len(s) for s in self.store_k]

    def window_lens(self):
        return [len(s) for s in self.win_k]

    def attention64(self, q):
        """float64 attention of q [B, Hq, D] over each sequence's [pruned store | window] tokens."""
        out = torch.zeros(q.shape, dtype=torch.float64)
        group = q.shape[1] // HKV
        for b in range(q.shape[0]):
            parts = []
            for store, win, s in ((self.store_k[b], self.win_k[b], SK), (self.store_v[b], self.win_v[b], SV)):
                pruned = ref.prune_topk(torch.stack(store, 1), s) if store else q.new_empty(HKV, 0, D)
                dense = torch.stack(win, 1) if win else q.new_empty(HKV, 0, D)
                parts.append(torch.cat([pruned, dense], 1).cpu().double().repeat_interleave(group, 0))
            k, v = parts
            if k.shape[1] == 0:
                continue
            scores = torch.einsum("hd,htd->ht", q[b].cpu().double(), k) / math.sqrt(D)
            out[b] = torch.einsum("ht,htd->hd", scores.softmax(-1), v)
        return out


def tokens(b, t, dtype, seed, device):
    return randn((b, HKV, t, D), dtype, seed, device), randn((b, HKV, t, D), dtype, seed + 1, device)


def check_state(cache, model):
    """Lengths, window tokens and store rows equal the model's, bit for bit."""
    assert cache.seq_lens.tolist() == model.seq_lens()
    assert cache.window_lens.tolist() == model.window_lens()
    assert max(model.window_lens(), default=0) <= cache.sinks + cache.window
    store_k, store_v = ref.unpack(cache.packed_k), ref.unpack(cache.packed_v)
    for b, (n, w) in enumerate(zip(model.seq_lens(), model.window_lens())):
        for dense, got, s in ((model.store_k[b], store_k[b], SK), (model.store_v[b], store_v[b], SV)):
            if n:
                assert bit_equal(got[:, :n], ref.prune_topk(torch.stack(dense, 1), s))
        for dense, got in ((model.win_k[b], cache.k_window[b]), (model.win_v[b], cache.v_window[b])):
            if w:
                assert bit_equal(got[:, :w], torch.stack(dense, 1))
        for p in (cache.packed_k, cache.packed_v):  # the store stays zero past seq_lens
            assert not p.bitmap[b, :, n:].any() and not p.values[b, :, n:].any()
    assert not cache._flush_done.any()  # the flush kernel's last program of each sequence reset its count


def check_attend(cache, model, seed, device):
    q = randn((cache.batch, HQ, D), cache.dtype, seed, device)
    out, lse = cache.attend(q, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (cache.batch, HQ)
    assert not out.isnan().any()
    assert rel_err(out.cpu(), model.attention64(q)) <= TOL[cache.dtype]


def make(device, b=2, max_tokens=48, window=8, chunk=None, dtype=torch.float16, sinks=0):
    kw = dict(sinks=sinks) if sinks else {}  # sinks=0 also through the default
    cache = mt.SparseKVCache(b, HKV, D, max_tokens, window, SK, SV, dtype=dtype, device=device, chunk=chunk, **kw)
    return cache, DenseModel(b, window, cache.chunk, sinks)


def run_steps(cache, model, device, n_appends, seed, attend_every=None):
    """n_appends decode steps, state checked after each, attend() every attend_every steps."""
    for i in range(n_appends):
        k_new, v_new = tokens(cache.batch, 1, cache.dtype, seed + 10 * i, device)
        cache.append(k_new, v_new)
        model.append(k_new, v_new)
        check_state(cache, model)
        if attend_every and (i + 1) % attend_every == 0:
            check_attend(cache, model, seed + 10 * i + 5, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_prefill_and_appends_across_flushes(dtype, device):
    """B=2, T=20, window 8, chunk 4: 14 appends cross four flushes."""
    seed = seed_of("flushes", dtype)
    cache, model = make(device, dtype=dtype)
    k, v = tokens(2, 20, dtype, seed, device)
    cache.prefill(k, v)
    model.prefill(k, v, [20, 20])
    check_state(cache, model)
    check_attend(cache, model, seed + 2, device)
    run_steps(cache, model, device, 14, seed + 3, attend_every=7)


@pytest.mark.parametrize("layout", ["heads_innermost", "strided_channels"])
def test_append_writes_only_the_new_rows(layout, device):
    """append's kernel (kernels/window_append.py) with the new tokens as views, as transformers
    hands them over: permuted (the heads innermost), or channels 2 elements apart. Each sequence's
    row window_lens[b] gets its token bit for bit, window_lens grows by 1, every other row (filled
    or not, poisoned beforehand) keeps its bits; ragged fills (no flush), 3 kv heads."""
    b, hkv, d, seed = 3, 3, 32, seed_of("append_rows", layout)
    cache = mt.SparseKVCache(b, hkv, d, 16, 10, SK, SV, device=device)
    k = randn((b, hkv, 9, d), torch.float16, seed, device)
    cache.prefill(k, -k, torch.tensor([9, 2, 0], dtype=torch.int32, device=device))
    lens = cache.window_lens.clone()
    rows = torch.arange(cache.window, device=device)[None, :] >= lens[:, None]  # [B, rows] unfilled
    poison = torch.full((), -7.5, dtype=torch.float16, device=device)
    cache.k_window.copy_(torch.where(rows[:, None, :, None], poison, cache.k_window))
    cache.v_window.copy_(torch.where(rows[:, None, :, None], -poison, cache.v_window))
    k_before, v_before = cache.k_window.clone(), cache.v_window.clone()
    if layout == "heads_innermost":
        k_new = randn((b, 1, d, hkv), torch.float16, seed + 1, device).permute(0, 3, 1, 2)
        v_new = randn((b, 1, d, hkv), torch.float16, seed + 2, device).permute(0, 3, 1, 2)
    else:
        k_new = randn((b, hkv, 1, 2 * d), torch.float16, seed + 1, device)[..., ::2]
        v_new = randn((b, hkv, 1, 2 * d), torch.float16, seed + 2, device)[..., ::2]
    assert not k_new.is_contiguous() and not v_new.is_contiguous()
    cache.append(k_new, v_new)
    assert cache.window_lens.tolist() == (lens + 1).tolist()
    new_row = torch.arange(cache.window, device=device)[None, :] == lens[:, None]  # [B, rows]
    for got, before, new in ((cache.k_window, k_before, k_new), (cache.v_window, v_before, v_new)):
        want = torch.where(new_row[:, None, :, None], new.expand_as(before), before)
        assert bit_equal(got, want)


def test_append_into_a_full_window_writes_nothing(device):
    """If the host bound that triggers flushes were wrong (forced here: _max_window reset), a full
    window meets append's kernel: it must leave the window and its length alone, not write past
    the buffer's end (the interpreter's bounds guard would raise; on a GPU, memcheck)."""
    cache = mt.SparseKVCache(2, HKV, D, 16, 4, SK, SV, device=device)
    k = randn((2, HKV, 4, D), torch.float16, seed_of("full_window"), device)
    cache.prefill(k, -k, torch.tensor([4, 2], dtype=torch.int32, device=device))
    cache._max_window = 0  # the broken invariant: no flush before this append
    k_before, v_before = cache.k_window.clone(), cache.v_window.clone()
    k_new, v_new = tokens(2, 1, torch.float16, seed_of("full_window") + 1, device)
    cache.append(k_new, v_new)
    assert cache.window_lens.tolist() == [4, 3]  # the full sequence unchanged, the other appended
    assert bit_equal(cache.k_window[0], k_before[0]) and bit_equal(cache.v_window[0], v_before[0])
    assert bit_equal(cache.k_window[1, :, 2], k_new[1, :, 0]) and bit_equal(cache.v_window[1, :, 2], v_new[1, :, 0])


def test_uniform_batch_flushes_when_full(device):
    """Without lens every window is compressed exactly when full: fills 8 -> 5, 6, 7, 8 -> 5."""
    cache, _ = make(device, b=3, window=8, chunk=3)
    k, v = tokens(3, 11, torch.float16, 1, device)
    cache.prefill(k, v)
    fills, stored = [], []
    for i in range(8):
        cache.append(*tokens(3, 1, torch.float16, 100 + i, device))
        fills.append(cache.window_lens.tolist())
        stored.append(cache.seq_lens.tolist())
    assert [f[0] for f in fills] == [6, 7, 8, 6, 7, 8, 6, 7]
    assert [s[0] for s in stored] == [6, 6, 6, 9, 9, 9, 12, 12]
    assert all(len(set(f)) == 1 for f in fills + stored)


def test_flush_stores_nan_and_inf_as_prune_and_pack_does(device):
    """NaN / inf window tokens moved to the store by a flush (kernels/window_flush.py) are stored
    bit for bit as prune_and_pack stores them (kept first), and only the heads that attend a NaN key
    come out NaN."""
    b, h, w, c = 2, 2, 8, 4
    k = randn((b, h, w, D), torch.float16, seed_of("flush-nan", 1), device)
    v = randn((b, h, w, D), torch.float16, seed_of("flush-nan", 2), device)
    k[1, 0, 2, 5], k[1, 1, 1, 7], v[1, 0, 3, 9] = float("nan"), float("inf"), float("-inf")
    cache = mt.SparseKVCache(b, h, D, 16, w, SK, SV, dtype=torch.float16, device=device, chunk=c)
    cache.prefill(k, v)  # the whole prompt in the window: the next append flushes its oldest c tokens
    cache.append(randn((b, h, 1, D), torch.float16, seed_of("flush-nan", 3), device),
                 randn((b, h, 1, D), torch.float16, seed_of("flush-nan", 4), device))
    assert cache.seq_lens.tolist() == [c, c] and cache.window_lens.tolist() == [w - c + 1] * b
    for stored, x, sparsity in ((cache.packed_k, k, SK), (cache.packed_v, v, SV)):
        want = mt.prune_and_pack(x[:, :, :c], sparsity)
        assert bit_equal(stored.bitmap[:, :, :c], want.bitmap) and bit_equal(stored.values[:, :, :c], want.values)
        assert not stored.bitmap[:, :, c:].any() and not stored.values[:, :, c:].any()
    assert bit_equal(cache.k_window[:, :, :w - c], k[:, :, c:])
    out = cache.attend(randn((b, HQ, D), torch.float16, seed_of("flush-nan", 5), device))
    group = HQ // h
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1, :group]).all()


def test_attend_with_exact_weights(device):
    """SparseKVCache(exact_weights=True) attends with sparse_decode_attention's exact_weights: bf16
    outputs are the float64 result (on the same pruned data) rounded to bf16 almost everywhere,
    where on a GPU the default cache's are not (test_decode's rounding test; the interpreter
    computes in fp32 and truncates to bf16)."""
    b, hkv, hq, d, t = 2, 2, 8, 128, 200
    caches = [mt.SparseKVCache(b, hkv, d, 256, 16, 0.7, 0.5, dtype=torch.bfloat16, device=device, exact_weights=e)
              for e in (False, True)]
    seed = seed_of("exact weights")
    k, v = randn((b, hkv, t, d), torch.bfloat16, seed, device), randn((b, hkv, t, d), torch.bfloat16, seed + 1, device)
    q = randn((b, hq, d), torch.bfloat16, seed + 2, device, scale=3.0)
    for cache in caches:
        cache.prefill(k, v, torch.tensor([t, 131], dtype=torch.int32, device=device))
    exact = ref.sparse_decode_attention(q.double(), caches[1].packed_k, caches[1].packed_v, **caches[1].window_kwargs())
    want = rounded_as_kernels_round(exact, torch.bfloat16, INTERPRETING)
    assert (caches[1].attend(q) != want).float().mean() < 0.02
    if not INTERPRETING:
        assert (caches[0].attend(q) != want).float().mean() > 0.1


def test_caches_of_one_layout_share_their_launches(device):
    """A model's layers (caches of one shape, dtype and device) share append's and the flush's
    launches, so only the first layer's first call of each goes through Triton's JIT; a cache of
    another dtype, or another window, gets its own."""
    def stepped(dtype=torch.float16, window=4):
        cache = mt.SparseKVCache(2, HKV, D, 16, window, SK, SV, dtype=dtype, device=device, chunk=2)
        for i in range(window + 1):  # the last append flushes
            cache.append(*(randn((2, HKV, 1, D), dtype, seed_of("shared", i, j), device) for j in range(2)))
        return cache

    first, second, other_dtype, other_window = stepped(), stepped(), stepped(torch.bfloat16), stepped(window=6)
    assert second._flush_launch is first._flush_launch
    assert list(second._append_launches.values()) == list(first._append_launches.values())
    for other in (other_dtype, other_window):
        assert other._flush_launch is not first._flush_launch
        assert set(map(id, other._append_launches.values())).isdisjoint(map(id, first._append_launches.values()))


def test_ragged_prefill(device):
    """lens 0, 3 (< window), 8 (== window), 20: windows fill at different steps."""
    seed = seed_of("ragged")
    cache, model = make(device, b=4)
    k, v = tokens(4, 20, torch.float16, seed, device)
    lens = [0, 3, 8, 20]
    cache.prefill(k, v, torch.tensor(lens, dtype=torch.int32, device=device))
    model.prefill(k, v, lens)
    check_state(cache, model)
    check_attend(cache, model, seed + 2, device)
    run_steps(cache, model, device, 10, seed + 3, attend_every=5)


def test_prefill_lens_are_clamped_and_short_prompt(device):
    """lens past T count as T; a prompt shorter than the window leaves the store empty."""
    cache, model = make(device)
    k, v = tokens(2, 5, torch.float16, 7, device)
    cache.prefill(k, v, torch.tensor([9, -1], dtype=torch.int32, device=device))
    model.prefill(k, v, [5, 0])
    check_state(cache, model)
    run_steps(cache, model, device, 4, 8)


def test_appends_without_prefill(device):
    """A fresh cache is empty (attend gives 0 and lse -inf); appends alone fill it."""
    cache, model = make(device, window=4, chunk=2)
    q = randn((2, HQ, D), torch.float16, 3, device)
    out, lse = cache.attend(q, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    run_steps(cache, model, device, 9, 4, attend_every=9)


@pytest.mark.parametrize("window,chunk", [(0, None), (1, None), (5, 5), (5, 1), (6, 3)],
                         ids=["w0", "w1", "w5-c5", "w5-c1", "w6-c3"])
def test_window_and_chunk_edge_cases(window, chunk, device):
    """window 0 (every token compressed at once), window 1, whole-window and one-token flushes."""
    seed = seed_of("edges", window, chunk)
    cache, model = make(device, window=window, chunk=chunk, max_tokens=24)
    k, v = tokens(2, 9, torch.float16, seed, device)
    lens = [9, 4]
    cache.prefill(k, v, torch.tensor(lens, dtype=torch.int32, device=device))
    model.prefill(k, v, lens)
    check_state(cache, model)
    run_steps(cache, model, device, 8, seed + 3, attend_every=8)


def test_second_prefill_replaces_contents(device):
    cache, model = make(device)
    cache.prefill(*tokens(2, 30, torch.float16, 1, device))
    for i in range(5):
        cache.append(*tokens(2, 1, torch.float16, 10 + i, device))
    k, v = tokens(2, 12, torch.float16, 2, device)
    cache.prefill(k, v, torch.tensor([12, 2], dtype=torch.int32, device=device))
    model.prefill(k, v, [12, 2])
    check_state(cache, model)
    check_attend(cache, model, 3, device)


def test_prefill_overflow(device):
    cache, _ = make(device, max_tokens=10, window=4)
    cache.prefill(*tokens(2, 14, torch.float16, 1, device))  # 10 compressed + 4 dense: fits
    assert cache.seq_lens.tolist() == [10, 10]
    with pytest.raises(ValueError, match="overflow.*max_tokens=10"):
        cache.prefill(*tokens(2, 15, torch.float16, 1, device))


@pytest.mark.parametrize("window", [0, 4])
def test_append_overflow_leaves_cache_unchanged(window, device):
    """Capacity is max_tokens + window tokens; the append that could overflow raises first."""
    cache, model = make(device, max_tokens=6, window=window, chunk=2 if window else None)
    k, v = tokens(2, 3, torch.float16, 1, device)
    cache.prefill(k, v, torch.tensor([3, 1], dtype=torch.int32, device=device))
    model.prefill(k, v, [3, 1])
    steps = 6 + window - 3  # the longest sequence fills the cache exactly
    for i in range(steps):
        k_new, v_new = tokens(2, 1, torch.float16, 10 + i, device)
        cache.append(k_new, v_new)
        model.append(k_new, v_new)
    check_state(cache, model)
    before = [t.clone() for t in (cache.packed_k.values, cache.packed_v.values, cache.k_window,
                                  cache.seq_lens, cache.window_lens)]
    with pytest.raises(ValueError, match="overflow"):
        cache.append(*tokens(2, 1, torch.float16, 99, device))
    after = (cache.packed_k.values, cache.packed_v.values, cache.k_window, cache.seq_lens, cache.window_lens)
    assert all(bit_equal(a, b) for a, b in zip(before, after))


def test_nbytes(device):
    cache, _ = make(device, b=2, max_tokens=10, window=4)
    k_row = D // 8 + mt.default_capacity(D, SK) * 2
    v_row = D // 8 + mt.default_capacity(D, SV) * 2
    want = 2 * HKV * 10 * (k_row + v_row) + 2 * 4 + 2 * (2 * HKV * 4 * D * 2) + 2 * 4
    assert cache.nbytes == want


def test_validation(device):
    cache, _ = make(device)
    k, v = tokens(2, 4, torch.float16, 0, device)
    with pytest.raises(ValueError, match="window must be >= 0"):
        mt.SparseKVCache(2, HKV, D, 8, -1, SK, SV, device=device)
    with pytest.raises(ValueError, match="chunk must be in"):
        mt.SparseKVCache(2, HKV, D, 8, 4, SK, SV, device=device, chunk=5)
    with pytest.raises(ValueError, match="head_dim"):
        mt.SparseKVCache(2, HKV, 48, 8, 4, SK, SV, device=device)
    with pytest.raises(ValueError, match="sparsity"):
        mt.SparseKVCache(2, HKV, D, 8, 4, 1.0, SV, device=device)
    with pytest.raises(TypeError, match="dtype"):
        cache.prefill(k.float(), v.float())
    with pytest.raises(ValueError, match="shape"):
        cache.prefill(k[:1], v[:1])
    with pytest.raises(ValueError, match="shape"):
        cache.prefill(k, v[:, :, :3])
    with pytest.raises(TypeError, match="lens must be an int32"):
        cache.prefill(k, v, torch.tensor([4, 4], device=device))
    with pytest.raises(ValueError, match="lens shape"):
        cache.prefill(k, v, torch.tensor([4], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="shape"):
        cache.append(k, v)  # 4 tokens, not 1


# ------------------------------------------------------------------------------------------------
# attention sinks: the first `sinks` tokens of every sequence stay dense
# ------------------------------------------------------------------------------------------------
def history_attention64(cache, model, q, sinks):
    """float64 attention of q over each sequence's whole history, built without the model's lists:
    tokens [0, sinks) dense, the next seq_lens[b] tokens pruned, every later token dense."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // HKV
    for b, (hist, n) in enumerate(zip(model.history, cache.seq_lens.tolist())):
        if not hist:
            continue
        kv = []
        for i, s in ((0, SK), (1, SV)):
            x = torch.stack([t[i] for t in hist], 1)  # [Hkv, L, D]
            first = min(sinks, x.shape[1])
            pruned = ref.prune_topk(x[:, first:first + n], s) if n else x[:, :0]
            kv.append(torch.cat([x[:, :first], pruned, x[:, first + n:]], 1).cpu().double()
                      .repeat_interleave(group, 0))
        scores = torch.einsum("hd,htd->ht", q[b].cpu().double(), kv[0]) / math.sqrt(D)
        out[b] = torch.einsum("ht,htd->hd", scores.softmax(-1), kv[1])
    return out


def check_sinks(cache, model, seed, device):
    """State as the model; every sequence's first min(L, sinks) tokens are its dense rows
    [0, sinks); attend() equals the float64 history reference."""
    check_state(cache, model)
    s = cache.sinks
    for b, hist in enumerate(model.history):
        first = min(s, len(hist))
        assert cache.window_lens[b].item() >= first
        assert cache.seq_lens[b].item() == 0 or first == s, "the store fills only after the sinks"
        for i in range(first):
            assert bit_equal(cache.k_window[b, :, i], hist[i][0]) and bit_equal(cache.v_window[b, :, i], hist[i][1])
    q = randn((cache.batch, HQ, D), cache.dtype, seed, device)
    out = cache.attend(q)
    assert rel_err(out.cpu(), history_attention64(cache, model, q, s)) <= TOL[cache.dtype]


def test_sinks_zero_is_the_cache_without_sinks(device):
    """sinks=0 given explicitly: the same state and the same attend() output, bit for bit, as the
    default cache (the other tests run the default through the model of the sinkless policy)."""
    k, v = tokens(3, 21, torch.float16, 11, device)
    lens = torch.tensor([21, 9, 0], dtype=torch.int32, device=device)
    caches = [mt.SparseKVCache(3, HKV, D, 48, 8, SK, SV, device=device, chunk=3, **kw) for kw in ({}, dict(sinks=0))]
    q = randn((3, HQ, D), torch.float16, 12, device)
    for c in caches:
        c.prefill(k, v, lens)
        for i in range(7):
            c.append(*tokens(3, 1, torch.float16, 20 + i, device))
    a, b = caches
    assert b.k_window.shape == a.k_window.shape and b.nbytes == a.nbytes
    for x, y in ((a.packed_k.bitmap, b.packed_k.bitmap), (a.packed_k.values, b.packed_k.values),
                 (a.packed_v.values, b.packed_v.values), (a.k_window, b.k_window), (a.v_window, b.v_window),
                 (a.seq_lens, b.seq_lens), (a.window_lens, b.window_lens), (a.attend(q), b.attend(q))):
        assert bit_equal(x, y)


@pytest.mark.parametrize("sinks,window,chunk", [(1, 8, None), (4, 8, 3), (4, 0, None), (6, 3, 1), (3, 1, None)],
                         ids=["s1-w8", "s4-w8-c3", "s4-w0", "s6-w3-c1", "s3-w1"])
def test_sinks_ragged_prefill_and_appends(sinks, window, chunk, device):
    """Ragged lens: empty, shorter than the sinks, sinks only, sinks + part of the window, long;
    appends fill short sequences' sinks, then cross flushes that never move a sink."""
    seed = seed_of("sinks", sinks, window, chunk)
    cache, model = make(device, b=5, window=window, chunk=chunk, sinks=sinks, max_tokens=40)
    assert cache.k_window.shape[2] == sinks + window
    k, v = tokens(5, 20, torch.float16, seed, device)
    lens = [0, sinks - 1, sinks, sinks + max(window // 2, 1), 20]
    cache.prefill(k, v, torch.tensor(lens, dtype=torch.int32, device=device))
    model.prefill(k, v, lens)
    check_sinks(cache, model, seed + 1, device)
    for i in range(14):  # the empty sequence holds 14 > sinks + window tokens at the end
        k_new, v_new = tokens(5, 1, torch.float16, seed + 10 * i + 2, device)
        cache.append(k_new, v_new)
        model.append(k_new, v_new)
        check_state(cache, model)
        if i % 5 == 4 or i == 13:
            check_sinks(cache, model, seed + 10 * i + 3, device)
    assert min(model.seq_lens()) > 0, "every sequence reached the store"


def test_sinks_longer_than_every_sequence(device):
    """sinks > T: the prompt is all sinks, the store stays empty until a sequence passes `sinks`."""
    cache, model = make(device, b=2, window=2, chunk=1, sinks=6, max_tokens=8)
    k, v = tokens(2, 3, torch.float16, 5, device)
    cache.prefill(k, v, torch.tensor([3, 1], dtype=torch.int32, device=device))
    model.prefill(k, v, [3, 1])
    assert cache.seq_lens.tolist() == [0, 0] and cache.window_lens.tolist() == [3, 1]
    check_sinks(cache, model, 6, device)
    run_steps(cache, model, device, 7, 7)
    assert cache.seq_lens.tolist() == [2, 0] and cache.window_lens.tolist() == [8, 8]
    check_sinks(cache, model, 8, device)


def test_sinks_capacity_and_nbytes(device):
    """A sequence holds max_tokens + sinks + window tokens; the sinks are dense rows in nbytes."""
    cache, model = make(device, max_tokens=5, window=4, chunk=2, sinks=3)
    k_row = D // 8 + mt.default_capacity(D, SK) * 2
    v_row = D // 8 + mt.default_capacity(D, SV) * 2
    assert cache.nbytes == 2 * HKV * 5 * (k_row + v_row) + 2 * 4 + 2 * (2 * HKV * 7 * D * 2) + 2 * 4
    k, v = tokens(2, 12, torch.float16, 1, device)
    cache.prefill(k, v)  # 3 sinks + 5 stored + 4 recent
    model.prefill(k, v, [12, 12])
    check_state(cache, model)
    with pytest.raises(ValueError, match="overflow.*sinks=3"):
        cache.prefill(*tokens(2, 13, torch.float16, 1, device))
    with pytest.raises(ValueError, match="overflow"):
        cache.append(*tokens(2, 1, torch.float16, 2, device))


def test_sinks_validation(device):
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        mt.SparseKVCache(2, HKV, D, 8, 4, SK, SV, device=device, sinks=-1)
    for bad in (1.5, True, "4", None):
        with pytest.raises(TypeError, match="sinks must be an int"):
            mt.SparseKVCache(2, HKV, D, 8, 4, SK, SV, device=device, sinks=bad)


@settings(max_examples=8)
@given(lens=st.lists(st.integers(0, 14), min_size=1, max_size=3),
       window=st.sampled_from([0, 1, 3, 6]), chunk_frac=st.floats(0.0, 1.0),
       appends=st.integers(0, 10), seed=st.integers(0, 2**16), sinks=st.sampled_from([0, 0, 1, 4]))
def test_fuzz_prefill_and_appends(lens, window, chunk_frac, appends, seed, sinks, device):
    chunk = max(1, round(chunk_frac * window))
    b, t = len(lens), max(max(lens), 1)
    cache, model = make(device, b=b, max_tokens=24, window=window, chunk=chunk, sinks=sinks)
    k, v = tokens(b, t, torch.float16, seed, device)
    cache.prefill(k, v, torch.tensor(lens, dtype=torch.int32, device=device))
    model.prefill(k, v, lens)
    for i in range(appends):
        k_new, v_new = tokens(b, 1, torch.float16, seed + 10 + i, device)
        cache.append(k_new, v_new)
        model.append(k_new, v_new)
    check_state(cache, model)
    check_attend(cache, model, seed + 5, device)
    if sinks:
        check_sinks(cache, model, seed + 6, device)


def test_attend_rounds_its_bound_up_and_keeps_its_plan(device):
    """attend sizes its splits on the stored bound rounded up to 1/32 of its power of two
    (_bound_bucket): the extra tokens lie past every sequence's seq_lens and are masked, so attend
    still equals the float64 model (ragged batch, across flushes) and, within rounding, the call
    with the exact bound. Its decode plan is kept across appends and flushes; a query as
    [B, 1, Hq, D] gives the [B, Hq, D] call's result bit for bit."""
    from mustafar_triton.cache import _bound_bucket
    assert [_bound_bucket(n, 10 ** 6) for n in (0, 1, 63, 64, 65, 130, 4097, 8191)] == [
        0, 1, 63, 64, 66, 132, 4224, 8192]
    assert _bound_bucket(4097, 4100) == 4100
    dtype = torch.float32
    cache, model = make(device, b=2, max_tokens=256, window=8, chunk=4, dtype=dtype)
    k, v = tokens(2, 150, dtype, 7, device)
    cache.prefill(k, v, torch.tensor([150, 97], dtype=torch.int32, device=device))
    model.prefill(k, v, [150, 97])
    assert (cache._max_store, _bound_bucket(cache._max_store, 256)) == (142, 144)
    check_attend(cache, model, 8, device)
    q = randn((2, HQ, D), dtype, 9, device)
    exact = mt.sparse_decode_attention(q, cache.packed_k, cache.packed_v, max_seq_len=cache._max_store,
                                       **cache.window_kwargs())
    assert rel_err(cache.attend(q), exact) <= TOL[dtype]
    plan = cache._plan
    run_steps(cache, model, device, 6, 10, attend_every=3)  # one flush: bound 146 -> 148
    assert cache._plan is plan
    assert bit_equal(cache.attend(q[:, None])[:, 0], cache.attend(q))


# ------------------------------------------------------------------------------------------------
# GPU only: no host sync on the decode path; a captured attend() sees later appends
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda_only
def test_append_and_attend_do_not_sync(device):
    cache, _ = make(device, window=4, chunk=2)
    cache.prefill(*tokens(2, 10, torch.float16, 1, device))
    q = randn((2, HQ, D), torch.float16, 2, device)
    steps = [tokens(2, 1, torch.float16, 10 + i, device) for i in range(6)]
    cache.attend(q)  # compile outside the check
    cache.append(*steps[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k_new, v_new in steps[1:]:  # crosses flushes
            cache.append(k_new, v_new)
            cache.attend(q)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda_only
def test_cuda_graph_of_attend_follows_appends(device):
    """The buffers never move, so a graph captured once replays over the cache as it grows."""
    cache, _ = make(device, window=4, chunk=2)
    cache.prefill(*tokens(2, 10, torch.float16, 1, device))
    q = randn((2, HQ, D), torch.float16, 2, device)
    cache.attend(q, for_graph=True)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = cache.attend(q, for_graph=True)
    for i in range(5):
        cache.append(*tokens(2, 1, torch.float16, 10 + i, device))
        graph.replay()
        torch.testing.assert_close(static_out, cache.attend(q), rtol=1e-3, atol=1e-3)
