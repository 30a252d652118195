"""The method objects: one per method name the checkpoint knows, their rules applied by QuantizeArgs, and the layer
walk's progress events."""

from __future__ import annotations

import pytest

from llmopt.checkpoint.types import METHODS as METHOD_NAMES
from llmopt.errors import LlmoptError
from llmopt.progress import Event
from llmopt.quant.api import QuantizeArgs, quantize
from llmopt.quant.methods import METHODS


def test_every_method_name_has_one_method_object():
    assert set(METHODS) == set(METHOD_NAMES)
    assert all(cls.name == name for name, cls in METHODS.items())


@pytest.mark.parametrize("method,bits,group_size,sym", [("rtn", 4, 128, True), ("gptq", 4, 128, True),
                                                        ("awq", 4, 128, False), ("int8", 8, -1, True),
                                                        ("w8a8", 8, -1, True)])
def test_defaults_come_from_the_method(tmp_path, method, bits, group_size, sym):
    args = QuantizeArgs(model="m", out=tmp_path, method=method)
    assert (args.bits, args.group_size, args.sym) == (bits, group_size, sym)


def test_method_rules_reject_what_it_cannot_do(tmp_path):
    with pytest.raises(LlmoptError, match="does not support --bits 3"):
        QuantizeArgs(model="m", out=tmp_path, method="awq", bits=3)
    with pytest.raises(LlmoptError, match="symmetric INT8"):
        QuantizeArgs(model="m", out=tmp_path, method="w8a8", sym=False)


def test_quantize_reports_each_layer_as_an_event(tiny_model_dir, tmp_path):
    events: list[Event] = []
    quantize(QuantizeArgs(model=str(tiny_model_dir), out=tmp_path / "q", method="rtn", group_size=32, samples=4,
                          seq_len=32, evaluate=False, device="cpu"), progress=events.append)
    counts = [(e.done, e.total) for e in events if e.task == "rtn layer"]
    assert counts and counts[-1][0] == counts[-1][1] and [d for d, _ in counts] == list(range(1, len(counts) + 1))
