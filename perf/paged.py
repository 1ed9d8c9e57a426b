"""Paged against contiguous decode (issue 20): GPU time of sparse_decode_attention over the same
pruned data held contiguously (PackedKV) and in pages at shuffled page ids (PagedKV, one block
table; --ordered: in order), per shape, sparsity and page size. Writes JSON (meta + rows) and prints a table.

    python perf/paged.py --out perf/results/h200/paged.json
    python perf/paged.py --device cpu --shapes 2x200 --page-sizes 16 --sparsities 0.7   # smoke run

Llama-3-8B attention (Hq=32, Hkv=8, D=128), fp16 (fp32 on the CPU), K and V at the same sparsity,
no window, configs as a user gets them (the shipped tuning; the paged call uses the same bucket).
`equal`: the two outputs are bit for bit the same.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import LLAMA3_8B, bench_us, environment, write_results  # noqa: E402 (repo first)

import mustafar_triton as mt  # noqa: E402
from mustafar_triton import attention, reference  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="paged.json")
    ap.add_argument("--shapes", default="1x32768,16x16384,64x4096,4x131072", help="comma-separated BxT")
    ap.add_argument("--page-sizes", default="16,64,256")
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--ordered", action="store_true", help="pages in order (sequence after sequence), not shuffled")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    m = LLAMA3_8B
    rows = []
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        lens = torch.full((b,), t, dtype=torch.int32, device=dev)
        q = torch.randn(b, m.hq, m.d, device=dev, dtype=dtype)
        for sparsity in map(float, args.sparsities.split(",")):
            pk, pv = (mt.prune_and_pack(torch.randn(b, m.hkv, t, m.d, device=dev, dtype=dtype), sparsity, lens)
                      for _ in range(2))
            ref_out = mt.sparse_decode_attention(q, pk, pv)
            contiguous_us = bench_us(lambda: mt.sparse_decode_attention(q, pk, pv), dev)
            gather = attention.launched_gather(q, pk, pv)
            for page_size in map(int, args.page_sizes.split(",")):
                gk, gv = reference.pages_from_packed([pk, pv], page_size, shuffle=not args.ordered)
                out = mt.sparse_decode_attention(q, gk, gv)
                us = bench_us(lambda: mt.sparse_decode_attention(q, gk, gv), dev)
                row = dict(batch=b, tokens=t, hq=m.hq, hkv=m.hkv, d=m.d, dtype=str(dtype).replace("torch.", ""),
                           sparsity=sparsity, page_size=page_size, shuffled=not args.ordered,
                           contiguous_us=contiguous_us, paged_us=us,
                           paged_vs_contiguous=us / contiguous_us, equal=bool(torch.equal(out, ref_out)),
                           gather=gather, paged_gather=attention.launched_gather(q, gk, gv))
                rows.append(row)
                print(f"{shape:>9s} s={sparsity:.2f} page {page_size:4d}: contiguous {contiguous_us:8.1f} us  paged "
                      f"{us:8.1f} us  {row['paged_vs_contiguous']:5.3f}x  equal={row['equal']}  "
                      f"gather {gather}/{row['paged_gather']}", flush=True)
                del gk, gv
            write_results(Path(args.out), environment(dev), rows)
            del pk, pv
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'shape':>9s} {'s':>4s} {'contiguous':>10s} " + " ".join(f"{'page ' + p:>14s}" for p in args.page_sizes.split(",")))
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        for s in map(float, args.sparsities.split(",")):
            mine = [r for r in rows if (r["batch"], r["tokens"], r["sparsity"]) == (b, t, s)]
            cells = [f"{r['paged_us']:6.1f} ({r['paged_vs_contiguous']:4.2f}x)" for r in mine]
            print(f"{shape:>9s} {s:4.2f} {mine[0]['contiguous_us']:10.1f} " + " ".join(f"{c:>14s}" for c in cells))


if __name__ == "__main__":
    main()
