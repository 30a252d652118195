"""Fake step kinds for runner tests: fast, deterministic, and shaped like the real commands' contract.

A fake "model" is a folder holding lineage.txt (what was done to which base model); fake eval metrics are a
pure function of that lineage, so a resumed run must reproduce an uninterrupted one exactly.
Every core call is appended to $FAKE_CALL_LOG; $FAKE_SLOW names steps (by out dir name) that sleep 60 s.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmopt.progress import Event
from llmopt.errors import LlmoptError
from llmopt.recipes.steps import StepKind, register, unregister
from llmopt.utils import atomic_dir


def _log_call(kind: str, out: Path | None, extra: str = "") -> None:
    path = os.environ.get("FAKE_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{kind} {out.parent.name if out else '-'} {extra}".rstrip() + "\n")


def _maybe_slow(out: Path) -> None:
    if out.parent.name in os.environ.get("FAKE_SLOW", "").split(","):
        time.sleep(60)


def lineage(model: str) -> str:
    p = Path(model) / "lineage.txt"
    return p.read_text() if p.is_file() else model


@dataclass(slots=True)
class Result:
    data: dict

    def to_dict(self) -> dict:
        return self.data


@dataclass(slots=True)
class FakeQuantizeArgs:
    model: str
    out: Path | None = None
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise LlmoptError(f"--bits {self.bits} is not supported: use 4 or 8")


def fake_quantize(args: FakeQuantizeArgs, progress=None) -> Result:
    _log_call("quantize", args.out)
    with atomic_dir(args.out, args.overwrite) as tmp:
        (tmp / "lineage.txt").write_text(f"{lineage(args.model)}|{args.method}{args.bits}")
        _maybe_slow(args.out)  # killed here: the atomic dir must leave only a temp folder behind
    return Result({"out": str(args.out), "metrics": {"bits": args.bits}})


@dataclass(slots=True)
class FakeDistillArgs:
    teacher: str
    out: Path
    student_layers: int = 2
    steps: int = 6
    save_every: int = 0
    checkpoint_dir: Path | None = None
    resume: Path | None = None
    overwrite: bool = False


def fake_distill(args: FakeDistillArgs, progress=None) -> Result:
    """'Trains' step by step, checkpointing every save_every steps; resumes from the newest checkpoint."""
    start = 0
    if args.resume is not None:
        ckpts = sorted(Path(args.resume).glob("step-*"))
        if not ckpts:
            raise LlmoptError(f"{args.resume} holds no step-* checkpoints to resume from")
        start = int(json.loads((ckpts[-1] / "state.json").read_text())["step"])
    _log_call("distill", args.out, f"from={start}")
    for step in range(start + 1, args.steps + 1):
        if progress is not None:
            progress(Event("fake_distill", step, args.steps, message=f"step {step}"))
        if args.save_every and step % args.save_every == 0:
            ckpt = Path(args.checkpoint_dir) / f"step-{step:06d}"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "state.tmp").write_text(json.dumps({"step": step}))
            os.replace(ckpt / "state.tmp", ckpt / "state.json")  # atomic, like a real checkpoint
        if step == args.steps // 2 + 1:
            _maybe_slow(args.out)
    with atomic_dir(args.out, args.overwrite) as tmp:
        (tmp / "lineage.txt").write_text(f"{lineage(args.teacher)}|kd{args.student_layers}")
    return Result({"out": str(args.out), "metrics": {"student_ppl": 12.0 + args.student_layers, "resumed_from": start}})


@dataclass(slots=True)
class FakeEvalArgs:
    models: list[str]
    baseline: str | None = None
    draft: str | None = None
    tasks: list[str] = field(default_factory=list)
    num_requests: int = 4
    json: Path | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise LlmoptError("give at least one model")


def metrics_of(line: str, base: str | None) -> dict:
    q4, q8, kd = line.count("4"), line.count("8"), line.count("kd")
    ppl = 10.0 * (1 + 0.02 * q4 + 0.002 * q8 + 0.1 * kd)
    kld = None if base is None else abs(ppl - 10.0 * (1 + 0.02 * lineage(base).count("4"))) / 100
    tok_s = 100.0 * (1 + 0.5 * q4 + 0.2 * q8 + 0.8 * kd)
    return {"model": None,
            "quality": {"perplexity": ppl, "kld_mean": kld, "kld_p99": None if kld is None else 3 * kld,
                        "top1_agreement": None if kld is None else 1 - kld, "tasks": {"cloze": {"acc": 0.5 - kld if kld else 0.5}}},
            "perf": {"output_tokens_per_s": tok_s, "total_tokens_per_s": 2 * tok_s, "requests_per_s": tok_s / 50,
                     "ttft_ms": {"mean": 5.0, "p50": 5.0, "p95": 6.0, "p99": 7.0},
                     "tpot_ms": {"mean": 1000 / tok_s, "p50": 1000 / tok_s, "p95": 1100 / tok_s, "p99": 1200 / tok_s}},
            "memory": {"weight_bytes": 4e6 / (1 + q4 + 0.5 * q8), "kv_bytes_allocated": 1024, "kv_bytes_formula": 1000,
                       "kv_waste_bytes": 24}}


def fake_evaluate(args: FakeEvalArgs, progress=None) -> Result:
    _log_call("eval", args.json, ",".join(Path(m).parent.name or m for m in args.models))
    results = []
    for model in args.models:
        entry = metrics_of(lineage(model), args.baseline)
        entry["model"] = model
        if args.draft is not None:
            entry["speculative"] = {"acceptance_rate": 0.75, "draft": args.draft}
        results.append(entry)
    return Result({"results": results, "baseline": args.baseline})


KINDS = [StepKind("fake_quantize", FakeQuantizeArgs, fake_quantize, produces_model=True),
         StepKind("fake_distill", FakeDistillArgs, fake_distill, produces_model=True),
         StepKind("fake_eval", FakeEvalArgs, fake_evaluate, produces_model=False, evaluates=True)]


def register_fakes() -> None:
    for kind in KINDS:
        register(kind)


def unregister_fakes() -> None:
    for kind in KINDS:
        unregister(kind.name)
