"""Text sources → token batches (calibration, distillation data, held-out evaluation text)."""

from llmopt.calibration.data import (
    DataSpec,
    TokenBatch,
    load_texts,
    load_token_batch,
    pack,
    token_stream,
)

__all__ = ["DataSpec", "TokenBatch", "load_texts", "load_token_batch", "pack", "token_stream"]
