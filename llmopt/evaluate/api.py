"""`evaluate(EvalArgs) -> EvalResult`: quality and cost of each model, measured the same way for all.

Per model: quality on held-out text (sliding-window perplexity; with a baseline, KL-divergence and top-1
agreement on the same tokens; lm-eval tasks; with --prompts, generations on a prompt set through llmopt's engine
scored for refusals, answers and agreement with the baseline's generations), then the same seeded workload through
an engine (llmopt's continuous-batching engine, or `hf`: one request at a time through `model.generate`), then
memory (weight bytes, KV bytes allocated vs the formula). Writes --json/--csv/--plot when given, and beside --json
the prompt-set generations (`STEM.generations.jsonl`) and the verdicts that flipped against the baseline
(`STEM.flips.jsonl`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from llmopt.errors import LlmoptError
from llmopt.evaluate.types import EvalArgs, EvalResult, ModelReport
from llmopt.progress import Progress


def evaluate(args: EvalArgs, progress: Progress | None = None) -> EvalResult:
    """Evaluate every model of args (baseline first when it is not among them); write the report files."""
    from llmopt.evaluate.eval_loop import EvalRunner
    from llmopt.evaluate.outputs import write_reports

    for path in (args.json, args.csv, args.plot):
        if path is None:
            continue
        if Path(path).is_dir():
            raise LlmoptError(f"{path} is a directory: give --json/--csv/--plot a file path")
        if not Path(path).exists():  # an unwritable report path must fail before the long part, not after
            from llmopt.utils import check_out_dir

            check_out_dir(Path(path), overwrite=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        runner = EvalRunner(args, progress)
        runner.preflight()
        reports = runner.run_all()
        result = EvalResult(reports, _config(args), args.baseline, runner.generations, runner.flips)
    finally:
        torch.set_num_threads(threads_before)
    write_reports(result, args.json, args.csv, args.plot)
    return result


def _config(args: EvalArgs) -> dict:
    d = {f: getattr(args, f) for f in args.__dataclass_fields__}
    d["threads"] = torch.get_num_threads()
    return {k: (str(v) if isinstance(v, Path) else (None if isinstance(v, float) and math.isinf(v) else v))
            for k, v in d.items()} | {"request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate}


__all__ = ["EvalArgs", "EvalResult", "ModelReport", "evaluate"]
