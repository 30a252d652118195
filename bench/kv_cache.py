"""KV-cache formats side by side at long context: decode tok/s and KV bytes per --kv-dtype, measured in one run.

A random Llama of builtin:tiny's shape (4 layers, 8 heads / 2 kv heads of dim 32, hidden 256) but a 4,096-token
context, so decode can run at 2,048+ tokens of history without a trained long-context model (speed does not depend
on the weights). B sequences are prefilled to CONTEXT tokens, then every format decodes the same STEPS greedy
steps; the timed part is the decode steps only, medians over REPEATS runs, formats interleaved so drift of a shared
machine hits all alike. Greedy tokens of each format are compared with float32 KV's. Every KV dtype reads the
cache in place (the default on the CPU, model_runner.read_in_place); two more float32 rows read it the older ways,
swapped in for their run only: `float32 gathered` copies every sequence's blocks into one padded batch
(index_select) for one masked SDPA call, `float32 pool[tables]` is the engine's first gather (advanced indexing)
that the in-place read replaced.

--llama100m swaps in bench/context_sweep.py's second shape (12 layers, 12 heads of dim 64, no GQA).

    python bench/kv_cache.py [--batch 16] [--context 2048] [--steps 16] [--repeats 3] [--threads 1] [--llama100m]
        [--rows "float32 gathered,int8"]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import torch

from llmopt.engine import (
    EngineConfig,
    LLMEngine,
    SamplingParams,
    attention,
    model_runner,
)
from llmopt.engine.kv_format import fp8_dtype


def make_model(context: int, llama100m: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if llama100m:  # bench/context_sweep.py's second shape: 12 heads of dim 64, no GQA
        cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=context,
                          tie_word_embeddings=True)
    else:
        cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=context)
    return AutoModelForCausalLM.from_config(cfg).eval()


GATHERED, LEGACY = "float32 gathered", "float32 pool[tables]"


@contextlib.contextmanager
def read_path(name: str) -> Iterator[None]:
    """Decode through the gathered read for GATHERED, also with the first gather (pool[tables]) for LEGACY."""
    if name not in (GATHERED, LEGACY):
        yield
        return
    saved = model_runner.read_in_place, attention._blocks
    model_runner.read_in_place = lambda device, contexts: False
    if name == LEGACY:
        attention._blocks = lambda pool, tables: pool[tables]  # [B, nb, bs, ...]
    try:
        yield
    finally:
        model_runner.read_in_place, attention._blocks = saved


def decode_run(model, prompts: list[list[int]], steps: int, kv_dtype: str) -> tuple[float, list[list[int]], int]:
    """Prefill every prompt (untimed), then time the decode steps left once all are prefilled.
    Returns (decode output tok/s, outputs, KV bytes allocated at the peak)."""
    engine = LLMEngine(model, EngineConfig(kv_budget=2 ** 40, block_size=16, max_prefill_tokens=4096,
                                           max_blocks=len(prompts) * (-(-(len(prompts[0]) + steps) // 16)),
                                           kv_dtype=kv_dtype))
    for p in prompts:
        engine.add(p, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    from llmopt.engine.model_runner import paged_attention_enabled

    engine.t0 = engine.clock()
    with paged_attention_enabled(model):
        while any(s.num_computed < len(s.prompt) for s in engine.sequences):  # prefill + first token
            engine.step()
        before = sum(len(s.output) for s in engine.sequences)  # early ones decode while later ones prefill
        t = time.perf_counter()
        while engine.scheduler.has_work:
            engine.step()
        dt = time.perf_counter() - t
    return (sum(len(s.output) for s in engine.sequences) - before) / dt, [s.output for s in engine.sequences], engine.kv_stats().allocated_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama100m", action="store_true",
                    help="a random ~110M Llama (hidden 768, 12 layers, 12 heads of dim 64, vocab 32000) instead")
    ap.add_argument("--rows", default=None,
                    help="comma-separated rows to run (default: all), e.g. 'float32 gathered,float32'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = make_model(max(4096, args.context + args.steps + 1), args.llama100m)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, model.config.vocab_size, (args.context,), generator=g).tolist()
               for _ in range(args.batch)]
    formats = [LEGACY, GATHERED, "float32", "bfloat16", "int8"] + (["fp8_e4m3"] if fp8_dtype() is not None else [])
    if args.rows:
        formats = [f for f in formats if f in args.rows.split(",") or f == "float32"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); batch {args.batch} × {args.context} "
          f"tokens of context, {args.steps} decode steps, median of {args.repeats}")
    rates: dict[str, list[float]] = {f: [] for f in formats}
    outs, kv = {}, {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for f in formats:
                with read_path(f):
                    r, outs[f], kv[f] = decode_run(model, prompts, args.steps, "float32" if "float32" in f else f)
                rates[f].append(r)
    base = statistics.median(rates["float32"])
    print(f"{'kv dtype':20} {'decode tok/s':>12} {'vs float32':>10} {'KV bytes':>12} {'vs float32':>10} "
          f"{'tokens = float32':>16}")
    for f in formats:
        m = statistics.median(rates[f])
        same = sum(a == b for x, y in zip(outs[f], outs["float32"]) for a, b in zip(x, y))
        print(f"{f:20} {m:12.1f} {m / base:10.2f} {kv[f]:12,} {kv[f] / kv['float32']:10.3f} "
              f"{same / sum(map(len, outs['float32'])):16.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
