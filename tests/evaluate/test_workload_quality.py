import math

import pytest
import torch

from llmopt.errors import LlmoptError
from llmopt.evaluate.budget import parse_kv_budget
from llmopt.evaluate.quality import measure_quality, sliding_windows
from llmopt.evaluate.workload import WorkloadSpec, make_workload, parse_range


def test_workload_is_seeded_and_in_range():
    stream = torch.arange(5000)
    spec = WorkloadSpec(20, (5, 30), (2, 9), seed=4)
    a, b = make_workload(stream, spec), make_workload(stream, spec)
    assert a == b
    assert all(5 <= len(r.prompt) <= 30 and 2 <= r.max_tokens <= 9 and r.arrival == 0.0 for r in a)
    assert all(r.prompt == list(range(r.prompt[0], r.prompt[0] + len(r.prompt))) for r in a)  # cut from the stream


def test_poisson_arrivals_have_the_requested_rate():
    reqs = make_workload(torch.arange(1000), WorkloadSpec(2000, (2, 4), (1, 2), request_rate=50.0, seed=1))
    times = [r.arrival for r in reqs]
    assert times[0] == 0.0 and times == sorted(times)
    assert (len(times) - 1) / times[-1] == pytest.approx(50.0, rel=0.1)


@pytest.mark.parametrize("bad", [dict(num_requests=0), dict(request_rate=0.0)])
def test_bad_workloads(bad):
    with pytest.raises(LlmoptError):
        WorkloadSpec(**bad)


def test_parse_range():
    assert parse_range("32:256", "x") == (32, 256) and parse_range("7", "x") == (7, 7)
    for bad in ("0:4", "9:3", "a:b"):
        with pytest.raises(LlmoptError):
            parse_range(bad, "--prompt-len")


def test_kv_budget_parsing():
    cpu = torch.device("cpu")
    assert parse_kv_budget("512MiB", cpu) == 512 * 2 ** 20
    assert parse_kv_budget("2GB", cpu) == 2 * 10 ** 9
    assert parse_kv_budget("1e6", cpu) == 10 ** 6
    assert 0 < parse_kv_budget("0.01", cpu)
    for bad in ("lots", "-3", "5XB"):
        with pytest.raises(LlmoptError):
            parse_kv_budget(bad, cpu)


@pytest.mark.parametrize("total,seq_len,stride", [(100, 16, 8), (100, 16, 16), (37, 10, 3), (16, 16, 4)])
def test_sliding_windows_score_every_token_once(total, seq_len, stride):
    stream = torch.arange(total)
    sw = sliding_windows(stream, seq_len, stride)
    targets = sw.windows[:, 1:][sw.scored].tolist()
    # Every token but the first, exactly once; without overlap a window's first token has no context.
    s = sw.windows[:, 0].tolist()
    starts = {0} | {b for a, b in zip(s, s[1:]) if b >= a + seq_len}
    assert sorted(targets) == [t for t in range(total) if t not in starts]


class Bigram(torch.nn.Module):
    """A model whose logits depend only on the previous token: windows and strides must not change its ppl."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids]})


def test_perplexity_with_stride_matches_a_direct_computation():
    model = Bigram()
    stream = torch.randint(0, 11, (200,), generator=torch.Generator().manual_seed(1))
    lp = torch.log_softmax(model.table.double(), -1)
    direct = math.exp(-lp[stream[:-1], stream[1:]].mean().item())
    for seq_len, stride in ((20, 10), (50, 7), (200, 200)):
        sw = sliding_windows(stream, seq_len, stride)
        q = measure_quality(model, sw.windows, scored=sw.scored)
        assert q.tokens == 199
        assert q.perplexity == pytest.approx(direct, rel=1e-9)
    sw = sliding_windows(stream, 20, 20)  # no overlap: each window's first token is not predicted
    assert measure_quality(model, sw.windows, scored=sw.scored).tokens == 200 - 10


def test_kld_against_itself_is_zero_and_against_another_positive():
    a, b = Bigram(), Bigram()
    with torch.no_grad():
        b.table.add_(0.3 * torch.randn(11, 11, generator=torch.Generator().manual_seed(5)))
    stream = torch.randint(0, 11, (120,), generator=torch.Generator().manual_seed(2))
    sw = sliding_windows(stream, 30, 15)
    same = measure_quality(a, sw.windows, baseline=a, scored=sw.scored)
    assert same.kld_mean == pytest.approx(0.0, abs=1e-12) and same.top1_agreement == 1.0
    diff = measure_quality(b, sw.windows, baseline=a, scored=sw.scored)
    assert diff.kld_mean > 0 and diff.kld_p99 >= diff.kld_mean * 0 and diff.top1_agreement < 1.0
