"""`llmopt run` (being built; see its issue)."""

from llmopt.errors import LlmoptError


def run() -> None:
    """Not available yet."""
    raise LlmoptError("llmopt run is not available in this build yet")
