"""Rich progress for building the builtin model (shared by `models build` and first use)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_stderr = Console(stderr=True)


def build_progress():
    """Return a (step, total, loss) callback that drives one rich progress bar."""
    state: dict = {}

    def update(step: int, total: int, loss: float) -> None:
        if "progress" not in state:
            p = Progress(TextColumn("building builtin model"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TextColumn("ETA"),
                         TimeRemainingColumn(), console=_stderr, transient=False)
            p.start()
            state["progress"], state["task"] = p, p.add_task("train", total=total, loss=loss)
        p = state["progress"]
        p.update(state["task"], completed=step, loss=loss)
        if step >= total:
            p.stop()

    return update
