"""Model shape facts and the KV-cache size formula.

Per layer and token a decoder caches kv_heads·(k_head_dim + v_head_dim) values. Full-attention layers keep every
token; sliding-window layers are capped at `window` tokens, what one step attends to (HF's sliding cache keeps
window − 1 between steps, plus the step's own token; llmopt's engine, when every layer slides, frees whole
blocks down to it, so it holds up to a block more). MLA (DeepSeek V2/V3) is counted twice: as the decompressed
per-head K (qk_nope + qk_rope dims) and V (v_head_dim) that llmopt's engine caches, and as the latent
(kv_lora_rank + qk_rope_head_dim per token and layer) that vLLM and transformers 5's own cache keep.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from llmopt.utils import dtype_name, text_config


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
    kv_bytes_per_token: int  # every layer, before any window caps it
    context: int
    batch: int
    kv_bytes: int  # batch · context tokens, sliding layers capped at the window
    quantization: str | None
    full_layers: int
    sliding_layers: int
    sliding_window: int | None  # tokens a sliding layer keeps at most
    k_head_dim: int
    v_head_dim: int
    kv_bytes_per_token_layer: int  # one layer, one token (full and sliding layers alike)
    latent_kv_bytes_per_token: int | None  # MLA: vLLM's latent cache, every layer
    latent_kv_bytes: int | None  # MLA: vLLM's latent cache for batch · context tokens


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What a decoder caches per token and layer, read from its config."""

    full_layers: int
    sliding_layers: int
    window: int | None  # a sliding layer keeps at most this many tokens
    kv_heads: int  # heads cached: MLA caches every query head's decompressed K and V
    k_head_dim: int
    v_head_dim: int
    latent_dim: int | None = None  # MLA: kv_lora_rank + qk_rope_head_dim (vLLM's cache entry per token and layer)

    @property
    def layers(self) -> int:
        return self.full_layers + self.sliding_layers

    def layer_bytes_per_token(self, bytes_per_el: int) -> int:
        return self.kv_heads * (self.k_head_dim + self.v_head_dim) * bytes_per_el

    def bytes(self, tokens: int, bytes_per_el: int) -> int:
        """Cache bytes of one sequence of `tokens` tokens: sliding layers hold min(tokens, window) of them."""
        kept = tokens if self.window is None else min(tokens, self.window)
        per = self.layer_bytes_per_token(bytes_per_el)
        return (self.full_layers * tokens + self.sliding_layers * kept) * per

    def latent_bytes(self, tokens: int, bytes_per_el: int) -> int | None:
        """MLA: the latent cache's bytes (vLLM), every layer holding every token; None without MLA."""
        return None if self.latent_dim is None else self.layers * tokens * self.latent_dim * bytes_per_el


def attention_shape(config) -> tuple[int, int, int, int]:
    """(layers, heads, kv_heads, head_dim) of a decoder config (GQA: kv_heads < heads)."""
    text = text_config(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, heads, kv_heads, head_dim


def kv_layout(config) -> KVLayout:
    """Full vs sliding layers (`layer_types`, else every layer when `sliding_window` is set and not switched off
    by `use_sliding_window`), cached heads and head dims (MLA: decompressed K and V)."""
    text = text_config(config)
    layers, heads, kv_heads, head_dim = attention_shape(text)
    window = getattr(text, "sliding_window", None) or None
    types = getattr(text, "layer_types", None)
    if types:
        sliding = sum(t == "sliding_attention" for t in types)
    else:
        sliding = layers if window and getattr(text, "use_sliding_window", True) is not False else 0
    if getattr(text, "kv_lora_rank", None):
        rope = text.qk_rope_head_dim
        return KVLayout(layers - sliding, sliding, window if sliding else None, heads, text.qk_nope_head_dim + rope,
                        text.v_head_dim, text.kv_lora_rank + rope)
    return KVLayout(layers - sliding, sliding, window if sliding else None, kv_heads, head_dim, head_dim)


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
    layout = kv_layout(config)
    per_layer = layout.layer_bytes_per_token(el)
    latent = layout.latent_bytes(1, el)
    text = text_config(config)
    return ModelInfo(name=name, architecture=(config.architectures or [type(model).__name__])[0], params=params,
                     layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden_size=text.hidden_size,
                     vocab_size=text.vocab_size, dtype=dtype_name(dtype), weight_bytes=weight_bytes,
                     kv_bytes_per_token=layout.layers * per_layer, context=context, batch=batch,
                     kv_bytes=layout.bytes(context, el) * batch, quantization=quant, full_layers=layout.full_layers,
                     sliding_layers=layout.sliding_layers, sliding_window=layout.window,
                     k_head_dim=layout.k_head_dim, v_head_dim=layout.v_head_dim, kv_bytes_per_token_layer=per_layer,
                     latent_kv_bytes_per_token=latent,
                     latent_kv_bytes=None if latent is None else layout.latent_bytes(context, el) * batch)
