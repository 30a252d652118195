"""The finish step both quantize paths share (llmopt's own in quant/api.py, external libraries' in
quant/external.py): tokenizer, evaluation of the written checkpoint vs the float model, llmopt.json.

So a checkpoint says the same things whoever quantized it: one manifest schema, one evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmopt.checkpoint.manifest import dir_bytes, write_manifest
from llmopt.checkpoint.types import QuantArgs
from llmopt.progress import Progress


@dataclass(slots=True)
class FloatSource:
    """The float model the checkpoint is compared with: what the user named, where it lies, how to load it."""

    name: str  # args.model
    path: Path  # its resolved directory
    load_as: str  # what evaluation loads (the name with its revision, or the path)
    revision: str | None = None


@dataclass(slots=True)
class Written:
    """What a path wrote into the temp dir, for the manifest."""

    format: str
    quant_args: dict  # asdict(QuantArgs), plus the backend's fields for external libraries
    layers: list[dict]
    quantized_modules: int
    ignored_modules: list[str]  # Linears left float
    extra: dict = field(default_factory=dict)  # path-specific manifest fields (moe, backend, patches, ...)


def calibration_record(args, calib) -> dict:
    """The calibration set as the manifest and the result report it (None: a data-free run used none)."""
    if calib is None:
        return {"source": None, "samples": 0, "note": f"{args.method} is data-free and ran without the per-layer "
                                                      f"check (--layer-check adds it)"}
    return {"source": calib.source, "split": calib.split, "samples": args.samples, "seq_len": args.seq_len,
            "seed": calib.seed, "sha256": calib.sha256}


def eval_record(args, eval_batch) -> dict:
    """The eval windows as the manifest reports them."""
    return {"source": eval_batch.source, "split": eval_batch.split, "samples": args.eval_samples,
            "seq_len": args.eval_seq_len, "sha256": eval_batch.sha256}


def evaluate_written(args, tmp: Path, tokenizer, source: FloatSource, eval_batch, device: torch.device,
                     dtype: torch.dtype, timings: dict) -> tuple[dict, str | None]:
    """llmopt's tokenizer into tmp, sizes, and (with an eval batch) the quality of the written checkpoint vs the
    float model. Returns (metrics, evaluated_with)."""
    tokenizer.save_pretrained(tmp)  # llmopt's tokenizer files, whatever a library's transformers wrote
    metrics: dict = {"size_bytes": dir_bytes(tmp), "float_size_bytes": dir_bytes(source.path)}
    if eval_batch is None:
        return metrics, None
    t = time.perf_counter()
    metrics.update(_quality(args, tmp, source, eval_batch.input_ids, device, dtype))
    metrics["eval"] = eval_record(args, eval_batch)
    timings["evaluate"] = time.perf_counter() - t
    return metrics, "runtime"


@torch.inference_mode()
def _quality(args, path: Path, source: FloatSource, windows: torch.Tensor, device: torch.device,
             dtype: torch.dtype) -> dict:
    """The written checkpoint reloaded through llmopt's runtime (what users will run) vs the float model, on the
    same windows [N, L]."""
    from llmopt.evaluate.quality import measure_quality
    from llmopt.models import ModelSpec, load_model
    from llmopt.utils import dtype_name

    base = load_model(ModelSpec(source.load_as, str(device), dtype_name(dtype), args.trust_remote_code,
                                source.revision))
    quant = load_model(ModelSpec(str(path), str(device), dtype_name(dtype), args.trust_remote_code)).model
    q = measure_quality(quant, windows, base.model)
    f = measure_quality(base.model, windows)
    return {"float": f.to_dict(), "quantized": q.to_dict()}


GGUF_FILE = "model.gguf"  # --format gguf: the GGUF file beside the safetensors checkpoint


def check_gguf_export(model: torch.nn.Module, tokenizer, names: list[str], quant_args: QuantArgs,
                      method: str) -> None:
    """--format gguf, before calibration: raise what exporting the finished checkpoint would (architecture,
    rope, W8A8, input columns of the quantized Linears `names`, tokenizer, the gguf package missing)."""
    import json

    from llmopt.checkpoint.formats.gguf import check_exportable
    from llmopt.errors import LlmoptError
    from llmopt.quant.methods import method_class

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LlmoptError("GGUF files carry the tokenizer from its tokenizer.json, which this model's (slow) "
                          "tokenizer has none of: use --format compressed-tensors")
    in_dims = {n: int(model.get_submodule(n).in_features) for n in names}
    check_exportable(model.config.to_dict(), quant_args.bits, quant_args.sym, method_class(method).act_bits,
                     in_dims, json.loads(backend.to_str()))


def export_gguf_beside(tmp: Path, name: str, evaluated: bool, progress: Progress | None) -> dict:
    """--format gguf: model.gguf exported from the finished checkpoint in tmp (llmopt export's own code, float
    tensors f16) beside it; its llmopt.json record: file, bytes, how each tensor mapped, and a warning when
    tensors were requantized (then model.gguf's weights differ from the safetensors' the evaluation measured)."""
    from llmopt.checkpoint.formats.gguf import export_gguf

    result = export_gguf(tmp, tmp / GGUF_FILE, "f16", progress, name=name)
    quantized = [r for r in result.records if r.how != "float"]
    requantized = result.requantized
    warning = None
    if requantized:
        measured = ("the quality table measured the safetensors checkpoint, not model.gguf" if evaluated else
                    "model.gguf's weights differ from the safetensors checkpoint's in them")
        warning = (f"{len(requantized)} of {len(quantized)} quantized tensors were requantized into GGUF blocks "
                   f"(exact needs groups of a multiple of 32 columns, no --act-order, symmetric 8-bit): {measured}")
    return {"file": GGUF_FILE, "bytes": result.n_bytes, "float_type": "f16", "tensors": result.kinds(),
            "exact": len(quantized) - len(requantized), "requantized": len(requantized),
            "requantized_tensors": requantized, "warning": warning}


def write_quant_manifest(tmp: Path, args, source: FloatSource, written: Written, calibration: dict, timings: dict,
                         metrics: dict, evaluated_with: str | None) -> None:
    """llmopt.json of a quantized checkpoint (the one schema of both paths)."""
    write_manifest(tmp, "quantized", {
        "base_model": {"name": args.model, "path": str(source.path)},
        "method": args.method, "format": written.format, "args": args.to_dict(), "quant_args": written.quant_args,
        "calibration": calibration, "timings": timings, "layers": written.layers, "metrics": metrics,
        "evaluated_with": evaluated_with, "quantized_modules": written.quantized_modules,
        "ignored_modules": written.ignored_modules, **written.extra,
    })


__all__ = ["GGUF_FILE", "FloatSource", "Written", "calibration_record", "check_gguf_export", "eval_record",
           "evaluate_written", "export_gguf_beside", "write_quant_manifest"]
