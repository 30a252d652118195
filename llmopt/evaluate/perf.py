"""Run a workload through an engine and time every token: llmopt's engine, or plain `model.generate`
one request at a time (`--engine hf`, the baseline users compare against). Warm-up runs are not timed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmopt.engine import EngineConfig, LLMEngine, SamplingParams
from llmopt.engine.engine import AttentionStats, KVStats
from llmopt.engine.speculative import SpecStats, attach_draft
from llmopt.evaluate.metrics import PerfMetrics, RequestTiming, compute_metrics
from llmopt.evaluate.workload import Request

Advance = Callable[[int], None]  # advance by n finished requests


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def params(self, max_tokens: int, index: int) -> SamplingParams:
        """Per-request params: benchmark outputs have exact lengths (EOS ignored, as vLLM bench does)."""
        return SamplingParams(max_tokens, self.temperature, self.top_k, self.top_p, self.seed + index,
                              ignore_eos=True)


@dataclass(slots=True)
class RunOutput:
    metrics: PerfMetrics
    outputs: list[list[int]]
    kv: KVStats | None = None
    spec: SpecStats | None = None
    attention: AttentionStats | None = None  # llmopt's engine: which attention path its steps took


def warmup_requests(requests: list[Request], batched: bool) -> list[Request]:
    """The untimed run before timing. A batched engine gets the whole workload once (offline, all at once), so the
    allocator reaches its peak and every batch-size bucket has picked its kernel before the clock starts — a short
    warm-up left the first timed repeat 10-20% slow and the spread wide. `generate` serves one request at a time, so
    its first two requests at full length exercise the same shapes."""
    return [Request(r.prompt, r.max_tokens, 0.0) for r in (requests if batched else requests[:2])]


def run_llmopt(model, requests: list[Request], config: EngineConfig, sampling: Sampling,
               draft=None, spec_tokens: int = 4, eos_id: int | None = None,
               advance: Advance | None = None) -> RunOutput:
    engine = LLMEngine(model, config, eos_id)
    spec = attach_draft(engine, draft, spec_tokens) if draft is not None else None
    for i, r in enumerate(requests):
        engine.add(r.prompt, sampling.params(r.max_tokens, i), r.arrival)
    seqs = engine.run(advance)
    duration = max(t for s in seqs for t in s.token_times)
    timings = [RequestTiming(s.arrival, len(s.prompt), s.token_times) for s in seqs]
    return RunOutput(compute_metrics(timings, duration), [s.output for s in seqs], engine.kv_stats(),
                     spec.stats if spec else None, engine.attention_stats())


class _TokenClock:
    """A generate() streamer that stamps each new token (its first put() is the prompt)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        t = self.clock()
        self.times.extend([t] * value.numel())

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_hf(model, requests: list[Request], sampling: Sampling, pad_id: int | None,
           advance: Advance | None = None) -> RunOutput:
    """One request at a time through model.generate, in arrival order (a request waits for the previous one)."""
    device = model.get_input_embeddings().weight.device
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0
    timings, outputs = [], []
    for i, r in enumerate(requests):
        wait = r.arrival - clock()
        if wait > 0:
            time.sleep(wait)
        p = sampling.params(r.max_tokens, i)
        kw = dict(do_sample=False) if p.greedy else dict(do_sample=True, temperature=p.temperature,
                                                          top_k=p.top_k or None, top_p=p.top_p)
        torch.manual_seed(p.seed)
        streamer = _TokenClock(clock)
        ids = torch.tensor([r.prompt], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens,
                             min_new_tokens=None, eos_token_id=None, pad_token_id=pad_id, streamer=streamer, **kw)
        outputs.append(out[0, len(r.prompt):].tolist())
        timings.append(RequestTiming(r.arrival, len(r.prompt), streamer.times))
        if advance is not None:
            advance(1)
    duration = max(t for tm in timings for t in tm.token_times)
    return RunOutput(compute_metrics(timings, duration), outputs)
