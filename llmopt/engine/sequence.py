"""A request as the engine tracks it: tokens, state, block table and per-token timestamps."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from llmopt.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    """One request: prompt + output tokens; the first `num_computed` of them have KV in the cache."""

    id: int
    prompt: list[int]
    params: SamplingParams
    arrival: float = 0.0  # seconds on the engine clock
    eos_id: int | None = None
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    token_times: list[float] = field(default_factory=list)  # engine clock when each output token was sampled
    preemptions: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a sequence needs at least one prompt token")
        if not self.params.greedy:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def token_slice(self, start: int, n: int) -> list[int]:
        """Tokens start..start+n-1 of prompt + output, without building that concatenation (a decode step
        feeds one token; rebuilding prompt + output for it cost O(context) per token)."""
        p = len(self.prompt)
        if start >= p:
            return self.output[start - p:start - p + n]
        if start + n <= p:
            return self.prompt[start:start + n]
        return self.prompt[start:] + self.output[:start + n - p]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next sample: the whole prompt (or prompt + output after a
        preemption), what is left of a chunked prefill, or 1 (the newest token) when decoding."""
        return len(self) - self.num_computed

    @property
    def done(self) -> bool:
        if len(self.output) >= self.params.max_tokens:
            return True
        return (not self.params.ignore_eos and self.eos_id is not None and bool(self.output)
                and self.output[-1] == self.eos_id)
