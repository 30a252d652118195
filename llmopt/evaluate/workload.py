"""Benchmark workloads: prompts cut from held-out text, lengths uniform in ranges, offline or Poisson arrivals.

The same (seed, ranges, rate) gives the same lengths, offsets and arrival times for every model compared;
models that share a tokenizer therefore get identical prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmopt.errors import LlmoptError


def parse_range(text: str, option: str) -> tuple[int, int]:
    """'A:B' (or 'A') → (A, B) with 1 ≤ A ≤ B."""
    lo, _, hi = str(text).partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise LlmoptError(f"{option} must look like MIN:MAX or N (got {text!r})") from None
    if a < 1 or b < a:
        raise LlmoptError(f"{option} needs 1 ≤ MIN ≤ MAX (got {text!r})")
    return a, b


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    num_requests: int = 32
    prompt_len: tuple[int, int] = (32, 256)
    output_len: tuple[int, int] = (32, 128)
    request_rate: float = math.inf  # requests/s; inf = all at once (offline)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise LlmoptError(f"empty workload: --num-requests must be ≥ 1 (got {self.num_requests})")
        if not self.request_rate > 0:
            raise LlmoptError(f"--request-rate must be > 0 or inf (got {self.request_rate})")


@dataclass(frozen=True, slots=True)
class Request:
    prompt: list[int]
    max_tokens: int
    arrival: float  # seconds after the run starts


def make_workload(stream: torch.Tensor, spec: WorkloadSpec) -> list[Request]:
    """Requests whose prompts are windows of the token stream [T] at seeded random offsets."""
    g = torch.Generator().manual_seed(spec.seed)
    (pa, pb), (oa, ob) = spec.prompt_len, spec.output_len
    if stream.numel() < pb:
        raise LlmoptError(f"the data has {stream.numel()} tokens, fewer than the longest prompt ({pb}): "
                          f"lower --prompt-len or give more data")
    plens = torch.randint(pa, pb + 1, (spec.num_requests,), generator=g).tolist()
    olens = torch.randint(oa, ob + 1, (spec.num_requests,), generator=g).tolist()
    offsets = [int(torch.randint(0, stream.numel() - n + 1, (1,), generator=g)) for n in plens]
    if math.isinf(spec.request_rate):
        arrivals = [0.0] * spec.num_requests
    else:  # Poisson process: exponential gaps with mean 1/rate
        gaps = torch.empty(spec.num_requests, dtype=torch.float64).exponential_(spec.request_rate, generator=g)
        arrivals = (gaps.cumsum(0) - gaps[0]).tolist()
    return [Request(stream[o:o + n].tolist(), m, a) for o, n, m, a in zip(offsets, plens, olens, arrivals)]
