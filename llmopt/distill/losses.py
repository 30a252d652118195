"""Distillation losses: pure tensor functions (logits / hidden states in, scalar or per-token loss out).

Divergences work on log-probabilities over a common support [..., K]; K is the vocabulary, or the
teacher's top-k tokens plus one "rest" bucket when the logits are sparsified (`sparsify`), so every
divergence stays an exact divergence between two proper distributions. Losses from logits scale by
T² (Hinton et al.) so that gradient magnitudes do not shrink as the temperature grows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position: [..., K] log-probs → [...]. Mass-covering."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) per position: [..., K] → [...]. Mode-seeking."""
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


def jsd(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen–Shannon divergence per position: [..., K] → [...].

    M = β·P_t + (1−β)·P_s;  JSD_β = β·KL(P_t || M) + (1−β)·KL(P_s || M). β = 0.5 is the symmetric JSD;
    β → 0 behaves like β·KL(P_t||P_s) (forward), β → 1 like (1−β)·KL(P_s||P_t) (reverse), as in GKD.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"JSD beta must be in (0, 1), got {beta}")
    # log M computed in log space: logsumexp of the two weighted log-probs avoids underflow of tiny probs.
    log_m = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log1p(-beta))  # [..., K]
    return beta * forward_kl(log_m, t_logp) + (1.0 - beta) * forward_kl(log_m, s_logp)


def divergence(kind: str, s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence by name ('forward_kl', 'reverse_kl', 'jsd')."""
    if kind == "forward_kl":
        return forward_kl(s_logp, t_logp)
    if kind == "reverse_kl":
        return reverse_kl(s_logp, t_logp)
    if kind == "jsd":
        return jsd(s_logp, t_logp, beta)
    raise ValueError(f"unknown divergence {kind!r}: use one of {', '.join(DIVERGENCES)}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-12)  # the rest bucket may be numerically empty; keep it a (tiny) positive mass
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparsify(s_logp: torch.Tensor, t_logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict both distributions to the teacher's top-k tokens plus one bucket for all other tokens.

    [..., V] log-probs → ([..., k+1], [..., k+1]) log-probs (student, teacher). The rest bucket keeps each
    distribution normalized, so a student that puts mass outside the teacher's top-k is still penalized;
    only k+1 teacher numbers per position need keeping instead of V.
    """
    t_top, idx = t_logp.topk(k, dim=-1)  # [..., k]
    s_top = s_logp.gather(-1, idx)  # [..., k]
    t_rest = _log1mexp(torch.logsumexp(t_top, -1, keepdim=True))  # [..., 1]
    s_rest = _log1mexp(torch.logsumexp(s_top, -1, keepdim=True))  # [..., 1]
    return torch.cat([s_top, s_rest], -1), torch.cat([t_top, t_rest], -1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of values [...] over positions where mask [...] is true (all positions when mask is None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
            temperature: float = 1.0, beta: float = 0.5, top_k: int = 0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation loss from logits [B, S, V] (same vocabulary), averaged over masked positions [B, S], × T².

    Computed in float32 at least: log-softmax over a large vocabulary in bf16 loses the small probabilities
    that the KL terms are made of.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    work = torch.promote_types(student_logits.dtype, torch.float32)
    s_logp = F.log_softmax(student_logits.to(work) / temperature, dim=-1)  # [B, S, V]
    t_logp = F.log_softmax(teacher_logits.to(work) / temperature, dim=-1)  # [B, S, V]
    if 0 < top_k < s_logp.shape[-1]:
        s_logp, t_logp = sparsify(s_logp, t_logp, top_k)  # [B, S, k+1]
    per_pos = divergence(kind, s_logp, t_logp, beta)  # [B, S]
    return masked_mean(per_pos, mask) * temperature ** 2


def ce_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, S, V] already aligned with targets [B, S]; mean over mask [B, S]."""
    work = torch.promote_types(logits.dtype, torch.float32)
    per_pos = F.cross_entropy(logits.to(work).flatten(0, 1), targets.flatten(), reduction="none")  # [B*S]
    return masked_mean(per_pos.view(targets.shape), mask)


def hidden_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                project: torch.nn.Module | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Relative squared error between matched hidden states, averaged over layer pairs and masked positions.

    Each pair: student [B, S, Ds] (projected to Dt when widths differ) vs teacher [B, S, Dt]. The error is
    divided by the teacher state's squared norm per position, so the loss is scale-free: residual streams
    grow with depth, and a raw MSE would let the deepest pair dominate (and make --hidden-weight model-specific).
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError("hidden_loss needs the same positive number of student and teacher states")
    total = student_hidden[0].new_zeros((), dtype=torch.promote_types(student_hidden[0].dtype, torch.float32))
    for hs, ht in zip(student_hidden, teacher_hidden, strict=True):
        if project is not None:
            hs = project(hs)  # [B, S, Dt]
        hs, ht = hs.to(total.dtype), ht.to(total.dtype)
        rel = (hs - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).clamp(min=1e-12)  # [B, S]
        total = total + masked_mean(rel, mask)
    return total / len(student_hidden)


def combine(kd: torch.Tensor, ce: torch.Tensor | None, alpha: float,
            hidden: torch.Tensor | None = None, hidden_weight: float = 0.0) -> torch.Tensor:
    """alpha·KD + (1 − alpha)·CE + hidden_weight·hidden (terms that are None or weighted 0 drop out)."""
    loss = alpha * kd if alpha > 0 else kd.new_zeros(())
    if ce is not None and alpha < 1:
        loss = loss + (1.0 - alpha) * ce
    if hidden is not None and hidden_weight > 0:
        loss = loss + hidden_weight * hidden
    return loss
