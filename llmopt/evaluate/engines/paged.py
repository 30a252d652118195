"""`--engine llmopt`: llmopt's continuous-batching paged engine (optionally with a speculative draft)."""

from __future__ import annotations

from llmopt.engine import EngineConfig
from llmopt.engine.block_manager import blocks_for
from llmopt.evaluate.budget import parse_kv_budget
from llmopt.evaluate.engines import EngineContext
from llmopt.evaluate.perf import RunOutput, run_llmopt
from llmopt.evaluate.workload import Request
from llmopt.progress import Counter


class PagedEngine:
    warmup_batched = True

    def __init__(self, ctx: EngineContext) -> None:
        a, loaded = ctx.args, ctx.loaded
        # the pool never needs more blocks than the whole workload at full length
        max_blocks = sum(blocks_for(len(r.prompt) + r.max_tokens, a.block_size) for r in ctx.requests)
        self.config = EngineConfig(parse_kv_budget(a.kv_budget, loaded.device), a.block_size, a.max_prefill_tokens,
                                   a.max_num_seqs, max_blocks=max_blocks, kv_dtype=a.kv_dtype,
                                   decode_attention=a.decode_attention)
        self.model, self.draft, self.spec_tokens = loaded.model, ctx.draft, a.spec_tokens
        self.sampling = a.sampling()
        self.eos = loaded.tokenizer.eos_token_id

    def run(self, requests: list[Request], progress: Counter | None) -> RunOutput:
        return run_llmopt(self.model, requests, self.config, self.sampling, self.draft, self.spec_tokens, self.eos,
                          progress.advance if progress else None)


def build(ctx: EngineContext) -> PagedEngine:
    return PagedEngine(ctx)
