"""Every family of tests/families: the engine's greedy tokens equal `generate`'s in float64 (what it cannot serve
is refused with a one-line error), including sliding windows shorter than the prompts, hybrid layer types,
logit softcapping, MLA and Falcon's inline attention (served through its adapter) under chunked prefill,
preemption and speculative decoding, with decode reading the cache gathered and in place; out-of-window blocks go
back to the pool."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from llmopt.engine import EngineConfig, LLMEngine, SamplingParams
from llmopt.engine.block_manager import FREED
from llmopt.engine.speculative import attach_draft
from llmopt.errors import LlmoptError

from tests.helpers.family_models import FAMILIES, family_model

LENGTHS = [5, 17, 33]  # two prompts longer than the families' window of 8
OUTS = [12, 20, 9]
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}  # grouped_mm has no float64 kernel: eager experts
# At gemma2's 50 the tiny random model's attention logits never come near the cap, so the tokens could not
# tell softcapping from none; at 0.02 they do (test_softcap_changes_the_reference checks it).
OVERRIDES = {"gemma2": dict(attn_logit_softcapping=0.02)}
# Falcon's fused query_key_value layouts (llmopt/engine/adapters.py splits each), with both block shapes:
# variant → (kv heads the cache keeps, config overrides). The family default is new_decoder_architecture with
# 2 kv heads for 4 query heads (Falcon-40B/180B); multi_query is Falcon-7B's one shared k/v head.
_OLD = dict(new_decoder_architecture=False, num_kv_heads=None)
FALCON = {
    "falcon-gqa": (2, dict()),
    "falcon-multi-query": (1, dict(_OLD, multi_query=True)),
    "falcon-multi-query-sequential": (1, dict(_OLD, multi_query=True, parallel_attn=False, bias=True)),
    "falcon-per-head": (4, dict(_OLD, multi_query=False)),
    "falcon-per-head-sequential": (4, dict(_OLD, multi_query=False, parallel_attn=False)),
}
# case → (family, overrides, what the one-line error names)
REFUSED = {"falcon-alibi": ("falcon", dict(_OLD, multi_query=False, alibi=True), "ALiBi")}
ALL_SLIDING = {"mistral", "starcoder2"}
SPECIAL = ["mistral", "starcoder2", "gemma2", "gemma3_text", "exaone4", "deepseek_v3"]  # window/hybrid/cap/MLA


# attention weights × 5: O(1) q·k logits, so a wrong scale, mask or head mapping changes the greedy tokens
ATTENTION_GAIN = 5.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose much to them on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def model(family: str, **overrides):
    kw = {**OVERRIDES.get(family, {}), **overrides}
    if family in MOE:
        kw["experts_implementation"] = "eager"
    return family_model(family, dtype=torch.float64, attention_gain=ATTENTION_GAIN, **kw)


@functools.cache
def falcon(variant: str):
    return family_model("falcon", dtype=torch.float64, attention_gain=ATTENTION_GAIN, **FALCON[variant][1])


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, 512, (n,), generator=g).tolist() for n in LENGTHS]


def run(m, outs: list[int] = OUTS, ps: list[list[int]] | None = None, draft=None, **config) -> tuple[LLMEngine, list]:
    engine = LLMEngine(m, EngineConfig(**{"kv_budget": 10 ** 8, "block_size": 4, "max_prefill_tokens": 7, **config}))
    if draft is not None:
        attach_draft(engine, draft, 3)
    for p, o in zip(ps or prompts(), outs):
        engine.add(p, SamplingParams(max_tokens=o, ignore_eos=True))
    return engine, [s.output for s in engine.run()]


def refs(m, reference, outs: list[int] = OUTS, ps: list[list[int]] | None = None) -> list[list[int]]:
    return [reference(m, p, o) for p, o in zip(ps or prompts(), outs)]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_generate(family, reference, read_path):
    m = model(family)
    engine, outs = run(m)
    assert outs == refs(m, reference)
    assert engine.blocks.num_free == engine.blocks.stats.num_blocks


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unservable_family_is_refused(case):
    family, overrides, match = REFUSED[case]
    with pytest.raises(LlmoptError, match=f"{match}.*--engine hf"):
        LLMEngine(model(family, **overrides), EngineConfig(kv_budget=10 ** 8))


def check_preemption_and_chunked_prefill(m, reference, copies: int = 1) -> None:
    per_block = LLMEngine(m, EngineConfig(kv_budget=10 ** 8, block_size=4)).cache.bytes_per_block
    # 11 blocks hold the longest request (33 + 9 tokens) alone; where every layer is sliding, blocks leave the
    # window and three requests fit, six do not (copies=2). Chunks of 3 attend to cached chunks.
    ps, outs = prompts() * copies, OUTS * copies
    engine, got = run(m, outs, ps, kv_budget=11 * per_block, max_prefill_tokens=3)
    assert engine.scheduler.num_preemptions > 0
    assert got == refs(m, reference, outs, ps)
    assert engine.blocks.num_free == engine.blocks.stats.num_blocks


@pytest.mark.parametrize("family", SPECIAL)
def test_preemption_and_chunked_prefill(family, reference, read_path):
    check_preemption_and_chunked_prefill(model(family), reference, 2 if family in ALL_SLIDING else 1)


@pytest.mark.parametrize("variant", sorted(FALCON))
def test_falcon_layouts_equal_generate(variant, reference, read_path):
    m = falcon(variant)
    engine, outs = run(m)  # mixed batch, prefill chunks of 7
    assert outs == refs(m, reference)
    # the cache keeps Falcon's kv heads, not the per-query-head copies HF's GQA split broadcasts to
    assert {s.kv_heads for s in engine.specs} == {FALCON[variant][0]}
    check_preemption_and_chunked_prefill(m, reference)
    attention = m.transformer.h[0].self_attention
    assert "forward" not in vars(attention)  # the adapter's forward is gone once the engine stops


def test_softcap_changes_the_reference(reference):
    assert refs(model("gemma2"), reference) != refs(model("gemma2", attn_logit_softcapping=50.0), reference)


def test_out_of_window_blocks_are_freed(reference):
    windowed, full = model("mistral"), model("mistral", sliding_window=None)
    ps, outs = [prompts()[1]], [60]
    engine, got = run(windowed, outs, ps)
    assert got == refs(windowed, reference, outs, ps)
    full_engine, got_full = run(full, outs, ps)
    assert got_full != got  # the window shapes these tokens
    kv = engine.kv_stats()
    # 17 + 60 − 1 cached tokens need 19 blocks without a window; with window 8, blocks of 4 and prefill
    # chunks of 7, at most 5 are live at once
    assert full_engine.kv_stats().peak_blocks == 19 and kv.peak_blocks <= 5
    assert kv.formula_bytes <= kv.allocated_bytes and kv.peak_tokens <= kv.peak_blocks * 4
    assert engine.blocks.num_free == engine.blocks.stats.num_blocks


def test_a_request_longer_than_the_budget_runs_when_every_layer_slides(reference):
    """Window 8, blocks of 4, chunks of 7: at most blocks_for(8 + 7 + 4 − 2) = 5 blocks are ever live, so a budget
    of 5 blocks serves 17 + 60 tokens (19 blocks without the window); without a window the same budget refuses."""
    windowed, full = model("mistral"), model("mistral", sliding_window=None)
    ps, outs = [prompts()[1]], [60]
    per_block = LLMEngine(windowed, EngineConfig(kv_budget=10 ** 8, block_size=4)).cache.bytes_per_block
    engine, got = run(windowed, outs, ps, kv_budget=5 * per_block)
    assert engine.blocks.stats.num_blocks == 5 and got == refs(windowed, reference, outs, ps)
    with pytest.raises(LlmoptError, match="KV budget too small for one request"):
        run(full, outs, ps, kv_budget=5 * per_block)
    with pytest.raises(LlmoptError, match="KV budget too small for one request"):
        run(windowed, outs, ps, kv_budget=4 * per_block)


def test_hybrid_layers_keep_every_block():
    engine = LLMEngine(model("gemma3_text"), EngineConfig(kv_budget=10 ** 8))
    assert engine.blocks.window is None  # its full-attention layers see every position
    assert [s.window for s in engine.specs] == [8, None, 8, None]


def test_mla_caches_decompressed_k_and_v():
    engine = LLMEngine(model("deepseek_v3"), EngineConfig(kv_budget=10 ** 8, block_size=4))
    assert {(s.kv_heads, s.k_head_dim, s.v_head_dim) for s in engine.specs} == {(4, 32, 16)}
    assert engine.cache.bytes_per_block == 2 * 4 * (32 + 16) * 4 * 8  # layers · heads · (K + V dims) · bs · float64


@pytest.mark.parametrize("budget_blocks", [None, 12])
def test_speculative_with_a_sliding_window_target(budget_blocks, reference, read_path):
    target = model("mistral")
    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    per_block = LLMEngine(target, EngineConfig(kv_budget=10 ** 8, block_size=4)).cache.bytes_per_block
    budget = 10 ** 8 if budget_blocks is None else budget_blocks * per_block
    outs = [30, 20, 9]
    engine, got = run(target, outs, draft=draft, kv_budget=budget)
    assert got == refs(target, reference, outs)
    spec = engine.speculator
    assert spec.stats.proposed > 0 and spec.blocks.window == 8
    assert all(b == FREED or b >= 0 for s in engine.sequences for b in s.block_table)
    assert engine.blocks.num_free == engine.blocks.stats.num_blocks


@pytest.mark.parametrize("layer_type, match", [("chunked_attention", "layer type chunked_attention"),
                                               ("sliding_attention", "sliding-window layer 1 whose module")])
def test_layer_types_the_modules_do_not_serve_are_refused(layer_type, match):
    m = copy.deepcopy(model("gemma3_text"))
    m.config.layer_types = ["sliding_attention", layer_type] * 2  # the modules were built as sliding, full
    with pytest.raises(LlmoptError, match=f"{match}.*--engine hf"):
        LLMEngine(m, EngineConfig(kv_budget=10 ** 8))
