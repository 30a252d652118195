"""Which kernel of each QuantLinear kind wins, per shape and M bucket: the measurements behind
llmopt.runtime.linear's kernel rule (`_RULES`).

Every candidate in a module's kernel table (the fp32 `dequant` reference included, for comparison) is timed,
and where runtime/vnni.py runs here also torch's kernels (a module built with vnni keeps only its layout, so
a second module is built with LLMOPT_VNNI=0 and its kernels are timed beside it),
on random RTN weights: per (kind, N×K, group size, M) the median of --repeats timed calls after a warm-up,
measured in interleaved rounds so machine noise hits all candidates alike. Prints one row per case with each
kernel's median in µs, the fastest non-reference kernel, the rule's pick and its slowdown against the fastest.

    python bench/kernel_choice.py [--threads N] [--repeats 7] [--rounds 3] [--ms 1,2,4,8,16,64,256]
                                  [--shapes 2048x2048,5632x2048,2048x5632] [--device cpu]
                                  [--cases 'int4 g128,int8 per-ch']
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from llmopt.checkpoint.types import QuantArgs
from llmopt.quant.rtn import rtn_quantize
from llmopt.runtime.linear import (
    VNNI_ENV,
    QuantLinear,
    _bucket,
    build_linear,
    rule_kernel,
)

# (label, bits, group size, act bits): one case per QuantLinear kind and group-size regime
CASES = [("int4 g128", 4, 128, None), ("int4 g32", 4, 32, None), ("int8 per-ch", 8, -1, None),
         ("int8 g128", 8, 128, None), ("w8a8", 8, -1, 8)]


def time_once(fn, x: torch.Tensor, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn(x)
    sync()
    return time.perf_counter() - t0


def bench_module(module: QuantLinear, table: dict, m: int, repeats: int, rounds: int,
                 device: torch.device) -> dict[str, float]:
    """kernel name → median seconds for an [m, K] input, candidates interleaved call by call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(m, module.in_features, device=device)  # [M, K]
    for fn in table.values():  # warm-up: allocations, oneDNN primitives
        fn(x)
    times: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(rounds * repeats):
        for name, fn in table.items():
            times[name].append(time_once(fn, x, sync))
    return {name: statistics.median(t) for name, t in times.items()}


def build(bits: int, gs: int, act_bits: int | None, n: int, k: int, device: torch.device) -> tuple[QuantLinear, dict]:
    """The module the runtime builds here, and every candidate kernel: its own and, beside vnni, torch's."""
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(n, k) * 0.02, QuantArgs(bits=bits, group_size=gs))
    qw.act_bits = act_bits
    module = build_linear(qw, device, torch.float32)
    if module.vnni is None:
        return module, module.table()
    before = os.environ.get(VNNI_ENV)
    os.environ[VNNI_ENV] = "0"
    try:
        torch_module = build_linear(qw, device, torch.float32)
    finally:
        if before is None:
            del os.environ[VNNI_ENV]
        else:
            os.environ[VNNI_ENV] = before
    return module, {**torch_module.table(), **module.table()}


def report(label: str, shape: str, m: int, module: QuantLinear, med: dict[str, float]) -> str:
    fast = [name for name in med if name != module.reference_kernel()] or list(med)
    best = min(fast, key=med.get)
    pick = rule_kernel(module.kind, module.device_class, _bucket(m), module.table(), module.reference_kernel())
    cells = "  ".join(f"{name}={med[name] * 1e6:8.1f}" for name in med)
    return (f"{label:12} {shape:>10} M={m:<4} {cells}  best={best:12} rule={pick:12} "
            f"rule/best={med[pick] / med[best]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ms", default="1,2,4,8,16,64,256", help="M values (rows per forward)")
    ap.add_argument("--shapes", default="2048x2048,5632x2048,2048x5632", help="N×K weight shapes (out×in)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES), help="which of the cases to run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    for label, bits, gs, act_bits in (c for c in CASES if c[0] in args.cases.split(",")):
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            module, table = build(bits, gs, act_bits, n, k, device)
            for m in (int(v) for v in args.ms.split(",")):
                med = bench_module(module, table, m, args.repeats, args.rounds, device)
                print(report(label, shape, m, module, med), flush=True)


if __name__ == "__main__":
    main()
