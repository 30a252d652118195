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
    from llmopt.calibration import DataSpec, load_token_batch
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
    calib = load_token_batch(DataSpec(args.calib, args.split, args.text_field, args.chat_template), tokenizer,
                             args.samples, args.seq_len, args.seed, "calib")
    eval_batch = None
    if args.evaluate:
        eval_batch = load_token_batch(DataSpec(args.eval_data), tokenizer, args.eval_samples, args.eval_seq_len,
                                      args.seed, "test")
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
            tokenizer.save_pretrained(tmp)  # llmopt's tokenizer files, whatever the library's transformers wrote
            _declare_quantization(tmp, fmt)
            return _finish(args, spec, interp, fmt, res, tmp, model_path, calib, eval_batch, timings, t_all,
                           device, dtype)
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


def _finish(args, spec: BackendSpec, interp: Interpreter, fmt: str, res: dict, tmp: Path, model_path: Path, calib,
            eval_batch, timings: dict, t_all: float, device: torch.device, dtype: torch.dtype):
    """Read back, evaluate and describe the library's checkpoint in `tmp`; the QuantizeResult."""
    from llmopt.checkpoint.formats import read_checkpoint
    from llmopt.checkpoint.manifest import dir_bytes, write_manifest
    from llmopt.quant.api import QuantizeResult

    _, qweights, _ = read_checkpoint(tmp)  # llmopt must read what the library wrote
    metrics: dict = {"size_bytes": dir_bytes(tmp), "float_size_bytes": dir_bytes(model_path)}
    evaluated_with = None
    if eval_batch is not None:
        t = time.perf_counter()
        metrics.update(_evaluate(args, tmp, model_path, eval_batch.input_ids, device, dtype))
        metrics["eval"] = {"source": eval_batch.source, "split": eval_batch.split, "samples": args.eval_samples,
                           "seq_len": args.eval_seq_len, "sha256": eval_batch.sha256}
        timings["evaluate"] = time.perf_counter() - t
        evaluated_with = "runtime"
    timings["total"] = time.perf_counter() - t_all
    calibration = {"source": calib.source, "split": calib.split, "samples": args.samples, "seq_len": args.seq_len,
                   "seed": calib.seed, "sha256": calib.sha256}
    backend = {"name": spec.name, "library": res["library"], "python": interp.python, "origin": interp.origin,
               "versions": res.get("versions", {}), "patched": bool(res["patches"]), "patches": res["patches"],
               "library_config": res.get("library_config", {})}
    quant_args = {"bits": args.bits, "group_size": args.group_size, "sym": args.sym, "damp": args.damp,
                  "act_order": args.act_order, "static_groups": args.static_groups, "backend": spec.name,
                  "library": res["library"], "patched": bool(res["patches"])}
    write_manifest(tmp, "quantized", {
        "base_model": {"name": args.model, "path": str(model_path)},
        "method": args.method, "format": fmt, "backend": spec.name, "library": res["library"],
        "patched": bool(res["patches"]), "patches": res["patches"], "backend_info": backend,
        "args": args.to_dict(), "quant_args": quant_args, "calibration": calibration, "timings": timings,
        "layers": [], "metrics": metrics, "evaluated_with": evaluated_with, "quantized_modules": len(qweights),
    })
    return QuantizeResult(Path(args.out), args.method, fmt, quant_args, calibration, timings, [], metrics,
                          evaluated_with, len(qweights))


@torch.inference_mode()
def _evaluate(args, path: Path, model_path: Path, windows: torch.Tensor, device, dtype) -> dict:
    """The written checkpoint through llmopt's runtime vs the float model, on the same windows."""
    from llmopt.evaluate.quality import measure_quality
    from llmopt.models import ModelSpec, load_model

    d = dtype_name(dtype)
    base = load_model(ModelSpec(str(model_path), str(device), d, args.trust_remote_code))
    quant = load_model(ModelSpec(str(path), str(device), d, args.trust_remote_code))
    q = measure_quality(quant.model, windows, base.model)
    f = measure_quality(base.model, windows)
    return {"float": f.to_dict(), "quantized": q.to_dict()}


__all__ = ["check_method_format", "run_backend"]
