"""Head dim 96 (Phi-3): three bitmap words per token, run by the tl kernels in tiles of 128 with the
last 32 channels masked. Exact against the references for prune / pack / unpack (bit patterns,
NaN / inf / ties / zeros included), the 2x rule against float64 for decode, and never a Gluon
kernel (they need D a power of two)."""
import pytest
import torch

import mustafar_triton as mt
from mustafar_triton import autotune
from mustafar_triton import reference as ref
from mustafar_triton.kernels import decode as decode_kernels
from mustafar_triton.kernels.decode_gluon_launch import GLUON_CONFIG, gluon_decode_supports
from mustafar_triton.kernels.prune_pack import gluon_prune_supports
from mt_testutils import DTYPES, bit_equal, keep_count, popcount_rows, rand_ties, randn, seed_of, sparse_values
from test_compress import assert_packed_equal, hard_rows
from test_decode import check_decode, make_case

D = 96


def rows_with_ties_and_specials(shape, dtype, seed, device):
    """test_compress.hard_rows (fp16 / bf16 bit patterns), or for fp32 its ties, zeros, NaN / inf."""
    if dtype != torch.float32:
        return hard_rows(shape, dtype, seed, device)
    x = randn(shape, dtype, seed, device)
    x[..., 0:6, :] = rand_ties(x[..., 0:6, :].shape, dtype, seed + 1, device, levels=4)
    x[..., 6, : D // 2] = 0
    x[..., 8, 3:9] = float("nan")
    x[..., 9, :] = float("inf")
    x[..., 10, ::2] = float("-inf")
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9])
def test_prune_pack_unpack_exact(dtype, sparsity, device):
    x = rows_with_ties_and_specials((2, 2, 45, D), dtype, seed_of(dtype, sparsity, D), device)
    lens = torch.tensor([45, 17], dtype=torch.int32, device=device)
    pruned = mt.prune_topk(x, sparsity)
    assert bit_equal(pruned, ref.prune_topk(x, sparsity))
    packed = mt.prune_and_pack(x, sparsity, seq_lens=lens)
    assert_packed_equal(packed, ref.prune_and_pack(x, sparsity, seq_lens=lens))
    assert packed.bitmap.shape == (2, 2, 45, 3) and packed.capacity == -(-keep_count(D, sparsity) // 8) * 8
    counts = popcount_rows(packed.bitmap)
    assert torch.all(counts[0] == keep_count(D, sparsity)) and torch.all(counts[1, :, :17] == keep_count(D, sparsity))
    assert torch.all(counts[1, :, 17:] == 0) and torch.all(packed.values[1, :, 17:] == 0)
    unpacked = mt.unpack(packed)
    assert bit_equal(unpacked[0], pruned[0]) and bit_equal(unpacked[1, :, :17], pruned[1, :, :17])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("capacity", [None, 96])
def test_any_pattern_round_trips(dtype, capacity, device):
    """pack / unpack is the identity on any pattern, from all-zero rows to all 96 channels kept
    (the third bitmap word's high bits included)."""
    x = sparse_values((3, 1, 33, D), dtype, seed_of(dtype, capacity, D), device)
    x[0, 0, 5, 64:] = 1.5  # a row whose third word is full
    packed = mt.pack(x, capacity=capacity)
    assert_packed_equal(packed, ref.pack(x, capacity=capacity))
    assert bit_equal(mt.unpack(packed), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (32, 8)], ids=["mha", "gqa-g4", "phi3-medium-g4"])
def test_decode_matches_float64(dtype, hq, hkv, device):
    q, pk, pv, kw = make_case(device, b=3, hq=hq, hkv=hkv, t=70, d=D, dtype=dtype, seed=seed_of(dtype, hq, D),
                              sk=0.7, sv=0.5, seq_lens=[70, 33, 0], w=6, window_lens=[6, 0, 2])
    check_decode(q, pk, pv, **kw)
    check_decode(q, pk, pv, num_splits=5, **kw)


