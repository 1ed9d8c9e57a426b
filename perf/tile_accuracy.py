"""Experiment (issue 18, decode speed): tile-shared channel sets against per-token top-k, at equal
bytes, on perf/accuracy.py's model, texts and harness.

    python perf/tile_accuracy.py [--texts prose code] [--tokens 2048] [--out FILE] [--resume]
    python perf/tile_accuracy.py --merge A.json B.json --out FILE     # join per-text runs

The pattern ("tile"): positions are grouped in aligned tiles of TILE = 16 consecutive absolute
positions (0-15, 16-31, ...), per sequence, layer and kv head. Within a tile all tokens keep the
SAME m channels: the m with the largest sum over the tile's tokens of |x| ("abs") or of x^2
("sq"), lower channel index first among ties; every other value is zeroed. A partial last tile
scores the tokens it has; sink positions (< S, dense anyway) are left out of the score. Keys are
pruned after RoPE, as the cache stores them (the same place perf/accuracy.py prunes).

Which tokens are pruned is exactly perf/accuracy.py's rule (query i sees positions S <= j < i - W
pruned, the first S, the last W and i dense); only the pattern differs. A tile's set is chosen
from all of its tokens, so for query i a tile that straddles i - W has its older tokens pruned
with the set of the whole tile; every token of that tile is at most i - W + 15 < i (W >= 16), so
the choice uses no token the query cannot see. (A cache would compress whole tiles only, so it
would see the straddling tile's tokens dense: this harness prunes slightly more than such a
cache, the same tokens as the unstructured harness.)

Bytes per token and kv head, fp16 values:
  unstructured, sparsity s: D/8 (bitmap) + 2 * capacity, capacity = kept rounded up to 8
                            (mustafar_triton.format.default_capacity; SparseKVCache.nbytes per token)
  tile, m channels:         2 * m (values) + m / 16 (one uint8 channel index per kept channel per tile)
`equal_bytes_m(D, s)` is the largest m whose tile bytes are <= the unstructured bytes of s.
bytes_ratio: one layer holding the T evaluated tokens, T - S - W compressed, S + W dense fp16, over
dense fp16 K + V of T tokens (as perf/accuracy.py's, without its few int32 length counters; the
unstructured rows also carry the library's value, `bytes_ratio_library`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # SparseKVCache on the CPU, for its nbytes only

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
from common import REPO_ROOT, environment  # noqa: E402

from mustafar_triton import reference  # noqa: E402
from mustafar_triton.format import default_capacity  # noqa: E402

TILE = 16
SCRIPT = "perf/tile_accuracy.py"


# ---------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------
def unstructured_bytes(head_dim: int, sparsity: float) -> float:
    """Bytes per token and kv head of today's format: bitmap + capacity fp16 value slots."""
    if sparsity == 0:
        return 2.0 * head_dim
    return head_dim / 8 + 2 * default_capacity(head_dim, sparsity)


def tile_bytes(m: int, tile: int = TILE) -> float:
    """Bytes per token and kv head of a tile format: m fp16 values + an m-byte channel list per tile."""
    return 2 * m + m / tile


