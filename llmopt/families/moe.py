"""Mixture-of-experts blocks: per-expert Linears, all-expert calibration, and the hub's per-expert names.

transformers 5 keeps the routed experts of Mixtral, Qwen2/3-MoE and DeepSeek-V2/V3 as two fused 3-D parameters
(`experts.gate_up_proj` [E, 2·I, H], `experts.down_proj` [E, H, I]), which no per-Linear quantizer sees.
`unfuse_experts` replaces each such module by `UnfusedExperts`: one `ExpertMLP` per expert holding three
`nn.Linear`s named as the family's hub checkpoints name them (Mixtral `w1`/`w3`/`w2`, the others
`gate_proj`/`up_proj`/`down_proj`), with a forward equal to the fused one. Every per-Linear method (RTN, INT8,
W8A8, GPTQ, AWQ) and the runtime's quantized Linears then apply to experts unchanged.

Calibration (`routing_calibration`): like llm-compressor's `calibrate_all_experts`, every expert runs on every
token of the block's input, so each expert's Linears see statistics even when routing starves it, while the
block's output keeps only the routed tokens' results, weighted as routed: the layer output (and the next layer's
input) is the true-routing one. Routed token counts per expert are recorded for the report.

On disk (`hub_name` / `internal_name`): transformers' own `save_pretrained` writes experts per expert
(`model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight` for Mixtral, `model.layers.{i}.mlp.experts.{j}.
gate_proj.weight` for the others; its conversion mapping merges them back into the fused tensors on load), and
vLLM reads the same names. Quantized checkpoints use that layout, each expert Linear with its format's tensors.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from llmopt.errors import LlmoptError


@dataclass(frozen=True, slots=True)
class MoeLayout:
    """One family's MoE block: per-expert Linear names (hub layout), shared expert, routers, preceding norm."""

    gate: str
    up: str
    down: str
    hub_block: str | None = None  # the block's name on disk when it differs from the module's (Mixtral)
    shared: str | None = None  # shared-expert MLP of the block: reads the same input as the routed experts
    routers: tuple[str, ...] = ("gate",)  # modules of the block that compute routing: kept float
    norm: str = "post_attention_layernorm"  # the decoder layer's norm whose output the block reads


_QWEN_NAMES = ("gate_proj", "up_proj", "down_proj")
LAYOUTS: dict[str, MoeLayout] = {
    "mixtral": MoeLayout("w1", "w3", "w2", hub_block="block_sparse_moe"),
    "qwen2_moe": MoeLayout(*_QWEN_NAMES, shared="shared_expert", routers=("gate", "shared_expert_gate")),
    "qwen3_moe": MoeLayout(*_QWEN_NAMES),
    "deepseek_v2": MoeLayout(*_QWEN_NAMES, shared="shared_experts"),
    "deepseek_v3": MoeLayout(*_QWEN_NAMES, shared="shared_experts"),
}


_USUAL_ROUTERS = ("gate", "router", "shared_expert_gate")


def layout(config) -> MoeLayout | None:
    return LAYOUTS.get(getattr(config, "model_type", ""))


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) · up(x)), its three Linears named as the family's checkpoints name them."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn, names: MoeLayout) -> None:
        super().__init__()
        self.names = (names.gate, names.up, names.down)
        for name, lin in zip(self.names, (gate, up, down), strict=True):
            self.add_module(name, lin)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] → [T, H]
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """The routed experts as a list of ExpertMLPs, called like transformers' fused experts module.

    calibrate_all: every expert runs on every token (statistics for all), the output keeps the routed ones.
    counts: when not None, the tokens seen and those routed to each expert are added to it."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.calibrate_all = False
        self.counts: ExpertCounts | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, K] → Σ_k weight_k · expert_k(x) [T, H]."""
        out = torch.zeros_like(hidden_states)
        if self.counts is not None:
            self.counts.tokens += hidden_states.shape[0]
        for j, expert in enumerate(self):
            tok, slot = torch.where(top_k_index == j)  # [t] routed tokens and which of their k picks is j
            if self.counts is not None:
                self.counts.routed[j] += tok.numel()
            if self.calibrate_all:
                y = expert(hidden_states)[tok]  # [t, H]: every token feeds the statistics, routed ones the output
            elif tok.numel():
                y = expert(hidden_states[tok])
            else:
                continue
            out.index_add_(0, tok, (y * top_k_weights[tok, slot, None]).to(out.dtype))
        return out


