"""Run a planned recipe: steps in dependency order, skipping those already done with the same config and inputs.

Each step writes OUTPUTS/STEP/: `attempt.json` when it starts, its artifacts (the checkpoint in `model/`), and
`step.json` last — the resolved config, the hash of config + inputs, the timing and the result. A step is done
when its step.json holds the hash the plan computes now, so after a crash or kill -9 a re-run skips finished
steps and re-does the interrupted one (from its own checkpoint when its kind can resume). A step's hash covers
its kind, its resolved options, the hashes of the steps it reads, the local files it names (the bytes of files up
to 16 MiB, such as a --prompts set; size and mtime of larger ones),
and the llmopt version, so changing one step (or --set) re-runs it and everything downstream, nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmopt import __version__
from llmopt.errors import LlmoptError
from llmopt.progress import Event, Progress
from llmopt.recipes.gates import GateResult, evaluate_gate, flatten_result
from llmopt.recipes.plan import Recipe, PlannedStep
from llmopt.utils import sha256_json, write_json

STEP_FILE = "step.json"
ATTEMPT_FILE = "attempt.json"


@dataclass(slots=True)
class StepRecord:
    name: str
    kind: str
    status: str  # "ran" or "skipped" (done earlier with the same hash)
    seconds: float  # of the run that produced the result
    hash: str
    result: dict


@dataclass(slots=True)
class ModelResult:
    """One evaluated model, by the name gates use."""

    name: str
    step: str
    model: str
    metrics: dict[str, float | None]  # flat: perplexity, kld_mean, tpot_p95_ms, ...
    raw: dict  # the eval report's entry as written
    baseline: bool  # the baseline of its eval step (KLD is measured against it)


@dataclass(slots=True)
class RunReport:
    recipe: str
    file: str
    outputs: Path
    steps: list[StepRecord]
    results: list[ModelResult]
    gates: list[GateResult]
    wall_s: float

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def step_hashes(recipe: Recipe) -> dict[str, str]:
    """Hash of every step's kind, config and inputs (upstream hashes, local files), computed before running."""
    hashes: dict[str, str] = {}
    outputs = recipe.outputs.resolve()
    for step in recipe.steps:  # dependencies come first
        hashes[step.name] = sha256_json({
            "kind": step.kind.name, "config": step.config, "inputs": {d: hashes[d] for d in step.deps},
            "files": _fingerprints(step.config, outputs), "llmopt": __version__})
    return hashes


def done_record(step: PlannedStep, hash_: str) -> dict | None:
    """The step's saved record when it finished with this hash and its output is still there."""
    record = _read_json(step.dir / STEP_FILE)
    if record is None or record.get("hash") != hash_:
        return None
    if step.kind.produces_model and not step.out.is_dir():
        return None
    return record


def run_recipe(recipe: Recipe, log: Callable[[str], None] = lambda s: None, progress: bool = True) -> RunReport:
    """Run (or skip) every step, then evaluate the gates. Raises the first failing step's error."""
    start = time.perf_counter()
    hashes = step_hashes(recipe)
    recipe.outputs.mkdir(parents=True, exist_ok=True)
    with _lock(recipe.outputs):
        records = _run_steps(recipe, hashes, log, progress)
    results = collect_results(recipe, records)
    metrics = {r.name: r.metrics for r in results}
    gate_results = [evaluate_gate(pg.gate, metrics) for pg in recipe.gates]
    return RunReport(recipe.name, recipe.file, recipe.outputs, [records[s.name] for s in recipe.steps],
                     results, gate_results, time.perf_counter() - start)


def _run_steps(recipe: Recipe, hashes: dict[str, str], log: Callable[[str], None],
               progress: bool) -> dict[str, StepRecord]:
    records: dict[str, StepRecord] = {}
    n = len(recipe.steps)
    log(f"recipe {recipe.name}: {n} steps → {recipe.outputs} (finished steps with unchanged config and inputs "
        "are skipped; delete a step's folder to redo it)")
    for i, step in enumerate(recipe.steps, 1):
        saved = done_record(step, hashes[step.name])
        if saved is not None:
            log(f"[{i}/{n}] {step.name} ({step.kind.name}): unchanged since {saved.get('finished', '?')}, skipped")
            records[step.name] = StepRecord(step.name, step.kind.name, "skipped", saved["seconds"],
                                            saved["hash"], saved["result"])
            continue
        log(f"[{i}/{n}] {step.name} ({step.kind.name}) ...")
        records[step.name] = _execute(step, hashes, log, progress)
        log(f"[{i}/{n}] {step.name} done in {records[step.name].seconds:.1f} s")
    return records