def equal_bytes_m(head_dim: int, sparsity: float, tile: int = TILE) -> int:
    """The most channels a tile may keep within the bytes of unstructured `sparsity`."""
    return min(head_dim, math.floor(unstructured_bytes(head_dim, sparsity) / (2 + 1 / tile)))


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------
def tile_mask(x: torch.Tensor, m: int, score: str = "abs", sinks: int = 0, tile: int = TILE) -> torch.Tensor:
    """Bool mask [..., T, D] of the kept entries of x [..., T, D] (T = absolute positions 0..T-1):
    per aligned tile of `tile` positions, the m channels with the largest sum over the tile's
    tokens of |x| (score "abs") or x^2 ("sq"); positions < sinks do not count. Ties: lower
    channel index first."""
    *lead, t, d = x.shape
    if m >= d:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    s = x.abs() if score == "abs" else x.square()
    if score not in ("abs", "sq"):
        raise ValueError(score)
    if sinks:
        s = s.clone()
        s[..., :sinks, :] = 0
    n_tiles = -(-t // tile)
    pad = n_tiles * tile - t  # a partial last tile: zero rows add nothing to the sums
    s = torch.nn.functional.pad(s, (0, 0, 0, pad)).reshape(*lead, n_tiles, tile, d).sum(-2)  # [..., n_tiles, D]
    order = s.argsort(dim=-1, descending=True, stable=True)[..., :m]
    keep = torch.zeros(s.shape, dtype=torch.bool, device=x.device).scatter_(-1, order, True)
    return keep.repeat_interleave(tile, dim=-2)[..., :t, :]


def tile_prune(x: torch.Tensor, m: int, score: str = "abs", sinks: int = 0, tile: int = TILE) -> torch.Tensor:
    return torch.where(tile_mask(x, m, score, sinks, tile), x, torch.zeros((), dtype=x.dtype))


@dataclass(frozen=True)
class Prune:
    """One of K or V: kind "topk" (per-token top-k at `sparsity`, today's format), "tile" (m
    shared channels per tile, scored by `score`) or "dense"."""
    kind: str
    sparsity: float = 0.0
    m: int = 0
    score: str = "abs"
    tile: int = TILE

    @property
    def name(self) -> str:
        size = "" if self.tile == TILE else f"/{self.tile}"
        return {"dense": "dense", "topk": f"{self.sparsity:g}", "tile": f"tile{self.m}{self.score}{size}"}[self.kind]

    def bytes(self, head_dim: int) -> float:
        return {"dense": 2.0 * head_dim, "topk": unstructured_bytes(head_dim, self.sparsity),
                "tile": tile_bytes(self.m, self.tile)}[self.kind]

    def apply(self, x: torch.Tensor, sinks: int) -> torch.Tensor:
        if self.kind == "topk":
            return reference.prune_topk(x, self.sparsity) if self.sparsity else x
        if self.kind == "tile":
            return tile_prune(x, self.m, self.score, sinks, self.tile)
        return x


@dataclass(frozen=True)
class Config:
    k: Prune
    v: Prune
    sinks: int = 0
    window: int = 32
    budget: str = ""  # the unstructured reference whose bytes this configuration matches

    @property
    def name(self) -> str:
        return f"K{self.k.name}V{self.v.name} S{self.sinks} W{self.window}"

    def bytes_ratio(self, tokens: int, head_dim: int) -> tuple[float, float]:
        """(bytes_ratio at `tokens`, per compressed token) over dense fp16 K + V."""
        dense_tokens = min(tokens, self.sinks + self.window)
        per_token = self.k.bytes(head_dim) + self.v.bytes(head_dim)
        lists = 0.0  # channel lists are per tile: count the tiles of the compressed tokens exactly
        n = tokens - dense_tokens
        for p in (self.k, self.v):
            if p.kind == "tile":
                lists += -(-n // p.tile) * p.m - n * p.m / p.tile
        total = n * per_token + lists + dense_tokens * 4 * head_dim
        return total / (tokens * 4 * head_dim), per_token / (4 * head_dim)


def grid(head_dim: int) -> list[Config]:
    """S0 W32 (the references' setting): at the bytes of K0.7V0.7 and K0.5V0.5, the unstructured
    reference, tile K with unstructured V, tile K and V, each with both scores; the unstructured
    K0.625V0.625 (fills K0.7's capacity, equal bytes). S4 W32: the presets (K0.5V0.75 and
    K0.375V0.625, 4 sinks) against tile K and V at their per-tensor bytes."""
    t, u = (lambda s, sc: Prune("tile", m=equal_bytes_m(head_dim, s), score=sc)), (lambda s: Prune("topk", s))
    rows = [Config(Prune("tile", m=head_dim), Prune("tile", m=head_dim), budget="dense")]  # = dense, asserted
    for s in (0.7, 0.5):
        b = f"K{s:g}V{s:g}"
        rows.append(Config(u(s), u(s), budget=b))
        rows += [Config(t(s, sc), u(s), budget=b) for sc in ("abs", "sq")]
        rows += [Config(t(s, sc), t(s, sc), budget=b) for sc in ("abs", "sq")]
        if s == 0.7:
            rows.append(Config(u(0.625), u(0.625), budget=b))
    for ks, vs, b in ((0.5, 0.75, "preset K0.7V0.7"), (0.375, 0.625, "preset K0.5V0.5")):
        rows.append(Config(u(ks), u(vs), sinks=4, budget=b))
        rows += [Config(t(ks, sc), t(vs, sc), sinks=4, budget=b) for sc in ("abs", "sq")]
    return rows


def grid_extra(head_dim: int) -> list[Config]:
    """Diagnostics, S0 W32, V unstructured 0.7, K tile scored by x^2: (1) more channels per
    16-token tile (what byte cost matches per-token K0.7's accuracy), (2) smaller tiles at K0.7's
    bytes (m from 2m + m/tile <= 56 at D=64: 8 tokens m=26, 4 tokens m=24); (3) per-token K at
    the same V for reference: K0.625 (K0.7's bytes, capacity filled) and K0.5."""
    v = Prune("topk", 0.7)
    refs = [Config(Prune("topk", s), v, budget="unstructured K, V0.7") for s in (0.625, 0.5)]
    out = [Config(Prune("tile", m=m, score="sq"), v, budget="more channels") for m in (32, 40, 48)]
    for size in (8, 4):
        m = min(head_dim, math.floor(unstructured_bytes(head_dim, 0.7) / (2 + 1 / size)))
        out.append(Config(Prune("tile", m=m, score="sq", tile=size), v, budget="K0.7V0.7"))
    return out + refs


GRIDS = {"main": grid, "extra": grid_extra}


def make_attention(cfg: Config):
    """perf/accuracy.make_attention with the pruning functions of cfg: query i sees positions
    sinks <= j < i - window pruned, every other one dense (one SDPA over [pruned | dense])."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        k_old, v_old = cfg.k.apply(key, cfg.sinks), cfg.v.apply(value, cfg.sinks)
        t = query.shape[2]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        far = (j < i - cfg.window) & (j >= cfg.sinks)
        mask = torch.cat([far, (j <= i) & ~far], 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, torch.cat([k_old, key], 2), torch.cat([v_old, value], 2), attn_mask=mask,
            scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return attention


def bytes_table() -> list[dict]:
    """Equal-bytes m for the write-up, D = 64 and 128."""
    out = []
    for d in (64, 128):
        for s in (0.5, 0.625, 0.7, 0.75):
            out.append(dict(head_dim=d, sparsity=s, unstructured_bytes=unstructured_bytes(d, s),
                            capacity=default_capacity(d, s), kept=d - int(s * d), equal_bytes_m=equal_bytes_m(d, s),
                            tile_bytes=tile_bytes(equal_bytes_m(d, s))))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--texts", nargs="*", default=None, help="a subset of: prose code")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results" / "tile_accuracy_smollm2.json")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="main",
                    help="main: the equal-bytes comparison; extra: channel count and tile size diagnostics")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--merge", nargs="*", type=Path, default=None, help="join these result files into --out")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        meta = dict(parts[0]["meta"])
        meta["parts"] = [dict(file=p.name, commit=part["meta"]["commit"], dirty=part["meta"]["dirty"],
                              grid=part["meta"].get("grid", "main"), date_utc=part["meta"]["date_utc"],
                              seconds_total=part["meta"].get("seconds_total"),
                              texts=sorted({r["text"] for r in part["rows"]}), rows=len(part["rows"]))
                         for p, part in zip(args.merge, parts)]
        for key in ("commit", "dirty", "date_utc", "seconds_total", "grid"):
            meta.pop(key, None)
        args.out.write_text(json.dumps(dict(meta=meta, rows=[r for p in parts for r in p["rows"]]), indent=1) + "\n")
        print(f"wrote {args.out}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AttentionInterface
    torch.manual_seed(0)
    tokenizer, model = accuracy.load_model()
    hkv = model.config.num_key_value_heads
    d = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    meta = dict(script=SCRIPT, grid=args.grid, date="2026-12-03", model=accuracy.MODEL, tokens=args.tokens,
                num_kv_heads=hkv, head_dim=d, tile=TILE,
                path="torch reference, CPU float32, SDPA over [pruned | dense] (perf/accuracy.py's harness)",
                texts="prose: pydoc_data.topics compound + types (Python language reference); code: CPython argparse.py",
                bytes="per token and kv head, fp16: unstructured D/8 + 2*capacity; tile 2m + m/16",
                equal_bytes=bytes_table(), transformers=__import__("transformers").__version__,
                torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(), machine=platform.machine(),
                **environment(torch.device("cpu")))
    rows = json.loads(args.out.read_text())["rows"] if args.resume and args.out.exists() else []
    done = {(r["text"], r["tokens"], r["config"]) for r in rows}
    t0 = time.time()

    def save():
        meta["seconds_total"] = time.time() - t0
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")

    for name, text in accuracy.texts().items():
        if args.texts and name not in args.texts:
            continue
        ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
        assert ids.shape[1] == args.tokens, f"{name}: only {ids.shape[1]} tokens"
        todo = [c for c in GRIDS[args.grid](d) if (name, args.tokens, c.name) not in done]
        if not todo:
            continue
        start = time.time()
        dense_top1, dense_ppl = accuracy.evaluate(model, ids, "sdpa")
        print(f"{name:5s} dense (torch SDPA): ppl {dense_ppl:8.3f}  ({time.time() - start:.0f} s)", flush=True)
        for cfg in todo:
            attn_name = "tile_" + cfg.name.replace(" ", "_")
            AttentionInterface.register(attn_name, make_attention(cfg))
            start = time.time()
            top1, ppl = accuracy.evaluate(model, ids, attn_name)
            if cfg.budget == "dense":  # tiles keeping every channel must be the dense model
                assert abs(ppl / dense_ppl - 1) < 1e-4, (ppl, dense_ppl)
            ratio, per_token = cfg.bytes_ratio(args.tokens, d)
            row = dict(text=name, tokens=args.tokens, config=cfg.name, budget=cfg.budget,
                       k=asdict(cfg.k), v=asdict(cfg.v), sinks=cfg.sinks, window=cfg.window, head_dim=d,
                       k_bytes_per_token=cfg.k.bytes(d), v_bytes_per_token=cfg.v.bytes(d),
                       bytes_per_token_per_head=cfg.k.bytes(d) + cfg.v.bytes(d),
                       bytes_ratio=ratio, bytes_ratio_per_token=per_token, dense_perplexity=dense_ppl,
                       perplexity=ppl, perplexity_change=ppl / dense_ppl - 1,
                       top1_agreement_with_dense=(top1 == dense_top1).float().mean().item(),
                       seconds=time.time() - start)
            if cfg.k.kind == cfg.v.kind == "topk":
                row["bytes_ratio_library"] = accuracy.bytes_ratios(
                    accuracy.Config(cfg.k.sparsity, cfg.v.sparsity, cfg.sinks, cfg.window), args.tokens, hkv, d)[0]
            rows.append(row)
            save()
            print(f"{name:5s} {cfg.name:36s} {row['bytes_per_token_per_head']:6.2f} B/tok/head, ratio {ratio:.4f}: "
                  f"ppl {ppl:8.3f} ({row['perplexity_change']:+.2%}), top-1 {row['top1_agreement_with_dense']:.3f}"
                  f"  ({row['seconds']:.0f} s)", flush=True)
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
