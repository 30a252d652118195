"""`llmopt backends doctor|setup`: which external quantization backends run here, and venvs for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli import options as opt

app = typer.Typer(no_args_is_help=True, help="External quantization backends: GPTQModel, llm-compressor, "
                                             "AutoGPTQ, AutoAWQ (llmopt quantize --backend NAME).")


@app.command("doctor")
def doctor(
    quick: Annotated[bool, typer.Option("--quick", help="Check installs only; do not import each library in its "
                                        "Python (the import probe takes seconds per backend).")] = False,
    json_out: opt.Json = False,
) -> None:
    """Report which backends are usable in this environment, and why not."""
    from llmopt.backends.doctor import doctor as run_doctor
    from llmopt.cli.console import out

    rows = run_doctor(probe=not quick)
    if json_out:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="llmopt quantize --backend NAME: usable here?", title_justify="left")
    for col in ("backend", "usable", "library", "runs in", "why not / what to do"):
        t.add_column(col, overflow="fold")
    for r in rows:
        where = r.origin or "—"
        if r.patches:
            where += f" [yellow](PATCHED ×{len(r.patches)})[/]"
        t.add_row(r.name, "[green]yes[/]" if r.usable else "[red]no[/]", r.library or ("not probed" if r.usable
                  else "—"), where, escape(r.reason or ""))
    support = Table(title="what each backend does", title_justify="left")
    for col in ("backend", "CPU", "GPU"):
        support.add_column(col, overflow="fold")
    for r in rows:
        support.add_row(r.name, escape(r.cpu), escape(r.gpu))
    out.print(support)
    for r in rows:
        for p in r.patches:
            out.print(f"[yellow]{r.name} patch:[/] {escape(p)}", soft_wrap=True)
    out.print(t)


@app.command("setup", no_args_is_help=True)
def setup(
    name: Annotated[str, typer.Argument(help="gptqmodel, llmcompressor, auto-gptq or autoawq.")],
    path: Annotated[Path | None, typer.Option("--path", help="Where to create the venv (default: "
                                              "$LLMOPT_HOME/backends/NAME, where --backend finds it).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recreate the venv if --path exists.")] = False,
) -> None:
    """Create a venv for backend NAME with its pinned stack (same torch as llmopt's) and check it imports."""
    from llmopt.backends.setup import setup as run_setup
    from llmopt.cli.console import err, out

    status = run_setup(name, path, overwrite=overwrite, progress=lambda msg: err.print(msg))
    out.print(f"{name}: {status.library} ready in {status.python}" +
              (f" (runs PATCHED: {'; '.join(status.patches)})" if status.patches else ""))
