"""sparse_decode_attention against the float64 reference on the SAME pruned / packed cache.

Accuracy rule (flash-attention's): with err(a) = ||a - ref64|| / ||ref64||, the kernel must satisfy
    err(kernel) <= 2 * err(torch in q's dtype) + floor(dtype)
where "torch in q's dtype" is reference.sparse_decode_attention(compute_dtype=q.dtype). The same
rule with max-abs errors applies to the log-sum-exp (return_lse=True).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mustafar_triton as mt
from mustafar_triton import autotune
from mustafar_triton import reference as ref
from mustafar_triton.kernels import decode as decode_kernels
from mustafar_triton.kernels import decode_gluon_launch as gluon_launch
from conftest import INTERPRETING
from mt_testutils import DTYPES, randn, rel_err, rounded_as_kernels_round, seed_of, sparse_values

# Absolute floors of the accuracy rule. On the GPU the kernel's tl.dot runs fp32 inputs as tf32
# (Triton's default input_precision), which is ~1e-3 relative: the fp32 floor reflects that there.
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5 if INTERPRETING else 3e-3}
FP32_TOL = FLOOR[torch.float32]  # for direct fp32 comparisons (exact fp32 dots in the interpreter)


def make_case(device, *, b=2, hq=4, hkv=2, t=40, d=64, dtype=torch.float16, seed=0, sk=0.7, sv=0.5,
              seq_lens=None, w=None, window_lens=None, q_scale=1.0, lq=None):
    """q [B, Hq, D] (or [B, lq, Hq, D]) and K / V caches [B, Hkv, T, D] pruned + packed by the
    library kernels."""
    k = randn((b, hkv, t, d), dtype, seed, device)
    v = randn((b, hkv, t, d), dtype, seed + 1, device)
    q = randn((b, hq, d) if lq is None else (b, lq, hq, d), dtype, seed + 2, device, scale=q_scale)
    sl = None if seq_lens is None else torch.tensor(seq_lens, dtype=torch.int32, device=device)
    pk = mt.prune_and_pack(k, sk, seq_lens=sl)
    pv = mt.prune_and_pack(v, sv, seq_lens=sl)
    kw = {}
    if w is not None:
        kw["k_window"] = randn((b, hkv, w, d), dtype, seed + 3, device)
        kw["v_window"] = randn((b, hkv, w, d), dtype, seed + 4, device)
    if window_lens is not None:
        kw["window_lens"] = torch.tensor(window_lens, dtype=torch.int32, device=device)
    return q, pk, pv, kw


def assert_same_result(a, b):
    """Two launches doing the same arithmetic: bit-identical in the interpreter; on the GPU the
    two specialisations (strides, constexprs) may contract FMAs differently."""
    if INTERPRETING:
        assert torch.equal(a, b)
    else:
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3)


def reference64(q, pk, pv, **kw):
    """Float64 reference; q upcast so the output is not rounded back to q's dtype."""
    kw = {k: v for k, v in kw.items() if k != "num_splits"}
    return ref.sparse_decode_attention(q.double(), pk, pv, return_lse=True, **kw)


def check_decode(q, pk, pv, **kw):
    """Run the kernel, compare with the float64 reference under the 2x rule; return (out, lse)."""
    out, lse = mt.sparse_decode_attention(q, pk, pv, return_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device  # [B, (Lq,) Hq, D]
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    want, want_lse = reference64(q, pk, pv, **kw)
    kw_ref = {k: v for k, v in kw.items() if k != "num_splits"}
    same, same_lse = ref.sparse_decode_attention(q, pk, pv, return_lse=True, compute_dtype=q.dtype, **kw_ref)

    # empty sequences (no token at all): out exactly 0, lse -inf
    empty = torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly for empty sequences"
    assert torch.all(out[empty] == 0)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten or NaN output"

    floor = FLOOR[q.dtype]
    err, err_torch = rel_err(out, want), rel_err(same, want)
    assert err <= 2 * err_torch + floor, f"out: kernel err {err:.3g} vs torch {q.dtype} err {err_torch:.3g}"
    if (~empty).any():
        lerr = (lse[~empty].double() - want_lse[~empty].double()).abs().max().item()
        lerr_torch = (same_lse[~empty].double() - want_lse[~empty].double()).abs().max().item()
        assert lerr <= 2 * lerr_torch + floor, f"lse: kernel err {lerr:.3g} vs torch err {lerr_torch:.3g}"
    return out, lse


@pytest.fixture
def decode_config(monkeypatch):
    """Override keys of the decode launch config (BLOCK_N, SLOTS, ...) for one test."""
    def override(**keys):
        original = autotune.config_for

        def config_for(kernel, device, run=None, **bucket):
            cfg = dict(original(kernel, device, run=run, **bucket))
            if kernel == "decode":
                cfg.update(keys)
            return cfg
        monkeypatch.setattr(autotune, "config_for", config_for)
    return override


# ------------------------------------------------------------------------------------------------
# Shapes: GQA groups, head dims, token counts, dtypes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 2), (16, 2), (8, 1), (3, 1), (24, 1)],
                         ids=["mha-g1", "gqa-g3", "gqa-g4", "gqa-g8", "mqa-g8", "mqa-g3", "mqa-g24"])
def test_gqa_groups(hq, hkv, dtype, device):
    q, pk, pv, kw = make_case(device, b=2, hq=hq, hkv=hkv, t=45, d=64, dtype=dtype,
                              seed=seed_of(hq, hkv, dtype), w=7)
    check_decode(q, pk, pv, **kw)


@pytest.mark.parametrize("d", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_head_dims(d, dtype, device):
    q, pk, pv, kw = make_case(device, b=1, hq=4, hkv=2, t=37, d=d, dtype=dtype, seed=seed_of(d, dtype), w=3)
    check_decode(q, pk, pv, **kw)


@pytest.mark.parametrize("t", [1, 31, 32, 33, 63, 100, 257])
def test_token_counts(t, device):
    q, pk, pv, kw = make_case(device, b=1, hq=2, hkv=1, t=t, d=64, dtype=torch.float16, seed=seed_of(t))
    check_decode(q, pk, pv, **kw)
    check_decode(q, pk, pv, num_splits=3, **kw)


def test_t1_equals_value_row(device):
    """With a single token the softmax is 1: out is exactly that token's (pruned) value row."""
    q, pk, pv, _ = make_case(device, b=2, hq=4, hkv=2, t=1, d=64, dtype=torch.float32, seed=5)
    out, lse = check_decode(q, pk, pv)
    v = mt.unpack(pv).repeat_interleave(2, dim=1)[:, :, 0]
    assert torch.allclose(out, v, rtol=FP32_TOL / 10, atol=FP32_TOL / 10)
    k = mt.unpack(pk).repeat_interleave(2, dim=1)[:, :, 0]
    assert torch.allclose(lse, (q * k).sum(-1) / 8.0, rtol=FP32_TOL, atol=FP32_TOL)


def test_large_scores_are_stable(device):
    """Scores of hundreds: the online softmax must subtract the running max."""
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=70, d=64, dtype=torch.float32, seed=6,
                              q_scale=40.0, w=9)
    out, lse = check_decode(q, pk, pv, num_splits=3, **kw)
    assert lse.abs().max() > 50


