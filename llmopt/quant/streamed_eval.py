"""The quality table of a streamed quantization: float vs quantized on the eval windows, one layer in memory.

Neither model is ever whole. The eval windows' first-layer inputs are captured with the calibration's; each
decoder layer then runs on the float model's hidden states right after it is loaded (float weights), and on the
quantized model's right after it is quantized (its dequantized weights, with W8A8's activation quantization, as
the per-layer check runs it). At the end the model's own forward without its decoder layers (its final norm
reading the hidden states computed here) gives each model's logits batch by batch, so the family's head logic
(logit softcapping, scaling) is the model's, and evaluate/quality.QualityMeter scores them as the in-memory
evaluation does. Reported as evaluated_with "streamed" (the in-memory path reloads the written checkpoint through
llmopt's runtime instead: same weights, other kernels).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from llmopt.errors import LlmoptError
from llmopt.families import registry
from llmopt.quant.reference import act_quant
from llmopt.quant.walk import capture_inputs, layer_out


@contextlib.contextmanager
def head_only(model: nn.Module):
    """Within: model(input_ids) skips the decoder layers and its final norm reads slot["hidden"] [B, L, H]."""
    decoder, layers, prefix = registry.decoder_layers(model)
    attr = prefix.rpartition(".")[2]
    norm = registry.final_norm(model)
    if norm is None:
        raise LlmoptError(f"cannot evaluate a streamed {model.config.model_type!r} model: the norm before its head "
                          f"is unknown; pass --no-evaluate")
    slot: dict[str, torch.Tensor] = {}

    def replace(_mod, args, kwargs):
        return (slot["hidden"], *args[1:]), kwargs

    setattr(decoder, attr, nn.ModuleList())
    handle = norm.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        yield slot
    finally:
        handle.remove()
        setattr(decoder, attr, layers)


class StreamedEval:
    """Float and quantized hidden states of the eval windows, carried through the streamed walk."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, device: torch.device, act_bits: int | None,
                 batch_size: int = 4) -> None:
        self.model, self.windows, self.device, self.act_bits = model, windows, device, act_bits
        self.batch_size = batch_size
        self.kwargs: list[dict] = []  # per batch: the decoder layer's keyword arguments (masks, positions)
        self.float_h: list[torch.Tensor] = []  # [B, L, H] per batch
        self.quant_h: list[torch.Tensor] = []
        self.heads: dict[str, torch.Tensor] = {}  # a quantized head's float and dequantized weights
        self.seconds = 0.0

    @torch.no_grad()
    def capture(self) -> None:
        """The first layer's inputs of the eval windows (the embeddings and small parts are loaded)."""
        batches = capture_inputs(self.model, self.windows, self.batch_size, self.device)
        self.kwargs = [kw for _, kw in batches]
        self.float_h = [x for x, _ in batches]
        self.quant_h = list(self.float_h)

    @torch.no_grad()
    def float_layer(self, layer: nn.Module) -> None:
        t0 = time.perf_counter()
        layer.to(self.device)
        self.float_h = [layer_out(layer(x, **kw)) for x, kw in zip(self.float_h, self.kwargs, strict=True)]
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def quant_layer(self, layer: nn.Module, linears: dict[str, nn.Module]) -> None:
        t0 = time.perf_counter()
        layer.to(self.device)
        with act_quant(linears, self.act_bits):
            self.quant_h = [layer_out(layer(x, **kw)) for x, kw in zip(self.quant_h, self.kwargs, strict=True)]
        self.seconds += time.perf_counter() - t0

    def keep_head(self, which: str, head: nn.Linear) -> None:
        """A quantized head: its float weight when loaded ("float"), its dequantized one when done ("quant")."""
        self.heads[which] = head.weight.detach().clone()

    @torch.inference_mode()
    def result(self) -> dict:
        """{"float": Quality dict, "quantized": Quality dict} (embeddings, final norm and head loaded; a quantized
        head holds its dequantized weight)."""
        from llmopt.evaluate.quality import QualityMeter

        t0 = time.perf_counter()
        self.model._apply(lambda t: t if t.is_meta else t.to(self.device))  # the loaded parts; layers are empty
        head = self.model.get_output_embeddings()
        loaded = head.weight
        weights = {which: nn.Parameter(self.heads[which].to(self.device), requires_grad=False) if self.heads
                   else loaded for which in ("float", "quant")}
        float_meter, quant_meter = QualityMeter(), QualityMeter()
        with head_only(self.model) as slot:
            start = 0
            for fh, qh in zip(self.float_h, self.quant_h, strict=True):
                x = self.windows[start:start + fh.shape[0]].to(self.device)
                start += fh.shape[0]
                logits = {}
                for which, hidden in (("float", fh), ("quant", qh)):
                    head.weight = weights[which]
                    slot["hidden"] = hidden
                    logits[which] = self.model(input_ids=x).logits[:, :-1].double().cpu().flatten(0, 1)
                targets = x[:, 1:].cpu().flatten()
                float_meter.add(logits["float"], targets)
                quant_meter.add(logits["quant"], targets, logits["float"])
        head.weight = loaded
        self.model._apply(lambda t: t if t.is_meta else t.cpu())
        self.seconds += time.perf_counter() - t0
        return {"float": float_meter.result().to_dict(), "quantized": quant_meter.result().to_dict()}


__all__ = ["StreamedEval", "head_only"]
