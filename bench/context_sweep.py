"""Decode speed against context length: llmopt's engine per --kv-dtype beside HF `model.generate`, measured in one run.

For every context length C (random token ids of exactly C tokens, seeded) and batch size B (1 and 16), each
engine runs the same B prompts for the same N new tokens (greedy, EOS ignored):
- llmopt: LLMEngine with --kv-dtype float (the model's dtype) and each other --kv-dtypes; the whole batch is
  prefilled in one step (max_prefill_tokens = B·C), so every later step is a decode step of all B sequences.
- hf: `model.generate` with its own DynamicCache; batch 16 is ONE batched generate call on the 16 prompts — they all
  have exactly C tokens, so no padding is needed (attention_mask all ones); batch 1 is one request.
Decode is measured apart from prefill by per-token timestamps (the engine's Sequence.token_times, a streamer's for
generate): TTFT = first token (prefill + one sampling), TPOT = (last − first) / (N − 1) per sequence, decode tok/s =
B·(N − 1) / (last − first) — the same TPOT as llmopt.evaluate.metrics. A warm-up round (every engine, both batch
sizes, the smallest context) runs first, untimed; then --repeats rounds, every (context, batch, engine) interleaved
within a round so drift of a shared machine hits all alike; figures are medians over rounds, ratios of medians.
Threads are pinned (--threads, default 1: repeatable on a shared machine; the engine's CLI default differs).

Contexts above the model's maximum (context + N > max_position_embeddings) are capped to max − N.
--llama100m swaps the model for a random Llama-shaped ~110M-parameter model built in memory (hidden 768, 12 layers,
12 heads, MLP 2048, vocab 32000, 4,096 positions): speed does not depend on the weights.

    python bench/context_sweep.py [--model builtin:tiny | --llama100m] [--contexts 256,1024,2048] [--batches 1,16]
        [--new-tokens 32] [--kv-dtypes auto,bfloat16,int8] [--repeats 3] [--threads 1] [--json F] [--plot F.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def cap_contexts(requested: list[int], max_ctx: int, new_tokens: int) -> tuple[list[int], list[str]]:
    """Contexts that fit (context + new_tokens ≤ max_ctx): larger ones become max_ctx − new_tokens; deduplicated,
    in order. Returns (contexts, notes about what was capped)."""
    limit = max_ctx - new_tokens
    if limit < 1:
        raise ValueError(f"{new_tokens} new tokens leave no room for a prompt in a context of {max_ctx}")
    out: list[int] = []
    notes: list[str] = []
    for c in requested:
        if c < 1:
            raise ValueError(f"a context length is ≥ 1 token (got {c})")
        if c > limit:
            notes.append(f"context {c} capped to {limit} (model max {max_ctx} − {new_tokens} new tokens)")
            c = limit
        if c not in out:
            out.append(c)
    return out, notes


def decode_stats(token_times: list[list[float]]) -> tuple[float, float, float]:
    """Per-sequence token timestamps (one list per sequence, ≥ 2 tokens each, measured from the run's start) →
    (earliest first token s = TTFT, median per-sequence TPOT s, decode tok/s): decode is every token after each
    sequence's first, over the span from the earliest first token to the latest last one."""
    if not token_times or any(len(t) < 2 for t in token_times):
        raise ValueError("decode stats need ≥ 2 tokens per sequence")
    tpot = statistics.median((t[-1] - t[0]) / (len(t) - 1) for t in token_times)
    first = min(t[0] for t in token_times)
    span = max(t[-1] for t in token_times) - first
    tokens = sum(len(t) - 1 for t in token_times)
    return first, tpot, tokens / span if span > 0 else float("inf")


def build_llama100m():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def load(args):
    if args.llama100m:
        return build_llama100m(), "random Llama (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied)"
    from llmopt.models.loading import ModelSpec, load_model

    lm = load_model(ModelSpec(args.model, device="cpu"))
    return lm.model, args.model


def run_engine(model, prompts: list[list[int]], new_tokens: int, kv_dtype: str):
    from llmopt.engine import EngineConfig, LLMEngine, SamplingParams

    b, c = len(prompts), len(prompts[0])
    cfg = EngineConfig(kv_budget=2 ** 40, block_size=16, max_prefill_tokens=b * c, max_num_seqs=b,
                       max_blocks=b * -(-(c + new_tokens) // 16), kv_dtype=kv_dtype)
    engine = LLMEngine(model, cfg)
    for p in prompts:
        engine.add(p, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    seqs = engine.run()
    return [s.token_times for s in seqs], [s.output for s in seqs]


class _StepClock:
    """A generate() streamer stamping each step's tokens (its first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def run_hf(model, prompts: list[list[int]], new_tokens: int):
    ids = torch.tensor(prompts)
    clock = _StepClock()
    t_call = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                         streamer=clock)
    gen = out[:, ids.shape[1]:].tolist()
    if any(len(g) != new_tokens for g in gen) or len(clock.times) != new_tokens:
        raise RuntimeError(f"generate stopped early: {[len(g) for g in gen]} tokens, {len(clock.times)} steps")
    return [[t - t_call for t in clock.times]] * len(prompts), gen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--llama100m", action="store_true", help="a random ~110M-param Llama-shaped model instead")
    ap.add_argument("--contexts", default="256,1024,2048")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kv-dtypes", default="auto,bfloat16,int8",
                    help="engine KV formats (auto = the model's dtype, the float-KV row)")
    ap.add_argument("--no-hf", action="store_true", help="skip model.generate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be ≥ 2 (TPOT is over the tokens after the first)")
    torch.set_num_threads(args.threads)
    from llmopt.engine.engine import max_context, model_dtype
    from llmopt.engine.kv_format import check_kv_dtype, resolve_kv_format

    model, shape = load(args)
    mdt = model_dtype(model)
    kv = []
    for k in args.kv_dtypes.split(","):
        check_kv_dtype(k)
        name = resolve_kv_format(k, mdt).name
        if name not in kv:
            kv.append(name)
    engines = [f"llmopt {k}" for k in kv] + ([] if args.no_hf else ["hf generate"])
    contexts, notes = cap_contexts([int(c) for c in args.contexts.split(",")], max_context(model), args.new_tokens)
    batches = [int(b) for b in args.batches.split(",")]
    vocab = model.get_input_embeddings().weight.shape[0]
    nparams = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    prompts = {c: torch.randint(4, vocab, (max(batches), c), generator=g).tolist() for c in contexts}

    def one(name: str, c: int, b: int):
        ps = prompts[c][:b]
        if name == "hf generate":
            return run_hf(model, ps, args.new_tokens)
        return run_engine(model, ps, args.new_tokens, name.split(" ", 1)[1])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {shape}, {nparams / 1e6:.1f}M params, "
          f"{mdt}; contexts {contexts}, batches {batches}, {args.new_tokens} new tokens (EOS ignored, greedy), "
          f"median of {args.repeats} interleaved rounds after a warm-up", flush=True)
    for n in notes:
        print(f"note: {n}")
    t_start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:  # warm-up, untimed
            for e in engines:
                one(e, contexts[0], b)
        res: dict[tuple[int, int, str], dict[str, list[float]]] = {}
        outs: dict[tuple[int, int, str], list[list[int]]] = {}
        for r in range(args.repeats):
            for c in contexts:
                for b in batches:
                    for e in engines:
                        times, outs[c, b, e] = one(e, c, b)
                        ttft, tpot, rate = decode_stats(times)
                        d = res.setdefault((c, b, e), {"ttft": [], "tpot": [], "rate": []})
                        d["tpot"].append(tpot)
                        d["rate"].append(rate)
                        d["ttft"].append(ttft)
            print(f"round {r + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr,
                  flush=True)

    rows = []
    ref_name = "hf generate" if "hf generate" in engines else engines[0]
    float_name = engines[0]
    print(f"\n| context | batch | engine / KV | TTFT ms | decode tok/s | TPOT ms | × {ref_name} "
          f"| tokens = {float_name} |")
    print("|---|---|---|---|---|---|---|---|")
    for c in contexts:
        for b in batches:
            ref = statistics.median(res[c, b, ref_name]["rate"])
            for e in engines:
                d = res[c, b, e]
                rate, tpot = statistics.median(d["rate"]), statistics.median(d["tpot"]) * 1e3
                ttft = statistics.median(d["ttft"]) * 1e3
                base = outs[c, b, float_name]
                same = sum(x == y for o, q in zip(outs[c, b, e], base) for x, y in zip(o, q)) / sum(map(len, base))
                rows.append({"context": c, "batch": b, "engine": e, "ttft_ms": ttft, "decode_tok_s": rate,
                             "tpot_ms": tpot, "ratio_vs_ref": rate / ref, "same_tokens_as_float": same,
                             "decode_tok_s_rounds": d["rate"], "tpot_ms_rounds": [t * 1e3 for t in d["tpot"]]})
                print(f"| {c} | {b} | {e} | {ttft:.1f} | {rate:.1f} | {tpot:.2f} | {rate / ref:.2f} | {same:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "model": shape, "params": nparams, "dtype": str(mdt), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "contexts": contexts, "batches": batches,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "reference": ref_name, "notes": notes,
            "hf_batching": "one batched generate of equal-length prompts (no padding)", "rows": rows}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
        for ax, b in zip(axes[0], batches):
            for e in engines:
                ys = [next(r["decode_tok_s"] for r in rows if r["context"] == c and r["batch"] == b
                           and r["engine"] == e) for c in contexts]
                ax.plot(contexts, ys, marker="o", label=e)
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts, [str(c) for c in contexts])
            ax.set_xlabel("context tokens")
            ax.set_ylabel("decode tok/s")
            ax.set_title(f"batch {b}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{shape[:60]}, {torch.get_num_threads()} thread(s), {args.new_tokens} new tokens", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
