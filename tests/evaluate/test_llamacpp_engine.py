"""--engine llamacpp without llama-cpp-python: one clear LlmoptError in preflight, before any model runs."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from llmopt.errors import LlmoptError
from llmopt.evaluate.engines import ENGINE_MODULES, check_engine


def test_registered():
    assert ENGINE_MODULES["llamacpp"] == "llmopt.evaluate.engines.llamacpp"


def test_missing_llama_cpp_python_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(LlmoptError, match="pip install llama-cpp-python") as e:
        check_engine("llamacpp", SimpleNamespace(quality_only=False))
    assert "\n" not in str(e.value)
    check_engine("llamacpp", SimpleNamespace(quality_only=True))  # no perf phase: nothing needed
