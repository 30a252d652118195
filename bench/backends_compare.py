"""llmopt's GPTQ/AWQ next to GPTQModel, llm-compressor, AutoGPTQ and AutoAWQ on one model, in one run.

For every (backend, method) usable here (see `llmopt backends doctor`):
  1. `llmopt quantize MODEL --backend B --method M` as a whole process, same calibration windows for all;
  2. one `llmopt eval` over the float model and every checkpoint (perplexity, KLD vs float, top-1, engine
     throughput through llmopt's runtime), its table printed as it is;
  3. batch-1 greedy decode tokens/s through each library's own loader and kernels (its worker, in its own
     Python) and through llmopt's runtime, on the same prompt, same thread count, warm-up first, medians.
Prints one combined table and writes it as JSON.

    python bench/backends_compare.py --model builtin:tiny --out-dir /tmp/backends-bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RUNS = [("llmopt", "gptq"), ("llmopt", "awq"), ("gptqmodel", "gptq"), ("gptqmodel", "awq"),
        ("llmcompressor", "gptq"), ("llmcompressor", "awq"), ("auto-gptq", "gptq"), ("autoawq", "awq")]
FORMAT = {"gptq": "gptq", "awq": "awq"}  # llmopt's own runs write the formats the libraries write


def _cli(args: list[str], log: Path) -> tuple[int, float]:
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "llmopt.cli.main", *args], stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "COLUMNS": "200"}).returncode
    return rc, time.perf_counter() - t


def quantize_all(a, out_dir: Path) -> list[dict]:
    from llmopt.backends import get_spec
    from llmopt.backends.base import find_interpreter
    from llmopt.errors import LlmoptError

    rows = []
    for backend, method in RUNS:
        if a.backends and backend not in a.backends:
            continue
        name = f"{backend}-{method}"
        row = {"name": name, "backend": backend, "method": method, "path": str(out_dir / name)}
        if backend != "llmopt":
            try:
                find_interpreter(get_spec(backend))
            except LlmoptError as e:
                rows.append({**row, "skipped": str(e)})
                print(f"skip {name}: {e}", flush=True)
                continue
        args = ["quantize", a.model, "--method", method, "--group-size", str(a.group_size), "--samples",
                str(a.samples), "--seq-len", str(a.seq_len), "--no-evaluate", "--device", "cpu", "--out",
                row["path"], "--overwrite", "--json"]
        if backend == "llmopt":
            args += ["--format", FORMAT[method]]
        else:
            args += ["--backend", backend]
        print(f"quantize {name} …", flush=True)
        rc, wall = _cli(args, out_dir / f"{name}.quantize.log")
        if rc != 0:
            rows.append({**row, "skipped": f"quantize failed (exit {rc}), see {out_dir / (name + '.quantize.log')}"})
            print(f"  failed: {rows[-1]['skipped']}", flush=True)
            continue
        meta = json.loads((Path(row["path"]) / "llmopt.json").read_text())
        rows.append({**row, "quantize_s": meta["timings"]["quantize"], "process_s": wall,
                     "library": meta.get("library", "llmopt"), "patches": meta.get("patches", []),
                     "size_bytes": sum(p.stat().st_size for p in Path(row["path"]).glob("*.safetensors"))})
        print(f"  {rows[-1]['quantize_s']:.1f} s in the quantizer, {wall:.1f} s whole process", flush=True)
    return rows


def eval_all(a, rows: list[dict], float_path: Path, out_dir: Path) -> dict:
    models = [str(float_path)] + [r["path"] for r in rows if "skipped" not in r]
    args = ["eval", *models, "--baseline", str(float_path), "--num-requests", str(a.num_requests), "--prompt-len",
            a.prompt_len, "--output-len", a.output_len, "--repeats", "1", "--threads", str(a.threads),
            "--quality-tokens", str(a.quality_tokens), "--json", str(out_dir / "eval.json"), "--device", "cpu"]
    print("llmopt eval over all checkpoints …", flush=True)
    rc, _ = _cli(args, out_dir / "eval.log")
    print((out_dir / "eval.log").read_text()[-12000:])
    if rc != 0:
        raise SystemExit(f"llmopt eval failed (exit {rc}): see {out_dir / 'eval.log'}")
    return {r["model"]: r for r in json.loads((out_dir / "eval.json").read_text())["results"]}


def decode_speeds(a, rows: list[dict], float_path: Path) -> dict:
    """tokens/s through llmopt's runtime (in this process) and through each library (its worker)."""
    from llmopt.backends import get_spec
    from llmopt.backends.base import find_interpreter, run_worker
    from llmopt.backends.worker import time_decode
    from llmopt.calibration import DataSpec, load_token_batch
    from llmopt.errors import LlmoptError
    from llmopt.models import ModelSpec, load_model
    from llmopt.models.loading import load_tokenizer

    torch.set_num_threads(a.threads)
    prompt = load_token_batch(DataSpec("builtin"), load_tokenizer(float_path), 1, a.decode_prompt, 1,
                              "test").input_ids[0].tolist()
    speeds = {}
    for path in [str(float_path)] + [r["path"] for r in rows if "skipped" not in r]:
        model = load_model(ModelSpec(path, "cpu", "float32")).model
        speeds[path] = {"llmopt": time_decode(model, prompt, a.decode_tokens, a.repeats, "cpu")}
        del model
    # library kernels: the library that wrote the checkpoint, or GPTQModel for llmopt's GPTQ/AWQ files
    for r in rows:
        if "skipped" in r:
            continue
        loader = {"llmopt": "gptqmodel", "llmcompressor": "llmcompressor"}.get(r["backend"], r["backend"])
        try:
            spec = get_spec(loader)
            res = run_worker(spec, find_interpreter(spec), {
                "kind": "decode", "checkpoint": r["path"], "prompt": prompt, "new_tokens": a.decode_tokens,
                "repeats": a.repeats, "device": "cpu", "threads": a.threads,
                "scratch": tempfile.mkdtemp(prefix="llmopt-decode-")}).result
            speeds[r["path"]]["library"] = {**res, "loader": loader}
        except LlmoptError as e:
            speeds[r["path"]]["library"] = {"error": str(e), "loader": loader}
        print(f"decode {r['name']}: {speeds[r['path']]}", flush=True)
    return speeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/llmopt-backends-bench"))
    p.add_argument("--backends", nargs="*", default=None, help="subset of backends (default: all usable)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--prompt-len", default="32:128")
    p.add_argument("--output-len", default="32:64")
    p.add_argument("--quality-tokens", type=int, default=16384)
    p.add_argument("--decode-prompt", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render", type=Path, default=None, help="only print the table of an earlier run's JSON")
    a = p.parse_args()
    if a.render is not None:
        render(json.loads(a.render.read_text()))
        return

    from llmopt.models import ModelSpec, resolve_path

    a.out_dir.mkdir(parents=True, exist_ok=True)
    float_path = resolve_path(ModelSpec(a.model))
    rows = quantize_all(a, a.out_dir)
    evals = eval_all(a, rows, float_path, a.out_dir)
    speeds = decode_speeds(a, rows, float_path)

    out_rows = []
    for r in rows:
        if "skipped" in r:
            out_rows.append(r)
            continue
        e = evals.get(r["path"], {})
        out_rows.append({**r, "quality": e.get("quality") or {}, "perf": e.get("perf") or {}, "decode": speeds[r["path"]]})
    fe = evals.get(str(float_path), {})
    report = {"model": a.model, "float": {"quality": fe.get("quality"), "perf": fe.get("perf"),
                                         "decode": speeds[str(float_path)]},
              "rows": out_rows, "args": {k: str(v) for k, v in vars(a).items()}, "torch": torch.__version__}
    (a.out_dir / "backends_compare.json").write_text(json.dumps(report, indent=2, default=str))
    render(report)
    print(f"wrote {a.out_dir / 'backends_compare.json'}")


def render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    args = report["args"]
    fl = report["float"]
    float_tps = fl["decode"]["llmopt"]["decode_tokens_per_s"]

    def tps(d: dict | None) -> str:
        if not d or "decode_tokens_per_s" not in d:
            return "n/a" if d and "error" in d else "—"
        return f"{d['decode_tokens_per_s']:.0f} ({d['decode_tokens_per_s'] / float_tps:.2f}×)"

    t = Table(title=f"{report['model']}: W4 g{args['group_size']}, {args['samples']}×{args['seq_len']} calibration "
                    f"tokens, {args['threads']} thread(s), torch {report['torch']}; decode = batch-1 greedy "
                    f"{args['decode_tokens']} tokens, median of {args['repeats']}, × = vs float",
              title_justify="left")
    for col in ("checkpoint", "library", "ppl", "KLD vs float", "top-1", "quantize s", "process s",
                "decode tok/s, library kernels", "decode tok/s, llmopt runtime", "eval engine tok/s", "patched"):
        t.add_column(col)
    q, perf = fl.get("quality") or {}, fl.get("perf") or {}
    t.add_row("float", "—", f"{q.get('perplexity', float('nan')):.3f}", "0", "1", "—", "—", "—",
              tps(fl["decode"]["llmopt"]), f"{perf.get('output_tokens_per_s') or 0:.1f}", "")
    notes = []
    for r in report["rows"]:
        if "skipped" in r:
            t.add_row(r["name"], "—", "—", "—", "—", "—", "—", "—", "—", "—", "skipped")
            notes.append(f"{r['name']} skipped: {r['skipped']}")
            continue
        q, perf, lib = r["quality"], r["perf"], r["decode"].get("library", {})
        t.add_row(r["name"], r["library"], f"{q.get('perplexity', float('nan')):.3f}", f"{q.get('kld_mean') or 0:.2e}",
                  f"{q.get('top1_agreement') or 0:.3f}", f"{r['quantize_s']:.1f}", f"{r['process_s']:.1f}",
                  f"{tps(lib)} {lib.get('loader', '')}", tps(r["decode"]["llmopt"]),
                  f"{perf.get('output_tokens_per_s') or 0:.1f}", f"yes ×{len(r['patches'])}" if r["patches"] else "no")
        if "error" in lib:
            notes.append(f"{r['name']} library kernels: {lib['error']}")
        for p in r["patches"]:
            notes.append(f"{r['name']} patch: {p}")
    console = Console(width=200)
    console.print(t)
    for n in notes:
        console.print(n, soft_wrap=True, markup=False)


if __name__ == "__main__":
    main()
