"""Load and save Hugging Face causal LMs; the builtin default model; model facts."""

from llmopt.models.info import ModelInfo, attention_shape, kv_bytes, model_info
from llmopt.models.loading import (
    LoadedModel,
    ModelSpec,
    check_seq_len,
    check_weights,
    load_config,
    load_model,
    load_tokenizer,
    max_context,
    resolve_path,
    save_model,
)

__all__ = ["LoadedModel", "ModelInfo", "ModelSpec", "attention_shape", "check_seq_len", "check_weights", "kv_bytes", "load_config",
           "load_model", "load_tokenizer", "max_context", "model_info", "resolve_path", "save_model"]
