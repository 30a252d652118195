"""`distill(DistillArgs) -> DistillResult`: teacher + student + data → trained student checkpoint + metrics.

The one core function behind `llmopt distill` and the recipe runner. It prints nothing; progress goes to
an optional callback, results come back as a DistillResult and into the output's llmopt.json.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from llmopt.checkpoint.manifest import write_manifest
from llmopt.distill import losses
from llmopt.distill import student as students
from llmopt.distill.trainer import (
    LossSettings,
    StepLog,
    TrainSettings,
    find_checkpoint,
    remove_checkpoints,
    train,
    verify_checkpoint,
)
from llmopt.errors import LlmoptError
from llmopt.progress import Progress, emit
from llmopt.utils import (
    atomic_dir,
    check_out_dir,
    dtype_name,
    resolve_device,
    sha256_json,
)

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# Fields that do not change the training trajectory: a resume may differ in these.
_NOT_IN_RUN_KEY = {"out", "overwrite", "save_every", "checkpoint_dir", "resume", "compare_scratch", "eval_data",
                   "eval_samples", "keep_checkpoints"}



@dataclass(slots=True)
class DistillArgs:
    """Arguments of `llmopt distill`; field names are the CLI long options with - → _."""

    teacher: str
    out: Path
    student: str | None = None
    student_layers: int | None = None
    student_config: Path | None = None
    data: str = "builtin"
    split: str | None = None
    text_field: str = "text"
    chat_template: bool = False
    eval_data: str | None = None  # held-out text; default: --data's test split
    eval_samples: int = 32
    steps: int = 150
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.5
    hidden_weight: float = 0.0
    top_k: int = 0
    on_policy_ratio: float = 0.0
    on_policy_tokens: int | None = None  # default: half the window
    sample_temperature: float = 1.0
    compare_scratch: bool = False
    save_every: int = 0
    checkpoint_dir: Path | None = None  # default: <out>.ckpt beside --out
    keep_checkpoints: bool = False  # a finished run deletes its step checkpoints (two student copies each) unless set
    resume: Path | None = None
    device: str = "auto"
    teacher_dtype: str = "auto"
    mixed_precision: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.student_config = Path(self.student_config) if self.student_config is not None else None
        self.checkpoint_dir = Path(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        self.resume = Path(self.resume) if self.resume is not None else None
        self.loss = self.loss.replace("-", "_").lower()
        given = [n for n, v in (("--student", self.student), ("--student-layers", self.student_layers),
                                ("--student-config", self.student_config)) if v is not None]
        if len(given) != 1:
            raise LlmoptError(f"give exactly one of --student, --student-layers, --student-config (got "
                              f"{', '.join(given) or 'none'})")
        if self.student_layers is not None and self.student_layers < 1:
            raise LlmoptError(f"--student-layers must be at least 1 and fewer than the teacher's layers, got "
                              f"{self.student_layers}")
        if self.loss not in losses.DIVERGENCES:
            raise LlmoptError(f"unknown --loss {self.loss!r}: use forward_kl, reverse_kl or jsd")
        positive = {"--steps": self.steps, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--eval-samples": self.eval_samples, "--lr": self.lr, "--temperature": self.temperature,
                    "--sample-temperature": self.sample_temperature}
        for name, value in positive.items():
            if not value > 0:
                raise LlmoptError(f"{name} must be positive, got {value}")
        nonneg = {"--warmup": self.warmup, "--weight-decay": self.weight_decay, "--hidden-weight": self.hidden_weight,
                  "--max-grad-norm": self.max_grad_norm, "--top-k": self.top_k, "--save-every": self.save_every}
        for name, value in nonneg.items():
            if value < 0:
                raise LlmoptError(f"{name} must be ≥ 0, got {value}")
        if self.seq_len < 4:
            raise LlmoptError(f"--seq-len must be at least 4, got {self.seq_len}")
        if not 0.0 <= self.alpha <= 1.0:
            raise LlmoptError(f"--alpha is the KD weight in [0, 1] (CE gets 1 − alpha), got {self.alpha}")
        if not 0.0 < self.beta < 1.0:
            raise LlmoptError(f"--beta (JSD mixture weight) must be in (0, 1), got {self.beta}")
        if not 0.0 <= self.on_policy_ratio <= 1.0:
            raise LlmoptError(f"--on-policy-ratio is a fraction of batches in [0, 1], got {self.on_policy_ratio}")
        if self.on_policy_tokens is not None and not 0 < self.on_policy_tokens < self.seq_len:
            raise LlmoptError(f"--on-policy-tokens must be between 1 and --seq-len − 1 ({self.seq_len - 1}), got "
                              f"{self.on_policy_tokens}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise LlmoptError(f"unknown --mixed-precision {self.mixed_precision!r}: use {', '.join(MIXED_PRECISION)}")

    @property
    def sampled_tokens(self) -> int:
        return self.on_policy_tokens if self.on_policy_tokens is not None else self.seq_len // 2

    def to_dict(self) -> dict:
        return {f.name: (str(v) if isinstance(v, Path) else v) for f in fields(self) for v in [getattr(self, f.name)]}

    def run_key(self, num_processes: int) -> str:
        """Hash of everything that shapes the trajectory (a resume must match it)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_RUN_KEY}
        return sha256_json({**d, "num_processes": num_processes})[:16]


