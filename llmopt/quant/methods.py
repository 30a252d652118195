"""One object per quantization method: its settings rules, what it collects, its scales, how it quantizes.

The layer walk (quant/walk.py) never asks which method it runs; it calls these hooks. The tensor maths stays in the
pure cores (rtn.py, gptq.py, awq.py, smoothquant.py). To add a method: one class here, registered in METHODS.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import nn

from llmopt.checkpoint.types import QuantArgs, QuantizedWeight
from llmopt.families.registry import ScaleGroup
from llmopt.quant import awq as awq_core
from llmopt.quant.gptq import HessianAccumulator, gptq_quantize
from llmopt.quant.rtn import rtn_quantize
from llmopt.quant.smoothquant import ActMaxAccumulator, smooth_scales, w8a8_quantize


class Collector(Protocol):
    """Statistics of one Linear input, fed batch by batch (x [B, L, in])."""

    def add(self, x: torch.Tensor) -> None: ...


class Method:
    """RTN: round-to-nearest per group, data-free; the reference every other method is checked against."""

    name: ClassVar[str] = "rtn"
    bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)  # --bits it accepts
    default_bits: ClassVar[int] = 4
    default_group_size: ClassVar[int] = 128
    default_sym: ClassVar[bool] = True
    symmetric_only: ClassVar[bool] = False
    folds_scales: ClassVar[bool] = False  # folds per-input-channel scales (needs the family registry's mappings)
    # calibrate every layer on the float model's activations, as AWQ/SmoothQuant's reference implementations do
    # (their scales keep the float function unchanged); the others on the quantized model's
    float_inputs: ClassVar[bool] = False
    act_bits: ClassVar[int | None] = None  # dynamic per-token activation quantization (W8A8)
    is_reference: ClassVar[bool] = True  # its own RTN reference: the check needs no second RTN run
    sequential_within_layer: ClassVar[bool] = False  # GPTQ: Hessians on inputs through the quantized groups
    data_free: ClassVar[bool] = True  # needs no calibration data (the per-layer check is then optional)

    def __init__(self, qargs: QuantArgs, total_tokens: int) -> None:
        self.qargs = qargs
        self.total_tokens = total_tokens  # calibration tokens (AWQ sizes its sample from it)

    def collector(self, n_in: int, device: torch.device) -> Collector | None:
        """A fresh collector for a Linear input of n_in features; None when the method is data-free."""
        return None

    def scales(self, layer: nn.Module, group: ScaleGroup, names: list[str], linears: dict[str, nn.Module],
               stat) -> tuple[torch.Tensor, dict]:
        """Per-input-channel scales s [in] to fold through `group`, and what to report (folds_scales only)."""
        raise NotImplementedError(f"{self.name} folds no scales")

    def quantize(self, names: list[str], linears: dict[str, nn.Module], stat,
                 folded: torch.Tensor | None) -> dict[str, QuantizedWeight]:
        """Codes of the Linears `names` reading one input (stat: its collector; folded: the scales s already
        folded into them, else None)."""
        return {name: rtn_quantize(linears[name].weight.detach().float(), self.qargs) for name in names}


class Int8(Method):
    """INT8 weight-only: RTN at 8 bits, per output channel."""

    name = "int8"
    bits = (8,)
    default_bits = 8
    default_group_size = -1
    symmetric_only = True
    is_reference = False


class SmoothQuant(Method):
    """W8A8: SmoothQuant's activation→weight scale migration, INT8 weights and dynamic per-token INT8 activations."""

    name = "w8a8"
    bits = (8,)
    default_bits = 8
    default_group_size = -1
    symmetric_only = True
    folds_scales = True
    float_inputs = True
    act_bits = 8
    is_reference = False
    data_free = False

    def collector(self, n_in: int, device: torch.device) -> Collector | None:
        return ActMaxAccumulator(n_in, device)

    def scales(self, layer, group, names, linears, stat):
        weights = [layer.get_submodule(n).weight for n in group.linears]
        return smooth_scales(stat.amax, weights, self.qargs.smoothquant_alpha), {}

    def quantize(self, names, linears, stat, folded):
        return {name: w8a8_quantize(linears[name].weight.detach().float(), self.qargs) for name in names}


