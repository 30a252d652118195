"""The engine's greedy tokens equal `model.generate`'s, token for token, for every request of a mixed batch."""

import pytest
import torch

from llmopt.engine import EngineConfig, LLMEngine, SamplingParams
from llmopt.errors import LlmoptError

LENGTHS = [1, 5, 17, 33, 16, 40, 9]
OUTS = [6, 12, 20, 5, 9, 16, 11]


def run_engine(model, config, ps, outs=OUTS, params=None):
    engine = LLMEngine(model, config)
    for p, o in zip(ps, outs):
        engine.add(p, params or SamplingParams(max_tokens=o, ignore_eos=True))
    return engine, [s.output for s in engine.run()]


def per_block(model, block_size):
    return 2 * model.config.num_hidden_layers * 2 * 16 * block_size * 8  # kv heads 2, head dim 16, float64


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_batch_equals_generate(arch, llama64, qwen64, prompts, reference):
    model = llama64 if arch == "llama" else qwen64
    engine, outs = run_engine(model, EngineConfig(kv_budget=10 ** 8, block_size=4), prompts(LENGTHS))
    for p, o, got in zip(prompts(LENGTHS), OUTS, outs):
        assert got == reference(model, p, o)
    assert engine.scheduler.num_preemptions == 0


def test_preemption_and_chunked_prefill_keep_greedy_tokens(llama64, prompts, reference):
    # 14 blocks of 4 tokens: the longest request (40 + 16) just fits alone, so others get preempted;
    # a prefill cap of 7 splits every long prompt into chunks attending to cached chunks.
    engine, outs = run_engine(llama64, EngineConfig(kv_budget=14 * per_block(llama64, 4), block_size=4,
                                                    max_prefill_tokens=7), prompts(LENGTHS))
    assert engine.scheduler.num_preemptions > 0
    for p, o, got in zip(prompts(LENGTHS), OUTS, outs):
        assert got == reference(llama64, p, o)
    assert engine.blocks.num_free == engine.blocks.stats.num_blocks  # everything freed


def test_float32_trained_model_equals_generate(tiny_model_dir, prompts, reference):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ps = prompts([3, 60, 25, 100, 8], vocab=model.config.vocab_size, seed=3)
    outs = [20, 12, 30, 8, 16]
    _, got = run_engine(model, EngineConfig(kv_budget=10 ** 8), ps, outs)
    assert got == [reference(model, p, o) for p, o in zip(ps, outs)]


def test_eos_stops_a_request(llama64, prompts, reference):
    ref = reference(llama64, prompts([12])[0], 10)
    eos = ref[3]  # pretend the 4th generated token is EOS
    engine = LLMEngine(llama64, EngineConfig(kv_budget=10 ** 7), eos_id=eos)
    seq = engine.add(prompts([12])[0], SamplingParams(max_tokens=10))
    engine.run()
    assert seq.output == ref[:ref.index(eos) + 1]


def test_seeded_sampling_is_reproducible_and_independent_of_batch(llama64, prompts):
    p = prompts([10, 20, 30])
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    _, alone = run_engine(llama64, EngineConfig(kv_budget=10 ** 7), [p[0]], [12], params)
    _, batch = run_engine(llama64, EngineConfig(kv_budget=10 ** 7), p, [12] * 3, params)
    assert alone[0] == batch[0]
    _, again = run_engine(llama64, EngineConfig(kv_budget=10 ** 7), p, [12] * 3, params)
    assert batch == again


def test_kv_accounting_matches_formula(llama64, prompts):
    from llmopt.models import kv_bytes

    engine, _ = run_engine(llama64, EngineConfig(kv_budget=10 ** 8, block_size=4), prompts(LENGTHS))
    kv = engine.kv_stats()
    assert kv.formula_bytes == kv_bytes(2, 2, 16, kv.peak_tokens, 8)
    assert kv.allocated_bytes == kv.peak_blocks * per_block(llama64, 4)
    assert 0 <= kv.waste_bytes < len(LENGTHS) * per_block(llama64, 4)  # < one block per sequence


def test_requests_that_cannot_run_are_refused(llama64):
    engine = LLMEngine(llama64, EngineConfig(kv_budget=3 * per_block(llama64, 4), block_size=4))
    with pytest.raises(LlmoptError, match="KV budget too small for one request"):
        engine.add(list(range(4, 20)), SamplingParams(max_tokens=8))
    with pytest.raises(LlmoptError, match="maximum context"):
        engine.add([5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(LlmoptError, match="holds no KV block"):
        LLMEngine(llama64, EngineConfig(kv_budget=100, block_size=4))


def test_attention_restored_after_run(llama64, prompts):
    before = llama64.config._attn_implementation
    run_engine(llama64, EngineConfig(kv_budget=10 ** 7), prompts([5]), [3])
    assert llama64.config._attn_implementation == before
    x = torch.tensor([prompts([8])[0]])
    assert llama64(x).logits.shape == (1, 8, 256)  # the plain forward still works
