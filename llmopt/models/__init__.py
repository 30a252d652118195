"""Load and save Hugging Face causal LMs; the builtin default model; model facts."""

from llmopt.models.info import ModelInfo, attention_shape, kv_bytes, model_info
from llmopt.models.loading import LoadedModel, ModelSpec, load_config, load_model, load_tokenizer, resolve_path, save_model

__all__ = ["LoadedModel", "ModelInfo", "ModelSpec", "attention_shape", "kv_bytes", "load_config", "load_model",
           "load_tokenizer", "model_info", "resolve_path", "save_model"]
