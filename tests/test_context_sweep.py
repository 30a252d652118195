"""The pure helpers of bench/context_sweep.py: context capping and decode stats from token timestamps."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("context_sweep",
                                               Path(__file__).resolve().parents[1] / "bench" / "context_sweep.py")
cs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cs)


def test_cap_contexts_caps_and_dedups():
    got, notes = cs.cap_contexts([256, 1024, 2048], 1024, 32)
    assert got == [256, 992]
    assert len(notes) == 2 and "992" in notes[0]


def test_cap_contexts_keeps_what_fits():
    assert cs.cap_contexts([256, 1024], 4096, 32) == ([256, 1024], [])


def test_cap_contexts_refuses_no_room():
    with pytest.raises(ValueError):
        cs.cap_contexts([16], 32, 32)
    with pytest.raises(ValueError):
        cs.cap_contexts([0], 1024, 32)


def test_decode_stats_batch():
    # two sequences, first tokens at 0.1 s, then one token every 10 ms / 20 ms
    a = [0.1 + 0.01 * i for i in range(5)]
    b = [0.1 + 0.02 * i for i in range(5)]
    ttft, tpot, rate = cs.decode_stats([a, b])
    assert ttft == pytest.approx(0.1)
    assert tpot == pytest.approx(0.015)  # median of 0.01 and 0.02
    assert rate == pytest.approx(8 / 0.08)  # 8 decode tokens over the 80 ms span


def test_decode_stats_needs_two_tokens():
    with pytest.raises(ValueError):
        cs.decode_stats([[0.1]])
