"""What a quantized KV cache costs, measured through llmopt's engine itself: each held-out window is fed
teacher-forced through the engine's paged cache twice, once with the model's float KV and once with --kv-dtype,
with logits kept at every position; the next-token distributions are compared (KL-divergence mean/p99, top-1
agreement) and scored (perplexity of the quantized-KV run).

The window goes in as a one-token first chunk, then chunks of `chunk` tokens (engine.teacher_forced_logits), so
every position after the first attends to keys read back from the cache — what decode reads — rather than to
the unstored keys a fresh prompt chunk attends to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.engine import EngineConfig, LLMEngine
from llmopt.engine.block_manager import blocks_for
from llmopt.errors import LlmoptError


@dataclass(frozen=True, slots=True)
class KVQuality:
    kv_dtype: str
    tokens: int  # next-token predictions scored
    kld_mean: float  # KL(float KV ‖ quantized KV), nats per token
    kld_p99: float
    top1: float  # fraction of positions whose argmax is the same under both caches
    perplexity: float  # of the quantized-KV run on the held-out next tokens
    float_perplexity: float  # of the float-KV run on the same tokens
    scales: str  # static per layer (a calibrated checkpoint's k_scale/v_scale) or dynamic per (token, kv head)

    def to_quality(self) -> dict:
        """The eval report's quality.kv_* entries."""
        return {"kv_dtype": self.kv_dtype, "kv_scales": self.scales, "kv_tokens": self.tokens,
                "kv_kld_mean": self.kld_mean, "kv_kld_p99": self.kld_p99, "kv_top1": self.top1,
                "kv_perplexity": self.perplexity, "kv_float_perplexity": self.float_perplexity}


def _engine(model, kv_dtype: str, window: int, block_size: int) -> LLMEngine:
    """An engine whose pool holds exactly one window: max_blocks caps the (unbounded) budget."""
    return LLMEngine(model, EngineConfig(kv_budget=2 ** 62, block_size=block_size,
                                         max_blocks=blocks_for(window, block_size), kv_dtype=kv_dtype))


def measure_kv_quality(model, windows: list[list[int]], kv_dtype: str, chunk: int = 64,
                       block_size: int = 16) -> KVQuality:
    """Teacher-forced next-token distributions over `windows` (token lists, each scored at every position but the
    last) with the model's float KV vs `kv_dtype` KV, both through llmopt's engine."""
    if not windows or min(len(w) for w in windows) < 2:
        raise LlmoptError("KV-quality measurement needs held-out windows of at least 2 tokens")
    longest = max(len(w) for w in windows)
    reference, quantized = _engine(model, "auto", longest, block_size), _engine(model, kv_dtype, longest, block_size)
    klds, same, nll_q, nll_f = [], 0, 0.0, 0.0
    for w in windows:
        target = torch.tensor(w[1:])  # [L-1] the next tokens
        lp = reference.teacher_forced_logits(w, chunk)[:-1].double().log_softmax(-1)  # [L-1, V]
        lq = quantized.teacher_forced_logits(w, chunk)[:-1].double().log_softmax(-1)  # [L-1, V]
        klds.append((lp.exp() * (lp - lq)).sum(-1).clamp_min(0))  # [L-1]; ≥ 0 up to rounding
        same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        nll_q -= float(lq.gather(-1, target[:, None].to(lq.device)).sum())
        nll_f -= float(lp.gather(-1, target[:, None].to(lp.device)).sum())
    kld = torch.cat(klds)  # [N]
    n = kld.numel()
    return KVQuality(quantized.kv_format.name, n, float(kld.mean()), float(torch.quantile(kld, 0.99)), same / n,
                     float(torch.exp(torch.tensor(nll_q / n))), float(torch.exp(torch.tensor(nll_f / n))),
                     quantized.kv_stats().kv_scales)
