"""Distillation losses against direct float64 computations (written from the definitions, not the code)."""

from __future__ import annotations

import math

import pytest
import torch

from llmopt.distill import losses


def _softmax64(logits: torch.Tensor, t: float) -> torch.Tensor:
    z = logits.double() / t
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def _reference(kind: str, s: torch.Tensor, t: torch.Tensor, temp: float, beta: float, top_k: int = 0,
               mask: torch.Tensor | None = None) -> float:
    p_t, p_s = _softmax64(t, temp), _softmax64(s, temp)
    if top_k:
        idx = p_t.topk(top_k, -1).indices
        pt_k, ps_k = p_t.gather(-1, idx), p_s.gather(-1, idx)
        p_t = torch.cat([pt_k, 1 - pt_k.sum(-1, keepdim=True)], -1)
        p_s = torch.cat([ps_k, 1 - ps_k.sum(-1, keepdim=True)], -1)
    if kind == "forward_kl":
        d = _kl64(p_t, p_s)
    elif kind == "reverse_kl":
        d = _kl64(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        d = beta * _kl64(p_t, m) + (1 - beta) * _kl64(p_s, m)
    w = torch.ones_like(d) if mask is None else mask.double()
    return float((d * w).sum() / w.sum() * temp ** 2)


def _logits(seed: int, shape=(2, 5, 37), scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_kd_loss_matches_float64(kind, temp):
    s, t = _logits(0)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    got = losses.kd_loss(s, t, kind, temperature=temp, beta=0.3, mask=mask).item()
    assert got == pytest.approx(_reference(kind, s, t, temp, 0.3, mask=mask), rel=1e-5, abs=1e-7)
    got64 = losses.kd_loss(s.double(), t.double(), kind, temperature=temp, beta=0.3, mask=mask).item()
    assert got64 == pytest.approx(_reference(kind, s, t, temp, 0.3, mask=mask), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
@pytest.mark.parametrize("k", [1, 5, 36])
def test_topk_sparsified_loss_matches_float64(kind, k):
    s, t = _logits(2)
    got = losses.kd_loss(s.double(), t.double(), kind, temperature=1.5, beta=0.5, top_k=k).item()
    assert got == pytest.approx(_reference(kind, s, t, 1.5, 0.5, top_k=k), rel=1e-9, abs=1e-12)


def test_topk_at_or_above_vocab_is_the_full_loss():
    s, t = _logits(3)
    full = losses.kd_loss(s, t, "forward_kl")
    assert losses.kd_loss(s, t, "forward_kl", top_k=37).item() == pytest.approx(full.item(), rel=1e-6)


def test_divergences_are_zero_for_identical_and_positive_otherwise():
    s, t = _logits(4)
    for kind in losses.DIVERGENCES:
        assert losses.kd_loss(t, t, kind).abs().item() < 1e-6
        assert losses.kd_loss(s, t, kind).item() > 0.01


def test_jsd_is_symmetric_at_half_and_bounded_by_log2():
    s, t = _logits(5, scale=20.0)  # near one-hot: JSD approaches its bound ln 2
    a = losses.jsd(torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1), 0.5)
    b = losses.jsd(torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1), 0.5)
    torch.testing.assert_close(a, b)
    assert a.max().item() <= math.log(2) + 1e-12
    with pytest.raises(ValueError):
        losses.jsd(a, b, 1.0)


def test_temperature_scaling_keeps_gradient_magnitude():
    """× T² exists so the gradient does not shrink as 1/T² (Hinton et al.): check it stays O(1)."""
    s, t = _logits(6, scale=1.0)
    grads = []
    for temp in (1.0, 8.0):
        x = s.clone().requires_grad_(True)
        losses.kd_loss(x, t, "forward_kl", temperature=temp).backward()
        grads.append(x.grad.abs().mean().item())
    assert 0.2 < grads[1] / grads[0] < 5.0  # without T² the ratio would be about 1/T² = 1/64


def test_ce_loss_matches_float64():
    s, _ = _logits(7)
    targets = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    p = _softmax64(s, 1.0)
    nll = -p.gather(-1, targets[..., None]).squeeze(-1).log()
    ref = float((nll * mask).sum() / mask.sum())
    assert losses.ce_loss(s, targets, mask).item() == pytest.approx(ref, rel=1e-6)


def test_hidden_loss_matches_float64_with_projection():
    g = torch.Generator().manual_seed(8)
    hs = [torch.randn(2, 5, 6, generator=g) for _ in range(2)]
    ht = [torch.randn(2, 5, 4, generator=g) * 3 for _ in range(2)]
    proj = torch.nn.Linear(6, 4, bias=False)
    mask = torch.rand(2, 5, generator=g) > 0.4
    got = losses.hidden_loss(hs, ht, proj, mask).item()
    w = proj.weight.detach().double()
    ref = 0.0
    for a, b in zip(hs, ht):
        rel = ((a.double() @ w.T - b.double()) ** 2).sum(-1) / (b.double() ** 2).sum(-1)
        ref += float((rel * mask).sum() / mask.sum()) / 2
    assert got == pytest.approx(ref, rel=1e-5)
    assert losses.hidden_loss(ht, ht).item() == pytest.approx(0.0, abs=1e-7)


def test_combine_weights():
    kd, ce, hid = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    assert losses.combine(kd, ce, 0.25, hid, 0.1).item() == pytest.approx(0.25 * 2 + 0.75 * 3 + 0.5)
    assert losses.combine(kd, ce, 1.0).item() == pytest.approx(2.0)
    assert losses.combine(kd, ce, 0.0).item() == pytest.approx(3.0)
