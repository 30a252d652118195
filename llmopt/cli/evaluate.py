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
    kv_dtype: Annotated[str, typer.Option("--kv-dtype", help="How llmopt's engine caches K/V: auto (the model's "
                                          "dtype), float32, bfloat16, float16, int8 or fp8_e4m3 (8-bit codes with a "
                                          "scale per token and kv head; quality.kv_* measures them against float "
                                          "KV).")] = "auto",
    decode_attention: Annotated[str, typer.Option("--decode-attention", help="How llmopt's engine reads the paged "
                                                  "KV at decode: auto (CPU: in place or gathered by a fixed rule; "
                                                  "CUDA: FlexAttention when its probe matches SDPA, else gathered), "
                                                  "in-place, gathered or flex.")] = "auto",
    max_prefill_tokens: Annotated[int, typer.Option("--max-prefill-tokens", help="Prompt tokens prefilled per "
                                                    "step (lower: better ITL tail, worse TTFT).")] = 1024,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", help="Most requests running at once.")] = 256,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch (default: the "
                                                       "faster of 1 and all cores, timed at start: all cores on a "
                                                       "quiet machine, 1 where other work keeps them busy).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs; medians and spread are reported.")] = 3,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="An untimed warm-up run first.")] = True,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Perplexity window (tokens).")] = 512,
    stride: Annotated[int | None, typer.Option("--stride", help="Sliding-window stride (default seq-len/2).")] = None,
    quality_tokens: Annotated[int, typer.Option("--quality-tokens", help="Held-out tokens scored at most.")] = 32768,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="lm-eval tasks (comma-separated or repeated); "
                                                    "llmopt_cloze runs offline.")] = None,
    task_limit: Annotated[int | None, typer.Option("--task-limit", help="Examples per lm-eval task.")] = None,
    prompts: Annotated[str | None, typer.Option("--prompts", help="Prompt set generated by every model through "
                                                "llmopt's engine: a .jsonl/.csv file (prompt, category harmful|benign|"
                                                "general, answers) or builtin.")] = None,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", help="Most new tokens per prompt-set generation "
                                            "(stops earlier at EOS).")] = 64,
    samples_per_prompt: Annotated[int, typer.Option("--samples-per-prompt", help="Seeded samples per prompt "
                                                    "(needs --temperature > 0).")] = 1,
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Wrap prompt-set prompts in each "
                                                "tokenizer's chat template where it has one.")] = False,
    refusal_patterns: Annotated[str | None, typer.Option("--refusal-patterns", help="Refusal regexes, one per "
                                                         "line, replacing the built-in multilingual list.")] = None,
    refusal_judge: Annotated[str | None, typer.Option("--refusal-judge", help="A causal LM that judges refusals "
                                                      "(yes/no) instead of the phrase list.")] = None,
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
    """Evaluate models: perplexity / KLD / top-1 / lm-eval tasks / prompt-set refusals, answers and agreement, and
    TTFT, TPOT, ITL, throughput, memory, cost."""
    from llmopt.cli.console import err, out
    from llmopt.cli.progress import bars
    from llmopt.evaluate.api import EvalArgs
    from llmopt.evaluate.api import evaluate as run_eval
    from llmopt.evaluate.outputs import finite, table
    task_list = [t.strip() for item in (tasks or []) for t in item.split(",") if t.strip()] or None
    args = EvalArgs(model=list(model), baseline=baseline, data=data, split=split, text_field=text_field,
                    num_requests=num_requests, prompt_len=prompt_len, output_len=output_len, request_rate=request_rate,
                    seed=seed, engine=engine, tp=tp, draft=draft, spec_tokens=spec_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, kv_budget=kv_budget, block_size=block_size, kv_dtype=kv_dtype,
                    decode_attention=decode_attention,
                    max_prefill_tokens=max_prefill_tokens, max_num_seqs=max_num_seqs, threads=threads,
                    repeats=repeats, warmup=warmup, seq_len=seq_len, stride=stride, quality_tokens=quality_tokens,
                    tasks=task_list, task_limit=task_limit, prompts=prompts, gen_tokens=gen_tokens,
                    samples_per_prompt=samples_per_prompt, chat_template=chat_template,
                    refusal_patterns=refusal_patterns, refusal_judge=refusal_judge, quality_only=quality_only, perf_only=perf_only,
                    price_per_hour=price_per_hour, json=json_out, csv=csv, plot=plot, device=device, dtype=dtype,
                    trust_remote_code=trust_remote_code)
    err.print(f"threads: {args.threads}  engine: {engine}")
    with bars() as progress:
        result = run_eval(args, progress=progress)
    d = finite(result.to_dict())
    out.print(table(d))  # fitted to a terminal; whole in a file or pipe (console.py)
    for r in d["results"]:
        for line in _model_notes(r, d["baseline"]):
            out.print(line)
    for label, path in (("json", json_out), ("csv", csv), ("plot", plot)):
        if path is not None:
            err.print(f"wrote {label}: {path}")
    if json_out is not None and result.generations:
        from llmopt.evaluate.outputs import sidecar

        err.print(f"wrote generations: {sidecar(json_out, 'generations')}, flips: {sidecar(json_out, 'flips')}")


