"""`llmopt verify CHECKPOINT --with transformers,gptqmodel,vllm`: do external loaders compute what llmopt does?"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from llmopt.cli import options as opt


def verify(
    checkpoint: Annotated[str, typer.Argument(help="A quantized checkpoint directory (compressed-tensors, GPTQ "
                                                   "or AWQ).")],
    with_: Annotated[str | None, typer.Option("--with", help="Comma-separated loaders: transformers, gptqmodel, "
                                              "auto-gptq, autoawq, vllm (default: every installed loader that "
                                              "reads the checkpoint's format).")] = None,
    data: Annotated[str, typer.Option("--data", help="Text the prompts are cut from.")] = "builtin",
    prompts: Annotated[int, typer.Option("--prompts", help="Number of prompts.")] = 4,
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Tokens per prompt.")] = 64,
    kld_tol: Annotated[float, typer.Option("--kld-tol", help="Largest mean KL(llmopt ‖ loader) that passes.")] = 1e-3,
    min_top1: Annotated[float, typer.Option("--min-top1", help="Smallest top-1 agreement on decided positions "
                                            "that passes.")] = 0.99,
    tie_margin: Annotated[float, typer.Option("--tie-margin", help="Logit gap between llmopt's top two below which "
                                              "a position is a near-tie (not counted in decided top-1).")] = 0.25,
    device: opt.Device = "auto",
    seed: opt.Seed = 0,
    backend_python: Annotated[str | None, typer.Option("--backend-python", help="Python of the loader's venv "
                                                       "(gptqmodel / auto-gptq / autoawq).")] = None,
    json_out: opt.Json = False,
) -> None:
    """Load CHECKPOINT in each external loader, run the same prompts as llmopt's runtime, compare the logits
    (max |Δ|, KL, top-1); exit 1 on a mismatch."""
    from llmopt.evaluate.verify import VerifyArgs, check
    from llmopt.evaluate.verify import verify as run_verify
    from llmopt.cli.console import err, out

    args = VerifyArgs(checkpoint=checkpoint, loaders=None if with_ is None else with_.split(","), data=data,
                      prompts=prompts, prompt_len=prompt_len, kld_tol=kld_tol, min_top1=min_top1, tie_margin=tie_margin,
                      device=device, seed=seed, backend_python=backend_python)
    result = run_verify(args, progress=None if json_out else (lambda name: err.print(f"running {name} …")))
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        out.print(table(result))
    check(result)


def table(result):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"{result.checkpoint} ({result.format}): {result.prompts} prompts × {result.prompt_len} tokens "
                    f"vs {result.reference}", title_justify="left")
    for col in ("loader", "max |Δlogit|", "mean KL", "max KL", "top-1", "top-1 decided", "time", "result", "how"):
        t.add_column(col, justify="left" if col in ("loader", "how", "result") else "right")
    for c in result.checks:
        t.add_row(c.loader, "—" if c.max_abs_diff is None else f"{c.max_abs_diff:.2e}", f"{c.kld_mean:.2e}",
                  f"{c.kld_max:.2e}", f"{c.top1_agreement:.4f}",
                  f"{c.top1_decided:.4f} ({c.decided:.0%})", f"{c.seconds:.1f} s",
                  "[green]pass[/]" if c.passed else "[red]FAIL[/]", escape(c.how + (f" ({c.note})" if c.note else "")))
    t.caption = (f"pass: mean KL ≤ {result.kld_tol:.0e} and top-1 ≥ {result.min_top1} on decided positions "
                 f"(llmopt's top two logits ≥ {result.tie_margin} apart; their share in brackets)")
    return t
