from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.engine.block_manager import FREED, BlockManager, blocks_for
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


def _check_windowed(bm: BlockManager, seqs: list[Sequence]) -> None:
    held = [b for s in seqs for b in s.block_table if b != FREED]
    assert len(held) == len(set(held)) and not set(held) & set(bm.free)
    assert len(held) + bm.num_free == bm.stats.num_blocks, "blocks leaked or duplicated"
    for s in seqs:
        live = [b != FREED for b in s.block_table]
        assert live == sorted(live), "FREED entries are a prefix: the table stays positional"
        oldest_visible = max(0, s.num_computed - bm.window + 1)
        assert all(live[oldest_visible // bm.block_size:]), "a block a future query sees was freed"


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(4, 20), block_size=st.integers(1, 8), window=st.integers(1, 12),
       ops=st.lists(st.tuples(st.sampled_from(["step", "release", "rollback"]), st.integers(0, 2),
                              st.integers(1, 9)), max_size=60))
def test_window_frees_only_blocks_no_future_query_sees(num_blocks, block_size, window, ops):
    bm = BlockManager(num_blocks, block_size, window)
    seqs = [_seq(i) for i in range(3)]
    for op, i, n in ops:
        s = seqs[i]
        if op == "step":  # what the scheduler does: reserve room for n more tokens, then compute them
            if bm.can_reserve(s, s.num_computed + n):
                bm.reserve(s, s.num_computed + n)
                s.num_computed += n
        elif op == "release":
            bm.release(s)
            s.num_computed = 0
        else:  # speculative rollback: reserve n ahead, compute, keep only the first accepted one
            if bm.can_reserve(s, s.num_computed + n):
                bm.reserve(s, s.num_computed + n)
                s.num_computed += 1
                bm.truncate(s, s.num_computed)
        _check_windowed(bm, seqs)
        assert bm.stats.peak_tokens <= bm.stats.peak_blocks * block_size
    for s in seqs:
        bm.release(s)
    assert bm.num_free == num_blocks
