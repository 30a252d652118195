"""Speculative decoding at batch 1: acceptance rate and speed-up over the same engine without a draft.

    python bench/speculative.py [--model builtin:tiny] [--draft PATH | --draft-layers 1] [--spec-tokens 2,4]
        [--num-requests 8] [--prompt-len 32:256] [--output-len 64:128] [--threads 1]

The draft is a given checkpoint (e.g. the distilled student) or, by default, a layer-dropped copy of the target
(its first --draft-layers decoder layers with the target's embeddings, final norm and head). Requests run one at
a time (batch 1) through llmopt's engine, with and without the draft, greedy; prints tokens/s of both, the
speed-up, the acceptance rate, and whether every output is identical to the target alone.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch


def layer_dropped(model, layers: int):
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    return draft


def batch1(model, requests, config, draft=None, k: int = 4):
    """Each request alone through the engine; returns (outputs, decode seconds, acceptance stats)."""
    from llmopt.evaluate.perf import Sampling, run_llmopt

    outs, secs, proposed, accepted = [], 0.0, 0, 0
    for r in requests:
        res = run_llmopt(model, [r], config, Sampling(), draft, k)
        outs.append(res.outputs[0])
        secs += res.metrics.duration_s
        if res.spec is not None:
            proposed += res.spec.proposed
            accepted += res.spec.accepted
    return outs, secs, (accepted / proposed if proposed else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--draft", default=None, help="draft checkpoint (default: a layer-dropped copy of the target)")
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--spec-tokens", default="2,4")
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--prompt-len", default="32:256")
    ap.add_argument("--output-len", default="64:128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llmopt.calibration.data import DataSpec, load_texts, token_stream
    from llmopt.engine import EngineConfig
    from llmopt.evaluate.workload import WorkloadSpec, make_workload, parse_range
    from llmopt.models import load_model

    target = load_model(args.model)
    if args.draft:
        draft, draft_name = load_model(args.draft).model, args.draft
    else:
        draft = layer_dropped(target.model, args.draft_layers)
        draft_name = f"layer-dropped copy ({args.draft_layers} of {target.model.config.num_hidden_layers} layers)"
    spec = WorkloadSpec(args.num_requests, parse_range(args.prompt_len, "--prompt-len"),
                        parse_range(args.output_len, "--output-len"), seed=args.seed)
    requests = make_workload(token_stream(load_texts(DataSpec(), "test"), target.tokenizer), spec)
    config = EngineConfig(kv_budget=256 * 2 ** 20)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {target.device}, {target.dtype}; target "
          f"{args.model}, draft {draft_name}; {len(requests)} requests at batch 1, prompts {args.prompt_len}, "
          f"outputs {args.output_len}, greedy; medians of {args.repeats} repeats (after a warm-up)")
    batch1(target.model, requests[:1], config)  # warm-up
    batch1(target.model, requests[:1], config, draft, 2)
    plain_secs, ref = [], None
    ks = [int(k) for k in args.spec_tokens.split(",")]
    spec_secs: dict[int, list[float]] = {k: [] for k in ks}
    acc: dict[int, float | None] = {}
    ok = True
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both alike
        ref, s, _ = batch1(target.model, requests, config)
        plain_secs.append(s)
        for k in ks:
            outs, s, acc[k] = batch1(target.model, requests, config, draft, k)
            spec_secs[k].append(s)
            ok &= outs == ref
    n_out = sum(len(o) for o in ref)
    base = statistics.median(plain_secs)
    print(f"{'target alone':<22} {n_out / base:8.1f} tok/s")
    for k in ks:
        t = statistics.median(spec_secs[k])
        print(f"{f'speculative k={k}':<22} {n_out / t:8.1f} tok/s   speed-up {base / t:5.2f}x   acceptance "
              f"{acc[k]:.3f}")
    print(f"greedy output identical to the target alone: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
