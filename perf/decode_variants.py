"""Decode-kernel experiments on a GPU: every slot-expansion variant and tile config against dense
SDPA, in one run on the same data. Writes JSON (meta + rows) and prints a table.

    python perf/decode_variants.py --out perf/results/decode_variants_h100.json

Variants are forced with autotune.forced_config, so the public API stays as users see it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import bench_us, copy_bandwidth, environment, write_results  # noqa: E402 (puts the repo first)

import mustafar_triton as mt  # noqa: E402
from mustafar_triton import autotune, reference  # noqa: E402
from mustafar_triton.kernels.decode import SLOT_MODES  # noqa: E402
from mustafar_triton.kernels.decode_gluon_launch import GLUON_CONFIG  # noqa: E402


def gluon_config(block_n: int, splits: int) -> dict:
    return dict(GLUON_CONFIG, BLOCK_N=block_n, num_splits=splits)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="decode_variants.json")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--configs", default="popc:64:4:2,popc:64:4:2:128,popc:32:4:2,popc:64:8:2,lut:64:4:2",
                    help="comma-separated slots:block_n:warps:stages[:maxnreg[:splits[:prefetch]]] "
                         "(maxnreg 0 = no cap; splits as num_splits in the config: 0, -k or a count; "
                         "prefetch: value rows this many tiles ahead), or gluon:block_n[:splits] for "
                         "the Gluon kernel (decode_gluon.py; splits -k: k whole waves of one-warp programs; "
                         "its register cap comes with the kernel)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows = []
    bw = copy_bandwidth(dev, 2**30)

    def bench(fn) -> float:
        return bench_us(fn, dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)

    # Correctness of every slot mode on the GPU first (fp16 and bf16, GQA, ragged, window).
    for dt in (torch.float16, torch.bfloat16):
        b, hq, hkv, t, w, d = 3, 32, 8, 1000, 17, 128
        q = torch.randn(b, hq, d, device=dev, dtype=dt)
        k, v = (torch.randn(b, hkv, t, d, device=dev, dtype=dt) for _ in range(2))
        kw, vw = (torch.randn(b, hkv, w, d, device=dev, dtype=dt) for _ in range(2))
        sl = torch.tensor([t, 517, 0], dtype=torch.int32, device=dev)
        wl = torch.tensor([w, 3, 9], dtype=torch.int32, device=dev)
        pk, pv = mt.prune_and_pack(k, 0.7, seq_lens=sl), mt.prune_and_pack(v, 0.5, seq_lens=sl)
        ref = reference.sparse_decode_attention(q, pk, pv, k_window=kw, v_window=vw, window_lens=wl)
        same = reference.sparse_decode_attention(q, pk, pv, k_window=kw, v_window=vw, window_lens=wl,
                                                 compute_dtype=dt)
        same_err = ((same.double() - ref.double()).norm() / ref.double().norm()).item()
        checks = [(f"{mode} prefetch {prefetch}", dict(BLOCK_N=64, num_warps=4, num_stages=2, num_splits=0,
                                                       SLOTS=mode, prefetch=prefetch))
                  for mode, prefetch in [(mode, 0) for mode in SLOT_MODES] + [("popc", 2)]]
        checks += [(f"gluon BLOCK_N {bn}", gluon_config(bn, -1)) for bn in (16, 32)]
        for slots, cfg in checks:
            with autotune.forced_config("decode", cfg):
                out = mt.sparse_decode_attention(q, pk, pv, k_window=kw, v_window=vw, window_lens=wl)
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            rows.append(dict(kind="check", dtype=str(dt), variant=slots, rel_err=err, same_dtype_torch_err=same_err))
            print(f"check {dt} {slots}: rel err {err:.2e} (same-dtype torch {same_err:.2e})", flush=True)

    # Timing at the target shape.
    b, hq, hkv, t, d, dt = args.batch, 32, 8, args.tokens, 128, torch.float16
    q = torch.randn(b, hq, d, device=dev, dtype=dt)
    k, v = (torch.randn(b, hkv, t, d, device=dev, dtype=dt) for _ in range(2))
    dense_bytes = 2 * k.numel() * 2
    shape = dict(batch=b, tokens=t, hq=hq, hkv=hkv, d=d, dtype=str(dt), sparsity=args.sparsity)
    q4 = q[:, :, None, :]
    best_dense = float("inf")
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
                fn()
                us = bench(fn)
        except Exception as err:  # backend refuses the shape
            print(f"sdpa {name}: {type(err).__name__}: {str(err)[:80]}", flush=True)
            continue
        best_dense = min(best_dense, us)
        rows.append(dict(kind="dense_sdpa", backend=name, us=us, bytes=dense_bytes,
                         bw_frac=dense_bytes / (us * 1e-6) / bw, **shape))
    empty = mt.prune_and_pack(k[:, :, :0], 0.7)
    for bn, warps in ((64, 4), (128, 8)):
        with autotune.forced_config("decode", dict(BLOCK_N=bn, num_warps=warps, num_stages=2,
                                                   num_splits=0, SLOTS="lut")):
            us = bench(lambda: mt.sparse_decode_attention(q, empty, empty, k_window=k, v_window=v))
        rows.append(dict(kind="dense_triton_window", config=f"{bn}:{warps}", us=us, bytes=dense_bytes,
                         bw_frac=dense_bytes / (us * 1e-6) / bw, **shape))
    pk, pv = mt.prune_and_pack(k, args.sparsity), mt.prune_and_pack(v, args.sparsity)
    sparse_bytes = pk.nbytes + pv.nbytes
    for spec in args.configs.split(","):
        if spec.startswith("gluon:"):
            _, block_n, *extra = spec.split(":")
            cfg = gluon_config(int(block_n), int(extra[0]) if extra else -1)
        else:
            slots, bn, warps, stages, *extra = spec.split(":")
            maxnreg, splits, prefetch = extra + ["0", "0", "0"][len(extra):]
            cfg = dict(BLOCK_N=int(bn), num_warps=int(warps), num_stages=int(stages), num_splits=int(splits),
                       SLOTS=slots, prefetch=int(prefetch))
            if int(maxnreg):
                cfg["maxnreg"] = int(maxnreg)
        try:
            with autotune.forced_config("decode", cfg):
                us = bench(lambda: mt.sparse_decode_attention(q, pk, pv))
        except Exception as err:  # a config the GPU cannot hold
            print(f"{spec}: {type(err).__name__}: {str(err)[:100]}", flush=True)
            continue
        rows.append(dict(kind="sparse", config=spec, us=us, bytes=sparse_bytes,
                         bw_frac=sparse_bytes / (us * 1e-6) / bw, speedup_vs_dense=best_dense / us, **shape))
        print(f"{spec}: {us:.1f} us", flush=True)

    # prune_and_pack throughput (K only, [B, Hkv, T, D]).
    for bt, warps in ((16, 4), (32, 4), (64, 4), (32, 8), (64, 8)):
        with autotune.forced_config("select", dict(BLOCK_T=bt, num_warps=warps, num_stages=1)):
            us = bench(lambda: mt.prune_and_pack(k, args.sparsity))
        moved = k.numel() * 2 + pk.nbytes
        rows.append(dict(kind="prune_and_pack", config=f"{bt}:{warps}", us=us, bytes=moved,
                         bw_frac=moved / (us * 1e-6) / bw, **shape))

    write_results(Path(args.out), dict(environment(dev), copy_bandwidth_Bps=bw), rows)
    print(f"\n{'kind':22s} {'config':16s} {'us':>9s} {'bw frac':>8s} {'vs dense':>8s}")
    for r in rows:
        if r["kind"] != "check":
            print(f"{r['kind']:22s} {r.get('config', r.get('backend', '')):16s} {r['us']:9.1f} "
                  f"{r['bw_frac']:8.2f} {best_dense / r['us'] if r['kind'] == 'sparse' else float('nan'):8.2f}")


if __name__ == "__main__":
    main()
