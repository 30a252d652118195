"""`llmopt quantize` (being built; see its issue)."""

from llmopt.errors import LlmoptError


def quantize() -> None:
    """Not available yet."""
    raise LlmoptError("llmopt quantize is not available in this build yet")
