"""Rich progress bars on stderr for the core functions' events (llmopt/progress.py): one bar per task."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from llmopt.cli.console import err
from llmopt.progress import Event
from llmopt.progress import Progress as ProgressFn


class _Fields:
    """Renders an event's fields (loss=…, …) after the bar; empty when it has none."""

    @staticmethod
    def render(fields: dict) -> str:
        return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


@contextlib.contextmanager
def bars(enabled: bool = True) -> Iterator[ProgressFn | None]:
    """A Progress callback drawing rich bars while the block runs (None when not enabled)."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[extra]}"), console=err,
                  transient=False) as bar:
        tasks: dict[str, int] = {}

        def on_event(e: Event) -> None:
            if e.message is not None:
                bar.console.print(e.message, highlight=False)
            if e.done is None and e.total is None:
                return
            if e.task not in tasks:
                tasks[e.task] = bar.add_task(e.task, total=e.total, extra="")
            bar.update(tasks[e.task], completed=e.done or 0, total=e.total, extra=_Fields.render(e.fields))

        yield on_event


__all__ = ["bars"]
