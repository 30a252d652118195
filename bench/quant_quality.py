"""Quality of every llmopt quantizer against the float model, on two architectures, in one run.

Models: builtin:tiny (Llama, GQA, trained) and a Qwen2 (attention biases, tied embeddings, GQA) trained
here on the builtin corpus with the same tokenizer (cached under --work). Each configuration goes through
`llmopt.quant.api.quantize` exactly as the CLI does (format writer, reload through llmopt's runtime) and
is scored on the builtin test split: perplexity, mean KLD vs float, top-1 agreement. Prints the issue's
targets: GPTQ KLD ≤ ½ RTN's (same bits/group/sym), AWQ KLD < RTN's (asym), INT8/W8A8 perplexity within 1%.

Usage: python bench/quant_quality.py [--samples 128] [--seq-len 256] [--models tiny,qwen2]
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

CONFIGS = [  # (label, method, extra QuantizeArgs fields)
    ("rtn w4 g128 sym", "rtn", {"bits": 4, "group_size": 128, "sym": True}),
    ("gptq w4 g128 sym", "gptq", {"bits": 4, "group_size": 128, "sym": True}),
    ("gptq w4 g128 sym act-order static", "gptq", {"bits": 4, "group_size": 128, "sym": True, "act_order": True,
                                                    "static_groups": True}),
    ("rtn w4 g128 asym", "rtn", {"bits": 4, "group_size": 128, "sym": False}),
    ("awq w4 g128 asym", "awq", {"bits": 4, "group_size": 128, "sym": False}),
    ("gptq w4 g128 asym", "gptq", {"bits": 4, "group_size": 128, "sym": False}),
    ("int8 weight-only", "int8", {}),
    ("w8a8 smoothquant", "w8a8", {}),
]


def build_qwen2(out: Path, steps: int = 150) -> Path:
    """Train a Qwen2 (hidden 256, 4 layers, 8/2 heads, biases, tied embeddings) on the builtin train split
    (a fifth of builtin:tiny's training tokens: enough to be a real LM whose KLDs mean something)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llmopt.calibration import corpus
    from llmopt.calibration.data import token_stream
    from llmopt.models.builtin import TinyRecipe, train_model, train_tokenizer, windows

    if (out / "config.json").exists():
        return out
    tok = train_tokenizer(corpus.split_texts("train"), TinyRecipe().vocab_size)  # builtin:tiny's tokenizer recipe
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    if steps > 0:  # steps = 0: random weights (a quick second architecture; KLDs are then small)
        recipe = replace(TinyRecipe(), name="qwen2-bench", seq_len=128, batch_size=8, steps=steps, warmup=10)
        train_model(model, windows(token_stream(corpus.split_texts("train"), tok), recipe.seq_len), recipe)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--models", default="tiny,qwen2")
    ap.add_argument("--tiny", default="builtin:tiny", help="the Llama to use ")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmopt-bench"))
    ap.add_argument("--only", default=None, help="comma-separated config labels to run")
    ap.add_argument("--qwen2-steps", type=int, default=150, help="training steps of the Qwen2 (0: random)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from llmopt.models import ModelSpec, resolve_path
    from llmopt.quant.api import QuantizeArgs, quantize

    args.work.mkdir(parents=True, exist_ok=True)
    paths = {"tiny": resolve_path(ModelSpec(args.tiny))} if "tiny" in args.models else {}
    if "qwen2" in args.models:
        paths["qwen2"] = build_qwen2(args.work / f"qwen2-{args.qwen2_steps}steps", args.qwen2_steps)
    configs = [c for c in CONFIGS if args.only is None or c[0] in args.only.split(",")]
    results = []
    for mname in args.models.split(","):
        for label, method, extra in configs:
            out = args.work / f"q-{mname}-{label.replace(' ', '-')}"
            qa = QuantizeArgs(model=str(paths[mname]), out=out, method=method, samples=args.samples,
                              seq_len=args.seq_len, eval_samples=args.eval_samples, eval_seq_len=args.seq_len,
                              overwrite=True, **extra)
            r = quantize(qa)
            results.append((mname, label, r))
            m = r.metrics
            print(f"{mname:6s} {label:36s} kld={m['quantized']['kld_mean']:.3e} ppl={m['quantized']['perplexity']:.3f} "
                  f"float={m['float']['perplexity']:.3f} t={r.timings['quantize']:.1f}s ({r.evaluated_with})",
                  flush=True)

    t = Table(title=f"llmopt quantize vs float, {args.samples}×{args.seq_len} calibration tokens, "
                    f"{args.eval_samples}×{args.seq_len} builtin test tokens")
    for c in ("model", "config", "ppl float", "ppl quant", "Δppl", "mean KLD", "KLD / RTN", "top-1", "size",
              "quantize s", "eval via"):
        t.add_column(c, justify="left" if c in ("model", "config", "eval via") else "right")
    kld = {(mn, lb): r.metrics["quantized"]["kld_mean"] for mn, lb, r in results}
    for mn, lb, r in results:
        m = r.metrics
        rtn_label = "rtn w4 g128 asym" if "asym" in lb else "rtn w4 g128 sym"
        ref = kld.get((mn, rtn_label)) if lb.startswith(("gptq", "awq")) else None
        dppl = m["quantized"]["perplexity"] / m["float"]["perplexity"] - 1
        t.add_row(mn, lb, f"{m['float']['perplexity']:.3f}", f"{m['quantized']['perplexity']:.3f}", f"{dppl:+.2%}",
                  f"{m['quantized']['kld_mean']:.3e}", f"{m['quantized']['kld_mean'] / ref:.3f}" if ref else "—",
                  f"{m['quantized']['top1_agreement']:.3f}", f"{m['size_bytes'] / m['float_size_bytes']:.2f}×",
                  f"{r.timings['quantize']:.1f}", r.evaluated_with or "—")
    Console(width=200).print(t)  # whole rows in logs and pipes too
    checks = []
    for mn in args.models.split(","):
        def k(label, _mn=mn):
            return kld.get((_mn, label))
        if k("gptq w4 g128 sym") and k("rtn w4 g128 sym"):
            checks.append((mn, "GPTQ KLD <= 1/2 RTN (sym)", k("gptq w4 g128 sym") <= 0.5 * k("rtn w4 g128 sym")))
        if k("awq w4 g128 asym") and k("rtn w4 g128 asym"):
            checks.append((mn, "AWQ KLD < RTN (asym)", k("awq w4 g128 asym") < k("rtn w4 g128 asym")))
        for mn2, lb, r in results:
            if mn2 == mn and lb in ("int8 weight-only", "w8a8 smoothquant"):
                m = r.metrics
                checks.append((mn, f"{lb} ppl within 1%",
                               abs(m["quantized"]["perplexity"] / m["float"]["perplexity"] - 1) <= 0.01))
    for mn, what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {mn}: {what}")
    (args.work / "quality.json").write_text(json.dumps(
        [dict(model=mn, config=lb, result=r.to_dict()) for mn, lb, r in results], indent=2, default=str))


if __name__ == "__main__":
    main()
