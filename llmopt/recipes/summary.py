"""The combined report of a recipe run: steps, the eval table, the quality × throughput plot, the gates.

Written to OUTPUTS/report.md, report.json and report.png, and rendered with rich.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmopt import __version__
from llmopt.recipes.plan import Recipe
from llmopt.recipes.execute import RunReport
from llmopt.utils import write_json

# (flat metric, header, format); a column shows only when some model has a value for it.
COLUMNS = [
    ("weight_bytes", "size MB", lambda v: f"{v / 1e6:.2f}"),
    ("perplexity", "ppl", lambda v: f"{v:.3f}"),
    ("delta_ppl_pct", "Δppl %", lambda v: f"{v:+.2f}"),
    ("kld_mean", "KLD", lambda v: f"{v:.2e}"),
    ("top1_agreement", "top-1", lambda v: f"{v:.3f}"),
    ("refusal_rate", "refusal %", lambda v: f"{v * 100:.1f}"),
    ("over_refusal_rate", "over-refusal %", lambda v: f"{v * 100:.1f}"),
    ("answer_accuracy", "answer acc %", lambda v: f"{v * 100:.1f}"),
    ("answer_accuracy_drift_pp", "Δacc pp", lambda v: f"{v:+.1f}"),
    ("baseline_agreement", "same as base %", lambda v: f"{v * 100:.1f}"),
    ("baseline_token_f1", "token F1", lambda v: f"{v:.3f}"),
    ("baseline_rouge_l", "ROUGE-L", lambda v: f"{v:.3f}"),
    ("ttft_p50_ms", "TTFT p50 ms", lambda v: f"{v:.1f}"),
    ("tpot_p50_ms", "TPOT p50 ms", lambda v: f"{v:.2f}"),
    ("tpot_p95_ms", "TPOT p95 ms", lambda v: f"{v:.2f}"),
    ("output_tokens_per_s", "out tok/s", lambda v: f"{v:.1f}"),
    ("acceptance_rate", "accept", lambda v: f"{v:.2f}"),
]
REPORT_MD, REPORT_JSON, REPORT_PNG = "report.md", "report.json", "report.png"


def rows(report: RunReport) -> list[dict[str, float | str | None]]:
    """One row per evaluated model, with Δppl against the baseline of its own eval step."""
    baselines = {r.step: r for r in report.results if r.baseline}
    out = []
    for r in report.results:
        base = baselines.get(r.step)
        row: dict[str, float | str | None] = {"name": r.name, "step": r.step, "baseline": r.baseline, **r.metrics}
        ppl, base_ppl = r.metrics.get("perplexity"), base.metrics.get("perplexity") if base else None
        row["delta_ppl_pct"] = (ppl / base_ppl - 1) * 100 if ppl is not None and base_ppl else None
        out.append(row)
    return out


def write_report(report: RunReport) -> dict[str, Path]:
    """report.json, report.png (when there is something to plot) and report.md in the outputs dir."""
    out = Path(report.outputs)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / REPORT_JSON, "md": out / REPORT_MD}
    table = rows(report)
    write_json(paths["json"], to_dict(report, table))
    png = out / REPORT_PNG
    if plot(table, png, report.recipe):
        paths["png"] = png
    else:
        png.unlink(missing_ok=True)
    paths["md"].write_text(markdown(report, table, png.name if "png" in paths else None))
    return paths


def to_dict(report: RunReport, table: list[dict]) -> dict:
    return {
        "recipe": report.recipe, "file": report.file, "outputs": str(report.outputs),
        "llmopt": __version__, "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": report.wall_s, "passed": report.passed,
        "steps": [{"name": s.name, "kind": s.kind, "status": s.status, "seconds": s.seconds, "hash": s.hash,
                   "metrics": s.result.get("metrics")} for s in report.steps],
        "results": [{"name": r.name, "step": r.step, "model": r.model, "baseline": r.baseline, "metrics": r.metrics,
                     "raw": r.raw}
                    for r in report.results],
        "table": table,
        "gates": [g.to_dict() for g in report.gates],
    }


def _columns(table: list[dict]) -> list[tuple]:
    return [c for c in COLUMNS if any(row.get(c[0]) is not None for row in table)]


def _cell(value, fmt) -> str:
    return "—" if value is None else fmt(value)


def _step_metrics(result: dict) -> str:
    """The scalar metrics a quantize or distill step reports about itself (sizes, perplexities)."""
    metrics = result.get("metrics") or {}
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool))


def _label(row: dict) -> str:
    return f"{row['name']} (baseline)" if row.get("baseline") and row["name"] != "baseline" else str(row["name"])


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def markdown(report: RunReport, table: list[dict], png: str | None) -> str:
    lines = [f"# llmopt run: {report.recipe}", "",
             (f"Recipe `{report.file}`, outputs `{report.outputs}`, llmopt {__version__}, "
              f"wall time {report.wall_s:.1f} s (steps skipped as unchanged count their earlier time below)."), "",
             "## Steps", "", "| step | kind | status | time (s) | its own metrics |", "|---|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.kind} | {s.status} | {s.seconds:.1f} | {_step_metrics(s.result)} |"
              for s in report.steps]
    if table:
        cols = _columns(table)
        multi = len({r["step"] for r in table}) > 1
        head = ["model"] + (["eval step"] if multi else []) + [c[1] for c in cols]
        lines += ["", "## Results", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for row in table:
            cells = [_label(row)] + ([str(row["step"])] if multi else [])
            cells += [_cell(row.get(c[0]), c[2]) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
    if png:
        lines += ["", f"![quality vs throughput]({png})"]
    if report.gates:
        verdict = "all passed" if report.passed else f"{sum(not g.passed for g in report.gates)} failed"
        lines += ["", f"## Gates ({verdict})", "", "| gate | measured | op | threshold | result |",
                  "|---|---:|:-:|---:|---|"]
        for g in report.gates:
            result = "pass" if g.passed else f"**FAIL**{' (' + g.note + ')' if g.note else ''}"
            lines.append(f"| `{g.gate}` | {_num(g.left)} | {g.op.replace('<', '&lt;').replace('>', '&gt;')} "
                         f"| {_num(g.right)} | {result} |")
    return "\n".join(lines) + "\n"


def render(report: RunReport, console: Console, paths: dict[str, Path] | None = None) -> None:
    """Print the steps, the eval table and the gates with rich."""
    console = _wide(console)
    steps = Table(title=f"llmopt run: {report.recipe}", title_justify="left")
    for col in ("step", "kind", "status", "time (s)", "its own metrics"):
        steps.add_column(col, justify="right" if col == "time (s)" else "left")
    for s in report.steps:
        steps.add_row(s.name, s.kind, s.status if s.status == "ran" else f"[dim]{s.status}[/]", f"{s.seconds:.1f}",
                      _step_metrics(s.result))
    console.print(steps)
    table = rows(report)
    if table:
        cols = _columns(table)
        multi = len({r["step"] for r in table}) > 1
        t = Table(title="results", title_justify="left")
        t.add_column("model")
        if multi:
            t.add_column("eval step")
        for c in cols:
            t.add_column(c[1], justify="right")
        for row in table:
            t.add_row(_label(row), *([str(row["step"])] if multi else []),
                      *(_cell(row.get(c[0]), c[2]) for c in cols))
        console.print(t)
    if report.gates:
        g = Table(title="gates", title_justify="left")
        for col, justify in (("gate", "left"), ("measured", "right"), ("op", "center"), ("threshold", "right"),
                             ("result", "left")):
            g.add_column(col, justify=justify)
        for gr in report.gates:
            result = "[green]pass[/]" if gr.passed else f"[bold red]FAIL[/]{' ' + gr.note if gr.note else ''}"
            g.add_row(gr.gate, _num(gr.left), gr.op, _num(gr.right), result)
        console.print(g)
    if paths:
        console.print("report: " + ", ".join(str(p) for p in paths.values()), markup=False)
    console.print(f"wall time {report.wall_s:.1f} s")


def _wide(console: Console) -> Console:
    """A log file or CI has no terminal width: print whole rows there instead of folding them at 80 columns."""
    if console.is_terminal:
        return console
    return Console(file=console.file, width=max(console.width, 200), highlight=False, soft_wrap=False)


def render_plan(recipe: Recipe, done: dict[str, bool], console: Console) -> None:
    """--dry-run: the steps in run order with their resolved options, what would be skipped, and the gates."""
    console = _wide(console)
    console.print(f"recipe [bold]{recipe.name}[/] ({recipe.file}) → outputs {recipe.outputs}")
    if recipe.description:
        console.print(recipe.description.strip())
    t = Table(title="plan (run order)", title_justify="left", show_lines=True)
    for col in ("#", "step", "kind", "after", "would", "options"):
        t.add_column(col, overflow="fold", max_width=None if col == "options" else 40)
    for i, step in enumerate(recipe.steps, 1):
        options = ", ".join(f"{k}: {v}" for k, v in step.config.items())
        would = "[dim]skip (unchanged)[/]" if done[step.name] else "run"
        t.add_row(str(i), step.name, step.kind.name, ", ".join(step.deps) or "—", would, options)
    console.print(t)
    for pg in recipe.gates:
        console.print(f"gate: {pg.gate.text}   ({pg.where})", markup=False)


def plot(table: list[dict], path: Path, title: str = "") -> bool:
    """Quality (KLD if measured, else perplexity) against output tokens/s, the Pareto front marked (the one plot,
    llmopt.evaluate.outputs); False when fewer than two steps have both figures."""
    from llmopt.evaluate.outputs import PlotPoint, plot_quality_vs_throughput

    quality = "kld_mean" if sum(r.get("kld_mean") is not None for r in table) >= 2 else "perplexity"
    points = [PlotPoint(float(r["output_tokens_per_s"]), float(r[quality]), str(r["name"])) for r in table
              if r.get("output_tokens_per_s") is not None and r.get(quality) is not None]
    if len(points) < 2:
        return False
    plot_quality_vs_throughput(points, path, quality == "kld_mean", title)
    return True
