"""Consoles shared by the commands: tables and results on stdout, progress and errors on stderr."""

import os
import sys

from rich.console import Console

# Off a terminal (CI logs, pipes, files) rich would squeeze tables into 80 columns until cells read `trans…`:
# there nothing wraps lines, so tables get the width they need (up to this) unless COLUMNS says otherwise.
_PIPE_WIDTH = 240


def _width(stream) -> int | None:
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None  # rich's own choice: the terminal's (or COLUMNS') width
    return _PIPE_WIDTH


out = Console(highlight=False, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, width=_width(sys.stderr))
