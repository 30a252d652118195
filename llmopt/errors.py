"""The one error type the CLI turns into a one-line message and an exit code."""

from __future__ import annotations


class LlmoptError(Exception):
    """A user-facing error: bad input, missing file, unusable option (exit code 2).

    The message must say what was expected or what to do, in one line.
    """

    exit_code: int = 2


class CheckFailed(LlmoptError):
    """A gate or verification check that ran and failed (exit code 1)."""

    exit_code = 1
