"""`--engine hf`: one request at a time through `model.generate` (the baseline users compare against)."""

from __future__ import annotations

from llmopt.evaluate.engines import EngineContext
from llmopt.evaluate.perf import RunOutput, run_hf
from llmopt.evaluate.workload import Request
from llmopt.progress import Counter


class HFGenerate:
    warmup_batched = False

    def __init__(self, ctx: EngineContext) -> None:
        self.model = ctx.loaded.model
        self.sampling = ctx.args.sampling()
        self.pad_id = ctx.loaded.tokenizer.pad_token_id

    def run(self, requests: list[Request], progress: Counter | None) -> RunOutput:
        return run_hf(self.model, requests, self.sampling, self.pad_id, progress.advance if progress else None)


def build(ctx: EngineContext) -> HFGenerate:
    return HFGenerate(ctx)
