"""Continuous batching (llmopt's engine) vs one-request-at-a-time `model.generate`, same workload, one run.

    python bench/engine_throughput.py [--model builtin:tiny] [--threads 1] [--num-requests 32]
        [--prompt-len 32:256] [--output-len 32:128] [--max-prefill-tokens 1024] [--repeats 3] [--hf-cb]

Runs the model given and a second architecture: a Qwen2 (q/k/v biases) built from the same model's weights
with random attention biases added (`--no-qwen2` skips it). For each: an untimed warm-up of both engines, then
`--repeats` interleaved pairs of the whole workload through `generate` (one request at a time) and through the
engine; prints output tokens/s of the median pair, every pair's ratio, and whether every request's greedy tokens
are identical. `--hf-cb` adds transformers' own continuous batching to each pair, as a cross-check."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def qwen2_from(model, seed: int = 0):
    """A Qwen2ForCausalLM with `model`'s (Llama) weights and random q/k/v biases: a second architecture whose
    logits are as peaked as a trained model's (random-weight models have near-ties that make greedy flaky)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model.config
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=c.rms_norm_eps, rope_theta=getattr(c, "rope_theta", 10000.0),
                      tie_word_embeddings=False, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                      pad_token_id=c.pad_token_id)
    q = Qwen2ForCausalLM(cfg).to(model.dtype).eval()
    missing = q.load_state_dict(model.state_dict(), strict=False).missing_keys
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name in missing:  # the biases Llama does not have
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return q


def bench_one(label: str, model, requests, args) -> bool:
    from llmopt.engine import EngineConfig
    from llmopt.engine.block_manager import blocks_for
    from llmopt.evaluate.hf_cb import run_hf_cb
    from llmopt.evaluate.perf import Sampling, run_hf, run_llmopt, warmup_requests

    greedy = Sampling()
    config = EngineConfig(kv_budget=2 ** 40, block_size=args.block_size, max_prefill_tokens=args.max_prefill_tokens,
                          max_blocks=sum(blocks_for(len(r.prompt) + r.max_tokens, args.block_size) for r in requests))
    run_hf(model, warmup_requests(requests, batched=False), greedy, pad_id=model.config.pad_token_id)
    run_llmopt(model, warmup_requests(requests, batched=True), config, greedy)
    # interleaved repeats: this box's speed drifts by ±10% over minutes (shared VM), so each engine run sits right
    # next to a generate run and the ratio is taken per pair, then the median over pairs
    pairs, cbs = [], []
    if args.hf_cb:
        run_hf_cb(model, warmup_requests(requests, batched=True), greedy, args.block_size, args.max_prefill_tokens)
    for _ in range(args.repeats):
        pairs.append((run_hf(model, requests, greedy, pad_id=model.config.pad_token_id),
                      run_llmopt(model, requests, config, greedy)))
        if args.hf_cb:
            cbs.append(run_hf_cb(model, requests, greedy, args.block_size, args.max_prefill_tokens))
    ratios = [e.metrics.output_tokens_per_s / h.metrics.output_tokens_per_s for h, e in pairs]
    order = sorted(range(len(pairs)), key=lambda i: ratios[i])
    hf, eng = pairs[order[len(order) // 2]]  # the median pair
    ratio = ratios[order[len(order) // 2]]
    same = min(sum(a == b for a, b in zip(h.outputs, e.outputs)) for h, e in pairs)
    ratio = eng.metrics.output_tokens_per_s / hf.metrics.output_tokens_per_s
    kv = eng.kv
    print(f"{label:<28} generate {hf.metrics.output_tokens_per_s:8.1f} tok/s ({hf.metrics.duration_s:6.2f} s)   "
          f"engine {eng.metrics.output_tokens_per_s:8.1f} tok/s ({eng.metrics.duration_s:6.2f} s)   "
          f"ratio {ratio:5.2f}x (median of {len(pairs)} interleaved pairs; all: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})   greedy identical {same}/{len(requests)}")
    print(f"{'':<28} engine TTFT p50/p99 {eng.metrics.ttft_ms.p50:.0f}/{eng.metrics.ttft_ms.p99:.0f} ms, "
          f"ITL p50/p99 {eng.metrics.itl_ms.p50:.1f}/{eng.metrics.itl_ms.p99:.1f} ms; KV peak {kv.peak_tokens} tokens: "
          f"allocated {kv.allocated_bytes:,} B vs formula {kv.formula_bytes:,} B "
          f"(waste {kv.waste_bytes / kv.allocated_bytes * 100:.1f}%)")
    if cbs:  # transformers' own continuous batching, same workload, next to the same generate runs
        cb_ratios = sorted(c.metrics.output_tokens_per_s / h.metrics.output_tokens_per_s for (h, _), c in zip(pairs, cbs))
        cb_same = min(sum(a == b for a, b in zip(h.outputs, c.outputs)) for (h, _), c in zip(pairs, cbs))
        cb = statistics.median(c.metrics.output_tokens_per_s for c in cbs)
        print(f"{'':<28} transformers CB {cb:8.1f} tok/s   ratio vs generate {cb_ratios[len(cb_ratios) // 2]:5.2f}x   "
              f"llmopt engine / transformers CB {eng.metrics.output_tokens_per_s / cb:5.2f}x   "
              f"greedy identical {cb_same}/{len(requests)}")
        same = min(same, cb_same)
    return same == len(requests)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", default="32:256")
    ap.add_argument("--output-len", default="32:128")
    ap.add_argument("--max-prefill-tokens", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved generate/engine pairs (odd: median pair)")
    ap.add_argument("--no-qwen2", action="store_true")
    ap.add_argument("--hf-cb", action="store_true", help="also run transformers' continuous batching (cross-check)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llmopt.calibration.data import DataSpec, load_texts, token_stream
    from llmopt.evaluate.workload import WorkloadSpec, make_workload, parse_range
    from llmopt.models import load_model

    loaded = load_model(args.model)
    spec = WorkloadSpec(args.num_requests, parse_range(args.prompt_len, "--prompt-len"),
                        parse_range(args.output_len, "--output-len"), seed=args.seed)
    requests = make_workload(token_stream(load_texts(DataSpec(), "test"), loaded.tokenizer), spec)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {loaded.device}, "
          f"dtype {loaded.dtype}; {len(requests)} requests, prompts {args.prompt_len}, outputs {args.output_len} "
          f"({sum(r.max_tokens for r in requests)} output tokens), greedy, max prefill tokens/step "
          f"{args.max_prefill_tokens}, block size {args.block_size}")
    t = time.perf_counter()
    ok = bench_one(f"{args.model} ({type(loaded.model).__name__})", loaded.model, requests, args)
    if not args.no_qwen2:
        ok &= bench_one("Qwen2 (same weights + biases)", qwen2_from(loaded.model).to(loaded.device), requests, args)
    print(f"total {time.perf_counter() - t:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
