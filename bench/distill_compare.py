"""Distillation losses side by side: forward KL / reverse KL / JSD, each with and without on-policy batches.

Teacher builtin:tiny (4 layers), student = half its layers copied (DistilBERT-style init), the same number of
steps for every run, all measured in this one run on the held-out builtin test split:

    python bench/distill_compare.py                 # default: 150 steps, on-policy ratio 0.5
    python bench/distill_compare.py --steps 300 --json results.json

Rows: the teacher, the layer-dropped student before any training, the same architecture trained from random
init on the data (scratch), the layer-dropped student fine-tuned on the data without the teacher (CE only:
what the copied init alone is worth), and the six distilled students. "gap closed" is
(scratch − student) / (scratch − teacher): the issue's bar is ≥ 30%.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from llmopt.distill.api import DistillArgs, distill

GATE = 0.30


def _run(name: str, kw: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    res = distill(DistillArgs(**kw))
    row = {"run": name, **res.metrics, "seconds": time.perf_counter() - t0, "tokens_per_s": res.tokens_per_s}
    print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.metrics.items()) + f" ({row['seconds']:.0f}s)",
          flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="builtin:tiny")
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=DistillArgs.__dataclass_fields__["steps"].default)
    p.add_argument("--on-policy-ratio", type=float, default=0.5)
    p.add_argument("--seq-len", type=int, default=DistillArgs.__dataclass_fields__["seq_len"].default)
    p.add_argument("--losses", default="forward_kl,reverse_kl,jsd")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (timings then share the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    a = p.parse_args()

    runs = [("ce_only+scratch", {"alpha": 0.0, "compare_scratch": True})]
    for loss in a.losses.split(","):
        for ratio in (0.0, a.on_policy_ratio):
            runs.append((f"{loss}{'+on_policy' if ratio else ''}", {"loss": loss, "on_policy_ratio": ratio}))
    common = {"teacher": a.teacher, "student_layers": a.student_layers, "steps": a.steps, "seed": a.seed,
              "seq_len": a.seq_len, "device": "cpu"}
    print(f"teacher {a.teacher}, student {a.student_layers} layers, {a.steps} steps × {a.seq_len} tokens, "
          f"seed {a.seed}, {a.jobs} job(s) × {a.threads} thread(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        jobs = [(name, {**common, **kw, "out": Path(tmp) / name}, a.threads) for name, kw in runs]
        if a.jobs == 1:
            rows = [_run(*job) for job in jobs]
        else:  # separate processes: each run is independent and single-threaded
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(a.jobs, mp_context=ctx) as pool:
                rows = list(pool.map(_run, *zip(*jobs)))
    first = rows[0]

    teacher, scratch, init = first["teacher_ppl"], first["scratch_ppl"], first["student_init_ppl"]
    gap = scratch - teacher
    closed = (lambda ppl: f"{(scratch - ppl) / gap:>11.0%}") if gap > 0 else (lambda ppl: f"{'n/a':>11}")
    print(f"\n{'model':<28}{'held-out ppl':>13}{'gap closed':>12}{'seconds':>9}")
    print(f"{'teacher':<28}{teacher:>13.2f}")
    print(f"{'scratch (random init, CE)':<28}{scratch:>13.2f}{closed(scratch)}")
    print(f"{'layer-dropped, before KD':<28}{init:>13.2f}{closed(init)}")
    for r in rows:
        name = "layer-dropped + CE (no KD)" if r["run"] == "ce_only+scratch" else r["run"]
        r["gap_closed"] = (scratch - r["student_ppl"]) / gap if gap > 0 else None
        print(f"{name:<28}{r['student_ppl']:>13.2f}{closed(r['student_ppl'])}{r['seconds']:>9.0f}")
    if gap <= 0:
        print(f"\nthe scratch student ({scratch:.2f}) already matches or beats the teacher ({teacher:.2f}): the "
              f"teacher is too weak for these steps, so the gap criterion does not apply")
    else:
        ok = all(r["gap_closed"] >= GATE for r in rows if r["run"] != "ce_only+scratch")
        print(f"\nevery distilled student closes ≥ {GATE:.0%} of the scratch→teacher gap: {'yes' if ok else 'NO'}")
    if a.json:
        a.json.write_text(json.dumps({"teacher": a.teacher, "steps": a.steps, "student_layers": a.student_layers,
                                      "on_policy_ratio": a.on_policy_ratio, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