def _is_fused(module: nn.Module) -> bool:
    p, d = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(p, nn.Parameter) and isinstance(d, nn.Parameter) and p.dim() == 3 and d.dim() == 3


def _check_fused(name: str, module: nn.Module) -> None:
    """Only the plain layout is unfused exactly: [gate; up] concatenated, [out, in] per expert, no bias,
    act(gate)·up. Anything else (gpt-oss' transposed biased experts, ...) is refused rather than guessed."""
    plain = (not getattr(module, "is_transposed", False) and not getattr(module, "has_bias", False)
             and getattr(module, "is_concatenated", True) and getattr(module, "has_gate", True)
             and not getattr(module, "has_post_expert_norm", False) and hasattr(module, "act_fn"))
    from transformers.integrations.moe import _default_apply_gate

    apply_gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if not plain or apply_gate is not _default_apply_gate:
        raise LlmoptError(f"{name} ({type(module).__name__}) stores its experts in a layout llmopt cannot split "
                          f"exactly: MoE quantization supports {', '.join(LAYOUTS)}")


def _linear(w: torch.Tensor) -> nn.Linear:
    """nn.Linear holding w [out, in] (a meta w gives a meta Linear: the runtime fills it from the checkpoint)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    if w.device.type != "meta":
        with torch.no_grad():
            lin.weight.copy_(w)
    return lin


def unfuse(fused: nn.Module, names: MoeLayout) -> UnfusedExperts:
    """Per-expert Linears with the fused module's weights: gate = gate_up[j, :I], up = gate_up[j, I:]."""
    gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()  # [E, 2I, H], [E, H, I]
    inter = gate_up.shape[1] // 2
    experts = [ExpertMLP(_linear(gate_up[j, :inter]), _linear(gate_up[j, inter:]), _linear(down[j]), fused.act_fn,
                         names) for j in range(gate_up.shape[0])]
    return UnfusedExperts(experts)


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every fused experts module (3-D gate_up_proj and down_proj parameters)."""
    return [(n, m) for n, m in model.named_modules() if _is_fused(m)]


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of `model` by UnfusedExperts (in place); returns their names.

    A family without a LAYOUTS entry keeps its fused experts (no known per-expert checkpoint names): they stay
    float, which quantize's accounting refuses unless --ignore names them (quant/accounting.py)."""
    lay = layout(model.config)
    if lay is None:
        return []
    fused = fused_experts(model)
    for name, module in fused:
        _check_fused(name, module)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, unfuse(module, lay))
    return [n for n, _ in fused]


@dataclass(frozen=True, slots=True)
class MoeBlock:
    """An unfused MoE block inside a decoder layer; names relative to the layer."""

    name: str  # e.g. "mlp"
    experts: UnfusedExperts
    layout: MoeLayout

    def expert_linears(self, j: int) -> tuple[str, str, str]:
        p = f"{self.name}.experts.{j}."
        return p + self.layout.gate, p + self.layout.up, p + self.layout.down


def moe_blocks(layer: nn.Module, config) -> list[MoeBlock]:
    """The unfused MoE blocks of one decoder layer (none in dense layers, e.g. DeepSeek's first layers)."""
    lay = layout(config)
    if lay is None:
        return []
    return [MoeBlock(n.rpartition(".")[0], m, lay) for n, m in layer.named_modules() if isinstance(m, UnfusedExperts)]


def _present(layer: nn.Module, names: list[str]) -> list[str]:
    have = {n for n, _ in layer.named_modules()}
    return [n for n in names if n in have]


def _block_readers(layer: nn.Module, b: MoeBlock) -> list[str]:
    """Modules of block b reading the block input: every expert's gate and up, the shared expert's gate and up,
    the routers."""
    names = [n for j in range(b.experts.num_experts) for n in b.expert_linears(j)[:2]]
    if b.layout.shared:
        names += [f"{b.name}.{b.layout.shared}.gate_proj", f"{b.name}.{b.layout.shared}.up_proj"]
    return _present(layer, names + [f"{b.name}.{r}" for r in b.layout.routers])


