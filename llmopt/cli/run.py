"""`llmopt run RECIPE.yaml`: run a recipe's steps (skipping unchanged ones), write the report, check the gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli.console import err, out
from llmopt.errors import CheckFailed


def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe file, e.g. recipes/quickstart.yaml.", metavar="RECIPE.yaml",
                                              show_default=False)],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a value: --set steps.gptq4.bits=8, --set vars.model=ID "
                                           "(repeatable; the value is read as YAML).")] = None,
    outputs: Annotated[Path | None, typer.Option(
        "--outputs", metavar="DIR", help="Outputs folder (default: the recipe's `outputs:`, else runs/NAME).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the resolved plan; run nothing.")] = False,
) -> None:
    """Run a YAML recipe of quantize / distill / eval steps; exit 1 when a gate fails.

    Steps whose config and inputs are unchanged since a finished run are skipped, so a killed run resumes.
    """
    from llmopt.recipes import load_recipe, run_recipe, summary
    from llmopt.recipes.execute import done_record, step_hashes

    plan = load_recipe(recipe, set_ or [], outputs)
    if dry_run:
        hashes = step_hashes(plan)
        summary.render_plan(plan, {s.name: done_record(s, hashes[s.name]) is not None for s in plan.steps}, out)
        return
    result = run_recipe(plan, log=lambda line: err.print(line, highlight=False, markup=False, soft_wrap=True))
    paths = summary.write_report(result)
    summary.render(result, out, paths)
    if not result.passed:
        failed = [g.gate for g in result.gates if not g.passed]
        raise CheckFailed(f"{len(failed)} of {len(result.gates)} gates failed ({'; '.join(failed)}): "
                          f"see {paths['md']}")
