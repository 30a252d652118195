"""Model shape facts and the KV-cache size formula."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    architecture: str
    params: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: str
    weight_bytes: int
    kv_bytes_per_token: int
    context: int
    batch: int
    kv_bytes: int
    quantization: str | None


def attention_shape(config) -> tuple[int, int, int, int]:
    """(layers, heads, kv_heads, head_dim) of a decoder config (GQA: kv_heads < heads)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, heads, kv_heads, head_dim


def kv_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, bytes_per_el: int) -> int:
    """KV-cache bytes: 2 (K and V) · layers · tokens · kv_heads · head_dim · bytes."""
    return 2 * layers * tokens * kv_heads * head_dim * bytes_per_el


def safetensors_bytes(path: Path) -> int:
    """Bytes of all tensors in a checkpoint's safetensors files, read from their headers."""
    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                lo, hi = v["data_offsets"]
                total += hi - lo
    return total


def model_info(name: str, path: Path, config, dtype: torch.dtype, context: int = 4096, batch: int = 1) -> ModelInfo:
    """Facts about a checkpoint without loading its weights (parameters counted on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    layers, heads, kv_heads, head_dim = attention_shape(config)
    el = torch.empty((), dtype=dtype).element_size()
    qc = getattr(config, "quantization_config", None)
    if qc is not None:  # quantized: what is actually stored
        weight_bytes = safetensors_bytes(path)
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        quant = str(qc.get("quant_method", "quantized"))
    else:
        weight_bytes = params * el
        quant = None
    per_token = kv_bytes(layers, kv_heads, head_dim, 1, el)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelInfo(name=name, architecture=(config.architectures or [type(model).__name__])[0], params=params,
                     layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden_size=text.hidden_size,
                     vocab_size=text.vocab_size, dtype=str(dtype).removeprefix("torch."), weight_bytes=weight_bytes,
                     kv_bytes_per_token=per_token, context=context, batch=batch,
                     kv_bytes=per_token * context * batch, quantization=quant)
