"""Which op precedes which Linears in a decoder layer, so per-input-channel scales can be folded into it.

AWQ and SmoothQuant both multiply a Linear's input channels by s and divide the op producing that input
by s, which leaves the float function unchanged:
  input_layernorm          → q_proj, k_proj, v_proj   (RMSNorm weight / s)
  self_attn.v_proj         → o_proj                    (v rows / s; only without GQA: with GQA one v row
                                                        feeds several o columns, which then need one scale)
  post_attention_layernorm → gate_proj, up_proj
  mlp.up_proj              → down_proj                 (up rows / s: act(gate)·up is linear in up)
Llama, Mistral, Qwen2 and Qwen3 share these names and a plain-weight RMSNorm; so do the attention parts of
Mixtral, Qwen2-MoE and Qwen3-MoE, whose MoE blocks map as families/moe.py says (norm → every expert's gate and
up, the shared expert's and the routers'; per expert up → down). DeepSeek-V2/V3's latent attention (MLA)
maps as llm-compressor maps it:
  input_layernorm          → q_proj (or q_a_proj), kv_a_proj_with_mqa
  self_attn.q_a_layernorm  → q_b_proj                  (with a low-rank query)
  self_attn.kv_a_layernorm → kv_b_proj
with no v → o fold (kv_b_proj's rows interleave keys and values per head). Other families are refused by the
methods that need this (GPTQ and RTN need no mapping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmopt.errors import LlmoptError
from llmopt.families import moe

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2",
                         "deepseek_v3")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True, slots=True)
class ScaleGroup:
    """Linears (names relative to the decoder layer) that read the output of `prev`."""

    prev: str
    linears: tuple[str, ...]


def scale_groups(layer: nn.Module, config) -> list[ScaleGroup]:
    """The foldable groups of one decoder layer (see module docstring)."""
    mtype = getattr(config, "model_type", "")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise LlmoptError(f"scale migration (awq, w8a8) supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not "
                          f"{mtype!r}: use --method gptq or rtn")
    groups = _mla_groups(layer) if mtype in MLA_MODEL_TYPES else _attention_groups(layer)
    moe_groups = moe.scale_groups(layer, config)
    if moe_groups:
        return groups + [ScaleGroup(prev, readers) for prev, readers in moe_groups]
    return groups + [ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                     ScaleGroup("mlp.up_proj", ("mlp.down_proj",))]


def _attention_groups(layer: nn.Module) -> list[ScaleGroup]:
    groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
    v = layer.get_submodule("self_attn.v_proj")
    o = layer.get_submodule("self_attn.o_proj")
    if v.out_features == o.in_features:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)))
    return groups


def _mla_groups(layer: nn.Module) -> list[ScaleGroup]:
    low_rank_q = getattr(layer.self_attn, "q_a_proj", None) is not None
    q = "self_attn.q_a_proj" if low_rank_q else "self_attn.q_proj"
    groups = [ScaleGroup("input_layernorm", (q, "self_attn.kv_a_proj_with_mqa"))]
    if low_rank_q:
        groups.append(ScaleGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)))
    return groups + [ScaleGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",))]


@torch.no_grad()
def fold_scales(layer: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the group's Linear input channels by s [in] and divide the preceding op's output by s."""
    prev = layer.get_submodule(group.prev)
    s = s.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))  # [out_prev, in_prev] rows
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # RMSNorm: y = x̂ · weight
        prev.weight.div_(s.to(prev.weight.dtype))
    for name in group.linears:  # Linears, and MoE routers ([experts, in] weights kept float)
        lin = layer.get_submodule(name)
        lin.weight.mul_(s.to(device=lin.weight.device, dtype=lin.weight.dtype).unsqueeze(0))  # [out, in] columns
