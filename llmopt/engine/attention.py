"""Attention over the paged KV cache, plugged into transformers through its AttentionInterface.

One model forward runs a packed step: the newest token of every decoding sequence first, then
prefill (or verification) chunks, all in a single [1, T] batch with per-token positions. The
HF attention module hands this function the step's new q/k/v (rotary already applied); it writes
k/v into the block pool and attends each query to its own sequence's keys only. GQA goes through
SDPA's `enable_gqa=True`, so the cache is never repeat_kv-expanded.

Per layer (a `LayerSpec`, learned once by a probe forward, see runner.inspect_attention) the function
applies a sliding window (keys j > i − window, transformers' masking_utils semantics) and attention-logit
softcapping (tanh(s/cap)·cap, which SDPA cannot do, so those layers take a manual path).

MLA (DeepSeek V2/V3): llmopt caches the decompressed per-head K (qk_nope + qk_rope dims) and V
(v_head_dim) that the HF module hands to the attention function, not the compressed latent
(kv_lora_rank + qk_rope_head_dim, one "head") that vLLM and transformers 5's own cache keep: the
latent is expanded inside the HF module, before the attention interface is called.

Decode queries read the cache in place (`PagedKVCache.attend_in_place`): a sequence's visible keys are a few runs of
consecutive pool slots (`KeyRun`), attended as views of the pool, so a step does not copy the history. Short
histories in a large batch are cheaper gathered into one padded batch for one SDPA call (`PagedKVCache.read`);
model_runner.read_in_place picks by a fixed rule. On CUDA decode goes through FlexAttention with a block mask over
the pool (flex_decode.py: no gather, no token-level mask) where its start-up probe passes, else gathered. Chunks
after the first and verification chunks gather their sequence's blocks; a fresh prompt is SDPA with is_causal
(no mask tensor: the flash kernel on CUDA).

The cache stores K/V in the engine's --kv-dtype (kv_format.py): a float dtype, or 8-bit codes (int8, fp8_e4m3)
with a scale per (token, kv head) in scale pools beside the pages. New tokens are quantized as they are
written; a step converts only the slots it reads, into the query's dtype. A fresh prompt chunk attends to its
own unstored K/V (as vLLM's prefill does); every query that reads the cache (decode, later chunks, verification)
sees the stored values.

A checkpoint with calibrated KV scales (`llmopt quantize --kv-cache`, model.kv_cache_scales) gives the cache one
static K and one static V scale per layer (`PagedKVCache.static`): new tokens are coded against those (values past
the calibrated amax clamp to ±qmax, vLLM's semantics) instead of their own amax; the scale pools then hold that
constant, so the read path and the bytes per token are the same as with dynamic scales.

The step context reaches this function through a ContextVar set by the runner around its forward
(`step_context`), not a forward kwarg: some HF decoder layers (StableLM) do not pass extra kwargs down
to their attention module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmopt.engine import flex_decode
from llmopt.engine.flex_decode import FlexRows
from llmopt.engine.kv_format import (
    KVFormat,
    codes_to,
    quantize,
    quantize_static,
    scale_factors,
)

ATTN_NAME = "llmopt_paged"

Window = int | None  # a layer's sliding window (keys j > i − window); None = full attention


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """What one layer's attention caches and how it attends, as its HF module passes it to the attention function."""

    kv_heads: int
    k_head_dim: int
    v_head_dim: int  # differs from k_head_dim for MLA
    window: Window = None
    softcap: float | None = None  # attention logits become tanh(s / softcap) · softcap

    @property
    def values_per_token(self) -> int:
        """Cached K + V elements per token."""
        return self.kv_heads * (self.k_head_dim + self.v_head_dim)


def kv_bytes_per_token(specs: list[LayerSpec], fmt: KVFormat) -> int:
    """Cache bytes one token takes over every layer: its K and V codes, plus one K and one V scale per kv head
    when fmt is quantized (the formula the allocated pool is checked against)."""
    return sum(s.values_per_token * fmt.code_bytes + 2 * s.kv_heads * fmt.scale_bytes for s in specs)


