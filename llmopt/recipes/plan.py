"""Recipe schema: validate a recipe document and resolve it into an ordered plan of steps, before anything runs.

A recipe (YAML):

    name: quickstart                 # default: the file name
    outputs: runs/quickstart         # default: runs/NAME; every step writes OUTPUTS/STEP/
    vars: {base: builtin:tiny}       # values used as ${vars.base}; change one with --set vars.base=...
    defaults: {device: auto, seed: 0}   # applied to every step kind that has the option
    steps:
      gptq4: {kind: quantize, model: "${vars.base}", method: gptq, bits: 4}
      compare:
        kind: eval
        baseline: float              # a key of model:, or a model
        model: {float: "${vars.base}", gptq4: "${steps.gptq4.out}"}   # NAME: model; gates use the names
    gates:
      - gptq4.kld_mean < 0.02        # see llmopt.recipes.gates

A step's options are the fields of its kind's Args dataclass (the CLI long options with `-` → `_`); `out`,
`overwrite` and the like are set by the runner. `${steps.NAME.out}` is the checkpoint written by step NAME and
makes this step depend on it. Every error names the file, line and key.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.errors import LlmoptError
from llmopt.recipes import gates as gates_mod
from llmopt.recipes.source import KeyPath, Source, apply_set, load_source
from llmopt.recipes.steps import StepKind, kinds

TOP_KEYS = ("name", "description", "outputs", "vars", "defaults", "steps", "gates")
_NAME = re.compile(r"[A-Za-z_]\w*")
_REF = re.compile(r"\$\{([^}]*)\}")
BASELINE_NAME = "baseline"


def step_out(outputs: Path, name: str) -> Path:
    """Where step NAME writes its checkpoint: what ${steps.NAME.out} stands for."""
    return outputs / name / "model"


@dataclass(slots=True)
class PlannedStep:
    """One resolved step: its options after defaults, --set and ${...} references, and its Args."""

    name: str
    kind: StepKind
    config: dict[str, Any]  # resolved options as given to Args (JSON-ready): saved and hashed
    args: Any  # kind.args instance
    deps: list[str]  # steps whose output this one reads
    dir: Path  # OUTPUTS/NAME
    where: str  # file:line of the step
    model_names: dict[str, str] = field(default_factory=dict)  # eval steps: model argument → result name
    tasks: set[str] | None = None  # eval steps: the tasks it scores

    @property
    def out(self) -> Path:
        """The checkpoint this step writes (model-producing kinds)."""
        return step_out(self.dir.parent, self.name)

    @property
    def checkpoints(self) -> Path:
        """Where a resumable kind keeps its intermediate checkpoints (its checkpoint_dir)."""
        return self.dir / "checkpoints"


@dataclass(slots=True)
class PlannedGate:
    gate: gates_mod.Gate
    where: str


@dataclass(slots=True)
class Recipe:
    name: str
    file: str
    description: str
    outputs: Path
    steps: list[PlannedStep]  # in run order (dependencies first, else recipe order)
    gates: list[PlannedGate]

    def step(self, name: str) -> PlannedStep:
        return next(s for s in self.steps if s.name == name)


def load_recipe(path: Path, sets: list[str] | tuple[str, ...] = (), outputs: Path | None = None) -> Recipe:
    """Read, override (--set, then --outputs) and validate a recipe; raise LlmoptError naming file:line: key."""
    source = load_source(Path(path))
    apply_set(source, list(sets))
    if outputs is not None:
        source.data["outputs"] = str(outputs)
        source.where_map[("outputs",)] = f"--outputs {outputs}"
    return build_recipe(source)


def build_recipe(src: Source) -> Recipe:
    data = src.data
    for key in data:
        if key not in TOP_KEYS:
            raise src.error((key,), f"unknown key: a recipe has {', '.join(TOP_KEYS)}")
    name = data.get("name", Path(src.file).stem)
    _expect(src, ("name",), name, str)
    description = data.get("description") or ""
    _expect(src, ("description",), description, str)
    outputs = data.get("outputs", f"runs/{name}")
    _expect(src, ("outputs",), outputs, str)
    variables = data.get("vars") or {}
    _expect(src, ("vars",), variables, dict)
    for key, value in variables.items():
        _check_name(src, ("vars", key), key, "variable")
        if isinstance(value, (dict, list)):
            raise src.error(("vars", key), "a variable holds one value (text, number or true/false)")
    defaults = data.get("defaults") or {}
    _expect(src, ("defaults",), defaults, dict)
    steps_data = data.get("steps")
    if not isinstance(steps_data, dict) or not steps_data:
        raise src.error(("steps",), "a recipe needs a `steps:` mapping of NAME: {kind: quantize|distill|eval, ...}")

    known = kinds()
    every_option = {o for k in known.values() for o in k.options}
    for key in defaults:
        if key not in every_option:
            raise src.error(("defaults", key), f"unknown option: no step kind has it (options: {', '.join(sorted(every_option))})")

    step_kinds = {sname: _step_kind(src, sname, body, known) for sname, body in steps_data.items()}
    ctx = _Context(src, variables, step_kinds, Path(outputs))
    steps = [_build_step(ctx, sname, steps_data[sname], step_kinds[sname], defaults) for sname in steps_data]
    ordered = _order(src, steps)
    names = _result_names(src, ordered)
    gate_list = data.get("gates") or []
    _expect(src, ("gates",), gate_list, list)
    planned = [_plan_gate(src, ("gates", i), text, names) for i, text in enumerate(gate_list)]
    return Recipe(name, src.file, description, Path(outputs), ordered, planned)


@dataclass(slots=True)
class _Context:
    src: Source
    variables: dict[str, Any]
    step_kinds: dict[str, StepKind]
    outputs: Path


def _step_kind(src: Source, sname: str, body: Any, known: dict[str, StepKind]) -> StepKind:
    path: KeyPath = ("steps", sname)
    _check_name(src, path, sname, "step")
    if not isinstance(body, dict):
        raise src.error(path, "a step is a mapping: {kind: quantize|distill|eval, OPTION: VALUE, ...}")
    kind = body.get("kind")
    if kind is None:
        raise src.error(path, f"missing `kind:` (one of {', '.join(sorted(known))})")
    if not isinstance(kind, str) or kind not in known:
        raise src.error(path + ("kind",), f"unknown step kind {kind!r}: use one of {', '.join(sorted(known))}")
    return known[kind]


def _build_step(ctx: _Context, sname: str, body: dict, kind: StepKind, defaults: dict) -> PlannedStep:
    src, path = ctx.src, ("steps", sname)
    options = {k: v for k, v in body.items() if k != "kind"}
    for key in options:
        if key in kind.managed:
            raise src.error(path + (key,), f"{key!r} is set by the runner (each step writes {ctx.outputs}/{sname}/)")
        if key not in kind.options:
            raise src.error(path + (key,), f"unknown option for a {kind.name} step (options: {', '.join(kind.options)})")
    # Each value remembers where it came from, for error messages.
    origin: dict[str, KeyPath] = {k: ("defaults", k) for k in defaults if k in kind.options and k not in options}
    origin.update({k: path + (k,) for k in options})
    raw = {k: copy.deepcopy(defaults[k]) for k in defaults if k in kind.options} | copy.deepcopy(options)

    model_names: dict[str, str] = {}
    if kind.models_field:
        raw, model_names = _name_models(ctx, path, kind, raw)
    deps: list[str] = []
    config = {k: _interpolate(ctx, origin[k], v, sname, deps) for k, v in raw.items()}
    hints = typing.get_type_hints(kind.args)
    for key, value in config.items():
        config[key] = _coerce(src, origin[key], value, hints.get(key, Any))
    step_dir = ctx.outputs / sname
    managed = _managed_values(kind, step_dir)
    try:
        args = kind.args(**{**config, **managed})
    except LlmoptError as e:
        raise src.error(path, str(e)) from None
    except TypeError as e:  # a required option is missing
        missing = [f for f, fld in kind.fields.items() if f not in config and f not in managed
                   and fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING]
        if missing:
            raise src.error(path, f"missing option(s) for a {kind.name} step: {', '.join(missing)}") from None
        raise src.error(path, str(e)) from None
    tasks = set(_as_list(args.tasks)) if kind.evaluates and "tasks" in kind.fields else None
    return PlannedStep(sname, kind, _jsonable(config), args, list(dict.fromkeys(deps)), step_dir, src.where(path),
                {_interpolate(ctx, path, m, sname, []): n for m, n in model_names.items()}, tasks)


def _managed_values(kind: StepKind, step_dir: Path) -> dict[str, Any]:
    """What the runner sets (steps.RUNNER_FIELDS): the step's checkpoint dir, replaced on a re-run; its
    resumable checkpoints; eval report files in the step dir."""
    values: dict[str, Any] = {
        "out": step_out(step_dir.parent, step_dir.name) if kind.produces_model else step_dir,
        "overwrite": True,
        "checkpoint_dir": step_dir / "checkpoints",
        "resume": None,  # a fresh start; the runner passes the checkpoint folder to resume a killed step
        "json": step_dir / "eval.json",
        "csv": step_dir / "eval.csv",
        "plot": None,  # the recipe's report draws one plot over every eval step
    }
    return {name: values[name] for name in kind.managed}


def _name_models(ctx: _Context, path: KeyPath, kind: StepKind, raw: dict) -> tuple[dict, dict[str, str]]:
    """Eval steps: the models as {NAME: model} or a list (entries ${steps.X.out} are named X); baseline by NAME."""
    src, field_name = ctx.src, kind.models_field
    models = raw.get(field_name)
    names: dict[str, str] = {}  # raw model string → name
    if isinstance(models, dict):
        for name, model in models.items():
            _check_name(src, path + (field_name, name), name, "model")
            if not isinstance(model, str):
                raise src.error(path + (field_name, name), "a model is a hub id, a path, builtin:NAME or ${steps.NAME.out}")
            if model in names:
                raise src.error(path + (field_name, name), f"the same model is already listed as {names[model]!r}")
            names[model] = name
        raw[field_name] = list(models.values())
    elif isinstance(models, list):
        for model in models:
            m = _REF.fullmatch(model) if isinstance(model, str) else None
            if m and m.group(1).startswith("steps.") and m.group(1).endswith(".out"):
                names[model] = m.group(1)[len("steps."):-len(".out")]
    baseline = raw.get("baseline")
    if isinstance(baseline, str):
        by_name = {n: m for m, n in names.items()}
        if baseline in by_name:
            raw["baseline"] = by_name[baseline]
        elif baseline not in names:
            names[baseline] = BASELINE_NAME
    return raw, names


def _interpolate(ctx: _Context, path: KeyPath, value: Any, sname: str, deps: list[str]) -> Any:
    """Replace ${vars.X} and ${steps.X.out} (recording X as a dependency) inside strings, lists and mappings."""
    if isinstance(value, list):
        return [_interpolate(ctx, path + (i,), v, sname, deps) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _interpolate(ctx, path + (k,), v, sname, deps) for k, v in value.items()}
    if not isinstance(value, str) or "${" not in value:
        return value

    def resolve(ref: str) -> Any:
        parts = ref.strip().split(".")
        if len(parts) == 2 and parts[0] == "vars":
            if parts[1] not in ctx.variables:
                raise ctx.src.error(path, f"${{{ref}}}: no variable {parts[1]!r} under vars: "
                                          f"(vars: {', '.join(ctx.variables) or 'none'})")
            return ctx.variables[parts[1]]
        if len(parts) == 3 and parts[0] == "steps" and parts[2] == "out":
            target = parts[1]
            if target not in ctx.step_kinds:
                raise ctx.src.error(path, f"${{{ref}}}: no step named {target!r} (steps: {', '.join(ctx.step_kinds)})")
            if target == sname:
                raise ctx.src.error(path, f"${{{ref}}}: a step cannot use its own output (cycle {sname} → {sname})")
            if not ctx.step_kinds[target].produces_model:
                raise ctx.src.error(path, f"${{{ref}}}: step {target!r} is a {ctx.step_kinds[target].name} step "
                                          "and writes no model")
            deps.append(target)
            return str(step_out(ctx.outputs, target))
        raise ctx.src.error(path, f"unknown reference ${{{ref}}}: use ${{vars.NAME}} or ${{steps.NAME.out}}")

    whole = _REF.fullmatch(value)
    if whole:  # keep the variable's type (a number stays a number)
        return resolve(whole.group(1))
    return _REF.sub(lambda m: str(resolve(m.group(1))), value)


class _Mismatch(Exception):
    pass


def _coerce(src: Source, path: KeyPath, value: Any, hint: Any) -> Any:
    try:
        return _coerce_to(value, hint)
    except _Mismatch as e:
        raise src.error(path, f"expected {e}, got {value!r}") from None


def _coerce_to(value: Any, hint: Any) -> Any:
    """Check a YAML value against a field's annotation, converting only where YAML cannot spell the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce_to(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch(" or ".join(_type_name(a) for a in args))
    if origin is list or hint is list:
        if isinstance(value, (str, int, float)):
            value = [value]  # one item needs no brackets
        if not isinstance(value, list):
            raise _Mismatch(f"a list ({_type_name(hint)})")
        return [_coerce_to(v, args[0] if args else Any) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `inf` as text
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("text")
    if hint is Path:
        if isinstance(value, str):
            return Path(value)
        raise _Mismatch("a path")
    return value  # anything else: the Args' own validation decides


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _order(src: Source, steps: list[PlannedStep]) -> list[PlannedStep]:
    """Dependencies first, otherwise the recipe's order; a cycle is an error naming it."""
    by_name = {s.name: s for s in steps}
    done: dict[str, PlannedStep] = {}
    visiting: list[str] = []

    def visit(step: PlannedStep) -> None:
        if step.name in done:
            return
        if step.name in visiting:
            cycle = visiting[visiting.index(step.name):] + [step.name]
            raise src.error(("steps", step.name), f"steps form a cycle: {' → '.join(cycle)}")
        visiting.append(step.name)
        for dep in step.deps:
            visit(by_name[dep])
        visiting.pop()
        done[step.name] = step

    for step in steps:
        visit(step)
    return list(done.values())


def _result_names(src: Source, steps: list[PlannedStep]) -> dict[str, PlannedStep]:
    """Every model name gates may use → the eval step that reports it; names must be unique."""
    names: dict[str, PlannedStep] = {}
    for step in steps:
        for name in step.model_names.values():
            if name in names and names[name] is not step:
                raise src.error(("steps", step.name), f"model name {name!r} is also used by eval step "
                                f"{names[name].name!r}: give one of them another name in models:")
            names[name] = step
    return names


def _plan_gate(src: Source, path: KeyPath, text: Any, names: dict[str, PlannedStep]) -> PlannedGate:
    if not isinstance(text, str):
        raise src.error(path, "a gate is a string such as 'gptq4.kld_mean < 0.02'")
    try:
        gate = gates_mod.parse_gate(text)
    except LlmoptError as e:
        raise src.error(path, str(e)) from None
    for ref in gate.refs():
        if ref.name not in names:
            hint = f"; to check a metric write NAME.{ref.name}" if gates_mod.check_metric(ref.name, None) is None else ""
            raise src.error(path, f"gate {text!r}: {ref.name!r} is not an evaluated model "
                                  f"(names: {', '.join(names) or 'none: add an eval step'}){hint}")
        problem = gates_mod.check_metric(ref.metric, names[ref.name].tasks)
        if problem:
            raise src.error(path, f"gate {text!r}: {problem}")
    return PlannedGate(gate, src.where(path))


def _expect(src: Source, path: KeyPath, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        what = {str: "text", dict: "a mapping", list: "a list"}[kind]
        raise src.error(path, f"expected {what}, got {value!r}")


def _check_name(src: Source, path: KeyPath, name: Any, what: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise src.error(path, f"{what} name {name!r} must be letters, digits and _ (not starting with a digit), "
                              "so gates can refer to it")


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return [str(v) for v in value or []]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
