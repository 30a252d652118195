"""The one-command CUDA proof: install llmopt offline, run every CUDA path once, print one table, write JSON.

    python bench/gpu_check.py [--wheels bench/wheels] [--work /tmp/llmopt-gpu-check] [--json FILE] [--dry-run]

Steps (each in its own subprocess with its own timeout, so one failure never hides the rest):
  install         missing packages from --wheels (`pip install --no-index --find-links DIR`), then llmopt from
                  this working tree (`pip install --no-deps --no-build-isolation -e .`; PYTHONPATH is set as well)
  pytest_gpu      `python -m pytest -m gpu` (the CUDA tests: runtime kernels, autocast calibration, distill)
  build_model     a random Llama-shaped ~1B model (TinyLlama's shape) in bf16, with the builtin BPE tokenizer
  quantize_*      `llmopt quantize` on cuda, bf16: gptq, awq, w8a8, and gptq with --load stream (one decoder layer
                  at a time onloaded from the CPU shards): wall time, peak GPU memory, KLD vs bf16
  runtime_decode  the quantized checkpoints through llmopt's runtime on cuda: batch-1 and batch-16 decode tok/s
                  vs bf16, and the kernel each Linear uses
  engine          llmopt's engine vs one-at-a-time `generate` vs transformers' continuous batching on cuda,
                  greedy tokens equal (bench/engine_throughput.py's bench_one)
  eval_util       `llmopt eval --perf-only` on cuda: perf.utilization from NVML (GPU util %, memory)
  distill         `llmopt distill` 50 steps on cuda (bf16 autocast), loss falling
  sdpa_backends   which SDPA backend (flash / efficient / cudnn / math) each attention call chose, prefill and
                  decode, in transformers' attention and llmopt's engine

Fill the wheel folder on a machine with network, for the GPU machine's Python (see the README, "On a GPU"):
    pip download --only-binary :all: -d bench/wheels pytest hypothesis nvidia-ml-py
`--dry-run` lists the steps and their commands, checks the wheel folder and which imports resolve, runs nothing.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# import name → pip name; required to run the steps at all, optional ones are reported when absent
REQUIRED = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors", "tokenizers": "tokenizers",
            "accelerate": "accelerate", "typer": "typer", "rich": "rich", "yaml": "pyyaml", "numpy": "numpy",
            "matplotlib": "matplotlib", "pytest": "pytest", "hypothesis": "hypothesis"}
OPTIONAL = {"pynvml": "nvidia-ml-py", "psutil": "psutil", "datasets": "datasets",
            "compressed_tensors": "compressed-tensors", "lm_eval": "lm-eval", "flash_attn": "flash-attn"}
QUANT_METHODS = ("gptq", "awq", "w8a8")
# plumbing checks of the steps on a CPU box: GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 (a 2-layer model); never the proof
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
_SHAPES = {"1b": (2048, 5632, 22, 32, 4), "small": (128, 256, 2, 4, 2)}  # TinyLlama-1.1B's shape; the CPU one
SHAPE = dict(zip(("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"),
                 _SHAPES["small" if os.environ.get("GPU_CHECK_SMALL") else "1b"], strict=True))


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    what: str
    timeout_s: int


STEPS = (
    Step("install", "missing wheels from --wheels (pip --no-index), llmopt from the working tree (--no-deps -e .)", 120),
    Step("pytest_gpu", "python -m pytest -m gpu: every CUDA test (runtime kernels, autocast calibration, distill)", 180),
    Step("build_model", "random Llama-shaped ~1B model (TinyLlama shape), bf16, builtin tokenizer", 90),
    *(Step(f"quantize_{m}", f"llmopt quantize -m {m} on cuda, bf16: time, peak GPU memory, KLD vs bf16", 180)
      for m in QUANT_METHODS),
    Step("quantize_gptq_stream", "llmopt quantize -m gptq --load stream: layers onloaded from CPU one at a time", 180),
    Step("runtime_decode", "quantized checkpoints through llmopt's runtime: batch-1/16 decode tok/s vs bf16", 120),
    Step("engine", "llmopt engine vs generate vs transformers continuous batching, cuda fp32: greedy tokens equal",
         150),
    Step("flex_decode", "engine decode through FlexAttention's block mask vs the gathered masked SDPA, cuda bf16: "
         "tokens, tok/s, the path auto took", 150),
    Step("eval_util", "llmopt eval --perf-only on cuda: perf.utilization (NVML GPU util %, memory used)", 120),
    Step("distill", "llmopt distill 50 steps on cuda (bf16 autocast): loss falling", 150),
    Step("sdpa_backends", "SDPA backend each attention call chose (flash/efficient/cudnn/math), prefill + decode", 90),
)


# ---- the parent: install, run each step in a subprocess, print the table ------------------------------------------

def resolves(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def wheel_for(pip_name: str, wheels: Path) -> Path | None:
    stem = pip_name.lower().replace("-", "_")
    return next((w for w in sorted(wheels.glob("*.whl")) if w.name.lower().split("-")[0] == stem), None)


def imports_report(wheels: Path) -> dict[str, dict]:
    """Every required and optional import: resolves here, or a wheel for it is in the folder."""
    out = {}
    for group, mods in (("required", REQUIRED), ("optional", OPTIONAL)):
        for mod, pip_name in mods.items():
            w = wheel_for(pip_name, wheels) if wheels.is_dir() else None
            out[mod] = {"group": group, "pip": pip_name, "resolves": resolves(mod), "wheel": w.name if w else None}
    out["llmopt"] = {"group": "required", "pip": "(working tree)", "resolves": resolves("llmopt") or
                     (ROOT / "llmopt" / "__init__.py").exists(), "wheel": None}
    return out


def install(wheels: Path) -> dict:
    """pip install, offline: every absent package that has a wheel in the folder, then llmopt without its deps."""
    imports = imports_report(wheels)
    todo = [i["pip"] for m, i in imports.items() if not i["resolves"] and i["wheel"]]
    missing = [i["pip"] for i in imports.values() if i["group"] == "required" and not i["resolves"] and not i["wheel"]]
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels)]
    logs = []
    if todo:
        r = subprocess.run([*pip, *todo], check=False, capture_output=True, text=True)
        logs.append(r.stdout[-2000:] + r.stderr[-2000:])
        if r.returncode:
            return {"ok": False, "summary": f"pip install {' '.join(todo)} failed", "log": logs}
    r = subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=False, capture_output=True, text=True)
    editable = r.returncode == 0
    logs.append(r.stdout[-2000:] + r.stderr[-2000:])
    summary = (f"installed {', '.join(todo) or 'nothing'} from wheels; llmopt "
               f"{'installed -e' if editable else 'on PYTHONPATH (pip -e failed)'}")
    if missing:
        summary += f"; missing, no wheel: {', '.join(missing)}"
    return {"ok": not missing, "summary": summary, "installed": todo, "editable": editable, "log": logs}


def step_command(step: Step, a: argparse.Namespace) -> list[str]:
    if step.name == "pytest_gpu":
        return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
    return [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--work", str(a.work)]


def run_step(step: Step, a: argparse.Namespace, env: dict, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    if step.name == "install":
        r = install(a.wheels)
    else:
        out = a.work / f"{step.name}.json"
        out.unlink(missing_ok=True)
        try:
            p = subprocess.run(step_command(step, a), cwd=ROOT, env=env, check=False, capture_output=True, text=True,
                               timeout=timeout_s)
            tail = (p.stdout + p.stderr)[-3000:]
            if step.name == "pytest_gpu":
                last = [ln for ln in p.stdout.splitlines() if ln.strip()][-1:] or ["no output"]
                r = {"ok": p.returncode == 0, "summary": last[0].strip("= "), "log": tail}
            elif out.exists():
                r = json.loads(out.read_text()) | {"log": tail}
            else:
                r = {"ok": False, "summary": f"exit {p.returncode}: {tail.strip().splitlines()[-1:]}", "log": tail}
        except subprocess.TimeoutExpired:
            r = {"ok": False, "summary": f"timed out after {timeout_s:.0f} s"}
    return {"step": step.name, "seconds": round(time.perf_counter() - t0, 1)} | r


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="llmopt gpu_check")
    for col in ("step", "ok", "s", "result"):
        t.add_column(col, justify="right" if col == "s" else "left", overflow="fold")
    for r in rows:
        t.add_row(r["step"], "yes" if r["ok"] else "NO", f"{r['seconds']:.0f}",
                  r["summary"])
    Console(width=160).print(t)


def dry_run(a: argparse.Namespace) -> int:
    print(f"gpu_check --dry-run: nothing runs. Working tree {ROOT}, work dir {a.work}\n")
    print("steps:")
    for s in STEPS:
        cmd = "(in-process pip calls)" if s.name == "install" else " ".join(step_command(s, a))
        print(f"  {s.name:<22} {s.what}\n  {'':<22} $ {cmd}  [timeout {s.timeout_s} s]")
    n = len(list(a.wheels.glob("*.whl"))) if a.wheels.is_dir() else 0
    print(f"  (each step's timeout is capped by what is left of --budget-s {a.budget_s:.0f} s)")
    print(f"\nwheel folder {a.wheels}: " + (f"exists, {n} wheel(s)" if a.wheels.is_dir() else
                                           "ABSENT (fill it with pip download, see the README's 'On a GPU')"))
    imports = imports_report(a.wheels)
    print("imports:")
    for mod, i in imports.items():
        state = "resolves" if i["resolves"] else (f"absent, wheel {i['wheel']}" if i["wheel"] else "absent")
        print(f"  {mod:<20} {i['group']:<9} {state}")
    blocked = [m for m, i in imports.items() if i["group"] == "required" and not i["resolves"] and not i["wheel"]]
    import torch

    print(f"\ntorch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if blocked:
        print(f"required and neither installed nor in the wheel folder: {', '.join(blocked)}")
    return 1 if blocked else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheels", type=Path, default=ROOT / "bench" / "wheels")
    p.add_argument("--work", type=Path, default=Path("/tmp/llmopt-gpu-check"))
    p.add_argument("--json", type=Path, default=None, help="default: WORK/gpu_check.json")
    p.add_argument("--budget-s", type=float, default=540, help="whole-check wall-clock budget (steps past it skip)")
    p.add_argument("--only", nargs="*", default=None, help="run only these steps (install always runs)")
    p.add_argument("--no-install", action="store_true", help="skip the install step (the environment is ready)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    a = p.parse_args()
    if a.step:
        return run_child(a.step, a.work)
    if a.dry_run:
        return dry_run(a)
    a.work.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    path = a.json or a.work / "gpu_check.json"
    t0 = time.perf_counter()
    for s in STEPS:
        if (a.only and s.name != "install" and s.name not in a.only) or (s.name == "install" and a.no_install):
            continue
        left = a.budget_s - (time.perf_counter() - t0)  # each step gets its timeout, capped by what is left
        if left < 20:
            rows.append({"step": s.name, "seconds": 0.0, "ok": False, "summary": "skipped: --budget-s spent"})
            continue
        rows.append(run_step(s, a, env, min(s.timeout_s, left)))
        print(f"[{time.perf_counter() - t0:6.0f} s] {s.name}: {'ok' if rows[-1]['ok'] else 'FAILED'} — "
              f"{rows[-1]['summary']}", flush=True)
        # after every step, so a check killed from outside still leaves what it measured
        path.write_text(json.dumps({"total_s": round(time.perf_counter() - t0, 1), "steps": rows}, indent=2,
                                   default=str) + "\n")
    print_table(rows)
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in rows) else 1


# ---- the steps, each run in a child process: python bench/gpu_check.py --step NAME --work DIR --------------------

def _cli(*args: str) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "llmopt", *args], check=False, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr[-3000:], time.perf_counter() - t0


def _json_of(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"): stdout.rindex("}") + 1])


def _find(d, key: str):
    """The first non-null `key` anywhere in a nested report (the layouts of the CLIs' JSON differ)."""
    if isinstance(d, dict):
        if d.get(key) is not None:
            return d[key]
        d = list(d.values())
    if isinstance(d, list):
        for v in d:
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _gib(n) -> str:
    return "—" if n is None else f"{n / 2 ** 30:.2f} GiB"


def step_build_model(work: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmopt.calibration import corpus
    from llmopt.models.builtin import train_tokenizer

    tok = train_tokenizer(corpus.split_texts("train"), 32000)
    cfg = LlamaConfig(**SHAPE, vocab_size=len(tok), max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "llama1b", safe_serialization=True)
    tok.save_pretrained(work / "llama1b")
    return {"ok": True, "summary": f"{params / 1e6:,.0f}M params, vocab {len(tok)}, bf16", "params": params}


def step_quantize(work: Path, method: str, stream: bool) -> dict:
    out = work / f"q-{method}{'-stream' if stream else ''}"
    rc, text, wall = _cli("quantize", str(work / "llama1b"), "-o", str(out), "-m", method, "--device", DEVICE,
                          "--dtype", "bfloat16", "--samples", "64", "--seq-len", "256", "--eval-samples", "16",
                          "--overwrite", "--json", *(["--load", "stream"] if stream else []))
    if rc:
        return {"ok": False, "summary": f"exit {rc}: {text.strip().splitlines()[-1:]}"}
    d = _json_of(text)
    kld, peak = _find((d.get("metrics") or {}).get("quantized"), "kld_mean"), _find(d, "peak_gpu_bytes")
    return {"ok": kld is not None, "summary": f"{wall:.0f} s wall, peak GPU {_gib(peak)}, KLD vs bf16 "
            f"{'—' if kld is None else f'{kld:.3g}'}", "wall_s": wall, "peak_gpu_bytes": peak, "kld_mean": kld,
            "timings": d.get("timings")}


def _decode_tok_s(model, batch: int, prompt: int = 128, steps: int = 32) -> float:
    import torch
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=DEVICE)
    sync = torch.cuda.synchronize if DEVICE.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(2):  # warm-up round, then the timed round
            cache = DynamicCache()
            tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            times = []
            for _ in range(steps):
                sync()
                t0 = time.perf_counter()
                tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                sync()
                times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def _launches_per_step(model) -> int | None:
    """GPU kernels (and copies) one batch-1 decode step launches, read with torch.profiler: on a GPU a 1B
    model's decode step is launch-bound, so this count, not the bytes, tells two checkpoints' speeds apart."""
    if not DEVICE.startswith("cuda"):
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, 16), device=DEVICE)
    with torch.inference_mode():
        cache = DynamicCache()
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(tok, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def step_runtime_decode(work: Path) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from runtime_speed import kernel_summary

    from llmopt.models import ModelSpec, load_model

    rows, parts = {}, []
    for name in ("llama1b", *(f"q-{m}" for m in QUANT_METHODS)):  # llama1b: the bf16 model itself
        if not (work / name).exists():
            continue
        loaded = load_model(ModelSpec(str(work / name), DEVICE, "bfloat16", False))
        rows[name] = {f"b{b}_tok_s": _decode_tok_s(loaded.model, b) for b in (1, 16)}
        rows[name]["launches_per_step"] = _launches_per_step(loaded.model)
        if name != "llama1b":
            rows[name]["kernels"] = kernel_summary(loaded.model)
        del loaded
        if DEVICE.startswith("cuda"):
            torch.cuda.empty_cache()
    base = rows.get("llama1b")
    for name, r in rows.items():
        ratio = "" if base is None or name == "llama1b" else \
            f" ({r['b1_tok_s'] / base['b1_tok_s']:.2f}×/{r['b16_tok_s'] / base['b16_tok_s']:.2f}× bf16)"
        launches = "" if r["launches_per_step"] is None else f", {r['launches_per_step']} GPU launches/step"
        parts.append(f"{'bf16' if name == 'llama1b' else name.removeprefix('q-')} b1 {r['b1_tok_s']:.0f} "
                     f"b16 {r['b16_tok_s']:.0f} tok/s{ratio}{launches}")
    return {"ok": base is not None and len(rows) > 1, "summary": "; ".join(parts) or "no checkpoints", "rows": rows}


def step_engine(work: Path) -> dict:
    import contextlib
    import io

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from engine_throughput import bench_one

    from llmopt.calibration.data import DataSpec, load_texts, token_stream
    from llmopt.evaluate.workload import WorkloadSpec, make_workload
    from llmopt.models import ModelSpec, load_model

    # fp32 (TF32 off): bf16 rounding differs between batched and one-at-a-time GEMMs and flips near-tied argmaxes
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    loaded = load_model(ModelSpec(str(work / "llama1b"), DEVICE, "float32", False))
    requests = make_workload(token_stream(load_texts(DataSpec(), "test"), loaded.tokenizer),
                             WorkloadSpec(16, (32, 128), (32, 64), seed=0))
    args = argparse.Namespace(block_size=16, max_prefill_tokens=1024, repeats=1, hf_cb=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        same = bench_one(f"llama1b {DEVICE} fp32", loaded.model, requests, args)
    lines = [" ".join(ln.split()) for ln in buf.getvalue().splitlines() if ln.strip()]
    return {"ok": same, "summary": " | ".join(lines), "greedy_equal": same}


def step_flex_decode(work: Path) -> dict:
    """auto (FlexAttention where its probe passes) against the gathered path, 16 requests at 512–1,024 tokens of
    context, bf16, greedy; interleaved, the faster of 2 runs each."""
    from llmopt.calibration.data import DataSpec, load_texts, token_stream
    from llmopt.engine import EngineConfig
    from llmopt.evaluate.perf import Sampling, run_llmopt
    from llmopt.evaluate.workload import WorkloadSpec, make_workload
    from llmopt.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(work / "llama1b"), DEVICE, "bfloat16", False))
    requests = make_workload(token_stream(load_texts(DataSpec(), "test"), loaded.tokenizer),
                             WorkloadSpec(16, (512, 960), (32, 64), seed=0))
    runs: dict[str, list] = {"auto": [], "gathered": []}
    for _ in range(3):  # the first round warms up (and compiles the flex kernel)
        for path, done in runs.items():
            done.append(run_llmopt(loaded.model, requests, EngineConfig(2 ** 31, decode_attention=path), Sampling()))
    best = {p: max(r[1:], key=lambda o: o.metrics.output_tokens_per_s) for p, r in runs.items()}
    att = best["auto"].attention
    same = sum(a == b for a, b in zip(best["auto"].outputs, best["gathered"].outputs))
    tps = {p: o.metrics.output_tokens_per_s for p, o in best.items()}
    why = att.note or ("probe passed" if att.decode_path == "flex" else "the CPU rule, no probe")
    summary = (f"auto took decode path {att.decode_path} ({why}): {tps['auto']:.0f} tok/s vs "
               f"gathered {tps['gathered']:.0f} ({tps['auto'] / tps['gathered']:.2f}×); greedy tokens equal "
               f"{same}/{len(requests)} (bf16: batched rounding may flip near-ties)")
    return {"ok": att.decode_path == "flex", "summary": summary, "attention": att.to_dict(), "tok_s": tps,
            "greedy_equal": same}


