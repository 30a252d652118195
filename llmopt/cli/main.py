"""Entry point: the typer app, global options, and the one place errors become exit codes."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from typer.core import TyperGroup

from llmopt import __version__
from llmopt.cli.console import err
from llmopt.errors import LlmoptError


def _debug() -> bool:
    return os.environ.get("LLMOPT_DEBUG", "") not in ("", "0")


class _Group(TyperGroup):
    """Turns LlmoptError from any subcommand into a one-line red message and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LlmoptError as e:
            if _debug():
                raise
            from rich.markup import escape  # messages quote extras such as 'llmopt[gptqmodel]'

            err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, markup=True, highlight=False)
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="llmopt: quantize, distill and evaluate causal LMs — and measure what each compression costs.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also LLMOPT_DEBUG=1).")] = False,
) -> None:
    if debug:
        os.environ["LLMOPT_DEBUG"] = "1"


def _register() -> None:
    from llmopt.cli import backends, distill, evaluate, export, models, quantize, run, verify

    app.command("quantize", no_args_is_help=True)(quantize.quantize)
    app.command("distill", no_args_is_help=True)(distill.distill)
    app.command("eval", no_args_is_help=True)(evaluate.evaluate)
    app.command("run", no_args_is_help=True)(run.run)
    app.command("verify", no_args_is_help=True)(verify.verify)
    app.command("export", no_args_is_help=True)(export.export)
    app.add_typer(models.app, name="models")
    app.add_typer(backends.app, name="backends")


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
