"""`llmopt eval`: quality × cost of one or more models, measured side by side on the same tokens and workload."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli import options as opt


def evaluate(
    model: Annotated[list[str], typer.Argument(help="Models: hub ids, local checkpoints (any format llmopt "
                                                    "quantize writes) or builtin:tiny.")],
    baseline: Annotated[str | None, typer.Option("--baseline", help="Reference model for KL-divergence, top-1 "
                                                 "agreement and Δppl (must share the tokenizer).")] = None,
    data: Annotated[str, typer.Option("--data", help="Held-out text: builtin, a preset, a hub id or a path.")] = "builtin",
    split: opt.Split = None,
    text_field: opt.TextField = "text",
    num_requests: Annotated[int, typer.Option("--num-requests", help="Requests in the perf workload.")] = 32,
    prompt_len: Annotated[str, typer.Option("--prompt-len", help="Prompt tokens MIN:MAX (uniform).")] = "32:256",
    output_len: Annotated[str, typer.Option("--output-len", help="Output tokens MIN:MAX (uniform).")] = "32:128",
    request_rate: Annotated[float, typer.Option("--request-rate", help="Poisson arrivals per second; inf = all "
                                                "at once.")] = math.inf,
    seed: opt.Seed = 0,
    engine: Annotated[str, typer.Option("--engine", help="llmopt (continuous batching, paged KV), hf (one "
                                        "request at a time through model.generate), hf-cb (transformers' own "
                                        "continuous batching, greedy: a cross-check) or vllm.")] = "llmopt",
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel GPUs for --engine vllm.")] = 1,
    draft: Annotated[str | None, typer.Option("--draft", help="Draft model for speculative decoding.")] = None,
    spec_tokens: Annotated[int, typer.Option("--spec-tokens", help="Tokens the draft proposes per step.")] = 4,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="1 = off.")] = 1.0,
    kv_budget: Annotated[str, typer.Option("--kv-budget", help="KV block pool: bytes (512MiB, 2GB) or a fraction "
                                           "of free memory (0.3).")] = "0.3",
    block_size: Annotated[int, typer.Option("--block-size", help="Tokens per KV block.")] = 16,
    max_prefill_tokens: Annotated[int, typer.Option("--max-prefill-tokens", help="Prompt tokens prefilled per "
                                                    "step (lower: better ITL tail, worse TTFT).")] = 1024,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", help="Most requests running at once.")] = 256,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch (default: all "
                                                       "cores but one, left to the engine's Python thread and the OS).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs; medians and spread are reported.")] = 3,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="An untimed warm-up run first.")] = True,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Perplexity window (tokens).")] = 512,
    stride: Annotated[int | None, typer.Option("--stride", help="Sliding-window stride (default seq-len/2).")] = None,
    quality_tokens: Annotated[int, typer.Option("--quality-tokens", help="Held-out tokens scored at most.")] = 32768,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="lm-eval tasks (comma-separated or repeated); "
                                                    "llmopt_cloze runs offline.")] = None,
    task_limit: Annotated[int | None, typer.Option("--task-limit", help="Examples per lm-eval task.")] = None,
    quality_only: Annotated[bool, typer.Option("--quality-only", help="Skip the perf half.")] = False,
    perf_only: Annotated[bool, typer.Option("--perf-only", help="Skip the quality half.")] = False,
    price_per_hour: Annotated[float | None, typer.Option("--price-per-hour", help="Machine price per hour, for "
                                                         "cost per 1k output tokens.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="Write the report as CSV here.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of quality vs throughput (Pareto front).")] = None,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    trust_remote_code: opt.TrustRemoteCode = False,
) -> None:
    """Evaluate models: perplexity / KLD / top-1 / lm-eval tasks, and TTFT, TPOT, ITL, throughput, memory, cost."""
    from llmopt.cli.console import err, out
    from llmopt.evaluate.api import EvalArgs, evaluate as run_eval
    from llmopt.evaluate.report import finite, table

    task_list = [t.strip() for item in (tasks or []) for t in item.split(",") if t.strip()] or None
    args = EvalArgs(model=list(model), baseline=baseline, data=data, split=split, text_field=text_field,
                    num_requests=num_requests, prompt_len=prompt_len, output_len=output_len, request_rate=request_rate,
                    seed=seed, engine=engine, tp=tp, draft=draft, spec_tokens=spec_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, kv_budget=kv_budget, block_size=block_size,
                    max_prefill_tokens=max_prefill_tokens, max_num_seqs=max_num_seqs, threads=threads,
                    repeats=repeats, warmup=warmup, seq_len=seq_len, stride=stride, quality_tokens=quality_tokens,
                    tasks=task_list, task_limit=task_limit, quality_only=quality_only, perf_only=perf_only,
                    price_per_hour=price_per_hour, json=json_out, csv=csv, plot=plot, device=device, dtype=dtype,
                    trust_remote_code=trust_remote_code)
    err.print(f"threads: {args.threads}  engine: {engine}")
    result = run_eval(args, progress=True)
    d = finite(result.to_dict())
    out.print(table(d))  # fitted to a terminal; whole in a file or pipe (console.py)
    for r in d["results"]:
        m, spec = r["memory"], r.get("speculative")
        if m.get("kv_bytes_allocated") is not None:
            formula, alloc = m["kv_bytes_formula"], m["kv_bytes_allocated"]
            out.print(f"{r['model']}: KV at peak {m['kv_peak_tokens']} tokens: allocated {alloc:,} B, formula "
                      f"{formula:,} B ({(alloc / formula - 1) * 100 if formula else 0:+.1f}%), block waste "
                      f"{m['kv_waste_bytes']:,} B, preemptions {m['kv_preemptions']}")
        if spec:
            out.print(f"{r['model']}: speculative k={spec['spec_tokens']} acceptance "
                      f"{spec['acceptance_rate'] or 0:.3f}, {spec['tokens_per_step'] or 0:.2f} tokens/verify step")
        sp = (r["perf"].get("spread") or {}).get("output_tokens_per_s")
        if sp:
            out.print(f"{r['model']}: output tok/s median {r['perf']['output_tokens_per_s']:.1f} over "
                      f"{r['perf']['repeats']} runs (spread {sp[0]:.1f}–{sp[1]:.1f})")
        if r["quality"].get("tasks"):
            out.print(f"{r['model']}: tasks {json.dumps(r['quality']['tasks'])}")
    for label, path in (("json", json_out), ("csv", csv), ("plot", plot)):
        if path is not None:
            err.print(f"wrote {label}: {path}")
