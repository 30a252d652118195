"""The built-in check of every quantized layer: relative output error vs the float layer, and the same for RTN.

RTN at the same bits/group/sym is the reference column of the layer report: a method that does not beat it on a
layer says so there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from llmopt.checkpoint.types import QuantArgs
from llmopt.quant.rtn import fake_quantize_activations, rtn_quantize


class ErrorMeter:
    """Σ‖y − ref‖² and Σ‖ref‖² in float64 → relative error."""

    __slots__ = ("den", "num")

    def __init__(self) -> None:
        self.num = 0.0
        self.den = 0.0

    def add(self, y: torch.Tensor, ref: torch.Tensor) -> None:
        self.num += (y.double() - ref.double()).pow(2).sum().item()
        self.den += ref.double().pow(2).sum().item()

    @property
    def value(self) -> float:
        return math.sqrt(self.num / self.den) if self.den > 0 else 0.0


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], torch.Tensor | None]
                ) -> Iterator[None]:
    """Forward pre-hooks calling fn(name, input); a returned tensor replaces the input."""
    handles = []
    for name, mod in modules.items():
        def hook(_m, args, _name=name):
            y = fn(_name, args[0])
            return None if y is None else (y, *args[1:])
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def act_quant_hooks(modules: dict[str, nn.Module]):
    """Dynamic per-token INT8 activation fake-quantization on these Linears (W8A8 simulation)."""
    return input_hooks(modules, lambda _n, x: fake_quantize_activations(x, 8))


def act_quant(modules: dict[str, nn.Module], act_bits: int | None):
    """The activation simulation of a method with act_bits, else nothing."""
    return act_quant_hooks(modules) if act_bits else contextlib.nullcontext()


@contextlib.contextmanager
def rtn_weights(linears: dict[str, nn.Module], qargs: QuantArgs) -> Iterator[None]:
    """RTN weights swapped into the Linears for the duration; the original weights restored after."""
    saved = {}
    with torch.no_grad():
        for name, lin in linears.items():
            saved[name] = lin.weight.detach().clone()
            lin.weight.copy_(rtn_quantize(lin.weight.float(), qargs).dequantize(lin.weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                linears[name].weight.copy_(w)


def rtn_error(linears: dict[str, nn.Module], qargs: QuantArgs, act_bits: int | None,
              pairs: list[tuple[Callable[[], torch.Tensor], torch.Tensor]]) -> float:
    """Relative error of the module with RTN weights: each pair is (forward on a check input, float output)."""
    meter = ErrorMeter()
    with rtn_weights(linears, qargs), act_quant(linears, act_bits):
        for forward, ref in pairs:
            meter.add(forward(), ref)
    return meter.value


__all__ = ["ErrorMeter", "act_quant", "act_quant_hooks", "input_hooks", "rtn_error", "rtn_weights"]