@dataclass(slots=True)
class DistillResult:
    out: Path
    metrics: dict[str, float]
    student: dict
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    resumed_from: int = 0
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def _accelerator(device: str, mixed_precision: str):
    from accelerate import Accelerator

    dev = resolve_device(device)
    if mixed_precision == "auto":
        mixed_precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision != "no" and dev.type != "cuda":
        raise LlmoptError(f"--mixed-precision {mixed_precision} needs a CUDA device: use --mixed-precision no on CPU")
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return Accelerator(cpu=dev.type == "cpu", mixed_precision=mixed_precision)


def _build_student(args: DistillArgs, teacher) -> students.Student:
    if args.student_layers is not None:
        return students.drop_layers(teacher, args.student_layers, args.seed)
    if args.student_config is not None:
        return students.from_config_file(args.student_config, args.seed)
    built = students.from_builtin_recipe(args.student, args.seed) if args.student.startswith("builtin:") else None
    return built or students.from_model(args.student, args.trust_remote_code)


def _windows(spec, tokenizer, seq_len: int, purpose: str) -> torch.Tensor:
    from llmopt.calibration import load_texts, token_stream
    from llmopt.models.builtin import windows

    wins = windows(token_stream(load_texts(spec, purpose), tokenizer, spec.chat_template), seq_len)  # [W, L]
    if wins.shape[0] == 0:
        raise LlmoptError(f"data {spec.source!r} ({purpose}) has fewer than --seq-len={seq_len} tokens: give more "
                          f"text or lower --seq-len")
    return wins


def _ppl(model, wins: torch.Tensor) -> float:
    from llmopt.evaluate.quality import measure_quality

    was_training = model.training
    model.eval()
    ppl = measure_quality(model, wins).perplexity
    model.train(was_training)
    return ppl


@dataclass(slots=True)
class _Setup:
    """What distill() has loaded before training: models, windows, where checkpoints go."""

    accelerator: Any
    teacher: Any  # models.LoadedModel
    student: Any  # distill.student.Student
    train_wins: torch.Tensor  # [N, L]
    eval_wins: torch.Tensor  # [M, L]
    eval_source: str
    run_key: str
    ckpt_root: Path


