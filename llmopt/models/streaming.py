"""A float model whose weights stay on disk until a part of it is needed: the meta skeleton and its tensors.

`open_streamed` builds the transformers model on the meta device (parameters only: buffers such as rotary tables
are computed for real, as from_pretrained would), checks that every parameter has a tensor of the right shape in
the safetensors shards, and returns a `WeightStream` that fills one module's parameters from the shards
(`load`) and empties them again (`release`). The structural changes quantize makes (Conv1D → Linear, fused MoE
experts → per-expert Linears) are made on the skeleton first; the stream maps each parameter to the tensor the
hub checkpoint stores for it (per-expert names, Conv1D's [in, out] layout), so a loaded part equals the same part
of the model loaded whole, bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmopt.checkpoint.shards import ShardReader
from llmopt.errors import LlmoptError
from llmopt.memory import return_freed_memory


@dataclass(slots=True)
class StreamedModel:
    """What `open_streamed` returns: the meta skeleton, its tokenizer, where it lies, and its shards."""

    model: nn.Module
    tokenizer: object
    path: Path
    reader: ShardReader


def open_streamed(spec, dtype: torch.dtype) -> StreamedModel:
    """The float model named by `spec` (models.ModelSpec) as a meta skeleton in `dtype`, checked like load_model
    checks a model it loads (config, tokenizer, every shard's header and size)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from llmopt.models.loading import check_weights, load_config, load_tokenizer, resolve_path

    path = resolve_path(spec)
    config = load_config(path, spec.trust_remote_code)
    if getattr(config, "quantization_config", None) is not None or (path / "quantize_config.json").exists():
        raise LlmoptError(f"{spec.name} is already quantized: quantize its float original")
    check_weights(path)
    reader = ShardReader(path)
    tokenizer = load_tokenizer(path, spec.trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    model.tie_weights()  # from_pretrained ties a tied head to the embedding; on meta from_config does not
    model.eval()
    return StreamedModel(model, tokenizer, path, reader)


class WeightStream:
    """Fills and empties the parameters of a (transformed) meta skeleton from its hub checkpoint's shards."""

    def __init__(self, model: nn.Module, reader: ShardReader, path: Path) -> None:
        from llmopt.families import linear_like, moe

        self.model, self.reader, self.path = model, reader, path
        self.hub = moe.hub_renamer(model.config)
        self.transposed = {f"{n}.weight" for n, m in model.named_modules() if linear_like.is_converted(m)}
        self.read_seconds = 0.0
        self.read_bytes = 0
        # a tied head reads the embedding's tensor (from_pretrained ties them, whatever else the file holds)
        names = {id(m): n for n, m in model.named_modules()}
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        self.aliases: dict[str, str] = {}
        if head is not None and emb is not None and head.weight is emb.weight:
            self.aliases[f"{names[id(head)]}.weight"] = f"{names[id(emb)]}.weight"
        self._check()

    def _key(self, name: str) -> str:
        """The checkpoint key holding parameter `name`."""
        return self.hub(self.aliases.get(name, name))

    def _check(self) -> None:
        """Every parameter has a tensor of its shape: a mismatch fails here, before any work."""
        missing = []
        for name, p in self.model.named_parameters(remove_duplicate=False):
            key = self._key(name)
            if key not in self.reader:
                missing.append(key)
                continue
            shape = self.reader.entries[key].shape
            want = tuple(reversed(p.shape)) if name in self.transposed else tuple(p.shape)
            if shape != want:
                raise LlmoptError(f"{self.reader.entries[key].file}: tensor {key} has shape {list(shape)}, the "
                                  f"model's config needs {list(want)}: the config and the weights disagree")
        if missing:
            raise LlmoptError(f"{self.path}: no tensor {missing[0]} ({len(missing)} parameters missing) in the "
                              f"shards: streaming reads tensors by the model's own names; use --load memory "
                              f"(transformers renames or converts this checkpoint's keys when it loads it whole)")

    def load(self, prefix: str) -> None:
        """Fill every empty parameter of the module `prefix` (its own dtype; non-float tensors as stored)."""
        t0 = time.perf_counter()
        module = self.model.get_submodule(prefix)
        for sub_name, sub in module.named_modules():
            for pname, p in list(sub._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                full = ".".join(x for x in (prefix, sub_name, pname) if x)
                key = self._key(full)
                t = self.reader.read(key)
                if full in self.transposed:
                    t = t.t().contiguous()
                if t.is_floating_point():
                    if not torch.isfinite(t).all():
                        raise LlmoptError(f"weight {full} contains NaN or Inf: the checkpoint is corrupt; quantize "
                                          f"a valid one")
                    t = t.to(p.dtype)
                sub._parameters[pname] = nn.Parameter(t, requires_grad=False)
                self.read_bytes += self.reader.entries[key].nbytes
        self.read_seconds += time.perf_counter() - t0

    def release(self, prefix: str) -> None:
        """Empty the module's parameters again (meta tensors of the same shape and dtype)."""
        for sub in self.model.get_submodule(prefix).modules():
            for pname, p in list(sub._parameters.items()):
                if p is not None and not p.is_meta:
                    sub._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        return_freed_memory()


__all__ = ["StreamedModel", "WeightStream", "open_streamed"]
