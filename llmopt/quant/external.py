"""`run_backend(QuantizeArgs) -> QuantizeResult`: an external library quantizes, llmopt does everything else.

llmopt draws the calibration windows (so every backend sees the same samples as llmopt's own methods),
the library quantizes them in its worker process and writes its checkpoint into llmopt's atomic temp dir,
then llmopt adds its tokenizer, evaluates the checkpoint through its own runtime against the float model on
the same eval windows, and writes llmopt.json (method, backend, library, args, timings, patches, metrics).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from llmopt.backends import get_spec
from llmopt.backends.base import BackendSpec, Interpreter, find_interpreter, run_worker
from llmopt.errors import LlmoptError
from llmopt.progress import Progress, emit
from llmopt.utils import dtype_name


def check_method_format(spec: BackendSpec, method: str, fmt: str) -> str:
    """The format `spec` writes for `method`. --format is honoured when it names that format; the CLI default
    (compressed-tensors) means "the backend's own" for backends that write GPTQ/AWQ."""
    if method not in spec.methods:
        raise LlmoptError(f"backend {spec.name} does not run --method {method}: use "
                          f"{' or '.join(spec.methods)} (or --backend llmopt)")
    native = spec.methods[method]
    if fmt not in (native, "compressed-tensors"):
        raise LlmoptError(f"backend {spec.name} writes {method} as {native}, not {fmt}: use --format {native}")
    return native


def _job(args, device: torch.device, dtype: torch.dtype, model_path: Path, calib: Path, out: Path,
         scratch: Path) -> dict:
    return {"kind": "quantize", "model": str(model_path), "out": str(out), "calib": str(calib),
            "scratch": str(scratch), "method": args.method, "bits": args.bits, "group_size": args.group_size,
            "sym": args.sym, "act_order": args.act_order, "static_groups": args.static_groups, "damp": args.damp,
            "block_size": args.block_size, "awq_grid": args.awq_grid, "awq_clip": args.awq_clip,
            "device": str(device), "dtype": dtype_name(dtype), "threads": torch.get_num_threads()}


def run_backend(args, progress: Progress | None = None):
    """Quantize with the external backend args.backend; its status lines go out as Event messages."""
    from llmopt.quant.api import load_data
    from llmopt.models import ModelSpec, resolve_path
    from llmopt.models.loading import load_tokenizer
    from llmopt.utils import atomic_dir, check_out_dir, resolve_device, resolve_dtype

    spec = get_spec(args.backend)
    fmt = check_method_format(spec, args.method, args.format)
    check_out_dir(args.out, args.overwrite)  # fail before any heavy work
    interp = find_interpreter(spec, args.backend_python)
    if args.ignore or args.targets != ["Linear"]:
        raise LlmoptError(f"--targets/--ignore are llmopt-backend options; backend {spec.name} quantizes every "
                          f"decoder Linear and keeps lm_head float: drop them")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    mspec = ModelSpec(args.model, str(device), dtype_name(dtype), args.trust_remote_code, args.revision)
    model_path = resolve_path(mspec)
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    calib, eval_batch = load_data(args, tokenizer)
    timings["data"] = time.perf_counter() - t

    scratch = Path(tempfile.mkdtemp(prefix=f"llmopt-{spec.name}-scratch-"))
    try:
        calib_path = scratch / "calib.json"
        calib_path.write_text(json.dumps(calib.input_ids.tolist()))
        with atomic_dir(args.out, args.overwrite) as tmp:
            emit(progress, f"{spec.name} quantize", message=f"{spec.name} {args.method} W{args.bits} in "
                                                                   f"{interp.python} ({interp.origin}) …")
            run = run_worker(spec, interp, _job(args, device, dtype, model_path, calib_path, tmp, scratch))
            res = run.result
            timings.update({f"backend_{k}": v for k, v in res["timings"].items()})
            timings["quantize"] = res["timings"]["quantize"]
            timings["backend_process"] = run.seconds
            if res["patches"]:
                emit(progress, f"{spec.name} quantize",
                     message=f"{res['library']} ran PATCHED: " + "; ".join(res["patches"]))
            _declare_quantization(tmp, fmt)
            return _finish(args, spec, interp, fmt, res, tmp, model_path, tokenizer, calib, eval_batch, timings,
                           t_all, device, dtype)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _declare_quantization(path: Path, fmt: str) -> None:
    """AutoGPTQ keeps its settings only in quantize_config.json, with a legacy `is_marlin_format` flag that
    GPTQModel ≥7 refuses; transformers, vLLM and llmopt find a quantized checkpoint by config.json's
    quantization_config. So the settings go into config.json too, and the flag becomes the equivalent
    `checkpoint_format` in both files."""
    cfg_path, legacy = path / "config.json", path / "quantize_config.json"
    config = json.loads(cfg_path.read_text())
    if legacy.is_file():
        qc = json.loads(legacy.read_text())
        if "is_marlin_format" in qc:
            qc.setdefault("checkpoint_format", "marlin" if qc.pop("is_marlin_format") else "gptq")
            legacy.write_text(json.dumps(qc, indent=2) + "\n")
        if "quantization_config" not in config:
            config["quantization_config"] = {"quant_method": fmt, **qc}
            cfg_path.write_text(json.dumps(config, indent=2) + "\n")


def _finish(args, spec: BackendSpec, interp: Interpreter, fmt: str, res: dict, tmp: Path, model_path: Path,
            tokenizer, calib, eval_batch, timings: dict, t_all: float, device: torch.device, dtype: torch.dtype):
    """Read back the library's checkpoint in `tmp`, then llmopt's shared finish step (quant/finish.py): tokenizer,
    evaluation, llmopt.json. The QuantizeResult."""
    from llmopt.checkpoint.formats import read_checkpoint
    from llmopt.quant.api import QuantizeResult
    from llmopt.quant.finish import (
        FloatSource,
        Written,
        calibration_record,
        evaluate_written,
        write_quant_manifest,
    )

    _, qweights, _ = read_checkpoint(tmp)  # llmopt must read what the library wrote
    source = FloatSource(args.model, model_path, str(model_path))
    metrics, evaluated_with = evaluate_written(args, tmp, tokenizer, source, eval_batch, device, dtype, timings)
    timings["total"] = time.perf_counter() - t_all
    calibration = calibration_record(args, calib)
    patched = bool(res["patches"])
    backend = {"name": spec.name, "library": res["library"], "python": interp.python, "origin": interp.origin,
               "versions": res.get("versions", {}), "patched": patched, "patches": res["patches"],
               "library_config": res.get("library_config", {})}
    quant_args = {**asdict(args.quant_args()), "backend": spec.name, "library": res["library"], "patched": patched}
    written = Written(fmt, quant_args, [], len(qweights), _float_linears(args, model_path, qweights), {
        "backend": spec.name, "library": res["library"], "patched": patched, "patches": res["patches"],
        "backend_info": backend})
    write_quant_manifest(tmp, args, source, written, calibration, timings, metrics, evaluated_with)
    return QuantizeResult(Path(args.out), args.method, fmt, quant_args, calibration, timings, [], metrics,
                          evaluated_with, len(qweights))


def _float_linears(args, model_path: Path, qweights: dict) -> list[str]:
    """The Linears the library left float (e.g. lm_head), from the float model's structure built on the meta
    device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in qweights]


__all__ = ["check_method_format", "run_backend"]