def distill(args: DistillArgs, progress: Progress | None = None) -> DistillResult:
    """Distil the teacher into the student; write the student checkpoint + llmopt.json + loss curve to args.out.
    Progress: a message Event per phase (task "distill") and one Event per training step (task = the run)."""
    t_start = time.perf_counter()
    setup = _setup(args, progress)
    accelerator, teacher, student, eval_wins = setup.accelerator, setup.teacher, setup.student, setup.eval_wins
    say = _sayer(progress, accelerator)
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        say("held-out perplexity of the teacher and the untrained student")
        metrics["teacher_ppl"] = _ppl(teacher.model, eval_wins)
        metrics["student_init_ppl"] = _ppl(student.model, eval_wins)
    n_teacher, n_student = students.num_layers(teacher.model), students.num_layers(student.model)
    settings = _train_settings(args, setup.run_key)
    trained, outcome = train(accelerator, student.model, teacher.model, setup.train_wins, settings, "distill",
                             students.hidden_layer_map(n_teacher, n_student), int(teacher.config.hidden_size),
                             setup.ckpt_root if args.save_every else None, args.resume, progress)
    curve: list[StepLog] = list(outcome.curve)
    if accelerator.is_main_process:
        say("held-out perplexity of the distilled student")
        metrics["student_ppl"] = _ppl(trained, eval_wins)
    if args.compare_scratch:
        curve += _compare_scratch(args, setup, settings, metrics, progress)
    result = DistillResult(args.out, metrics, student.describe(), args.steps, outcome.tokens,
                           time.perf_counter() - t_start, outcome.tokens_per_s, outcome.resumed_from)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write(args, setup, trained, result, outcome, curve, (n_teacher, n_student))
    return result


def _sayer(progress: Progress | None, accelerator) -> Callable[[str], None]:
    """A status line as an Event message, from the main process only."""
    def say(msg: str) -> None:
        if accelerator.is_main_process:
            emit(progress, "distill", message=msg)
    return say


def _setup(args: DistillArgs, progress: Progress | None) -> _Setup:
    """Checks that fail fast, then the teacher, the student and the train / held-out windows."""
    from accelerate.utils import set_seed

    from llmopt.calibration import DataSpec
    from llmopt.models import ModelSpec, check_seq_len, load_model

    check_out_dir(args.out, args.overwrite)  # before any work: fail fast, write nothing
    accelerator = _accelerator(args.device, args.mixed_precision)
    run_key = args.run_key(accelerator.num_processes)
    if args.resume is not None:  # a damaged or foreign checkpoint fails before any model is loaded
        verify_checkpoint(find_checkpoint(args.resume), run_key)
    set_seed(args.seed)
    _sayer(progress, accelerator)(f"loading teacher {args.teacher}")
    teacher = load_model(ModelSpec(args.teacher, device=str(accelerator.device), dtype=args.teacher_dtype,
                                   trust_remote_code=args.trust_remote_code))
    teacher.model.requires_grad_(False)
    student = _build_student(args, teacher.model)
    students.check_same_vocab(teacher.model, teacher.tokenizer, student)
    check_seq_len(teacher.model.config, "--seq-len", args.seq_len, f"the teacher {args.teacher}")
    check_seq_len(student.model.config, "--seq-len", args.seq_len, "the student")
    data_spec = DataSpec(args.data, args.split, args.text_field, args.chat_template)
    train_wins = _windows(data_spec, teacher.tokenizer, args.seq_len, "train")
    eval_spec = DataSpec(args.eval_data or args.data, None, args.text_field, args.chat_template)
    eval_wins = _windows(eval_spec, teacher.tokenizer, args.seq_len, "test")[:args.eval_samples]
    student.model.to(accelerator.device)
    ckpt_root = args.checkpoint_dir or args.out.parent / f"{args.out.name}.ckpt"
    return _Setup(accelerator, teacher, student, train_wins, eval_wins, eval_spec.source, run_key, ckpt_root)


def _train_settings(args: DistillArgs, run_key: str) -> TrainSettings:
    loss = LossSettings(args.loss, args.temperature, args.beta, args.alpha, args.hidden_weight, args.top_k)
    return TrainSettings(args.steps, args.batch_size, args.grad_accum, args.lr, args.warmup, args.weight_decay,
                         args.max_grad_norm, args.seed, loss, args.on_policy_ratio, args.sampled_tokens,
                         args.sample_temperature, args.save_every, run_key)


