"""lm-eval tasks over an already-loaded model (lm-eval's HFLM wraps it; nothing is re-loaded).

Task names are any lm-eval knows, plus llmopt's offline tasks in lm_eval_tasks/ (e.g. `llmopt_cloze`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmopt.errors import LlmoptError

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
BUILTIN_TASKS = tuple(sorted(p.stem for p in TASK_DIR.glob("*.yaml")))


def _task_manager(tasks: list[str]):
    from lm_eval.tasks import TaskManager

    only_builtin = all(t in BUILTIN_TASKS for t in tasks)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=not only_builtin)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LlmoptError(f"unknown lm-eval task(s): {', '.join(unknown)} (builtin offline tasks: "
                          f"{', '.join(BUILTIN_TASKS)}; see `lm-eval ls tasks`)")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} (lm-eval's metric names without the ',none' filter suffix)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise LlmoptError("--tasks needs lm-eval: pip install 'llmopt[eval]' (or pip install lm-eval)") from e
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    manager = _task_manager(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0,
                                  verbosity="ERROR")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k}
    return out
