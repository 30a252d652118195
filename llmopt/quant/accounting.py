"""Parameter accounting by kind: how many weights of each kind a run quantized, so nothing stays float silently.

Kinds: attention, mlp, experts (routed and shared experts of MoE blocks), router (MoE routing, float by
design), embeddings, head, other (norms, biases: never quantized). A weight matrix is *targeted* when it is a
Linear the run's targets select, or a non-Linear matrix of the attention/mlp/experts kinds that the default
class target `Linear` stands for (e.g. fused expert tensors) and no --ignore pattern names. A targeted kind
left partly float is an error: the run would otherwise ship a checkpoint that is not what was asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from llmopt.errors import LlmoptError
from llmopt.families import moe

KINDS = ("attention", "mlp", "experts", "router", "embeddings", "head", "other")
_MATRIX_KINDS = ("attention", "mlp", "experts")  # what a Linear-like target covers


@dataclass(slots=True)
class KindCount:
    """Parameters of one kind: all of them, the targeted weight matrices, the quantized ones."""

    total: int = 0
    targeted: int = 0
    quantized: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _module_kind(name: str, module: nn.Module, model, routers: set[str]) -> str:
    if module is model.get_output_embeddings():
        return "head"
    if module is model.get_input_embeddings() or isinstance(module, nn.Embedding):
        return "embeddings"
    if any(name == r or name.startswith(r + ".") for r in routers):
        return "router"
    parts = name.split(".")
    if "experts" in parts or any(p.startswith("shared_expert") for p in parts):
        return "experts"
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    return "mlp"


def count_by_kind(model, quantized: set[str], is_target: Callable[[str], bool],
                  is_ignored: Callable[[str, nn.Module], bool], class_target: bool) -> dict[str, KindCount]:
    """Per kind: parameter counts of `model` (quantized: names of the quantized Linears). class_target: the
    targets include the class name Linear, which stands for every Linear-like matrix."""
    routers = set(moe.router_names(model))
    counts = {k: KindCount() for k in KINDS}
    for mod_name, module in model.named_modules():
        module_kind = _module_kind(mod_name, module, model, routers)
        for p_name, p in module.named_parameters(recurse=False):
            kind = "other" if p.dim() < 2 and module_kind not in ("embeddings", "head") else module_kind
            c = counts[kind]
            c.total += p.numel()
            if kind in ("embeddings", "other"):
                continue
            if isinstance(module, nn.Linear):
                targeted = p_name == "weight" and is_target(mod_name)
            else:  # a matrix no per-Linear method sees (fused experts, unknown Linear-like modules)
                targeted = kind in _MATRIX_KINDS and class_target and not is_ignored(mod_name, module)
            if targeted:
                c.targeted += p.numel()
                c.quantized += p.numel() if isinstance(module, nn.Linear) and mod_name in quantized else 0
    return counts


def check_all_targeted_quantized(counts: dict[str, KindCount]) -> None:
    """Raise when a targeted weight kind kept float parameters."""
    for kind, c in counts.items():
        if c.quantized < c.targeted:
            raise LlmoptError(f"{c.targeted - c.quantized} of {c.targeted} targeted {kind} weights would stay "
                              f"float (llmopt cannot quantize their modules for this family): exclude them with "
                              f"--ignore, or use a supported family")