def _compare_scratch(args: DistillArgs, setup: _Setup, settings: TrainSettings, metrics: dict[str, float],
                     progress: Progress | None) -> list[StepLog]:
    """Same architecture and steps, random init, data cross-entropy only: what the teacher is worth. Adds
    scratch_ppl (and the share of the scratch→teacher gap the distilled student closes) to metrics."""
    scratch_settings = TrainSettings(**{**{f.name: getattr(settings, f.name) for f in fields(settings)},
                                        "loss": LossSettings(alpha=0.0), "on_policy_ratio": 0.0, "save_every": 0})
    scratch = students.fresh_copy(setup.student, args.seed).to(setup.accelerator.device)
    scratch, outcome = train(setup.accelerator, scratch, None, setup.train_wins, scratch_settings, "scratch",
                             progress=progress)
    if setup.accelerator.is_main_process:
        metrics["scratch_ppl"] = _ppl(scratch, setup.eval_wins)
        gap = metrics["scratch_ppl"] - metrics["teacher_ppl"]
        if gap > 0:
            metrics["scratch_gap_closed"] = (metrics["scratch_ppl"] - metrics["student_ppl"]) / gap
    return list(outcome.curve)


def _write(args: DistillArgs, setup: _Setup, trained, result: DistillResult, outcome, curve: list[StepLog],
           layers: tuple[int, int]) -> None:
    """The student checkpoint, llmopt.json and the loss curve, atomically; then the intermediate checkpoints go."""
    from llmopt.models import save_model

    accelerator, teacher, (n_teacher, n_student) = setup.accelerator, setup.teacher, layers
    with atomic_dir(args.out, args.overwrite) as tmp:
        save_model(trained, teacher.tokenizer, tmp)
        write_manifest(tmp, "distilled", {
            "distill": {"args": args.to_dict(), "teacher": {"path": str(teacher.path), "layers": n_teacher,
                                                             "dtype": dtype_name(teacher.dtype)},
                        "student": result.student, "hidden_layer_map": students.hidden_layer_map(
                            n_teacher, n_student) if args.hidden_weight else None,
                        "data": {"train_windows": int(setup.train_wins.shape[0]),
                                 "eval_windows": int(setup.eval_wins.shape[0]), "seq_len": args.seq_len,
                                 "eval_source": setup.eval_source},
                        "device": str(accelerator.device), "num_processes": accelerator.num_processes,
                        "mixed_precision": accelerator.mixed_precision, "resumed_from": outcome.resumed_from,
                        "tokens": outcome.tokens, "seconds": round(result.seconds, 2), "torch": torch.__version__},
            "metrics": result.metrics,
        })
        write_curve(tmp, curve)
    if args.save_every and not args.keep_checkpoints:
        remove_checkpoints(setup.ckpt_root)
    result.files = {"checkpoint": str(args.out), "curve_csv": str(args.out / "loss_curve.csv"),
                    "curve_png": str(args.out / "loss_curve.png")}


def write_curve(out: Path, curve: list[StepLog]) -> None:
    """loss_curve.csv (every step, every part) and loss_curve.png (Agg backend: no display needed)."""
    names = [f.name for f in fields(StepLog)]
    with open(out / "loss_curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for row in curve:
            w.writerow([getattr(row, n) for n in names])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in dict.fromkeys(r.run for r in curve):
        rows = [r for r in curve if r.run == run]
        steps = [r.step for r in rows]
        ax.plot(steps, [r.loss for r in rows], label=f"{run}: loss")
        if run == "distill":
            if any(r.kd for r in rows):
                ax.plot(steps, [r.kd for r in rows], label="distill: KD", alpha=0.7)
            if any(r.ce for r in rows):
                ax.plot(steps, [r.ce for r in rows], label="distill: CE", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    plt.close(fig)
