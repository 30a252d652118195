"""`--engine vllm`: the model's checkpoint served by vLLM (GPU only; --tp for tensor parallelism)."""

from __future__ import annotations

import torch

from llmopt.evaluate.engines import EngineContext
from llmopt.evaluate.perf import RunOutput
from llmopt.evaluate.types import EvalArgs
from llmopt.evaluate.workload import Request
from llmopt.progress import Counter
from llmopt.utils import dtype_name


def check(args: EvalArgs) -> None:
    if not args.quality_only:
        from llmopt.evaluate.vllm_engine import check_available

        check_available(args.tp)


class VLLM:
    warmup_batched = True

    def __init__(self, ctx: EngineContext) -> None:
        from llmopt.evaluate import vllm_engine

        a, loaded = ctx.args, ctx.loaded
        # perf is this model's last phase: give vLLM the GPU memory the HF copy holds
        loaded.model.to("cpu")
        torch.cuda.empty_cache()
        self.llm = vllm_engine.load_engine(str(loaded.path), tp=a.tp, dtype=dtype_name(loaded.dtype), seed=a.seed)
        self.sampling = a.sampling()
        self._run = vllm_engine.run_vllm

    def run(self, requests: list[Request], progress: Counter | None) -> RunOutput:
        return self._run(self.llm, requests, self.sampling, progress.advance if progress else None)


def build(ctx: EngineContext) -> VLLM:
    return VLLM(ctx)
