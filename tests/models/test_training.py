"""The shared training pieces (models/training.py) and the one perplexity (models/scoring.py)."""

from __future__ import annotations

import math

import pytest
import torch

from llmopt.models import scoring, training


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [training.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(training.LR_FLOOR, abs=1e-3)


def test_scheduler_sets_the_peak_times_the_factor_before_every_step():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = training.make_optimizer(model, lr=2e-3, weight_decay=0.1)
    sched = training.make_scheduler(opt, steps=30, warmup=5)
    seen = []
    for _ in range(30):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-3 * training.lr_factor(k, 30, 5) for k in range(30)])


def test_optimizer_decays_matrices_only_and_skips_frozen_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = training.make_optimizer(model, 1e-3, 0.1).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 4)]
    assert sorted(tuple(p.shape) for p in no_decay["params"]) == [(2,), (4,), (4,), (4,)]


class _Fixed(torch.nn.Module):
    """A 'language model' whose logits are a fixed function of the input token: logits[t] = table[t]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor):
        return type("Out", (), {"logits": self.table[input_ids]})()  # [B, L, V]


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = _Fixed(torch.zeros(7, 7))
    wins = torch.randint(0, 7, (5, 9))
    assert scoring.perplexity(model, wins) == pytest.approx(7.0)


def test_perplexity_matches_hand_computed_nll_and_ignores_batching_and_unscored_predictions():
    torch.manual_seed(0)
    model = _Fixed(torch.randn(6, 6))
    wins = torch.randint(0, 6, (5, 8))  # [N, L]
    scored = torch.rand(5, 7) < 0.5  # [N, L-1]
    logp = model.table.detach().double().log_softmax(-1)  # [V, V]: row = previous token
    nll = -logp[wins[:, :-1], wins[:, 1:]]  # [N, L-1]
    want = math.exp(nll[scored].mean().item())
    assert scoring.perplexity(model, wins, batch_size=2, scored=scored) == pytest.approx(want, rel=1e-12)
    assert scoring.perplexity(model, wins, batch_size=5, scored=scored) == pytest.approx(want, rel=1e-12)
    assert scoring.perplexity(model, wins) == pytest.approx(math.exp(nll.mean().item()), rel=1e-12)


def test_evaluate_reports_the_same_perplexity():
    from llmopt.evaluate.quality import measure_quality

    torch.manual_seed(1)
    model, base = _Fixed(torch.randn(6, 6)), _Fixed(torch.randn(6, 6))
    wins = torch.randint(0, 6, (4, 10))
    ppl = scoring.perplexity(model, wins)
    assert measure_quality(model, wins).perplexity == ppl
    assert measure_quality(model, wins, baseline=base).perplexity == ppl
