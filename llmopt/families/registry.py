"""One entry per architecture (transformers `model_type`): where the decoder layers are, which Linears read one
identical input (GPTQ builds one Hessian for them), and the scale-migration mappings AWQ and SmoothQuant fold
per-input-channel scales s through.

A fold multiplies the readers' input columns by s and divides the op producing their input by s, so the float
function is unchanged (tests/families/test_family_quantize.py checks every entry in float64):
- RMSNorm / LayerNorm y = x̂·w (+ b): w / s and b / s (a LayerNorm's bias is part of its output);
- Gemma's norms y = x̂·(1 + w): (1 + w') = (1 + w) / s, i.e. w' = (1 + w) / s − 1 (`ScaleGroup.offset` = 1);
- a Linear (v → o, up → down, OPT's fc1 → fc2): its output rows (and bias) / s. Through attention this is exact
  for v (the attention output is a convex combination of v rows, per channel) but only without GQA: with GQA
  one v row feeds several o columns, which would then need one scale. Through a gated MLP act(gate)·up it is
  exact for up; through ReLU (OPT) it is exact for fc1 because relu(z / s) = relu(z) / s for s > 0; through
  GELU (phi, gpt_neox, falcon, gpt2, starcoder2) it is not: AutoAWQ inserts a `ScaledActivation` module there,
  which changes the model's module tree (no stock loader knows it), so llmopt skips that fold and records it.
- Fused projections fold through a row subset: the v rows of a fused qkv (Phi-3's [q; k; v], GPT-2's [q; k; v],
  GPT-NeoX's and Falcon's per-head [q, k, v]) and the up half of Phi-3's gate_up_proj ([gate; up]).
Post-norm layers (OLMo-2, EXAONE-4: the norms sit on the sublayers' outputs) have no norm → input fold: q/k/v
and gate/up are quantized without migrated scales, recorded as skipped. An architecture without an entry gets
GPTQ/RTN/INT8 on every Linear-like module; AWQ and W8A8 refuse it (`require`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from llmopt.errors import LlmoptError
from llmopt.families import moe

SCALE_METHODS = ("awq", "w8a8")  # methods that need this registry's scale mappings
ALL_METHODS = ("rtn", "int8", "gptq", "awq", "w8a8")


@dataclass(frozen=True, slots=True, eq=False)
class ScaleGroup:
    """Linears (names relative to the decoder layer) that read the output of `prev`.

    rows: the output rows of a Linear `prev` that are the readers' input channels, in order (None: all of them).
    offset: a norm `prev` computes x̂·(offset + w) (Gemma: 1)."""

    prev: str
    linears: tuple[str, ...]
    rows: torch.Tensor | None = None  # [C] int64
    offset: float = 0.0

    def to_dict(self) -> dict:
        d: dict = {"prev": self.prev, "linears": list(self.linears)}
        if self.rows is not None:
            d["prev_rows"] = f"{self.rows.numel()} of the output rows"
        if self.offset:
            d["norm"] = f"x̂·({self.offset:g} + w)"
        return d


@dataclass(frozen=True, slots=True)
class SkippedFold:
    """A producer → readers pair that cannot take a scale exactly, and why (recorded in llmopt.json)."""

    prev: str
    linears: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict:
        return {"prev": self.prev, "linears": list(self.linears), "reason": self.reason}


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """One decoder layer: Linears sharing one input, the foldable groups, the skipped ones."""

    inputs: tuple[tuple[str, ...], ...] = ()
    scales: tuple[ScaleGroup, ...] = ()
    skipped: tuple[SkippedFold, ...] = ()

    def to_dict(self) -> dict:
        return {"shared_inputs": [list(g) for g in self.inputs], "scale_groups": [g.to_dict() for g in self.scales],
                "skipped": [s.to_dict() for s in self.skipped]}


PlanFn = Callable[[nn.Module, object], LayerPlan]


@dataclass(frozen=True, slots=True)
class Family:
    """What llmopt knows about one architecture."""

    model_type: str
    layers: str  # the decoder-layer ModuleList, from the causal LM (e.g. "model.layers")
    final_norm: str  # the norm before the output head, from the causal LM
    plan: PlanFn = field(repr=False)


class _Plan:
    """Builder: adds groups for the modules a layer really has (names relative to the layer)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.have = {n for n, _ in layer.named_modules()}
        self.inputs: list[tuple[str, ...]] = []
        self.scales: list[ScaleGroup] = []
        self.skipped: list[SkippedFold] = []

    def readers(self, prev: str | None, linears: tuple[str, ...], offset: float = 0.0, fold: bool = True,
                reason: str = "") -> _Plan:
        """`linears` read one identical input, produced by the norm `prev` (None: the raw residual stream)."""
        linears = tuple(n for n in linears if n in self.have)
        if not linears:
            return self
        self.inputs.append(linears)
        if prev is None:
            self.skipped.append(SkippedFold("(residual stream)", linears, reason))
        elif fold and prev in self.have:
            self.scales.append(ScaleGroup(prev, linears, offset=offset))
        else:
            self.skipped.append(SkippedFold(prev, linears, reason))
        return self

    def linear_fold(self, prev: str, reader: str, rows: torch.Tensor | None = None, reason: str = "") -> _Plan:
        """Fold through the Linear `prev` (rows: its output rows that are `reader`'s input), or record why not."""
        if prev not in self.have or reader not in self.have:
            return self
        n_in = self.layer.get_submodule(reader).weight.shape[1]
        n_rows = self.layer.get_submodule(prev).weight.shape[0] if rows is None else rows.numel()
        if reason:
            self.skipped.append(SkippedFold(prev, (reader,), reason))
        elif n_rows != n_in:
            self.skipped.append(SkippedFold(prev, (reader,), f"grouped-query attention: {n_rows} v channels feed "
                                                             f"{n_in} {reader} columns"))
        else:
            self.scales.append(ScaleGroup(prev, (reader,), rows))
        return self

    def build(self) -> LayerPlan:
        return LayerPlan(tuple(self.inputs), tuple(self.scales), tuple(self.skipped))


