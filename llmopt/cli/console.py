"""Consoles shared by the commands: tables and results on stdout, progress and errors on stderr."""

from rich.console import Console

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
