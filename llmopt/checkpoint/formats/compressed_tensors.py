"""compressed-tensors format (vLLM's native format; transformers loads it with the compressed-tensors package).

Layouts written (per quantized Linear `{m}`; codes are llmopt's unsigned q, compressed-tensors' signed
value is q - 2**(bits-1), and its packer stores signed + 2**(bits-1), i.e. exactly q):
- pack-quantized (weight-only W4A16 / W8A16, group or channel):
    {m}.weight_packed      int32 [out, ceil(in*bits/32)]  dense bit stream along `in`
    {m}.weight_scale       model dtype [out, n_groups]    ([out, 1] per channel)
    {m}.weight_shape       int64 [2] = (out, in)
    {m}.weight_zero_point  int32 [ceil(out*bits/32), n_groups]  asymmetric only, packed along `out`
- int-quantized (W8A8: int8 per-channel symmetric weights, dynamic per-token int8 activations):
    {m}.weight             int8 [out, in] = q - 128
    {m}.weight_scale       model dtype [out, 1]
Act-order with a permuting g_idx is not representable (compressed-tensors 0.20 removed `weight_g_idx`).
"""

from __future__ import annotations

import re

import torch

from llmopt.errors import LlmoptError
from llmopt.checkpoint.formats import _io
from llmopt.checkpoint.formats.packing import pack_bits, unpack_bits
from llmopt.checkpoint.types import QuantArgs, QuantizedWeight

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
INT = "int-quantized"
NAIVE = "naive-quantized"


def check_supported(method: str, args: QuantArgs) -> None:
    if method == "w8a8":
        if args.bits != 8:
            raise LlmoptError(f"w8a8 needs --bits 8, got {args.bits}")
        if not args.sym:
            raise LlmoptError("compressed-tensors W8A8 stores symmetric int8 weights: drop --asym")
        if args.group_size != -1:
            raise LlmoptError("compressed-tensors W8A8 uses per-channel weight scales: pass --group-size -1")
    if args.act_order and not args.static_groups:
        raise LlmoptError("compressed-tensors cannot store an act-order g_idx: add --static-groups, or use "
                          "--format gptq")


def _scheme(qw: QuantizedWeight) -> tuple[int, int, bool, int | None]:
    return qw.bits, qw.group_size, qw.sym, qw.act_bits


def _check_weight(name: str, qw: QuantizedWeight) -> None:
    if qw.g_idx is not None and not _io.trivial_g_idx(qw.g_idx, qw.group_size):
        raise LlmoptError(f"{name}: compressed-tensors cannot store an act-order g_idx: quantize with "
                          f"--static-groups or use --format gptq")
    if qw.act_bits is not None:
        if qw.act_bits != 8 or qw.bits != 8 or not qw.sym or qw.group_size != -1:
            raise LlmoptError(f"{name}: compressed-tensors W8A8 needs 8-bit symmetric per-channel weights "
                              f"(got {qw.bits} bits, sym={qw.sym}, group size {qw.group_size})")


def _group_config(scheme: tuple[int, int, bool, int | None], targets: list[str]) -> dict:
    bits, group_size, sym, act_bits = scheme
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "group_size": None if group_size == -1 else group_size,
               "strategy": "channel" if group_size == -1 else "group"}
    activations = None
    if act_bits is not None:
        activations = {"num_bits": act_bits, "type": "int", "symmetric": True, "dynamic": True,
                       "group_size": None, "strategy": "token"}
    return {"targets": targets, "weights": weights, "input_activations": activations,
            "output_activations": None, "format": INT if act_bits is not None else PACKED}


def quantization_config(qweights: dict[str, QuantizedWeight], unquantized: list[str]) -> dict:
    """The `quantization_config` block: one config group per distinct scheme."""
    by_scheme: dict[tuple, list[str]] = {}
    for name, qw in qweights.items():
        by_scheme.setdefault(_scheme(qw), []).append(name)
    single = len(by_scheme) == 1
    groups = {f"group_{i}": _group_config(s, ["Linear"] if single else sorted(names))
              for i, (s, names) in enumerate(by_scheme.items())}
    formats = {g["format"] for g in groups.values()}
    return {"quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": groups, "ignore": unquantized,
            "kv_cache_scheme": None, "global_compression_ratio": None}


