"""Runs one packed step through the HF model: builds positions, slots and attention metadata, returns logits.

Any HF causal LM whose attention modules call `ALL_ATTENTION_FUNCTIONS` (Llama, Qwen2, Mistral, ...)
works, including ones whose Linear layers were swapped for quantized runtime modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from llmopt.engine.attention import PagedKVCache, Segment, StepContext, register
from llmopt.engine.block_manager import BlockManager
from llmopt.engine.sequence import Sequence
from llmopt.errors import LlmoptError


def check_supported(model) -> None:
    """Refuse models whose attention this engine would get wrong, instead of returning wrong tokens."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise LlmoptError("sliding-window attention is not supported by llmopt's engine: use --engine hf")
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        raise LlmoptError("models with non-full attention layers are not supported by llmopt's engine: "
                          "use --engine hf")


@contextlib.contextmanager
def paged_attention_enabled(model) -> Iterator[None]:
    """Route the model's attention through the paged function while the engine runs, then restore it."""
    name = register()
    configs = [c for c in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()]
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = name
    try:
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, blocks: BlockManager) -> None:
        self.model = model
        self.cache = cache
        self.blocks = blocks
        self.device = cache.k[0].device

    def _tensor(self, data: list[int]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def build(self, work: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor, StepContext, list[int]]:
        """Pack the step: decode tokens first, then chunks. Returns input ids [T], positions [T], the
        attention context, and for each work item the packed index of its first token."""
        bs = self.blocks.block_size
        decode = [(s, n) for s, n in work if n == 1]
        chunks = [(s, n) for s, n in work if n > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        first: dict[int, int] = {}
        for seq, n in decode + chunks:
            toks = seq.tokens
            start = seq.num_computed
            first[seq.id] = len(ids)
            ids.extend(toks[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend(self.blocks.slot(seq, p) for p in range(start, start + n))
        tables = mask = None
        if decode:
            nb = max(len(s.block_table) for s, _ in decode)
            tables = self._tensor([s.block_table + [0] * (nb - len(s.block_table)) for s, _ in decode]
                                  ).view(len(decode), nb)  # [Bd, nb]
            lens = self._tensor([s.num_computed + 1 for s, _ in decode])  # [Bd]
            mask = (torch.arange(nb * bs, device=self.device)[None] < lens[:, None])[:, None, None]  # [Bd,1,1,S]
        segments = []
        offset = len(decode)
        for seq, n in chunks:
            start = seq.num_computed
            if start == 0:
                segments.append(Segment(offset, n, n, None, None))
            else:
                ctx = start + n
                qpos = torch.arange(start, ctx, device=self.device)
                m = torch.arange(ctx, device=self.device)[None] <= qpos[:, None]  # [n, ctx] causal with offset
                segments.append(Segment(offset, n, ctx, self._tensor(seq.block_table), m))
            offset += n
        step = StepContext(self.cache, self._tensor(slots), len(decode), tables, mask, segments)
        return self._tensor(ids), self._tensor(pos), step, [first[s.id] for s, _ in work]

    @torch.inference_mode()
    def forward(self, work: list[tuple[Sequence, int]], keep: list[int] | None = None) -> torch.Tensor:
        """Logits at the last keep[i] (default 1) fed tokens of each work item, in work order: [sum(keep), V]."""
        ids, pos, step, first = self.build(work)
        keep = keep or [1] * len(work)
        rows = [f + n - k + j for (_, n), f, k in zip(work, first, keep) for j in range(k)]
        out = self.model(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                         logits_to_keep=self._tensor(rows), llmopt_step=step)
        return out.logits[0]  # [R, V]
