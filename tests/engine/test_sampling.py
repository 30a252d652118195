import pytest
import torch

from llmopt.engine.sampling import SamplingParams, filter_logits, probs, sample_rows
from llmopt.errors import LlmoptError


def test_top_k_keeps_k_largest():
    x = torch.tensor([1.0, 4.0, 3.0, 2.0])
    kept = torch.isfinite(filter_logits(x, 1.0, 2, 1.0))
    assert kept.tolist() == [False, True, True, False]


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.79)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.81)).tolist() == [True, True, True, False]


def test_temperature_scales_logits():
    x = torch.tensor([0.0, 1.0])
    d = probs(x, SamplingParams(temperature=0.5))
    assert torch.allclose(d, torch.softmax(x / 0.5, -1))


def test_greedy_rows_are_argmax_and_seeded_rows_reproduce():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ps = [SamplingParams(), SamplingParams(temperature=1.0, seed=3), SamplingParams()]
    a = sample_rows(logits, ps, [None, torch.Generator().manual_seed(3), None])
    b = sample_rows(logits, ps, [None, torch.Generator().manual_seed(3), None])
    assert a == b and a[0] == logits[0].argmax().item() and a[2] == logits[2].argmax().item()


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_tokens=0)])
def test_bad_params(kw):
    with pytest.raises(LlmoptError):
        SamplingParams(**kw)
