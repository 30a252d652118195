"""`llmopt evaluate` (being built; see its issue)."""

from llmopt.errors import LlmoptError


def evaluate() -> None:
    """Not available yet."""
    raise LlmoptError("llmopt evaluate is not available in this build yet")