@dataclass(slots=True)
class PagedKVCache:
    """Per-layer K and V block pools, [num_blocks, block_size, kv_heads, k_head_dim] and [..., v_head_dim], in
    fmt.dtype; for a quantized fmt also per-layer K and V scale pools [num_blocks, block_size, kv_heads] (fmt.scale_dtype).
    Tokens are quantized as they are written (`write`) and dequantized only in the blocks a step reads (`read`)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int
    fmt: KVFormat
    k_scale: list[torch.Tensor] = field(default_factory=list)  # empty when fmt is not quantized
    v_scale: list[torch.Tensor] = field(default_factory=list)
    # calibrated (k, v) scale per layer (a checkpoint's k_scale/v_scale, in this fmt's code range): new tokens are
    # quantized against them instead of their own amax; None = dynamic per-(token, head) scales
    static: list[tuple[float, float]] | None = None

    @classmethod
    def allocate(cls, specs: list[LayerSpec], num_blocks: int, block_size: int, fmt: KVFormat,
                 device: torch.device, static: list[tuple[float, float]] | None = None) -> PagedKVCache:
        def pool(*shape: int, dtype: torch.dtype = fmt.dtype) -> torch.Tensor:
            return torch.zeros((num_blocks, block_size, *shape), dtype=dtype, device=device)

        k = [pool(s.kv_heads, s.k_head_dim) for s in specs]
        v = [pool(s.kv_heads, s.v_head_dim) for s in specs]
        if not fmt.scaled:
            return cls(k, v, block_size, fmt)
        return cls(k, v, block_size, fmt, [pool(s.kv_heads, dtype=fmt.scale_dtype) for s in specs],
                   [pool(s.kv_heads, dtype=fmt.scale_dtype) for s in specs], static)

    @property
    def bytes_per_block(self) -> int:
        pools = self.k + self.v + self.k_scale + self.v_scale
        return sum(p[0].numel() * p.element_size() for p in pools)

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_block * self.k[0].shape[0]

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the step's new key [T, Hkv, Dk] and value [T, Hkv, Dv] at flat slots [T]."""
        for j, (pools, scales, x) in enumerate(((self.k, self.k_scale, key), (self.v, self.v_scale, value))):
            pool = pools[layer]
            flat = _flat(pool)  # [N·bs, Hkv, D]
            if not self.fmt.scaled:
                flat.index_copy_(0, slots, x.to(pool.dtype))
                continue
            codes, scale = quantize(x, self.fmt) if self.static is None \
                else quantize_static(x, self.static[layer][j], self.fmt)  # [T, Hkv, D], [T, Hkv]
            # index_copy_ has no float8 kernel on the CPU: copy the code bytes
            _bytes(flat).index_copy_(0, slots, _bytes(codes))
            scales[layer].view(-1, pool.shape[2]).index_copy_(0, slots, scale)

    def read(self, layer: int, tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K [B, Hkv, nb·bs, Dk] and V [B, Hkv, nb·bs, Dv] in dtype of the blocks tables [B, nb] name."""
        if not self.fmt.scaled:
            return _gather(self.k[layer], tables).to(dtype), _gather(self.v[layer], tables).to(dtype)
        k_factor, v_factor = (1.0, 1.0) if self.static is None else self.static[layer]
        return (_gather_dequant(self.k[layer], self.k_scale[layer], tables, dtype, k_factor),
                _gather_dequant(self.v[layer], self.v_scale[layer], tables, dtype, v_factor))


    def attend_in_place(self, layer: int, q: torch.Tensor, runs: list[KeyRun], scale: float,
                        softcap: float | None) -> torch.Tensor:
        """One decode query q [H, Dk] over the keys `runs` name, read where they lie in the pools → [H, Dv].
        Each run is a view of consecutive pool slots (no copy when the pool holds the query's dtype). For 8-bit
        codes a run is converted once and its scales multiply the scores (K) and the probabilities (V), which are
        Dk/G and Dv/G times smaller than the keys and values they stand for."""
        kflat, vflat = _flat(self.k[layer]), _flat(self.v[layer])  # [N·bs, Hkv, Dk], [N·bs, Hkv, Dv]
        hkv = kflat.shape[1]
        qg = q.view(hkv, -1, q.shape[-1]) * scale  # [Hkv, G, Dk]
        parts = []
        for r in runs:
            s = qg @ _run(kflat, r, q.dtype).permute(1, 2, 0)  # [Hkv, G, L]
            parts.append(s.mul_(self._factors(0, layer, r, q.dtype)) if self.fmt.scaled else s)
        scores = parts[0] if len(parts) == 1 else torch.cat(parts, -1)  # [Hkv, G, S]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        probs = scores.softmax(-1)
        out, offset = None, 0
        for r in runs:
            p = probs[..., offset:offset + r.length]  # [Hkv, G, L]
            offset += r.length
            if self.fmt.scaled:
                p = p * self._factors(1, layer, r, q.dtype)
            part = p @ _run(vflat, r, q.dtype).transpose(0, 1)  # [Hkv, G, Dv]
            out = part if out is None else out.add_(part)
        return out.view(q.shape[0], -1)  # [H, Dv]

    def _factors(self, kv: int, layer: int, r: KeyRun, dtype: torch.dtype) -> torch.Tensor:
        """The dequantization multipliers [Hkv, 1, L] of run r's K (kv 0) or V (kv 1) codes in layer."""
        stored = (self.k_scale, self.v_scale)[kv][layer]
        factor = 1.0 if self.static is None else self.static[layer][kv]
        sc = stored.view(-1, stored.shape[2])[r.slot:r.slot + r.length]  # [L, Hkv]
        return scale_factors(sc, dtype, factor).t().unsqueeze(1)


def _flat(pool: torch.Tensor) -> torch.Tensor:
    """A pool [N, bs, Hkv, D] as flat slots [N·bs, Hkv, D] (a view)."""
    return pool.view(-1, *pool.shape[2:])


def _run(flat: torch.Tensor, r: KeyRun, dtype: torch.dtype) -> torch.Tensor:
    """The slots of run r [L, Hkv, D] in dtype: a view of the pool, or one conversion of just these slots."""
    x = flat[r.slot:r.slot + r.length]
    return x if x.dtype == dtype else codes_to(x, dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-byte tensor's storage as uint8 (same shape), for copies torch lacks for its dtype (float8 on the CPU)."""
    return t.view(torch.uint8) if t.dtype != torch.int8 else t


@dataclass(slots=True)
class Segment:
    """A run of ≥1 consecutive query tokens of one sequence inside the packed step."""

    start: int  # offset in the packed step
    length: int
    context: int  # keys gathered for this chunk (cached from its first live block + its own)
    block_table: torch.Tensor | None  # [nb] long from the first live block; None when the chunk starts at
    #                                   position 0 (keys are all new)
    # per window: [length, context] bool, True = attend; None = plain causal over the chunk's own keys
    masks: dict[Window, torch.Tensor | None]


@dataclass(frozen=True, slots=True)
class KeyRun:
    """Keys of one sequence at consecutive positions that sit in consecutive pool slots (one block, or several
    blocks the allocator handed out in a row)."""

    slot: int  # flat slot (block · block_size + offset) of the first key
    length: int


def key_runs(table: list[int], block_size: int, first: int, last: int) -> list[KeyRun]:
    """Where positions first..last (inclusive) of a sequence with positional block table `table` sit in the pool,
    consecutive blocks merged: a sequence prefilled in one go is one run, plus one per block it grew by while
    other sequences took the blocks after it."""
    lo, hi = first // block_size, last // block_size
    starts = [lo] + [i for i in range(lo + 1, hi + 1) if table[i] != table[i - 1] + 1]  # table index of each run
    runs = []
    for a, b in zip(starts, starts[1:] + [hi + 1]):  # table entries a..b-1, consecutive blocks
        begin = max(first, a * block_size)
        end = min(last + 1, b * block_size)
        runs.append(KeyRun(table[a] * block_size + begin - a * block_size, end - begin))
    return runs


@dataclass(slots=True)
class DecodeRows:
    """The step's single-token decode queries: the first `count` packed tokens, one per sequence. They read the
    cache one of two ways (model_runner.read_in_place picks): in place, each sequence's visible keys straight from
    the pool slots its `runs` name (no copy of the history), or gathered, every sequence's blocks copied into one
    padded [Bd, Hkv, S, D] batch for one masked SDPA call."""

    count: int
    runs: dict[Window, list[list[KeyRun]]] | None = None  # in place: per window, per sequence, its visible keys
    tables: torch.Tensor | None = None  # gathered: [Bd, nb] long, padded (and freed blocks mapped) to block 0
    masks: dict[Window, torch.Tensor] = field(default_factory=dict)  # gathered: [Bd, 1, 1, nb·bs] bool, True = attend
    flex: FlexRows | None = None  # flex: per window a BlockMask over the pool (flex_decode.py)


@dataclass(slots=True)
class StepContext:
    """Everything the attention function needs to know about one packed step."""

    cache: PagedKVCache
    specs: list[LayerSpec]
    slot_mapping: torch.Tensor  # [T] long: where each new token's K/V goes (flat slot index)
    decode: DecodeRows | None  # the leading single-token queries; None when the step has none
    segments: list[Segment] = field(default_factory=list)


@dataclass(slots=True)
class AttentionProbe:
    """Collects each layer's LayerSpec during one probe forward (no cache, attention over the new tokens)."""

    specs: dict[int, LayerSpec] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)  # features this engine would get wrong


_CURRENT: ContextVar[StepContext | AttentionProbe | None] = ContextVar("llmopt_step", default=None)


@contextlib.contextmanager
def step_context(ctx: StepContext | AttentionProbe) -> Iterator[None]:
    """Make `ctx` what paged_attention sees during the model forward run inside this block."""
    token = _CURRENT.set(ctx)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _blocks(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Whole blocks of pool [N, bs, ...] picked by tables [B, nb] → [B, nb, bs, ...], one copy. index_select over
    flat block rows, not pool[tables] (advanced indexing, several times slower for 1-byte codes; bench/kv_cache.py
    keeps it as a row). float8 has no CPU index_select: its bytes are copied."""
    b, nb = tables.shape
    src = _bytes(pool) if pool.element_size() == 1 else pool
    picked = torch.index_select(src.view(pool.shape[0], -1), 0, tables.reshape(-1))  # [B·nb, bs·...]
    return picked.view(b, nb, *pool.shape[1:]).view(pool.dtype)


def _gather(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Blocks of pool [N, bs, Hkv, D] picked by tables [B, nb] → [B, Hkv, nb*bs, D] (one copy, no GQA repeat)."""
    b, nb = tables.shape
    blocks = _blocks(pool, tables)  # [B, nb, bs, Hkv, D]
    return blocks.view(b, nb * pool.shape[1], pool.shape[2], pool.shape[3]).transpose(1, 2)


def _gather_dequant(codes: torch.Tensor, scales: torch.Tensor, tables: torch.Tensor, dtype: torch.dtype,
                    factor: float = 1.0) -> torch.Tensor:
    """Blocks of codes [N, bs, Hkv, D] and stored scales [N, bs, Hkv] picked by tables [B, nb], dequantized to
    dtype (times a static layer scale `factor`) → [B, Hkv, nb*bs, D]: only the blocks this step reads are
    converted, never the whole pool."""
    b, nb = tables.shape
    picked = _blocks(codes, tables)  # [B, nb, bs, Hkv, D]
    x = codes_to(picked, dtype)  # one conversion pass, then an in-place scale (no third tensor)
    x.mul_(scale_factors(_blocks(scales, tables), dtype, factor).unsqueeze(-1))  # [B, nb, bs, Hkv, 1] over D
    return x.view(b, nb * codes.shape[1], codes.shape[2], codes.shape[3]).transpose(1, 2)


def _softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                softcap: float) -> torch.Tensor:
    """Attention with tanh logit softcapping: q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv],
    mask broadcastable to [B, 1, L, S] (None = causal, L == S) → [B, H, L, Dv].
    Query heads are grouped over their kv head (a broadcast, not a repeat_kv copy of the cache)."""
    b, h, n, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    qg = q.view(b, hkv, h // hkv, n, d)  # [B, Hkv, G, L, D]
    scores = qg @ k.unsqueeze(2).transpose(-1, -2) * scale  # [B, Hkv, G, L, S]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril()  # [L, S]
    else:
        mask = mask.view(mask.shape[0], 1, 1, n, s) if mask.dim() == 4 else mask  # [B, 1, 1, L, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    return (probs @ v.unsqueeze(2)).view(b, h, n, v.shape[-1])  # [B, H, L, Dv]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
            softcap: float | None) -> torch.Tensor:
    """q [B, H, L, D], k/v [B, Hkv, S, D/Dv], bool mask (None = causal over own keys) → [B, H, L, Dv]."""
    if softcap is not None:
        return _softcapped(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale, softcap)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def _probe(probe: AttentionProbe, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scaling: float | None, kwargs: dict) -> tuple[torch.Tensor, None]:
    """Record the layer's spec from what its module passes, and attend causally over the new tokens."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    softcap = kwargs.get("softcap")
    spec = LayerSpec(key.shape[1], key.shape[3], value.shape[3], int(window) if window else None,
                     float(softcap) if softcap else None)
    if kwargs.get("s_aux") is not None:
        probe.refusals.append("attention sinks (s_aux)")
    if getattr(module, "is_causal", True) is False:
        probe.refusals.append("non-causal attention")
    layer = getattr(module, "layer_idx", None)
    if layer is None:  # the cache is indexed by layer
        probe.refusals.append(f"attention module {type(module).__name__} without a layer_idx")
    else:
        probe.specs[layer] = spec
    out = _attend(query, key, value, None, scaling, spec.softcap)  # [1, H, T, Dv]
    return out.transpose(1, 2), None


def paged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, H, T, Dk], key [1, Hkv, T, Dk], value [1, Hkv, T, Dv] of the new tokens → output [1, T, H, Dv]."""
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError("llmopt's paged attention ran outside an engine step (no step_context)")
    if isinstance(ctx, AttentionProbe):
        return _probe(ctx, module, query, key, value, scaling, kwargs)
    layer = module.layer_idx
    spec = ctx.specs[layer]
    cache = ctx.cache
    cache.write(layer, ctx.slot_mapping, key[0].transpose(0, 1), value[0].transpose(0, 1))  # [T, Hkv, D]

    t, h = query.shape[2], query.shape[1]
    out = query.new_empty(t, h, spec.v_head_dim)  # [T, H, Dv]
    rows = ctx.decode
    if rows is not None:
        bd = rows.count
        q = query[0, :, :bd].transpose(0, 1)  # [Bd, H, Dk]
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        if rows.runs is not None:
            for i, runs in enumerate(rows.runs[spec.window]):
                out[i] = cache.attend_in_place(layer, q[i], runs, scale, spec.softcap)
        elif rows.flex is not None:  # the pool holds the query's dtype (model_runner.resolve_decode_attention)
            out[:bd] = flex_decode.attend(q, _flat(cache.k[layer]), _flat(cache.v[layer]), rows.flex, spec.window,
                                          scale, spec.softcap)
        else:
            k, v = cache.read(layer, rows.tables, q.dtype)  # [Bd, Hkv, S, Dk], [Bd, Hkv, S, Dv]
            out[:bd] = _attend(q.unsqueeze(2), k, v, rows.masks[spec.window], scaling, spec.softcap)[:, :, 0]
    for seg in ctx.segments:
        s, n = seg.start, seg.length
        q = query[:, :, s:s + n]  # [1, H, L, Dk]
        if seg.block_table is None:  # fresh prompt: its keys are exactly this chunk's, unquantized (as vLLM)
            k, v = key[:, :, s:s + n], value[:, :, s:s + n]  # [1, Hkv, L, Dk/Dv]
        else:
            k, v = cache.read(layer, seg.block_table[None], q.dtype)  # [1, Hkv, nb·bs, Dk/Dv]
            k, v = k[:, :, :seg.context], v[:, :, :seg.context]  # [1, Hkv, C, Dk/Dv]
        out[s:s + n] = _attend(q, k, v, seg.masks[spec.window], scaling, spec.softcap)[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> str:
    """Register the paged attention with transformers (idempotent); returns its implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention)
    return ATTN_NAME
