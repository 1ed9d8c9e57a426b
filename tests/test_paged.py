"""The paged compressed cache's write path: compress.write_pages (prune and pack new tokens straight
into a PagedKV's pools at vLLM slots) against reference.write_pages, bit for bit.

Pools start full of random bits, so every check of a whole pool also checks that rows the call
must not write (other slots, skipped and out-of-range tokens) are untouched, byte for byte.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mustafar_triton as mt
from mustafar_triton import reference as ref
from mustafar_triton.format import PackedKV, PagedKV, default_capacity, kept_per_token
from mt_testutils import bit_equal, bits, gen, popcount_rows, randn, seed_of


def random_pools(num_pages, heads, page_size, d, capacity, dtype, seed, device) -> PagedKV:
    """A PagedKV whose pools hold random bits (NaN patterns included), and a one-sequence table."""
    g = gen(seed)
    bitmap = torch.randint(-2**31, 2**31, (num_pages, heads, page_size, d // 32), generator=g,
                           dtype=torch.int64).to(torch.int32)
    width = 8 * torch.tensor([], dtype=dtype).element_size()
    raw = torch.randint(-2**(width - 1), 2**(width - 1), (num_pages, heads, page_size, capacity), generator=g,
                        dtype=torch.int64).to(torch.int32 if width == 32 else torch.int16)
    table = torch.zeros(1, 1, dtype=torch.int32)
    return PagedKV(bitmap.to(device), raw.view(dtype).to(device), capacity, d, table.to(device),
                   torch.zeros(1, dtype=torch.int32, device=device))


def clone(cache: PagedKV) -> PagedKV:
    return PagedKV(cache.bitmap.clone(), cache.values.clone(), cache.capacity, cache.head_dim,
                   cache.block_table, cache.seq_lens)


def assert_pools_equal(got: PagedKV, want: PagedKV):
    assert torch.equal(got.bitmap, want.bitmap), "bitmap pools differ"
    assert bit_equal(got.values, want.values), "value pools differ"


def random_slots(n, num_slots, seed, device, dtype=torch.int32, skip=0.2, out_of_range=0.1) -> torch.Tensor:
    """n distinct slots of the pool, a share of them replaced by -1 and by slots outside it."""
    g = gen(seed)
    slots = torch.randperm(num_slots, generator=g)[:n]
    u = torch.rand(n, generator=g)
    outside = torch.where(torch.rand(n, generator=g) < 0.5, num_slots + torch.randint(0, 1000, (n,), generator=g),
                          -2 - torch.randint(0, 1000, (n,), generator=g))
    slots = torch.where(u < skip, -1, torch.where(u < skip + out_of_range, outside, slots))
    return slots.to(dtype).to(device)


def check_write(cache, x, slots, sparsity):
    """write_pages against the reference, the rows written, and every other row untouched."""
    before = clone(cache)
    want = clone(cache)
    mt.write_pages(cache, x, slots, sparsity)
    ref.write_pages(want, x, slots, sparsity)
    assert_pools_equal(cache, want)
    s = slots.long()
    inside = (s >= 0) & (s < cache.num_pages * cache.page_size)
    page, offset = s[inside] // cache.page_size, s[inside] % cache.page_size
    written = torch.zeros(cache.num_pages, cache.page_size, dtype=torch.bool, device=x.device)
    written[page, offset] = True
    untouched = ~written[:, None, :].expand(cache.bitmap.shape[:3])
    assert torch.equal(cache.bitmap[untouched], before.bitmap[untouched])
    assert bit_equal(cache.values[untouched], before.values[untouched])
    # the written rows are the tokens' top-k, and unpack to prune_topk's bits
    rows = PackedKV(cache.bitmap[page, :, offset].contiguous(), cache.values[page, :, offset].contiguous(),
                    cache.capacity, cache.head_dim)
    assert torch.all(popcount_rows(rows.bitmap) == kept_per_token(cache.head_dim, sparsity))
    assert bit_equal(ref.unpack(rows), ref.prune_topk(x[inside], sparsity))


# ------------------------------------------------------------------------------------------------
# Kernel against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,d,heads,page_size,sparsity", [
    (torch.float16, 128, 2, 16, 0.7), (torch.bfloat16, 64, 3, 64, 0.5), (torch.float32, 64, 1, 256, 0.3),
    (torch.float16, 64, 8, 64, 0.9), (torch.bfloat16, 128, 1, 16, 0.0), (torch.float32, 32, 4, 16, 0.6),
    (torch.float16, 96, 2, 16, 0.7), (torch.bfloat16, 256, 1, 16, 0.75),
], ids=str)
def test_write_pages_matches_reference(dtype, d, heads, page_size, sparsity, device):
    seed = seed_of(dtype, d, heads, page_size)
    num_pages = max(3, 160 // page_size)
    cache = random_pools(num_pages, heads, page_size, d, default_capacity(d, sparsity), dtype, seed, device)
    n = 37
    x = randn((n, heads, d), dtype, seed + 1, device)
    for slot_dtype in (torch.int32, torch.int64):
        check_write(cache, x, random_slots(n, num_pages * page_size, seed + 2, device, slot_dtype), sparsity)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_capacity_above_keep_is_zero_filled(dtype, device):
    d, sparsity = 64, 0.7   # keep 20, default capacity 24; the pool has 48
    cache = random_pools(4, 2, 16, d, 48, dtype, 5, device)
    x = randn((9, 2, d), dtype, 6, device)
    x[0, 0, :] = float("nan")   # NaN and inf rows pack bit-exactly
    x[1, 1, ::3] = float("-inf")
    slots = torch.tensor([0, 17, 63, 5, -1, 33, 2, 40, 16], dtype=torch.int32, device=device)
    check_write(cache, x, slots, sparsity)
    page, offset = slots[slots >= 0].long() // 16, slots[slots >= 0].long() % 16
    assert torch.all(bits(cache.values[page, :, offset][..., kept_per_token(d, sparsity):]) == 0)


def test_skipped_and_out_of_range_slots_write_nothing(device):
    cache = random_pools(3, 2, 16, 64, 24, torch.float16, 11, device)
    before = clone(cache)
    x = randn((5, 2, 64), torch.float16, 12, device)
    slots = torch.tensor([-1, 48, 10**6, -2, -(2**31)], dtype=torch.int32, device=device)
    mt.write_pages(cache, x, slots, 0.7)
    assert_pools_equal(cache, before)
    mt.write_pages(cache, x[:0], slots[:0], 0.7)   # no tokens: nothing launched
    assert_pools_equal(cache, before)


def test_out_of_range_int64_slots_are_not_truncated(device):
    """An int64 slot of 2^32 + 5 is outside the pool, not slot 5 after a cast to int32."""
    cache = random_pools(2, 1, 16, 32, 16, torch.float32, 13, device)
    before = clone(cache)
    mt.write_pages(cache, randn((1, 1, 32), torch.float32, 14, device),
                   torch.tensor([2**32 + 5], dtype=torch.int64, device=device), 0.5)
    assert_pools_equal(cache, before)


def test_validate(device):
    cache = random_pools(2, 2, 16, 64, 24, torch.bfloat16, 21, device)
    x = randn((4, 2, 64), torch.bfloat16, 22, device)
    good = torch.tensor([0, -1, 31, 7], dtype=torch.int64, device=device)
    check_write(cache, x, good, 0.7)
    mt.write_pages(cache, x, good, 0.7, validate=True)   # -1 is padding, not an error
    before = clone(cache)
    for bad, text in (([0, 32, -1, 5], r"outside \[0, 32\).*from 32 to 32"),
                      ([-3, 1, 40, 2], r"2 slot\(s\) outside \[0, 32\).*from -3 to 40")):
        slots = torch.tensor(bad, dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match=text):
            mt.write_pages(cache, x, slots, 0.7, validate=True)
        with pytest.raises(ValueError, match="outside"):
            ref.write_pages(clone(cache), x, slots, 0.7, validate=True)
        assert_pools_equal(cache, before)   # nothing was written


def test_bad_arguments(device):
    cache = random_pools(2, 2, 16, 64, 24, torch.float16, 31, device)
    x = randn((3, 2, 64), torch.float16, 32, device)
    slots = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    cases = [
        (TypeError, "PagedKV", (mt.prune_and_pack(x, 0.7), x, slots, 0.7)),
        (TypeError, "x dtype torch.float32 != cache dtype", (cache, x.float(), slots, 0.7)),
        (ValueError, r"x must be \[N, Hkv=2, D=64\].*\(3, 1, 64\)", (cache, x[:, :1], slots, 0.7)),
        (ValueError, r"\(3, 2, 2, 32\)", (cache, x.reshape(3, 2, 2, 32), slots, 0.7)),
        (ValueError, "head dim D=48", (cache, x[..., :48], slots, 0.7)),
        (TypeError, "int32 or int64.*float32", (cache, x, slots.float(), 0.7)),
        (TypeError, "int32 or int64.*list", (cache, x, [0, 1, 2], 0.7)),
        (ValueError, r"slot_mapping shape \(2,\) != \[N\] = \[3\]", (cache, x, slots[:2], 0.7)),
        (ValueError, "keeps 32 of D=64 values.*capacity 24", (cache, x, slots, 0.5)),
        (ValueError, r"sparsity must be in \[0, 1\)", (cache, x, slots, 1.0)),
        (ValueError, "meta", (cache, x.to("meta"), slots, 0.7)),
    ]
    before = clone(cache)
    for exc, text, args in cases:
        with pytest.raises(exc, match=text):
            mt.write_pages(*args)
    assert_pools_equal(cache, before)


@st.composite
def write_cases(draw):
    page_size = draw(st.sampled_from([16, 32, 64, 256]))
    num_pages = draw(st.integers(1, 4))
    heads = draw(st.integers(1, 3))
    d = draw(st.sampled_from([32, 64, 128]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
    sparsity = draw(st.sampled_from([0.0, 0.5, 0.7, 0.9]))
    num_slots = num_pages * page_size
    n = draw(st.integers(0, min(40, num_slots)))
    slots = draw(st.lists(st.one_of(st.integers(0, num_slots - 1), st.just(-1),
                                    st.integers(num_slots, num_slots + 100), st.integers(-100, -2)),
                          min_size=n, max_size=n, unique_by=lambda s: s if 0 <= s < num_slots else object()))
    extra = draw(st.sampled_from([0, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    return page_size, num_pages, heads, d, dtype, sparsity, slots, extra, seed


@settings(max_examples=12, deadline=None)
@given(case=write_cases())
def test_property_write_pages_matches_reference(case, device):
    page_size, num_pages, heads, d, dtype, sparsity, slots, extra, seed = case
    capacity = min(d, default_capacity(d, sparsity) + extra)
    cache = random_pools(num_pages, heads, page_size, d, capacity, dtype, seed, device)
    x = randn((len(slots), heads, d), dtype, seed + 1, device, scale=4.0)
    check_write(cache, x, torch.tensor(slots, dtype=torch.int64, device=device), sparsity)


@pytest.mark.cuda_only
@pytest.mark.parametrize("kernel", ["gluon", "tl"])
@pytest.mark.parametrize("dtype,d,sparsity,extra", [(torch.float16, 128, 0.7, 0), (torch.bfloat16, 64, 0.5, 8),
                                                    (torch.float16, 256, 0.9, 16)], ids=str)
def test_write_pages_kernels(kernel, dtype, d, sparsity, extra, device, monkeypatch):
    """prune_pack_gluon.py's PAGED kernel (the default on GPUs for fp16 / bf16, D 64 / 128 / 256)
    and prune_pack.py's give the reference's bits, on test_compress's hard rows (ties, NaN / inf,
    denormals, the Gluon search's bucket edges)."""
    from mustafar_triton import autotune
    from mustafar_triton.kernels import prune_pack_gluon
    from test_compress import hard_rows
    launches = []
    launch = prune_pack_gluon.launch_prune_and_pack
    monkeypatch.setattr(prune_pack_gluon, "launch_prune_and_pack",
                        lambda *a, **k: launches.append(1) or launch(*a, **k))
    heads, page_size, num_pages = 3, 16, 12
    x = hard_rows((heads, 61, d), dtype, seed_of(dtype, d, "paged"), device).transpose(0, 1).contiguous()
    cache = random_pools(num_pages, heads, page_size, d, min(d, default_capacity(d, sparsity) + extra), dtype,
                         seed_of(d, "pools"), device)
    cfg = autotune.GLUON_SELECT_CONFIG if kernel == "gluon" else autotune.tl_select_config(False)
    with autotune.forced_config("select", cfg):
        check_write(cache, x, random_slots(61, num_pages * page_size, d, device), sparsity)
    assert len(launches) == (1 if kernel == "gluon" else 0)


