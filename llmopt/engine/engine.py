"""The inference loop: requests in, tokens with per-token timestamps out.

Each step the scheduler picks work, the runner runs it as one packed forward over the paged KV cache,
the sampler picks tokens, finished requests free their blocks. With a draft model attached the decode
part of each step is speculative (see speculative.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmopt.engine.attention import PagedKVCache, kv_bytes_per_token
from llmopt.engine.block_manager import BlockManager, blocks_for
from llmopt.engine.kv_format import KVFormat, check_kv_dtype, resolve_kv_format
from llmopt.engine.model_runner import (
    DECODE_ATTENTION,
    common_window,
    inspect_attention,
    make_runner,
    paged_attention_enabled,
)
from llmopt.engine.sampling import SamplingParams, sample_rows
from llmopt.engine.scheduler import Scheduler, SchedulerConfig
from llmopt.engine.sequence import Sequence, Status
from llmopt.errors import LlmoptError
from llmopt.models.loading import max_context as context_of


@dataclass(frozen=True, slots=True)
class EngineConfig:
    kv_budget: int  # bytes for the KV block pool
    block_size: int = 16
    max_prefill_tokens: int = 1024
    max_num_seqs: int = 256
    max_blocks: int | None = None  # never allocate more blocks than this (e.g. what a workload can use)
    kv_dtype: str = "auto"  # how the cache stores K/V (kv_format.KV_DTYPES); auto = the model's dtype
    # how decode reads the pool (model_runner.DECODE_ATTENTION): auto = the CPU's in-place/gathered rule, on CUDA
    # FlexAttention where its probe passes; in-place, gathered, flex force one path (flex on a CPU runs torch's
    # eager reference: for checking the CUDA path's tokens, not for speed)
    decode_attention: str = "auto"

    def __post_init__(self) -> None:
        check_kv_dtype(self.kv_dtype)
        if self.decode_attention not in DECODE_ATTENTION:
            raise LlmoptError(f"decode attention must be one of {', '.join(DECODE_ATTENTION)} "
                              f"(got {self.decode_attention!r})")
        if self.block_size < 1:
            raise LlmoptError(f"--block-size must be ≥ 1 (got {self.block_size})")
        if self.kv_budget < 1:
            raise LlmoptError(f"--kv-budget must be positive (got {self.kv_budget} bytes)")
        if self.max_prefill_tokens < 1:
            raise LlmoptError(f"--max-prefill-tokens must be ≥ 1 (got {self.max_prefill_tokens})")
        if self.max_num_seqs < 1:
            raise LlmoptError(f"--max-num-seqs must be ≥ 1 (got {self.max_num_seqs})")


def model_dtype(model) -> torch.dtype:
    """Activation dtype (the embedding's), also right for models whose Linear weights are int codes."""
    return model.get_input_embeddings().weight.dtype


def max_context(model) -> int:
    """The model's context length, by the one rule every command uses (models.loading.max_context)."""
    return context_of(model.config)


@dataclass(frozen=True, slots=True)
class KVStats:
    block_size: int
    num_blocks: int
    pool_bytes: int  # the whole pool
    peak_blocks: int
    peak_tokens: int  # tokens the held blocks stored at that peak (blocks out of the window were freed)
    allocated_bytes: int  # peak_blocks' bytes
    # peak_tokens·Σ_layers kv_heads·((k_head_dim + v_head_dim)·bytes + 2·scale_bytes): 2·layers·kv_heads·head_dim·
    # bytes per token where K and V share a head dim (MLA's decompressed K and V do not), plus a K and a V scale
    # per kv head when the cache is quantized (--kv-dtype int8/fp8_e4m3)
    formula_bytes: int
    waste_bytes: int  # allocated − formula: the unused tails of blocks
    preemptions: int
    kv_dtype: str  # the resolved storage (auto → the model's dtype name)
    # which scales int8/fp8 codes use: "dynamic per (token, kv head)", "static per layer (checkpoint k_scale/
    # v_scale, <kind>-calibrated)", or "none" for a float cache
    kv_scales: str = "none"


class LLMEngine:
    def __init__(self, model, config: EngineConfig, eos_id: int | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.specs = inspect_attention(model)
        self.model = model
        self.config = config
        self.eos_id = eos_id
        self.clock = clock
        self.kv_format: KVFormat = resolve_kv_format(config.kv_dtype, model_dtype(model))
        device = model.get_input_embeddings().weight.device
        self.kv_bytes_per_token = kv_bytes_per_token(self.specs, self.kv_format)  # every layer, one token, scales too
        per_block = self.kv_bytes_per_token * config.block_size
        num_blocks = config.kv_budget // per_block
        if num_blocks < 1:
            raise LlmoptError(f"--kv-budget of {config.kv_budget} bytes holds no KV block ({per_block} bytes per "
                              f"block of {config.block_size} tokens): raise --kv-budget")
        if config.max_blocks is not None:
            num_blocks = max(1, min(num_blocks, config.max_blocks))
        self.blocks = BlockManager(num_blocks, config.block_size, common_window(self.specs))
        static = self._static_kv_scales(model)
        self.cache = PagedKVCache.allocate(self.specs, num_blocks, config.block_size, self.kv_format, device, static)
        self.runner = make_runner(model, self.specs, self.cache, self.blocks, config.decode_attention)
        self.scheduler = Scheduler(self.blocks, SchedulerConfig(config.max_num_seqs, config.max_prefill_tokens))
        self.max_context = max_context(model)
        self.sequences: list[Sequence] = []
        self.speculator = None  # set by speculative.attach_draft
        self.routed_models = [model]  # models whose attention goes through the paged function while running
        self.t0: float | None = None

    def _static_kv_scales(self, model) -> list[tuple[float, float]] | None:
        """A checkpoint's calibrated per-layer K/V scales (model.kv_cache_scales, set by the quantized runtime) in
        this cache's code range when --kv-dtype is int8/fp8; None (dynamic per-token scales) otherwise."""
        table = getattr(model, "kv_cache_scales", None)
        self.kv_scales_used = "dynamic per (token, kv head)" if self.kv_format.scaled else "none"
        if table is None or not self.kv_format.scaled:
            return None
        if len(table.k) != len(self.specs):
            raise LlmoptError(f"the checkpoint's KV scales cover {len(table.k)} layers, the model has "
                              f"{len(self.specs)}")
        note = f"; {table.note}" if table.note else ""
        self.kv_scales_used = f"static per layer (checkpoint k_scale/v_scale, {table.kind}-calibrated{note})"
        return table.for_qmax(self.kv_format.qmax)

    def now(self) -> float:
        return self.clock() - (self.t0 if self.t0 is not None else self.clock())

    def check_request(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a request that could never run (the one-line errors the CLI shows)."""
        total = prompt_len + max_tokens
        if total > self.max_context:
            raise LlmoptError(f"a request of {prompt_len} prompt + {max_tokens} output tokens exceeds the model's "
                              f"maximum context of {self.max_context}: shorten --prompt-len/--output-len")
        bs, window = self.blocks.block_size, self.blocks.window
        need = blocks_for(total - 1, bs)
        if window is not None:  # blocks leave the window: live are at most window − 1 keys + one step's tokens,
            # from a block boundary (the block manager frees whole blocks)
            need = min(need, blocks_for(window + self.config.max_prefill_tokens + bs - 2, bs))
        if need > self.blocks.stats.num_blocks:
            have = self.blocks.stats.num_blocks * self.cache.bytes_per_block
            raise LlmoptError(f"KV budget too small for one request: {total} tokens need {need} blocks, the budget "
                              f"({have} bytes) holds {self.blocks.stats.num_blocks}: raise --kv-budget")

    def add(self, prompt: list[int], params: SamplingParams, arrival: float = 0.0) -> Sequence:
        self.check_request(len(prompt), params.max_tokens)
        seq = Sequence(len(self.sequences), list(prompt), params, arrival, self.eos_id)
        self.sequences.append(seq)
        self.scheduler.add(seq)
        if self.speculator is not None:
            self.speculator.add(seq)
        return seq

    def step(self) -> list[Sequence]:
        """One packed forward (or a wait for the next arrival). Returns the sequences that finished."""
        step = self.scheduler.schedule(self.now())
        if self.speculator is not None:
            self.speculator.on_preempted(step.preempted)
        if not step:
            nxt = self.scheduler.next_arrival()
            if nxt is not None:
                time.sleep(max(0.0, nxt - self.now()))
            return []
        if self.speculator is not None:
            return self.speculator.step(step.work)
        logits = self.runner.forward(step.work)  # [len(work), V]
        done_rows = [i for i, (seq, n) in enumerate(step.work) if n == seq.pending]
        seqs = [step.work[i][0] for i in done_rows]
        tokens = sample_rows(logits[done_rows], [s.params for s in seqs], [s.generator for s in seqs])
        t = self.now()  # after sampling: its .tolist() waits for the device, so t is when the tokens exist
        for seq, n in step.work:
            seq.num_computed += n
        return self.append_tokens(seqs, [[tok] for tok in tokens], t)

    def append_tokens(self, seqs: list[Sequence], new: list[list[int]], t: float) -> list[Sequence]:
        """Add sampled tokens (stamped t), cutting at EOS / max_tokens; finish and free what is done."""
        finished = []
        for seq, toks in zip(seqs, new):
            for tok in toks:
                seq.output.append(tok)
                seq.token_times.append(t)
                if seq.done:
                    break
            if seq.done:
                self.scheduler.finish(seq)
                if self.speculator is not None:
                    self.speculator.release(seq)
                finished.append(seq)
        return finished

    def run(self, progress: Callable[[int], None] | None = None) -> list[Sequence]:
        """Run until every added request finished; returns them in the order added."""
        self.t0 = self.clock()
        with contextlib.ExitStack() as stack:
            for m in self.routed_models:
                stack.enter_context(paged_attention_enabled(m))
            while self.scheduler.has_work:
                finished = self.step()
                if progress is not None and finished:
                    progress(len(finished))
        return list(self.sequences)

    def teacher_forced_logits(self, tokens: list[int], chunk: int) -> torch.Tensor:
        """Next-token logits [len(tokens), V] (the model's dtype) at every position of `tokens`, fed through the paged cache
        as a one-token first chunk, then chunks of `chunk`: every later query reads its keys, its own chunk's
        included, back from the cache (a fresh prompt's first chunk attends to its unstored keys), so the
        distributions are what decode sees through this engine's --kv-dtype."""
        if chunk < 1:
            raise LlmoptError(f"a teacher-forcing chunk holds at least one token (got {chunk})")
        if len(tokens) > self.max_context:
            raise LlmoptError(f"a window of {len(tokens)} tokens exceeds the model's maximum context of "
                              f"{self.max_context}: shorten it")
        need = blocks_for(len(tokens), self.blocks.block_size)
        if need > self.blocks.num_free:
            raise LlmoptError(f"a window of {len(tokens)} tokens needs {need} KV blocks, {self.blocks.num_free} are "
                              f"free: raise --kv-budget")
        seq = Sequence(-1, list(tokens), SamplingParams(max_tokens=1))
        self.blocks.reserve(seq, len(tokens))
        rows: list[torch.Tensor] = []
        try:
            with paged_attention_enabled(self.model):
                while seq.num_computed < len(tokens):
                    n = 1 if seq.num_computed == 0 else min(chunk, len(tokens) - seq.num_computed)
                    rows.append(self.runner.forward([(seq, n)], [n]))  # [n, V]
                    seq.num_computed += n
        finally:
            self.blocks.release(seq)
        return torch.cat(rows)  # [L, V]

    def attention_stats(self) -> AttentionStats:
        counts = dict(self.runner.counts)
        if self.speculator is not None:
            counts.update({f"draft {k}": n for k, n in self.speculator.runner.counts.items()})
        return AttentionStats(self.runner.decode_path, counts, self.runner.note)

    def kv_stats(self) -> KVStats:
        st = self.blocks.stats
        per_block = self.cache.bytes_per_block
        formula = st.peak_tokens * self.kv_bytes_per_token
        return KVStats(st.block_size, st.num_blocks, self.cache.total_bytes, st.peak_blocks, st.peak_tokens,
                       st.peak_blocks * per_block, formula, st.peak_blocks * per_block - formula,
                       self.scheduler.num_preemptions, self.kv_format.name, self.kv_scales_used)


@dataclass(frozen=True, slots=True)
class AttentionStats:
    """How the engine's steps attended (the eval report's `perf.attention`)."""

    decode_path: str  # the configured read path: rule (CPU: in place or gathered per batch), in-place, gathered, flex
    counts: dict[str, int]  # decode steps per path taken ("decode in-place" …), prompt chunks ("prefill is_causal",
    #                         "prefill masked"), the draft's prefixed "draft "
    note: str | None = None  # why auto did not take FlexAttention on an accelerator

    def to_dict(self) -> dict:
        return {"decode_path": self.decode_path, "counts": dict(sorted(self.counts.items())), "note": self.note}


def generate(model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             config: EngineConfig, eos_id: int | None = None) -> list[list[int]]:
    """Convenience: run prompts to completion, return their output token lists."""
    engine = LLMEngine(model, config, eos_id)
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for p, sp in zip(prompts, plist):
        engine.add(p, sp)
    return [s.output for s in engine.run()]


__all__ = ["AttentionStats", "EngineConfig", "KVStats", "LLMEngine", "Status", "generate"]
