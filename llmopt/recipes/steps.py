"""Step kinds a recipe can use: kind name → (Args dataclass, core function).

The options a step accepts are the fields of its Args dataclass (the same as its CLI command's long options,
`-` → `_`), so a new CLI option is a new recipe option with no change here. Tests register fake kinds.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Fields the runner fills in itself: where the step writes, that a re-run may replace it, where a step keeps
# its resumable checkpoints and whether to resume from them, where an eval writes its own files.
RUNNER_FIELDS = ("out", "overwrite", "checkpoint_dir", "resume", "json", "csv", "plot")


@dataclass(frozen=True, slots=True)
class StepKind:
    """A kind of step: its options (an Args dataclass) and the core function that runs it."""

    name: str
    args: type  # a dataclass whose __post_init__ validates
    run: Callable[..., Any]  # run(args, progress=Progress | None) -> result with .to_dict()
    produces_model: bool  # its `out` is a checkpoint that later steps can use as a model
    evaluates: bool = False  # its result is an eval report: {"results": [{"model": ..., "quality": ...}, ...]}

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.args):
            raise TypeError(f"step kind {self.name}: args must be a dataclass, got {self.args!r}")

    @property
    def fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.args) if f.init}

    @property
    def options(self) -> list[str]:
        """What a recipe may set on a step of this kind."""
        return [name for name in self.fields if name not in RUNNER_FIELDS]

    @property
    def models_field(self) -> str | None:
        """Eval kinds: the option listing the models to evaluate (`model` for llmopt eval)."""
        return next((f for f in ("models", "model") if f in self.fields), None) if self.evaluates else None

    @property
    def managed(self) -> list[str]:
        """Fields the runner sets."""
        return [name for name in self.fields if name in RUNNER_FIELDS]


@dataclass(frozen=True, slots=True)
class _BuiltinKind:
    """Where a real command's Args and core function live (imported on first use: they pull in torch)."""

    module: str
    args: str
    run: str
    produces_model: bool
    evaluates: bool


_KINDS: dict[str, StepKind] = {}
_BUILTIN = {
    "quantize": _BuiltinKind("llmopt.quant.api", "QuantizeArgs", "quantize", produces_model=True, evaluates=False),
    "distill": _BuiltinKind("llmopt.distill.api", "DistillArgs", "distill", produces_model=True, evaluates=False),
    "eval": _BuiltinKind("llmopt.evaluate.api", "EvalArgs", "evaluate", produces_model=False, evaluates=True),
}


def register(kind: StepKind) -> None:
    _KINDS[kind.name] = kind


def unregister(name: str) -> None:
    _KINDS.pop(name, None)


def kinds() -> dict[str, StepKind]:
    """Every usable step kind, the built-in ones imported on first call."""
    for name, b in _BUILTIN.items():
        if name not in _KINDS:
            mod = importlib.import_module(b.module)
            register(StepKind(name, getattr(mod, b.args), getattr(mod, b.run), b.produces_model, b.evaluates))
    return dict(_KINDS)
