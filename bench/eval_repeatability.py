"""Do two runs of the same `llmopt eval` give perf medians within the spread each one prints?

Runs `llmopt eval MODEL --perf-only --repeats R --json ...` as separate processes, back to back, N times; for
each consecutive pair, checks that each run's median output tokens/s lies inside the other's printed min–max
spread. Between evals a fixed probe (fp32 matmuls on the same thread count, timed for ~1 s) measures how fast
the machine itself is at that moment, so drift of a shared machine shows up next to drift of the eval.

    python bench/eval_repeatability.py [--model builtin:tiny] [--runs 6] [--repeats 5] [--num-requests 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def probe_gflops(threads: int, seconds: float = 1.0) -> float:
    """Median GFLOP/s of a 512×512 fp32 matmul loop: the machine's speed right now."""
    torch.set_num_threads(threads)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(20):
        a @ b
    rates = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        rates.append(10 * 2 * 512 ** 3 / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="default: llmopt eval's (probed)")
    args = ap.parse_args()
    if args.threads is None:
        from llmopt.utils import default_threads

        args.threads = default_threads()
    print(f"{args.runs} × `llmopt eval {args.model} --perf-only --repeats {args.repeats} --num-requests "
          f"{args.num_requests} --threads {args.threads}`, back to back, with a matmul probe between runs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            probe = probe_gflops(args.threads)
            out = Path(tmp) / f"r{i}.json"
            subprocess.run([sys.executable, "-m", "llmopt", "eval", args.model, "--perf-only", "--repeats",
                            str(args.repeats), "--num-requests", str(args.num_requests), "--threads",
                            str(args.threads), "--json", str(out)], check=True, capture_output=True)
            perf = json.loads(out.read_text())["results"][0]["perf"]
            lo, hi = perf["spread"]["output_tokens_per_s"]
            rows.append((perf["output_tokens_per_s"], lo, hi, probe))
            print(f"run {i + 1}: median {rows[-1][0]:8.1f} tok/s, spread {lo:8.1f}–{hi:8.1f}, "
                  f"machine probe {probe:6.1f} GFLOP/s", flush=True)
    ok = 0
    for i in range(1, len(rows)):
        (m0, lo0, hi0, _), (m1, lo1, hi1, _) = rows[i - 1], rows[i]
        inside = lo0 <= m1 <= hi0 and lo1 <= m0 <= hi1
        ok += inside
        print(f"runs {i}/{i + 1}: {'within' if inside else 'OUTSIDE'} each other's spread")
    medians, probes = [r[0] for r in rows], [r[3] for r in rows]
    if len(rows) > 2:
        corr = torch.corrcoef(torch.tensor([medians, probes]))[0, 1].item()
        print(f"eval medians vary {min(medians):.1f}–{max(medians):.1f} ({(max(medians) / min(medians) - 1) * 100:.1f}%), "
              f"machine probe {min(probes):.1f}–{max(probes):.1f} GFLOP/s "
              f"({(max(probes) / min(probes) - 1) * 100:.1f}%); correlation {corr:+.2f}")
    print(f"{ok}/{len(rows) - 1} consecutive pairs within each other's spread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
