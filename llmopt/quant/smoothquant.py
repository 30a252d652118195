"""SmoothQuant (Xiao et al., 2022) for W8A8: move activation outliers into the weights before INT8.

s_j = max|X_j|^α / max|W_j|^(1-α) per input channel j (W over every Linear reading that input); the
Linears' columns are multiplied by s and the preceding op divided by it (families.registry.fold_scales), so the
float function is unchanged and per-token INT8 activations lose less. Weights are then RTN INT8 per
output channel, activations quantized dynamically per token at run time (QuantizedWeight.act_bits = 8).
"""

from __future__ import annotations

import torch

from llmopt.checkpoint.types import QuantArgs, QuantizedWeight
from llmopt.quant.rtn import rtn_quantize


class ActMaxAccumulator:
    """Per-input-channel max |x| over the calibration inputs of a Linear."""

    __slots__ = ("amax",)

    def __init__(self, n_in: int, device: torch.device) -> None:
        self.amax = torch.zeros(n_in, device=device)  # [in]

    def add(self, x: torch.Tensor) -> None:
        self.amax = torch.maximum(self.amax, x.reshape(-1, x.shape[-1]).abs().amax(0).float())


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """act_max [in], weights [[out_i, in]] → s [in] (clamped away from 0 so folding stays finite)."""
    # per weight, never concatenated (an MoE block's experts together can be tens of GB)
    w_max = torch.stack([w.abs().amax(0).float() for w in weights]).amax(0).clamp(min=1e-5)  # [in]
    s = act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


def w8a8_quantize(w: torch.Tensor, args: QuantArgs) -> QuantizedWeight:
    """INT8 weight codes (per channel or group as args say) flagged for dynamic per-token INT8 activations."""
    qw = rtn_quantize(w, args)
    qw.act_bits = 8
    return qw
