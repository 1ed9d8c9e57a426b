"""Every bad input raises ValueError / TypeError with a message naming what is wrong.

Tensors on another device are simulated with the `meta` device (no second real device needed).
"""
import re

import pytest
import torch

import mustafar_triton as mt
import mustafar_triton._runtime as runtime
from mustafar_triton import PackedKV
from conftest import INTERPRETING
from mt_testutils import randn

META = torch.device("meta")


@pytest.fixture
def x(device):
    return randn((2, 2, 5, 64), torch.float16, 1, device)


@pytest.fixture
def packed(device):
    bitmap = torch.zeros(2, 2, 5, 2, dtype=torch.int32, device=device)
    values = torch.zeros(2, 2, 5, 16, dtype=torch.float16, device=device)
    return bitmap, values


# ------------------------------------------------------------------------------------------------
# compress API
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_sparsity_out_of_range(sparsity, x):
    for fn in (mt.prune_topk, mt.prune_and_pack):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            fn(x, sparsity)


@pytest.mark.parametrize("sparsity", ["0.5", None, True, torch.tensor(0.5), [0.5]])
def test_sparsity_wrong_type(sparsity, x):
    for fn in (mt.prune_topk, mt.prune_and_pack):
        with pytest.raises(TypeError, match="sparsity must be a float"):
            fn(x, sparsity)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int16, torch.bool], ids=str)
def test_unsupported_dtype(dtype, device):
    x = torch.zeros(1, 1, 4, 64, dtype=dtype, device=device)
    for fn in (lambda t: mt.prune_topk(t, 0.5), lambda t: mt.prune_and_pack(t, 0.5), mt.pack):
        with pytest.raises(TypeError, match=re.escape(f"x dtype {dtype} is not supported")):
            fn(x)


@pytest.mark.parametrize("d", [16, 48, 80, 100, 512])
def test_unsupported_head_dim(d, device):
    x = randn((1, 1, 4, d), torch.float16, 2, device)
    for fn in (lambda t: mt.prune_topk(t, 0.5), lambda t: mt.prune_and_pack(t, 0.5), mt.pack):
        with pytest.raises(ValueError, match=f"head dim D={d}"):
            fn(x)


