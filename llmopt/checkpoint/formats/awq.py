"""AWQ format, GEMM packing (AutoAWQ `version: gemm`; loaded by vLLM, transformers, GPTQModel).

Per quantized Linear `{m}` (in, out features; G = in / group_size):
    {m}.qweight  int32 [in, out/8]   4-bit codes packed along `out`, each run of 8 columns interleaved as
                                     [0, 2, 4, 6, 1, 3, 5, 7] (nibble k of a word holds column order[k])
    {m}.qzeros   int32 [G, out/8]    zero points, same packing, stored as is (no offset)
    {m}.scales   float16 [G, out]
    {m}.bias     float16 [out]       when the Linear has a bias
config.json `quantization_config`: {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": G,
"zero_point": true, "modules_to_not_convert": [...]}. Symmetric codes are stored with explicit zeros (8).
"""

from __future__ import annotations

import torch

from llmopt.errors import LlmoptError
from llmopt.checkpoint.formats import _io
from llmopt.checkpoint.formats.packing import awq_deinterleave, awq_interleave, pack_bits, unpack_bits
from llmopt.checkpoint.types import QuantArgs, QuantizedWeight

QUANT_METHOD = "awq"
SCALE_DTYPE = torch.float16


def check_supported(method: str, args: QuantArgs) -> None:
    if method == "w8a8":
        raise LlmoptError("the awq format stores weight-only 4-bit models: use --format compressed-tensors for w8a8")
    if args.bits != 4:
        raise LlmoptError(f"the awq (GEMM) format stores 4-bit weights only, got --bits {args.bits}: "
                          f"use --format compressed-tensors or gptq")
    if args.group_size == -1:
        raise LlmoptError("the awq format is group-wise: pass a --group-size such as 128")
    if args.act_order and not args.static_groups:
        raise LlmoptError("the awq format cannot store an act-order g_idx: use --format gptq")


def _check_weight(name: str, qw: QuantizedWeight) -> None:
    n_out, n_in = qw.shape
    if qw.bits != 4 or qw.act_bits is not None:
        raise LlmoptError(f"{name}: the awq format stores weight-only 4-bit codes, got {qw.bits} bits")
    if qw.group_size == -1 or n_in % qw.group_size:
        raise LlmoptError(f"{name}: the awq format needs a group size dividing {n_in} input features")
    if qw.g_idx is not None and not _io.trivial_g_idx(qw.g_idx, qw.group_size):
        raise LlmoptError(f"{name}: the awq format cannot store an act-order g_idx: use --format gptq")
    if n_out % 8:
        raise LlmoptError(f"{name}: the awq format packs 8 output columns per int32; {n_out} is not a multiple of 8")


def quantization_config(qweights: dict[str, QuantizedWeight], unquantized: list[str]) -> dict:
    first = next(iter(qweights.values()))
    if any(qw.group_size != first.group_size for qw in qweights.values()):
        raise LlmoptError("the awq format holds one group size for the whole model")
    return {"quant_method": QUANT_METHOD, "version": "gemm", "bits": 4, "group_size": first.group_size,
            "zero_point": True, "modules_to_not_convert": unquantized or None}


def module_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    _check_weight(name, qw)
    q = qw.qweight.cpu().to(torch.int32).t()  # [in, out]
    zeros = qw.zeros.cpu().to(torch.int32).t()  # [G, out]
    return {f"{name}.qweight": pack_bits(awq_interleave(q.contiguous()), 4, dim=1),  # [in, out/8]
            f"{name}.qzeros": pack_bits(awq_interleave(zeros.contiguous()), 4, dim=1),  # [G, out/8]
            f"{name}.scales": qw.scales.detach().cpu().t().to(SCALE_DTYPE).contiguous()}  # [G, out]


def read(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    qc = config["quantization_config"]
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm" or int(qc.get("bits", 4)) != 4:
        raise LlmoptError(f"AWQ {version} / {qc.get('bits')}-bit checkpoints are not supported (gemm, 4-bit)")
    if not qc.get("zero_point", True):
        raise LlmoptError("AWQ checkpoints without zero points (zero_point: false) are not supported")
    group_size = int(qc.get("group_size", 128))
    qweights = {}
    for name, t in _io.pop_module_tensors(tensors, ("qweight", "qzeros", "scales"), "qweight").items():
        scales = t["scales"].t().contiguous()  # [out, G]
        n_out = scales.shape[0]
        q = awq_deinterleave(unpack_bits(t["qweight"], 4, n_out, dim=1)).t().contiguous()  # [out, in]
        zeros = awq_deinterleave(unpack_bits(t["qzeros"], 4, n_out, dim=1)).t().contiguous()  # [out, G]
        sym = bool((zeros == 8).all())
        qweights[name] = QuantizedWeight(q, scales, zeros, None, 4, group_size, sym)
    return qweights
