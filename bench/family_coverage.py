"""The family coverage matrix: every decoder family × every method, each cell measured in this run.

For each family of tests/helpers/family_models.py (random tiny configs with the family's own transformers
config: sliding windows shorter than the prompts, hybrid layer types, softcapping, MLA, parallel blocks, MoE) and
each method (rtn, int8, w8a8, gptq, awq):
  quantize   `llmopt quantize` end to end (calibration on the builtin corpus), the fraction of the targeted
             weight parameters it quantized, and KLD vs float through the checkpoint reloaded by llmopt's runtime;
  hf load    compressed-tensors checkpoints: plain transformers `from_pretrained` (its compressed-tensors
             integration) → mean KL(llmopt's runtime ‖ transformers) per token on the same windows, llmopt's
             runtime pinned to its exact fp32 path: ok when at most 1% of the quantization's own KLD; other
             formats (GPTQ/AWQ packing) need GPTQModel, see `llmopt verify`;
  engine     greedy tokens of llmopt's engine (paged KV, block size 4, prefill chunks of 7, mixed batch of 3
             prompts longer than the windows) on the reloaded checkpoint vs `generate` on the same model, with
             the runtime's exact fp32 kernels (must agree) and with its default per-batch-size kernels.
The float model's own engine check is the `float` row. GPTQ < RTN is checked per family at the same bits.

    python bench/family_coverage.py [--families llama gemma2 ...] [--methods gptq awq] [--json coverage.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers
from tests.helpers.family_models import FAMILIES, family_model  # noqa: E402

METHODS = ("rtn", "int8", "w8a8", "gptq", "awq")
FORMAT = {"rtn": "compressed-tensors", "int8": "compressed-tensors", "w8a8": "compressed-tensors",
          "gptq": "compressed-tensors", "awq": "awq"}
PROMPTS, OUTS = (5, 17, 33), (12, 20, 9)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in PROMPTS]


def engine_equal(model, vocab: int) -> str:
    """'3/3' when every request's greedy tokens equal generate's; the error's first line when the engine refuses."""
    from llmopt.engine import EngineConfig, LLMEngine, SamplingParams
    from llmopt.errors import LlmoptError

    ps = _prompts(vocab)
    refs = [model.generate(torch.tensor([p]), max_new_tokens=o, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist() for p, o in zip(ps, OUTS)]
    try:
        engine = LLMEngine(model, EngineConfig(kv_budget=10 ** 8, block_size=4, max_prefill_tokens=7))
    except LlmoptError as e:
        return f"refused: {e}"
    for p, o in zip(ps, OUTS):
        engine.add(p, SamplingParams(max_tokens=o, ignore_eos=True))
    got = [s.output for s in engine.run()]
    return f"{sum(a == b for a, b in zip(got, refs))}/{len(refs)}"


def hf_load(path: Path, ours, windows: torch.Tensor, quant_kld: float) -> str:
    """'ok 3e-12' when plain transformers computes what llmopt's runtime computes: their KL per token at most 1% of
    the quantization's own KLD (or 1e-9) — a loader that dropped or re-initialised weights lands far above that
    even on a random model whose outputs hardly move; '✗ …' with the loader's error or the KLD otherwise."""
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            p = torch.log_softmax(ours(windows).logits.double(), -1)  # [B, L, V]
            q = torch.log_softmax(hf(windows).logits.double(), -1)
        kld = (p.exp() * (p - q)).sum(-1).mean().item()  # KL(ours ‖ transformers) per token
    except Exception as e:  # report what the real loader says, whatever it raises
        return f"✗ {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return f"{'ok' if kld <= max(1e-9, 0.01 * quant_kld) else '✗ logits differ'} {kld:.0e}"


def quantized_fraction(parameters: dict) -> float:
    targeted = sum(c["targeted"] for c in parameters.values())
    return sum(c["quantized"] for c in parameters.values() if c["targeted"]) / max(1, targeted)


def run_cell(family: str, method: str, src: Path, work: Path, samples: int, seq_len: int) -> dict:
    from llmopt.models import ModelSpec, load_model
    from llmopt.quant.api import QuantizeArgs, quantize

    out = work / f"{family}-{method}"
    t = time.perf_counter()
    args = QuantizeArgs(model=str(src), out=out, method=method, format=FORMAT[method],
                        group_size=None if method in ("int8", "w8a8") else 32, samples=samples, seq_len=seq_len,
                        eval_samples=4, eval_seq_len=seq_len, device="cpu", calib_dtype="model")
    res = quantize(args)
    cell = {"quantize": "ok", "seconds": round(time.perf_counter() - t, 1),
            "kld": res.metrics["quantized"]["kld_mean"], "quantized_fraction": quantized_fraction(res.parameters)}
    loaded = load_model(ModelSpec(str(out), "cpu", "float32"))
    vocab = loaded.config.get_text_config().vocab_size
    windows = torch.randint(4, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    # The runtime picks kernels per batch size (int4/int8 kernels with bf16 activations for decode), so the
    # engine's packed batches and generate's single rows can round differently and flip a near-tie; pinned to the
    # exact fp32 dequantized path both compute the same function and must agree token for token.
    cell["engine_default"] = engine_equal(loaded.model, vocab)
    for m in loaded.model.modules():
        if hasattr(m, "force_kernel"):
            m.force_kernel = "dequant"
    cell["engine"] = engine_equal(loaded.model, vocab)
    cell["hf_load"] = (hf_load(out, loaded.model, windows, cell["kld"]) if FORMAT[method] == "compressed-tensors"
                       else "—")
    shutil.rmtree(out, ignore_errors=True)
    return cell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from llmopt.models.loading import load_tokenizer, resolve_path, ModelSpec

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = load_tokenizer(resolve_path(ModelSpec("builtin:tiny")))  # the offline tokenizer every family shares
    work = Path(tempfile.mkdtemp(prefix="llmopt-coverage-"))
    rows: dict[str, dict] = {}
    try:
        for family in a.families:
            src = work / family
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                float_model = family_model(family, vocab_size=len(tok))
                float_model.save_pretrained(src)
            tok.save_pretrained(src)
            row = {"float": {"engine": engine_equal(float_model, len(tok))}}
            for method in a.methods:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        row[method] = run_cell(family, method, src, work, a.samples, a.seq_len)
                except Exception as e:  # a cell that fails is a finding of the matrix, not the end of the run
                    row[method] = {"quantize": f"✗ {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                    if not isinstance(e, (ValueError, RuntimeError)) and "LlmoptError" not in type(e).__name__:
                        traceback.print_exc()
                print(family, method, json.dumps(row[method]), flush=True)
            rows[family] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, a.methods)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2, default=str))


