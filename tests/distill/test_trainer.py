"""Trainer pieces that decide the trajectory: batch plan, on-policy schedule, sampling (the lr schedule is
tests/models/test_training.py)."""

from __future__ import annotations

import pytest
import torch

from llmopt.distill import trainer
from llmopt.errors import LlmoptError


def test_batch_plan_covers_each_epoch_once_and_splits_processes():
    n, bs, accum = 23, 3, 2
    plans = [trainer.BatchPlan(n, bs, accum, num_processes=2, rank=r, seed=5) for r in range(2)]
    per_epoch = n // (bs * 2)  # 3 global micro-batches per epoch
    seen = []
    for b in range(per_epoch):
        step, micro = divmod(b, accum)
        for p in plans:
            seen += p.indices(step, micro).tolist()
    assert len(seen) == len(set(seen)) == per_epoch * bs * 2  # no window twice within an epoch
    again = trainer.BatchPlan(n, bs, accum, 2, 0, seed=5)
    assert torch.equal(again.indices(7, 1), plans[0].indices(7, 1))  # pure function of (seed, step)
    with pytest.raises(LlmoptError, match="fewer than one batch"):
        trainer.BatchPlan(5, 3, 1, 2, 0, 0)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1 / 3, 1.0])
def test_on_policy_schedule_hits_the_ratio_exactly(ratio):
    flags = [trainer.is_on_policy(s, ratio) for s in range(120)]
    assert sum(flags) == int(120 * ratio + 1e-9)


def test_cached_sampling_equals_recomputed_sampling():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    x = torch.randint(0, 50, (3, 5))
    got = trainer.sample_continuation(m, x, 6, 0.8, torch.Generator().manual_seed(1))
    g, seq = torch.Generator().manual_seed(1), x
    with torch.no_grad():
        for _ in range(6):
            p = torch.softmax(m(input_ids=seq).logits[:, -1] / 0.8, -1)
            seq = torch.cat([seq, torch.multinomial(p, 1, generator=g)], 1)
    assert torch.equal(got, seq)


def test_on_policy_masks_split_prompt_and_samples():
    kd, ce = trainer._masks(8, 5, "cpu")
    # position p predicts token p+1: tokens 5..7 were sampled, predicted at positions 4..6
    assert kd.tolist() == [[False, False, False, False, True, True, True]]
    assert ce.tolist() == [[True, True, True, True, False, False, False]]
