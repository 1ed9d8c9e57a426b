"""fp8 (float8_e4m3fn) kept values: rounding and widening (kernels/fp8.py), prune / pack / unpack /
write_pages, decode against float64 references on the same fp8 data, the caches and the custom
ops, and the errors of what is not supported."""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

import mustafar_triton as mt
from mustafar_triton import attention, autotune
from mustafar_triton import reference as ref
from mustafar_triton.kernels import decode_gluon_launch as gluon_launch
from mustafar_triton.kernels.fp8 import fp8_e4m3_bits, fp8_e4m3_value
from conftest import INTERPRETING
from mt_testutils import DTYPES, bit_equal, randn, rel_err, seed_of, sparse_values

FP8 = torch.float8_e4m3fn


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, inv_scale, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, fp8_e4m3_bits(tl.load(x_ptr + i, mask=i < n), inv_scale), mask=i < n)


@triton.jit
def _widen_kernel(raw_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, fp8_e4m3_value(tl.load(raw_ptr + i)))


def _round(x: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), 1.0 / scale, BLOCK=1024)
    return out


@pytest.mark.parametrize("scale", [1.0, 0.0123, 3.0])
def test_rounding_of_every_fp16_value_matches_the_reference(device, scale):
    """All 65,536 fp16 bit patterns (subnormals, the 448 / 464 / 480 boundaries, inf, NaN)."""
    x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).to(device)
    got, want = _round(x, scale).cpu(), u8(ref.to_fp8(x.cpu(), scale))
    nan = (want & 0x7F) == 0x7F   # NaN's sign is not kept on GPUs (their float conversions drop it)
    assert nan.sum() == 2 * 1023 + 2 * 1   # fp16 NaNs, and +-inf
    assert torch.equal(got[~nan], want[~nan]) and ((got[nan] & 0x7F) == 0x7F).all()


def test_rounding_of_float32_values_matches_torch(device):
    """Random float32 magnitudes across e4m3's range and beyond, plus the exact ties: inside
    +-448 the bits are torch's own cast's (round to nearest even)."""
    g = torch.Generator().manual_seed(7)
    mags = torch.exp2(torch.empty(20000).uniform_(-14, 10, generator=g))
    signs = torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)
    ties = torch.tensor([2**-10, 3 * 2**-10, 2**-6 * 17 / 16, 2**-6 * 31 / 16, 1.0625, 1.1875, 448.0, 464.0, 470.0])
    x = torch.cat([mags * signs, ties, -ties])
    got = _round(x.to(device), 1.0).cpu()
    assert torch.equal(got, u8(ref.to_fp8(x)))
    inside = x.abs() <= 448
    assert torch.equal(got[inside], u8(x[inside].to(FP8)))
    assert torch.equal(got[x.abs() >= 464], torch.where(x[x.abs() >= 464] > 0, 0x7E, 0xFE).to(torch.uint8))


