"""Progress bars for the long phases of an eval (rich, on stderr), or nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


class Bars:
    """phase(description, total) → an advance(n) callback; a no-op when not enabled."""

    def __init__(self, progress=None) -> None:
        self._progress = progress

    def phase(self, description: str, total: int) -> Callable[[int], None]:
        if self._progress is None:
            return lambda n=1: None
        task = self._progress.add_task(description, total=total)
        return lambda n=1: self._progress.advance(task, n)


@contextlib.contextmanager
def make_progress(enabled) -> Iterator[Bars]:
    if callable(enabled) and not isinstance(enabled, bool):
        yield enabled  # a caller-provided Bars-like object
        return
    if not enabled:
        yield Bars()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmopt.cli.console import err

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as p:
        yield Bars(p)
