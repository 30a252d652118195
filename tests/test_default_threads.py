"""default_threads: the faster of 1 thread and all usable cores, as the probe measures them."""

import pytest
import torch

from llmopt import utils


@pytest.fixture(autouse=True)
def fresh_probe():
    utils.default_threads.cache_clear()
    yield
    utils.default_threads.cache_clear()


@pytest.mark.parametrize("faster, expect", [("all", 8), ("one", 1)])
def test_picks_the_faster_and_restores_torch_threads(monkeypatch, faster, expect):
    monkeypatch.setattr(utils, "usable_cores", lambda: 8)
    seen = []

    def rate(threads, a, b, seconds):
        seen.append(threads)
        return {"all": {1: 100.0, 8: 160.0}, "one": {1: 100.0, 8: 20.0}}[faster][threads]

    monkeypatch.setattr(utils, "_matmul_rate", rate)
    before = torch.get_num_threads()
    assert utils.default_threads() == expect
    assert set(seen) == {1, 8} and torch.get_num_threads() == before
    assert utils.default_threads() == expect and len(seen) == 6  # probed once per process


def test_one_core_needs_no_probe(monkeypatch):
    monkeypatch.setattr(utils, "usable_cores", lambda: 1)
    monkeypatch.setattr(utils, "_matmul_rate", lambda *a: pytest.fail("probed"))
    assert utils.default_threads() == 1


def test_real_probe_returns_a_usable_count():
    assert utils.default_threads() in (1, utils.usable_cores())