def test_cache_prefill_append_attend(device):
    cache = mt.SparseKVCache(2, 2, D, max_tokens=64, window=8, k_sparsity=0.7, v_sparsity=0.5,
                             dtype=torch.float16, device=device)
    k, v = (randn((2, 2, 30, D), torch.float16, s, device) for s in (1, 2))
    cache.prefill(k, v, torch.tensor([30, 12], dtype=torch.int32, device=device))
    for step in range(10):  # crosses window flushes
        cache.append(*(randn((2, 2, 1, D), torch.float16, 10 + 2 * step + j, device) for j in (0, 1)))
    q = randn((2, 8, D), torch.float16, 99, device)
    out = cache.attend(q)
    want = ref.sparse_decode_attention(q.double(), cache.packed_k, cache.packed_v, k_window=cache.k_window,
                                       v_window=cache.v_window, window_lens=cache.window_lens)
    assert (out.double() - want).abs().max() < 2e-3
    assert (cache.seq_lens + cache.window_lens).tolist() == [40, 22], "every token is in the cache"


def test_gluon_kernels_are_never_chosen_for_96(device, monkeypatch):
    """Neither Gluon kernel handles D=96: the support checks say so, and a forced Gluon config
    (as a tuned file could hold) runs the tl kernels."""
    for dtype in (torch.float16, torch.bfloat16):
        assert not gluon_decode_supports(dtype, D, 4, False)
        assert not gluon_prune_supports(dtype, D, False)
        default = decode_kernels.decode_heuristic_config(132, False, head_dim=D, group=4, dtype=dtype)
        assert default.get("kernel") != "gluon"
        assert all(c.get("kernel") != "gluon" for c in decode_kernels.decode_config_space(
            head_dim=D, group=4, dtype=dtype, capacity=32))
    from mustafar_triton import attention, compress

    def no_gluon(*args, **kwargs):
        raise AssertionError("a Gluon kernel must not be launched at D=96")
    monkeypatch.setattr(attention, "_sparse_decode_gluon_kernel", no_gluon)
    monkeypatch.setattr(compress, "_prune_pack_gluon", no_gluon)
    q, pk, pv, kw = make_case(device, b=2, hq=8, hkv=2, t=40, d=D, dtype=torch.float16, seed=5, w=4)
    with autotune.forced_config("decode", GLUON_CONFIG), \
            autotune.forced_config("select", autotune.GLUON_SELECT_CONFIG):
        k = randn((2, 2, 45, D), torch.float16, 6, device)
        assert_packed_equal(mt.prune_and_pack(k, 0.7), ref.prune_and_pack(k, 0.7))
        check_decode(q, pk, pv, **kw)


def test_head_dim_80_is_refused_by_name(device):
    x = randn((1, 1, 4, 80), torch.float16, 3, device)
    with pytest.raises(ValueError, match=r"head dim D=80 \(shape \(1, 1, 4, 80\)\) not in \(32, 64, 96, 128, 256\)"):
        mt.prune_and_pack(x, 0.5)
    with pytest.raises(ValueError, match="head_dim 80 not in"):
        mt.SparseKVCache(1, 1, 80, 8, 4, 0.5, 0.5, device=device)


def test_gluon_prune_launcher_refuses_96(device):
    from mustafar_triton.kernels import prune_pack_gluon
    x = randn((1, 1, 16, D), torch.float16, 4, device)
    bitmap = torch.zeros((1, 1, 16, 3), dtype=torch.int32, device=device)
    values = torch.zeros((1, 1, 16, 32), dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=r"handles head dims \(64, 128, 256\), got 96 \(x shape \(1, 1, 16, 96\)\)"):
        prune_pack_gluon.launch_prune_and_pack(x, bitmap, values, None, 16, 16, 16, keep=29, capacity=32)
