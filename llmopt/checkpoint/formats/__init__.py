"""Quantized checkpoint formats: compressed-tensors (default), GPTQ, AWQ (GEMM).

write_checkpoint turns QuantizedWeights into a format's tensors + config; read_checkpoint does the
reverse for checkpoints written by llmopt, llm-compressor, AutoGPTQ/GPTQModel or AutoAWQ.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmopt.errors import LlmoptError
from llmopt.families import moe
from llmopt.checkpoint.formats import _io, awq, compressed_tensors, gptq
from llmopt.checkpoint.types import FORMATS, QuantArgs, QuantizedWeight

_BY_METHOD = {"compressed-tensors": compressed_tensors, "gptq": gptq, "awq": awq}


def _format(fmt: str):
    if fmt not in FORMATS:
        raise LlmoptError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
    return _BY_METHOD[fmt]


def check_supported(fmt: str, method: str, quant_args: QuantArgs) -> None:
    """Raise LlmoptError when `fmt` cannot store what `method` with `quant_args` produces."""
    _format(fmt).check_supported(method, quant_args)


def write_checkpoint(fmt: str, model: torch.nn.Module, qweights: dict[str, QuantizedWeight], out: Path,
                     quant_args: QuantArgs, method: str, kv_scales=None) -> None:
    """Write config.json (with quantization_config) and safetensors weights into the existing dir `out`.

    Quantized Linears are stored in the format's layout; every other tensor of `model` as it is. The config
    lists the exact names of the Linears that stayed float, derived from `model` and `qweights` (not the user's
    --ignore patterns), which every loader matches unambiguously.
    Names are the family's hub names: MoE experts per expert as transformers' save_pretrained writes them, and
    the routers listed among the float modules.
    `kv_scales` (quant/kv_scales.KVScales, compressed-tensors only): calibrated per-layer K/V scales, written as
    quantization_config.kv_cache_scheme plus {attention}.k_scale / .v_scale scalars, where vLLM reads them.
    A model streamed from its shards writes the same tensors part by part (checkpoint_tensors with `keep`, into a
    shards.ShardWriter), then write_config.
    """
    _format(fmt).check_supported(method, quant_args)
    if not qweights:
        raise LlmoptError("no Linear layer was quantized: check --ignore/--targets patterns")
    tensors = checkpoint_tensors(fmt, model, qweights)
    tensors.update(kv_scale_tensors(fmt, model, kv_scales))
    _io.save_tensors(tensors, Path(out))
    write_config(fmt, model, qweights, Path(out), quant_args, method, kv_scales)


def checkpoint_tensors(fmt: str, model: torch.nn.Module, qweights: dict[str, QuantizedWeight],
                       keep=None) -> dict[str, torch.Tensor]:
    """The tensors to store, by hub name: `qweights` in the format's layout (with their biases) and every other
    state-dict tensor of `model` for which keep(key) holds (all when keep is None)."""
    module = _format(fmt)
    hub = moe.hub_renamer(model.config)
    tensors = {hub(k): t for k, t in _io.plain_tensors(model, qweights, keep).items()}
    scale_dtype = _io.model_dtype(model)
    for name, qw in qweights.items():
        if fmt == "compressed-tensors":
            tensors.update(module.module_tensors(hub(name), qw, scale_dtype))
        else:
            tensors.update(module.module_tensors(hub(name), qw))
        bias = _io.linear_bias(model, name, qw)
        if bias is not None:
            tensors[f"{hub(name)}.bias"] = bias  # original dtype: every loader casts biases to its compute dtype
    return tensors


def kv_scale_tensors(fmt: str, model: torch.nn.Module, kv_scales) -> dict[str, torch.Tensor]:
    """{attention}.k_scale / .v_scale of calibrated KV scales (none without them)."""
    if kv_scales is None:
        return {}
    from llmopt.checkpoint import kv_scales as kvs

    if fmt != "compressed-tensors":
        raise LlmoptError(f"calibrated KV scales are written only in compressed-tensors checkpoints, not {fmt}")
    return kvs.tensors(kv_scales, moe.hub_renamer(model.config))


def write_config(fmt: str, model: torch.nn.Module, qweights: dict[str, QuantizedWeight], out: Path,
                 quant_args: QuantArgs, method: str, kv_scales=None) -> None:
    """config.json with quantization_config (and generation_config.json, GPTQ's quantize_config.json). Reads only
    the names and settings of `qweights`, so a streamed run passes them with meta tensors."""
    module = _format(fmt)
    hub = moe.hub_renamer(model.config)
    float_modules = _io.unquantized_linears(model, qweights)
    float_modules += [r for r in moe.router_names(model) if r not in float_modules]
    unquantized = [hub(n) for n in float_modules]
    qweights = {hub(n): qw for n, qw in qweights.items()}
    if fmt == "compressed-tensors":
        qc = module.quantization_config(qweights, unquantized)
    elif fmt == "gptq":
        qc = module.quantization_config(qweights, unquantized, quant_args, method)
    else:
        qc = module.quantization_config(qweights, unquantized)
    if kv_scales is not None:
        from llmopt.checkpoint import kv_scales as kvs

        qc["kv_cache_scheme"] = kvs.scheme(kv_scales.kind)
    config = _io.model_config_dict(model, qc)
    if "lm_head" in qweights:  # a quantized head can no longer share the embedding's tensor
        config["tie_word_embeddings"] = False
    _io.write_json(out / "config.json", config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if fmt == "gptq":  # AutoGPTQ-era loaders read the settings from this file
        _io.write_json(out / "quantize_config.json", qc)


def quant_method(config: dict) -> str:
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise LlmoptError("config.json has no quantization_config with a quant_method: not a quantized checkpoint")
    method = str(qc["quant_method"]).lower()
    if method not in _BY_METHOD:
        raise LlmoptError(f"quantization method {method!r} is not supported: llmopt reads "
                          f"{', '.join(_BY_METHOD)} checkpoints")
    return method


def read_config(path: Path) -> dict:
    """config.json as a dict; a GPTQ checkpoint that keeps its settings only in quantize_config.json gets them merged."""
    config = _io.read_config(path)
    legacy = Path(path) / "quantize_config.json"
    if "quantization_config" not in config and legacy.exists():
        import json

        config["quantization_config"] = {"quant_method": "gptq", **json.loads(legacy.read_text())}
    return config


def read_checkpoint(path: Path) -> tuple[dict, dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """(config.json dict, quantized Linears by module name, every other tensor by state-dict key)."""
    config = read_config(Path(path))
    method = quant_method(config)
    tensors = _io.load_tensors(Path(path))
    qweights = _BY_METHOD[method].read(config, tensors)
    if not qweights:
        raise LlmoptError(f"{path} declares {method} quantization but holds no quantized Linear tensors")
    for name in qweights:  # the Linear's bias travels with its QuantizedWeight
        bias = tensors.pop(f"{name}.bias", None)
        if bias is not None:
            qweights[name].bias = bias
    return config, qweights, tensors


__all__ = ["check_supported", "checkpoint_tensors", "kv_scale_tensors", "quant_method", "read_checkpoint", "read_config",
           "write_checkpoint", "write_config"]