def _model_notes(r: dict, baseline: str | None) -> list[str]:
    """The lines printed under the table for one model's result: KV memory and quality, speculation, spread,
    utilisation, tasks, generation flips."""
    from llmopt.evaluate.utilization import line as utilization_line

    notes: list[str] = []
    m, spec = r["memory"], r.get("speculative")
    if m.get("kv_bytes_allocated") is not None:
        formula, alloc = m["kv_bytes_formula"], m["kv_bytes_allocated"]
        notes.append(f"{r['model']}: KV at peak {m['kv_peak_tokens']} tokens: allocated {alloc:,} B, formula "
                  f"{formula:,} B ({(alloc / formula - 1) * 100 if formula else 0:+.1f}%), block waste "
                  f"{m['kv_waste_bytes']:,} B, preemptions {m['kv_preemptions']} ({m.get('kv_dtype')} KV)")
    q = r["quality"]
    if q.get("kv_kld_mean") is not None:
        notes.append(f"{r['model']}: {q['kv_dtype']} KV vs float KV over {q['kv_tokens']} teacher-forced tokens: KLD "
                  f"mean {q['kv_kld_mean']:.3g} p99 {q['kv_kld_p99']:.3g}, top-1 {q['kv_top1']:.4f}, ppl "
                  f"{q['kv_perplexity']:.3f} (float KV {q['kv_float_perplexity']:.3f})")
    if q.get("checkpoint") is not None:
        c = q["checkpoint"]
        kld = "" if c.get("kld_mean") is None else f", KLD {c['kld_mean']:.3g}, top-1 {c['top1_agreement']:.4f}"
        notes.append(f"{r['model']}: quality columns are llama.cpp's on the GGUF file; the checkpoint itself "
                     f"through llmopt's runtime: ppl {c['perplexity']:.3f}{kld}")
    if spec:
        notes.append(f"{r['model']}: speculative k={spec['spec_tokens']} acceptance "
                  f"{spec['acceptance_rate'] or 0:.3f}, {spec['tokens_per_step'] or 0:.2f} tokens/verify step")
    sp = (r["perf"].get("spread") or {}).get("output_tokens_per_s")
    if sp:
        notes.append(f"{r['model']}: output tok/s median {r['perf']['output_tokens_per_s']:.1f} over "
                  f"{r['perf']['repeats']} runs (spread {sp[0]:.1f}–{sp[1]:.1f})")
    u = r["perf"].get("utilization")
    if u and u.get("cpu_percent"):
        notes.append(f"{r['model']}: utilisation over the timed runs ({u['samples']} samples every "
                  f"{u['interval_s']} s): {utilization_line(u)}")
    a = r["perf"].get("attention")
    if a:
        taken = ", ".join(f"{k} ×{n}" for k, n in a["counts"].items())
        notes.append(f"{r['model']}: attention (decode path {a['decode_path']}): {taken}"
                     + (f"; {a['note']}" if a.get("note") else ""))
    if r["quality"].get("tasks"):
        notes.append(f"{r['model']}: tasks {json.dumps(r['quality']['tasks'])}")
    g = r["quality"].get("generation")
    if g and g.get("refusal_flips") is not None and r["model"] != baseline:
        notes.append(f"{r['model']}: vs baseline on {g['prompts']} prompts × {g['samples_per_prompt']}: "
                  f"{g['refusal_flips']} refusal and {g['answer_flips']} answer verdicts flipped, token F1 "
                  f"{g['baseline_token_f1']:.3f} ({g['detector']})")
    return notes
