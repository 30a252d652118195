"""A tiny independent RTN used to build QuantizedWeights in the format and runtime tests."""

from __future__ import annotations

import torch

from llmopt.checkpoint.types import QuantizedWeight


def rtn(w: torch.Tensor, bits: int = 4, group_size: int = 32, sym: bool = True, act_bits: int | None = None,
        g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest of a [out, in] weight; groups by g_idx when given (act-order layout)."""
    n_out, n_in = w.shape
    gs = n_in if group_size == -1 else group_size
    groups = g_idx.long() if g_idx is not None else torch.arange(n_in) // gs
    n_groups = int(groups.max()) + 1
    maxq = (1 << bits) - 1
    scales = torch.empty(n_out, n_groups)
    zeros = torch.empty(n_out, n_groups, dtype=torch.int32)
    w = w.float()
    for g in range(n_groups):
        cols = w[:, groups == g]
        if sym:
            s = cols.abs().amax(1).clamp(min=1e-8) / ((maxq + 1) / 2 - 1 if bits > 1 else 1)
            z = torch.full((n_out,), (maxq + 1) // 2, dtype=torch.int32)
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            s = ((hi - lo) / maxq).clamp(min=1e-8)
            z = torch.round(-lo / s).clamp(1, maxq).to(torch.int32)  # >= 1: storable in the gptq v1 format
        scales[:, g], zeros[:, g] = s, z
    q = torch.round(w / scales[:, groups] + zeros[:, groups]).clamp(0, maxq).to(torch.uint8)
    return QuantizedWeight(q, scales, zeros.to(torch.uint8), None if g_idx is None else g_idx.to(torch.int32),
                           bits, group_size, sym, bias=bias, act_bits=act_bits)


def quantize_model(model: torch.nn.Module, bits: int = 4, group_size: int = 32, sym: bool = True,
                   act_bits: int | None = None, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, QuantizedWeight]:
    """RTN every Linear except `skip`; the model's float weights are replaced by their dequantized values."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name not in skip:
            qw = rtn(m.weight.detach(), bits, group_size, sym, act_bits)
            out[name] = qw
            with torch.no_grad():
                m.weight.copy_(qw.dequantize(m.weight.dtype))
    return out
