"""The engines `llmopt eval` times a workload through, behind one interface.

An engine is built once per model from an `EngineContext` (the loaded model, the eval args, the workload it will
serve) and then runs any list of requests: `run(requests, progress) -> RunOutput`, where `progress` is a
`llmopt.progress.Counter` advanced by one per finished request (or None). `warmup_batched` says whether the
untimed warm-up gets the whole workload (batched engines) or a couple of requests (one-at-a-time engines).

To add an engine:
  1. write a module here with a class satisfying `Engine` (see hf.py for the smallest one) and a
     `build(ctx: EngineContext) -> Engine` function; raise LlmoptError in `check(args)` for anything it cannot
     serve (optional, called in preflight before any model runs);
  2. add its name → module path to `ENGINE_MODULES` below (modules are imported lazily, so an engine whose
     package is not installed costs nothing until it is chosen);
  3. `--engine NAME` then accepts it (EvalArgs validates against `ENGINE_MODULES`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llmopt.evaluate.perf import RunOutput
    from llmopt.evaluate.types import EvalArgs
    from llmopt.evaluate.workload import Request
    from llmopt.progress import Counter


class Engine(Protocol):
    warmup_batched: bool

    def run(self, requests: list[Request], progress: Counter | None) -> RunOutput: ...


@dataclass(frozen=True, slots=True)
class EngineContext:
    """What an engine is built from: one loaded model (llmopt.models.LoadedModel), the eval args, the timed
    workload (to size the KV pool), and an optional speculative draft model."""

    loaded: object
    args: EvalArgs
    requests: list[Request]
    draft: object | None = None


# name → module with build(ctx) (and optionally check(args)); see the docstring to add one.
ENGINE_MODULES: dict[str, str] = {
    "llmopt": "llmopt.evaluate.engines.paged",
    "hf": "llmopt.evaluate.engines.hf",
    "hf-cb": "llmopt.evaluate.engines.hf_cb",
    "vllm": "llmopt.evaluate.engines.vllm",
    "llamacpp": "llmopt.evaluate.engines.llamacpp",
}


def _module(name: str):
    return importlib.import_module(ENGINE_MODULES[name])


def build_engine(name: str, ctx: EngineContext) -> Engine:
    return _module(name).build(ctx)


def check_engine(name: str, args: EvalArgs) -> None:
    """The engine's own preflight (e.g. vLLM installed, a GPU per --tp), if it has one."""
    check = getattr(_module(name), "check", None)
    if check is not None:
        check(args)


__all__ = ["ENGINE_MODULES", "Engine", "EngineContext", "build_engine", "check_engine"]