def test_custom_softmax_scale(device):
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=1, t=50, d=128, dtype=torch.float16, seed=7, w=4)
    out_a, _ = check_decode(q, pk, pv, softmax_scale=0.3, **kw)
    out_b, _ = check_decode(q, pk, pv, **kw)
    assert rel_err(out_a, out_b) > 1e-2, "softmax_scale must change the result"


def test_different_k_and_v_capacity(device):
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=40, d=64, sk=0.9, sv=0.0, seed=8, w=5)
    assert pk.capacity == 8 and pv.capacity == 64
    check_decode(q, pk, pv, **kw)


def test_non_contiguous_q_and_window(device):
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=40, d=64, seed=9, w=6)
    big = randn((2, 12, 64), torch.float16, 10, device)
    q_strided = big[:, 3:7]                              # stride(-1) == 1, head stride 64, batch 768
    q_t = randn((2, 64, 4), torch.float16, 11, device).transpose(1, 2)  # stride(-1) != 1
    kw["k_window"] = kw["k_window"].transpose(2, 3).contiguous().transpose(2, 3)  # [B,H,W,D], D strided
    for qq in (q_strided, q_t):
        out, _ = check_decode(qq, pk, pv, **kw)
        assert_same_result(out, mt.sparse_decode_attention(qq.contiguous(), pk, pv, **kw))


# ------------------------------------------------------------------------------------------------
# Ragged batches, windows, splits
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ragged_seq_lens(dtype, device):
    seq_lens = [0, 45, 1, 17, 33]
    q, pk, pv, kw = make_case(device, b=5, hq=6, hkv=2, t=45, d=64, dtype=dtype, seed=seed_of(dtype, 12),
                              seq_lens=seq_lens, w=5)
    check_decode(q, pk, pv, **kw)
    check_decode(q, pk, pv, num_splits=4, **kw)
    check_decode(q, pk, pv, num_splits=2)  # no window: sequence 0 is empty


@pytest.mark.parametrize("w,window_lens", [(0, None), (0, [0, 0]), (1, None), (9, [9, 0]), (40, [3, 33])])
def test_windows(w, window_lens, device):
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=39, d=64, seed=seed_of(w, window_lens),
                              seq_lens=[39, 20], w=w, window_lens=window_lens)
    out, _ = check_decode(q, pk, pv, **kw)
    out3, _ = check_decode(q, pk, pv, num_splits=3, **kw)
    if w == 0:  # an empty window changes nothing
        assert_same_result(out, mt.sparse_decode_attention(q, pk, pv))


@pytest.mark.parametrize("seq_lens", [None, [0, 0]], ids=["t0", "lens0"])
def test_window_only(seq_lens, device):
    t = 0 if seq_lens is None else 12
    q, pk, pv, kw = make_case(device, b=2, hq=8, hkv=2, t=t, d=64, dtype=torch.float32, seed=13,
                              seq_lens=seq_lens, w=21, window_lens=[21, 5])
    out, lse = check_decode(q, pk, pv, **kw)
    # plain dense attention over the window tokens only
    kwin, vwin = kw["k_window"].repeat_interleave(4, 1), kw["v_window"].repeat_interleave(4, 1)
    for b, n in enumerate([21, 5]):
        dense = F.scaled_dot_product_attention(q[b, :, None].double(), kwin[b, :, :n].double(),
                                               vwin[b, :, :n].double())[:, 0]
        assert torch.allclose(out[b].double(), dense, rtol=FP32_TOL, atol=FP32_TOL)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 1000])
def test_num_splits(num_splits, device):
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=150, d=64, dtype=torch.float32, seed=14,
                              seq_lens=[150, 61], w=17, window_lens=[17, 2])
    out, lse = check_decode(q, pk, pv, num_splits=num_splits, **kw)
    base, base_lse = mt.sparse_decode_attention(q, pk, pv, num_splits=1, return_lse=True, **kw)
    # splits change the summation order; on a GPU the fp32 dots also run as tf32
    assert torch.allclose(out, base, rtol=FP32_TOL, atol=FP32_TOL)
    assert torch.allclose(lse, base_lse, rtol=FP32_TOL, atol=FP32_TOL)


def test_many_splits_merge_in_steps(device):
    """140 splits: the split merge takes them in two steps of up to 128, over two 32-channel
    blocks of D=64 (one split per 32-token tile, the interpreter's and the GPU's tiles alike);
    the second sequence's splits past its length are empty."""
    q, pk, pv, kw = make_case(device, b=2, hq=2, hkv=1, t=4460, d=64, dtype=torch.float32, seed=24,
                              seq_lens=[4460, 1000], w=5)
    out, lse = check_decode(q, pk, pv, num_splits=140, **kw)
    base, base_lse = mt.sparse_decode_attention(q, pk, pv, num_splits=1, return_lse=True, **kw)
    assert torch.allclose(out, base, rtol=FP32_TOL, atol=FP32_TOL)
    assert torch.allclose(lse, base_lse, rtol=FP32_TOL, atol=FP32_TOL)


