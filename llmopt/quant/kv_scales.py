"""`llmopt quantize --kv-cache fp8|int8`: calibrate per-layer static K/V scales on the float model.

The float model runs forwards over the calibration windows with an attention function that records, per layer
(the attention module's layer_idx), the absolute max of the key states after rotary (what a KV cache stores) and
of the value states, then attends with SDPA. scale = amax / qmax (checkpoint/kv_scales.py: QMAX, the layout).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch

from llmopt.checkpoint.kv_scales import QMAX, KVScales, attention_modules
from llmopt.errors import LlmoptError
from llmopt.utils import text_config

_OBSERVE_NAME = "llmopt_kv_observe"


@contextlib.contextmanager
def _observing(model: torch.nn.Module, amax: dict[int, list[float]]) -> Iterator[None]:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def observe(module, query, key, value, attention_mask, **kwargs):
        idx = module.layer_idx
        k = key.detach().abs().amax().double().item()  # key [B, Hkv, T, D], rotary applied
        v = value.detach().abs().amax().double().item()
        cur = amax.setdefault(idx, [0.0, 0.0])
        cur[0], cur[1] = max(cur[0], k), max(cur[1], v)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_OBSERVE_NAME, observe)
    configs = list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values())
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = _OBSERVE_NAME
    try:
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s


@torch.inference_mode()
def calibrate(model: torch.nn.Module, input_ids: torch.Tensor, kind: str, device: torch.device | str | None = None,
              batch: int = 8) -> KVScales:
    """Per-layer K/V scales over the calibration windows input_ids [N, L]: the float model's forwards, one decoder
    layer at a time on `device` (as the quantize pipeline walks it; None = where the model is), each layer's float
    outputs feeding the next."""
    from llmopt.quant.walk import layer_out, capture_inputs, decoder_layers

    device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    amax: dict[int, list[float]] = {}
    decoder, layers, _ = decoder_layers(model)
    first = {id(c): next(itertools.chain(c.parameters(), c.buffers()), None) for c in decoder.children()
             if c is not layers}
    home = {k: (t.device if t is not None else None) for k, t in first.items()}
    with _observing(model, amax):
        batches = capture_inputs(model, input_ids, batch, device)
        for layer in layers:
            at = next(layer.parameters()).device
            layer.to(device)
            batches = [(layer_out(layer(h, **kw)), kw) for h, kw in batches]
            layer.to(at)
    for child in decoder.children():  # capture_inputs moved embeddings / rotary / norm to the device
        if child is not layers and home.get(id(child)) is not None:
            child.to(home[id(child)])
    modules = attention_modules(model)
    cfg = text_config(model.config)
    layers = int(cfg.num_hidden_layers)
    missing = [i for i in range(layers) if i not in amax or i not in modules]
    if missing:
        raise LlmoptError(f"--kv-cache: layer {missing[0]} of {model.config.model_type} does not pass its K/V "
                          f"through transformers' attention interface, so llmopt cannot calibrate its KV scales")
    q = QMAX[kind]
    # an all-zero K or V (never in practice) would give scale 0, which vLLM reads as "not loaded": keep it positive
    k = [max(amax[i][0], 1e-12) / q for i in range(layers)]
    v = [max(amax[i][1], 1e-12) / q for i in range(layers)]
    return KVScales(kind, k, v, [modules[i] for i in range(layers)])
