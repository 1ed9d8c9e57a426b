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
