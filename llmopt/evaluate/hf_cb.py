"""`llmopt eval --engine hf-cb`: the same seeded workload through transformers' own continuous batching
(`model.continuous_batching_context_manager`), as a cross-check of llmopt's engine.

Requests are added as they arrive (all at once, or Poisson arrivals) to transformers' manager, which runs its
loop in a background thread and stamps every generated token with `time.perf_counter()`; those stamps are moved
onto this run's clock, so TTFT, TPOT, ITL and E2EL come out of `compute_metrics` exactly as for the other engines.
Its KV cache is sized for this workload (pages of --block-size tokens, as many as all requests need): the
defaults size it from free memory and would take ~20 GiB of RAM on a CPU. Greedy only (its sampling is not
seeded per request the way llmopt's and vLLM's are).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

import torch

from llmopt.engine.block_manager import blocks_for
from llmopt.errors import LlmoptError
from llmopt.evaluate.metrics import RequestTiming, compute_metrics
from llmopt.evaluate.perf import RunOutput, Sampling
from llmopt.evaluate.workload import Request


def check_available(sampling: Sampling) -> None:
    """Raise LlmoptError unless this transformers has continuous batching and the sampling is greedy."""
    from transformers import GenerationMixin

    if not hasattr(GenerationMixin, "continuous_batching_context_manager"):
        import transformers

        raise LlmoptError(f"--engine hf-cb needs transformers' continuous batching (5.x); this is "
                          f"{transformers.__version__}: upgrade transformers or use --engine llmopt")
    if sampling.temperature > 0:
        raise LlmoptError("--engine hf-cb is a greedy cross-check: drop --temperature, or use --engine llmopt")


def _cb_kwargs(config_cls, block_size: int, **kw) -> dict:
    """The config's keywords across 5.x: the page size was `block_size` before 5.2x (`page_size` after), and
    `auto_switch_to_flash` (off here: the cross-check keeps the model's own attention) is newer still."""
    params = inspect.signature(config_cls).parameters
    kw["page_size" if "page_size" in params else "block_size"] = block_size
    if "auto_switch_to_flash" in params:
        kw["auto_switch_to_flash"] = False
    return kw


# not under torch.inference_mode(): transformers' manager thread fails on inference tensors
@torch.no_grad()
def run_hf_cb(model, requests: list[Request], sampling: Sampling, block_size: int = 16,
              max_batch_tokens: int = 1024, progress: Callable[[int], None] | None = None) -> RunOutput:
    """Run `requests` through transformers' continuous batching; greedy, exact output lengths (EOS ignored)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    check_available(sampling)
    num_blocks = sum(blocks_for(len(r.prompt) + r.max_tokens, block_size) for r in requests)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_tokens for r in requests), eos_token_id=-1,
                           pad_token_id=model.config.pad_token_id or 0)
    cb = ContinuousBatchingConfig(**_cb_kwargs(ContinuousBatchingConfig, block_size, num_blocks=num_blocks,
                                               max_batch_tokens=max_batch_tokens, max_requests_per_batch=len(requests),
                                               allow_block_sharing=False))
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    results: dict[str, object] = {}
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                   warmup=False) as manager:
        t0 = time.perf_counter()
        nxt = 0
        while len(results) < len(requests):
            now = time.perf_counter() - t0
            while nxt < len(order) and requests[order[nxt]].arrival <= now:
                i = order[nxt]
                manager.add_request(requests[i].prompt, request_id=f"r{i}", max_new_tokens=requests[i].max_tokens,
                                    record_timestamps=True, eos_token_id=-1)
                nxt += 1
            wait = requests[order[nxt]].arrival - now if nxt < len(order) else 1.0
            out = manager.get_result(timeout=max(1e-3, min(wait, 1.0)))
            if out is None:
                continue
            if out.error:
                raise LlmoptError(f"transformers' continuous batching failed on request {out.request_id}: "
                                  f"{out.error.splitlines()[-1]}")
            if out.is_finished():
                results[out.request_id] = out
                if progress is not None:
                    progress(1)
    outputs, timings = [], []
    for i, r in enumerate(requests):
        res = results[f"r{i}"]
        outputs.append(list(res.generated_tokens))
        timings.append(RequestTiming(r.arrival, len(r.prompt), [t - t0 for t in res.timestamps]))
    duration = max(t for tm in timings for t in tm.token_times)
    return RunOutput(compute_metrics(timings, duration), outputs)
