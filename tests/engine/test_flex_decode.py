"""FlexAttention decode over the paged pool (engine/flex_decode.py) against a float64 reference over keys gathered
slot by slot, the choice of decode path (auto / explicit / refused), and what the engine reports it took."""

from __future__ import annotations

import random

import pytest
import torch

from llmopt.engine import (
    EngineConfig,
    LLMEngine,
    SamplingParams,
    flex_decode,
    model_runner,
)
from llmopt.engine.attention import LayerSpec, PagedKVCache
from llmopt.engine.kv_format import resolve_kv_format
from llmopt.errors import LlmoptError
from tests.helpers.attention import reference_attention, slots_of


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("heads, kv_heads, dk, dv", [(4, 2, 16, 16), (3, 3, 8, 8), (4, 1, 12, 6)])  # GQA, MHA, MLA
def test_block_mask_attention_equals_float64_over_gathered_slots(seed, heads, kv_heads, dk, dv):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    bs, n_blocks = rng.choice([1, 4, 8]), 40
    kflat = torch.randn(n_blocks * bs, kv_heads, dk, dtype=torch.float64)
    vflat = torch.randn(n_blocks * bs, kv_heads, dv, dtype=torch.float64)
    shared = rng.sample(range(n_blocks), 2)  # a prefix both of the first two rows hold
    free = [b for b in range(n_blocks) if b not in shared]
    rng.shuffle(free)
    tables, firsts, positions = [], [], []
    for row in range(4):
        nb = rng.randint(1, 5)
        table = (shared if row < 2 else []) + [free.pop() for _ in range(nb)]
        first = rng.randint(0, len(table) - 1) if row == 3 else 0  # row 3: leading blocks left the window
        tables.append(table[first:])
        firsts.append(first)
        positions.append(rng.randrange((len(table) - 1) * bs, len(table) * bs))  # somewhere in its last block
    width = max(map(len, tables))
    padded = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    window = rng.choice([None, 3, 2 * bs + 1])
    softcap = rng.choice([None, 0.7])
    rows = flex_decode.block_masks(padded, torch.tensor(firsts), torch.tensor(positions), n_blocks, bs, [window])
    q = torch.randn(4, heads, dk, dtype=torch.float64)
    got = flex_decode.attend(q, kflat, vflat, rows, window, dk ** -0.5, softcap)  # [4, H, Dv]
    for i, (table, first, pos) in enumerate(zip(tables, firsts, positions)):
        full = [0] * first + table  # positional block table (leading entries unused)
        lo = max(first * bs, 0 if window is None else pos - window + 1)
        keep = slots_of(full, bs, lo, pos)
        want = reference_attention(q[i], kflat[keep], vflat[keep], dk ** -0.5, softcap)
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-10)


def _cache(kv: str, device: str = "cpu") -> PagedKVCache:
    spec = LayerSpec(2, 16, 16)
    return PagedKVCache.allocate([spec], 8, 4, resolve_kv_format(kv, torch.float32), torch.device(device))


def test_decode_path_choice(monkeypatch):
    specs = [LayerSpec(2, 16, 16)]
    resolve = model_runner.resolve_decode_attention
    assert resolve("auto", specs, _cache("float32"), torch.float32, 4, 4) == ("rule", None)  # the CPU keeps its rule
    assert resolve("gathered", specs, _cache("float32"), torch.float32, 4, 4) == ("gathered", None)
    assert resolve("flex", specs, _cache("float32"), torch.float32, 4, 4) == ("flex", None)  # the probe passes here
    for kv, dtype, match in [("int8", torch.float32, "int8 KV cache"), ("bfloat16", torch.float32, "whole-pool")]:
        with pytest.raises(LlmoptError, match=f"cannot serve .*{match}.*use decode attention auto or gathered"):
            resolve("flex", specs, _cache(kv), dtype, 4, 4)
    # an accelerator (the meta device stands in): auto takes flex when the probe passes, else gathered, saying why
    meta = _cache("float32", "meta")
    monkeypatch.setattr(flex_decode, "probe", lambda *a: None)
    assert resolve("auto", specs, meta, torch.float32, 4, 4) == ("flex", None)
    monkeypatch.setattr(flex_decode, "probe", lambda *a: "FlexAttention decode failed on meta: boom")
    assert resolve("auto", specs, meta, torch.float32, 4, 4) == (
        "gathered", "FlexAttention not used: FlexAttention decode failed on meta: boom")
    assert resolve("auto", specs, _cache("int8", "meta"), torch.float32, 4, 4)[0] == "gathered"
    with pytest.raises(LlmoptError, match="decode attention must be one of auto, in-place, gathered, flex"):
        EngineConfig(kv_budget=10 ** 6, decode_attention="paged")


def test_probe_catches_a_wrong_kernel(monkeypatch):
    flex_decode.probe.cache_clear()
    monkeypatch.setattr(flex_decode, "attend", lambda q, k, v, *a: torch.zeros(q.shape[0], q.shape[1], v.shape[-1]))
    why = flex_decode.probe(torch.device("cpu"), torch.float32, 4, 2, 16, 16, 4)
    flex_decode.probe.cache_clear()
    assert why is not None and why.startswith("FlexAttention decode differs from SDPA by")


@pytest.mark.parametrize("path", ["flex", "in-place", "gathered"])
def test_engine_reports_the_path_its_steps_took(llama64, prompts, reference, path):
    ps = prompts([5, 17, 30])
    engine = LLMEngine(llama64, EngineConfig(kv_budget=10 ** 7, block_size=4, max_prefill_tokens=16,
                                            decode_attention=path))
    for p in ps:
        engine.add(p, SamplingParams(max_tokens=6, ignore_eos=True))
    outs = [s.output for s in engine.run()]
    assert outs == [reference(llama64, p, 6) for p in ps]
    stats = engine.attention_stats()
    assert stats.decode_path == path and stats.note is None
    assert set(stats.counts) <= {f"decode {path}", "prefill is_causal", "prefill masked"}
    # each prompt's first chunk is plain causal; 16-token steps split the 17- and 30-token prompts into later chunks
    assert stats.counts["prefill is_causal"] == 3 and stats.counts["prefill masked"] >= 2
    assert stats.counts[f"decode {path}"] >= 5