_GELU = "not exact through {act} (act(z / s) ≠ act(z) / s); AutoAWQ inserts a ScaledActivation module here, which " \
        "the architecture's transformers and vLLM modules do not have: skipped"
_POST_NORM = "post-norm layer: the norms sit on the sublayer outputs, nothing scales this input"
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def _heads(config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dim)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _per_head_v_rows(heads: int, head_dim: int) -> torch.Tensor:
    """v rows of a fused qkv laid out per head as [q, k, v] (GPT-NeoX, Falcon without GQA): [heads·head_dim]."""
    base = torch.arange(heads) * 3 * head_dim + 2 * head_dim  # [heads] first v row of each head
    return (base[:, None] + torch.arange(head_dim)).reshape(-1)


def _llama_like(layer: nn.Module, config, offset: float = 0.0, mlp_norm: str = "post_attention_layernorm",
                parallel: bool = False) -> _Plan:
    """input_layernorm → q,k,v; v → o; mlp_norm → gate,up; up → down.
    parallel: one norm (input_layernorm) feeds attention and MLP."""
    p = _Plan(layer)
    if parallel:
        p.readers("input_layernorm", _QKV + _GATE_UP, offset)
    else:
        p.readers("input_layernorm", _QKV, offset)
        p.readers(mlp_norm, _GATE_UP, offset)
    p.linear_fold("self_attn.v_proj", "self_attn.o_proj")
    return p.linear_fold("mlp.up_proj", "mlp.down_proj")


def _llama(layer: nn.Module, config) -> LayerPlan:
    return _llama_like(layer, config).build()


def _gemma(layer: nn.Module, config) -> LayerPlan:
    return _llama_like(layer, config, offset=1.0).build()


def _gemma2(layer: nn.Module, config) -> LayerPlan:
    """post_attention_layernorm / post_feedforward_layernorm normalise the sublayer outputs: nothing to fold."""
    return _llama_like(layer, config, offset=1.0, mlp_norm="pre_feedforward_layernorm").build()


def _post_norm(layer: nn.Module, config) -> LayerPlan:
    """OLMo-2, EXAONE-4: x + norm(attn(x)); only v → o and up → down fold."""
    p = _Plan(layer).readers(None, _QKV, reason=_POST_NORM).readers(None, _GATE_UP, reason=_POST_NORM)
    p.linear_fold("self_attn.v_proj", "self_attn.o_proj")
    return p.linear_fold("mlp.up_proj", "mlp.down_proj").build()


