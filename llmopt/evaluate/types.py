"""The eval's arguments and results (dataclasses only: the orchestration is in api.py and eval_loop.py)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmopt.errors import LlmoptError


@dataclass(frozen=True, slots=True)
class EvalArgs:
    model: list[str]
    baseline: str | None = None
    data: str = "builtin"
    split: str | None = None
    text_field: str = "text"
    num_requests: int = 32
    prompt_len: str = "32:256"
    output_len: str = "32:128"
    request_rate: float = math.inf
    seed: int = 0
    engine: str = "llmopt"
    tp: int = 1  # tensor-parallel GPUs (--engine vllm)
    draft: str | None = None
    spec_tokens: int = 4
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    kv_budget: str = "0.3"
    block_size: int = 16
    max_prefill_tokens: int = 1024
    max_num_seqs: int = 256
    kv_dtype: str = "auto"  # how llmopt's engine caches K/V (llmopt.engine.kv_format.KV_DTYPES)
    decode_attention: str = "auto"  # llmopt's decode read path (llmopt.engine.model_runner.DECODE_ATTENTION)
    threads: int | None = None  # None: llmopt.utils.default_threads() (the faster of 1 and all cores, probed)
    repeats: int = 3
    warmup: bool = True
    seq_len: int = 512
    stride: int | None = None
    quality_tokens: int = 32768
    tasks: list[str] | None = None
    task_limit: int | None = None
    prompts: str | None = None  # a .jsonl/.csv prompt set, or "builtin" (llmopt/evaluate/prompts.py)
    gen_tokens: int = 64
    samples_per_prompt: int = 1
    chat_template: bool = False
    refusal_patterns: str | None = None  # one regex per line, replacing the default phrase list
    refusal_judge: str | None = None  # a causal LM that judges refusals instead of the phrase list
    quality_only: bool = False
    perf_only: bool = False
    price_per_hour: float | None = None
    json: Path | None = None
    csv: Path | None = None
    plot: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        from llmopt.engine.sampling import SamplingParams
        from llmopt.evaluate.workload import parse_range

        if isinstance(self.model, str):
            object.__setattr__(self, "model", [self.model])
        if not self.model:
            raise LlmoptError("no model given: llmopt eval MODEL [MODEL ...]")
        self._check_engine()
        self._check_quality()
        self.generation_settings()  # validates --gen-tokens, --samples-per-prompt
        self.workload_spec()  # validates --num-requests, ranges, --request-rate
        SamplingParams(1, self.temperature, self.top_k, self.top_p, self.seed)  # validates sampling options
        parse_range(self.output_len, "--output-len")

    def _check_engine(self) -> None:
        """The engine options: which engine, and the settings only some engines take."""
        from llmopt.engine.kv_format import check_kv_dtype
        from llmopt.evaluate.engines import ENGINE_MODULES

        if self.engine not in ENGINE_MODULES:
            raise LlmoptError(f"--engine must be one of {', '.join(ENGINE_MODULES)} (got {self.engine!r})")
        if self.tp < 1 or (self.tp > 1 and self.engine != "vllm"):
            raise LlmoptError(f"--tp {self.tp}: tensor parallelism needs --engine vllm and a value >= 1")
        if self.repeats < 1:
            raise LlmoptError(f"--repeats must be ≥ 1 (got {self.repeats})")
        if self.threads is not None and self.threads < 1:
            raise LlmoptError(f"--threads must be ≥ 1 (got {self.threads})")
        if self.threads is None:
            from llmopt.utils import default_threads

            object.__setattr__(self, "threads", default_threads())
        if self.engine == "hf-cb" and self.temperature > 0:
            raise LlmoptError("--engine hf-cb is a greedy cross-check: drop --temperature, or use --engine llmopt")
        if self.draft is not None and self.engine != "llmopt":
            raise LlmoptError("--draft (speculative decoding) runs on --engine llmopt only")
        if self.spec_tokens < 1:
            raise LlmoptError(f"--spec-tokens must be ≥ 1 (got {self.spec_tokens})")
        check_kv_dtype(self.kv_dtype)
        if self.kv_dtype != "auto" and self.engine != "llmopt":
            raise LlmoptError(f"--kv-dtype {self.kv_dtype} sets llmopt's paged KV cache: --engine {self.engine} keeps "
                              f"its own (use --engine llmopt, or drop --kv-dtype)")
        from llmopt.engine.model_runner import DECODE_ATTENTION
        if self.decode_attention not in DECODE_ATTENTION:
            raise LlmoptError(f"--decode-attention must be one of {', '.join(DECODE_ATTENTION)} "
                              f"(got {self.decode_attention!r})")
        if self.decode_attention != "auto" and self.engine != "llmopt":
            raise LlmoptError(f"--decode-attention sets llmopt's engine: --engine {self.engine} has its own "
                              f"attention (use --engine llmopt, or drop --decode-attention)")
        if self.block_size < 1 or self.max_prefill_tokens < 1 or self.max_num_seqs < 1:
            raise LlmoptError("--block-size, --max-prefill-tokens and --max-num-seqs must be ≥ 1")

    def _check_quality(self) -> None:
        """The quality half's options and how they combine with the halves switched on."""
        if self.quality_only and self.perf_only:
            raise LlmoptError("--quality-only and --perf-only switch off both halves: give at most one")
        if self.seq_len < 2:
            raise LlmoptError(f"--seq-len must be ≥ 2 (got {self.seq_len})")
        if self.stride is not None and not 0 < self.stride <= self.seq_len:
            raise LlmoptError(f"--stride must be in 1..--seq-len ({self.seq_len}), got {self.stride}")
        if self.quality_tokens < self.seq_len:
            raise LlmoptError(f"--quality-tokens ({self.quality_tokens}) must be ≥ --seq-len ({self.seq_len})")
        if self.price_per_hour is not None and self.price_per_hour < 0:
            raise LlmoptError(f"--price-per-hour must be ≥ 0 (got {self.price_per_hour})")
        if self.plot is not None and (self.quality_only or self.perf_only):
            raise LlmoptError("--plot draws quality against throughput: it needs both halves (drop --quality-only/"
                              "--perf-only)")
        if self.task_limit is not None and self.task_limit < 1:
            raise LlmoptError(f"--task-limit must be ≥ 1 (got {self.task_limit})")
        if self.prompts is None and (self.refusal_patterns or self.refusal_judge or self.chat_template):
            raise LlmoptError("--refusal-patterns, --refusal-judge and --chat-template apply to --prompts: give a "
                              "prompt set (a .jsonl/.csv file or builtin)")
        if self.prompts is not None and self.perf_only:
            raise LlmoptError("--prompts measures quality: drop --perf-only")
        if self.refusal_patterns and self.refusal_judge:
            raise LlmoptError("--refusal-patterns and --refusal-judge are two refusal detectors: give one")

    def sampling(self):
        """The workload's sampling options (llmopt.evaluate.perf.Sampling)."""
        from llmopt.evaluate.perf import Sampling

        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)

    def generation_settings(self):
        from llmopt.evaluate.generation import GenerationSettings

        return GenerationSettings(self.gen_tokens, self.samples_per_prompt, self.sampling())

    def workload_spec(self):
        from llmopt.evaluate.workload import WorkloadSpec, parse_range

        return WorkloadSpec(self.num_requests, parse_range(self.prompt_len, "--prompt-len"),
                            parse_range(self.output_len, "--output-len"), float(self.request_rate), self.seed)


@dataclass(slots=True)
class ModelReport:
    model: str
    method: str
    quality: dict
    perf: dict
    memory: dict
    speculative: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class EvalResult:
    results: list[ModelReport]
    config: dict = field(default_factory=dict)
    baseline: str | None = None
    generations: list[dict] = field(default_factory=list)  # --prompts: every generation (not in the JSON report)
    flips: list[dict] = field(default_factory=list)  # --prompts with --baseline: verdicts that flipped

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self.results], "baseline": self.baseline, "config": self.config}