def test_empty_sequence_gives_zero_and_neg_inf(device):
    q, pk, pv, kw = make_case(device, b=3, hq=4, hkv=2, t=20, d=64, seed=15, seq_lens=[0, 20, 0],
                              w=4, window_lens=[0, 4, 2])
    out, lse = check_decode(q, pk, pv, num_splits=2, **kw)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.isfinite(lse[1:]).all() and (out[1:] != 0).any()
    # no window at all and every sequence empty
    q, pk, pv, _ = make_case(device, b=2, hq=2, hkv=2, t=8, d=32, seed=16, seq_lens=[0, 0])
    out, lse = mt.sparse_decode_attention(q, pk, pv, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    assert torch.all(mt.sparse_decode_attention(q, pk, pv) == 0)


def test_reference_p_dtype_rounds_only_the_weights(device):
    """reference.sparse_decode_attention(p_dtype=...) models a kernel's rounded P operand: the output
    moves by at most P's rounding (relative 2^-8 for bfloat16 of the weights, times sum |v|), it does
    move, empty sequences still give zeros, and the lse is unchanged."""
    q, pk, pv, kw = make_case(device, b=3, hq=4, hkv=2, t=37, d=64, seed=21, seq_lens=[0, 37, 19],
                              w=5, window_lens=[0, 5, 2])
    exact, lse = reference64(q, pk, pv, **kw)
    rounded, rounded_lse = ref.sparse_decode_attention(q.double(), pk, pv, return_lse=True, p_dtype=torch.bfloat16, **kw)
    assert torch.equal(lse, rounded_lse)
    v_abs = torch.cat([ref.unpack(pv, torch.float64), kw["v_window"].double()], dim=2).abs().amax(dim=(2, 3))
    bound = 2.0 ** -8 * v_abs.repeat_interleave(2, dim=1)[..., None]  # |sum (p' - p) v| <= max |p' - p| / p * max |v|
    assert ((rounded - exact).abs() <= bound).all()
    assert (rounded[1:] != exact[1:]).any()
    assert torch.all(rounded[0] == 0) and torch.all(torch.isneginf(rounded_lse[0]))  # sequence 0 is empty


def test_empty_batch(device):
    q, pk, pv, _ = make_case(device, b=0, hq=4, hkv=2, t=8, d=64, seed=17)
    out, lse = mt.sparse_decode_attention(q, pk, pv, return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


# ------------------------------------------------------------------------------------------------
# Sparsity 0 is dense attention; arbitrary sparsity patterns
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparsity_zero_equals_dense_attention(dtype, device):
    b, hq, hkv, t, d, w = 2, 8, 2, 50, 64, 6
    k = randn((b, hkv, t, d), dtype, 18, device)
    v = randn((b, hkv, t, d), dtype, 19, device)
    q = randn((b, hq, d), dtype, 20, device)
    kwin, vwin = randn((b, hkv, w, d), dtype, 21, device), randn((b, hkv, w, d), dtype, 22, device)
    pk, pv = mt.prune_and_pack(k, 0.0), mt.prune_and_pack(v, 0.0)
    out, lse = mt.sparse_decode_attention(q, pk, pv, k_window=kwin, v_window=vwin, return_lse=True, num_splits=2)

    kd, vd = torch.cat([k, kwin], 2), torch.cat([v, vwin], 2)
    dense64 = F.scaled_dot_product_attention(q[:, :, None].double(), kd.double(), vd.double(),
                                             enable_gqa=True)[:, :, 0]
    dense_same = F.scaled_dot_product_attention(q[:, :, None], kd, vd, enable_gqa=True)[:, :, 0]
    err, err_torch = rel_err(out, dense64), rel_err(dense_same, dense64)
    assert err <= 2 * err_torch + FLOOR[dtype], (err, err_torch)
    lse64 = torch.logsumexp(torch.einsum("bhd,bhtd->bht", q.double(), kd.double().repeat_interleave(4, 1))
                            / math.sqrt(d), -1)
    lse_same = torch.logsumexp(torch.einsum("bhd,bhtd->bht", q, kd.repeat_interleave(4, 1)) / math.sqrt(d), -1)
    lerr, lerr_torch = (lse.double() - lse64).abs().max().item(), (lse_same.double() - lse64).abs().max().item()
    assert lerr <= 2 * lerr_torch + FLOOR[dtype], (lerr, lerr_torch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_arbitrary_patterns_via_pack(dtype, device):
    """Non top-k patterns: rows from empty to full, K and V with different patterns / capacities."""
    b, hq, hkv, t, d = 2, 6, 2, 41, 64
    k = sparse_values((b, hkv, t, d), dtype, 23, device)
    v = sparse_values((b, hkv, t, d), dtype, 24, device, max_nnz=20)
    q = randn((b, hq, d), dtype, 25, device)
    seq_lens = torch.tensor([41, 30], dtype=torch.int32, device=device)
    pk, pv = mt.pack(k, seq_lens=seq_lens), mt.pack(v, seq_lens=seq_lens)
    assert pk.capacity == 64 and pv.capacity == 24
    check_decode(q, pk, pv, num_splits=2)
    # explicit, larger capacity: same attention
    pv32 = mt.pack(v, capacity=32, seq_lens=seq_lens)
    out_a = mt.sparse_decode_attention(q, pk, pv)
    out_b = mt.sparse_decode_attention(q, pk, pv32)
    assert torch.allclose(out_a.float(), out_b.float(), rtol=1e-3, atol=FLOOR[dtype])


def test_sparse_attention_equals_dense_attention_on_pruned_cache(device):
    b, hq, hkv, t, d = 2, 4, 1, 60, 128
    k, v = randn((b, hkv, t, d), torch.float32, 26, device), randn((b, hkv, t, d), torch.float32, 27, device)
    q = randn((b, hq, d), torch.float32, 28, device)
    out = mt.sparse_decode_attention(q, mt.prune_and_pack(k, 0.7), mt.prune_and_pack(v, 0.5))
    kp, vp = ref.prune_topk(k, 0.7), ref.prune_topk(v, 0.5)
    dense = F.scaled_dot_product_attention(q[:, :, None].double(), kp.double(), vp.double(), enable_gqa=True)[:, :, 0]
    assert rel_err(out, dense) <= 1e-5 + (0 if INTERPRETING else 3e-3)


# ------------------------------------------------------------------------------------------------
# Kernel variants, NaN isolation, garbage outside the valid ranges, malformed input
# ------------------------------------------------------------------------------------------------
# Slot-expansion modes of the decode kernel; libdevice popc does not run in the interpreter.
SLOT_MODES = tuple(m for m in decode_kernels.SLOT_MODES if not (INTERPRETING and m == "popc"))
_VARIANTS = [dict(SLOTS=s, BLOCK_N=bn) for s in SLOT_MODES for bn in (16, 32, 64)]
if not INTERPRETING:
    _VARIANTS += [dict(SLOTS=s, BLOCK_N=128) for s in SLOT_MODES]
    _VARIANTS += [c for c in autotune.config_space("decode", head_dim=128, group=4, dtype="float16",
                                                   capacity=40, batch_heads=16, context=1024)]
    # the Gluon kernel (decode_gluon.py, GPU only): every gather, and 32-token tiles (popcount only)
    _VARIANTS += [dict(gluon_launch.GLUON_CONFIG, BLOCK_N=bn, num_splits=s) for bn in (16, 32) for s in (0, -1, -3)]
    _VARIANTS += [dict(gluon_launch.GLUON_CONFIG, num_splits=s, gather=g) for g in gluon_launch.GATHERS for s in (0, -3)]


@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_kernel_variants(variant, device, decode_config):
    decode_config(**variant)
    q, pk, pv, kw = make_case(device, b=2, hq=8, hkv=2, t=75, d=128, dtype=torch.float16,
                              seed=seed_of(variant), seq_lens=[75, 40], w=10, window_lens=[10, 3])
    check_decode(q, pk, pv, **kw)
    check_decode(q, pk, pv, num_splits=3, **kw)


# exact_weights: the tl kernel (interpreter and GPU) and, on a GPU, every Gluon gather
_EXACT_WEIGHTS_VARIANTS = [dict()] + (
    [dict(gluon_launch.GLUON_CONFIG, gather=g) for g in gluon_launch.GATHERS]
    + [dict(kernel="tl", BLOCK_N=64, num_warps=4, num_stages=2, SLOTS="popc")] if not INTERPRETING else [])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", _EXACT_WEIGHTS_VARIANTS,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "default")
def test_exact_weights_outputs_are_correctly_rounded(variant, dtype, device, decode_config):
    """A 16-bit P keeps 8 (bf16) or 11 (fp16) bits of each attention weight: rounded once before
    P @ V, a large share of the outputs come out one unit off the correctly rounded result (the
    reference's p_dtype models that, checked on the same case). exact_weights=True adds the
    remainder's product, so the outputs equal the float64 result rounded to the dtype almost
    everywhere; on a GPU the default call does not (the flag reaches the kernels). (The
    interpreter's kernels compute 16-bit caches in fp32, where both calls are exact, and convert
    fp32 to bf16 by truncation: there bf16 outputs are compared with the truncated result.)"""
    decode_config(**variant)
    q, pk, pv, kw = make_case(device, b=3, hq=8, hkv=2, t=300, d=128, dtype=dtype, seed=31,
                              q_scale=3.0, seq_lens=[300, 211, 97], w=16, window_lens=[16, 9, 0])
    exact = reference64(q, pk, pv, **kw)[0]
    rounded_once = ref.sparse_decode_attention(q.float(), pk, pv, compute_dtype=torch.float32, p_dtype=dtype,
                                               **kw).to(dtype)
    assert (rounded_once != exact.to(dtype)).float().mean() > 0.1
    want = rounded_as_kernels_round(exact, dtype, INTERPRETING)
    out = mt.sparse_decode_attention(q, pk, pv, exact_weights=True, **kw)
    assert (out != want).float().mean() < 0.02
    if not INTERPRETING:
        assert (mt.sparse_decode_attention(q, pk, pv, **kw) != want).float().mean() > 0.1


def test_exact_weights_checks(device):
    """exact_weights must be a bool (TypeError naming it, from the call and from every cache); fp32
    caches (already exact) give the default call's result bit for bit."""
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=33, d=64, dtype=torch.float32, seed=37, w=4)
    with pytest.raises(TypeError, match="exact_weights"):
        mt.sparse_decode_attention(q, pk, pv, exact_weights=1, **kw)
    with pytest.raises(TypeError, match="exact_weights"):
        mt.SparseKVCache(2, 2, 64, 32, 4, 0.7, 0.5, dtype=torch.float32, device=device, exact_weights="yes")
    with pytest.raises(TypeError, match="exact_weights"):
        mt.PagedSparseKVCache(2, 64, 4, 16, 2, 2, 0.7, 0.5, 4, dtype=torch.float32, device=device, exact_weights=None)
    assert torch.equal(mt.sparse_decode_attention(q, pk, pv, exact_weights=True, **kw),
                       mt.sparse_decode_attention(q, pk, pv, **kw))


def _nan_case(device, num_splits):
    b, hq, hkv, t, d = 3, 6, 2, 40, 64
    q, pk, pv, kw = make_case(device, b=b, hq=hq, hkv=hkv, t=t, d=d, dtype=torch.float16, seed=29, w=4)
    k = randn((b, hkv, t, d), torch.float16, 29, device)  # the same K as make_case's
    k[1, 0, 13, 5] = float("nan")           # sequence 1, kv head 0 (query heads 0-2)
    pk_nan = mt.prune_and_pack(k, 0.7)
    assert torch.isnan(pk_nan.values).any()  # NaN is kept first
    clean, clean_lse = mt.sparse_decode_attention(q, pk, pv, return_lse=True, num_splits=num_splits, **kw)
    out, lse = mt.sparse_decode_attention(q, pk_nan, pv, return_lse=True, num_splits=num_splits, **kw)
    affected = torch.zeros(b, hq, dtype=torch.bool, device=device)
    affected[1, :3] = True
    want, want_lse = reference64(q, pk_nan, pv, **kw)
    assert torch.isnan(want[affected]).all() and torch.isfinite(want[~affected]).all()
    return out, lse, clean, clean_lse, affected


@pytest.mark.parametrize("num_splits", [1, 2])
def test_nan_in_one_sequence_does_not_leak(num_splits, device):
    out, lse, clean, clean_lse, affected = _nan_case(device, num_splits)
    assert torch.equal(out[~affected], clean[~affected]), "NaN leaked into other heads / sequences"
    assert torch.equal(lse[~affected], clean_lse[~affected])



@pytest.mark.parametrize("num_splits", [1, 2])
def test_nan_in_cache_propagates_to_affected_heads(num_splits, device):
    out, lse, clean, clean_lse, affected = _nan_case(device, num_splits)
    assert torch.isnan(out[affected]).all(), "affected heads must be NaN"
    assert torch.isnan(lse[affected]).all()


def test_garbage_past_lengths_is_never_read(device):
    """NaN in cache tokens past seq_lens and in window tokens past window_lens: output unaffected."""
    b, hq, hkv, t, d, w = 2, 4, 2, 40, 64, 8
    k, v = randn((b, hkv, t, d), torch.float16, 30, device), randn((b, hkv, t, d), torch.float16, 31, device)
    q = randn((b, hq, d), torch.float16, 32, device)
    kwin, vwin = randn((b, hkv, w, d), torch.float16, 33, device), randn((b, hkv, w, d), torch.float16, 34, device)
    seq_lens = torch.tensor([25, 40], dtype=torch.int32, device=device)
    wl = torch.tensor([8, 3], dtype=torch.int32, device=device)
    k[0, :, 25:], v[0, :, 25:] = float("nan"), float("nan")
    kwin[1, :, 3:], vwin[1, :, 3:] = float("nan"), float("inf")
    pk, pv = mt.prune_and_pack(k, 0.5, seq_lens=seq_lens), mt.prune_and_pack(v, 0.5, seq_lens=seq_lens)
    out, lse = check_decode(q, pk, pv, k_window=kwin, v_window=vwin, window_lens=wl, num_splits=3)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_malformed_bitmap_reads_as_zero_token(device, decode_config):
    """A token with more set bits than capacity (malformed PackedKV) must not make the kernel read
    outside its value row (checked by the out-of-bounds guard); the kernel reads it as all zeros."""
    b, hq, hkv, t, d = 1, 2, 1, 8, 64
    q, pk, pv, _ = make_case(device, b=b, hq=hq, hkv=hkv, t=t, d=d, dtype=torch.float32, seed=35, sk=0.9, sv=0.9)
    bad_bitmap = pk.bitmap.clone()
    bad_bitmap[0, 0, t - 1] = -1            # all 64 bits set, capacity is 8: last token, last row
    bad = mt.PackedKV(bad_bitmap, pk.values, pk.capacity, pk.head_dim)
    zero_bitmap = pk.bitmap.clone()
    zero_bitmap[0, 0, t - 1] = 0
    zero = mt.PackedKV(zero_bitmap, pk.values, pk.capacity, pk.head_dim)
    for slots in SLOT_MODES:
        decode_config(SLOTS=slots)
        out = mt.sparse_decode_attention(q, bad, pv)
        assert_same_result(out, mt.sparse_decode_attention(q, zero, pv))



# The Gluon kernel (decode_gluon.py) runs on a GPU only; attention falls back to decode.py's
# kernel for shapes it does not support, so every case asserts that it is supported.
@pytest.mark.skipif(INTERPRETING, reason="Gluon has no interpreter: GPU only")
@pytest.mark.parametrize("d,hq,hkv,sk,sv,dtype", [
    (64, 9, 3, 0.5, 0.7, torch.bfloat16),     # SmolLM2's heads; capacities 32 and 24
    (128, 8, 2, 0.5, 0.5, torch.float16),     # capacity 64
    (128, 32, 8, 0.0, 0.7, torch.float16),    # nothing pruned in K: capacity 128
    (128, 16, 1, 0.7, 0.7, torch.bfloat16),   # MQA, group 16: the padded group is 16, not 8
    (256, 4, 4, 0.7, 0.9, torch.bfloat16),    # D=256, capacities 80 and 32
    (32, 6, 2, 0.3, 0.6, torch.float16),      # D=32: one bitmap word per token
    (128, 8, 2, 0.95, 0.95, torch.float16),   # capacity 8: the scatter undoes its stores (scatter_undoes)
    (64, 6, 2, 0.9, 0.9, torch.bfloat16),     # D=64, capacity 8: the scatter masks its tiles
])
@pytest.mark.parametrize("gather", gluon_launch.GATHERS)
def test_gluon_kernel_shapes(d, hq, hkv, sk, sv, dtype, gather, device, decode_config):
    q, pk, pv, kw = make_case(device, b=3, hq=hq, hkv=hkv, t=150, d=d, dtype=dtype, seed=41 + d + hq,
                              sk=sk, sv=sv, seq_lens=[150, 77, 0], w=9, window_lens=[9, 0, 4])
    assert gluon_launch.gluon_decode_supports(dtype, d, hq // hkv, False)
    decode_config(**gluon_launch.GLUON_CONFIG, gather=gather)  # where a gather does not run: popc
    check_decode(q, pk, pv, **kw)
    check_decode(q, pk, pv, num_splits=4, **kw)


def test_gluon_config_falls_back_where_unsupported(device, decode_config):
    """fp32 has no Gluon kernel (nor has the interpreter): a Gluon config runs decode.py's kernel."""
    decode_config(**gluon_launch.GLUON_CONFIG)
    q, pk, pv, kw = make_case(device, b=2, hq=6, hkv=2, t=50, d=64, dtype=torch.float32, seed=43, w=3)
    check_decode(q, pk, pv, **kw)


def test_gluon_config_falls_back_before_ampere(device, decode_config, monkeypatch):
    """Where Gluon cannot run (no mma.sync m16n8k16 before compute capability 8.0, an unchecked
    triton: _gluon_compat.gluon_runs_on), decode.py's kernel runs."""
    from mustafar_triton import attention

    def no_gluon():
        raise AssertionError("the Gluon kernel must not be launched here")
    monkeypatch.setattr(attention, "gluon_runs_on", lambda dev: False)
    monkeypatch.setattr(attention, "_sparse_decode_gluon_kernel", no_gluon)
    decode_config(**gluon_launch.GLUON_CONFIG)
    q, pk, pv, kw = make_case(device, b=2, hq=8, hkv=2, t=70, d=128, dtype=torch.float16, seed=44, w=5)
    check_decode(q, pk, pv, **kw)


@pytest.mark.skipif(INTERPRETING, reason="Gluon has no interpreter: GPU only")
@pytest.mark.parametrize("gather", gluon_launch.GATHERS)
@pytest.mark.parametrize("d,hq,hkv,dtype,k_nnz,v_nnz", [
    (64, 6, 2, torch.float16, 21, 12), (128, 8, 2, torch.bfloat16, 42, 25),
    (128, 8, 2, torch.float16, 12, 6),        # capacities 16 and 8: the scatter masks its tiles
    (128, 8, 2, torch.float16, 8, 7)])        # capacity 8: the scatter undoes its stores
def test_gluon_any_pattern(d, hq, hkv, dtype, k_nnz, v_nnz, gather, device, decode_config):
    """Caches packed by `pack` from arbitrary patterns (not top-k): rows with empty bitmap words at
    the start, middle and end, all-zero rows, rows at capacity, K and V of different capacities.
    The scatter gather skips empty words and stores exactly one value per kept bit."""
    b, t = 2, 83
    k = sparse_values((b, hkv, t, d), dtype, 51 + d, device, max_nnz=k_nnz)
    v = sparse_values((b, hkv, t, d), dtype, 53 + d, device, max_nnz=v_nnz)
    words = k.view(b, hkv, t, d // 32, 32)
    words[:, :, 5:20, 0] = 0                           # empty first word
    words[:, :, 20:30, 1] = 0                          # empty middle word
    words[:, :, 30:40, -1] = 0                         # empty last word
    words[:, :, 40:45, 1:] = 0                         # only the first word has bits
    words[:, :, 45:50, :-1] = 0                        # only the last word has bits
    k[:, :, 50:53] = 0                                 # all-zero rows
    seq_lens = torch.tensor([t, 61], dtype=torch.int32, device=device)
    pk, pv = mt.pack(k, seq_lens=seq_lens), mt.pack(v, seq_lens=seq_lens)
    assert pk.capacity != pv.capacity or max(k_nnz, v_nnz) <= 8  # capacities are multiples of 8
    q = randn((b, hq, d), dtype, 55 + d, device)
    kw = dict(k_window=randn((b, hkv, 7, d), dtype, 56, device), v_window=randn((b, hkv, 7, d), dtype, 57, device))
    decode_config(**gluon_launch.GLUON_CONFIG, gather=gather)
    check_decode(q, pk, pv, **kw)
    check_decode(q, pk, pv, num_splits=5, **kw)


@pytest.mark.skipif(INTERPRETING, reason="Gluon has no interpreter: GPU only")
@pytest.mark.parametrize("gather", gluon_launch.GATHERS)
@pytest.mark.parametrize("d,sparsity", [(64, 0.8), (128, 0.9), (128, 0.95)])  # capacity 8 at D=128: the undone scatter
def test_gluon_malformed_bitmap_reads_as_zero_token(d, sparsity, gather, device, decode_config):
    """As test_malformed_bitmap_reads_as_zero_token, for the Gluon kernel (fp16: it has no fp32)."""
    q, pk, pv, _ = make_case(device, b=1, hq=2, hkv=1, t=8, d=d, dtype=torch.float16, seed=35, sk=sparsity,
                             sv=sparsity)
    bad_bitmap, zero_bitmap = pk.bitmap.clone(), pk.bitmap.clone()
    bad_bitmap[0, 0, -1] = -1                # every bit set, beyond the capacity: last token, last row
    zero_bitmap[0, 0, -1] = 0
    decode_config(**gluon_launch.GLUON_CONFIG, gather=gather)
    out = mt.sparse_decode_attention(q, mt.PackedKV(bad_bitmap, pk.values, pk.capacity, pk.head_dim), pv)
    assert_same_result(out, mt.sparse_decode_attention(
        q, mt.PackedKV(zero_bitmap, pk.values, pk.capacity, pk.head_dim), pv))


@pytest.mark.parametrize("seq_lens", [
    # last sequence overflows: reads past the end of bitmap / values (the interpreter's guard
    # raises); not run on the GPU, where it could be an illegal address
    pytest.param([40, 90], marks=pytest.mark.interpreter_only, id="past-end"),
    # first sequence overflows into the rows of the next head / sequence: in bounds, wrong result
    pytest.param([90, 40], id="into-neighbour"),
])
def test_seq_lens_beyond_allocated_tokens_are_clamped(seq_lens, device):
    """prune_and_pack accepts seq_lens > T (every token valid) and the reference treats them as T.
    The kernel must neither read outside the cache nor differ from the reference."""
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=40, d=64, dtype=torch.float32, seed=36,
                              seq_lens=seq_lens, w=5)
    check_decode(q, pk, pv, **kw)


# ------------------------------------------------------------------------------------------------
# Several query tokens per step: q [B, Lq, Hq, D], the last Lq window tokens, causal among them
# ------------------------------------------------------------------------------------------------
def one_token_window_lens(kw, b, lq, i, device):
    """window_lens of the one-token call that query i of an Lq call must equal: the window
    tokens [0, w_len - Lq + i + 1), none where that is <= 0."""
    w = kw["k_window"].shape[2]
    w_len = kw["window_lens"].clamp(max=w) if "window_lens" in kw else torch.full((b,), w, device=device)
    return (w_len - lq + i + 1).clamp(min=0).to(torch.int32)


@pytest.mark.parametrize("lq", [1, 2, 3, 8])
@pytest.mark.parametrize("hq,hkv", [(3, 3), (8, 2)], ids=["g1", "g4"])
def test_multi_query(lq, hq, hkv, device):
    """Ragged compressed lengths (one empty) and window lengths, some below Lq (sequence 1's
    first queries see no token at all: out 0, lse -inf), with and without splits."""
    q, pk, pv, kw = make_case(device, b=3, hq=hq, hkv=hkv, t=37, d=64, seed=seed_of(lq, hq, "mq"),
                              seq_lens=[37, 0, 19], w=11, window_lens=[11, 1, 6], lq=lq)
    out, lse = check_decode(q, pk, pv, **kw)
    check_decode(q, pk, pv, num_splits=4, **kw)
    assert torch.isneginf(lse[1, :lq - 1]).all() and torch.isfinite(lse[1, lq - 1]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_query_dtypes(dtype, device):
    q, pk, pv, kw = make_case(device, b=2, hq=6, hkv=2, t=45, d=128, dtype=dtype, seed=seed_of(dtype, "mq"),
                              seq_lens=[45, 13], w=7, lq=3)
    check_decode(q, pk, pv, **kw)
    check_decode(q, pk, pv, num_splits=3, **kw)


def test_multi_query_lq1_is_the_one_token_call(device):
    """q [B, 1, Hq, D] runs the one-token kernel with the same arguments: bit for bit its result,
    contiguous or not, with splits."""
    q, pk, pv, kw = make_case(device, b=3, hq=8, hkv=2, t=41, d=64, seed=61, seq_lens=[41, 7, 0], w=5,
                              window_lens=[5, 2, 0])
    strided = randn((3, 2, 8, 64), torch.float16, 62, device)[:, 1:]    # token stride 1024, head 64
    q_t = randn((3, 8, 64, 1), torch.float16, 63, device).permute(0, 3, 1, 2)  # stride(-1) != 1
    for q4 in (q[:, None], strided, q_t):
        for splits in (0, 3):
            want, want_lse = mt.sparse_decode_attention(q4[:, 0], pk, pv, num_splits=splits, return_lse=True, **kw)
            out, lse = mt.sparse_decode_attention(q4, pk, pv, num_splits=splits, return_lse=True, **kw)
            assert out.shape == (3, 1, 8, 64) and lse.shape == (3, 1, 8)
            assert torch.equal(out[:, 0], want) and torch.equal(lse[:, 0], want_lse)


@pytest.mark.parametrize("lq", [2, 5])
def test_multi_query_equals_one_token_calls(lq, device):
    """Query i of an Lq call is the one-token call of q[:, i] over the window tokens
    [0, w_len - Lq + i + 1): the causal semantics, checked without the reference."""
    q, pk, pv, kw = make_case(device, b=3, hq=4, hkv=1, t=50, d=64, dtype=torch.float32, seed=64 + lq,
                              seq_lens=[50, 3, 0], w=9, window_lens=[9, 4, 2], lq=lq)
    out, lse = mt.sparse_decode_attention(q, pk, pv, num_splits=2, return_lse=True, **kw)
    for i in range(lq):
        one = dict(kw, window_lens=one_token_window_lens(kw, 3, lq, i, device))
        want, want_lse = mt.sparse_decode_attention(q[:, i], pk, pv, num_splits=2, return_lse=True, **one)
        torch.testing.assert_close(out[:, i], want, rtol=FP32_TOL, atol=FP32_TOL)
        torch.testing.assert_close(lse[:, i], want_lse, rtol=FP32_TOL, atol=FP32_TOL)


def test_multi_query_strided_q(device):
    """q at any strides (token stride not Hq * D, heads not contiguous with tokens): the result of
    the contiguous copy."""
    q, pk, pv, kw = make_case(device, b=2, hq=8, hkv=2, t=30, d=64, seed=66, seq_lens=[30, 11], w=6, lq=3)
    views = [randn((2, 6, 8, 64), torch.float16, 67, device)[:, ::2],                    # token stride 1024
             randn((2, 8, 3, 64), torch.float16, 68, device).transpose(1, 2),            # heads outer
             randn((2, 3, 64, 8), torch.float16, 69, device).transpose(2, 3)]            # stride(-1) != 1
    for qq in views:
        out, _ = check_decode(qq, pk, pv, num_splits=2, **kw)
        assert_same_result(out, mt.sparse_decode_attention(qq.contiguous(), pk, pv, num_splits=2, **kw))


def test_multi_query_short_window_lens(device):
    """window_lens below Lq (not checked: it would need a host sync): the window holds the last
    w_len new tokens, so queries i < Lq - w_len see no window token, the others the tokens up to
    their own; tokens past window_lens (NaN here) are never read."""
    lq, w = 4, 6
    q, pk, pv, kw = make_case(device, b=3, hq=4, hkv=2, t=20, d=64, dtype=torch.float32, seed=70,
                              seq_lens=[0, 9, 20], w=w, window_lens=[0, 2, 3], lq=lq)
    for name in ("k_window", "v_window"):
        for b, n in enumerate([0, 2, 3]):
            kw[name][b, :, n:] = float("nan")
    out, lse = check_decode(q, pk, pv, num_splits=3, **kw)
    assert torch.isfinite(out).all()
    assert torch.all(out[0] == 0) and torch.isneginf(lse[0]).all()      # nothing at all to attend
    for i in range(lq):  # i < Lq - w_len: the compressed tokens only
        no_window = mt.sparse_decode_attention(q[:, i], pk, pv)
        for b, n in enumerate([0, 2, 3]):
            if i < lq - n:
                torch.testing.assert_close(out[b, i], no_window[b], rtol=FP32_TOL, atol=FP32_TOL)
            else:
                assert rel_err(out[b, i], no_window[b]) > 1e-3


@pytest.mark.parametrize("num_splits", [1, 3])
def test_multi_query_nan_in_a_new_token_reaches_only_later_queries(num_splits, device):
    """NaN in the K of new token Lq - 1 and inf in the V of new token Lq - 2 (sequence 0, kv
    head 1): only the queries that see them (of kv head 1's query heads) turn NaN; the earlier
    queries, the other heads and sequence 1 keep the clean result exactly."""
    lq, w = 4, 8
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=30, d=64, seed=71, seq_lens=[30, 30], w=w,
                              window_lens=[7, 8], lq=lq)
    clean, clean_lse = mt.sparse_decode_attention(q, pk, pv, num_splits=num_splits, return_lse=True, **kw)
    kw["k_window"][0, 1, 6, 3] = float("nan")    # new token 3 of sequence 0 (w_len 7)
    kw["v_window"][0, 1, 5, 9] = float("inf")    # new token 2
    out, lse = mt.sparse_decode_attention(q, pk, pv, num_splits=num_splits, return_lse=True, **kw)
    affected = torch.zeros(2, lq, 4, dtype=torch.bool, device=device)
    affected[0, 2:, 2:] = True                   # queries 2, 3 of query heads 2, 3 (kv head 1)
    assert not torch.isfinite(out[affected].float()).all(dim=-1).any()
    assert torch.equal(out[~affected], clean[~affected]) and torch.equal(lse[~affected], clean_lse[~affected])
    assert torch.isnan(lse[0, 3, 2:]).all()


def test_multi_query_plans_key_on_lq(device):
    """Each Lq (and the 3-D q) has a plan of its own (attention._plan_key holds q's shape)."""
    from mustafar_triton import attention
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=20, d=64, seed=72, w=4, lq=4)
    attention._plans.clear()
    outs = {lq: mt.sparse_decode_attention(q[:, :lq].contiguous(), pk, pv, **kw) for lq in (1, 2, 4)}
    mt.sparse_decode_attention(q[:, 0], pk, pv, **kw)
    assert sorted(p.lq for p in attention._plans.values()) == [1, 1, 2, 4]
    assert len({attention._plan_key(q[:, :lq].contiguous(), pk, pv, kw["k_window"], kw["v_window"], None, None, 0)
                for lq in (1, 2, 4)}) == 3
    for lq, out in outs.items():  # and every plan gives its own Lq's answer
        assert_same_result(out, mt.sparse_decode_attention(q[:, :lq].contiguous(), pk, pv, **kw))
        torch.testing.assert_close(out.float(), reference64(q[:, :lq], pk, pv, **kw)[0].float(), rtol=2e-2, atol=2e-2)


@st.composite
def multi_query_cases(draw):
    b = draw(st.integers(1, 3))
    lq = draw(st.integers(1, 8))
    w = draw(st.integers(lq, lq + 12))
    t = draw(st.integers(0, 60))
    return dict(b=b, lq=lq, w=w, t=t, hkv=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2, 3, 4])),
                d=draw(st.sampled_from([32, 64])), dtype=draw(st.sampled_from(DTYPES)),
                lens=draw(st.one_of(st.none(), st.lists(st.integers(0, t), min_size=b, max_size=b))),
                wlens=draw(st.one_of(st.none(), st.lists(st.integers(0, w), min_size=b, max_size=b))),
                splits=draw(st.sampled_from([0, 1, 2, 5])), seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=12, deadline=None)
