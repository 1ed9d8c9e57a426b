"""prune_topk, pack, prune_and_pack, unpack against mustafar_triton.reference: exact equality.

What happens with special values (documented in compress.py, checked here):
  * NaN and +-inf have the largest magnitudes (|x| ordered by its bit pattern, NaN above inf), so
    top-k keeps them before any finite value; they pack and unpack bit-exactly (payload and sign).
  * -0.0 has magnitude 0. `pack` treats it as zero (not in the bitmap, unpacks to +0.0); top-k keeps
    it only when a row has fewer nonzeros than `keep` (lowest index first), and then keeps its bits.
  * denormals are ordinary small magnitudes (integer compare, no flush to zero).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mustafar_triton as mt
from mustafar_triton import reference as ref
from mustafar_triton.format import PackedKV, default_capacity, kept_per_token
from mt_testutils import (DTYPES, HEAD_DIMS, bit_equal, bits, gen, keep_count, popcount_rows,
                          rand_ties, randn, seed_of, sparse_values)


def assert_packed_equal(got: PackedKV, want: PackedKV):
    assert got.capacity == want.capacity and got.head_dim == want.head_dim
    assert got.bitmap.dtype == torch.int32 and got.values.dtype == want.values.dtype
    assert torch.equal(got.bitmap, want.bitmap), "bitmaps differ"
    assert bit_equal(got.values, want.values), "packed values differ"
    if want.seq_lens is None:
        assert got.seq_lens is None
    else:
        assert torch.equal(got.seq_lens, want.seq_lens)


# ------------------------------------------------------------------------------------------------
# Exact agreement with the reference over dtypes, head dims, odd token counts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("t", [1, 63, 257])
def test_prune_pack_unpack_match_reference(dtype, d, t, device):
    seed = seed_of(dtype, d, t)
    shape = (1, 2, t, d) if t > 100 else (2, 2, t, d)
    x = randn(shape, dtype, seed, device)
    x_orig = x.clone()
    sparsity = (0.7, 0.5, 0.33)[seed % 3]

    pruned = mt.prune_topk(x, sparsity)
    assert pruned.shape == x.shape and pruned.dtype == dtype
    assert bit_equal(pruned, ref.prune_topk(x, sparsity))

    packed = mt.prune_and_pack(x, sparsity)
    assert_packed_equal(packed, ref.prune_and_pack(x, sparsity))
    assert packed.capacity == default_capacity(d, sparsity)
    assert torch.all(popcount_rows(packed.bitmap) == keep_count(d, sparsity))

    unpacked = mt.unpack(packed)
    assert bit_equal(unpacked, pruned)
    assert bit_equal(unpacked, ref.unpack(packed))
    assert bit_equal(x, x_orig), "inputs must not be modified"


@pytest.mark.parametrize("shape", [(5, 64), (3, 17, 32), (2, 1, 3, 9, 128), (1, 1, 1, 1, 4, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_leading_dims(shape, device):
    x = randn(shape, torch.float16, len(shape) * 7 + shape[-2], device)
    assert bit_equal(mt.prune_topk(x, 0.6), ref.prune_topk(x, 0.6))
    packed = mt.prune_and_pack(x, 0.6)
    assert packed.shape == tuple(shape)
    assert_packed_equal(packed, ref.prune_and_pack(x, 0.6))
    assert bit_equal(mt.unpack(packed), ref.prune_topk(x, 0.6))
    # pack / unpack of an arbitrary pattern with these leading dims
    y = sparse_values(shape, torch.float16, 11, device)
    py = mt.pack(y)
    assert_packed_equal(py, ref.pack(y))
    assert bit_equal(mt.unpack(py), y)


def test_non_contiguous_input(device):
    # an NHD cache viewed as HND: [B, T, H, D] -> [B, H, T, D]
    x = randn((2, 9, 3, 64), torch.float32, 21, device).transpose(1, 2)
    assert not x.is_contiguous()
    assert bit_equal(mt.prune_topk(x, 0.7), ref.prune_topk(x, 0.7))
    assert_packed_equal(mt.prune_and_pack(x, 0.7), ref.prune_and_pack(x, 0.7))
    y = sparse_values((2, 9, 3, 64), torch.float32, 22, device).transpose(1, 2)
    assert bit_equal(mt.unpack(mt.pack(y)), y)


@pytest.mark.parametrize("shape", [(2, 2, 0, 64), (2, 0, 5, 64), (0, 2, 5, 64), (0, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_empty_inputs(shape, device):
    x = randn(shape, torch.float16, 3, device)
    assert mt.prune_topk(x, 0.5).shape == x.shape
    packed = mt.prune_and_pack(x, 0.5)
    assert packed.shape == tuple(shape) and packed.bitmap.numel() == 0
    assert mt.unpack(packed).shape == x.shape
    assert mt.pack(x).shape == tuple(shape)


# ------------------------------------------------------------------------------------------------
# Ragged batches
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ragged_seq_lens(dtype, device):
    b, h, t, d = 4, 2, 37, 64
    x = randn((b, h, t, d), dtype, 31, device)
    x[0, :, 20:] = float("nan")  # garbage past seq_lens must never be read into the result
    seq_lens = torch.tensor([0, t, 5, t - 1], dtype=torch.int32, device=device)
    sparsity = 0.7
    packed = mt.prune_and_pack(x, sparsity, seq_lens=seq_lens)
    assert_packed_equal(packed, ref.prune_and_pack(x, sparsity, seq_lens=seq_lens))
    assert packed.seq_lens is not None and torch.equal(packed.seq_lens, seq_lens)

    valid = torch.arange(t, device=device)[None, :] < seq_lens[:, None]          # [B, T]
    counts = popcount_rows(packed.bitmap)                                          # [B, H, T]
    expect = torch.where(valid[:, None, :], keep_count(d, sparsity), 0)
    assert torch.equal(counts, expect.expand_as(counts))
    assert torch.all(packed.values[~valid[:, None, :].expand(b, h, t)] == 0)

    dense = mt.unpack(packed)
    want = torch.where(valid[:, None, :, None], ref.prune_topk(x, sparsity), 0).to(dtype)
    assert bit_equal(dense, want)


def test_pack_seq_lens_ignores_rows_past_length(device):
    b, h, t, d = 3, 1, 20, 32
    x = sparse_values((b, h, t, d), torch.float16, 41, device, max_nnz=8, force_extremes=False)
    x[1, :, 10:] = 1.0  # full rows, but past seq_lens[1]: must neither count nor be packed
    seq_lens = torch.tensor([t, 10, 0], dtype=torch.int32, device=device)
    packed = mt.pack(x, capacity=8, seq_lens=seq_lens)  # would overflow if rows past 10 counted
    assert_packed_equal(packed, ref.pack(x, capacity=8, seq_lens=seq_lens))
    valid = (torch.arange(t, device=device)[None, :] < seq_lens[:, None])[:, None, :, None]
    assert bit_equal(mt.unpack(packed), torch.where(valid, x, 0).to(x.dtype))
    assert mt.pack(x, seq_lens=seq_lens).capacity == 8


# ------------------------------------------------------------------------------------------------
# Ties, zeros, -0.0, denormals, NaN and inf
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_lower_index_wins(dtype, device):
    d = 64
    x = rand_ties((3, 2, 19, d), dtype, 51, device, levels=2)
    for sparsity in (0.5, 0.7, 0.9):
        assert bit_equal(mt.prune_topk(x, sparsity), ref.prune_topk(x, sparsity))
        assert_packed_equal(mt.prune_and_pack(x, sparsity), ref.prune_and_pack(x, sparsity))
    # all magnitudes equal: exactly the first `keep` channels survive
    signs = torch.where(torch.rand(4, d, generator=gen(52)) < 0.5, -1.0, 1.0)
    flat = (signs * 0.375).to(dtype).to(device)
    keep = keep_count(d, 0.7)
    out = mt.prune_topk(flat, 0.7)
    first = torch.arange(d, device=device) < keep
    assert torch.equal(out != 0, first.expand(4, d))
    assert bit_equal(out[:, :keep], flat[:, :keep])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_zero(dtype, device):
    d = 32
    x = torch.zeros(4, d, dtype=dtype, device=device)
    x[:, 1::2] = -0.0
    x[0, 5], x[0, 20] = 3.0, -2.0           # two nonzeros, keep > 2: zeros fill up by index
    x[2, :] = -0.0                          # a row of only -0.0
    sparsity = 0.75                         # keep 8
    pruned = mt.prune_topk(x, sparsity)
    assert bit_equal(pruned, ref.prune_topk(x, sparsity))
    # the kept -0.0 entries keep their sign bit
    assert bit_equal(pruned[2, :8], x[2, :8]) and torch.all(bits(pruned[2, :8]) != 0)
    packed = mt.prune_and_pack(x, sparsity)
    assert_packed_equal(packed, ref.prune_and_pack(x, sparsity))
    assert torch.all(popcount_rows(packed.bitmap) == 8)
    assert bit_equal(mt.unpack(packed), pruned)
    # pack: -0.0 is zero, not in the bitmap; it unpacks to +0.0
    p = mt.pack(x)
    assert_packed_equal(p, ref.pack(x))
    assert popcount_rows(p.bitmap).tolist() == [2, 0, 0, 0]
    u = mt.unpack(p)
    assert torch.all(bits(u[1:]) == 0), "-0.0 must unpack to +0.0 after pack"
    assert u[0, 5] == 3.0 and u[0, 20] == -2.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_denormals(dtype, device):
    d = 64
    tiny = torch.finfo(dtype).tiny  # smallest normal; denormals are below it
    g = gen(61)
    scale = torch.rand(3, 5, d, generator=g) * tiny * 0.9
    signs = torch.where(torch.rand(3, 5, d, generator=g) < 0.5, -1.0, 1.0)
    x = (signs * scale).to(dtype)
    x[:, :, ::7] *= 0  # a few zeros among the denormals
    x[0, 0, 3] = 1.0   # and one normal value
    x = x.to(device)
    denormal = (x != 0) & (x.abs().float() < tiny)
    assert denormal.sum() > 400 and (x.abs() >= tiny).sum() == 1, "test data must be denormals"
    for sparsity in (0.5, 0.8):
        assert bit_equal(mt.prune_topk(x, sparsity), ref.prune_topk(x, sparsity))
        packed = mt.prune_and_pack(x, sparsity)
        assert_packed_equal(packed, ref.prune_and_pack(x, sparsity))
        assert bit_equal(mt.unpack(packed), ref.prune_topk(x, sparsity))
    # pack drops the zeros (the `*= 0` above made some of them -0.0, which unpack as +0.0)
    assert bit_equal(mt.unpack(mt.pack(x)), torch.where(x != 0, x, torch.zeros_like(x)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_are_kept_first_and_round_trip_bit_exactly(dtype, device):
    d, t = 64, 6
    x = randn((t, d), dtype, 71, device)
    width = 8 * x.element_size()
    nan_bits = {torch.float16: [0x7E00, 0xFE01, 0x7C01], torch.bfloat16: [0x7FC0, 0xFFC1, 0x7F81],
                torch.float32: [0x7FC00000, 0xFFC00001, 0x7F800001]}[dtype]  # quiet/signed/payload NaNs
    ity = torch.int32 if dtype == torch.float32 else torch.int16
    nans = torch.tensor([v - 2**width if v >= 2**(width - 1) else v for v in nan_bits],
                        dtype=ity).view(dtype).to(device)
    assert torch.isnan(nans).all()
    x[0, [2, 9, 40]] = nans
    x[1, [0, 63]] = torch.tensor([float("inf"), float("-inf")], dtype=dtype, device=device)
    x[2, :] = float("nan")                       # all NaN
    x[3, 10:50] = float("inf")                   # more infs than keep: lowest index wins
    x[4, 5] = float("nan")
    x[4, 6] = float("-inf")
    sparsity = 0.75                              # keep 16
    keep = keep_count(d, sparsity)

    pruned = mt.prune_topk(x, sparsity)
    assert bit_equal(pruned, ref.prune_topk(x, sparsity))
    nonfinite = ~torch.isfinite(x)
    for row in (0, 1, 4):
        assert torch.equal(bits(pruned[row][nonfinite[row]]), bits(x[row][nonfinite[row]])), \
            "NaN / inf must be kept (largest magnitudes), bit-exactly"
    assert bit_equal(pruned[2, :keep], x[2, :keep]) and torch.all(pruned[2, keep:] == 0)
    kept3 = (pruned[3] != 0).nonzero().flatten().tolist()
    assert kept3 == list(range(10, 10 + keep)), "ties among infs: lowest index first"

    packed = mt.prune_and_pack(x, sparsity)
    assert_packed_equal(packed, ref.prune_and_pack(x, sparsity))
    assert torch.all(popcount_rows(packed.bitmap) == keep)
    assert bit_equal(mt.unpack(packed), pruned)

    # pack / unpack of a pattern with NaN, inf and their payloads: bit-exact identity
    y = sparse_values((t, d), dtype, 72, device, max_nnz=48)
    y[0, [1, 2, 3]] = nans
    y[1, 7] = float("-inf")
    p = mt.pack(y)
    assert_packed_equal(p, ref.pack(y))
    assert bit_equal(mt.unpack(p), y)
    assert bit_equal(ref.unpack(p), y)


# ------------------------------------------------------------------------------------------------
# The two prune_and_pack kernels: prune_pack.py's (everywhere) and prune_pack_gluon.py's (GPU,
# fp16 / bf16, D 64 / 128 / 256; the default there). Both must give the reference's bits.
# ------------------------------------------------------------------------------------------------
def hard_rows(shape, dtype, seed, device) -> torch.Tensor:
    """Random rows plus the cases that take other paths: ties at the threshold, zeros, denormals,
    NaN / inf (also more of them than keep: the Gluon kernel's exact fallback), bf16 values past
    fp16's range, and thresholds in every magnitude range and at the edges of the 256-pattern
    buckets that the Gluon kernel searches on bytes (bits 14..8, then 7..1)."""
    assert shape[-2] >= 42, "hard_rows sets rows 0..41"
    x = randn(shape, dtype, seed, device)
    d = shape[-1]
    x[..., 0:6, :] = rand_ties(x[..., 0:6, :].shape, dtype, seed + 1, device, levels=4)
    x[..., 6, : d // 2] = 0
    x[..., 7, :] = torch.finfo(dtype).tiny / 4 * torch.arange(d, device=device).to(dtype)
    x[..., 8, 3:9] = float("nan")
    x[..., 9, :] = float("inf")
    x[..., 10, ::2] = float("-inf")
    x[..., 11, 1::3] = float("nan")
    if dtype == torch.bfloat16:
        x[..., 12, :] *= 2.0 ** 125  # magnitudes whose bits are fp16 NaN patterns
    x[..., 13:40, :] *= torch.exp2(torch.arange(-24, 3, device=device, dtype=torch.float32)).to(dtype)[:, None]
    sign = torch.where(x[..., 40:42, :] < 0, -0x8000, 0).to(torch.int16)
    ch = torch.arange(d, device=device)
    bits = torch.stack([0x3C00 + ch * 37 % 256,  # one bucket: every magnitude shares its high byte
                        torch.tensor([0x3BFF, 0x3C00, 0x3CFF, 0x3D00], device=device)[ch % 4]])  # its edges
    x[..., 40:42, :] = (bits.to(torch.int16) | sign).view(dtype)
    return x


@pytest.mark.cuda_only
@pytest.mark.parametrize("kernel", ["gluon", "tl"])
@pytest.mark.parametrize("dtype,d,sparsity", [(torch.float16, 128, 0.7), (torch.bfloat16, 64, 0.5),
                                              (torch.float16, 256, 0.9), (torch.bfloat16, 128, 0.3)],
                         ids=str)
def test_prune_and_pack_kernels(kernel, dtype, d, sparsity, device, monkeypatch):
    from mustafar_triton import autotune
    from mustafar_triton.kernels import prune_pack_gluon
    launches = []
    launch = prune_pack_gluon.launch_prune_and_pack
    monkeypatch.setattr(prune_pack_gluon, "launch_prune_and_pack", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    x = hard_rows((3, 2, 301, d), dtype, seed_of(dtype, d, 301), device)
    seq_lens = torch.tensor([301, 0, 117], dtype=torch.int32, device=device)
    cfg = autotune.GLUON_SELECT_CONFIG if kernel == "gluon" else autotune.tl_select_config(False)
    with autotune.forced_config("select", cfg):
        for lens in (None, seq_lens):
            assert_packed_equal(mt.prune_and_pack(x, sparsity, seq_lens=lens),
                                ref.prune_and_pack(x, sparsity, seq_lens=lens))
        # a Gluon config leaves prune_topk to the tl kernel
        assert bit_equal(mt.prune_topk(x, sparsity), ref.prune_topk(x, sparsity))
    assert len(launches) == (2 if kernel == "gluon" else 0)


def test_prune_and_pack_falls_back_before_ampere(device, monkeypatch):
    """Where Gluon cannot run (no mma.sync m16n8k16 before compute capability 8.0, an unchecked
    triton: _gluon_compat.gluon_runs_on), the tl kernel packs."""
    from mustafar_triton import autotune, compress
    from mustafar_triton.kernels import prune_pack_gluon

    def no_gluon(*args):
        raise AssertionError("the Gluon kernel must not be launched here")
    monkeypatch.setattr(compress, "gluon_runs_on", lambda dev: False)
    monkeypatch.setattr(prune_pack_gluon, "launch_prune_and_pack", no_gluon)
    x = hard_rows((2, 1, 45, 128), torch.float16, 91, device)
    with autotune.forced_config("select", autotune.GLUON_SELECT_CONFIG):
        assert_packed_equal(mt.prune_and_pack(x, 0.7), ref.prune_and_pack(x, 0.7))


# ------------------------------------------------------------------------------------------------
# Properties: sparsity 0, idempotence, popcount, consistency of the three entry points
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparsity_zero_keeps_everything(dtype, device):
    x = rand_ties((2, 3, 11, 128), dtype, 81, device, levels=5)  # zeros included
    x[0, 0, 0, 0] = -0.0
    assert bit_equal(mt.prune_topk(x, 0.0), x)
    assert bit_equal(mt.prune_topk(x, 0), x)  # int sparsity
    packed = mt.prune_and_pack(x, 0.0)
    assert packed.capacity == 128
    assert torch.all(popcount_rows(packed.bitmap) == 128) and torch.all(packed.bitmap == -1)
    assert bit_equal(packed.values, x)
    assert bit_equal(mt.unpack(packed), x)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7, 0.97])
def test_pruning_is_idempotent(sparsity, device):
    x = randn((2, 2, 33, 64), torch.float16, int(sparsity * 100), device)
    once = mt.prune_topk(x, sparsity)
    assert bit_equal(mt.prune_topk(once, sparsity), once)
    # pruning again at a lower sparsity keeps every survivor (and only zeros besides)
    assert torch.equal(mt.prune_topk(once, sparsity / 2), once)
    # and pack(prune_topk(x)) is prune_and_pack(x) when the data has no zeros
    assert torch.all(x != 0)
    assert_packed_equal(mt.pack(once), mt.prune_and_pack(x, sparsity))


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_popcount_equals_keep(d, device):
    x = randn((3, 1, 21, d), torch.bfloat16, d, device)
    seq_lens = torch.tensor([21, 0, 13], dtype=torch.int32, device=device)
    valid = (torch.arange(21, device=device)[None, :] < seq_lens[:, None])[:, None, :]
    for sparsity in (0.0, 0.3, 0.5, 0.7, 0.9, 0.99, 0.9999):  # 0.9999: keep 1
        packed = mt.prune_and_pack(x, sparsity, seq_lens=seq_lens)
        keep = d - math.floor(sparsity * d)
        assert keep == kept_per_token(d, sparsity)
        counts = popcount_rows(packed.bitmap)
        assert torch.equal(counts, torch.where(valid, keep, 0).expand_as(counts)), sparsity
        assert bit_equal(mt.unpack(packed)[valid.expand(3, 1, 21)],
                         mt.prune_topk(x, sparsity)[valid.expand(3, 1, 21)])


# ------------------------------------------------------------------------------------------------
# pack / unpack on arbitrary patterns, capacity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 128])
def test_pack_unpack_round_trip(dtype, d, device):
    x = sparse_values((2, 3, 40, d), dtype, 91 + d, device)  # densities from empty to full rows
    packed = mt.pack(x)
    assert packed.capacity == d  # a full row forces capacity D
    assert_packed_equal(packed, ref.pack(x))
    assert torch.equal(popcount_rows(packed.bitmap), (x != 0).sum(-1))
    assert bit_equal(mt.unpack(packed), x)


@pytest.mark.parametrize("max_nnz,capacity", [(0, 8), (1, 8), (8, 8), (9, 16), (37, 40)])
def test_pack_default_capacity(max_nnz, capacity, device):
    x = sparse_values((1, 2, 17, 64), torch.float32, 101 + max_nnz, device, max_nnz=max_nnz)
    packed = mt.pack(x)
    assert packed.capacity == capacity
    assert_packed_equal(packed, ref.pack(x))
    assert bit_equal(mt.unpack(packed), x)
    # an explicit larger capacity works too and pads with zeros
    big = mt.pack(x, capacity=64)
    assert big.capacity == 64 and torch.equal(big.bitmap, packed.bitmap)
    assert bit_equal(big.values[..., :capacity], packed.values) and torch.all(big.values[..., capacity:] == 0)
    assert bit_equal(mt.unpack(big), x)


def test_pack_capacity_overflow_raises(device):
    x = sparse_values((1, 1, 9, 64), torch.float16, 111, device, min_nnz=3, max_nnz=17)
    mt.pack(x, capacity=24)
    with pytest.raises(ValueError, match="17 nonzeros.*capacity=16"):
        mt.pack(x, capacity=16)
    with pytest.raises(ValueError, match="capacity"):
        ref.pack(x, capacity=16)


# ------------------------------------------------------------------------------------------------
# Size of the format
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity,ratio", [(0.7, 0.375), (0.5, 0.5625)])
def test_nbytes_target(sparsity, ratio, device):
    b, h, t, d = 2, 2, 24, 128
    x = randn((b, h, t, d), torch.float16, 121, device)
    dense_bytes = x.numel() * x.element_size()
    packed = mt.prune_and_pack(x, sparsity)
    assert packed.nbytes <= ratio * dense_bytes
    assert packed.nbytes == ratio * dense_bytes  # exactly: D/8 + 2 * capacity bytes per token
    assert packed.nbytes == packed.bitmap.numel() * 4 + packed.values.numel() * 2
    ragged = mt.prune_and_pack(x, sparsity, seq_lens=torch.full((b,), t, dtype=torch.int32, device=device))
    assert ragged.nbytes == packed.nbytes + 4 * b  # the seq_lens buffer is counted


# ------------------------------------------------------------------------------------------------
# Property-based tests
# ------------------------------------------------------------------------------------------------
@st.composite
def dense_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    d = draw(st.sampled_from(HEAD_DIMS))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    t = draw(st.integers(1, 70))
    kind = draw(st.sampled_from(["normal", "ties", "sparse"]))
    sparsity = draw(st.one_of(st.sampled_from([0.0, 0.5, 0.7]), st.floats(0.0, 0.99)))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, d, tuple(lead) + (t, d), kind, sparsity, seed


def _make(kind, shape, dtype, seed, device):
    if kind == "normal":
        return randn(shape, dtype, seed, device, scale=10.0)
    if kind == "ties":
        return rand_ties(shape, dtype, seed, device, levels=2)
    return sparse_values(shape, dtype, seed, device)  # all-zero to all-kept rows


@settings(max_examples=25, deadline=None)
@given(case=dense_cases())
def test_property_prune_and_pack_match_reference(case, device):
    dtype, d, shape, kind, sparsity, seed = case
    x = _make(kind, shape, dtype, seed, device)
    pruned = mt.prune_topk(x, sparsity)
    assert bit_equal(pruned, ref.prune_topk(x, sparsity))
    assert bit_equal(mt.prune_topk(pruned, sparsity), pruned)  # idempotent
    packed = mt.prune_and_pack(x, sparsity)
    assert_packed_equal(packed, ref.prune_and_pack(x, sparsity))
    assert torch.all(popcount_rows(packed.bitmap) == keep_count(d, sparsity))
    assert bit_equal(mt.unpack(packed), pruned)


@st.composite
def pattern_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    d = draw(st.sampled_from(HEAD_DIMS))
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 2))
    t = draw(st.integers(1, 40))
    max_nnz = draw(st.integers(0, d))
    ragged = draw(st.booleans())
    lens = draw(st.lists(st.integers(0, t), min_size=b, max_size=b)) if ragged else None
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, (b, h, t, d), max_nnz, lens, seed


@settings(max_examples=20, deadline=None)
@given(case=pattern_cases())
def test_property_pack_unpack_identity(case, device):
    dtype, shape, max_nnz, lens, seed = case
    x = sparse_values(shape, dtype, seed, device, max_nnz=max_nnz)
    seq_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)
    packed = mt.pack(x, seq_lens=seq_lens)
    assert_packed_equal(packed, ref.pack(x, seq_lens=seq_lens))
    want = x
    if seq_lens is not None:
        valid = (torch.arange(shape[2], device=device)[None, :] < seq_lens[:, None])[:, None, :, None]
        want = torch.where(valid, x, torch.zeros((), dtype=dtype, device=device))
    assert packed.capacity == max(8, -(-int((want != 0).sum(-1).max()) // 8) * 8)
    assert bit_equal(mt.unpack(packed), want)
    assert torch.equal(popcount_rows(packed.bitmap), (want != 0).sum(-1))