def test_widening_is_exact_for_every_byte(device):
    raw = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(256, dtype=torch.float32, device=device)
    _widen_kernel[(1,)](raw.to(device), out, BLOCK=256)
    want = raw.view(FP8).float()
    out = out.cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.isnan(want).sum() == 2
    assert bit_equal(out[~torch.isnan(want)], want[~torch.isnan(want)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,sparsity", [(32, 0.5), (64, 0.3), (96, 0.75), (128, 0.7), (256, 0.9)])
def test_prune_and_pack_matches_the_reference(device, dtype, head_dim, sparsity):
    seed = seed_of("fp8-pack", dtype, head_dim, sparsity)
    x = randn((2, 3, 21, head_dim), dtype, seed, device, scale=30.0)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -1e4], dtype=dtype)  # kept first
    lens = torch.tensor([21, 9], dtype=torch.int32, device=device)
    for scale in (1.0, 0.07):
        got = mt.prune_and_pack(x, sparsity, lens, value_dtype=FP8, value_scale=scale)
        want = ref.prune_and_pack(x, sparsity, lens, value_dtype=FP8, value_scale=scale)
        assert got.values.dtype == FP8 and got.capacity == want.capacity and got.capacity % 16 == 0
        assert got.value_scale == scale
        assert torch.equal(got.bitmap, want.bitmap)
        assert torch.equal(u8(got.values), u8(want.values))
        # the same selection as fp16 values, and unpack gives the rounded values times the scale
        plain = mt.prune_and_pack(x, sparsity, lens)
        assert torch.equal(got.bitmap, plain.bitmap)
        dense = mt.unpack(got)
        assert dense.dtype == torch.float32
        assert torch.equal(torch.nan_to_num(dense, 5.0), torch.nan_to_num(ref.unpack(want), 5.0))
        kept = ref.bitmap_mask(got) & ~torch.isnan(dense)
        exact = ref.unpack(plain).float()[kept]
        rounded = dense[kept]
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 above the subnormals (2^-6 * scale)
        normal = exact.abs() >= 2**-6 * scale
        assert ((rounded[normal] - exact[normal].clamp(-448 * scale, 448 * scale)).abs()
                <= exact[normal].abs().clamp(max=448 * scale) * 2**-4 + 1e-30).all()
        assert torch.isnan(dense[0, 0, 0, :2]).all() and dense[0, 0, 0, 2] == -448 * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_into_a_dtype(device, dtype):
    x = randn((1, 2, 17, 64), torch.float16, seed_of("fp8-unpack", dtype), device, scale=5.0)
    p = mt.prune_and_pack(x, 0.5, value_dtype=FP8, value_scale=0.3)
    got = mt.unpack(p, dtype)
    assert got.dtype == dtype and bit_equal(got, ref.unpack(p, dtype))


@given(seed=st.integers(0, 2**20), density=st.floats(0.0, 1.0), head_dim=st.sampled_from([32, 64, 128]),
       scale=st.sampled_from([1.0, 0.5, 0.011]))
def test_pack_any_pattern_property(device, seed, density, head_dim, scale):
    """Random sparsity patterns (empty and full rows included) packed with fp8 values."""
    x = sparse_values((2, 1, 19, head_dim), torch.float16, seed, device,
                      max_nnz=max(0, round(density * head_dim)))
    got = mt.pack(x, value_dtype=FP8, value_scale=scale)
    want = ref.pack(x, value_dtype=FP8, value_scale=scale)
    assert got.capacity == want.capacity and got.capacity % 16 == 0
    assert torch.equal(got.bitmap, want.bitmap) and torch.equal(u8(got.values), u8(want.values))
    assert torch.equal(mt.unpack(got), ref.unpack(want))


def _decode_case(device, dtype, seed, b=3, hkv=2, group=4, t=53, d=64, window=6, ks=0.6, vs=0.45):
    """fp8 K / V stores (ragged lengths) and a dense window in dtype."""
    k, v = (randn((b, hkv, t, d), dtype, seed + i, device, scale=3.0) for i in range(2))
    q = randn((b, hkv * group, d), dtype, seed + 2, device)
    kw, vw = (randn((b, hkv, window, d), dtype, seed + 3 + i, device) for i in range(2))
    lens = torch.tensor([t, 19, 0][:b], dtype=torch.int32, device=device)
    wl = torch.tensor([window, 2, 5][:b], dtype=torch.int32, device=device)
    pk = mt.prune_and_pack(k, ks, lens, value_dtype=FP8, value_scale=0.02)
    pv = mt.prune_and_pack(v, vs, lens, value_dtype=FP8, value_scale=0.5)
    return q, pk, pv, dict(k_window=kw, v_window=vw, window_lens=wl)


