"""Serving metrics from per-token timestamps (names as vLLM's benchmark uses them). Pure functions.

TTFT: first token − arrival. TPOT: (E2EL − TTFT) / (output tokens − 1), per request. ITL: every gap between
consecutive tokens of a request. E2EL: last token − arrival. Throughputs over the run's duration.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True, slots=True)
class Dist:
    """Summary of a sample, in milliseconds."""

    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> Dist:
        if not seconds:
            return cls(None, None, None, None)
        x = torch.tensor(seconds, dtype=torch.float64) * 1000.0
        q = torch.quantile(x, torch.tensor([0.5, 0.95, 0.99], dtype=torch.float64)).tolist()
        return cls(x.mean().item(), q[0], q[1], q[2])


@dataclass(frozen=True, slots=True)
class RequestTiming:
    arrival: float
    prompt_tokens: int
    token_times: list[float]  # one per output token, same clock as arrival


@dataclass(frozen=True, slots=True)
class PerfMetrics:
    duration_s: float
    num_requests: int
    input_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    total_tokens_per_s: float
    requests_per_s: float
    ttft_ms: Dist
    tpot_ms: Dist
    itl_ms: Dist
    e2el_ms: Dist

    def to_dict(self) -> dict:
        return asdict(self)


def compute_metrics(requests: list[RequestTiming], duration: float) -> PerfMetrics:
    """Metrics of one run; duration = from the run's start to its last token."""
    ttft, tpot, itl, e2el = [], [], [], []
    for r in requests:
        if not r.token_times:
            continue
        ttft.append(r.token_times[0] - r.arrival)
        e2el.append(r.token_times[-1] - r.arrival)
        if len(r.token_times) > 1:
            tpot.append((r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1))
            itl.extend(b - a for a, b in zip(r.token_times, r.token_times[1:]))
    out_tokens = sum(len(r.token_times) for r in requests)
    in_tokens = sum(r.prompt_tokens for r in requests)
    return PerfMetrics(duration, len(requests), in_tokens, out_tokens, out_tokens / duration,
                       (in_tokens + out_tokens) / duration, len(requests) / duration,
                       Dist.of(ttft), Dist.of(tpot), Dist.of(itl), Dist.of(e2el))


_SCALARS = ("output_tokens_per_s", "total_tokens_per_s", "requests_per_s")
_DISTS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


@dataclass(frozen=True, slots=True)
class PerfSummary:
    """Medians over repeats, and each figure's spread (min, max) across them."""

    median: dict  # the PerfMetrics fields, each the median over repeats
    spread: dict  # "output_tokens_per_s": [min, max], "ttft_ms.p50": [min, max], ...
    repeats: int


def summarize(runs: list[PerfMetrics]) -> PerfSummary:
    median: dict = {k: statistics.median(getattr(r, k) for r in runs) for k in _SCALARS}
    spread: dict = {k: [min(getattr(r, k) for r in runs), max(getattr(r, k) for r in runs)] for k in _SCALARS}
    for k in _DISTS:
        median[k] = {}
        for stat in ("mean", "p50", "p95", "p99"):
            vals = [getattr(getattr(r, k), stat) for r in runs if getattr(getattr(r, k), stat) is not None]
            median[k][stat] = statistics.median(vals) if vals else None
            spread[f"{k}.{stat}"] = [min(vals), max(vals)] if vals else None
    median["duration_s"] = statistics.median(r.duration_s for r in runs)
    median["output_tokens"] = runs[0].output_tokens
    median["input_tokens"] = runs[0].input_tokens
    median["num_requests"] = runs[0].num_requests
    return PerfSummary(median, spread, len(runs))


def cost_per_1k_output_tokens(price_per_hour: float | None, output_tokens_per_s: float | None) -> float | None:
    """Dollars (or whatever unit the price is in) per 1000 output tokens at the measured throughput."""
    if price_per_hour is None or not output_tokens_per_s:
        return None
    return price_per_hour / 3600.0 / output_tokens_per_s * 1000.0
