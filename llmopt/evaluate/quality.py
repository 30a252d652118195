"""Quality of a model on held-out tokens, alone and against a baseline on the very same tokens.

Pure functions over models and token windows; float64 accumulation so small KLDs stay exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llmopt.models.scoring import NllTotal, batches, prediction_logits


@dataclass(frozen=True, slots=True)
class Quality:
    perplexity: float
    tokens: int
    kld_mean: float | None = None  # mean over tokens of KL(baseline || model), nats
    kld_p99: float | None = None
    top1_agreement: float | None = None  # fraction of tokens where argmax matches the baseline's

    def to_dict(self) -> dict:
        return asdict(self)


def kl_per_token(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_model) per position: [..., V] logits → [...] nats (computed in float64)."""
    lp_base = F.log_softmax(base_logits.double(), dim=-1)
    lp = F.log_softmax(logits.double(), dim=-1)
    return (lp_base.exp() * (lp_base - lp)).sum(-1)


@dataclass(frozen=True, slots=True)
class SlidingWindows:
    """Overlapping windows over a token stream and which predictions in each are scored."""

    windows: torch.Tensor  # [N, L]
    scored: torch.Tensor  # [N, L-1] bool: prediction j (of token j+1) counts; every stream token once


def sliding_windows(stream: torch.Tensor, seq_len: int, stride: int) -> SlidingWindows:
    """Windows of seq_len every `stride` tokens (the last one flush with the stream's end); each window scores
    only the tokens the previous one did not, so every token after the first is predicted exactly once,
    with up to seq_len - stride tokens of context carried over (the HF perplexity recipe)."""
    from llmopt.errors import LlmoptError

    if not 0 < stride <= seq_len:
        raise LlmoptError(f"--stride must be in 1..--seq-len ({seq_len}), got {stride}")
    total = stream.numel()
    if total < seq_len:
        raise LlmoptError(f"the held-out data has {total} tokens, fewer than --seq-len {seq_len}: lower --seq-len")
    starts = list(range(0, total - seq_len + 1, stride))
    if starts[-1] + seq_len < total:
        starts.append(total - seq_len)
    windows = torch.stack([stream[s:s + seq_len] for s in starts])  # [N, L]
    scored = torch.zeros(len(starts), seq_len - 1, dtype=torch.bool)
    scored[0] = True
    for i in range(1, len(starts)):
        first_new = starts[i - 1] + seq_len - starts[i]  # window index of the first token not yet scored
        scored[i, max(first_new - 1, 0):] = True  # prediction j is of token j+1; token 0 has no context
    return SlidingWindows(windows, scored)


class QualityMeter:
    """Perplexity and (with a baseline) KLD and top-1 agreement, fed batch by batch with the logits of the same
    predictions."""

    def __init__(self) -> None:
        self.total, self.agree = NllTotal(), 0
        self.klds: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor, base: torch.Tensor | None = None) -> None:
        """logits [K, V] of K predictions of targets [K]; base [K, V] the baseline's logits of the same ones."""
        self.total.add(logits, targets)
        if base is None:
            return
        if base.shape[-1] != logits.shape[-1]:
            from llmopt.errors import LlmoptError

            raise LlmoptError(f"model and baseline vocabularies differ ({logits.shape[-1]} vs {base.shape[-1]}): "
                              f"KLD needs the same tokenizer")
        self.klds.append(kl_per_token(base, logits))
        self.agree += (base.argmax(-1) == logits.argmax(-1)).sum().item()

    def result(self) -> Quality:
        if not self.klds:
            return Quality(self.total.perplexity, self.total.tokens)
        kld = torch.cat(self.klds)
        return Quality(self.total.perplexity, self.total.tokens, kld.mean().item(),
                       torch.quantile(kld.float(), 0.99).item(), self.agree / self.total.tokens)


@torch.inference_mode()
def measure_quality(model, windows: torch.Tensor, baseline=None, batch_size: int = 8,
                    scored: torch.Tensor | None = None,
                    logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Quality:
    """Perplexity of `model` on windows [N, L] (every token but each window's first is predicted, or only the
    predictions marked in `scored` [N, L-1]); with `baseline`, KL-divergence from the baseline's next-token
    distribution and top-1 agreement on the same predictions. `logits_of` ([B, L] → [B, L-1, V] float64) scores
    instead of `model` where another program runs the model (llama.cpp's GGUFScorer)."""
    meter = QualityMeter()
    if scored is None:
        scored = torch.ones(windows.shape[0], windows.shape[1] - 1, dtype=torch.bool)
    score = logits_of or (lambda x: prediction_logits(model, x))
    for x, keep in zip(batches(windows, batch_size), batches(scored, batch_size), strict=True):
        logits = score(x)[keep]  # [K, V]
        base = None if baseline is None else prediction_logits(baseline, x)[keep]
        meter.add(logits, x[:, 1:][keep], base)
    return meter.result()
