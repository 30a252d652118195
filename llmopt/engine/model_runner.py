"""Runs one packed step through the HF model: builds positions, slots and attention metadata, returns logits.

Any HF causal LM whose attention modules call `ALL_ATTENTION_FUNCTIONS` (Llama, Qwen2, Mistral, Gemma2/3,
DeepSeek V3, ...) or have an adapter that does (adapters.py: Falcon) works, including ones whose Linear layers
were swapped for quantized runtime modules.
`inspect_attention` learns each layer's LayerSpec with one probe forward and refuses what would be served wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from llmopt.engine import flex_decode
from llmopt.engine.adapters import adapted, refuse
from llmopt.engine.attention import (
    AttentionProbe,
    DecodeRows,
    LayerSpec,
    PagedKVCache,
    Segment,
    StepContext,
    Window,
    key_runs,
    register,
    step_context,
)
from llmopt.engine.block_manager import FREED, BlockManager
from llmopt.engine.sequence import Sequence
from llmopt.errors import LlmoptError
from llmopt.utils import dtype_name, text_config

_SERVED_LAYER_TYPES = {"full_attention", "sliding_attention"}


def _text_config(model):
    return text_config(model.config)


@contextlib.contextmanager
def paged_attention_enabled(model) -> Iterator[None]:
    """Route the model's attention through the paged function while the engine runs (the attention
    implementation of every config, the adapted forward of modules that compute attention inline), then restore."""
    name = register()
    configs = [c for c in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()]
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = name
    try:
        with adapted(model):
            yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s


def inspect_attention(model) -> list[LayerSpec]:
    """Each layer's LayerSpec, from what its HF attention module passes to the attention function in a one-token
    probe forward. Refuses (LlmoptError) models this engine would serve wrong instead of returning wrong tokens:
    layers whose attention does not go through transformers' attention interface and has no adapter, what an
    adapter refuses (Falcon's ALiBi), layer types other than full/sliding, a window the config declares but the
    module does not pass, sinks."""
    config = _text_config(model)
    layers = config.num_hidden_layers
    layer_types = list(getattr(config, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - _SERVED_LAYER_TYPES)
    if unknown:
        raise refuse(f"attention layer type {', '.join(unknown)}")
    probe = AttentionProbe()
    device = model.get_input_embeddings().weight.device
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    try:
        with paged_attention_enabled(model), step_context(probe), torch.inference_mode():
            model(input_ids=ids, position_ids=ids, use_cache=False, logits_to_keep=1)
    except LlmoptError:  # an adapter's refusal, already one line
        raise
    except Exception as e:  # a layer that computes attention itself fails on the masks it was not given
        if len(probe.specs) < layers:
            raise refuse(f"{type(model).__name__}'s attention (layer {len(probe.specs)} does not call "
                         f"transformers' attention interface)") from e
        raise
    if probe.refusals:
        raise refuse(probe.refusals[0])
    if sorted(probe.specs) != list(range(layers)):
        missing = sorted(set(range(layers)) - set(probe.specs))
        raise refuse(f"{type(model).__name__}'s attention (layers {missing} do not call transformers' attention "
                     f"interface)")
    specs = [probe.specs[i] for i in range(layers)]
    declared = getattr(config, "sliding_window", None)
    for i, (t, s) in enumerate(zip(layer_types, specs)):
        if t == "sliding_attention" and s.window is None:
            raise refuse(f"sliding-window layer {i} whose module does not pass its window to the attention function")
    if (declared and not layer_types and getattr(config, "use_sliding_window", True) is not False
            and all(s.window is None for s in specs)):
        raise refuse("a sliding window the attention modules do not pass to the attention function")
    return specs


def common_window(specs: list[LayerSpec]) -> int | None:
    """The window blocks can be freed by: the largest one when every layer is sliding, else None."""
    windows = [s.window for s in specs]
    return None if any(w is None for w in windows) else max(windows)


# Decode reads the cache in place on the CPU for one sequence, or once a batch's mean context reaches this many
# tokens: below it, one attention call per sequence costs more than copying the short histories into one padded
# batch (measured with bench/kv_cache.py --rows "float32 gathered"; numbers in the README's KV-cache section).
IN_PLACE_MIN_CONTEXT = 384


def read_in_place(device: torch.device, contexts: list[int]) -> bool:
    """Whether a decode batch with these context lengths reads its keys in place (KeyRuns, one matmul pair per
    sequence) rather than gathered into one padded batch for one SDPA call. A rule, not a timing, so the path a
    batch takes is the same on every run. On CUDA the gather + one SDPA launch stays (a per-sequence loop is
    dominated by kernel launches there; not measured: no GPU run yet)."""
    if device.type != "cpu":
        return False
    return len(contexts) == 1 or sum(contexts) >= IN_PLACE_MIN_CONTEXT * len(contexts)


def _first_visible(pos: int, window: Window) -> int:
    """The oldest key position a query at pos sees: keys j > pos − window."""
    return 0 if window is None else max(0, pos - window + 1)


def _gatherable(table: list[int]) -> list[int]:
    """A block table with FREED entries on block 0: their keys are outside every window, so masked."""
    return [0 if b == FREED else b for b in table]


DECODE_ATTENTION = ("auto", "in-place", "gathered", "flex")


def resolve_decode_attention(choice: str, specs: list[LayerSpec], cache: PagedKVCache, dtype: torch.dtype,
                             block_size: int, heads: int) -> tuple[str, str | None]:
    """The decode read path a runner uses for `choice` (EngineConfig.decode_attention), and for auto on CUDA why
    FlexAttention was not taken. auto: the CPU's fixed rule (`rule`: in place or gathered per batch); on CUDA flex
    when its one-time probe matches SDPA and the pool holds the query's dtype, else gathered. An explicit flex that
    cannot serve this cache is a one-line error."""
    if choice not in DECODE_ATTENTION:
        raise LlmoptError(f"decode attention must be one of {', '.join(DECODE_ATTENTION)} (got {choice!r})")
    device = cache.k[0].device
    if choice in ("in-place", "gathered") or (choice == "auto" and device.type == "cpu"):
        return ("rule" if choice == "auto" else choice), None
    why = None
    if cache.fmt.scaled:
        why = f"a {cache.fmt.name} KV cache (its V scales multiply the probabilities)"
    elif cache.fmt.dtype != dtype:
        why = f"a {cache.fmt.name} KV cache under {dtype_name(dtype)} queries (a whole-pool cast)"
    for k_dim, v_dim in sorted({(s.k_head_dim, s.v_head_dim) for s in specs}):
        if why is None:
            kv_heads = max(s.kv_heads for s in specs if (s.k_head_dim, s.v_head_dim) == (k_dim, v_dim))
            why = flex_decode.probe(device, dtype, heads, kv_heads, k_dim, v_dim, block_size)
    if why is None:
        return "flex", None
    if choice == "flex":
        raise LlmoptError(f"FlexAttention decode cannot serve {why}: use decode attention auto or gathered")
    return "gathered", f"FlexAttention not used: {why}"


def make_runner(model, specs: list[LayerSpec], cache: PagedKVCache, blocks: BlockManager,
                choice: str) -> ModelRunner:
    """A runner whose decode read path is `choice` resolved for this model, cache and device."""
    config = _text_config(model)
    heads = getattr(config, "num_attention_heads", None) or max(s.kv_heads for s in specs)
    dtype = model.get_input_embeddings().weight.dtype
    path, note = resolve_decode_attention(choice, specs, cache, dtype, blocks.block_size, heads)
    runner = ModelRunner(model, specs, cache, blocks, path)
    runner.note = note
    return runner


class ModelRunner:
    def __init__(self, model, specs: list[LayerSpec], cache: PagedKVCache, blocks: BlockManager,
                 decode_path: str = "rule") -> None:
        self.model = model
        self.specs = specs
        self.windows: list[Window] = sorted({s.window for s in specs}, key=lambda w: w or 0)
        self.cache = cache
        self.blocks = blocks
        self.device = cache.k[0].device
        self.decode_path = decode_path  # resolve_decode_attention's answer
        self.note: str | None = None  # why auto did not take FlexAttention (make_runner)
        # what the steps did, for the eval report: decode steps per read path, prompt chunks by attention kind
        self.counts: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _tensor(self, data: list[int]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def _segment_masks(self, first_key: int, start: int, n: int) -> dict[Window, torch.Tensor | None]:
        """Per window, the [n, start + n − first_key] mask of a chunk whose queries sit at positions
        start..start+n-1 over keys first_key..start+n-1; None where a fresh chunk's plain causal attention is
        already right (no window, or one ≥ the chunk)."""
        masks: dict[Window, torch.Tensor | None] = {}
        qpos = torch.arange(start, start + n, device=self.device)[:, None]  # [n, 1]
        kpos = torch.arange(first_key, start + n, device=self.device)[None]  # [1, ctx]
        causal = kpos <= qpos if start else None  # [n, ctx] causal with offset
        for w in self.windows:
            if w is None or (start == 0 and n <= w):
                masks[w] = causal
            else:
                masks[w] = (kpos <= qpos) & (kpos > qpos - w)  # [n, ctx]
        return masks

    def build(self, work: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor, StepContext, list[int]]:
        """Pack the step: decode tokens first, then chunks. Returns input ids [T], positions [T], the
        attention context, and for each work item the packed index of its first token."""
        decode = [s for s, n in work if n == 1]
        chunks = [(s, n) for s, n in work if n > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        first: dict[int, int] = {}
        for seq, n in [(s, 1) for s in decode] + chunks:
            start = seq.num_computed
            first[seq.id] = len(ids)
            ids.extend(seq.token_slice(start, n))
            pos.extend(range(start, start + n))
            slots.extend(self.blocks.slot(seq, p) for p in range(start, start + n))
        step = StepContext(self.cache, self.specs, self._tensor(slots), self.prepare_decode(decode) if decode else None,
                           self.prepare_prefill(chunks, len(decode)))
        return self._tensor(ids), self._tensor(pos), step, [first[s.id] for s, _ in work]

    def prepare_decode(self, decode: list[Sequence]) -> DecodeRows:
        """Where each decode query's visible keys are: runs of pool slots per window (read in place), or, where
        read_in_place says gathering is faster, a padded block table and masks shared by every layer."""
        bs = self.blocks.block_size
        path = self.decode_path
        if path == "rule":
            path = "in-place" if read_in_place(self.device, [s.num_computed + 1 for s in decode]) else "gathered"
        self._count(f"decode {path}")
        if path == "in-place":
            runs = {w: [key_runs(s.block_table, bs, _first_visible(s.num_computed, w), s.num_computed)
                        for s in decode] for w in self.windows}
            return DecodeRows(len(decode), runs=runs)
        if path == "flex":
            return DecodeRows(len(decode), flex=self._flex_rows(decode))
        lo = min(self.blocks.first_live(s) for s in decode)  # leading blocks no decode query sees
        nb = max(len(s.block_table) for s in decode) - lo
        tables = self._tensor([_gatherable(s.block_table[lo:]) + [0] * (nb + lo - len(s.block_table))
                               for s in decode]).view(len(decode), nb)  # [Bd, nb]
        qpos = self._tensor([s.num_computed for s in decode])[:, None]  # [Bd, 1]
        kpos = torch.arange(lo * bs, (lo + nb) * bs, device=self.device)[None]  # [1, S]
        real = kpos <= qpos  # [Bd, S]
        masks = {w: (real if w is None else real & (kpos > qpos - w))[:, None, None]  # [Bd, 1, 1, S]
                 for w in self.windows}
        return DecodeRows(len(decode), tables=tables, masks=masks)

    def _flex_rows(self, decode: list[Sequence]) -> flex_decode.FlexRows:
        """Each decode row's live blocks (−1 padded) and logical index of the first, for flex_decode.block_masks."""
        firsts = [self.blocks.first_live(s) for s in decode]
        nb = max(len(s.block_table) - f for s, f in zip(decode, firsts))
        tables = self._tensor([s.block_table[f:] + [-1] * (nb - len(s.block_table) + f)
                               for s, f in zip(decode, firsts)]).view(len(decode), nb)  # [Bd, nb]
        return flex_decode.block_masks(tables, self._tensor(firsts), self._tensor([s.num_computed for s in decode]),
                                       self.blocks.stats.num_blocks, self.blocks.block_size, self.windows)

    def prepare_prefill(self, chunks: list[tuple[Sequence, int]], offset: int) -> list[Segment]:
        """One Segment per prompt (or verification) chunk, packed after the `offset` decode tokens. A chunk
        that starts at position 0 attends to its own new keys; a later one gathers its sequence's live blocks
        (leading FREED blocks, out of every window, are left out, so a long windowed sequence costs its window)."""
        bs = self.blocks.block_size
        segments = []
        for seq, n in chunks:
            start = seq.num_computed
            first_key = self.blocks.first_live(seq) * bs
            table = self._tensor(_gatherable(seq.block_table[first_key // bs:])) if start else None
            masks = self._segment_masks(first_key, start, n)
            self._count("prefill masked" if any(m is not None for m in masks.values()) else "prefill is_causal")
            segments.append(Segment(offset, n, start + n - first_key, table, masks))
            offset += n
        return segments

    @torch.inference_mode()
    def forward(self, work: list[tuple[Sequence, int]], keep: list[int] | None = None) -> torch.Tensor:
        """Logits at the last keep[i] (default 1) fed tokens of each work item, in work order: [sum(keep), V]."""
        ids, pos, step, first = self.build(work)
        keep = keep or [1] * len(work)
        rows = [f + n - k + j for (_, n), f, k in zip(work, first, keep) for j in range(k)]
        with step_context(step):
            out = self.model(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                             logits_to_keep=self._tensor(rows))
        return out.logits[0]  # [R, V]
