"""The CUDA kernel paths (_weight_int4pack_mm, _int_mm) against float64; skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.rtn import rtn

from llmopt.runtime import build_linear

pytestmark = pytest.mark.gpu
N, K = 256, 512


# the kernels each module offers on CUDA: int4pack for 4-bit groups, only the dequant paths for 8-bit weight-only
# (int8pack is CPU-only), torch._int_mm next to the reference for W8A8
DEQUANT = {"dequant", "dequant-bf16"}
KERNELS = {(4, 128, None): DEQUANT | {"int4pack"}, (4, 64, None): DEQUANT | {"int4pack"}, (8, -1, None): DEQUANT,
           (8, -1, 8): {"dequant", "int_mm"}}


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("bits,gs,act", list(KERNELS))
def test_cuda_kernels_match_float64(m, bits, gs, act):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bias = torch.randn(N) * 0.1
    qw = rtn(torch.randn(N, K) * 0.05, bits, gs, True, act_bits=act, bias=bias)
    module = build_linear(qw, dev, torch.bfloat16)
    x = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
    xr = x.double().cpu()
    if act:  # dynamic per-token int8 activations, as compressed-tensors defines them
        s = xr.float().abs().amax(-1, keepdim=True) / 127.5
        xr = (torch.round(torch.clamp(xr.float() / s, -128, 127)) * s).double()
    ref = xr @ qw.dequantize(torch.float64).t() + bias.double()
    names = list(module.kernels())
    assert set(names) == KERNELS[bits, gs, act]
    for name in names:
        module.force_kernel = name
        y = module(x).double().cpu()
        assert (y - ref).abs().max() / ref.abs().max() <= 2e-2, name
