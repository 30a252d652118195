"""`python -m llmopt.backends.worker JOB.json`: run one job of one backend inside that backend's Python.

Jobs: probe (import the library, report versions), quantize, logits (load a checkpoint with the library's own
loader and return logits for given token ids), decode (greedy decode speed through the library's kernels).
Imports only the stdlib, torch, safetensors and the backend's library: this runs in foreign venvs.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

from llmopt.backends.base import WORKER_ERROR
from llmopt.errors import LlmoptError

MODULES = {"gptqmodel": "gptqmodel", "llmcompressor": "llmcompressor", "auto-gptq": "auto_gptq",
           "autoawq": "autoawq"}


def backend_module(name: str):
    return importlib.import_module(f"llmopt.backends.{MODULES[name]}")


# ---- helpers the backend modules share (torch imported lazily: probe must stay cheap) ----

def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def load_calibration(job: dict) -> list[list[int]]:
    """The token windows llmopt drew for this run ([N][L] ids): every backend calibrates on the same samples."""
    return json.loads(Path(job["calib"]).read_text())


def compat_model_dir(src: Path, dst: Path) -> Path:
    """A view of a transformers-5 checkpoint that transformers 4.x reads identically: config.json gains the
    4.x keys (rope_theta, torch_dtype) that 5.x moved (rope_parameters, dtype), tokenizer_config.json names
    the fast tokenizer class 4.x knows instead of 5.x's TokenizersBackend; every other file is linked."""
    src, dst = Path(src), Path(dst)
    if dst.exists():  # a view left by an earlier job in the same scratch folder: rebuild it
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    rewritten = ("config.json", "tokenizer_config.json")
    for f in src.iterdir():
        if f.name not in rewritten and f.is_file():
            (dst / f.name).symlink_to(f.resolve())
    tok_path = src / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            cfg.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def save_logits(path: str, logits) -> None:
    """[P, L, V] float32 logits → safetensors (the parent compares them with llmopt's runtime)."""
    from safetensors.torch import save_file

    save_file({"logits": logits.float().contiguous().cpu()}, path)


def run_prompts(model, prompts: list[list[int]], device: str):
    """Logits of an HF-style causal LM for each prompt (one forward each, no padding): [P, L, V]."""
    import torch

    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            outs.append(model(input_ids=x).logits[0].float().cpu())  # [L, V]
    return torch.stack(outs)


def time_decode(model, prompt: list[int], new_tokens: int, repeats: int, device: str) -> dict:
    """Batch-1 greedy decode through `model.generate`: median tokens/s of the decode phase over `repeats`
    runs after one warm-up (decode time = full generate minus a prefill-only generate of one token)."""
    import torch

    x = torch.tensor([prompt], device=device)
    attn = torch.ones_like(x)
    # use_cache explicitly: some quantizers save "use_cache": false into the config (AutoAWQ does), and generate
    # would then recompute the whole sequence at every step (measured: 0.27× instead of 1.2× float)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)

    def gen(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        assert out.shape[1] == x.shape[1] + n, "generate stopped early"
        return time.perf_counter() - t

    gen(new_tokens)  # warm-up: kernel selection, packing caches, allocator
    prefill = [gen(1) for _ in range(repeats)]
    full = [gen(new_tokens) for _ in range(repeats)]
    decode_s = statistics.median(full) - statistics.median(prefill)
    return {"decode_tokens_per_s": (new_tokens - 1) / decode_s, "prefill_s": statistics.median(prefill),
            "generate_s": full, "new_tokens": new_tokens, "prompt_tokens": len(prompt), "repeats": repeats,
            "threads": torch.get_num_threads()}


def finish_checkpoint(out: Path) -> None:
    """Drop what a library leaves beside the weights that is no part of a checkpoint."""
    for name in ("quant_log.csv", "logs"):
        p = Path(out) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    result_path = Path(job["result"])
    try:
        if job.get("threads"):
            import torch

            torch.set_num_threads(int(job["threads"]))
        mod = backend_module(job["backend"])
        result = getattr(mod, job["kind"])(job)
        result.setdefault("versions", versions())
    except LlmoptError as e:
        result_path.write_text(json.dumps({"error": str(e)}))
        return WORKER_ERROR
    except ImportError as e:
        result_path.write_text(json.dumps({"error": f"cannot import {e.name or 'a module'} in "
                                                    f"{sys.executable}: {e}"}))
        traceback.print_exc()
        return WORKER_ERROR
    result_path.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1]))
