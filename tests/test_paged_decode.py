"""sparse_decode_attention over a paged cache (format.PagedKV): bit for bit the contiguous call on the
same pruned data, whatever the page assignment (shuffled pages, pages shared between sequences as
prefix caching does), and never a read outside the pools for block-table entries outside them
(the interpreter's out-of-bounds guard checks every lane on the CPU; compute-sanitizer on the GPU).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mustafar_triton as mt
from mustafar_triton import reference as ref
from mustafar_triton.format import PagedKV
from mustafar_triton.kernels import decode_gluon_launch as gluon_launch
from conftest import INTERPRETING
from mt_testutils import randn
from test_decode import check_decode, decode_config  # noqa: F401 (fixture)

GPU_DTYPES = [torch.float16, torch.bfloat16]


def case(device, *, b=3, hq=4, hkv=2, t=70, d=64, dtype=torch.float16, seq_lens=(70, 33, 0), seed=0,
         sk=0.7, sv=0.5, page_size=16, w=None, lq=None):
    k = randn((b, hkv, t, d), dtype, seed, device)
    v = randn((b, hkv, t, d), dtype, seed + 1, device)
    q = randn((b, hq, d) if lq is None else (b, lq, hq, d), dtype, seed + 2, device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    pk, pv = mt.prune_and_pack(k, sk, lens), mt.prune_and_pack(v, sv, lens)
    gen = torch.Generator().manual_seed(seed)
    gk, gv = ref.pages_from_packed([pk, pv], page_size, extra_pages=3, generator=gen)
    kw = {}
    if w is not None:
        kw = dict(k_window=randn((b, hkv, w, d), dtype, seed + 3, device),
                  v_window=randn((b, hkv, w, d), dtype, seed + 4, device))
    return q, pk, pv, gk, gv, kw


def assert_paged_equals_contiguous(q, pk, pv, gk, gv, **kw):
    """max_seq_len: the same bound (so the same splits) for the paged call, whose block table can
    address more tokens (whole pages) than the contiguous cache holds."""
    want = mt.sparse_decode_attention(q, pk, pv, return_lse=True, **kw)
    got = mt.sparse_decode_attention(q, gk, gv, return_lse=True, max_seq_len=pk.num_tokens, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a - b).abs().max()
    check_decode(q, gk, gv, **kw)


@pytest.mark.parametrize("page_size", [16, 32, 64])
@pytest.mark.parametrize("window,lq", [(None, None), (5, None), (6, 3)])
def test_paged_equals_contiguous(page_size, window, lq, device):
    q, pk, pv, gk, gv, kw = case(device, page_size=page_size, w=window, lq=lq, seed=page_size + (window or 0),
                                 dtype=torch.float16 if not INTERPRETING else torch.float32)
    assert_paged_equals_contiguous(q, pk, pv, gk, gv, **kw)
    assert_paged_equals_contiguous(q, pk, pv, gk, gv, num_splits=3, **kw)


def test_paged_page_shared_by_sequences(device):
    """Prefix caching: sequences 0 and 1 list the same first pages; each attends them as its own."""
    q, pk, pv, gk, gv, _ = case(device, seq_lens=(70, 50, 20), dtype=torch.float32 if INTERPRETING else torch.float16)
    table = gk.block_table.clone()
    table[1, :2] = table[0, :2]
    table[2, :1] = table[0, :1]
    gk2, gv2 = gk.with_tables(table, gk.seq_lens), gv.with_tables(table, gk.seq_lens)
    shared_k, _ = ref.gather_pages(gk2)
    assert torch.equal(shared_k.bitmap[1, :, :32], shared_k.bitmap[0, :, :32])
    check_decode(q, gk2, gv2)


@pytest.mark.parametrize("bad", [-1, -7, "num_pages", 2**31 - 1])
def test_paged_entries_outside_the_pool_are_not_attended(bad, device):
    """Block-table entries outside [0, num_pages) for tokens below seq_lens: their tokens are
    skipped (not attended), nothing outside the pools is read, other sequences unchanged."""
    q, pk, pv, gk, gv, _ = case(device, b=4, seq_lens=(70, 40, 33, 20),
                                dtype=torch.float32 if INTERPRETING else torch.float16)
    table = gk.block_table.clone()
    entry = gk.num_pages if bad == "num_pages" else bad
    table[0, 1] = entry                                  # a middle page of sequence 0
    table[2, :2] = entry                                 # the first two pages of sequence 2
    table[3, :] = entry                                  # every page of sequence 3: no token at all
    gk2, gv2 = gk.with_tables(table, gk.seq_lens), gv.with_tables(table, gk.seq_lens)
    out, lse = check_decode(q, gk2, gv2)
    assert torch.equal(out[1], mt.sparse_decode_attention(q, gk, gv)[1])
    assert torch.all(out[3] == 0) and torch.all(torch.isneginf(lse[3]))


def test_check_tables(device):
    """The validation mode names a bad entry that holds tokens; entries past seq_lens may be anything."""
    _, _, _, gk, _, _ = case(device, seq_lens=(70, 33, 0), dtype=torch.float32 if INTERPRETING else torch.float16)
    gk.check_tables()
    table = gk.block_table.clone()
    table[1, 3:] = -1          # past sequence 1's 33 tokens (3 pages of 16): fine
    table[2, :] = 10**6        # sequence 2 holds no token: fine
    gk.with_tables(table, gk.seq_lens).check_tables()
    table[1, 2] = gk.num_pages
    with pytest.raises(ValueError, match=r"block_table\[1, 2\]"):
        gk.with_tables(table, gk.seq_lens).check_tables()
    with pytest.raises(ValueError, match="seq_lens outside"):
        gk.with_tables(gk.block_table, gk.seq_lens + 100).check_tables()


def test_paged_errors(device):
    dtype = torch.float32 if INTERPRETING else torch.float16
    q, pk, pv, gk, gv, _ = case(device, dtype=dtype)
    with pytest.raises(TypeError, match="PagedKV"):
        mt.sparse_decode_attention(q, gk, pv)
    other = gk.block_table.clone()
    with pytest.raises(ValueError, match="share one block_table"):
        mt.sparse_decode_attention(q, gk, gv.with_tables(other, gk.seq_lens))
    with pytest.raises(ValueError, match="page_size"):
        PagedKV(gk.bitmap[:, :, :8].contiguous(), gk.values[:, :, :8].contiguous(), gk.capacity, gk.head_dim,
                gk.block_table, gk.seq_lens)
    with pytest.raises(TypeError, match="block_table"):
        gk.with_tables(gk.block_table.long(), gk.seq_lens)
    with pytest.raises(ValueError, match="seq_lens shape"):
        gk.with_tables(gk.block_table, gk.seq_lens[:2])
    fewer = PagedKV(gv.bitmap[:-1].contiguous(), gv.values[:-1].contiguous(), gv.capacity, gv.head_dim,
                    gk.block_table, gk.seq_lens)
    with pytest.raises(ValueError, match="pages"):
        mt.sparse_decode_attention(q, gk, fewer)


@settings(max_examples=6 if INTERPRETING else 30)
@given(data=st.data())
def test_paged_property(data, device):
    """Hypothesis over page sizes, lengths and block tables (shuffled pages, shared pages, a bad
    entry): the paged call equals the float64 reference of gather_pages' view."""
    page_size = data.draw(st.sampled_from([16, 32, 48, 64] + ([] if INTERPRETING else [256])))
    b = data.draw(st.integers(1, 3))
    t = data.draw(st.integers(1, 3 * page_size))
    lens = [data.draw(st.integers(0, t)) for _ in range(b)]
    dtype = torch.float32 if INTERPRETING else data.draw(st.sampled_from(GPU_DTYPES))
    q, pk, pv, gk, gv, kw = case(device, b=b, t=t, seq_lens=lens, page_size=page_size, dtype=dtype,
                                 seed=data.draw(st.integers(0, 2**16)), w=data.draw(st.sampled_from([None, 3])))
    table = gk.block_table.clone()
    used = sorted(set(table.flatten().tolist()))  # the other pages hold random bits (NaN patterns too)
    for _ in range(data.draw(st.integers(0, 2))):  # rewire entries: another sequence's page, or outside the pool
        i, j = data.draw(st.integers(0, b - 1)), data.draw(st.integers(0, table.shape[1] - 1))
        table[i, j] = data.draw(st.sampled_from(used + [-2, -1, gk.num_pages, gk.num_pages + 1]))
    check_decode(q, gk.with_tables(table, gk.seq_lens), gv.with_tables(table, gk.seq_lens), **kw)