def _stablelm(layer: nn.Module, config) -> LayerPlan:
    return _llama_like(layer, config, parallel=bool(getattr(config, "use_parallel_residual", False))).build()


def _cohere(layer: nn.Module, config) -> LayerPlan:
    return _llama_like(layer, config, parallel=True).build()


def _phi(layer: nn.Module, config) -> LayerPlan:
    """Parallel block: input_layernorm → q,k,v,fc1; v → dense; fc1 → fc2 through GELU skipped."""
    p = _Plan(layer).readers("input_layernorm", (*_QKV, "mlp.fc1"))
    p.linear_fold("self_attn.v_proj", "self_attn.dense")
    return p.linear_fold("mlp.fc1", "mlp.fc2", reason=_GELU.format(act=config.hidden_act)).build()


def _phi3(layer: nn.Module, config) -> LayerPlan:
    """Fused qkv_proj [q; k; v] and gate_up_proj [gate; up]: v → o through the last rows, up → down through
    the second half."""
    heads, kv, head_dim = _heads(config)
    p = _Plan(layer).readers("input_layernorm", ("self_attn.qkv_proj",))
    p.readers("post_attention_layernorm", ("mlp.gate_up_proj",))
    q_rows = heads * head_dim
    p.linear_fold("self_attn.qkv_proj", "self_attn.o_proj",
                  torch.arange(q_rows + kv * head_dim, q_rows + 2 * kv * head_dim))
    inter = layer.get_submodule("mlp.down_proj").weight.shape[1]
    return p.linear_fold("mlp.gate_up_proj", "mlp.down_proj", torch.arange(inter, 2 * inter)).build()


def _gpt_neox(layer: nn.Module, config) -> LayerPlan:
    """input_layernorm → query_key_value; post_attention_layernorm → dense_h_to_4h (with or without the parallel
    residual each norm feeds only its sublayer); per-head v rows → dense; GELU MLP skipped."""
    heads, _, head_dim = _heads(config)
    p = _Plan(layer).readers("input_layernorm", ("attention.query_key_value",))
    p.readers("post_attention_layernorm", ("mlp.dense_h_to_4h",))
    p.linear_fold("attention.query_key_value", "attention.dense", _per_head_v_rows(heads, head_dim))
    return p.linear_fold("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", reason=_GELU.format(act=config.hidden_act)).build()


def _falcon(layer: nn.Module, config) -> LayerPlan:
    """new_decoder_architecture with two norms: ln_attn → query_key_value, ln_mlp → dense_h_to_4h; one norm with
    parallel attention: input_layernorm → both; sequential: input_layernorm → qkv,
    post_attention_layernorm → MLP."""
    p = _Plan(layer)
    qkv, up = "self_attention.query_key_value", "mlp.dense_h_to_4h"
    if "ln_attn" in p.have:
        p.readers("ln_attn", (qkv,)).readers("ln_mlp", (up,))
    elif "post_attention_layernorm" in p.have:
        p.readers("input_layernorm", (qkv,)).readers("post_attention_layernorm", (up,))
    else:
        p.readers("input_layernorm", (qkv, up))
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    new, mq = getattr(config, "new_decoder_architecture", False), getattr(config, "multi_query", False)
    kv = config.num_kv_heads if (new or not mq) else 1
    if kv == heads:  # every layout without GQA/MQA is per head [q, k, v]
        p.linear_fold(qkv, "self_attention.dense", _per_head_v_rows(heads, head_dim))
    else:
        p.skipped.append(SkippedFold(qkv, ("self_attention.dense",),
                                     f"grouped-query attention: {kv} kv heads for {heads} heads"))
    return p.linear_fold(up, "mlp.dense_4h_to_h", reason=_GELU.format(act="gelu")).build()


