"""Fixed-size KV blocks: a free pool, per-sequence block tables, peak accounting.

Pure bookkeeping (no tensors): the KV cache stores token t of a sequence at slot
block_table[t // block_size] * block_size + t % block_size.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmopt.engine.sequence import Sequence


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(slots=True)
class BlockStats:
    num_blocks: int
    block_size: int
    peak_blocks: int = 0  # most blocks held at once
    peak_tokens: int = 0  # tokens stored in those blocks at that moment


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.block_size = block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.stats = BlockStats(num_blocks, block_size)
        self._tokens: dict[int, int] = {}  # sequence id → tokens its blocks hold

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.stats.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, tokens: int) -> int:
        """Extra blocks `seq` needs to hold `tokens` tokens in total."""
        return max(0, blocks_for(tokens, self.block_size) - len(seq.block_table))

    def can_reserve(self, seq: Sequence, tokens: int) -> bool:
        return self.blocks_needed(seq, tokens) <= self.num_free

    def reserve(self, seq: Sequence, tokens: int) -> None:
        """Grow seq's block table so it holds `tokens` tokens; caller checked can_reserve."""
        need = self.blocks_needed(seq, tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free} free")
        seq.block_table.extend(self.free.popleft() for _ in range(need))
        self._tokens[seq.id] = max(self._tokens.get(seq.id, 0), tokens)
        self._track_peak()

    def release(self, seq: Sequence) -> None:
        """Return all of seq's blocks to the pool (finish or preemption)."""
        self.free.extend(seq.block_table)
        seq.block_table = []
        self._tokens.pop(seq.id, None)

    def truncate(self, seq: Sequence, tokens: int) -> None:
        """Keep only the blocks that hold the first `tokens` tokens (speculative rollback)."""
        keep = blocks_for(tokens, self.block_size)
        self.free.extend(seq.block_table[keep:])
        del seq.block_table[keep:]
        self._tokens[seq.id] = min(self._tokens.get(seq.id, 0), tokens)

    def _track_peak(self) -> None:
        used = self.num_used
        if used > self.stats.peak_blocks:
            self.stats.peak_blocks = used
            self.stats.peak_tokens = sum(self._tokens.values())

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