@pytest.mark.skipif(INTERPRETING, reason="Gluon has no interpreter: GPU only")
@pytest.mark.parametrize("gather", gluon_launch.GATHERS)
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gluon_paged_equals_contiguous(gather, page_size, dtype, device, decode_config):
    """Every Gluon gather on pages (a block-table lookup per 16-token tile) against its own
    contiguous call, with a window, several query tokens and more splits."""
    decode_config(**gluon_launch.GLUON_CONFIG, gather=gather)
    q, pk, pv, gk, gv, kw = case(device, b=3, hq=8, hkv=2, t=300, d=128, dtype=dtype, seq_lens=(300, 129, 17),
                                 page_size=page_size, w=6, seed=page_size)
    assert_paged_equals_contiguous(q, pk, pv, gk, gv, **kw)
    assert_paged_equals_contiguous(q, pk, pv, gk, gv, num_splits=5, **kw)
    q4 = randn((3, 3, 8, 128), dtype, 9, device)
    assert_paged_equals_contiguous(q4, pk, pv, gk, gv, **kw)
    table = gk.block_table.clone()
    table[0, 1], table[2, 0] = -1, gk.num_pages
    check_decode(q, gk.with_tables(table, gk.seq_lens), gv.with_tables(table, gk.seq_lens), **kw)


@pytest.mark.parametrize("gather", [None] + (list(gluon_launch.GATHERS) if not INTERPRETING else []))
def test_paged_exact_weights_equal_contiguous(gather, device, decode_config):
    """exact_weights on pages, with a window and several query tokens: bit for bit the contiguous
    call with it (decode.py's kernel; on a GPU also every Gluon gather), and on a GPU not the
    default call's result (bf16: the flag changes the P @ V product)."""
    if gather is not None:
        decode_config(**gluon_launch.GLUON_CONFIG, gather=gather)
    q, pk, pv, gk, gv, kw = case(device, b=3, hq=8, hkv=2, t=90, d=128, dtype=torch.bfloat16, seq_lens=(90, 41, 17),
                                 w=6, seed=43)
    q3 = randn((3, 3, 8, 128), torch.bfloat16, 44, device, scale=3.0)
    for query in (q, q3):
        want = mt.sparse_decode_attention(query, pk, pv, exact_weights=True, **kw)
        got = mt.sparse_decode_attention(query, gk, gv, max_seq_len=pk.num_tokens, exact_weights=True, **kw)
        assert torch.equal(got, want)
        if not INTERPRETING:
            assert not torch.equal(got, mt.sparse_decode_attention(query, gk, gv, max_seq_len=pk.num_tokens, **kw))
