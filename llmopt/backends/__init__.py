"""External quantization backends (GPTQModel, llm-compressor, AutoGPTQ, AutoAWQ) behind `llmopt quantize
--backend NAME`, each run as a worker process in its own Python (llmopt's env or a venv of its own), and
`llmopt backends doctor|setup`.

Stdlib only at import time (this package is imported inside the backends' venvs); the heavy parts are
imported by the functions that need them.
"""

from __future__ import annotations

from llmopt.backends.base import BackendSpec
from llmopt.errors import LlmoptError

NAMES = ("llmopt", "auto-gptq", "autoawq", "gptqmodel", "llmcompressor")


def specs() -> dict[str, BackendSpec]:
    from llmopt.backends import auto_gptq, autoawq, gptqmodel, llmcompressor

    return {m.SPEC.name: m.SPEC for m in (gptqmodel, llmcompressor, auto_gptq, autoawq)}


def get_spec(name: str) -> BackendSpec:
    all_specs = specs()
    if name not in all_specs:
        raise LlmoptError(f"unknown --backend {name!r}: use one of {', '.join(NAMES)}")
    return all_specs[name]


def doctor(probe: bool = True):
    from llmopt.backends.doctor import doctor as _doctor

    return _doctor(probe=probe)


def setup(name: str, path=None, progress=None):
    from llmopt.backends.setup import setup as _setup

    return _setup(name, path, progress)


__all__ = ["NAMES", "BackendSpec", "doctor", "get_spec", "setup", "specs"]