def shared_input_groups(layer: nn.Module, config) -> list[tuple[str, ...]]:
    """Modules (relative to the layer) reading one identical input, one tuple per MoE block: under
    calibrate_all every expert sees the whole block input, so one collector serves them all."""
    return [tuple(_block_readers(layer, b)) for b in moe_blocks(layer, config)]


def scale_groups(layer: nn.Module, config) -> list[tuple[str, tuple[str, ...]]]:
    """(preceding op, modules reading its output) for AWQ/SmoothQuant inside MoE blocks, names relative to the
    layer: norm → every expert's gate and up, the shared expert's gate and up, and the routers (kept float: their
    weight columns take the scale too, so routing is unchanged); per expert up → down; shared up → down."""
    out = []
    for b in moe_blocks(layer, config):
        out.append((b.layout.norm, tuple(_block_readers(layer, b))))
        for j in range(b.experts.num_experts):
            _, up, down = b.expert_linears(j)
            out.append((up, (down,)))
        if b.layout.shared:
            s = f"{b.name}.{b.layout.shared}."
            out.append((s + "up_proj", (s + "down_proj",)))
    return out


def router_names(model: nn.Module) -> list[str]:
    """Full names of the routing modules of every MoE block (kept float by default); for a family without a
    LAYOUTS entry, the block's children with the usual router names."""
    lay = layout(model.config)
    routers = lay.routers if lay is not None else _USUAL_ROUTERS
    blocks = [n.rpartition(".")[0] for n, m in model.named_modules() if isinstance(m, UnfusedExperts) or _is_fused(m)]
    have = dict(model.named_modules())
    return [f"{b}.{r}" for b in blocks for r in routers if f"{b}.{r}" in have]


@dataclass(slots=True)
class ExpertCounts:
    """Tokens one MoE block saw, and how many of them were routed to each expert."""

    routed: torch.Tensor  # [E] int64
    tokens: int = 0


@dataclass(slots=True)
class RoutingStats:
    """Routing during one calibration pass, per MoE block (name relative to the decoder layer)."""

    blocks: dict[str, ExpertCounts] = field(default_factory=dict)

    def report(self, top_k: int | None, statistics: bool) -> dict:
        """JSON-ready: tokens routed to each expert, the starved ones (none routed), and where each expert's
        statistics came from (statistics=False: a data-free method, which uses none)."""
        blocks = {}
        for name, c in self.blocks.items():
            routed = c.routed.tolist()
            blocks[name] = {"tokens": c.tokens, "routed_tokens": routed,
                            "starved": [j for j, n in enumerate(routed) if n == 0]}
        how = "all tokens through every expert" if statistics else "none (data-free method)"
        return {"top_k": top_k, "statistics": how, "blocks": blocks}


@contextlib.contextmanager
def routing_calibration(layer: nn.Module, config) -> Iterator[RoutingStats | None]:
    """Inside: every expert of the layer runs on every token (statistics), outputs keep the true routing, and
    routed tokens are counted. Yields None for a layer without MoE blocks."""
    blocks = moe_blocks(layer, config)
    if not blocks:
        yield None
        return
    stats = RoutingStats({b.name: ExpertCounts(torch.zeros(b.experts.num_experts, dtype=torch.int64))
                          for b in blocks})
    for b in blocks:
        b.experts.calibrate_all, b.experts.counts = True, stats.blocks[b.name]
    try:
        yield stats
    finally:
        for b in blocks:
            b.experts.calibrate_all, b.experts.counts = False, None


def _rename(config, to_hub: bool):
    lay = layout(config)
    if lay is None or lay.hub_block is None:
        return lambda name: name
    ours, hub = r"(\.layers\.\d+\.)mlp\.", r"(\.layers\.\d+\.)" + re.escape(lay.hub_block) + r"\."
    pattern, repl = (ours, rf"\g<1>{lay.hub_block}.") if to_hub else (hub, r"\g<1>mlp.")
    rx = re.compile(pattern)
    return lambda name: rx.sub(repl, name, count=1)


def hub_renamer(config):
    """name → hub name for every module or tensor of the (unfused) model (identity for most families)."""
    return _rename(config, to_hub=True)


def internal_renamer(config):
    """hub checkpoint name → module or tensor name in the transformers model."""
    return _rename(config, to_hub=False)
