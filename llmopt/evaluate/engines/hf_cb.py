"""`--engine hf-cb`: Hugging Face's own continuous batching (a greedy cross-check of llmopt's engine)."""

from __future__ import annotations

from llmopt.evaluate.engines import EngineContext
from llmopt.evaluate.hf_cb import run_hf_cb
from llmopt.evaluate.perf import RunOutput
from llmopt.evaluate.workload import Request
from llmopt.progress import Counter


class HFContinuousBatching:
    warmup_batched = True

    def __init__(self, ctx: EngineContext) -> None:
        self.model = ctx.loaded.model
        self.sampling = ctx.args.sampling()
        self.block_size = ctx.args.block_size
        self.max_prefill_tokens = ctx.args.max_prefill_tokens

    def run(self, requests: list[Request], progress: Counter | None) -> RunOutput:
        # a batch must hold at least one token of every request
        return run_hf_cb(self.model, requests, self.sampling, self.block_size,
                         max(self.max_prefill_tokens, len(requests)), progress.advance if progress else None)


def build(ctx: EngineContext) -> HFContinuousBatching:
    return HFContinuousBatching(ctx)
