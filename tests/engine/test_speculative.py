"""Speculative decoding: greedy output identical to the target alone; acceptance rule samples the target."""

import copy

import pytest
import torch

from llmopt.engine import EngineConfig, LLMEngine, SamplingParams
from llmopt.engine.speculative import accept, attach_draft
from llmopt.errors import LlmoptError

LENGTHS = [3, 17, 30, 8]
OUTS = [15, 9, 20, 12]


def layer_dropped(model):
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    return draft


def spec_run(target, draft, k, ps, budget=10 ** 8, block_size=4):
    engine = LLMEngine(target, EngineConfig(kv_budget=budget, block_size=block_size, max_prefill_tokens=16))
    spec = attach_draft(engine, draft, k)
    for p, o in zip(ps, OUTS):
        engine.add(p, SamplingParams(max_tokens=o, ignore_eos=True))
    return engine, spec, [s.output for s in engine.run()]


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_identical_to_target(llama64, k, prompts, reference):
    engine, spec, outs = spec_run(llama64, layer_dropped(llama64), k, prompts(LENGTHS))
    for p, o, got in zip(prompts(LENGTHS), OUTS, outs):
        assert got == reference(llama64, p, o)
    assert spec.stats.proposed > 0 and spec.stats.acceptance_rate is not None


def test_self_draft_accepts_everything(llama64, prompts, reference):
    _, spec, outs = spec_run(llama64, llama64, 4, prompts(LENGTHS))
    assert spec.stats.acceptance_rate == 1.0
    assert outs == [reference(llama64, p, o) for p, o in zip(prompts(LENGTHS), OUTS)]


def test_greedy_identical_under_preemption(llama64, prompts, reference):
    per_block = 2 * 2 * 2 * 16 * 4 * 8
    engine, _, outs = spec_run(llama64, layer_dropped(llama64), 3, prompts(LENGTHS), budget=13 * per_block)
    assert engine.scheduler.num_preemptions > 0
    assert outs == [reference(llama64, p, o) for p, o in zip(prompts(LENGTHS), OUTS)]


def test_draft_with_another_vocabulary_is_refused(llama64, build_model):
    engine = LLMEngine(llama64, EngineConfig(kv_budget=10 ** 7))
    with pytest.raises(LlmoptError, match="vocabulary"):
        attach_draft(engine, build_model(vocab=300), 2)


def test_acceptance_rule_samples_the_target_distribution():
    # Leviathan et al.: whatever the draft q, the first emitted token is distributed as p.
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 8000
    counts = torch.zeros(4)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        tok = accept(torch.stack([p, p]), q[None], [d], greedy=False, generator=g)[0]
        counts[tok] += 1
    freq = counts / n
    assert torch.allclose(freq, p.float(), atol=0.02), freq


def test_greedy_acceptance_keeps_matching_prefix():
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])  # argmax 1, 2, 0
    assert accept(logits, None, [1, 2], greedy=True, generator=None) == [1, 2, 0]
    assert accept(logits, None, [1, 0], greedy=True, generator=None) == [1, 2]
    assert accept(logits, None, [2, 2], greedy=True, generator=None) == [1]


def _loop_accept_count(p: torch.Tensor, q: torch.Tensor, proposals: list[int], u: torch.Tensor) -> int:
    """The rule one proposal at a time (the textbook loop): how many proposals are kept."""
    for i, d in enumerate(proposals):
        if u[i] * q[i, d] > p[i, d]:
            return i
    return len(proposals)


def test_accept_count_matches_a_reference_loop():
    g = torch.Generator().manual_seed(1)
    k, v = 4, 6
    for _ in range(300):
        p = torch.distributions.Dirichlet(torch.ones(v)).sample((k + 1,)).double()  # [k+1, V]
        q = torch.distributions.Dirichlet(torch.ones(v)).sample((k,)).double()  # [k, V]
        proposals = torch.multinomial(q.float(), 1, generator=g)[:, 0].tolist()
        u = torch.rand(k, generator=g, dtype=torch.float64)
        out = accept(p, q, proposals, greedy=False, generator=g, uniforms=u)
        n = _loop_accept_count(p, q, proposals, u)
        assert out[:-1] == proposals[:n]
        residual = (p[n] - q[n]).clamp_min(0) if n < k else p[k]
        assert residual[out[-1]] > 0  # the last token comes from the residual at the first rejection


def test_rejection_samples_the_residual_of_its_own_position():
    # rows 0 and 1 accept token 0 surely (p ≥ q); row 2 rejects it surely (p = 0): residual is one-hot on 2
    p = torch.tensor([[0.6, 0.4, 0.0], [0.6, 0.4, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.2, 0.5, 0.3]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert accept(p, q, [0, 0, 0], greedy=False, generator=g) == [0, 0, 2]
    assert accept(p, q, [0, 0, 1], greedy=False, generator=g) == [0, 0, 1, 0]  # all kept: the bonus from p[3]


def _chi_square(tokens: list[int], p: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(p)).double()
    expected = p * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def test_emitted_tokens_follow_the_target_with_partial_acceptance():
    # k = 3 proposals drawn from a draft q unlike p (acceptance ≈ 0.55 per position): the first emitted token
    # is distributed as p[0], and the second (when the first proposal was kept) as p[1], whatever q is.
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.1, 0.2, 0.6], [0.25] * 4, [0.7, 0.1, 0.1, 0.1]],
                     dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    firsts, seconds, kept = [], [], 0
    for _ in range(20000):
        proposals = torch.multinomial(q, 1, generator=g)[:, 0].tolist()
        out = accept(p, q, proposals, greedy=False, generator=g)
        kept += len(out) - 1
        firsts.append(out[0])
        if len(out) > 1:
            seconds.append(out[1])
    assert 0.2 < kept / (3 * 20000) < 0.8  # partial acceptance: both branches are exercised
    # χ² with 3 degrees of freedom: P(χ² > 21.1) = 1e-4 for a correct sampler
    assert _chi_square(firsts, p[0]) < 21.1
    assert _chi_square(seconds, p[1]) < 21.1