def _opt(layer: nn.Module, config) -> LayerPlan:
    """self_attn_layer_norm → q,k,v; v → out_proj; final_layer_norm → fc1; fc1 → fc2 (ReLU is positively
    homogeneous: exact, as AutoAWQ folds it). do_layer_norm_before=False (OPT-350m) is post-norm."""
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    pre = getattr(config, "do_layer_norm_before", True)
    p = _Plan(layer)
    p.readers("self_attn_layer_norm", attn, fold=pre, reason=_POST_NORM)
    p.readers("final_layer_norm", ("fc1",), fold=pre, reason=_POST_NORM)
    p.linear_fold("self_attn.v_proj", "self_attn.out_proj")
    relu = getattr(config, "activation_function", "relu") == "relu"
    return p.linear_fold("fc1", "fc2", reason="" if relu else _GELU.format(act=config.activation_function)).build()


def _gpt2(layer: nn.Module, config) -> LayerPlan:
    """ln_1 → c_attn [q; k; v]; v rows → attn.c_proj; ln_2 → c_fc; c_fc → mlp.c_proj through GELU skipped.
    (GPT-2's Conv1D modules are converted to nn.Linear first: families/linear_like.py.)"""
    hidden = config.hidden_size
    p = _Plan(layer).readers("ln_1", ("attn.c_attn",)).readers("ln_2", ("mlp.c_fc",))
    p.linear_fold("attn.c_attn", "attn.c_proj", torch.arange(2 * hidden, 3 * hidden))
    return p.linear_fold("mlp.c_fc", "mlp.c_proj", reason=_GELU.format(act=config.activation_function)).build()


def _starcoder2(layer: nn.Module, config) -> LayerPlan:
    p = _Plan(layer).readers("input_layernorm", _QKV).readers("post_attention_layernorm", ("mlp.c_fc",))
    p.linear_fold("self_attn.v_proj", "self_attn.o_proj")
    return p.linear_fold("mlp.c_fc", "mlp.c_proj", reason=_GELU.format(act=config.hidden_act)).build()


def _mla(p: _Plan) -> None:
    """DeepSeek-V2/V3 latent attention, as llm-compressor maps it: input_layernorm → q_proj (or q_a_proj) and
    kv_a_proj_with_mqa; q_a_layernorm → q_b_proj; kv_a_layernorm → kv_b_proj. No v → o: kv_b_proj's rows
    interleave keys and values per head."""
    q = "self_attn.q_a_proj" if "self_attn.q_a_proj" in p.have else "self_attn.q_proj"
    p.readers("input_layernorm", (q, "self_attn.kv_a_proj_with_mqa"))
    p.readers("self_attn.q_a_layernorm", ("self_attn.q_b_proj",))
    p.readers("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",))
    p.skipped.append(SkippedFold("self_attn.kv_b_proj", ("self_attn.o_proj",),
                                 "kv_b_proj's rows interleave keys and values per head"))


def _moe(layer: nn.Module, config) -> LayerPlan:
    """Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3: attention as Llama (or MLA); an MoE block as families/moe.py maps it
    (norm → every expert's gate/up, the shared expert's and the routers'; per expert up → down); a dense layer
    (DeepSeek's first layers, Qwen-MoE's mlp_only_layers) as Llama."""
    blocks = moe.moe_blocks(layer, config)
    if getattr(config, "model_type", "") in ("deepseek_v2", "deepseek_v3"):
        p = _Plan(layer)
        _mla(p)
        if not blocks:
            p.readers("post_attention_layernorm", _GATE_UP).linear_fold("mlp.up_proj", "mlp.down_proj")
    elif blocks:
        p = _Plan(layer).readers("input_layernorm", _QKV).linear_fold("self_attn.v_proj", "self_attn.o_proj")
    else:
        p = _llama_like(layer, config)
    for prev, readers in moe.scale_groups(layer, config):
        p.scales.append(ScaleGroup(prev, readers))
    p.inputs.extend(moe.shared_input_groups(layer, config))
    return p.build()


def _entry(model_type: str, plan: PlanFn, layers: str = "model.layers", final_norm: str = "model.norm") -> Family:
    return Family(model_type, layers, final_norm, plan)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    *(_entry(t, _llama) for t in ("llama", "mistral", "qwen2", "qwen3", "granite")),
    *(_entry(t, _moe) for t in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")),
    _entry("gemma", _gemma), _entry("gemma2", _gemma2), _entry("gemma3_text", _gemma2),
    _entry("phi", _phi, final_norm="model.final_layernorm"), _entry("phi3", _phi3),
    _entry("gpt_neox", _gpt_neox, "gpt_neox.layers", "gpt_neox.final_layer_norm"),
    _entry("opt", _opt, "model.decoder.layers", "model.decoder.final_layer_norm"),
    _entry("falcon", _falcon, "transformer.h", "transformer.ln_f"),
    _entry("gpt2", _gpt2, "transformer.h", "transformer.ln_f"),
    _entry("stablelm", _stablelm), _entry("olmo2", _post_norm), _entry("exaone4", _post_norm),
    _entry("cohere", _cohere), _entry("starcoder2", _starcoder2),
)}


