"""llmopt's quantized runtime: load a compressed-tensors / GPTQ / AWQ checkpoint into a transformers model
whose quantized Linears are replaced by modules running low-bit kernels (see linear.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from llmopt.errors import LlmoptError
from llmopt.families import linear_like, moe
from llmopt.runtime.linear import QuantLinear, build_linear, clear_kernel_cache, fuse_siblings


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def load_quantized_model(path: Path, config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A transformers causal LM built from `config`, with llmopt runtime modules for the quantized Linears.

    `config` is the checkpoint's transformers config (carrying quantization_config); `dtype` is the dtype of
    activations and of the unquantized tensors. Calibrated KV scales (kv_cache_scheme + k_scale/v_scale) become
    `model.kv_cache_scales` (quant/kv_scales.KVScales, None without them).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from llmopt.checkpoint.formats import read_checkpoint

    device = torch.device(device)
    _, qweights, others = read_checkpoint(Path(path))
    float_config = copy.deepcopy(config)
    if hasattr(float_config, "quantization_config"):
        delattr(float_config, "quantization_config")
    with init_empty_weights(include_buffers=False):  # params on meta; buffers such as rotary tables stay real
        model = AutoModelForCausalLM.from_config(float_config, dtype=dtype)
    moe.unfuse_experts(model)  # per-expert Linears, as the checkpoint stores experts
    converted = linear_like.convert_conv1d(model)  # GPT-2: quantized Conv1Ds are stored as Linears
    ours = moe.internal_renamer(config)
    qweights = {ours(n): qw for n, qw in qweights.items()}
    others = {ours(k): t for k, t in others.items()}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = sorted(set(qweights) - linears)
    if unknown:
        raise LlmoptError(f"{path}: quantized tensors for {unknown[0]}, which is not a Linear of a "
                          f"{config.model_type} model")
    for name, qw in qweights.items():
        _set_module(model, name, build_linear(qw, device, dtype))
    for name in converted:  # a Conv1D left float keeps the hub's [in, out] weight on disk
        key = f"{name}.weight"
        if key in others:
            others[key] = others[key].t()
    from llmopt.checkpoint import kv_scales as kvs

    kv_table = kvs.pop(model, config, others)  # {attention}.k_scale / .v_scale → per-layer table (or None)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in others.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise LlmoptError(f"{path}: tensors the model does not have, e.g. {result.unexpected_keys[0]}")
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise LlmoptError(f"{path}: the checkpoint lacks {still_empty[0]} (and {len(still_empty) - 1} more tensors)")
    model.to(device)
    fuse_siblings(model)  # q/k/v and gate/up as one kernel call each (CPU vnni layers only)
    model.config = config
    model.kv_cache_scales = kv_table  # the engine's --kv-dtype int8/fp8 uses them as static per-layer scales
    model.eval()
    return model


def quant_modules(model: torch.nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def kernel_report(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(layer name, kernel per M bucket seen so far, or the candidates when the layer has not run yet)."""
    rows = []
    for name, m in quant_modules(model):
        if m.used:
            desc = ", ".join(f"M≤{b}: {k}" for b, k in sorted(m.used.items()))
        else:
            desc = "not run yet; candidates " + "|".join(m.kernels())
        rows.append((name, f"{m.kind} {desc}"))
    return rows


def set_kernel(model: torch.nn.Module, kernel: str | None) -> None:
    """Pin every quantized layer to `kernel` (None: back to the per-shape rule)."""
    for _, m in quant_modules(model):
        m.force_kernel = kernel


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers (quantized layers count their packed copies)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


__all__ = ["load_quantized_model", "kernel_report", "set_kernel", "weight_bytes", "quant_modules",
           "clear_kernel_cache", "build_linear"]
