"""`llmopt eval --engine vllm`: the same seeded workload and metrics through vLLM's offline engine.

Requests are added to vLLM's LLMEngine as they arrive (all at once, or Poisson arrivals) and the engine is
stepped by hand, so every output token gets a timestamp on the same clock as llmopt's engine — TTFT, TPOT,
ITL and E2EL come out of `compute_metrics` exactly as for `--engine llmopt|hf`. Tensor parallel with tp > 1.
vLLM runs on CUDA only; without it (or without a GPU) a one-line LlmoptError says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from llmopt.errors import LlmoptError
from llmopt.evaluate.metrics import RequestTiming, compute_metrics
from llmopt.evaluate.perf import RunOutput, Sampling
from llmopt.evaluate.workload import Request


def check_available(tp: int = 1) -> None:
    """Raise LlmoptError unless vLLM is importable and `tp` CUDA devices are visible."""
    import importlib.util

    import torch

    if tp < 1:
        raise LlmoptError(f"--tp must be ≥ 1, got {tp}")
    if importlib.util.find_spec("vllm") is None:
        raise LlmoptError("--engine vllm needs vLLM: pip install vllm (on a machine with a CUDA GPU), or use "
                          "--engine llmopt")
    if not torch.cuda.is_available():
        raise LlmoptError("--engine vllm needs a CUDA GPU and none is visible: use --engine llmopt on this machine")
    if torch.cuda.device_count() < tp:
        raise LlmoptError(f"--tp {tp} needs {tp} GPUs, {torch.cuda.device_count()} visible")


def load_engine(model_path: str, tp: int = 1, dtype: str = "auto", max_model_len: int | None = None,
                gpu_memory_utilization: float = 0.8, seed: int = 0):
    """vLLM's offline LLM for a local checkpoint (any format vLLM reads: compressed-tensors, GPTQ, AWQ)."""
    check_available(tp)
    from vllm import LLM

    return LLM(model=model_path, tensor_parallel_size=tp, dtype=dtype, max_model_len=max_model_len,
               gpu_memory_utilization=gpu_memory_utilization, seed=seed, trust_remote_code=False)


def _params(sampling: Sampling, max_tokens: int, index: int):
    from vllm import SamplingParams

    # exact output lengths, EOS ignored: the same workload as llmopt's engine and vLLM's own bench
    return SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                          temperature=sampling.temperature, top_k=sampling.top_k if sampling.top_k > 0 else -1,
                          top_p=sampling.top_p, seed=sampling.seed + index)


def run_vllm(llm, requests: list[Request], sampling: Sampling,
             progress: Callable[[int], None] | None = None) -> RunOutput:
    """Run `requests` through `llm` (from load_engine), stepping its engine and timestamping every token."""
    engine = llm.llm_engine
    pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    times: dict[int, list[float]] = {i: [] for i in range(len(requests))}
    outputs: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0
    while pending or engine.has_unfinished_requests():
        while pending and requests[pending[0]].arrival <= clock():
            i = pending.pop(0)
            engine.add_request(str(i), {"prompt_token_ids": requests[i].prompt},
                               _params(sampling, requests[i].max_tokens, i))
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, requests[pending[0]].arrival - clock()))
            continue
        step = engine.step()
        now = clock()
        for out in step:
            i = int(out.request_id)
            produced = len(out.outputs[0].token_ids)
            times[i].extend([now] * (produced - len(times[i])))  # tokens that appeared in this step
            if out.finished:
                outputs[i] = list(out.outputs[0].token_ids)
                if progress is not None:
                    progress(1)
    timings = [RequestTiming(r.arrival, len(r.prompt), times[i]) for i, r in enumerate(requests)]
    duration = max(t for tm in timings for t in tm.token_times)
    return RunOutput(compute_metrics(timings, duration), [outputs[i] for i in range(len(requests))])
