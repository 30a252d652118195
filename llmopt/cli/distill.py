"""`llmopt distill`: parse options into DistillArgs, call llmopt.distill.api.distill, render the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli.console import err
from llmopt.cli.console import out as stdout
from llmopt.cli.options import (
    ChatTemplate,
    Device,
    Json,
    Out,
    Overwrite,
    Seed,
    SeqLen,
    Split,
    TextField,
    TrustRemoteCode,
)
from llmopt.progress import Event

_T = "Teacher & student"
_D = "Data"
_L = "Loss"
_O = "Optimisation"
_R = "Checkpoints & output"


def distill(
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher: hub id, local dir or builtin:tiny.",
                                         rich_help_panel=_T)],
    out: Out,
    student: Annotated[str | None, typer.Option("--student", help="Student: an existing model (same tokenizer) or "
                                                "builtin:tiny-student.", rich_help_panel=_T)] = None,
    student_layers: Annotated[int | None, typer.Option("--student-layers", help="Student = N evenly spaced teacher "
                                                       "layers, weights copied.", rich_help_panel=_T)] = None,
    student_config: Annotated[Path | None, typer.Option("--student-config", help="Student = random init from an HF "
                                                        "config.json.", rich_help_panel=_T)] = None,
    data: Annotated[str, typer.Option("--data", help="Training text: builtin, wikitext2, c4, pileval, a hub id or a "
                                      "path.", rich_help_panel=_D)] = "builtin",
    split: Split = None,
    text_field: TextField = "text",
    chat_template: ChatTemplate = False,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out text for perplexity (default: "
                                                  "--data's test split).", rich_help_panel=_D)] = None,
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Held-out windows for perplexity.",
                                              rich_help_panel=_D)] = 32,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.", rich_help_panel=_O)] = 150,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per micro-batch per process.",
                                            rich_help_panel=_O)] = 8,
    seq_len: SeqLen = 128,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.",
                                            rich_help_panel=_O)] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate.", rich_help_panel=_O)] = 1e-3,
    warmup: Annotated[int, typer.Option("--warmup", help="Linear warm-up steps before the cosine decay.",
                                        rich_help_panel=_O)] = 10,
    weight_decay: Annotated[float, typer.Option("--weight-decay", rich_help_panel=_O)] = 0.01,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping (0: off).",
                                                 rich_help_panel=_O)] = 1.0,
    loss: Annotated[str, typer.Option("--loss", help="forward_kl, reverse_kl or jsd.", rich_help_panel=_L)] =
    "forward_kl",
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature T (loss × T²).",
                                               rich_help_panel=_L)] = 1.0,
    beta: Annotated[float, typer.Option("--beta", help="JSD mixture weight β in (0, 1).", rich_help_panel=_L)] = 0.5,
    alpha: Annotated[float, typer.Option("--alpha", help="KD weight; the data cross-entropy gets 1 − alpha.",
                                         rich_help_panel=_L)] = 0.5,
    hidden_weight: Annotated[float, typer.Option("--hidden-weight", help="Weight of the hidden-state loss (0: off).",
                                                 rich_help_panel=_L)] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Distil only the teacher's top-k tokens + a rest bucket "
                                       "(0: full vocabulary).", rich_help_panel=_L)] = 0,
    on_policy_ratio: Annotated[float, typer.Option("--on-policy-ratio", help="Fraction of batches sampled from the "
                                                   "student and scored by the teacher.", rich_help_panel=_L)] = 0.0,
    on_policy_tokens: Annotated[int | None, typer.Option("--on-policy-tokens", help="Tokens sampled after a data "
                                                         "prefix (default: half of --seq-len).",
                                                         rich_help_panel=_L)] = None,
    sample_temperature: Annotated[float, typer.Option("--sample-temperature", help="Temperature of on-policy "
                                                      "sampling.", rich_help_panel=_L)] = 1.0,
    compare_scratch: Annotated[bool, typer.Option("--compare-scratch", help="Also train the student from random "
                                                  "init on the data for the same steps.", rich_help_panel=_R)] = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps (0: never).",
                                            rich_help_panel=_R)] = 0,
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir", help="Where checkpoints go (default: "
                                                        "<out>.ckpt).", rich_help_panel=_R)] = None,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Keep the step checkpoints after a "
                                                   "finished run (default: deleted).", rich_help_panel=_R)] = False,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue from a checkpoint dir (step-N, or the "
                                                "checkpoint folder for its newest).", rich_help_panel=_R)] = None,
    device: Device = "auto",
    teacher_dtype: Annotated[str, typer.Option("--teacher-dtype", help="Teacher precision: auto (bf16 on CUDA, fp32 "
                                               "on CPU), float32, bfloat16, float16.")] = "auto",
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="Student autocast: auto (bf16 on CUDA), "
                                                 "no, bf16, fp16.")] = "auto",
    seed: Seed = 0,
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Distil a teacher into a smaller student (KD losses, on-policy samples, checkpoints, resume)."""
    from llmopt.distill.api import DistillArgs
    from llmopt.distill.api import distill as run_distill

    args = DistillArgs(
        teacher=teacher, out=out, student=student, student_layers=student_layers, student_config=student_config,
        data=data, split=split, text_field=text_field, chat_template=chat_template, eval_data=eval_data,
        eval_samples=eval_samples, steps=steps, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr,
        warmup=warmup, weight_decay=weight_decay, max_grad_norm=max_grad_norm, loss=loss, temperature=temperature,
        beta=beta, alpha=alpha, hidden_weight=hidden_weight, top_k=top_k, on_policy_ratio=on_policy_ratio,
        on_policy_tokens=on_policy_tokens, sample_temperature=sample_temperature, compare_scratch=compare_scratch,
        save_every=save_every, checkpoint_dir=checkpoint_dir, keep_checkpoints=keep_checkpoints, resume=resume,
        device=device, teacher_dtype=teacher_dtype, mixed_precision=mixed_precision, seed=seed,
        trust_remote_code=trust_remote_code, overwrite=overwrite)
    with _ProgressView() as view:
        result = run_distill(args, progress=view.update)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one process reports
        return
    if as_json:
        stdout.print_json(json.dumps(result.to_dict()))
        return
    _render(result)


