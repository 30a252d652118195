"""`llmopt distill` (being built; see its issue)."""

from llmopt.errors import LlmoptError


def distill() -> None:
    """Not available yet."""
    raise LlmoptError("llmopt distill is not available in this build yet")
