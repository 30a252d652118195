"""Perplexity of a causal LM on token windows: the one implementation, used by the builtin model's build
(models/builtin.py) and by evaluation (evaluate/quality.py measure_quality). float64 accumulation, so values
do not depend on the batch size."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of at most batch_size rows of windows [N, ...]."""
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i:i + batch_size]


def prediction_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of the next-token predictions of x [B, L]: [B, L-1, V] float64 on the CPU (position p predicts
    token p+1)."""
    device = next(model.parameters()).device
    return model(input_ids=x.to(device)).logits[:, :-1].double().cpu()


@dataclass(slots=True)
class NllTotal:
    """Summed negative log-likelihood of the predicted tokens so far."""

    nll: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits [K, V] of K predictions, targets [K] the tokens they predict."""
        self.nll += F.cross_entropy(logits, targets, reduction="sum").item()
        self.tokens += targets.numel()

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, scored: torch.Tensor | None = None) -> float:
    """Perplexity over windows [N, L]: every token but each window's first is predicted, or only the
    predictions marked in scored [N, L-1]."""
    if scored is None:
        scored = torch.ones(windows.shape[0], windows.shape[1] - 1, dtype=torch.bool)
    total = NllTotal()
    for x, keep in zip(batches(windows, batch_size), batches(scored, batch_size), strict=True):
        total.add(prediction_logits(model, x)[keep], x[:, 1:][keep])  # [K, V], [K]
    return total.perplexity
