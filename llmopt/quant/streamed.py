"""Quantize a model that stays on disk: the walk's parts stream in from the float shards and out to the
checkpoint's shards, one decoder layer in memory at a time (quant/api.py chooses this with --load).

`StreamedCheckpoint` is the walk's PartSource (quant/walk.py): the embeddings and the small decoder parts are
loaded for the capture of the first layer's inputs and the embeddings written and dropped after it; each layer is
loaded when the walk reaches it and, once quantized, written in the format's layout and dropped; at the end the
rest (final norm, a float head) is written, then the config. The tensors written are the ones the in-memory path
writes (formats.checkpoint_tensors on the same modules), so both checkpoints hold the same codes.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from llmopt.checkpoint import formats
from llmopt.checkpoint.shards import ShardWriter
from llmopt.checkpoint.types import QuantArgs, QuantizedWeight
from llmopt.families import registry
from llmopt.models.streaming import WeightStream


def _stub(qw: QuantizedWeight) -> QuantizedWeight:
    """The codes' names and settings without their tensors (meta), for the config written at the end; g_idx
    stays (GPTQ's config reads whether it is trivial)."""
    def meta(t):
        return None if t is None else torch.empty_like(t, device="meta")
    return dataclasses.replace(qw, qweight=meta(qw.qweight), scales=meta(qw.scales), zeros=meta(qw.zeros),
                               bias=meta(qw.bias))


class StreamedCheckpoint:
    """PartSource of the walk for a streamed model, writing the checkpoint `fmt` into the directory `out`."""

    def __init__(self, model: nn.Module, stream: WeightStream, fmt: str, out: Path, evaluator=None) -> None:
        self.model, self.stream, self.fmt, self.out = model, stream, fmt, Path(out)
        self.evaluator = evaluator  # quant/streamed_eval.StreamedEval, or None without --evaluate
        self.writer = ShardWriter(self.out)
        names = {id(m): n for n, m in model.named_modules()}
        decoder, layers, self.layers_prefix = registry.decoder_layers(model)
        # the decoder's small parts (embeddings, rotary tables, final norm) that the capture runs on the device
        self.small = [names[id(c)] for c in decoder.children() if c is not layers]
        self.embedding = names[id(model.get_input_embeddings())]
        head = model.get_output_embeddings()
        self.head = None if head is None else names[id(head)]
        self.written: list[str] = []  # module prefixes whose tensors are in the shards
        self.write_seconds = 0.0  # writing the parts during the walk

    def before_capture(self) -> None:
        for name in self.small:
            self.stream.load(name)

    def after_capture(self) -> None:
        if self.evaluator is not None:
            self.evaluator.capture()
        self._write(self.embedding, {})

    def load(self, name: str) -> None:
        self.stream.load(name)
        if self.evaluator is not None:
            if name == self.head:
                self.evaluator.keep_head("float", self.model.get_submodule(name))
            else:
                self.evaluator.float_layer(self.model.get_submodule(name))

    def done(self, name: str, codes: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
        if self.evaluator is not None:
            module = self.model.get_submodule(name)
            if name == self.head:
                self.evaluator.keep_head("quant", module)
            else:
                self.evaluator.quant_layer(module, {n: self.model.get_submodule(n) for n in codes})
        self._write(name, codes)
        return {n: _stub(qw) for n, qw in codes.items()}

    def _write(self, prefix: str, codes: dict[str, QuantizedWeight]) -> None:
        """The module's tensors (its codes in the format's layout) into the shards; then drop them."""
        t0 = time.perf_counter()
        self.writer.add_all(formats.checkpoint_tensors(self.fmt, self.model, codes,
                                                       keep=lambda key: key.startswith(prefix + ".")))
        self.written.append(prefix)
        self.stream.release(prefix)
        self.write_seconds += time.perf_counter() - t0

    def finish(self, qweights: dict[str, QuantizedWeight], quant_args: QuantArgs, method: str,
               kv_scales) -> dict | None:
        """The rest of the model (what no part wrote: final norm, a float head, ...), the KV scales, the shard
        names and index, then config.json; with an evaluator, the quality table ({"float", "quantized"})."""
        done = (self.layers_prefix, *self.written)

        def rest(key: str) -> bool:
            return not any(key.startswith(p + ".") for p in done) and key not in self.stream.aliases

        owners = {key.rpartition(".")[0] for key, _ in self.model.named_parameters(remove_duplicate=False)
                  if rest(key)}
        for owner in sorted(owners):
            self.stream.load(owner)
        self.writer.add_all(formats.checkpoint_tensors(self.fmt, self.model, {}, keep=rest))
        self.writer.add_all(formats.kv_scale_tensors(self.fmt, self.model, kv_scales))
        self.writer.close()
        formats.write_config(self.fmt, self.model, qweights, self.out, quant_args, method, kv_scales)
        if self.evaluator is None:
            return None
        self.stream.load(self.embedding)  # the head-only forward looks the tokens up (its output is replaced)
        for key, source in self.stream.aliases.items():  # a float tied head reads the embedding's tensor
            owner, _, pname = key.rpartition(".")
            module = self.model.get_submodule(owner)
            if module._parameters[pname].is_meta:
                module._parameters[pname] = self.model.get_parameter(source)
        quality = self.evaluator.result()
        self.stream.release("")
        return quality


__all__ = ["StreamedCheckpoint"]