def _count(cells: list[dict], key: str) -> str:
    """'17/18': requests greedy-equal over the cells that ran the engine ('refused …' counts as 0 of 3)."""
    runs = [c[key] for c in cells if key in c]
    got = sum(int(r.split("/")[0]) for r in runs if "/" in r and not r.startswith("refused"))
    return f"{got}/{len(PROMPTS) * len(runs)}"


def print_table(rows: dict[str, dict], methods: list[str]) -> None:
    """Markdown: KLD vs float per method, the smallest quantized fraction, transformers loads, engine greedy."""
    print("\n| family | " + " | ".join(methods) + " | quantized | transformers loads | engine = generate "
          "(exact / default kernels) | gptq < rtn |")
    print("|---" * (len(methods) + 5) + "|")
    for family, row in rows.items():
        cells = [row.get(m, {}) for m in methods]
        ok = [c for c in cells if c.get("quantize") == "ok"]
        kld = [f"{c['kld']:.1e}" if c.get("quantize") == "ok" else "✗" for c in cells]
        frac = f"{100 * min(c['quantized_fraction'] for c in ok):.0f}%" if ok else "—"
        tried = {m: c["hf_load"] for m, c in zip(methods, cells) if c.get("hf_load", "—") != "—"}
        bad = [m for m, h in tried.items() if not h.startswith("ok")]
        hf = f"{len(tried) - len(bad)}/{len(tried)}" + (f" (not {', '.join(bad)})" if bad else "")
        engine = f"{_count([row['float'], *ok], 'engine')} / {_count(ok, 'engine_default')}"
        g, r = row.get("gptq", {}).get("kld"), row.get("rtn", {}).get("kld")
        better = "—" if g is None or r is None else ("yes" if g < r else f"NO ({g / r:.2f}×)")
        print(f"| {family} | " + " | ".join(kld) + f" | {frac} | {hf} | {engine} | {better} |")


if __name__ == "__main__":
    main()
