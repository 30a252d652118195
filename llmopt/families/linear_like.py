"""Linear-like modules that are not `nn.Linear`: transformers' `Conv1D` (GPT-2 and its relatives).

Conv1D computes x @ W + b with W stored [in, out], the transpose of nn.Linear's [out, in]. Every per-Linear
quantizer and the runtime's quantized Linears assume nn.Linear, so `convert_conv1d` swaps each Conv1D for an
exact `Conv1DLinear` (an nn.Linear holding Wᵀ). On disk a quantized Conv1DLinear is stored in the format's
Linear layout (what vLLM and llmopt's runtime read for GPT-2), while one that stays float keeps the hub's [in, out]
`weight` (`hub_weight`), so the float tensors of the checkpoint are exactly the architecture's own.
(nn.Linear subclasses such as Falcon's FalconLinear need nothing: they are Linears, and the class-name target
`Linear` matches any class in a module's MRO.)
"""

from __future__ import annotations

import torch
from torch import nn


class Conv1DLinear(nn.Linear):
    """An nn.Linear that replaced a transformers Conv1D (same function; weight transposed to [out, in])."""


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # a transformers without Conv1D has no such modules to convert
        return None
    return Conv1D


def convert_conv1d(model: nn.Module) -> list[str]:
    """Replace every transformers Conv1D of `model` by a Conv1DLinear (in place; meta weights stay meta);
    returns the converted module names."""
    conv1d = _conv1d_type()
    if conv1d is None:
        return []
    names = [n for n, m in model.named_modules() if isinstance(m, conv1d)]
    for name in names:
        conv = model.get_submodule(name)
        w = conv.weight  # [in, out]
        lin = Conv1DLinear(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        if w.device.type != "meta":
            with torch.no_grad():
                lin.weight.copy_(w.t())
                if conv.bias is not None:
                    lin.bias.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return names


def hub_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The float `weight` tensor of `module` as the architecture's checkpoints store it ([in, out] for a
    Conv1DLinear, unchanged otherwise)."""
    return weight.t().contiguous() if isinstance(module, Conv1DLinear) else weight


def is_converted(module: nn.Module) -> bool:
    return isinstance(module, Conv1DLinear)