def step_eval_util(work: Path) -> dict:
    out = work / "eval.json"
    rc, text, _ = _cli("eval", str(work / "llama1b"), "--perf-only", "--device", DEVICE, "--num-requests", "16",
                       "--prompt-len", "32:128", "--output-len", "32:64", "--repeats", "2", "--json", str(out))
    if rc:
        return {"ok": False, "summary": f"exit {rc}: {text.strip().splitlines()[-1:]}"}
    perf = json.loads(out.read_text())["results"][0]["perf"]
    u = perf.get("utilization") or {}
    gpu, mem = u.get("gpu_util_percent"), u.get("gpu_mem_used_bytes")
    cpu = u.get("cpu_percent") or {}
    summary = (f"{perf['output_tokens_per_s']:.0f} tok/s; {u.get('samples')} samples: CPU mean "
               f"{cpu.get('mean', float('nan')):.0f} % of a core; GPU util mean/p50/p95 "
               + ("/".join(f"{gpu[k]:.0f}" for k in ("mean", "p50", "p95")) + " %" if gpu else
                  f"not sampled ({u.get('gpu_error')})")
               + (f", memory used p95 {_gib(mem['p95'])}" if mem else ""))
    return {"ok": bool(gpu), "summary": summary, "utilization": u}


def step_distill(work: Path) -> dict:
    out = work / "distill"
    rc, text, wall = _cli("distill", "--teacher", str(work / "llama1b"), "--student-layers",
                          str(min(4, SHAPE["num_hidden_layers"] // 2)), "--steps", "50",
                          "--batch-size", "8", "--seq-len", "128", "--device", DEVICE, "--eval-samples", "8",
                          "-o", str(out), "--overwrite", "--json")
    if rc:
        return {"ok": False, "summary": f"exit {rc}: {text.strip().splitlines()[-1:]}"}
    with open(out / "loss_curve.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    return {"ok": last < first, "summary": f"{len(losses)} steps in {wall:.0f} s, loss {first:.3f} → {last:.3f} "
            f"(first/last 5 steps)", "loss_first5": first, "loss_last5": last}


def step_sdpa_backends(work: Path) -> dict:
    """Wrap F.scaled_dot_product_attention; for each call ask torch which fused kernel its inputs select
    (torch._fused_sdp_choice: the dispatcher's own choice), falling back to trying each backend alone."""
    from collections import Counter

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmopt.engine import EngineConfig
    from llmopt.evaluate.perf import Sampling, run_llmopt
    from llmopt.evaluate.workload import Request
    from llmopt.models import ModelSpec, load_model

    orig = F.scaled_dot_product_attention
    seen: Counter = Counter()
    source = ["generate"]

    def choice(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw) -> str:
        try:
            return SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, **kw)).name
        except (AttributeError, RuntimeError, TypeError, ValueError):
            for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                try:
                    with sdpa_kernel(b):
                        orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
                    return b.name
                except RuntimeError:
                    continue
            return "MATH"

    def wrapped(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        phase = "prefill" if q.shape[-2] > 1 else "decode"
        mask = "mask" if attn_mask is not None else ("is_causal" if is_causal else "no mask")
        seen[(source[0], phase, mask, choice(q, k, v, attn_mask, dropout_p, is_causal, **kw))] += 1
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    loaded = load_model(ModelSpec(str(work / "llama1b"), DEVICE, "bfloat16", False))
    model = loaded.model
    F.scaled_dot_product_attention = wrapped
    try:
        with torch.inference_mode():
            ids = torch.randint(0, model.config.vocab_size, (1, 64), device=DEVICE)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                           pad_token_id=model.config.pad_token_id)
        source[0] = "llmopt engine"
        reqs = [Request(list(range(5, 5 + n)), 4, 0.0) for n in (40, 72)]
        run_llmopt(model, reqs, EngineConfig(kv_budget=2 ** 30, block_size=16, max_prefill_tokens=1024,
                                              max_blocks=64), Sampling())
    finally:
        F.scaled_dot_product_attention = orig
    calls = [{"source": s, "phase": p, "mask": m, "backend": b, "calls": n} for (s, p, m, b), n in sorted(seen.items())]
    summary = "; ".join(f"{c['source']} {c['phase']} ({c['mask']}): {c['backend'].lower()} ×{c['calls']}"
                        for c in calls)
    return {"ok": bool(calls), "summary": summary or "no SDPA calls seen", "calls": calls}


def run_child(name: str, work: Path) -> int:
    steps = {"build_model": step_build_model, "runtime_decode": step_runtime_decode, "engine": step_engine, "flex_decode": step_flex_decode,
             "eval_util": step_eval_util, "distill": step_distill, "sdpa_backends": step_sdpa_backends}
    steps |= {f"quantize_{m}": (lambda w, m=m: step_quantize(w, m, False)) for m in QUANT_METHODS}
    steps["quantize_gptq_stream"] = lambda w: step_quantize(w, "gptq", True)
    try:
        result = steps[name](work)
    except Exception as e:  # noqa: BLE001 - a step's failure is its row in the table, not the end of the check
        result = {"ok": False, "summary": f"{type(e).__name__}: {e}"}
    (work / f"{name}.json").write_text(json.dumps(result, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
