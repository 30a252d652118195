"""Dataclasses that cross the quant boundaries: algorithm cores → pipeline → formats → runtime.

Code convention used everywhere inside llmopt (formats convert at their edge):
    unsigned integer codes q in [0, 2**bits - 1], dequantized w = (q - zero) * scale,
    symmetric = zero fixed at 2**(bits-1) for every group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.errors import LlmoptError

METHODS = ("rtn", "int8", "w8a8", "gptq", "awq")
FORMATS = ("compressed-tensors", "gptq", "awq")
# what `llmopt quantize --format` writes: a checkpoint format, or gguf (a compressed-tensors checkpoint plus
# model.gguf exported from it beside it)
QUANTIZE_FORMATS = (*FORMATS, "gguf")


@dataclass(frozen=True, slots=True)
class QuantArgs:
    """Per-Linear quantization settings shared by all methods (method-specific knobs below)."""

    bits: int = 4
    group_size: int = 128  # input channels per (scale, zero) group; -1 = one group per output channel
    sym: bool = True
    # GPTQ
    damp: float = 0.01  # fraction of mean(diag(H)) added to the Hessian diagonal
    block_size: int = 128  # columns per lazy-update block
    act_order: bool = False  # quantize columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # with act_order: group params fixed from the original column order
    scale_search: bool = False  # group scales searched for the least Hessian-weighted error, not read off the range
    # SmoothQuant (w8a8)
    smoothquant_alpha: float = 0.5
    # AWQ
    awq_grid: int = 20  # α values tried in [0, 1)
    awq_clip: bool = True  # search a clipping ratio of the weight range per group

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise LlmoptError(f"--bits {self.bits} is not supported: use 4 or 8 (2 and 3 for experiments)")
        if self.group_size != -1 and self.group_size <= 0:
            raise LlmoptError(f"--group-size must be positive or -1 (per channel), got {self.group_size}")
        if not 0 <= self.damp < 1:
            raise LlmoptError(f"--damp must be in [0, 1), got {self.damp}")
        if not 0 <= self.smoothquant_alpha <= 1:
            raise LlmoptError(f"--smoothquant-alpha must be in [0, 1], got {self.smoothquant_alpha}")


@dataclass(slots=True)
class QuantizedWeight:
    """One quantized Linear weight, unpacked (formats pack it; runtime converts it to kernel layouts).

    qweight: [out, in] uint8 codes (int32 also accepted), in [0, 2**bits)
    scales:  [out, n_groups] float
    zeros:   [out, n_groups] integer codes (symmetric: all 2**(bits-1))
    g_idx:   [in] int32 group of each input column, or None for contiguous groups (column // group_size)
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int  # -1: per output channel (n_groups == 1)
    sym: bool
    bias: torch.Tensor | None = None
    act_bits: int | None = None  # 8 for W8A8 (dynamic per-token int8 activations), None for weight-only

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]

    def group_index(self) -> torch.Tensor:
        """[in] group of every input column."""
        n_in = self.qweight.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        gs = n_in if self.group_size == -1 else self.group_size
        return torch.arange(n_in, device=self.qweight.device) // gs

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] float weight: (q - zero) * scale, group by group."""
        if self.g_idx is None:  # contiguous groups: the same arithmetic on the [out, G, gs] view
            out, n_in = self.qweight.shape
            q = self.qweight.to(torch.float32, copy=True).reshape(out, self.scales.shape[1], -1)  # [out, G, gs]
            z = self.zeros.to(torch.float32).unsqueeze(-1)  # [out, G, 1]
            return q.sub_(z).mul_(self.scales.to(torch.float32).unsqueeze(-1)).reshape(out, n_in).to(dtype)
        g = self.group_index()  # [in]
        q = self.qweight.to(torch.float32)
        z = self.zeros.to(torch.float32)[:, g]  # [out, in]
        s = self.scales.to(torch.float32)[:, g]  # [out, in]
        return ((q - z) * s).to(dtype)
