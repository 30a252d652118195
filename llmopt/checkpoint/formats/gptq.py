"""GPTQ format (AutoGPTQ / GPTQModel `checkpoint_format: gptq`, loaded by vLLM, transformers+gptqmodel).

Per quantized Linear `{m}` (in = input features, out = output features, G = number of groups):
    {m}.qweight  int32 [in*bits/32, out]   codes packed along `in` (dense bit stream, 3-bit = 10-1-10-1-10)
    {m}.qzeros   int32 [G, out*bits/32]    zero points packed along `out`, stored as zero - 1 (the v1
                                           convention every GPTQ loader undoes with +1; `gptq_v2` omits it)
    {m}.scales   float16 [G, out]
    {m}.g_idx    int32 [in]                group of every input column (act-order permutes it)
    {m}.bias     float16 [out]             when the Linear has a bias
config.json `quantization_config` and quantize_config.json hold bits, group_size, desc_act, sym, ...
"""

from __future__ import annotations

import torch

from llmopt.errors import LlmoptError
from llmopt.checkpoint.formats import _io
from llmopt.checkpoint.formats.packing import pack_bits, unpack_bits
from llmopt.checkpoint.types import QuantArgs, QuantizedWeight

QUANT_METHOD = "gptq"
BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16


def check_supported(method: str, args: QuantArgs) -> None:
    if method == "w8a8":
        raise LlmoptError("the gptq format stores weight-only models: use --format compressed-tensors for w8a8")
    if args.bits not in BITS:
        raise LlmoptError(f"the gptq format stores {BITS} bits, got --bits {args.bits}")


def _check_weight(name: str, qw: QuantizedWeight) -> None:
    n_out, n_in = qw.shape
    if qw.act_bits is not None:
        raise LlmoptError(f"{name}: the gptq format cannot store activation quantization (W8A8)")
    if qw.bits not in BITS:
        raise LlmoptError(f"{name}: the gptq format stores {BITS} bits, got {qw.bits}")
    if (n_in * qw.bits) % 32 or (n_out * qw.bits) % 32:
        raise LlmoptError(f"{name}: the gptq format packs {qw.bits}-bit values into whole int32 words; "
                          f"in/out features {n_in}/{n_out} do not fit (use --format compressed-tensors)")
    if not qw.sym and int(qw.zeros.min()) == 0:
        raise LlmoptError(f"{name}: a zero point of 0 cannot be stored in the gptq format (it stores zero - 1): "
                          f"use --sym or --format compressed-tensors")


def _desc_act(qweights: dict[str, QuantizedWeight]) -> bool:
    return any(qw.g_idx is not None and not _io.trivial_g_idx(qw.g_idx, qw.group_size) for qw in qweights.values())


def quantization_config(qweights: dict[str, QuantizedWeight], unquantized: list[str], args: QuantArgs,
                        method: str) -> dict:
    first = next(iter(qweights.values()))
    if any((qw.bits, qw.group_size, qw.sym) != (first.bits, first.group_size, first.sym) for qw in qweights.values()):
        raise LlmoptError("the gptq format holds one bits/group-size/sym setting for the whole model")
    # Linears inside the decoder layers that stay float: GPTQModel's `dynamic` skips modules matching "-:regex".
    skip = [n for n in unquantized if ".layers." in n]
    cfg = {"quant_method": QUANT_METHOD, "checkpoint_format": "gptq", "bits": first.bits,
           "group_size": first.group_size, "sym": first.sym, "desc_act": _desc_act(qweights),
           "static_groups": bool(args.static_groups), "damp_percent": args.damp,
           "lm_head": "lm_head" in qweights, "pack_dtype": "int32",
           "meta": {"quantizer": [f"llmopt:{method}"]}}
    if skip:
        cfg["dynamic"] = {f"-:^{n.replace('.', '[.]')}$": {} for n in skip}
    return cfg


def module_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    _check_weight(name, qw)
    n_out, n_in = qw.shape
    q = qw.qweight.cpu().to(torch.int32)  # [out, in]
    zeros = qw.zeros.cpu().to(torch.int32)  # [out, G]
    g_idx = qw.group_index().cpu().to(torch.int32)  # [in]
    return {f"{name}.qweight": pack_bits(q.t(), qw.bits, dim=0),  # [in*bits/32, out]
            f"{name}.qzeros": pack_bits((zeros - 1).t() & ((1 << qw.bits) - 1), qw.bits, dim=1),  # [G, out*bits/32]
            f"{name}.scales": qw.scales.detach().cpu().t().to(SCALE_DTYPE).contiguous(),  # [G, out]
            f"{name}.g_idx": g_idx}


def _config(config: dict) -> dict:
    qc = dict(config["quantization_config"])
    qc.setdefault("group_size", -1)
    qc.setdefault("sym", True)
    return qc


def read(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    qc = _config(config)
    bits, group_size, sym = int(qc["bits"]), int(qc["group_size"]), bool(qc["sym"])
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"  # GPTQModel spells it either way
    if fmt not in ("gptq", "gptq_v2"):
        raise LlmoptError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
    if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise LlmoptError(f"GPTQ pack_dtype {qc['pack_dtype']!r} is not supported (int32)")
    if bits not in BITS:
        raise LlmoptError(f"GPTQ checkpoint with {bits} bits is not supported ({BITS})")
    offset = 1 if fmt == "gptq" else 0
    qweights = {}
    for name, t in _io.pop_module_tensors(tensors, ("qweight", "qzeros", "scales", "g_idx"), "qweight").items():
        scales = t["scales"].t().contiguous()  # [out, G]
        n_out, n_groups = scales.shape
        n_in = t["qweight"].shape[0] * 32 // bits
        q = unpack_bits(t["qweight"], bits, n_in, dim=0).t().contiguous()  # [out, in]
        # v1 stores zero - 1; loaders add 1 back (a stored 2**bits - 1 thus reads as 2**bits, as in every loader)
        zeros = unpack_bits(t["qzeros"], bits, n_out, dim=1).t().to(torch.int32) + offset  # [out, G]
        g_idx = t.get("g_idx")
        gs = group_size
        if g_idx is not None and _io.trivial_g_idx(g_idx, gs):
            g_idx = None
        elif g_idx is not None:
            g_idx = g_idx.to(torch.int32)
        qweights[name] = QuantizedWeight(q, scales, zeros, g_idx, bits, gs, sym)  # int32 zeros: 2**bits fits
        if n_groups != (1 if gs == -1 else n_in // gs) and g_idx is None:
            raise LlmoptError(f"{name}: {n_groups} scale groups do not match group_size {gs} for {n_in} inputs")
    return qweights