class _ProgressView:
    """Rich progress on stderr: one bar per training run with step, loss parts, tokens/s and ETA."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=err, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> _ProgressView:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, event: Event) -> None:
        """A status line (event.message) or a training step (task = the run, fields = its losses and speed)."""
        if event.message is not None:
            self.bar.console.print(f"[dim]{event.message}[/]")
        if event.done is None:
            return
        f = event.fields
        if event.task not in self.tasks:
            self.tasks[event.task] = self.bar.add_task(event.task, total=event.total, completed=event.done - 1,
                                                       info="")
        parts = [f"loss {f['loss']:.3f}"] + [f"{k} {f[key]:.3f}" for k, key in (("kd", "kd"), ("ce", "ce"),
                                                                              ("hid", "hidden")) if f.get(key)]
        info = " ".join(parts) + f" {'on-pol ' if f.get('on_policy') else ''}{f['tokens_per_s']:,.0f} tok/s"
        self.bar.update(self.tasks[event.task], completed=event.done, info=info)


def _render(result) -> None:
    from rich.table import Table

    m = result.metrics
    t = Table(title=f"llmopt distill → {result.out}", title_justify="left")
    t.add_column("model")
    t.add_column("held-out ppl", justify="right")
    rows = [("teacher", "teacher_ppl"), ("student before KD", "student_init_ppl"), ("student after KD", "student_ppl"),
            ("scratch (same steps, no teacher)", "scratch_ppl")]
    for label, key in rows:
        if key in m:
            t.add_row(label, f"{m[key]:.2f}")
    stdout.print(t)
    s = result.student
    layers = f"{s['num_layers']} layer{'s' if s['num_layers'] != 1 else ''}"
    line = (f"student: {s['kind']} ({layers}, {s['params'] / 1e6:.2f}M params) · {result.steps} steps"
            f" · {result.tokens:,} tokens · {result.tokens_per_s:,.0f} tok/s · {result.seconds:.1f}s")
    if result.resumed_from:
        line += f" · resumed from step {result.resumed_from}"
    stdout.print(line)
    if "scratch_gap_closed" in m:
        stdout.print(f"distillation closes {100 * m['scratch_gap_closed']:.0f}% of the scratch→teacher "
                     f"perplexity gap")
    stdout.print(f"loss curve: {result.files.get('curve_csv')}, {result.files.get('curve_png')}")
