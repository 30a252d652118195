"""Scheduler alone, with a simulated forward: termination, FIFO fairness, preemption bookkeeping."""

from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.engine.block_manager import BlockManager, blocks_for
from llmopt.engine.sampling import SamplingParams
from llmopt.engine.scheduler import Scheduler, SchedulerConfig
from llmopt.engine.sequence import Sequence, Status


def simulate(lengths, outs, num_blocks, block_size, max_prefill, max_seqs=256, max_steps=10_000):
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, SchedulerConfig(max_seqs, max_prefill))
    seqs = [Sequence(i, [7] * n, SamplingParams(max_tokens=o, ignore_eos=True)) for i, (n, o) in
            enumerate(zip(lengths, outs))]
    for s in seqs:
        sched.add(s)
    first_token_step = {}
    steps = 0
    while sched.has_work:
        steps += 1
        assert steps < max_steps, "scheduler did not terminate"
        step = sched.schedule(now=0.0)
        assert step, "no progress while work remains"
        assert len({s.id for s, _ in step.work}) == len(step.work)
        prefill = sum(n for s, n in step.work if s.pending > 1)
        assert prefill <= max_prefill
        for s, n in step.work:
            assert len(s.block_table) * block_size >= s.num_computed + n  # KV room for what it feeds
            s.num_computed += n
            if s.num_computed == len(s):
                s.output.append(9)
                first_token_step.setdefault(s.id, steps)
                if s.done:
                    sched.finish(s)
        used = sum(len(s.block_table) for s in seqs)
        assert used + bm.num_free == num_blocks
    return seqs, sched, first_token_step


@settings(max_examples=60, deadline=None)
@given(data=st.data(), block_size=st.integers(1, 8), max_prefill=st.integers(1, 64))
def test_terminates_and_frees_everything(data, block_size, max_prefill):
    n = data.draw(st.integers(1, 8))
    lengths = data.draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    outs = data.draw(st.lists(st.integers(1, 20), min_size=n, max_size=n))
    need = max(blocks_for(p + o - 1, block_size) for p, o in zip(lengths, outs))
    num_blocks = data.draw(st.integers(need, need * 3))
    seqs, sched, _ = simulate(lengths, outs, num_blocks, block_size, max_prefill)
    assert all(s.status is Status.FINISHED and len(s.output) == s.params.max_tokens for s in seqs)
    assert sched.blocks.num_free == num_blocks


def test_first_come_first_served_without_pressure():
    _, sched, first = simulate([30] * 6, [5] * 6, num_blocks=100, block_size=4, max_prefill=40)
    order = sorted(first, key=lambda i: (first[i], i))
    assert order == list(range(6))
    assert sched.num_preemptions == 0


def test_preemption_under_a_tiny_budget_still_finishes_in_order_of_arrival():
    # Room for one request at a time (plus a bit): the others must be preempted and recomputed.
    seqs, sched, first = simulate([20, 20, 20], [20, 20, 20], num_blocks=12, block_size=4, max_prefill=64)
    assert sched.num_preemptions > 0
    assert all(len(s.output) == 20 for s in seqs)
    assert first[0] <= first[1] <= first[2]


def test_max_num_seqs_caps_running():
    bm = BlockManager(100, 4)
    sched = Scheduler(bm, SchedulerConfig(max_num_seqs=2, max_prefill_tokens=1000))
    for i in range(4):
        sched.add(Sequence(i, [1, 2, 3], SamplingParams(max_tokens=3)))
    step = sched.schedule(0.0)
    assert [s.id for s, _ in step.work] == [0, 1]


def test_future_arrivals_wait():
    bm = BlockManager(100, 4)
    sched = Scheduler(bm, SchedulerConfig())
    sched.add(Sequence(0, [1, 2], SamplingParams(max_tokens=2), arrival=5.0))
    assert not sched.schedule(now=1.0)
    assert sched.next_arrival() == 5.0
    assert sched.schedule(now=5.0)