def family(config) -> Family | None:
    """The registry entry of this config's architecture (None: not in the registry)."""
    return FAMILIES.get(getattr(config, "model_type", ""))


def require(config) -> Family:
    """The entry, or the one-line error AWQ/W8A8 give for an architecture without scale mappings."""
    fam = family(config)
    if fam is None:
        raise LlmoptError(f"scale migration (awq, w8a8) supports {', '.join(FAMILIES)} models, not "
                          f"{getattr(config, 'model_type', '')!r}: use --method gptq or rtn")
    return fam


def supported_methods(config) -> list[str]:
    """The quantization methods that run on this architecture: all of them for a registry family, the ones that
    need no scale mapping (rtn, int8, gptq) for any other."""
    return list(ALL_METHODS) if family(config) is not None else [m for m in ALL_METHODS if m not in SCALE_METHODS]


def layer_plan(layer: nn.Module, config) -> LayerPlan:
    """The plan of one decoder layer; an architecture without an entry: no shared inputs, no scale groups."""
    fam = family(config)
    return fam.plan(layer, config) if fam is not None else LayerPlan()


def scale_groups(layer: nn.Module, config) -> list[ScaleGroup]:
    """The foldable groups of one decoder layer (AWQ, SmoothQuant); refuses an architecture without an entry."""
    return list(require(config).plan(layer, config).scales)


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, str]:
    """(decoder, its layers, the layers' module name) of a causal LM: the registry's path; for an architecture
    outside the registry, the decoder's `layers` list or else its only ModuleList of num_hidden_layers blocks."""
    fam = family(model.config)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if fam is not None:
        return decoder, model.get_submodule(fam.layers), fam.layers
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        n = getattr(model.config, "num_hidden_layers", None)
        lists = [m for m in (decoder or model).modules() if isinstance(m, nn.ModuleList) and len(m) == n]
        if len(lists) != 1:
            raise LlmoptError(f"{type(model).__name__}: cannot tell its decoder layers (architecture "
                              f"{getattr(model.config, 'model_type', '')!r} is not in llmopt's family registry: "
                              f"{', '.join(FAMILIES)})")
        layers = lists[0]
    return decoder, layers, next(n for n, m in model.named_modules() if m is layers)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm the output head reads (None: unknown architecture without a decoder `norm`)."""
    fam = family(model.config)
    if fam is not None:
        try:
            return model.get_submodule(fam.final_norm)
        except AttributeError:  # e.g. OPT-350m removes its final norm
            return None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return getattr(decoder, "norm", None)


@torch.no_grad()
def fold_scales(layer: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the group's input columns by s [C] and divide the producer's output (channels / rows) by s."""
    prev = layer.get_submodule(group.prev)
    if getattr(prev, "weight", None) is None:
        raise LlmoptError(f"{group.prev} has no weight to fold scales into")
    rows = slice(None) if group.rows is None else group.rows.to(prev.weight.device)
    sw = s.to(device=prev.weight.device, dtype=prev.weight.dtype)
    if isinstance(prev, nn.Linear):
        prev.weight[rows] = prev.weight[rows] / sw.unsqueeze(1)  # [C, in_prev] output rows
    else:  # norm: y = x̂·(offset + w) (+ b)
        prev.weight.copy_((group.offset + prev.weight) / sw - group.offset)
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias[rows] = bias[rows] / s.to(device=bias.device, dtype=bias.dtype)
    for name in group.linears:  # Linears, and MoE routers ([experts, in] weights kept float)
        lin = layer.get_submodule(name)
        lin.weight.mul_(s.to(device=lin.weight.device, dtype=lin.weight.dtype).unsqueeze(0))  # [out, in] columns
