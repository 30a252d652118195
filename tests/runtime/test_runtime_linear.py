"""Every runtime kernel against a float64 reference of the dequantized weight, for decode (M=1) and
prefill-sized M, with and without bias, with act-order g_idx."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.rtn import rtn

from llmopt.errors import LlmoptError
from llmopt.runtime import build_linear, clear_kernel_cache
from llmopt.runtime.linear import VNNI_ENV, Int4Linear, Int8Linear, W8A8Linear

N, K = 64, 256
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    """torch's kernels (bf16 activations); tests/runtime/test_runtime_vnni.py covers the vnni modules."""
    monkeypatch.setenv(VNNI_ENV, "0")


def _weight(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(N, K) * 0.05


def _act_order(gs: int) -> torch.Tensor:
    torch.manual_seed(7)
    return (torch.randperm(K).argsort() // gs).to(torch.int32)  # every group keeps gs columns, scattered


def _reference(x: torch.Tensor, qw, bias) -> torch.Tensor:
    y = x.double() @ qw.dequantize(torch.float64).t()
    return y if bias is None else y + bias.double()


def _check(y: torch.Tensor, ref: torch.Tensor, kernel: str) -> None:
    err = (y.double() - ref).abs().max() / ref.abs().max()
    # float32 paths are exact up to accumulation order; bf16 paths round activations and scales to 8 bits
    tol = 1e-5 if kernel == "dequant" else 2e-2
    assert err <= tol, f"{kernel}: relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("m", [1, 48])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bits,gs,sym,act_order", [
    (4, 32, True, False), (4, 64, False, False), (4, 32, True, True), (4, -1, False, False), (4, 128, True, True),
    (8, -1, True, False), (8, -1, False, False), (8, 32, True, True), (3, 32, False, True), (2, 64, True, False),
])
def test_weight_only_kernels_match_float64(m, with_bias, bits, gs, sym, act_order):
    w = _weight(bits * 100 + max(gs, 0))
    bias = torch.randn(N) * 0.1 if with_bias else None
    g_idx = _act_order(K if gs == -1 else gs) if act_order else None
    qw = rtn(w, bits, gs, sym, g_idx=g_idx, bias=bias)
    module = build_linear(qw, CPU, torch.float32)
    x = torch.randn(m, K)
    ref = _reference(x, qw, bias)
    kernels = list(module.kernels())
    assert "dequant" in kernels
    if bits == 4:
        assert isinstance(module, Int4Linear) and "int4pack" in kernels
    if bits == 8 and gs == -1:
        assert isinstance(module, Int8Linear) and "int8pack" in kernels
    for kernel in kernels:
        module.force_kernel = kernel
        _check(module(x), ref, kernel)
        _check(module(x.view(1, m, K)).view(m, N), ref, kernel)  # batched [B, S, K] input


@pytest.mark.parametrize("m", [1, 48])
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a8_int_mm_matches_float64(m, with_bias):
    w = _weight(3)
    bias = torch.randn(N) * 0.1 if with_bias else None
    qw = rtn(w, 8, -1, True, act_bits=8, bias=bias)
    module = build_linear(qw, CPU, torch.float32)
    assert isinstance(module, W8A8Linear)
    x = torch.randn(m, K)
    x[0, 5] = 9.0  # an outlier channel: per-token scales must follow each row's own range
    # reference: compressed-tensors' dynamic per-token fake quantization, then float64 matmul
    s = x.abs().amax(-1, keepdim=True) / 127.5
    xq = torch.round(torch.clamp(x / s, -128, 127)).double() * s.double()
    ref = _reference(xq, qw, bias)
    for kernel in module.kernels():
        module.force_kernel = kernel
        y = module(x)
        assert (y.double() - ref).abs().max() / ref.abs().max() <= 1e-5, kernel


def test_selection_picks_and_records_a_kernel():
    clear_kernel_cache()
    module = build_linear(rtn(_weight(1), 4, 32, True), CPU, torch.float32)
    module(torch.randn(1, K))
    module(torch.randn(40, K))
    assert set(module.used) == {1, 64}
    assert all(k in module.kernels() and k != "dequant" for k in module.used.values())


def test_unknown_kernel_is_a_clear_error():
    module = build_linear(rtn(_weight(1), 4, 32, True), CPU, torch.float32)
    module.force_kernel = "int_mm"
    with pytest.raises(LlmoptError, match="not available"):
        module(torch.randn(1, K))


def test_bf16_model_dtype():
    qw = rtn(_weight(2), 4, 32, True)
    module = build_linear(qw, CPU, torch.bfloat16)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    y = module(x)
    assert y.dtype == torch.bfloat16
    _check(y, _reference(x.float(), qw, None), "int4pack")


def test_int4_dequant_reads_the_kernel_layout_or_keeps_nibbles():
    """On CPU the dequant path unpacks the int4pack layout (no second copy); shapes the kernel cannot take
    (N not a multiple of 16) keep plain nibbles. Both must give the float64 result."""
    qw = rtn(_weight(4), 4, 32, False)
    with_kernel = build_linear(qw, CPU, torch.float32)
    assert with_kernel.nibbles is None and "int4pack" in with_kernel.kernels()
    odd = rtn(_weight(4)[:24], 4, 32, False)
    without = build_linear(odd, CPU, torch.float32)
    assert without.nibbles is not None and "int4pack" not in without.kernels()
    x = torch.randn(5, K)
    for module, q in ((with_kernel, qw), (without, odd)):
        assert torch.equal(module.codes(), q.qweight)
        module.force_kernel = "dequant"
        _check(module(x), _reference(x, q, None), "dequant")


def test_module_packed_for_cpu_refuses_other_devices():
    module = build_linear(rtn(_weight(1), 8, -1, True), CPU, torch.float32)
    with pytest.raises(LlmoptError, match="packed for cpu"):
        module(torch.randn(1, K, device="meta"))


def test_uneven_g_idx_falls_back_to_dequant():
    g_idx = torch.randint(0, K // 32, (K,), generator=torch.Generator().manual_seed(5)).to(torch.int32)
    g_idx[: K // 32] = torch.arange(K // 32, dtype=torch.int32)  # every group present, sizes uneven
    qw = rtn(_weight(6), 4, 32, True, g_idx=g_idx)
    module = build_linear(qw, CPU, torch.float32)
    assert module.kind == "dequant"
    x = torch.randn(3, K)
    _check(module(x), _reference(x, qw, None), "dequant")


def test_empty_input_and_dtype_cast_survive():
    module = build_linear(rtn(_weight(1), 4, 32, True), CPU, torch.float32)
    assert module(torch.randn(0, K)).shape == (0, N)
    module.to(torch.float32)  # model.float() casts the bf16 kernel tables; the kernel call casts them back
    module.force_kernel = "int4pack"
    assert module(torch.randn(2, K)).shape == (2, N)


@pytest.mark.parametrize("gs", [-1, 512])
def test_int4pack_splits_large_groups(gs):
    """Groups larger than the kernel's 256 (per-channel rows, or 512) run as 256-column groups sharing a scale."""
    torch.manual_seed(8)
    qw = rtn(torch.randn(N, 1024) * 0.05, 4, gs, False)
    module = build_linear(qw, CPU, torch.float32)
    assert module.kernel_gs == 256
    module.force_kernel = "int4pack"
    x = torch.randn(2, 1024)
    _check(module(x), _reference(x, qw, None), "int4pack")


def test_bound_paths_follow_pins_casts_and_grad():
    """Each M's path is bound at its first call (decode repeats it every token): pinning a kernel and casting
    the module afterwards must still take effect, and a grad-enabled call records no graph."""
    bias = torch.randn(N) * 0.1
    qw = rtn(_weight(9), 4, 32, True, bias=bias)
    module = build_linear(qw, CPU, torch.float32)
    x = torch.randn(1, K)
    ref = _reference(x, qw, bias)
    _check(module(x), ref, module.used[1])
    module.force_kernel = "dequant"
    _check(module(x), ref, "dequant")
    assert module.used[1] == "dequant"
    module.to(torch.bfloat16)  # the bias a bound path held is replaced by its bf16 copy
    y = module(x.bfloat16())
    assert y.dtype == torch.bfloat16
    _check(y, ref, "bf16")
    module.float()
    out = module(x.clone().requires_grad_())
    assert not out.requires_grad
    for m in range(300, 304):  # prefill lengths vary: their paths are not kept
        assert module(torch.randn(m, K)).shape == (m, N)
    assert max(module._plans) <= 256