def _tolerance(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_decode_matches_the_float64_reference(device, dtype, head_dim):
    q, pk, pv, window = _decode_case(device, dtype, seed_of("fp8-decode", dtype, head_dim), d=head_dim)
    out, lse = mt.sparse_decode_attention(q, pk, pv, **window, return_lse=True)
    want, want_lse = ref.sparse_decode_attention(q, pk, pv, **window, return_lse=True)
    assert out.dtype == dtype
    assert rel_err(out, want) < _tolerance(dtype)
    assert torch.allclose(lse, want_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_bf16_queries_of_any_magnitude(device, head_dim):
    """The fp8 walks multiply bf16 queries in fp16, each (token, head) row scaled by a power of two
    (decode_gluon._fp16_query): rows 2^40 and 2^-40 times the others, a row of zeros and a row
    whose channels lie 2^30 apart all match the float64 reference, out and lse."""
    dtype = torch.bfloat16
    q, pk, pv, window = _decode_case(device, dtype, seed_of("fp8-q-range", head_dim), d=head_dim)
    q = q.clone()
    q[:, 0] *= 2.0 ** 40
    q[:, 1] *= 2.0 ** -40
    q[:, 2] = 0
    q[:, 5, ::3] *= 2.0 ** 30
    out, lse = mt.sparse_decode_attention(q, pk, pv, **window, return_lse=True)
    want, want_lse = ref.sparse_decode_attention(q, pk, pv, **window, return_lse=True)
    assert rel_err(out, want) < _tolerance(dtype)
    assert torch.allclose(lse, want_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_value_scales_keep_the_weights_precise(device, dtype):
    """V's value scale multiplies the float32 accumulator, not P before its rounding: at a scale of
    1e-5, P times it would be fp16 subnormals (a few significant bits)."""
    q, pk, _, window = _decode_case(device, dtype, seed_of("fp8-small-scale", dtype))
    v = randn((3, 2, 53, 64), dtype, seed_of("fp8-small-scale-v", dtype), device, scale=1e-3)
    pv = mt.prune_and_pack(v, 0.45, pk.seq_lens, value_dtype=FP8, value_scale=1e-5)
    out = mt.sparse_decode_attention(q, pk, pv)
    assert rel_err(out, ref.sparse_decode_attention(q, pk, pv)) < _tolerance(dtype)


@pytest.mark.parametrize("gather", [None, "walk", "walk_halves"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_both_walks_read_fp8_values(device, dtype, head_dim, gather):
    """fp8 values run the walk a Gluon config names, or the policy's (decode_gluon_launch.
    fp8_gather: the walk where none is named), contiguous and paged, as the float64
    reference computes."""
    q, pk, pv, window = _decode_case(device, dtype, seed_of("fp8-walks", dtype, head_dim), d=head_dim, ks=0.375,
                                     vs=0.5)
    gk, gv = ref.pages_from_packed([pk, pv], 16, generator=torch.Generator().manual_seed(5))
    cfg = gluon_launch.GLUON_CONFIG  # names no gather
    with autotune.forced_config("decode", dict(cfg, gather=gather) if gather else cfg):
        out = mt.sparse_decode_attention(q, pk, pv, **window)
        ran = attention.launched_gather(q, pk, pv, **window)
        paged = mt.sparse_decode_attention(q, gk, gv, **window)
    expected = gather or "walk"
    assert pk.capacity == 80 * head_dim // 128 and ran == (None if INTERPRETING else expected)
    want = ref.sparse_decode_attention(q, pk, pv, **window)
    assert rel_err(out, want) < _tolerance(dtype) and rel_err(paged, want) < _tolerance(dtype)


def test_decode_without_window_gqa_and_several_query_tokens(device):
    q, pk, pv, window = _decode_case(device, torch.float16, seed_of("fp8-lq"), group=3)
    out = mt.sparse_decode_attention(q, pk, pv)
    assert rel_err(out, ref.sparse_decode_attention(q, pk, pv)) < 2e-3
    q4 = randn((q.shape[0], 3, q.shape[1], q.shape[2]), torch.float16, 11, device)
    out4 = mt.sparse_decode_attention(q4, pk, pv, **window)
    assert rel_err(out4, ref.sparse_decode_attention(q4, pk, pv, **window)) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_decode_and_write_pages(device, dtype):
    q, pk, pv, window = _decode_case(device, dtype, seed_of("fp8-paged", dtype))
    gk, gv = ref.pages_from_packed([pk, pv], 16, extra_pages=2, generator=torch.Generator().manual_seed(3))
    assert gk.fp8 and gk.value_scale == pk.value_scale
    out = mt.sparse_decode_attention(q, gk, gv, **window)
    assert rel_err(out, ref.sparse_decode_attention(q, pk, pv, **window)) < _tolerance(dtype)
    # write_pages into the fp8 pools: the written rows equal the reference's, nothing else moves
    x = randn((5, pk.shape[1], pk.head_dim), dtype, 21, device, scale=4.0)
    slots = torch.tensor([0, 17, -1, 40, 3], dtype=torch.int32, device=device)
    before_bits, before_vals = gk.bitmap.clone(), u8(gk.values).clone()
    mt.write_pages(gk, x, slots, 0.6)
    want_bits, want_vals = before_bits.clone(), before_vals.clone()
    want = ref.PagedKV(want_bits, want_vals.view(FP8), gk.capacity, gk.head_dim, gk.block_table, gk.seq_lens,
                       gk.value_scale)
    ref.write_pages(want, x, slots, 0.6)
    assert torch.equal(gk.bitmap, want.bitmap) and torch.equal(u8(gk.values), u8(want.values))


def test_nan_and_inf_reach_only_their_heads(device):
    """A NaN and an inf kept in one sequence's K reach that sequence's kv head's outputs as NaN
    (inf is stored as NaN), and no other sequence or kv head."""
    dtype = torch.float16
    k = randn((2, 2, 20, 64), dtype, 5, device)
    v = randn((2, 2, 20, 64), dtype, 6, device)
    k[1, 0, 4, 7] = float("inf")
    k[1, 0, 9, 3] = float("nan")
    pk = mt.prune_and_pack(k, 0.5, value_dtype=FP8)
    pv = mt.prune_and_pack(v, 0.5, value_dtype=FP8)
    q = randn((2, 4, 64), dtype, 7, device)
    out = mt.sparse_decode_attention(q, pk, pv)
    bad = torch.isnan(out).any(-1)
    assert bad[1, :2].all() and not bad[0].any() and not bad[1, 2:].any()


@pytest.mark.parametrize("static", [False, True])
def test_sparse_kv_cache_with_fp8_values(device, static):
    dtype = torch.float16
    b, hkv, d = 2, 2, 64
    kw = dict(dtype=dtype, device=device, sinks=2)
    fp8 = mt.SparseKVCache(b, hkv, d, 48, 8, 0.5, 0.75, value_dtype=FP8, value_scale=(0.02, 0.5), **kw)
    plain = mt.SparseKVCache(b, hkv, d, 48, 8, 0.5, 0.75, **kw)
    assert (fp8.packed_k.capacity, fp8.packed_v.capacity) == (32, 16)
    assert fp8.nbytes < plain.nbytes
    k, v = (randn((b, hkv, 30, d), dtype, 30 + i, device) for i in range(2))
    lens = torch.tensor([30, 13], dtype=torch.int32, device=device)
    for cache in (fp8, plain):
        cache.prefill(k, v, lens)
    for step in range(11):
        kn, vn = (randn((b, hkv, 1, d), dtype, 100 + 2 * step + i, device) for i in range(2))
        for cache in (fp8, plain):
            (cache.append_static if static else cache.append)(kn, vn)
    assert torch.equal(fp8.seq_lens, plain.seq_lens) and torch.equal(fp8.k_window, plain.k_window)
    # the same tokens stored, with the same selection; the values are e4m3 of the fp16 ones
    for p8, p16 in ((fp8.packed_k, plain.packed_k), (fp8.packed_v, plain.packed_v)):
        assert torch.equal(p8.bitmap, p16.bitmap)
        cap = min(p8.capacity, p16.capacity)
        assert torch.equal(u8(p8.values[..., :cap]), u8(ref.to_fp8(p16.values[..., :cap], p8.value_scale)))
    q = randn((b, hkv * 3, d), dtype, 9, device)
    out = fp8.attend(q)
    assert rel_err(out, ref.sparse_decode_attention(q, fp8.packed_k, fp8.packed_v, **fp8.window_kwargs())) < 2e-3
    assert rel_err(out, plain.attend(q)) < 0.1
    op = mt.sparse_decode_attention_op(q, fp8.packed_k, fp8.packed_v, **fp8.window_kwargs())
    assert torch.equal(op, out)


def test_nbytes_of_fp8_values():
    """D=128, sparsity 0.5: 16 bytes of bitmap + 64 of values per token and head, 31.25% of fp16."""
    x = torch.zeros(1, 1, 16, 128, dtype=torch.float16)
    p = ref.prune_and_pack(x + 1, 0.5, value_dtype=FP8)
    assert p.nbytes == 16 * (16 + 64) and math.isclose(p.nbytes / (16 * 256), 0.3125)


def test_errors(device):
    x = randn((1, 2, 16, 64), torch.float16, 1, device)
    with pytest.raises(TypeError, match="value_dtype"):
        mt.prune_and_pack(x, 0.5, value_dtype=torch.int8)
    with pytest.raises(ValueError, match="value_scale"):
        mt.prune_and_pack(x, 0.5, value_dtype=FP8, value_scale=0.0)
    with pytest.raises(ValueError, match="value_scale"):
        mt.prune_and_pack(x, 0.5, value_dtype=FP8, value_scale=float("inf"))
    with pytest.raises(ValueError, match="needs value_dtype"):
        mt.prune_and_pack(x, 0.5, value_scale=2.0)
    with pytest.raises(TypeError, match="value_scale"):
        mt.pack(x, value_dtype=FP8, value_scale="1")
    with pytest.raises(ValueError, match="multiple of 16"):
        mt.pack(x, capacity=40, value_dtype=FP8)
    p8 = mt.prune_and_pack(x, 0.5, value_dtype=FP8)
    with pytest.raises(ValueError, match="multiple of 16"):
        mt.PackedKV(p8.bitmap, torch.zeros(1, 2, 16, 40, dtype=FP8, device=device), 40, 64)
    with pytest.raises(TypeError, match="fp8 values only"):
        mt.unpack(mt.prune_and_pack(x, 0.5), torch.float32)
    with pytest.raises(TypeError, match="fp8 values only"):
        mt.unpack(p8, torch.int32)
    q = randn((1, 4, 64), torch.float16, 2, device)
    with pytest.raises(TypeError, match="fp8 values are supported in both caches or in neither"):
        mt.sparse_decode_attention(q, p8, mt.prune_and_pack(x, 0.5))
    with pytest.raises(ValueError, match="value_scale"):
        mt.SparseKVCache(1, 2, 64, 16, 4, 0.5, 0.5, device=device, value_dtype=FP8, value_scale=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="needs value_dtype"):
        mt.SparseKVCache(1, 2, 64, 16, 4, 0.5, 0.5, device=device, value_scale=0.5)


def test_paged_sparse_kv_cache_with_fp8_values(device):
    """Joins, appends and a finish with fp8 pools: write_pages' kernel writes what
    reference.write_pages writes, and attend matches the float64 reference over the pools."""
    kw = dict(num_kv_heads=2, head_dim=64, num_pages=12, page_size=16, max_seqs=4, max_pages_per_seq=4,
              k_sparsity=0.25, v_sparsity=0.5, window=4, dtype=torch.bfloat16, device=device,
              value_dtype=FP8, value_scale=(0.01, 0.1))
    caches = [mt.PagedSparseKVCache(**kw), mt.PagedSparseKVCache(**kw, writer=ref.write_pages)]
    for cache in caches:
        a = cache.join(randn((2, 37, 64), torch.bfloat16, 1, device), randn((2, 37, 64), torch.bfloat16, 2, device))
        b = cache.join(randn((2, 21, 64), torch.bfloat16, 3, device), randn((2, 21, 64), torch.bfloat16, 4, device))
        cache.finish(a)
        cache.append([b], randn((1, 2, 64), torch.bfloat16, 5, device), randn((1, 2, 64), torch.bfloat16, 6, device))
    got, want = caches
    assert got.paged_k.values.dtype == FP8 and got.paged_k.capacity == 48
    for g, w in ((got.paged_k, want.paged_k), (got.paged_v, want.paged_v)):
        assert torch.equal(g.bitmap, w.bitmap) and torch.equal(u8(g.values), u8(w.values))
    q = randn((4, 6, 64), torch.bfloat16, 9, device)
    window = dict(k_window=got.k_window, v_window=got.v_window, window_lens=got.window_lens)
    assert rel_err(got.attend(q), ref.sparse_decode_attention(q, got.paged_k, got.paged_v, **window)) < 1.6e-2
