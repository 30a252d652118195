"""Continuous batching: which sequences run in the next packed step, and how many tokens each feeds.

Policy (vLLM-style): running sequences first, oldest first, each feeding its pending tokens (1 when
decoding, a prefill chunk otherwise, chunks capped by the per-step prefill budget); when KV blocks run
out, the youngest running sequence is preempted (blocks freed, recomputed later from its tokens) and
goes back to the head of the queue; new requests are admitted first-come first-served while the
prefill budget, the sequence cap and free blocks allow, but never in a step that had to preempt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmopt.engine.block_manager import BlockManager
from llmopt.engine.sequence import Sequence, Status


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_prefill_tokens: int = 1024  # prompt tokens fed per step: lower = better ITL tail, worse TTFT

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_prefill_tokens < 1:
            raise ValueError("max_num_seqs and max_prefill_tokens must be ≥ 1")


@dataclass(slots=True)
class Step:
    """Work for one forward: (sequence, tokens to feed from its num_computed on)."""

    work: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.work)


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig) -> None:
        self.blocks = blocks
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next_arrival(self) -> float | None:
        return min((s.arrival for s in self.waiting), default=None)

    def schedule(self, now: float) -> Step:
        step = Step()
        budget = self.config.max_prefill_tokens
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            n = seq.pending if seq.pending == 1 else min(seq.pending, budget)
            if n == 0:  # a prefill that gets no budget this step
                i += 1
                continue
            while not self.blocks.can_reserve(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # seq preempted itself: everything younger is gone too
            self.blocks.reserve(seq, seq.num_computed + n)
            step.work.append((seq, n))
            if n > 1 or seq.pending > 1:
                budget -= n
            i += 1
        if step.preempted:
            return step
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.arrival > now:
                break
            n = min(seq.pending, budget)
            if not self.blocks.can_reserve(seq, n):
                break
            self.waiting.popleft()
            self.blocks.reserve(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.work.append((seq, n))
            budget -= n
        return step

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