def test_not_a_tensor_or_too_few_dims(device):
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        mt.prune_topk([[1.0] * 64], 0.5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        mt.pack(torch.zeros(2, 64).numpy())
    with pytest.raises(ValueError, match=r"must have shape \[..., T, D\], got \(64,\)"):
        mt.prune_and_pack(torch.zeros(64, dtype=torch.float16, device=device), 0.5)


def test_seq_lens_wrong_dtype_shape_rank(x, device):
    for fn in (lambda **k: mt.prune_and_pack(x, 0.5, **k), lambda **k: mt.pack(x, **k)):
        with pytest.raises(TypeError, match="seq_lens must be an int32 tensor, got torch.int64"):
            fn(seq_lens=torch.tensor([1, 2], device=device))
        with pytest.raises(TypeError, match="seq_lens must be an int32 tensor"):
            fn(seq_lens=[1, 2])
        with pytest.raises(ValueError, match=r"seq_lens shape \(3,\) != \[B\] = \[2\]"):
            fn(seq_lens=torch.tensor([1, 2, 3], dtype=torch.int32, device=device))
        with pytest.raises(ValueError, match=r"seq_lens shape \(1, 2\)"):
            fn(seq_lens=torch.tensor([[1, 2]], dtype=torch.int32, device=device))
        with pytest.raises(ValueError, match="seq_lens is on meta"):
            fn(seq_lens=torch.zeros(2, dtype=torch.int32, device=META))
    x3 = x[0]
    with pytest.raises(ValueError, match=r"seq_lens needs x of shape \[B, H, T, D\], got \(2, 5, 64\)"):
        mt.prune_and_pack(x3, 0.5, seq_lens=torch.tensor([1, 2], dtype=torch.int32, device=device))


@pytest.mark.parametrize("capacity,exc,msg", [
    (12, ValueError, r"capacity must be a multiple of 8 in \[8, 64\], got 12"),
    (0, ValueError, "capacity must be a multiple of 8"),
    (-8, ValueError, "capacity must be a multiple of 8"),
    (72, ValueError, r"in \[8, 64\], got 72"),
    (16.0, TypeError, "capacity must be an int, got float"),
    (True, TypeError, "capacity must be an int, got bool"),
    ("16", TypeError, "capacity must be an int, got str"),
])
def test_pack_bad_capacity(capacity, exc, msg, x):
    with pytest.raises(exc, match=msg):
        mt.pack(x, capacity=capacity)


def test_pack_capacity_overflow(device):
    x = torch.zeros(1, 1, 3, 64, dtype=torch.float32, device=device)
    x[0, 0, 1, :9] = torch.arange(1, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="a row of x has 9 nonzeros, more than capacity=8"):
        mt.pack(x, capacity=8)
    assert mt.pack(x, capacity=16).capacity == 16


def test_unpack_needs_packedkv(x):
    with pytest.raises(TypeError, match="unpack expects a PackedKV, got Tensor"):
        mt.unpack(x)


# ------------------------------------------------------------------------------------------------
# PackedKV
# ------------------------------------------------------------------------------------------------
def test_packedkv_accepts_valid(packed, device):
    bitmap, values = packed
    p = PackedKV(bitmap, values, 16, 64, torch.tensor([5, 0], dtype=torch.int32, device=device))
    assert p.shape == (2, 2, 5, 64) and p.num_tokens == 5 and p.dtype == torch.float16


def test_packedkv_malformed(packed, device):
    bitmap, values = packed
    cases = [
        (dict(head_dim=48), ValueError, "head_dim must be a multiple of 32, got 48"),
        (dict(capacity=12), ValueError, r"capacity must be a multiple of 8 in \[8, 64\], got 12"),
        (dict(capacity=0), ValueError, "capacity must be a multiple of 8"),
        (dict(capacity=72), ValueError, "got 72"),
        (dict(bitmap=bitmap.long()), TypeError, "bitmap must be int32, got torch.int64"),
        (dict(values=values.double()), TypeError, "values dtype torch.float64 not in"),
        (dict(values=values.int()), TypeError, "values dtype torch.int32 not in"),
        (dict(values=values[..., :8].contiguous()), ValueError, "does not end in capacity 16"),
        (dict(bitmap=bitmap[..., :1].contiguous()), ValueError, r"bitmap shape \(2, 2, 5, 1\) != \(2, 2, 5, 2\)"),
        (dict(bitmap=bitmap[:, :, :4].contiguous()), ValueError, r"bitmap shape \(2, 2, 4, 2\)"),
        (dict(bitmap=torch.zeros(2, 2, 5, 2, dtype=torch.int32, device=META)), ValueError, "bitmap on meta"),
        (dict(values=torch.zeros(2, 2, 16, 5, dtype=torch.float16, device=device).transpose(2, 3)),
         ValueError, "must be contiguous"),
        (dict(seq_lens=torch.tensor([5, 5], dtype=torch.int64, device=device)),
         ValueError, r"seq_lens must be int32 \[2\], got torch.int64"),
        (dict(seq_lens=torch.tensor([5, 5, 5], dtype=torch.int32, device=device)), ValueError,
         r"seq_lens must be int32 \[2\], got torch.int32 \(3,\)"),
        (dict(bitmap=bitmap[0], values=values[0], seq_lens=torch.tensor([5, 5], dtype=torch.int32, device=device)),
         ValueError, r"seq_lens needs a \[B, H, T, capacity\] cache"),
        (dict(seq_lens=torch.tensor([5, 5], dtype=torch.int32, device=META)), ValueError, "seq_lens on meta"),
    ]
    for over, exc, msg in cases:
        kw = dict(bitmap=bitmap, values=values, capacity=16, head_dim=64, seq_lens=None)
        kw.update(over)
        with pytest.raises(exc, match=msg):
            PackedKV(**kw)


# ------------------------------------------------------------------------------------------------
# device checks (CPU tensors are only allowed under the interpreter)
# ------------------------------------------------------------------------------------------------
def test_check_device_without_interpreter(monkeypatch):
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    cpu = torch.zeros(2, 2, 4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="x is on cpu: mustafar_triton kernels need CUDA tensors"):
        runtime.check_device("x", cpu)
    # the public entry points go through it
    with pytest.raises(ValueError, match="x is on cpu"):
        mt.prune_topk(cpu, 0.5)
    with pytest.raises(ValueError, match="x is on cpu"):
        mt.pack(cpu)
    bitmap = torch.zeros(2, 2, 4, 2, dtype=torch.int32)
    p = PackedKV(bitmap, torch.zeros(2, 2, 4, 8, dtype=torch.float16), 8, 64)
    with pytest.raises(ValueError, match="packed.values is on cpu"):
        mt.unpack(p)
    with pytest.raises(ValueError, match="q is on cpu"):
        mt.sparse_decode_attention(torch.zeros(2, 4, 64, dtype=torch.float16), p, p)


def test_check_device_accepts(monkeypatch):
    monkeypatch.setattr(runtime, "interpreting", lambda: True)
    runtime.check_device("x", torch.zeros(1))               # CPU under the interpreter
    runtime.check_device("x", torch.zeros(1, device="cuda") if torch.cuda.is_available() else torch.zeros(1))
    with pytest.raises(ValueError, match="x is on meta"):
        runtime.check_device("x", torch.zeros(1, device=META))


def test_meta_tensor_rejected(device):
    x = torch.zeros(1, 1, 4, 64, dtype=torch.float16, device=META)
    with pytest.raises(ValueError, match="x is on meta"):
        mt.prune_topk(x, 0.5)


# ------------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------------
def _pk(device, b=2, hkv=2, t=6, d=64, dtype=torch.float16, seq_lens=None, cap=16):
    bitmap = torch.zeros(b, hkv, t, d // 32, dtype=torch.int32, device=device)
    values = torch.zeros(b, hkv, t, cap, dtype=dtype, device=device)
    return PackedKV(bitmap, values, cap, d, seq_lens)


@pytest.fixture
def dec(device):
    q = randn((2, 4, 64), torch.float16, 3, device)
    return q, _pk(device), _pk(device)


def test_decode_valid_call_runs(dec):
    q, pk, pv = dec
    out = mt.sparse_decode_attention(q, pk, pv)  # all-zero cache: uniform attention over zeros
    assert out.shape == q.shape and torch.all(out == 0)


def test_decode_bad_q(dec, device):
    _, pk, pv = dec
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        mt.sparse_decode_attention([1.0], pk, pv)
    with pytest.raises(TypeError, match="q dtype torch.float64 not supported"):
        mt.sparse_decode_attention(torch.zeros(2, 4, 64, dtype=torch.float64, device=device), pk, pv)
    with pytest.raises(TypeError, match="q dtype torch.int32 not supported"):
        mt.sparse_decode_attention(torch.zeros(2, 4, 64, dtype=torch.int32, device=device), pk, pv)
    for shape in [(2, 64), (2, 1, 4, 1, 64)]:
        with pytest.raises(ValueError, match=r"q must be \[B, Hq, D\] or \[B, Lq, Hq, D\], got shape"):
            mt.sparse_decode_attention(torch.zeros(shape, dtype=torch.float16, device=device), pk, pv)
    with pytest.raises(ValueError, match="q is on meta"):
        mt.sparse_decode_attention(torch.zeros(2, 4, 64, dtype=torch.float16, device=META), pk, pv)


def test_decode_bad_multi_query(dec, device):
    """q [B, Lq, Hq, D]: 1 <= Lq <= 8, a window of at least Lq tokens, the same checks as [B, Hq, D]."""
    _, pk, pv = dec
    w = randn((2, 2, 3, 64), torch.float16, 4, device)
    q = lambda lq, dtype=torch.float16, hq=4: torch.zeros(2, lq, hq, 64, dtype=dtype, device=device)  # noqa: E731
    cases = [
        (q(9), dict(k_window=w, v_window=w), ValueError, r"1 <= Lq <= 8, got Lq=9 \(shape \(2, 9, 4, 64\)\)"),
        (q(0), dict(k_window=w, v_window=w), ValueError, r"1 <= Lq <= 8, got Lq=0"),
        (q(2), {}, ValueError, r"Lq=2\) need a dense window \(k_window / v_window\)"),
        (q(4), dict(k_window=w, v_window=w), ValueError, r"Lq=4\) need a window of at least Lq tokens .* got W=3"),
        (q(2), dict(k_window=w[:, :, :0], v_window=w[:, :, :0]), ValueError, "got W=0"),
        (q(2, torch.float64), dict(k_window=w, v_window=w), TypeError, "q dtype torch.float64 not supported"),
        (q(2, hq=3), dict(k_window=w, v_window=w), ValueError, "q heads 3 not a multiple of packed_k kv heads 2"),
        (torch.zeros(2, 2, 4, 32, dtype=torch.float16, device=device), dict(k_window=w, v_window=w), ValueError,
         r"packed_k head_dim 64 != q head dim 32 \(q shape \(2, 2, 4, 32\)\)"),
        (torch.zeros(3, 2, 4, 64, dtype=torch.float16, device=device), dict(k_window=w, v_window=w), ValueError,
         "packed_k batch 2 != q batch 3"),
        (q(2), dict(k_window=w, v_window=w.float()), TypeError, "v_window dtype torch.float32 != q dtype"),
    ]
    for qq, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            mt.sparse_decode_attention(qq, pk, pv, **kw)
    # Lq = 1 needs no window; Lq = W is the longest
    assert mt.sparse_decode_attention(q(1), pk, pv).shape == (2, 1, 4, 64)
    out, lse = mt.sparse_decode_attention(q(3), pk, pv, k_window=w, v_window=w, return_lse=True)
    assert out.shape == (2, 3, 4, 64) and lse.shape == (2, 3, 4)


def test_decode_mismatched_packed(dec, device):
    q, pk, pv = dec
    cases = [
        (dict(packed_k=q), TypeError, "packed_k must be a PackedKV or PagedKV, got Tensor"),
        (dict(packed_v=None), TypeError, "packed_v must be a PackedKV or PagedKV, got NoneType"),
        (dict(packed_k=PackedKV(pk.bitmap[0], pk.values[0], 16, 64)), ValueError,
         r"packed_k must hold a \[B, Hkv, T, D\] cache"),
        (dict(packed_v=_pk(device, dtype=torch.float32)), TypeError,
         "packed_v dtype torch.float32 != q dtype torch.float16"),
        (dict(packed_k=_pk(device, dtype=torch.bfloat16)), TypeError, "packed_k dtype torch.bfloat16"),
        (dict(packed_k=_pk(META)), ValueError, "packed_k is on meta but q is on"),
        (dict(packed_v=_pk(META)), ValueError, "packed_v is on meta but q is on"),
        (dict(packed_k=_pk(device, d=128)), ValueError, r"packed_k head_dim 128 != q head dim 64"),
        (dict(packed_v=_pk(device, d=32)), ValueError, r"packed_v head_dim 32 != q head dim 64"),
        (dict(packed_k=_pk(device, b=3)), ValueError, "packed_k batch 3 != q batch 2"),
        (dict(packed_k=_pk(device, hkv=3), packed_v=_pk(device, hkv=3)), ValueError,
         "q heads 4 not a multiple of packed_k kv heads 3"),
        (dict(packed_v=_pk(device, hkv=1)), ValueError, "packed_k dense shape .* != packed_v dense shape"),
        (dict(packed_v=_pk(device, t=7)), ValueError, "packed_k dense shape"),
        (dict(packed_k=_pk(device, seq_lens=torch.tensor([1, 2], dtype=torch.int32, device=device))),
         ValueError, "packed_k and packed_v must both have seq_lens or both not"),
    ]
    for over, exc, msg in cases:
        kw = dict(packed_k=pk, packed_v=pv)
        kw.update(over)
        with pytest.raises(exc, match=msg):
            mt.sparse_decode_attention(q, kw["packed_k"], kw["packed_v"])


def test_decode_bad_window(dec, device):
    q, pk, pv = dec
    w = randn((2, 2, 3, 64), torch.float16, 4, device)
    wl = torch.tensor([1, 3], dtype=torch.int32, device=device)
    cases = [
        (dict(k_window=w), ValueError, "give both k_window and v_window, or neither"),
        (dict(v_window=w), ValueError, "give both k_window and v_window"),
        (dict(window_lens=wl), ValueError, "window_lens given without k_window / v_window"),
        (dict(k_window=w.tolist(), v_window=w), TypeError, "k_window must be a torch.Tensor, got list"),
        (dict(k_window=w, v_window=w.float()), TypeError, "v_window dtype torch.float32 != q dtype torch.float16"),
        (dict(k_window=w.to(META), v_window=w), ValueError, "k_window is on meta but q is on"),
        (dict(k_window=w[0], v_window=w[0]), ValueError, r"k_window shape \(2, 3, 64\) must be \[B=2, Hkv=2, W, D=64\]"),
        (dict(k_window=w, v_window=w[:1]), ValueError, r"v_window shape \(1, 2, 3, 64\) must be \[B=2"),
        (dict(k_window=w[:, :1], v_window=w[:, :1]), ValueError, "must be \\[B=2, Hkv=2"),
        (dict(k_window=w[..., :32], v_window=w[..., :32]), ValueError, "D=64"),
        (dict(k_window=w, v_window=w[:, :, :2]), ValueError, r"k_window shape \(2, 2, 3, 64\) != v_window shape \(2, 2, 2, 64\)"),
        (dict(k_window=w, v_window=w, window_lens=wl.long()), TypeError, "window_lens must be an int32 tensor, got torch.int64"),
        (dict(k_window=w, v_window=w, window_lens=[1, 3]), TypeError, "window_lens must be an int32 tensor"),
        (dict(k_window=w, v_window=w, window_lens=wl[:1]), ValueError, r"window_lens shape \(1,\) != \[B\] = \[2\]"),
        (dict(k_window=w, v_window=w, window_lens=wl.to(META)), ValueError, "window_lens is on meta"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            mt.sparse_decode_attention(q, pk, pv, **kw)


@pytest.mark.parametrize("num_splits", [-1, 1.5, True, "2", None])
def test_decode_bad_num_splits(num_splits, dec):
    q, pk, pv = dec
    with pytest.raises(ValueError, match="num_splits must be an int >= 0, got"):
        mt.sparse_decode_attention(q, pk, pv, num_splits=num_splits)


def test_decode_checks_hold_after_the_layout_is_planned(device):
    """A valid call plans its argument layout (checks, config, splits) once; a call that differs
    only where the plan's key could confuse it (True == 1, a bound past T, a window that is a
    view) is still checked, and a planned call gives what a fresh plan gives."""
    from mustafar_triton import attention
    seq_lens = torch.tensor([6, 2], dtype=torch.int32, device=device)
    pk = mt.prune_and_pack(randn((2, 2, 6, 64), torch.float16, 5, device), 0.5, seq_lens=seq_lens)
    pv = mt.prune_and_pack(randn((2, 2, 6, 64), torch.float16, 6, device), 0.5, seq_lens=seq_lens)
    q = randn((2, 4, 64), torch.float16, 7, device)
    w = randn((2, 2, 3, 128), torch.float16, 8, device)[..., ::2]  # not contiguous: copied per call
    wl = torch.tensor([3, 1], dtype=torch.int32, device=device)
    call = lambda **kw: mt.sparse_decode_attention(q, pk, pv, k_window=w, v_window=w, window_lens=wl,  # noqa: E731
                                                   return_lse=True, **kw)
    planned = [call(num_splits=1, max_seq_len=1), call(max_seq_len=6), call(max_seq_len=1, num_splits=1)]
    assert len(attention._plans) >= 1 and torch.equal(planned[0][0], planned[2][0])
    with pytest.raises(ValueError, match="num_splits must be an int >= 0, got True"):
        call(num_splits=True, max_seq_len=1)
    for bound in (True, 7, -1, 2.0):
        with pytest.raises(ValueError, match=re.escape(f"max_seq_len must be an int in [0, T=6], got {bound!r}")):
            call(max_seq_len=bound)
    with pytest.raises(TypeError, match="window_lens must be an int32 tensor, got torch.int64"):
        mt.sparse_decode_attention(q, pk, pv, k_window=w, v_window=w, window_lens=wl.long())
    with pytest.raises(ValueError, match="q is on meta"):
        mt.sparse_decode_attention(q.to(META), pk, pv, k_window=w, v_window=w, window_lens=wl)
    attention._plans.clear()
    for (out, lse), kw in zip(planned, (dict(num_splits=1, max_seq_len=1), dict(max_seq_len=6))):
        fresh_out, fresh_lse = call(**kw)
        assert torch.equal(out, fresh_out) and torch.equal(lse, fresh_lse)


def test_forced_config_reaches_a_planned_layout(device):
    """autotune.forced_config (tune.py, perf/) applies to a layout planned before it, and the
    plan's own config returns after it."""
    from mustafar_triton import attention, autotune
    q, pk, pv = randn((1, 2, 64), torch.float32, 1, device), *(
        mt.prune_and_pack(randn((1, 1, 70, 64), torch.float32, s, device), 0.5) for s in (2, 3))
    attention._plans.clear()
    seen = []
    original = attention._Launch.__init__

    def record(self, plan, cfg, context):
        seen.append(dict(cfg))
        original(self, plan, cfg, context)
    forced = dict(autotune.heuristic_config("decode", q.device), BLOCK_N=16, num_splits=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention._Launch, "__init__", record)
        want = mt.sparse_decode_attention(q, pk, pv)
        with autotune.forced_config("decode", forced):
            got = mt.sparse_decode_attention(q, pk, pv)
        again = mt.sparse_decode_attention(q, pk, pv)
    planned = seen[0]["BLOCK_N"]  # the plan's own config: 32 in the interpreter, 64 on a GPU (fp32)
    assert planned != 16 and [c["BLOCK_N"] for c in seen] == [planned, 16, planned]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, want)


def test_launched_gather_reports_the_planned_launch(device):
    """attention.launched_gather names the Gluon gather a planned layout ran (perf/sweep.py records
    it): none before the first call, none for decode.py's kernel (the interpreter, fp32)."""
    from mustafar_triton import attention
    from mustafar_triton.kernels.decode_gluon_launch import GATHERS
    for dtype in (torch.float16, torch.float32):
        q = randn((2, 4, 64), dtype, 5, device)
        pk, pv = (mt.prune_and_pack(randn((2, 2, 50, 64), dtype, s, device), 0.7) for s in (6, 7))
        attention._plans.clear()
        assert attention.launched_gather(q, pk, pv) is None
        mt.sparse_decode_attention(q, pk, pv)
        gather = attention.launched_gather(q, pk, pv)
        if INTERPRETING or dtype == torch.float32:
            assert gather is None
        else:
            assert gather in GATHERS
        assert attention.launched_gather(q, pk, pv, max_seq_len=10) is None  # a bound not planned