# ------------------------------------------------------------------------------------------------
# PagedSparseKVCache: the page allocator under continuous batching
# ------------------------------------------------------------------------------------------------
class DenseModel:
    """The reference: every live sequence's dense tokens. A sequence of n tokens must hold its
    last min(n, window) dense in its window and the others pruned (reference.prune_topk) in its
    pages, in order; pages used = ceil(max(n - window, 0) / page_size)."""

    def __init__(self, cache: mt.PagedSparseKVCache):
        self.cache = cache
        self.k: dict[int, list[torch.Tensor]] = {}   # slot -> [Hkv, D] tokens in order
        self.v: dict[int, list[torch.Tensor]] = {}

    def stored(self, n: int) -> int:
        return max(n - self.cache.window, 0)

    def pages(self, n: int) -> int:
        return -(-self.stored(n) // self.cache.page_size)

    def free_pages(self) -> int:
        return self.cache.num_pages - sum(self.pages(len(t)) for t in self.k.values())


def check_bookkeeping(cache: mt.PagedSparseKVCache, model: DenseModel):
    """Host state: the live slots, lengths, no page owned twice, free + owned == num_pages."""
    assert cache.live_slots == sorted(model.k)
    owned = [p for s in cache.live_slots for p in cache.pages_of(s)]
    assert len(set(owned)) == len(owned), "a page is owned twice"
    assert len(owned) + cache.free_pages == cache.num_pages, "pages leaked"
    assert cache.free_pages == model.free_pages()
    for s, toks in model.k.items():
        assert cache.num_tokens(s) == len(toks) and len(cache.pages_of(s)) == model.pages(len(toks))


def check_contents(cache: mt.PagedSparseKVCache, model: DenseModel):
    """Device state: every live sequence's tokens rebuilt from the pools (gather_pages + unpack)
    and its window equal the reference bit for bit; the tables match the host's pages."""
    dense = {}
    for name, paged in (("k", cache.paged_k), ("v", cache.paged_v)):
        packed, on_pages = ref.gather_pages(paged)   # on_pages: the same for K and V (one table)
        dense[name] = ref.unpack(packed)
    table, lens, wlens = cache.block_table.tolist(), cache.seq_lens.tolist(), cache.window_lens.tolist()
    for s in range(cache.max_seqs):
        if s not in model.k:
            assert table[s] == [-1] * cache.max_pages_per_seq and lens[s] == 0 and wlens[s] == 0
            continue
        n = len(model.k[s])
        stored = model.stored(n)
        pages = cache.pages_of(s)
        assert table[s] == pages + [-1] * (cache.max_pages_per_seq - len(pages))
        assert lens[s] == stored and wlens[s] == n - stored
        assert bool(on_pages[s, :stored].all())
        for name, sparsity, win in (("k", cache.k_sparsity, cache.k_window), ("v", cache.v_sparsity, cache.v_window)):
            toks = torch.stack(getattr(model, name)[s], 1) if n else win[s, :, :0]   # [Hkv, n, D]
            assert bit_equal(dense[name][s, :, :stored], ref.prune_topk(toks[:, :stored], sparsity)), (name, s)
            assert bit_equal(win[s, :, :n - stored], toks[:, stored:]), (name, s)


def run_steps(caches, models, steps, seed, check_every, device):
    """Random join / append / finish steps, the same on every cache (each against its model).
    Expected errors (no slot, no page, a full block-table row) are predicted from the model and
    must leave the state unchanged. Returns how many pages were handed out again after their
    sequence finished."""
    import random
    rnd = random.Random(seed)
    g = gen(seed)
    cache, model = caches[0], models[0]
    h, d, dtype = cache.num_kv_heads, cache.head_dim, cache.dtype
    freed, reused = set(), 0

    def tokens(*shape):
        return torch.randn(shape, generator=g).to(dtype).to(device)

    for step in range(steps):
        live = sorted(model.k)
        roll = rnd.random()
        if not live or roll < 0.12:   # join
            t = rnd.choice([0, 1, rnd.randint(2, 20), rnd.randint(20, 90)])
            k, v = tokens(h, t, d), tokens(h, t, d)
            need = model.pages(t)
            if need > cache.max_pages_per_seq:
                expect = (ValueError, "max_pages_per_seq")
            elif len(live) == cache.max_seqs:
                expect = (RuntimeError, "out of sequence slots")
            elif need > model.free_pages():
                expect = (RuntimeError, "out of pages")
            else:
                expect = None
            for c, m in zip(caches, models):
                if expect:
                    with pytest.raises(expect[0], match=expect[1]):
                        c.join(k, v)
                else:
                    s = c.join(k, v)
                    m.k[s], m.v[s] = list(k.unbind(1)), list(v.unbind(1))
            if not expect:
                reused += len(freed.intersection(cache.pages_of(s)))
                freed.difference_update(cache.pages_of(s))
        elif roll < 0.22 or (model.free_pages() < 2 and roll < 0.5):   # finish
            s = rnd.choice(live)
            freed.update(cache.pages_of(s))
            for c, m in zip(caches, models):
                c.finish(s)
                del m.k[s], m.v[s]
        else:   # append one token to a random subset of the live sequences
            slots = rnd.sample(live, rnd.randint(1, len(live)))
            k, v = tokens(len(slots), h, d), tokens(len(slots), h, d)
            crossing = [s for s in slots if len(model.k[s]) >= cache.window
                        and model.stored(len(model.k[s])) % cache.page_size == 0]
            if any(model.pages(len(model.k[s]) + 1) > cache.max_pages_per_seq for s in crossing):
                expect = (ValueError, "is full")
            elif len(crossing) > model.free_pages():
                expect = (RuntimeError, "out of pages")
            else:
                expect = None
            before = {s: cache.pages_of(s) for s in slots}
            for c, m in zip(caches, models):
                if expect:
                    with pytest.raises(expect[0], match=expect[1]):
                        c.append(slots, k, v)
                else:
                    c.append(slots, k, v)
                    for i, s in enumerate(slots):
                        m.k[s].append(k[i])
                        m.v[s].append(v[i])
            if not expect:
                for s in slots:
                    new = set(cache.pages_of(s)) - set(before[s])
                    reused += len(freed & new)
                    freed -= new
        for c, m in zip(caches, models):
            check_bookkeeping(c, m)
            if (step + 1) % check_every == 0 or step == steps - 1:
                check_contents(c, m)
    return reused


def small_cache(device, window, writer=mt.write_pages, dtype=torch.float16, num_pages=14):
    return mt.PagedSparseKVCache(num_kv_heads=2, head_dim=32, num_pages=num_pages, page_size=16, max_seqs=6,
                                 max_pages_per_seq=5, k_sparsity=0.5, v_sparsity=0.7, window=window,
                                 dtype=dtype, device=device, writer=writer)


@pytest.mark.parametrize("window,steps", [(3, 10_000), (0, 2_000)])
def test_allocator_random_steps(window, steps, device):
    """Continuous batching over many steps against the dense reference: 6 slots, 14 pages of 16
    tokens (pages run out), block-table rows of 5 pages (sequences fill them), prompts of 0 to
    90 tokens. The pages are written by reference.write_pages
    (the same semantics in torch; test_allocator_with_kernels runs write_pages' kernel), so that
    10,000 steps fit the CPU interpreter's budget: a kernel launch there costs ~40 ms.
    Bookkeeping is checked after every step, the full contents every 50 steps and at the end."""
    cache = small_cache(device, window, writer=ref.write_pages)
    model = DenseModel(cache)
    reused = run_steps([cache], [model], steps, seed_of("allocator", window), 50, device)
    assert reused > 0, "finished sequences' pages were never handed out again"


def test_allocator_with_kernels(device):
    """The same random steps with write_pages' kernel, in lockstep with a cache written by
    reference.write_pages: after the steps their pools are equal bit for bit (free pages hold
    what their last sequence left there, in both)."""
    caches = [small_cache(device, 2, num_pages=10), small_cache(device, 2, writer=ref.write_pages, num_pages=10)]
    models = [DenseModel(c) for c in caches]
    run_steps(caches, models, 100, seed_of("kernels"), 20, device)
    for got, want in zip((caches[0].paged_k, caches[0].paged_v), (caches[1].paged_k, caches[1].paged_v)):
        assert_pools_equal(got, want)


def test_allocator_errors(device):
    cache = small_cache(device, 2, writer=ref.write_pages, num_pages=3)
    h, d = 2, 32
    x = randn((h, 20, d), torch.float16, 1, device)
    s = cache.join(x, x)                     # 18 stored tokens: 2 pages
    assert cache.pages_of(s) == [0, 1] and cache.free_pages == 1
    one, two = x[:, :1].transpose(0, 1), x[:, :2].transpose(0, 1)   # [n, Hkv, D]
    long, longer = randn((h, 40, d), torch.float16, 3, device), randn((h, 90, d), torch.float16, 2, device)
    bad_calls = [
        (ValueError, "slot 5 holds no sequence", lambda: cache.append([5], one, one)),
        (TypeError, "slot must be an int", lambda: cache.finish("0")),
        (ValueError, "distinct", lambda: cache.append([s, s], two, two)),
        (ValueError, r"k_new shape \(2, 2, 32\) must be \[n=1", lambda: cache.append([s], two, one)),
        (TypeError, "k dtype torch.float32 != cache dtype", lambda: cache.join(x.float(), x.float())),
        (ValueError, r"v shape \(2, 19, 32\) must be k's \[Hkv=2, T=20, D=32\]", lambda: cache.join(x, x[:, 1:])),
        (ValueError, r"k shape \(20, 32\)", lambda: cache.join(x[0], x[0])),
        (ValueError, "6 pages, more than max_pages_per_seq=5", lambda: cache.join(longer, longer)),
        (RuntimeError, "out of pages: a prompt of 40 tokens needs 3 new page", lambda: cache.join(long, long)),
    ]
    for exc, text, call in bad_calls:
        with pytest.raises(exc, match=text):
            call()
        assert cache.live_slots == [s] and cache.free_pages == 1 and cache.pages_of(s) == [0, 1]
    for bad in (dict(page_size=24), dict(window=-1), dict(head_dim=48), dict(max_seqs=0), dict(dtype=torch.int32)):
        kwargs = dict(num_kv_heads=2, head_dim=32, num_pages=4, page_size=16, max_seqs=2, max_pages_per_seq=2,
                      k_sparsity=0.5, v_sparsity=0.5, window=2, dtype=torch.float16, device=device)
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            mt.PagedSparseKVCache(**{**kwargs, **bad})
    # slots run out; a finished slot's pages come back first
    for _ in range(cache.max_seqs - 1):
        cache.join(x[:, :2], x[:, :2])
    with pytest.raises(RuntimeError, match="out of sequence slots: all max_seqs=6"):
        cache.join(x[:, :2], x[:, :2])
    cache.finish(s)
    assert cache.free_pages == 3
    assert cache.pages_of(cache.join(x, x)) == [0, 1]


def test_attend(device):
    """attend runs sparse_decode_attention over the PagedKV views and the windows (all slots, or
    the listed ones) and matches reference.sparse_decode_attention."""
    cache = mt.PagedSparseKVCache(num_kv_heads=2, head_dim=64, num_pages=12, page_size=16, max_seqs=4,
                                  max_pages_per_seq=4, k_sparsity=0.5, v_sparsity=0.7, window=4,
                                  dtype=torch.float32, device=device, writer=ref.write_pages)
    a = cache.join(randn((2, 37, 64), torch.float32, 1, device), randn((2, 37, 64), torch.float32, 2, device))
    b = cache.join(randn((2, 3, 64), torch.float32, 3, device), randn((2, 3, 64), torch.float32, 4, device))
    c = cache.join(randn((2, 20, 64), torch.float32, 5, device), randn((2, 20, 64), torch.float32, 6, device))
    cache.finish(a)
    cache.append([b, c], randn((2, 2, 64), torch.float32, 7, device), randn((2, 2, 64), torch.float32, 8, device))
    q = randn((cache.max_seqs, 8, 64), torch.float32, 9, device)
    out, lse = cache.attend(q, return_lse=True)
    window = dict(k_window=cache.k_window, v_window=cache.v_window, window_lens=cache.window_lens)
    want, want_lse = ref.sparse_decode_attention(q, cache.paged_k, cache.paged_v, return_lse=True, **window)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    assert torch.all(out[a] == 0) and torch.isneginf(lse[a]).all()   # a finished slot: no token
    sub = cache.attend(q[[c, b]], slots=[c, b])
    torch.testing.assert_close(sub, want[[c, b]], atol=2e-5, rtol=2e-5)
