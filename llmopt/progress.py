"""The one progress protocol of llmopt's core functions.

Every long core function (quantize, evaluate, distill, building the built-in model, recipes) takes
`progress: Progress | None` and calls it with `Event`s; it never draws anything itself. The CLI turns events into
rich bars (llmopt/cli/progress.py), the recipe runner into log lines, tests into lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Event:
    """One report: a count on a task (done of total), a line of status text, or both.

    task: what is counted, also the bar's label ("gptq layer", "perplexity", "distill step"); events with the same
    task update one bar. fields: figures shown beside it (e.g. loss, eta_s), JSON-serialisable."""

    task: str
    done: int | None = None
    total: int | None = None
    message: str | None = None
    fields: dict = field(default_factory=dict)


Progress = Callable[[Event], None]


def emit(progress: Progress | None, task: str, done: int | None = None, total: int | None = None,
         message: str | None = None, **fields) -> None:
    """Send one Event when there is a listener (the core functions' one way to report)."""
    if progress is not None:
        progress(Event(task, done, total, message, fields))


class Counter:
    """A task counted in steps: `advance(n)` sends done += n of total."""

    __slots__ = ("progress", "task", "total", "done")

    def __init__(self, progress: Progress | None, task: str, total: int | None) -> None:
        self.progress, self.task, self.total, self.done = progress, task, total, 0
        emit(progress, task, 0, total)

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        emit(self.progress, self.task, self.done, self.total, **fields)


__all__ = ["Counter", "Event", "Progress", "emit"]