STACK_ROWS = 1 << 15  # most rows GPTQ stacks at once: all of an MoE block's experts read one input


class Gptq(Method):
    """GPTQ: column-by-column rounding with the inverse-Hessian error update, on the quantized model's inputs."""

    name = "gptq"
    is_reference = False
    data_free = False
    sequential_within_layer = True

    def collector(self, n_in: int, device: torch.device) -> Collector | None:
        return HessianAccumulator(n_in, device)

    def quantize(self, names, linears, stat, folded):
        hessian = stat.hessian()  # [in, in]
        codes: dict[str, QuantizedWeight] = {}
        chunks = row_chunks(names, linears)
        for k, chunk in enumerate(chunks):
            codes.update(self._stacked(chunk, linears, hessian, last=k == len(chunks) - 1))
        return codes

    def _stacked(self, names: list[str], linears: dict[str, nn.Module], hessian: torch.Tensor, last: bool
                 ) -> dict[str, QuantizedWeight]:
        """GPTQ of Linears sharing an input as ONE stacked matrix: rows are independent given H, so stacking
        q/k/v (gate/up) gives the same codes with one factorisation and one column loop instead of three.
        The last chunk lets GPTQ overwrite the Hessian instead of copying it."""
        w = torch.cat([linears[n].weight.detach().float() for n in names])  # [Σout, in]
        stacked = gptq_quantize(w, hessian, self.qargs, consume_h=last)
        codes: dict[str, QuantizedWeight] = {}
        start = 0
        for n in names:
            rows = slice(start, start + linears[n].out_features)
            start = rows.stop
            g_idx = None if stacked.g_idx is None else stacked.g_idx.clone()
            codes[n] = QuantizedWeight(stacked.qweight[rows].clone(), stacked.scales[rows].clone(),
                                       stacked.zeros[rows].clone(), g_idx, stacked.bits, stacked.group_size,
                                       stacked.sym)
        return codes


def row_chunks(names: list[str], linears: dict[str, nn.Module]) -> list[list[str]]:
    """Consecutive runs of `names` of at most STACK_ROWS output rows (at least one Linear each): Mixtral-8x7B's
    16 expert gate/up matrices stacked whole would be a 3.7 GB float32 matrix, copied several times by GPTQ."""
    chunks: list[list[str]] = [[]]
    rows = 0
    for n in names:
        if chunks[-1] and rows + linears[n].out_features > STACK_ROWS:
            chunks.append([])
            rows = 0
        chunks[-1].append(n)
        rows += linears[n].out_features
    return chunks


class Awq(Method):
    """AWQ: activation-aware per-channel scale search, then clipped RTN of the scaled weights."""

    name = "awq"
    bits = (4,)  # its search and formats target 4-bit
    default_sym = False
    folds_scales = True
    float_inputs = True
    is_reference = False
    data_free = False

    def collector(self, n_in: int, device: torch.device) -> Collector | None:
        return awq_core.AwqStats(n_in, self.qargs.group_size, self.total_tokens, device)

    def scales(self, layer, group, names, linears, stat):
        s, alpha, loss, rtn_loss = awq_core.search_scales(stat.tokens(), stat.mean_abs(),
                                                          [linears[n].weight for n in names], self.qargs)
        return s, {group.prev: {"alpha": alpha, "loss_vs_rtn": loss / rtn_loss if rtn_loss > 0 else 1.0}}

    def quantize(self, names, linears, stat, folded):
        gram = stat.gram_blocks()  # [G, gs, gs] of the unscaled input, shared by the group
        if folded is not None:  # the Linears now read x / s
            s_groups = folded.view(gram.shape[0], -1)  # [G, gs]
            gram = gram / (s_groups.unsqueeze(2) * s_groups.unsqueeze(1))
        return {name: awq_core.awq_quantize(linears[name].weight.detach().float(), gram, self.qargs)
                for name in names}


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Method, Int8, SmoothQuant, Gptq, Awq)}


def method_class(name: str) -> type[Method]:
    return METHODS[name]


__all__ = ["METHODS", "Collector", "Method", "method_class", "row_chunks"]
