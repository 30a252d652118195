"""Checkpoint I/O shared by the format writers/readers: safetensors shards, config, plain tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmopt.checkpoint.shards import INDEX_NAME, ShardWriter
from llmopt.checkpoint.types import QuantizedWeight
from llmopt.errors import LlmoptError
from llmopt.utils import dtype_name


def linear_names(model: torch.nn.Module) -> list[str]:
    """Names of every nn.Linear in the model, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def unquantized_linears(model: torch.nn.Module, qweights: dict[str, QuantizedWeight]) -> list[str]:
    missing = sorted(set(qweights) - set(linear_names(model)))
    if missing:
        raise LlmoptError(f"quantized weights name modules that are not Linear layers of the model: {missing[:3]}")
    return [n for n in linear_names(model) if n not in qweights]


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the first one's)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def plain_tensors(model: torch.nn.Module, qweights: dict[str, QuantizedWeight], keep=None
                  ) -> dict[str, torch.Tensor]:
    """Every state-dict tensor except the float weights (and biases) of quantized Linears (only the keys for
    which keep(key) holds, when given: a streamed model writes part by part).

    Tensors sharing storage (tied embeddings) are written once, under the first name, as
    save_pretrained does; the loader re-ties them from the config. A float Linear converted from a Conv1D
    (GPT-2) keeps the hub's [in, out] weight layout (families/linear_like.py).
    """
    from llmopt.families.linear_like import hub_weight, is_converted

    skip = {f"{n}.weight" for n in qweights} | {f"{n}.bias" for n in qweights}
    converted = {f"{n}.weight": m for n, m in model.named_modules() if is_converted(m)}
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, t in model.state_dict().items():
        if key in skip or (keep is not None and not keep(key)):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if ident in seen:
            continue
        seen.add(ident)
        if key in converted:
            t = hub_weight(converted[key], t)
        out[key] = t.detach().cpu().contiguous()
    return out


def linear_bias(model: torch.nn.Module, name: str, qw: QuantizedWeight) -> torch.Tensor | None:
    """The bias to store for a quantized Linear: the one carried by the QuantizedWeight, else the module's."""
    if qw.bias is not None:
        return qw.bias.detach().cpu()
    bias = model.get_submodule(name).bias
    return None if bias is None else bias.detach().cpu()


def save_tensors(tensors: dict[str, torch.Tensor], out: Path) -> None:
    """Write tensors as one safetensors file, or shards plus an index past SHARD_BYTES (checkpoint/shards.py)."""
    writer = ShardWriter(out)
    writer.add_all(tensors)
    writer.close()


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded), on CPU."""
    path = Path(path)
    index = path / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise LlmoptError(f"{path} holds no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(path / f)))
    return tensors


def model_config_dict(model: torch.nn.Module, quantization_config: dict) -> dict:
    """The model's config as a dict with `quantization_config` set (the model's own config is not modified)."""
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config
    cfg["dtype"] = dtype_name(model_dtype(model))
    cfg.pop("torch_dtype", None)
    return cfg


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_config(path: Path) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise LlmoptError(f"{path} has no config.json: expected a quantized checkpoint directory")
    return json.loads(cfg_path.read_text())


def pop_module_tensors(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...], anchor: str
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """Group `{module}.{suffix}` tensors by module for every module that has `{module}.{anchor}`; removes them."""
    modules = [k[: -len(anchor) - 1] for k in tensors if k.endswith("." + anchor)]
    grouped = {}
    for m in modules:
        grouped[m] = {s: tensors.pop(f"{m}.{s}") for s in suffixes if f"{m}.{s}" in tensors}
    return grouped


def trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when g_idx is just column // group_size (contiguous groups), i.e. carries no act-order."""
    n = g_idx.numel()
    gs = n if group_size == -1 else group_size
    return torch.equal(g_idx.long().cpu(), torch.arange(n) // gs)
