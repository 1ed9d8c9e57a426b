"""The torch.library custom op torch.ops.mustafar_triton.sparse_decode_attention.

It must give exactly the direct call's results, pass torch.library.opcheck (schema, fake tensor,
autograd registration, AOT dispatch with dynamic shapes), and trace under
torch.compile(fullgraph=True) with the real inductor backend (on the CPU too, where the op itself
runs the kernels through the Triton interpreter).
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mustafar_triton as mt
from mt_testutils import randn

OP = torch.ops.mustafar_triton.sparse_decode_attention.default


def make_case(device, *, b=2, hq=4, hkv=2, t=20, w=4, d=64, dtype=torch.float16, seed=0):
    """q [B, Hq, D], ragged packed K / V [B, Hkv, T, D] and a ragged dense window [B, Hkv, W, D]."""
    seq_lens = torch.tensor([t, t // 3][:b], dtype=torch.int32, device=device)
    pk = mt.prune_and_pack(randn((b, hkv, t, d), dtype, seed, device), 0.7, seq_lens=seq_lens)
    pv = mt.prune_and_pack(randn((b, hkv, t, d), dtype, seed + 1, device), 0.5, seq_lens=seq_lens)
    q = randn((b, hq, d), dtype, seed + 2, device)
    window = dict(k_window=randn((b, hkv, w, d), dtype, seed + 3, device),
                  v_window=randn((b, hkv, w, d), dtype, seed + 4, device),
                  window_lens=torch.tensor([w, 1][:b], dtype=torch.int32, device=device))
    return q, pk, pv, window


def op_args(q, pk, pv, window, softmax_scale=None, num_splits=0):
    return (q, pk.bitmap, pk.values, pv.bitmap, pv.values, pk.seq_lens, window.get("k_window"),
            window.get("v_window"), window.get("window_lens"), softmax_scale, num_splits)


def test_schema():
    assert str(OP._schema) == (
        "mustafar_triton::sparse_decode_attention(Tensor q, Tensor k_bitmap, Tensor k_values, "
        "Tensor v_bitmap, Tensor v_values, Tensor? seq_lens=None, Tensor? k_window=None, "
        "Tensor? v_window=None, Tensor? window_lens=None, float? softmax_scale=None, "
        "SymInt num_splits=0, SymInt? max_seq_len=None, Tensor? block_table=None, float k_value_scale=1., "
        "float v_value_scale=1., bool exact_weights=False) -> (Tensor, Tensor)")


@pytest.mark.parametrize("with_window", [True, False], ids=["window", "no-window"])
@pytest.mark.parametrize("scale,splits", [(None, 0), (0.3, 1), (None, 2)])
def test_op_equals_direct_call(with_window, scale, splits, device):
    q, pk, pv, window = make_case(device, seed=3)
    window = window if with_window else {}
    want, want_lse = mt.sparse_decode_attention(q, pk, pv, softmax_scale=scale, num_splits=splits,
                                                return_lse=True, **window)
    out, lse = OP(*op_args(q, pk, pv, window, scale, splits))
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    out2 = mt.sparse_decode_attention_op(q, pk, pv, softmax_scale=scale, num_splits=splits, **window)
    assert torch.equal(out2, want)


def test_op_exact_weights(device):
    """exact_weights goes through the op: its result is the direct call's with it (bf16, where it
    changes the product on a GPU)."""
    q, pk, pv, window = make_case(device, seed=41, t=45, dtype=torch.bfloat16)
    got = mt.sparse_decode_attention_op(q, pk, pv, exact_weights=True, **window)
    assert torch.equal(got, mt.sparse_decode_attention(q, pk, pv, exact_weights=True, **window))


def test_op_without_seq_lens(device):
    q, _, _, window = make_case(device, seed=4)
    k, v = randn((2, 2, 9, 64), torch.float16, 5, device), randn((2, 2, 9, 64), torch.float16, 6, device)
    pk, pv = mt.prune_and_pack(k, 0.7), mt.prune_and_pack(v, 0.7)
    want = mt.sparse_decode_attention(q, pk, pv, **window)
    assert torch.equal(mt.sparse_decode_attention_op(q, pk, pv, **window), want)


def test_fake_shapes():
    """The fake implementation: out like q (contiguous), lse float32 [B, Hq]; no kernel runs."""
    with FakeTensorMode():
        q = torch.empty(3, 8, 128, dtype=torch.bfloat16)
        kb, vb = torch.empty(3, 2, 50, 4, dtype=torch.int32), torch.empty(3, 2, 50, 4, dtype=torch.int32)
        kv, vv = torch.empty(3, 2, 50, 40, dtype=torch.bfloat16), torch.empty(3, 2, 50, 64, dtype=torch.bfloat16)
        out, lse = OP(q, kb, kv, vb, vv)
        # several query tokens: q [B, Lq, Hq, D], lse [B, Lq, Hq]
        out4, lse4 = OP(torch.empty(3, 4, 8, 128, dtype=torch.bfloat16), kb, kv, vb, vv)
    assert out.shape == (3, 8, 128) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert lse.shape == (3, 8) and lse.dtype == torch.float32
    assert out4.shape == (3, 4, 8, 128) and lse4.shape == (3, 4, 8) and lse4.dtype == torch.float32


def test_op_multi_query(device):
    """q [B, Lq, Hq, D] through the op: the direct call's results, and opcheck's checks."""
    q, pk, pv, window = make_case(device, seed=13)
    q4 = randn((2, 3, 4, 64), torch.float16, 14, device)
    want, want_lse = mt.sparse_decode_attention(q4, pk, pv, num_splits=2, return_lse=True, **window)
    out, lse = OP(*op_args(q4, pk, pv, window, None, 2))
    assert torch.equal(out, want) and torch.equal(lse, want_lse) and lse.shape == (2, 3, 4)
    torch.library.opcheck(OP, op_args(q4, pk, pv, window))


def test_opcheck(device):
    """Schema, fake tensor, autograd registration and AOT dispatch checks of torch.library."""
    q, pk, pv, window = make_case(device, seed=7)
    torch.library.opcheck(OP, op_args(q, pk, pv, window, softmax_scale=0.3))
    # no optional tensors; q a non-contiguous view (the output is contiguous, as the fake says)
    q_wide = randn((2, 8, 64), torch.float16, 8, device)
    t_pk, t_pv = mt.prune_and_pack(q_wide[:, None, :5].expand(2, 2, 5, 64), 0.5), mt.prune_and_pack(
        q_wide[:, None, 3:].expand(2, 2, 5, 64), 0.5)
    torch.library.opcheck(OP, op_args(q_wide[:, ::2], t_pk, t_pv, {}))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_op_paged(device):
    """Two PagedKV through the op (block_table last): the direct paged call's results, opcheck,
    and torch.compile(fullgraph=True) around it; packed_v with its own block table is refused."""
    q, pk, pv, window = make_case(device, seed=13, t=40)
    gk, gv = mt.reference.pages_from_packed([pk, pv], 16, extra_pages=2, generator=torch.Generator().manual_seed(0))
    want, want_lse = mt.sparse_decode_attention(q, gk, gv, return_lse=True, **window)
    out, lse = mt.sparse_decode_attention_op(q, gk, gv, return_lse=True, **window)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    args = op_args(q, gk, gv, window) + (None, gk.block_table)
    torch.library.opcheck(OP, args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q: mt.sparse_decode_attention_op(q + 0, gk, gv, **window), fullgraph=True)
    torch.testing.assert_close(compiled(q), want)
    with pytest.raises(ValueError, match="share one block_table"):
        mt.sparse_decode_attention_op(q, gk, gv.with_tables(gk.block_table.clone(), gk.seq_lens), **window)
    with pytest.raises(TypeError, match="two PackedKV or two PagedKV"):
        mt.sparse_decode_attention_op(q, gk, pv, **window)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_fullgraph(device):
    """torch.compile(fullgraph=True, inductor) of a function around the op: PackedKV arguments,
    arithmetic before and after it. Inductor compiles the surrounding graph (C++ on the CPU)."""
    q, pk, pv, window = make_case(device, seed=9)

    def step(q, pk, pv, window):
        out, lse = mt.sparse_decode_attention_op(q * 2, pk, pv, return_lse=True, **window)
        return out.float() + 1, lse.exp()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got, want = compiled(q, pk, pv, window), step(q, pk, pv, window)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_wrapper_validation(device):
    q, pk, pv, window = make_case(device, seed=1)
    with pytest.raises(TypeError, match="PackedKV"):
        mt.sparse_decode_attention_op(q, pk.values, pv)
    no_lens = mt.PackedKV(pv.bitmap, pv.values, pv.capacity, pv.head_dim)
    with pytest.raises(ValueError, match="both have seq_lens"):
        mt.sparse_decode_attention_op(q, pk, no_lens)
    with pytest.raises(ValueError, match="head_dim"):  # raised by the op's implementation
        mt.sparse_decode_attention_op(q[..., :32], pk, pv)


@pytest.mark.cuda_only
def test_cuda_graph_capture(device):
    q, pk, pv, window = make_case(device, seed=11)
    want = mt.sparse_decode_attention_op(q, pk, pv, **window)  # compiles before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mt.sparse_decode_attention_op(q, pk, pv, **window)
    q.copy_(randn(tuple(q.shape), q.dtype, 12, device))
    graph.replay()
    torch.testing.assert_close(out, mt.sparse_decode_attention(q, pk, pv, **window), rtol=1e-3, atol=1e-3)
    assert not torch.equal(out, want)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_write_pages_op(device):
    """torch.ops.mustafar_triton.write_pages: write_pages' bits in place, opcheck, and a compiled
    step (write the new tokens, then attend over the pages) equal to the eager one."""
    q, pk, pv, window = make_case(device, seed=17, t=40)
    gk, gv = mt.reference.pages_from_packed([pk, pv], 16, extra_pages=3, generator=torch.Generator().manual_seed(1))
    x = randn((3, 2, 64), torch.float16, 18, device)
    slots = torch.tensor([gk.num_pages * 16 - 1, -1, 5], dtype=torch.int64, device=device)  # a free page's rows
    want_k = mt.PagedKV(gk.bitmap.clone(), gk.values.clone(), gk.capacity, 64, gk.block_table, gk.seq_lens)
    mt.write_pages(want_k, x, slots, 0.7)
    mt.write_pages_op(gk, x, slots, 0.7)
    assert torch.equal(gk.bitmap, want_k.bitmap) and torch.equal(gk.values.view(torch.int16),
                                                                  want_k.values.view(torch.int16))
    torch.library.opcheck(torch.ops.mustafar_triton.write_pages.default,
                          (gk.bitmap.clone(), gk.values.clone(), x, slots, 0.7))

    def step(x, q):
        mt.write_pages_op(gk, x, slots, 0.7)
        mt.write_pages_op(gv, x, slots, 0.5)
        return mt.sparse_decode_attention_op(q, gk, gv, **window)

    want = step(x, q)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x, q), want)
    with pytest.raises(TypeError, match="PagedKV"):
        mt.write_pages_op(pk, x, slots, 0.7)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_ops_keep_no_tensor_they_allocate(device):
    """CUDA-graph trees (torch.compile mode="reduce-overhead", transformers' compiled generate())
    raise when a tensor allocated while a graph runs outlives the run without being an output. So
    the decode op allocates its split buffers per call (the eager call keeps them per layout and
    stream) and write_pages keeps nothing. On a GPU the compiled step runs under graph trees: its
    warm-up and recorded runs then replay and equal the eager step."""
    q, pk, pv, window = make_case(device, seed=21, t=37)  # a layout no other test plans
    gk, gv = mt.reference.pages_from_packed([pk, pv], 16, extra_pages=2, generator=torch.Generator().manual_seed(2))
    x = randn((2, 2, 64), torch.float16, 22, device)
    slots = torch.tensor([gk.num_pages * 16 - 1, 3], dtype=torch.int64, device=device)

    def step(x, q):
        mt.write_pages_op(gk, x, slots, 0.7)
        mt.write_pages_op(gv, x, slots, 0.5)
        return mt.sparse_decode_attention_op(q * 1, pk, pv, **window), mt.sparse_decode_attention_op(q, gk, gv, **window)

    want = step(x, q)
    plan = mt.attention.plan_for(q, pk, pv, window["k_window"], window["v_window"], window["window_lens"], None, 0)
    assert plan.split_buffers == {}, "the op kept its split buffers"
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # graph trees: warm-up, record, replay
        got = compiled(x, q)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
