"""llmopt GPTQ vs llm-compressor's GPTQModifier: whole-process wall time and KLD, side by side in one run.

Both quantize W4A16 group 128 symmetric with static activation ordering (llm-compressor's W4A16 default;
llmopt: --act-order --static-groups), damp 0.01, block 128, on the SAME calibration token windows (made
here with llmopt's calibration loader, handed to llm-compressor as a tokenized dataset; the sha256 of the
windows llmopt used is checked against them). llmopt's AWQ time is reported on the same samples.

Models: a random Llama of ≥100M parameters (timing; its KLD means little) and a trained model
(default builtin:tiny) for the KLD comparison. KLD/top-1 are measured here on the builtin test split,
every checkpoint (llm-compressor's too) through llmopt's runtime pinned to fp32 dequantized weights.

llm-compressor pins transformers <=5.17, so it lives in its own venv (created on first use):
    python -m venv /work/venvs/llmcompressor
    /work/venvs/llmcompressor/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

Both tools are bound by fp32 GEMMs. Per layer llm-compressor runs a float forward that gathers the
Hessians (one per Linear), then a quantized forward that feeds the next layer; llmopt runs the layer once,
sublayer by sublayer (true-sequential), one Hessian per shared input, built from its upper block rows.
llmopt's default --calib-dtype auto runs the forwards of an fp32 model under bf16 autocast where bf16 is fast
(Hessians and solves stay fp32); `llmopt gptq fp32-calib` is the same run with --calib-dtype model (all
fp32, like llm-compressor here). See the README for the measured figures.

Usage: python bench/quant_speed.py [--samples 64] [--seq-len 256] [--repeats 1] [--skip-llmc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

LLMC_VENV = Path(os.environ.get("LLMC_VENV", "/work/venvs/llmcompressor"))
LLMC_PACKAGES = ["torch==2.13.0", "llmcompressor==0.14.0.1"]

LLMC_SCRIPT = r"""
import sys, time, torch
t0 = time.perf_counter()
from safetensors.torch import load_file
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
path, ids_path, out = sys.argv[1:4]
ids = load_file(ids_path)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(path)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01, block_size=128)
t1 = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False)
t2 = time.perf_counter()
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
print(f"LLMC_TIMES oneshot={t2 - t1:.3f} threads={torch.get_num_threads()}", flush=True)
"""


def ensure_llmc_venv() -> tuple[Path | None, str]:
    """The llm-compressor venv's python, creating it if needed; (None, why) when that fails."""
    py = LLMC_VENV / "bin" / "python"
    if py.exists():
        return py, "existing venv"
    t = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True, capture_output=True, text=True)
        subprocess.run([str(py), "-m", "pip", "install", *LLMC_PACKAGES], check=True, capture_output=True, text=True,
                       timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        tail = (getattr(e, "stderr", "") or "").strip().splitlines()[-3:]
        return None, f"installing {' '.join(LLMC_PACKAGES)} failed: {type(e).__name__}: {' | '.join(tail)}"
    return py, f"venv created in {time.perf_counter() - t:.0f} s"


def build_random_llama(out: Path, tokenizer_dir: Path) -> Path:
    """A random Llama with ~125M parameters (hidden 768, 12 layers, GQA 12/4, MLP 2048, vocab 32000)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    tmp.rename(out)
    return out


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall, r.stdout + r.stderr


@torch.inference_mode()
def quality(path_float: Path, loaders: dict[str, callable], windows: torch.Tensor) -> dict[str, dict]:
    from transformers import AutoModelForCausalLM

    from llmopt.evaluate.quality import measure_quality

    base = AutoModelForCausalLM.from_pretrained(path_float, dtype=torch.float32).eval()
    out = {}
    for name, load in loaders.items():
        q = measure_quality(load(), windows, base)
        out[name] = q.to_dict()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="whole-process runs per tool (median reported)")
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--trained", default="builtin:tiny", help="trained model for the KLD comparison")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmopt-bench"))
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--only", choices=["trained", "random"], default=None)
    args = ap.parse_args()

    from safetensors.torch import save_file

    from llmopt.calibration import DataSpec, load_token_batch
    from llmopt.models import ModelSpec, load_model, resolve_path

    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    trained = resolve_path(ModelSpec(args.trained))
    models = {"trained": trained, "random": build_random_llama(args.work / "llama-125m-random", trained)}
    if args.only:
        models = {args.only: models[args.only]}
    llmc_py, llmc_note = (None, "skipped (--skip-llmc)") if args.skip_llmc else ensure_llmc_venv()
    print(f"llm-compressor: {llmc_note}; torch threads here: {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus: {os.cpu_count()}")

    rows = []
    for kind, path in models.items():
        loaded = load_model(ModelSpec(str(path), "cpu", "float32"))
        params = sum(p.numel() for p in loaded.model.parameters())
        tok = loaded.tokenizer
        del loaded
        calib = load_token_batch(DataSpec("builtin"), tok, args.samples, args.seq_len, 0, "calib")
        ids_file = args.work / f"{kind}-calib.safetensors"
        save_file({"input_ids": calib.input_ids.contiguous()}, str(ids_file))
        common = [str(path), "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--no-evaluate",
                  "--device", "cpu", "--overwrite", "--json"]
        runs: dict[str, list[float]] = {"llmopt gptq": [], "llmopt gptq fp32-calib": [], "llmopt awq": [],
                                        "llm-compressor gptq": []}
        outs = {k: args.work / f"{kind}-{k.replace(' ', '-')}" for k in runs}
        for _ in range(args.repeats):
            wall, text = timed([sys.executable, "-m", "llmopt", "quantize", *common, "--method", "gptq",
                                "--act-order", "--static-groups", "--group-size", "128",
                                "--out", str(outs["llmopt gptq"])], env)
            meta = json.loads((outs["llmopt gptq"] / "llmopt.json").read_text())
            assert meta["calibration"]["sha256"] == calib.sha256, "llmopt used other calibration windows"
            runs["llmopt gptq"].append(wall)
            wall, _ = timed([sys.executable, "-m", "llmopt", "quantize", *common, "--method", "gptq",
                             "--act-order", "--static-groups", "--group-size", "128", "--calib-dtype", "model",
                             "--out", str(outs["llmopt gptq fp32-calib"])], env)
            runs["llmopt gptq fp32-calib"].append(wall)
            wall, _ = timed([sys.executable, "-m", "llmopt", "quantize", *common, "--method", "awq",
                             "--group-size", "128", "--out", str(outs["llmopt awq"])], env)
            runs["llmopt awq"].append(wall)
            if llmc_py is not None:
                shutil.rmtree(outs["llm-compressor gptq"], ignore_errors=True)
                wall, text = timed([str(llmc_py), "-c", LLMC_SCRIPT, str(path), str(ids_file),
                                    str(outs["llm-compressor gptq"])], env)
                runs["llm-compressor gptq"].append(wall)
                print(f"[{kind}] llm-compressor: {next(ln for ln in text.splitlines() if 'LLMC_TIMES' in ln)}")
        eval_ids = load_token_batch(DataSpec("builtin"), tok, args.eval_samples, args.seq_len, 0, "test").input_ids
        # every checkpoint through the same loader and the same math: llmopt's runtime pinned to its fp32
        # dequantize-then-matmul kernel, so the KLDs compare the algorithms, not kernels (transformers 5.24 with
        # compressed-tensors 0.20 cannot load asymmetric pack-quantized checkpoints, llm-compressor's included)
        os.environ["LLMOPT_KERNEL"] = "dequant"
        loaders = {k: (lambda k=k: load_model(ModelSpec(str(outs[k]), "cpu", "float32")).model)
                   for k, walls in runs.items() if walls}
        q = quality(path, loaders, eval_ids)
        for name, walls in runs.items():
            if walls:
                print(f"[{kind}] {name}: whole-process wall s per run: {', '.join(f'{w:.1f}' for w in walls)}")
                rows.append((kind, params, name, statistics.median(walls), q[name]))

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"GPTQ W4A16 g128 (static act-order), {args.samples}×{args.seq_len} calibration tokens, "
                    f"whole-process wall time, median of {args.repeats}")
    for c in ("model", "params", "tool", "wall s", "vs llm-compressor", "mean KLD", "KLD vs llm-compressor", "top-1"):
        t.add_column(c, justify="left" if c in ("model", "tool") else "right")
    by = {(k, n): (w, qq) for k, _, n, w, qq in rows}
    for kind, params, name, wall, qq in rows:
        ref = by.get((kind, "llm-compressor gptq"))
        t.add_row(kind, f"{params / 1e6:.0f}M", name, f"{wall:.1f}", f"{wall / ref[0]:.2f}×" if ref else "—",
                  f"{qq['kld_mean']:.3e}", f"{qq['kld_mean'] / ref[1]['kld_mean']:.2f}×" if ref else "—",
                  f"{qq['top1_agreement']:.3f}")
    Console().print(t)
    (args.work / "results.json").write_text(json.dumps(
        [dict(model=k, params=p, tool=n, wall_s=w, quality=qq) for k, p, n, w, qq in rows], indent=2))


if __name__ == "__main__":
    main()
