"""Fixed-size KV blocks: a free pool, per-sequence block tables, peak accounting.

Pure bookkeeping (no tensors): the KV cache stores token t of a sequence at slot
block_table[t // block_size] * block_size + t % block_size.

When every layer of the model attends through a sliding window, blocks whose positions all lie before
the oldest key any future query can see go back to the pool. Their table entries become FREED, so the
table stays positional (entry i still covers positions [i·bs, (i+1)·bs)); the runner maps FREED to a real
block whose keys the window masks out anyway.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmopt.engine.sequence import Sequence

FREED = -1  # a block table entry whose block went back to the pool (all its positions out of the window)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(slots=True)
class BlockStats:
    num_blocks: int
    block_size: int
    peak_blocks: int = 0  # most blocks held at once
    peak_tokens: int = 0  # tokens stored in those blocks at that moment


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, window: int | None = None) -> None:
        """window: the sliding window of the model when every layer has one (the largest), else None."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        if window is not None and window < 1:
            raise ValueError("a sliding window holds at least one token")
        self.block_size = block_size
        self.window = window
        self.free: deque[int] = deque(range(num_blocks))
        self.stats = BlockStats(num_blocks, block_size)
        self._tokens: dict[int, int] = {}  # sequence id → positions its table covers
        self._freed: dict[int, int] = {}  # sequence id → leading table entries that are FREED

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.stats.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, tokens: int) -> int:
        """Extra blocks `seq` needs to hold `tokens` tokens in total."""
        return max(0, blocks_for(tokens, self.block_size) - len(seq.block_table))

    def _out_of_window(self, seq: Sequence) -> int:
        """Leading table entries no future query of seq can see: the next query sits at position ≥ num_computed
        and sees keys j > q − window, so blocks ending before num_computed − window + 1 are dead."""
        if self.window is None:
            return 0
        oldest_visible = seq.num_computed - self.window + 1
        return min(max(0, oldest_visible) // self.block_size, len(seq.block_table))

    def can_reserve(self, seq: Sequence, tokens: int) -> bool:
        dead = self._out_of_window(seq) - self._freed.get(seq.id, 0)
        return self.blocks_needed(seq, tokens) <= self.num_free + max(0, dead)

    def reserve(self, seq: Sequence, tokens: int) -> None:
        """Free seq's blocks that fell out of the window, then grow its table to hold `tokens` tokens;
        caller checked can_reserve."""
        self._free_out_of_window(seq)
        need = self.blocks_needed(seq, tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free} free")
        seq.block_table.extend(self.free.popleft() for _ in range(need))
        self._tokens[seq.id] = max(self._tokens.get(seq.id, 0), tokens)
        self._track_peak()

    def _free_out_of_window(self, seq: Sequence) -> None:
        dead, freed = self._out_of_window(seq), self._freed.get(seq.id, 0)
        if dead > freed:
            self.free.extend(seq.block_table[freed:dead])
            seq.block_table[freed:dead] = [FREED] * (dead - freed)
            self._freed[seq.id] = dead

    def release(self, seq: Sequence) -> None:
        """Return all of seq's blocks to the pool (finish or preemption)."""
        self.free.extend(seq.block_table[self._freed.pop(seq.id, 0):])
        seq.block_table = []
        self._tokens.pop(seq.id, None)

    def truncate(self, seq: Sequence, tokens: int) -> None:
        """Keep only the blocks that hold the first `tokens` tokens (speculative rollback)."""
        keep = blocks_for(tokens, self.block_size)
        if keep < self._freed.get(seq.id, 0):
            raise RuntimeError(f"cannot roll back to {tokens} tokens: their blocks left the sliding window")
        self.free.extend(seq.block_table[keep:])
        del seq.block_table[keep:]
        self._tokens[seq.id] = min(self._tokens.get(seq.id, 0), tokens)

    def first_live(self, seq: Sequence) -> int:
        """Index of seq's first table entry that is not FREED."""
        return self._freed.get(seq.id, 0)

    def held_tokens(self, seq_id: int) -> int:
        """Positions seq's live (not FREED) blocks cover, up to what it reserved."""
        return max(0, self._tokens.get(seq_id, 0) - self._freed.get(seq_id, 0) * self.block_size)

    def _track_peak(self) -> None:
        used = self.num_used
        if used > self.stats.peak_blocks:
            self.stats.peak_blocks = used
            self.stats.peak_tokens = sum(self.held_tokens(i) for i in self._tokens)

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
