"""SparseKVCache.append_static (the capturable append) against a host model of the same cache.

`RingModel` keeps every token dense in Python lists and applies the static policy of the
SparseKVCache docstring (sinks, a ring of `window` recent tokens whose oldest token moves to the
store when the ring is full, dropped when the store is full). After every step the cache must
equal the model: lengths, the ring's rows bit for bit, the store equal to reference.prune_topk
of the model's store tokens, and attend() equal to a float64 attention over the model's tokens.
"""
import math

import pytest
import torch

import mustafar_triton as mt
from mustafar_triton import reference as ref
from conftest import INTERPRETING
from mt_testutils import bit_equal, randn, rel_err, seed_of

SK, SV = 0.7, 0.5
HQ, HKV, D = 4, 2, 32
TOL = {torch.float16: 2e-3, torch.float32: 1e-5 if INTERPRETING else 3e-3}


class RingModel:
    """Host model of a SparseKVCache under append_static: per sequence its sinks, its ring (oldest
    first) and its store, as lists of (k, v) [Hkv, D] tokens."""

    def __init__(self, k, v, lens, sinks, window, max_tokens):
        self.s, self.w, self.t = sinks, window, max_tokens
        self.sinks, self.store, self.ring = [], [], []
        for b, n in enumerate(lens):
            tokens = [(k[b, :, i], v[b, :, i]) for i in range(n)]
            split = max(n - window, min(n, sinks))
            self.sinks.append(tokens[:min(n, sinks)])
            self.store.append(tokens[min(n, sinks):split])
            self.ring.append(tokens[split:])

    def append(self, k_new, v_new):
        for b in range(len(self.ring)):
            token = (k_new[b, :, 0], v_new[b, :, 0])
            if len(self.sinks[b]) < self.s:
                self.sinks[b].append(token)
                continue
            if self.w:
                self.ring[b].append(token)
                if len(self.ring[b]) <= self.w:
                    continue
                token = self.ring[b].pop(0)
            if len(self.store[b]) < self.t:
                self.store[b].append(token)

    def check(self, cache, q):
        """The cache state equals the model; attend(q) equals float64 attention over its tokens."""
        s, w = self.s, self.w
        assert cache.seq_lens.tolist() == [len(x) for x in self.store]
        assert cache.window_lens.tolist() == [len(a) + len(r) for a, r in zip(self.sinks, self.ring)]
        got_k = mt.unpack(cache.packed_k)
        start = cache.ring_start.tolist()
        for b in range(len(self.ring)):
            for i, (k, v) in enumerate(self.sinks[b]):
                assert bit_equal(cache.k_window[b, :, i], k) and bit_equal(cache.v_window[b, :, i], v)
            for i, (k, v) in enumerate(self.ring[b]):
                row = s + (start[b] + i) % w
                assert bit_equal(cache.k_window[b, :, row], k), f"sequence {b}, ring token {i}"
                assert bit_equal(cache.v_window[b, :, row], v)
            n = len(self.store[b])
            assert bit_equal(got_k[b, :, :n], stacked(self.store[b], 0, SK, got_k)), f"sequence {b}: store"
            assert not got_k[b, :, n:].any(), "rows past seq_lens stay zero"
        out = cache.attend(q)
        assert torch.isfinite(out).all()
        for b in range(len(self.ring)):
            dense = self.sinks[b] + self.ring[b]
            k = torch.cat([stacked(self.store[b], 0, SK, q), stacked(dense, 0, None, q)], 1)  # [Hkv, N, D]
            v = torch.cat([stacked(self.store[b], 1, SV, q), stacked(dense, 1, None, q)], 1)
            kk = k.double().repeat_interleave(HQ // HKV, 0)   # [Hq, N, D]
            vv = v.double().repeat_interleave(HQ // HKV, 0)
            p = torch.softmax((kk @ q[b].double()[:, :, None])[..., 0] / math.sqrt(D), -1)
            want = (p[:, :, None] * vv).sum(1)
            assert rel_err(out[b], want) < TOL[q.dtype], f"sequence {b}"


def stacked(tokens, which, sparsity, like):
    """[Hkv, N, D]: item `which` (0: k, 1: v) of each token, pruned when sparsity is given."""
    if not tokens:
        return like.new_zeros(HKV, 0, D)
    x = torch.stack([t[which] for t in tokens], 1)
    return x if sparsity is None else ref.prune_topk(x, sparsity)


def make(device, dtype, window, sinks, max_tokens=16, batch=3):
    return mt.SparseKVCache(batch, HKV, D, max_tokens, window, SK, SV, dtype=dtype, device=device, sinks=sinks)


@pytest.mark.parametrize("window,sinks", [(0, 0), (0, 2), (1, 0), (1, 2), (3, 0), (3, 2), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_static_append_matches_ring_model(device, dtype, window, sinks):
    """Ragged prompts (one shorter than the sinks, one empty), steps past the ring's wrap-around."""
    seed = seed_of("static", dtype, window, sinks)
    lens, t = [7, 1, 0], 7
    cache = make(device, dtype, window, sinks)
    k, v = (randn((3, HKV, t, D), dtype, seed + i, device) for i in range(2))
    cache.prefill(k, v, torch.tensor(lens, dtype=torch.int32, device=device))
    model = RingModel(k, v, lens, sinks, window, 16)
    for step in range(2 * window + 3):
        k_new, v_new = (randn((3, HKV, 1, D), dtype, seed + 10 + 2 * step + i, device) for i in range(2))
        cache.append_static(k_new, v_new)
        model.append(k_new, v_new)
        model.check(cache, randn((3, HQ, D), dtype, seed + 100 + step, device))


def test_full_store_drops_tokens_of_its_own_sequence_only(device):
    """Sequence 0 fills its store (16) and drops its oldest ring tokens; the others are untouched."""
    seed, dtype = seed_of("overflow"), torch.float32
    cache = make(device, dtype, window=2, sinks=1)
    k, v = (randn((3, HKV, 17, D), dtype, seed + i, device) for i in range(2))
    lens = [17, 4, 2]
    cache.prefill(k, v, torch.tensor(lens, dtype=torch.int32, device=device))
    model = RingModel(k, v, lens, 1, 2, 16)
    for step in range(4):
        k_new, v_new = (randn((3, HKV, 1, D), dtype, seed + 10 + 2 * step + i, device) for i in range(2))
        cache.append_static(k_new, v_new)
        model.append(k_new, v_new)
    assert cache.seq_lens.tolist() == [16, 5, 3]
    model.check(cache, randn((3, HQ, D), dtype, seed + 99, device))


def test_window_zero_equals_eager_append(device):
    """window 0: append and append_static store the same tokens, bit for bit, and attend alike."""
    seed, dtype = seed_of("eager"), torch.float16
    caches = [make(device, dtype, window=0, sinks=2) for _ in range(2)]
    k, v = (randn((3, HKV, 5, D), dtype, seed + i, device) for i in range(2))
    for cache in caches:
        cache.prefill(k, v, torch.tensor([5, 1, 3], dtype=torch.int32, device=device))
    for step in range(3):
        k_new, v_new = (randn((3, HKV, 1, D), dtype, seed + 10 + 2 * step + i, device) for i in range(2))
        caches[0].append(k_new, v_new)
        caches[1].append_static(k_new, v_new)
    a, b = caches
    for x, y in ((a.packed_k.bitmap, b.packed_k.bitmap), (a.packed_k.values, b.packed_k.values),
                 (a.packed_v.values, b.packed_v.values), (a.k_window, b.k_window), (a.seq_lens, b.seq_lens),
                 (a.window_lens, b.window_lens)):
        assert bit_equal(x, y) if x.dtype.is_floating_point else torch.equal(x, y)
    q = randn((3, HQ, D), dtype, seed + 99, device)
    assert bit_equal(a.attend(q), b.attend(q))


def test_static_append_misuse_is_refused(device):
    dtype = torch.float16
    cache = make(device, dtype, window=2, sinks=0, max_tokens=20)
    new = torch.zeros(3, HKV, 1, D, dtype=dtype, device=device)
    with pytest.raises(ValueError, match="max_tokens a positive multiple of 16"):
        cache.append_static(new, new)
    cache = make(device, dtype, window=2, sinks=0)
    with pytest.raises(ValueError, match="shape"):
        cache.append_static(new[:, :, :0], new)
    with pytest.raises(TypeError, match="dtype"):
        cache.append_static(new.float(), new)
    cache.append_static(new, new)
    with pytest.raises(ValueError, match="append after append_static"):
        cache.append(new, new)
    cache.reset()
    cache.append(new, new)
