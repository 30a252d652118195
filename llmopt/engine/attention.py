"""Attention over the paged KV cache, plugged into transformers through its AttentionInterface.

One model forward runs a packed step: the newest token of every decoding sequence first, then
prefill (or verification) chunks, all in a single [1, T] batch with per-token positions. The
HF attention module hands this function the step's new q/k/v (rotary already applied); it writes
k/v into the block pool and attends each query to its own sequence's keys only. GQA goes through
SDPA's `enable_gqa=True`, so the cache is never repeat_kv-expanded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_NAME = "llmopt_paged"


@dataclass(slots=True)
class PagedKVCache:
    """Per-layer K and V block pools, each [num_blocks, block_size, kv_heads, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(cls, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> "PagedKVCache":
        shape = (num_blocks, block_size, kv_heads, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)], block_size)

    @property
    def bytes_per_block(self) -> int:
        t = self.k[0]
        return 2 * len(self.k) * t[0].numel() * t.element_size()

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_block * self.k[0].shape[0]


@dataclass(slots=True)
class Segment:
    """A run of ≥1 consecutive query tokens of one sequence inside the packed step."""

    start: int  # offset in the packed step
    length: int
    context: int  # keys this chunk attends to (cached + its own)
    block_table: torch.Tensor | None  # [nb] long; None when the chunk starts at position 0 (keys are all new)
    mask: torch.Tensor | None  # [length, context] bool, True = attend; None for a fresh causal chunk


@dataclass(slots=True)
class StepContext:
    """Everything the attention function needs to know about one packed step."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] long: where each new token's K/V goes (flat slot index)
    num_decode: int  # the first num_decode tokens are single decode tokens of distinct sequences
    decode_tables: torch.Tensor | None  # [Bd, nb] long, padded with block 0
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, nb*block_size] bool, True = a real key
    segments: list[Segment] = field(default_factory=list)


def _gather(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Blocks of pool [N, bs, Hkv, D] picked by tables [B, nb] → [B, Hkv, nb*bs, D] (one copy, no GQA repeat)."""
    b, nb = tables.shape
    blocks = pool[tables]  # [B, nb, bs, Hkv, D]
    return blocks.view(b, nb * pool.shape[1], pool.shape[2], pool.shape[3]).transpose(1, 2)


def paged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, Hkv, T, D] of the new tokens → attention output [1, T, H, D]."""
    ctx: StepContext = kwargs["llmopt_step"]
    layer = module.layer_idx
    k_pool, v_pool = ctx.cache.k[layer], ctx.cache.v[layer]  # [N, bs, Hkv, D]
    hkv, d = k_pool.shape[2], k_pool.shape[3]
    k_new = key[0].transpose(0, 1)  # [T, Hkv, D]
    v_new = value[0].transpose(0, 1)
    k_pool.view(-1, hkv, d).index_copy_(0, ctx.slot_mapping, k_new.to(k_pool.dtype))
    v_pool.view(-1, hkv, d).index_copy_(0, ctx.slot_mapping, v_new.to(v_pool.dtype))

    t, h = query.shape[2], query.shape[1]
    out = query.new_empty(t, h, d)  # [T, H, D]
    bd = ctx.num_decode
    if bd:
        q = query[0, :, :bd].transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, D]
        k = _gather(k_pool, ctx.decode_tables)  # [Bd, Hkv, S, D]
        v = _gather(v_pool, ctx.decode_tables)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=ctx.decode_mask,
                                           scale=scaling, enable_gqa=True)  # [Bd, H, 1, D]
        out[:bd] = o[:, :, 0]
    for seg in ctx.segments:
        s, n = seg.start, seg.length
        q = query[:, :, s:s + n]  # [1, H, L, D]
        if seg.block_table is None:  # fresh prompt: its keys are exactly this chunk's
            o = F.scaled_dot_product_attention(q, key[:, :, s:s + n], value[:, :, s:s + n], is_causal=True,
                                               scale=scaling, enable_gqa=True)
        else:
            k = _gather(k_pool, seg.block_table[None])[:, :, :seg.context].to(q.dtype)  # [1, Hkv, C, D]
            v = _gather(v_pool, seg.block_table[None])[:, :, :seg.context].to(q.dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask, scale=scaling, enable_gqa=True)
        out[s:s + n] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> str:
    """Register the paged attention with transformers (idempotent); returns its implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention)
    return ATTN_NAME
