"""`--engine llamacpp`: the model's checkpoint exported to GGUF (llmopt.checkpoint.formats.gguf) and served by
llama.cpp through llama-cpp-python, one request at a time (like `--engine hf`), timed per output token.

Optional dependency: llama-cpp-python (its install compiles llama.cpp) and gguf. Where the OS does not grant AMX
tiles, llama.cpp's weight repacking dies with SIGILL: set LLMOPT_LLAMACPP_REPACK=0 (llama.cpp's -nr).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

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
    if not args.quality_only:
        _llama_cpp()


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
        from llmopt.checkpoint.formats.gguf import export_gguf

        llama_cpp = _llama_cpp()
        self._dir = tempfile.TemporaryDirectory(prefix="llmopt-gguf-")
        gguf_path = Path(self._dir.name) / "model.gguf"
        export_gguf(Path(ctx.loaded.path), gguf_path)
        n_ctx = max(len(r.prompt) + r.max_tokens for r in ctx.requests) + 8
        with _repack(os.environ.get("LLMOPT_LLAMACPP_REPACK", "1") != "0"):
            self.llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_threads=ctx.args.threads,
                                       n_threads_batch=ctx.args.threads, seed=ctx.args.seed, verbose=False)
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