def module_tensors(name: str, qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The safetensors entries of one quantized Linear (bias excluded)."""
    _check_weight(name, qw)
    q = qw.qweight.cpu().to(torch.int32)  # [out, in]
    scale = qw.scales.detach().cpu().to(scale_dtype)  # [out, n_groups]
    if qw.act_bits is not None:
        return {f"{name}.weight": (q - 128).to(torch.int8), f"{name}.weight_scale": scale}
    out = {f"{name}.weight_packed": pack_bits(q, qw.bits, dim=1), f"{name}.weight_scale": scale,
           f"{name}.weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
    if not qw.sym:
        out[f"{name}.weight_zero_point"] = pack_bits(qw.zeros.cpu().to(torch.int32), qw.bits, dim=0)
    return out


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    # class-name targets ("Linear") cover every Linear; only Linears carry quantized tensors here
    return name == target or target[:1].isupper()


def _scheme_for(name: str, qc: dict) -> dict:
    exact = [g for g in qc["config_groups"].values() if name in g.get("targets", [])]
    groups = exact or [g for g in qc["config_groups"].values() if any(_matches(name, t) for t in g.get("targets", []))]
    if not groups:
        raise LlmoptError(f"{name} holds quantized tensors but no config group of quantization_config targets it")
    return groups[0]


def _quant_fields(name: str, group: dict) -> tuple[int, int, bool, int | None]:
    w = group.get("weights") or {}
    if w.get("type", "int") != "int":
        raise LlmoptError(f"{name}: compressed-tensors {w.get('type')} weights are not supported by llmopt "
                          f"(int weights only)")
    strategy = w.get("strategy") or ("group" if (w.get("group_size") or 0) > 0 else "channel")
    if strategy not in ("group", "channel", "tensor"):
        raise LlmoptError(f"{name}: compressed-tensors weight strategy {strategy!r} is not supported "
                          f"(group, channel or tensor)")
    if w.get("actorder") in ("group", "dynamic"):
        raise LlmoptError(f"{name}: compressed-tensors act-order 'group' checkpoints are not supported")
    act = group.get("input_activations")
    act_bits = None
    if act:
        if not (act.get("type", "int") == "int" and act.get("dynamic") and act.get("strategy") == "token"
                and act.get("symmetric", True) and act.get("num_bits") == 8):
            raise LlmoptError(f"{name}: only dynamic per-token symmetric int8 activations are supported, got {act}")
        act_bits = 8
    group_size = w["group_size"] if strategy == "group" else -1
    return int(w.get("num_bits", 8)), int(group_size), bool(w.get("symmetric", True)), act_bits


def _per_row(scale: torch.Tensor, n_out: int) -> torch.Tensor:
    """A per-tensor scale or zero point ([] or [1]) as the per-channel [out, 1] it equals; others unchanged."""
    return scale.reshape(1, 1).expand(n_out, 1).clone() if scale.numel() == 1 and n_out > 1 else scale


def read(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    """Pop every quantized Linear's tensors out of `tensors` and return them as QuantizedWeights."""
    qc = config["quantization_config"]
    qweights: dict[str, QuantizedWeight] = {}
    packed = _io.pop_module_tensors(tensors, ("weight_packed", "weight_scale", "weight_shape",
                                              "weight_zero_point", "weight_g_idx"), "weight_packed")
    for name, t in packed.items():
        bits, group_size, sym, act_bits = _quant_fields(name, _scheme_for(name, qc))
        if "weight_g_idx" in t:
            raise LlmoptError(f"{name}: act-order g_idx checkpoints are not supported in compressed-tensors format")
        n_out, n_in = (int(v) for v in t["weight_shape"].tolist())
        q = unpack_bits(t["weight_packed"], bits, n_in, dim=1)  # [out, in]
        scales = _per_row(t["weight_scale"], n_out)  # [out, n_groups]
        zeros = unpack_bits(t["weight_zero_point"], bits, n_out, dim=0) if not sym \
            else torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8)
        qweights[name] = QuantizedWeight(q, scales, zeros, None, bits, group_size, sym, act_bits=act_bits)
    int8 = [k[: -len(".weight_scale")] for k in tensors
            if k.endswith(".weight_scale") and tensors.get(k[: -len("_scale")], torch.empty(0)).dtype == torch.int8]
    for name in int8:
        bits, group_size, sym, act_bits = _quant_fields(name, _scheme_for(name, qc))
        w = tensors.pop(f"{name}.weight").to(torch.int32)  # [out, in] signed
        scales = _per_row(tensors.pop(f"{name}.weight_scale"), w.shape[0])  # [out, n_groups]
        zp = tensors.pop(f"{name}.weight_zero_point", None)
        zeros = (_per_row(zp, w.shape[0]).to(torch.int32) + (1 << (bits - 1))) if zp is not None and not sym \
            else torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int32)
        q = (w + (1 << (bits - 1))).to(torch.uint8)
        qweights[name] = QuantizedWeight(q, scales, zeros.to(torch.uint8), None, bits, group_size, sym,
                                         act_bits=act_bits)
    return qweights
