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
import tempfile
import time
from pathlib import Path

import torch

from llmopt.distill.api import DistillArgs, distill

GATE = 0.30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="builtin:tiny")
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=DistillArgs.__dataclass_fields__["steps"].default)
    p.add_argument("--on-policy-ratio", type=float, default=0.5)
    p.add_argument("--losses", default="forward_kl,reverse_kl,jsd")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        def run(name: str, **kw) -> dict:
            args = DistillArgs(teacher=a.teacher, out=Path(tmp) / name, student_layers=a.student_layers,
                               steps=a.steps, seed=a.seed, device="cpu", **kw)
            t0 = time.perf_counter()
            res = distill(args)
            row = {"run": name, **res.metrics, "seconds": time.perf_counter() - t0, "tokens_per_s": res.tokens_per_s}
            print(f"  {name}: student ppl {res.metrics['student_ppl']:.2f} ({row['seconds']:.0f}s)", flush=True)
            return row

        print(f"teacher {a.teacher}, student {a.student_layers} layers, {a.steps} steps, seed {a.seed}", flush=True)
        first = run("ce_only+scratch", alpha=0.0, compare_scratch=True)
        rows.append(first)
        for loss in a.losses.split(","):
            for ratio in (0.0, a.on_policy_ratio):
                rows.append(run(f"{loss}{'+on_policy' if ratio else ''}", loss=loss, on_policy_ratio=ratio))

    teacher, scratch, init = first["teacher_ppl"], first["scratch_ppl"], first["student_init_ppl"]
    gap = scratch - teacher
    print(f"\n{'model':<28}{'held-out ppl':>13}{'gap closed':>12}{'seconds':>9}")
    print(f"{'teacher':<28}{teacher:>13.2f}")
    print(f"{'scratch (random init, CE)':<28}{scratch:>13.2f}{0.0:>11.0%}{'':>9}")
    print(f"{'layer-dropped, before KD':<28}{init:>13.2f}{(scratch - init) / gap:>11.0%}")
    ok = True
    for r in rows:
        name = "layer-dropped + CE (no KD)" if r["run"] == "ce_only+scratch" else r["run"]
        closed = (scratch - r["student_ppl"]) / gap
        r["gap_closed"] = closed
        if r["run"] != "ce_only+scratch":
            ok &= closed >= GATE
        print(f"{name:<28}{r['student_ppl']:>13.2f}{closed:>11.0%}{r['seconds']:>9.0f}")
    print(f"\nevery distilled student closes ≥ {GATE:.0%} of the scratch→teacher gap: {'yes' if ok else 'NO'}")
    if a.json:
        a.json.write_text(json.dumps({"teacher": a.teacher, "steps": a.steps, "student_layers": a.student_layers,
                                      "on_policy_ratio": a.on_policy_ratio, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
