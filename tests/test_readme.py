"""The README's Python snippets run as written, at small sizes, and give what the README says.

Each ```python block of README.md runs with only its size line (`B, T, device = ...`) or a few
generation sizes replaced; then its results are checked against float64 references (or, for
transformers, against dense generation)."""
import re
from pathlib import Path

import pytest
import torch

import mustafar_triton as mt

README = Path(__file__).resolve().parent.parent / "README.md"
SIZE_LINE = re.compile(r"^B, T, device = .*$", re.MULTILINE)


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def snippet_with(marker: str) -> str:
    found = [s for s in snippets() if marker in s]
    assert len(found) == 1, f"one README snippet with {marker!r}, found {len(found)}"
    return found[0]


def small(code: str, device: torch.device, batch: int, tokens: int) -> str:
    """The snippet with its one size line (`B, T, device = ...`) set to a small example."""
    assert len(SIZE_LINE.findall(code)) == 1, "the snippet names its sizes in one line"
    return SIZE_LINE.sub(f"B, T, device = {batch}, {tokens}, {str(device)!r}", code)


def run(code: str, replace=(), **names) -> dict:
    """Runs the snippet (with `replace` pairs applied) in a namespace holding `names`; returns it."""
    for old, new in replace:
        assert old in code, old
        code = code.replace(old, new)
    namespace = dict(names)
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_every_snippet_is_checked():
    assert len(snippets()) == 4  # the API, the decode loop, transformers, the paged cache: one test each


def test_api_snippet(device):
    ns = run(small(snippet_with("mt.prune_and_pack(k, 0.7"), device, batch=2, tokens=40))
    q, pk, pv, out, lse = ns["q"], ns["packed_k"], ns["packed_v"], ns["out"], ns["lse"]
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    assert torch.equal(mt.unpack(pk), mt.reference.prune_topk(ns["k"], 0.7))
    want, want_lse = mt.reference.sparse_decode_attention(q, pk, pv, k_window=ns["k_win"], v_window=ns["v_win"],
                                                          return_lse=True)
    assert (out.double() - want.double()).abs().max() < 2e-3
    assert (lse.double() - want_lse.double()).abs().max() < 1e-3
    # the README's byte count: 96 B per token and head at D=128 fp16, sparsity 0.7, plus seq_lens
    assert pk.nbytes == 2 * 8 * 40 * 96 + 2 * 4


def test_decode_loop_snippet(device):
    ns = run(small(snippet_with("SparseKVCache("), device, batch=2, tokens=40))
    cache, q, out = ns["cache"], ns["q"], ns["out"]
    assert out.shape == q.shape
    want = mt.reference.sparse_decode_attention(q, cache.packed_k, cache.packed_v, k_window=cache.k_window,
                                                v_window=cache.v_window, window_lens=cache.window_lens)
    assert (out.double() - want.double()).abs().max() < 2e-3
    assert int(cache.seq_lens.sum() + cache.window_lens.sum()) == 2 * (40 + 4), "every token is in the cache"


class TokenIds:
    """A stand-in tokenizer for prompts given as token ids: pads on `padding_side` with id 0."""
    padding_side = "right"

    def __call__(self, prompts, return_tensors, padding):
        import transformers
        width = max(map(len, prompts))
        ids, mask = [], []
        for p in prompts:
            pad = [0] * (width - len(p))
            ids.append(pad + p if self.padding_side == "left" else p + pad)
            mask.append([0] * len(pad) + [1] * len(p) if self.padding_side == "left" else [1] * len(p) + [0] * len(pad))
        return transformers.BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})


def test_transformers_snippet(device):
    """On a two-layer random Llama (head dim 32), at sparsity 0 so that the greedy tokens of a
    left-padded batch of two prompts must equal dense generation's (float32)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval().to(device)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    tokenizer = TokenIds()
    tokenizer.padding_side = "left"
    dense = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True).to(device),
                           max_new_tokens=3, do_sample=False)
    tokenizer.padding_side = "right"  # the snippet sets it
    from mustafar_triton.integrations.transformers import cache_keyword
    keyword = [("cache=cache", "past_key_values=cache")] if cache_keyword(model) != "cache" else []  # before 5.24
    ns = run(snippet_with("MustafarCache("), model=model, tokenizer=tokenizer, prompts=prompts,
             replace=[("k_sparsity=0.5, v_sparsity=0.5", "k_sparsity=0.0, v_sparsity=0.0"),
                      ("max_tokens=4096", "max_tokens=64"), ("max_new_tokens=64", "max_new_tokens=3")] + keyword)
    assert torch.equal(ns["out"], dense)


def test_paged_snippet(device):
    """The engine section: write_pages filled each sequence's pages with its pruned tokens, and the
    paged decode equals the float64 reference."""
    ns = run(small(snippet_with("mt.write_pages(k_cache"), device, batch=2, tokens=40))
    k, kc, vc, q, out = ns["k"], ns["k_cache"], ns["v_cache"], ns["q"], ns["out"]
    packed, _ = mt.reference.gather_pages(kc)
    want_k = mt.reference.prune_topk(k.view(2, 40, 8, 128).transpose(1, 2), 0.7)
    assert torch.equal(mt.unpack(packed)[:, :, :40], want_k)
    want = mt.reference.sparse_decode_attention(q, kc, vc)
    assert out.shape == q.shape and (out.double() - want.double()).abs().max() < 2e-3
