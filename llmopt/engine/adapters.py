"""Per-architecture attention adapters: attention modules that compute attention inline, never calling
transformers' attention interface, get a forward that does.

While the engine runs (`adapted`, entered by runner.paged_attention_enabled), each module whose class has an
adapter here has its forward replaced by one that keeps the module's own projections and rotary embedding and
hands the new q/k/v to `paged_attention`, the function every other family reaches through the interface: the
probe, windows, masks and KV pools apply unchanged. The original forward is restored on exit.

Falcon (transformers 5): FalconAttention splits its fused query_key_value, applies rotary, updates its own
cache and runs SDPA/eager itself. Its rotary variants are served; ALiBi is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from llmopt.engine.attention import paged_attention
from llmopt.errors import LlmoptError

Forward = Callable[..., tuple[torch.Tensor, None]]  # the adapted module's forward: (output, no attention weights)


def refuse(feature: str) -> LlmoptError:
    """The one-line refusal of a model feature the engine would serve wrong."""
    return LlmoptError(f"{feature} is not supported by llmopt's engine: use --engine hf")


def _falcon(module: nn.Module) -> Forward:
    """FalconAttention's forward for rotary Falcon, HF's math (FalconAttention.forward, alibi=None branch)."""
    if module.config.alibi:  # the bias is built from the padded batch mask and added to the logits inline
        raise refuse("ALiBi position biases (Falcon alibi=True)")
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    h, d = module.num_heads, module.head_dim

    def forward(hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **unused) -> tuple[torch.Tensor, None]:
        # the decoder layer's other kwargs carry nothing the engine needs: alibi is None (refused above),
        # layer_past None (the runner passes use_cache=False), position_ids are in position_embeddings
        b, t = hidden_states.shape[:2]
        fused = module.query_key_value(hidden_states)  # [B, T, (H + 2·Hkv)·D]
        if module.new_decoder_architecture:  # per kv head: its H/Hkv query heads, then its k, then its v
            qkv = fused.view(b, t, -1, h // module.num_kv_heads + 2, d)  # [B, T, Hkv, H/Hkv + 2, D]
            # query head i uses kv head i // (H/Hkv): HF broadcasts k/v to every query head, SDPA's enable_gqa
            # in paged_attention maps the same heads without the copy, so the cache keeps Hkv heads
            q, k, v = qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]  # [B, T, H|Hkv, D]
        elif module.multi_query:  # H query heads, then one shared k head and one v head (Falcon-7B)
            qkv = fused.view(b, t, h + 2, d)
            q, k, v = qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]  # [B, T, H|1, D]
        else:  # per head: its q, k, v
            qkv = fused.view(b, t, h, 3, d)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, T, H, D]
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H|Hkv, T, D]
        cos, sin = position_embeddings  # [B, T, D] at each packed token's own position
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # HF scales by 1/sqrt(head_dim) (SDPA's default, the eager path's division) and uses no dropout here
        out, _ = paged_attention(module, q, k, v, attention_mask, scaling=d ** -0.5, dropout=0.0)  # [B, T, H, D]
        return module.dense(out.reshape(b, t, h * d)), None

    return forward


# attention module class name → builder of its engine forward (raises refuse(...) for what it cannot serve)
ADAPTERS: dict[str, Callable[[nn.Module], Forward]] = {"FalconAttention": _falcon}


@contextlib.contextmanager
def adapted(model: nn.Module) -> Iterator[None]:
    """Give every module of `model` with an adapter its engine forward inside this block, then restore it."""
    swapped: list[tuple[nn.Module, Forward | None]] = []
    try:
        for m in model.modules():
            build = ADAPTERS.get(type(m).__name__)
            if build is not None:
                forward = build(m)
                # an instance-level forward (accelerate's device hooks set one) is put back, not dropped
                swapped.append((m, m.__dict__.get("forward")))
                m.forward = forward
        yield
    finally:
        for m, saved in reversed(swapped):
            if saved is None:
                del m.forward
            else:
                m.forward = saved
