from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.engine.block_manager import BlockManager, blocks_for
from llmopt.engine.sampling import SamplingParams
from llmopt.engine.sequence import Sequence


def _seq(i: int) -> Sequence:
    return Sequence(i, [5], SamplingParams(max_tokens=4))


def _check(bm: BlockManager, seqs: list[Sequence]) -> None:
    held = [b for s in seqs for b in s.block_table]
    assert len(held) == len(set(held)), "a block is in two tables"
    assert not set(held) & set(bm.free), "a held block is also free"
    assert len(held) + bm.num_free == bm.stats.num_blocks, "blocks leaked or duplicated"
    assert all(0 <= b < bm.stats.num_blocks for b in held)
    assert bm.stats.peak_blocks >= bm.num_used


ops = st.lists(st.tuples(st.sampled_from(["reserve", "release", "truncate"]), st.integers(0, 4),
                         st.integers(0, 60)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 20), block_size=st.integers(1, 8), ops=ops)
def test_invariants_under_random_ops(num_blocks, block_size, ops):
    bm = BlockManager(num_blocks, block_size)
    seqs = [_seq(i) for i in range(5)]
    for op, i, n in ops:
        s = seqs[i]
        if op == "reserve":
            if bm.can_reserve(s, n):
                bm.reserve(s, n)
                assert len(s.block_table) >= blocks_for(n, block_size)
            else:
                assert bm.blocks_needed(s, n) > bm.num_free
        elif op == "release":
            bm.release(s)
            assert s.block_table == []
        else:
            before = len(s.block_table)
            bm.truncate(s, n)
            assert len(s.block_table) == min(before, blocks_for(n, block_size))
        _check(bm, seqs)
    for s in seqs:
        bm.release(s)
    assert bm.num_free == num_blocks


def test_slots_are_unique_and_follow_the_table():
    bm = BlockManager(8, 4)
    a, b = _seq(0), _seq(1)
    bm.reserve(a, 6)
    bm.reserve(b, 9)
    slots = [bm.slot(a, p) for p in range(6)] + [bm.slot(b, p) for p in range(9)]
    assert len(set(slots)) == len(slots)
    assert bm.slot(a, 5) == a.block_table[1] * 4 + 1


def test_peak_counts_tokens_held():
    bm = BlockManager(10, 4)
    a, b = _seq(0), _seq(1)
    bm.reserve(a, 5)   # 2 blocks
    bm.reserve(b, 4)   # 1 block
    assert (bm.stats.peak_blocks, bm.stats.peak_tokens) == (3, 9)
    bm.release(a)
    bm.reserve(b, 8)
    assert (bm.stats.peak_blocks, bm.stats.peak_tokens) == (3, 9)  # the peak stays the earlier one
