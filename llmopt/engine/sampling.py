"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded per request.

A pure tensor core (`sample_rows`) over [B, V] logits; each request owns a torch.Generator so its
samples do not depend on which other requests share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmopt.errors import LlmoptError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks tokens. temperature 0 = greedy (top_k/top_p then unused)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0
    ignore_eos: bool = False  # benchmarks force exact output lengths, as vLLM bench does

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise LlmoptError(f"max tokens must be ≥ 1 (got {self.max_tokens})")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise LlmoptError(f"--temperature must be ≥ 0 (got {self.temperature})")
        if self.top_k < 0:
            raise LlmoptError(f"--top-k must be ≥ 0 (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            raise LlmoptError(f"--top-p must be in (0, 1] (got {self.top_p})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled and truncated logits [V] → [V] (-inf outside the kept set)."""
    x = logits.float() / temperature
    if top_k and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
    return x


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Next-token distribution [V] that `params` samples from (one-hot argmax when greedy)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).float()
    return torch.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [B, V]; greedy rows in one argmax, the others from their own generator."""
    out = logits.argmax(dim=-1).tolist()  # [B]
    for i, p in enumerate(params):
        if not p.greedy:
            dist = probs(logits[i], p)
            out[i] = int(torch.multinomial(dist.cpu(), 1, generator=generators[i]).item())
    return out
