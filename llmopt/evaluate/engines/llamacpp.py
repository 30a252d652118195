"""`--engine llamacpp`: the model's checkpoint as GGUF — its own model.gguf (`quantize --format gguf`) when it has
one, else exported (llmopt.checkpoint.formats.gguf) — served by llama.cpp through llama-cpp-python, one request
at a time (like `--engine hf`), timed per output token. `GGUFScorer` gives the eval's quality phase llama.cpp's
logits of the same file, so perplexity and KLD are those of what llama.cpp serves (requantized blocks, F16
embeddings, llama.cpp's own 8-bit activation rounding in its Q4/Q8 dot products included).

Optional dependency: llama-cpp-python (its install compiles llama.cpp) and gguf. Where the OS does not grant AMX
tiles, llama.cpp's weight repacking dies with SIGILL: set LLMOPT_LLAMACPP_REPACK=0 (llama.cpp's -nr).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from llmopt.errors import LlmoptError
from llmopt.evaluate.engines import EngineContext
from llmopt.evaluate.metrics import RequestTiming, compute_metrics
from llmopt.evaluate.perf import RunOutput
from llmopt.evaluate.types import EvalArgs
from llmopt.evaluate.workload import Request
from llmopt.progress import Counter


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LlmoptError("--engine llamacpp needs llama-cpp-python: pip install llama-cpp-python "
                          "(it compiles llama.cpp) and pip install 'llmopt[gguf]'") from None
    return llama_cpp


def check(args: EvalArgs) -> None:
    """Both phases run llama.cpp: perf serves the GGUF file, quality scores it."""
    _llama_cpp()


_EXPORTS: dict[str, tempfile.TemporaryDirectory] = {}  # checkpoint dir → temp dir of its export, kept per process


def gguf_file(checkpoint: Path) -> Path:
    """The GGUF file llama.cpp runs for this checkpoint dir: its own model.gguf, else one export per process
    (the quality and perf phases share it)."""
    own = checkpoint / "model.gguf"
    if own.is_file():
        return own
    key = str(checkpoint.resolve())
    if key not in _EXPORTS:
        from llmopt.checkpoint.formats.gguf import export_gguf

        tmp = tempfile.TemporaryDirectory(prefix="llmopt-gguf-")
        export_gguf(checkpoint, Path(tmp.name) / "model.gguf")
        _EXPORTS[key] = tmp
    return Path(_EXPORTS[key].name) / "model.gguf"


def _load(path: Path, threads: int, seed: int, **kw):
    llama_cpp = _llama_cpp()
    with _repack(os.environ.get("LLMOPT_LLAMACPP_REPACK", "1") != "0"):
        return llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False, **kw)


class GGUFScorer:
    """Next-token logits of token windows from llama.cpp running a GGUF file; a `logits_of` for
    evaluate.quality.measure_quality."""

    def __init__(self, path: Path, seq_len: int, threads: int, seed: int = 0) -> None:
        self.llm = _load(path, threads, seed, n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len, logits_all=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L] token ids → [B, L-1, V] float64: position p's logits predict token p+1, each window from an
        empty cache (as the other engines' quality passes)."""
        rows = []
        for window in x.tolist():
            self.llm.reset()
            self.llm.eval(window)
            rows.append(torch.from_numpy(np.array(self.llm.scores[:len(window) - 1], dtype=np.float64)))  # [L-1, V]
        return torch.stack(rows)


@contextmanager
def _repack(enabled: bool):
    """llama-cpp-python's Llama() does not expose use_extra_bufts: switch it off in the default params it
    reads while one model loads."""
    import llama_cpp.llama as llama_module

    default = llama_module.llama_cpp.llama_model_default_params

    def without_repack():
        params = default()
        params.use_extra_bufts = False
        return params

    if not enabled:
        llama_module.llama_cpp.llama_model_default_params = without_repack
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


class LlamaCpp:
    warmup_batched = False

    def __init__(self, ctx: EngineContext) -> None:
        n_ctx = max(len(r.prompt) + r.max_tokens for r in ctx.requests) + 8
        self.llm = _load(gguf_file(Path(ctx.loaded.path)), ctx.args.threads, ctx.args.seed, n_ctx=n_ctx)
        self.sampling = ctx.args.sampling()

    def run(self, requests: list[Request], progress: Counter | None) -> RunOutput:
        """In arrival order, one at a time; every request generates exactly max_tokens (EOS ignored, as the
        other engines' benchmarks do)."""
        t0 = time.perf_counter()
        timings, outputs = [], []
        for i, r in enumerate(requests):
            wait = r.arrival - (time.perf_counter() - t0)
            if wait > 0:
                time.sleep(wait)
            p = self.sampling.params(r.max_tokens, i)
            self.llm.reset()
            self.llm.set_seed(p.seed)
            out, times = [], []
            for token in self.llm.generate(r.prompt, temp=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                           reset=True):
                out.append(int(token))
                times.append(time.perf_counter() - t0)
                if len(out) >= r.max_tokens:
                    break
            outputs.append(out)
            timings.append(RequestTiming(r.arrival, len(r.prompt), times))
            if progress is not None:
                progress.advance()
        duration = max(t for tm in timings for t in tm.token_times)
        return RunOutput(compute_metrics(timings, duration), outputs)


def build(ctx: EngineContext) -> LlamaCpp:
    return LlamaCpp(ctx)
