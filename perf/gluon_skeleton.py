"""How fast could a Gluon decode kernel be with a nearly free expansion? (GPU only, timing only.)

    python perf/gluon_skeleton.py [--batch 16 --tokens 16384 --sparsity 0.7] [--out FILE.json]

The skeleton kernel below has the data path of decode_gluon.py's kernel (q held in registers as an
mma.sync operand, the expanded K and V tiles converted to operands through shared memory, the
online softmax of decode_gluon._scores / _accumulate) but replaces the slot arithmetic by a FIXED
slot per channel: channel d of a token reads its value row at slot d * capacity // D, a load whose
address is the token's row plus a constant, and (EXPAND=1) zeroes it where the bitmap bit is clear
(shift, and, select). It reads every byte of the packed cache and issues one 2-byte load per dense
element, as a real expansion must, but its results are WRONG by design. Compared in one run with
the shipped tl kernel and dense SDPA, it bounds what any expansion on this data path can reach:
if the skeleton is not well under dense, no Gluon kernel of this shape will be faster than dense.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from common import bench_us, copy_bandwidth, environment, write_results  # noqa: E402 (puts the repo first)

import mustafar_triton as mt  # noqa: E402
from mustafar_triton import autotune  # noqa: E402
from mustafar_triton._runtime import cdiv  # noqa: E402
from mustafar_triton.kernels.decode import _split_ranges, choose_num_splits  # noqa: E402
from mustafar_triton.kernels.decode_gluon import _accumulate, _query_and_state, _scores  # noqa: E402


@gluon.jit
def _fixed_slot_tile(bits_ptr, vals_ptr, start, hi, HEAD_DIM: gl.constexpr, CAPACITY: gl.constexpr,
                     BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr, EXPAND: gl.constexpr):
    """[BLOCK_N, HEAD_DIM] tile of tokens [start, start + BLOCK_N): channel d reads slot
    d * CAPACITY // HEAD_DIM of its value row, masked by bit d of the bitmap when EXPAND (not the
    real expansion: timing only). Laid out [token, word, channel in word] with 8 channels per
    thread, so each bitmap word is loaded once per thread and shared by its 8 channels."""
    NW: gl.constexpr = HEAD_DIM // 32
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [8, 1, 4], [NUM_WARPS, 1, 1], [2, 1, 0])
    t = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))[:, None, None]
    w = gl.arange(0, NW, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))[None, :, None]
    c = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))[None, None, :]
    ok = t < hi
    val = gl.load(vals_ptr + t * CAPACITY + ((w * 32 + c) * CAPACITY) // HEAD_DIM, mask=ok, other=0.0)
    if EXPAND:
        word = gl.load(bits_ptr + t * NW + w, mask=ok, other=0)          # [BLOCK_N, NW, 1]
        val = gl.where(((word >> c) & 1) != 0, val, 0.0)
    return gl.reshape(val, [BLOCK_N, HEAD_DIM])


@gluon.jit
def _skeleton_kernel(q_ptr, k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr, part_out_ptr,
                     num_kv_heads, tokens, tokens_per_split, qk_scale,
                     GROUP: gl.constexpr, BLOCK_H: gl.constexpr, HEAD_DIM: gl.constexpr,
                     CAPACITY: gl.constexpr, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr,
                     EXPAND: gl.constexpr):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS], instr_shape=[16, 8])
    split = gl.program_id(0)
    bh = gl.program_id(1)
    q_op, m, l, acc = _query_and_state(q_ptr, bh // num_kv_heads, bh % num_kv_heads, num_kv_heads * GROUP * HEAD_DIM,
                                       HEAD_DIM, GROUP, BLOCK_H, HEAD_DIM, NUM_WARPS, MMA)
    lo, hi, k_bits, k_vals, v_bits, v_vals = _split_ranges(
        split, bh, num_kv_heads, tokens, tokens, tokens_per_split, None,
        k_bitmap_ptr, k_values_ptr, v_bitmap_ptr, v_values_ptr, HEAD_DIM, CAPACITY, CAPACITY, False)
    for start in range(lo, hi, BLOCK_N):
        valid = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA)) < hi
        k = _fixed_slot_tile(k_bits, k_vals, start, hi, HEAD_DIM, CAPACITY, BLOCK_N, NUM_WARPS, EXPAND)
        p_op, m, l, alpha = _scores(q_op, k, valid, m, l, qk_scale, MMA)
        v = _fixed_slot_tile(v_bits, v_vals, start, hi, HEAD_DIM, CAPACITY, BLOCK_N, NUM_WARPS, EXPAND)
        acc = _accumulate(p_op, v, acc, alpha, MMA)
    rows = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, MMA))
    part = (bh.to(gl.int64) * gl.num_programs(0) + split) * GROUP + rows
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, MMA))
    gl.store(part_out_ptr + part[:, None] * HEAD_DIM + cols[None, :], acc / l[:, None], mask=(rows < GROUP)[:, None])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--out", default="gluon_skeleton.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    b, hq, hkv, t, d = args.batch, 32, 8, args.tokens, 128
    group = hq // hkv
    q = torch.randn(b, hq, d, device=dev, dtype=torch.float16)
    k, v = (torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16) for _ in range(2))
    pk, pv = mt.prune_and_pack(k, args.sparsity), mt.prune_and_pack(v, args.sparsity)
    shape = dict(batch=b, tokens=t, hq=hq, hkv=hkv, d=d, dtype="float16", sparsity=args.sparsity)
    bw = copy_bandwidth(dev, 2**30)
    rows = []

    def record(kind, us, nbytes, **extra):
        rows.append(dict(kind=kind, us=us, bytes=nbytes, bw_frac=nbytes / (us * 1e-6) / bw, **extra, **shape))
        print(f"{kind:34s} {extra.get('config', ''):24s} {us:9.1f} us", flush=True)

    q4 = q[:, :, None, :]
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel(backend):
            us = bench_us(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True), dev)
        record("dense_sdpa", us, 2 * k.numel() * 2, config=name)
    sparse_bytes = pk.nbytes + pv.nbytes
    shipped = dict(BLOCK_N=64, num_warps=4, num_stages=2, num_splits=0, SLOTS="popc", maxnreg=128)
    with autotune.forced_config("decode", shipped):
        record("tl kernel (shipped, incl. merge)", bench_us(lambda: mt.sparse_decode_attention(q, pk, pv), dev),
               sparse_bytes, config="popc:64:4:2:128")
    for warps, block_n in ((4, 64), (4, 128), (8, 128)):
        splits = choose_num_splits(0, torch.cuda.get_device_properties(dev).multi_processor_count, b * hkv, t, block_n)
        per_split = cdiv(cdiv(t, splits), block_n) * block_n
        splits = cdiv(t, per_split)
        part = torch.empty(b * hkv, splits, group, d, device=dev, dtype=torch.float32)
        for expand in (0, 1):
            def call():
                _skeleton_kernel[(splits, b * hkv)](
                    q, pk.bitmap, pk.values, pv.bitmap, pv.values, part, hkv, t, per_split, 0.125 * 1.4427,
                    GROUP=group, BLOCK_H=16, HEAD_DIM=d, CAPACITY=pk.capacity, BLOCK_N=block_n,
                    NUM_WARPS=warps, EXPAND=expand, num_warps=warps)
            record(f"gluon skeleton, expand={expand}", bench_us(call, dev), sparse_bytes,
                   config=f"{block_n}:{warps} splits {splits}")
    write_results(Path(args.out), dict(environment(dev), copy_bandwidth_Bps=bw), rows)


if __name__ == "__main__":
    main()