@given(c=multi_query_cases())
def test_property_multi_query_matches_reference(c, device):
    q, pk, pv, kw = make_case(device, b=c["b"], hq=c["hkv"] * c["group"], hkv=c["hkv"], t=c["t"], d=c["d"],
                              dtype=c["dtype"], seed=c["seed"], seq_lens=c["lens"], w=c["w"],
                              window_lens=c["wlens"], lq=c["lq"])
    check_decode(q, pk, pv, num_splits=c["splits"], **kw)


# The Gluon kernel with several query tokens: up to 16 (token, head) rows; more run decode.py's kernel.
@pytest.mark.skipif(INTERPRETING, reason="Gluon has no interpreter: GPU only")
@pytest.mark.parametrize("hq,hkv,lq", [(8, 2, 2), (8, 2, 4), (4, 2, 8), (4, 4, 3), (8, 2, 8)],
                         ids=["g4-lq2", "g4-lq4-16rows", "g2-lq8-16rows", "g1-lq3", "g4-lq8-32rows-tl"])
@pytest.mark.parametrize("gather", gluon_launch.GATHERS)
def test_gluon_kernel_multi_query(hq, hkv, lq, gather, device, decode_config):
    q, pk, pv, kw = make_case(device, b=3, hq=hq, hkv=hkv, t=150, d=128, dtype=torch.float16,
                              seed=seed_of(hq, lq, gather), seq_lens=[150, 77, 0], w=11,
                              window_lens=[11, 3, 5], lq=lq)
    assert gluon_launch.gluon_decode_supports(torch.float16, 128, lq * hq // hkv, False) == (lq * hq // hkv <= 16)
    decode_config(**gluon_launch.GLUON_CONFIG, gather=gather)
    check_decode(q, pk, pv, **kw)
    check_decode(q, pk, pv, num_splits=4, **kw)


# ------------------------------------------------------------------------------------------------
# Property-based fuzzing
# ------------------------------------------------------------------------------------------------
@st.composite
def decode_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    d = draw(st.sampled_from([32, 64, 128, 256]))
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16]))
    t = draw(st.integers(0, 80))
    lens = draw(st.one_of(st.none(), st.lists(st.integers(0, t), min_size=b, max_size=b)))
    w = draw(st.one_of(st.none(), st.integers(0, 20)))
    wlens = None
    if w is not None:
        wlens = draw(st.one_of(st.none(), st.lists(st.integers(0, w), min_size=b, max_size=b)))
    mode = draw(st.sampled_from(["topk", "pattern"]))
    sk = draw(st.sampled_from([0.0, 0.5, 0.7, 0.9]))
    sv = draw(st.sampled_from([0.0, 0.3, 0.5, 0.7]))
    splits = draw(st.sampled_from([0, 1, 2, 5]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(dtype=dtype, d=d, b=b, hkv=hkv, group=group, t=t, lens=lens, w=w, wlens=wlens,
                mode=mode, sk=sk, sv=sv, splits=splits, seed=seed)


@settings(max_examples=20, deadline=None)
@given(c=decode_cases())
def test_property_decode_matches_reference(c, device):
    dtype, b, hkv, t, d, seed = c["dtype"], c["b"], c["hkv"], c["t"], c["d"], c["seed"]
    hq = hkv * c["group"]
    seq_lens = None if c["lens"] is None else torch.tensor(c["lens"], dtype=torch.int32, device=device)
    if c["mode"] == "topk":
        pk = mt.prune_and_pack(randn((b, hkv, t, d), dtype, seed, device), c["sk"], seq_lens=seq_lens)
        pv = mt.prune_and_pack(randn((b, hkv, t, d), dtype, seed + 1, device), c["sv"], seq_lens=seq_lens)
    else:
        pk = mt.pack(sparse_values((b, hkv, t, d), dtype, seed, device), seq_lens=seq_lens)
        pv = mt.pack(sparse_values((b, hkv, t, d), dtype, seed + 1, device), seq_lens=seq_lens)
    q = randn((b, hq, d), dtype, seed + 2, device)
    kw = {}
    if c["w"] is not None:
        kw["k_window"] = randn((b, hkv, c["w"], d), dtype, seed + 3, device)
        kw["v_window"] = randn((b, hkv, c["w"], d), dtype, seed + 4, device)
        if c["wlens"] is not None:
            kw["window_lens"] = torch.tensor(c["wlens"], dtype=torch.int32, device=device)
    check_decode(q, pk, pv, num_splits=c["splits"], **kw)


@pytest.mark.parametrize("num_splits", [0, 3])
def test_max_seq_len_hint_sizes_splits_without_changing_the_result(num_splits, device):
    """A cache allocated for 300 tokens holding at most 45: the hint only moves work between splits."""
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=300, d=64, dtype=torch.float32, seed=41,
                              seq_lens=[45, 17], w=6, window_lens=[6, 3])
    full, full_lse = mt.sparse_decode_attention(q, pk, pv, return_lse=True, num_splits=num_splits, **kw)
    hinted, hinted_lse = check_decode(q, pk, pv, num_splits=num_splits, max_seq_len=45, **kw)
    assert torch.allclose(hinted, full, rtol=FP32_TOL, atol=FP32_TOL)
    assert torch.allclose(hinted_lse, full_lse, rtol=FP32_TOL, atol=FP32_TOL)


def test_tokens_past_max_seq_len_are_not_attended(device):
    q, pk, pv, kw = make_case(device, b=2, hq=4, hkv=2, t=50, d=64, dtype=torch.float32, seed=42,
                              seq_lens=[50, 20], w=4)
    hinted = mt.sparse_decode_attention(q, pk, pv, max_seq_len=20, **kw)
    short_k = mt.PackedKV(pk.bitmap, pk.values, pk.capacity, pk.head_dim, torch.full_like(pk.seq_lens, 20))
    short_v = mt.PackedKV(pv.bitmap, pv.values, pv.capacity, pv.head_dim, short_k.seq_lens)
    want = reference64(q, short_k, short_v, **kw)[0]
    assert rel_err(hinted, want) <= 1e-5 + (0 if INTERPRETING else 3e-3)


@pytest.mark.parametrize("bad", [-1, 51, 2.0, True])
def test_max_seq_len_must_fit_the_allocation(bad, device):
    q, pk, pv, _ = make_case(device, t=50)
    with pytest.raises(ValueError, match="max_seq_len"):
        mt.sparse_decode_attention(q, pk, pv, max_seq_len=bad)