@contextlib.contextmanager
def _lock(outputs: Path) -> Iterator[None]:
    """One run per outputs folder at a time (a second would delete the first's half-done steps).

    An OS lock, so a killed run never leaves a stale one behind."""
    with open(outputs / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LlmoptError(f"another llmopt run is using {outputs}: wait for it, or give --outputs another folder") from None
        yield


def _execute(step: PlannedStep, hashes: dict[str, str], log: Callable[[str], None], progress: bool) -> StepRecord:
    hash_ = hashes[step.name]
    attempt = _read_json(step.dir / ATTEMPT_FILE)
    resumable = ("resume" in step.kind.managed and attempt is not None and attempt.get("hash") == hash_
                 and step.checkpoints.is_dir() and any(step.checkpoints.iterdir()))
    if not resumable:
        _fresh_dir(step, hash_)
    start = time.perf_counter()
    try:
        if resumable:
            log(f"{step.name}: resuming from {step.checkpoints}")
            try:
                result = _call(step, _resume_args(step), log, progress)
            except LlmoptError as e:  # a damaged checkpoint must not block the recipe forever
                log(f"{step.name}: cannot resume ({e}); starting the step afresh")
                _fresh_dir(step, hash_)
                start = time.perf_counter()
                result = _call(step, step.args, log, progress)
        else:
            result = _call(step, step.args, log, progress)
    except LlmoptError as e:
        raise type(e)(f"step {step.name} ({step.kind.name}) failed: {e}") from e
    seconds = time.perf_counter() - start
    result_dict = result.to_dict() if hasattr(result, "to_dict") else dict(result or {})
    write_json(step.dir / STEP_FILE, {
        "step": step.name, "kind": step.kind.name, "hash": hash_, "config": step.config,
        "inputs": {d: hashes[d] for d in step.deps}, "seconds": seconds, "finished": _now(),
        "llmopt": __version__, "result": result_dict})
    (step.dir / ATTEMPT_FILE).unlink(missing_ok=True)
    return StepRecord(step.name, step.kind.name, "ran", seconds, hash_, result_dict)


def _fresh_dir(step: PlannedStep, hash_: str) -> None:
    """Remove what an earlier (stale or killed) attempt left, then mark this attempt's start."""
    if step.dir.exists():
        shutil.rmtree(step.dir)
    step.dir.mkdir(parents=True)
    write_json(step.dir / ATTEMPT_FILE, {"hash": hash_, "started": _now()})


def _resume_args(step: PlannedStep) -> Any:
    """The step's args with resume set to the checkpoint folder to resume from."""
    return dataclasses.replace(step.args, resume=step.checkpoints)


def _call(step: PlannedStep, args: Any, log: Callable[[str], None], progress: bool) -> Any:
    """Call the core function: every step kind is run(args, progress=Progress | None) (llmopt/progress.py)."""
    return step.kind.run(args, progress=_status_printer(step.name, log) if progress else None)


def _status_printer(name: str, log: Callable[[str], None], every_s: float = 10.0) -> Progress:
    """Events as log lines: messages as they come, counts every few seconds (and the last of each task)."""
    last: dict[str, float] = {}

    def status(event: Event) -> None:
        if event.message is not None:
            log(f"{name}: {event.message}")
        if event.done is None:
            return
        now = time.perf_counter()
        if now - last.get(event.task, -every_s) < every_s and event.done != event.total:
            return
        last[event.task] = now
        loss, eta = event.fields.get("loss"), event.fields.get("eta_s")
        log(f"{name}: {event.task} {event.done}/{event.total if event.total is not None else '?'}"
            + (f"  loss {loss:.4f}" if isinstance(loss, float) else "")
            + (f"  ETA {eta:.0f} s" if isinstance(eta, (int, float)) else ""))

    return status


def collect_results(recipe: Recipe, records: dict[str, StepRecord]) -> list[ModelResult]:
    """Every eval step's per-model entries, named as the recipe names them."""
    out: list[ModelResult] = []
    for step in recipe.steps:
        if not step.kind.evaluates:
            continue
        baseline = step.config.get("baseline")
        for entry in records[step.name].result.get("results") or []:
            model = str(entry.get("model"))
            name = _model_name(model, step.model_names)
            is_base = baseline is not None and name == _model_name(str(baseline), step.model_names)
            out.append(ModelResult(name, step.name, model, flatten_result(entry), entry, is_base))
    return out


def _model_name(model: str, names: dict[str, str]) -> str:
    if model in names:
        return names[model]
    resolved = _resolve(model)
    for candidate, name in names.items():  # the eval may report a resolved path
        if _resolve(candidate) == resolved:
            return name
    return model


def _resolve(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return path


def _fingerprints(config: dict, outputs: Path) -> dict[str, list]:
    """Size and mtime of local files the config names (a user's checkpoint, a data file).

    Files under the outputs folder are left out: step outputs enter through their steps' hashes."""
    found: dict[str, list] = {}
    for value in _strings(config):
        if not value.strip() or "\n" in value or len(value) > 4096:
            continue
        p = Path(value)
        try:
            if not p.exists() or p.resolve().is_relative_to(outputs):
                continue
            if p.is_file():
                found[value] = [[p.name, *_fingerprint(p)]]
            elif p.is_dir():
                found[value] = sorted([str(f.relative_to(p)), *_fingerprint(f)]
                                      for f in p.rglob("*") if f.is_file() and not f.resolve().is_relative_to(outputs))
        except OSError:
            continue
    return found


_CONTENT_HASH_MAX = 16 << 20  # files up to this size are hashed by content (prompt sets, data files), larger
#                               ones (weights) by size and mtime, which a re-download or edit changes


def _fingerprint(f: Path) -> list:
    """[size, sha256 of the bytes] for a small file, [size, mtime_ns] for a large one."""
    st = f.stat()
    if st.st_size <= _CONTENT_HASH_MAX:
        return [st.st_size, hashlib.sha256(f.read_bytes()).hexdigest()]
    return [st.st_size, st.st_mtime_ns]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
