"""runtime/vnni.py: the JIT-compiled AVX512-VNNI kernel against float64 references of its own arithmetic
(activations quantized to int8 per block of 32, or per token for W8A8), the tile16 layout, the modules
that use it and the rule that picks it. Skipped where the kernel cannot run (no numba, no VNNI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmopt.runtime import build_linear, vnni
from llmopt.runtime import kernels as K
from llmopt.runtime.linear import VNNI_ENV
from tests.helpers.rtn import rtn

pytestmark = pytest.mark.skipif(vnni.unavailable() is not None, reason=f"vnni: {vnni.unavailable()}")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _vnni_on(monkeypatch):
    monkeypatch.delenv(VNNI_ENV, raising=False)
    monkeypatch.delenv("LLMOPT_KERNEL", raising=False)


def _a8_reference(x: torch.Tensor, w: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """float64 x̂ @ wᵀ with x̂ the activations the kernel quantizes (its own codes, checked separately)."""
    xq, xd, _ = vnni.quantize_activations(x, per_token)
    m, k = x.shape
    xhat = (xq.double().view(m, k // 32, 32) * xd.double()[..., None]).view(m, k)
    return xhat @ w.double().t()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


def test_block_quantizer_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 256) * torch.linspace(0.1, 10, 256)
    x[1, 32:64] = 0  # an all-zero block: scale 0, codes 0
    xq, xd, xs = vnni.quantize_activations(x)
    d = x.view(3, 8, 32).abs().amax(-1) / 127  # [M, blocks]
    q = torch.where(d[..., None] > 0, torch.round(x.view(3, 8, 32) / d.clamp_min(1e-30)[..., None]), 0)
    assert torch.equal(xd, d) and torch.equal(xq.view(3, 8, 32).float(), q)
    assert torch.equal(xs, q.sum(-1))


def test_per_token_quantizer_is_w8a8s():
    torch.manual_seed(1)
    x = torch.randn(4, 128)
    x[0, 3] = 40.0
    xq, xd, _ = vnni.quantize_activations(x, per_token=True)
    q, s = K.quantize_per_token(x)
    assert torch.equal(xq, q) and torch.equal(xd, s.expand(4, 4))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trip(bits):
    q = torch.randint(0, 1 << bits, (48, 96), dtype=torch.uint8)
    tiles = vnni.pack_codes(q, bits)
    assert tiles.numel() == q.numel() * bits // 8
    assert torch.equal(vnni.unpack_codes(tiles, bits), q)


@pytest.mark.parametrize("bits,gs,asym,m", [(4, 32, False, 1), (4, 128, True, 3), (4, -1, False, 2),
                                            (8, -1, False, 1), (8, 64, True, 5), (4, 64, True, 17)])
def test_gemm_matches_float64(bits, gs, asym, m):
    torch.manual_seed(bits + m)
    n, k = 48, 256
    groups = 1 if gs == -1 else k // gs
    q = torch.randint(0, 1 << bits, (n, k))
    s = torch.rand(n, groups) * 0.01 + 1e-3
    z = torch.randint(0, 1 << bits, (n, groups)).float() if asym else torch.full((n, groups), 2.0 ** (bits - 1))
    half = vnni.exact_in_half(s)
    packed = vnni.Packed(vnni.Variant(bits, asym, half), n, k, gs, False)
    x = torch.randn(m, k)
    y = vnni.gemm(x, packed, vnni.pack_codes(q, bits), vnni.pack_groups(s, half),
                  vnni.pack_groups(z, True) if asym else None)
    w = ((q.double().view(n, groups, -1) - z.double()[..., None]) * s.double()[..., None]).view(n, k)
    assert _rel(y, _a8_reference(x, w)) < 1e-6
    assert _rel(y, x.double() @ w.t()) < 3e-2  # what quantizing the activations costs on random data


def test_thread_count_does_not_change_the_result():
    torch.manual_seed(2)
    module = build_linear(rtn(torch.randn(64, 512) * 0.05, 4, 32, True), CPU, torch.float32)
    x = torch.randn(2, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = module(x)
        torch.set_num_threads(2)
        two = module(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("bits,gs,sym,act_order", [(4, 32, True, False), (4, 128, False, True), (4, -1, True, False),
                                                   (8, -1, True, False), (8, -1, False, False), (8, 32, True, True)])
@pytest.mark.parametrize("m", [1, 48])
def test_modules_run_vnni_and_match_float64(bits, gs, sym, act_order, m):
    torch.manual_seed(bits * 10 + m)
    n, k = 64, 256
    g_idx = (torch.randperm(k).argsort() // (k if gs == -1 else gs)).to(torch.int32) if act_order else None
    bias = torch.randn(n) * 0.1
    qw = rtn(torch.randn(n, k) * 0.05, bits, gs, sym, g_idx=g_idx, bias=bias)
    module = build_linear(qw, CPU, torch.float32)
    assert module.vnni is not None and "vnni" in module.kernels()
    assert not {"int4pack", "int8pack"} & set(module.kernels())  # the torch layouts are not kept beside it
    x = torch.randn(m, k)
    y = module(x)
    assert module.used[1 << max(0, (m - 1).bit_length())] == "vnni"
    xp = x if module.perm is None else x[:, module.perm]
    w = qw.dequantize(torch.float64)
    w = w if module.perm is None else w[:, module.perm]
    assert _rel(y, _a8_reference(xp, w) + bias.double()) < 1e-6
    module.force_kernel = "dequant"  # the dequant paths read the vnni layout back
    assert _rel(module(x), x.double() @ qw.dequantize(torch.float64).t() + bias.double()) < 1e-5


def test_w8a8_vnni_equals_int_mm():
    """Per-token activation codes and the integer products are the checkpoint's: only float sums differ."""
    torch.manual_seed(3)
    qw = rtn(torch.randn(64, 256) * 0.05, 8, -1, True, act_bits=8)
    x = torch.randn(5, 256)
    x[0, 7] = 12.0
    ours = build_linear(qw, CPU, torch.float32)
    assert "vnni" in ours.kernels() and "int_mm" not in ours.kernels()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(VNNI_ENV, "0")
        theirs = build_linear(qw, CPU, torch.float32)
    assert theirs.vnni is None and "int_mm" in theirs.kernels()
    assert _rel(ours(x), theirs(x).double()) < 1e-6


def test_unsupported_shapes_keep_torch_kernels():
    odd = build_linear(rtn(torch.randn(24, 256) * 0.05, 4, 32, True), CPU, torch.float32)  # N % 16
    assert odd.vnni is None and "vnni" not in odd.kernels()
    narrow = build_linear(rtn(torch.randn(64, 48) * 0.05, 8, -1, True), CPU, torch.float32)  # K % 32
    assert narrow.vnni is None and "int8pack" in narrow.kernels()


def test_bf16_model_and_dtype_cast():
    torch.manual_seed(4)
    qw = rtn(torch.randn(64, 256) * 0.05, 4, 32, False)
    module = build_linear(qw, CPU, torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    y = module(x)
    assert y.dtype == torch.bfloat16
    module.to(torch.bfloat16)  # the kernel's scale/zero tables are integer bit patterns: not cast
    assert torch.equal(module(x), y)


def test_missing_numba_is_reported(tmp_path):
    """Without numba the module says why and the runtime keeps torch's kernels."""
    blocker = tmp_path / "numba.py"
    blocker.write_text("raise ImportError('blocked', name='numba')\n")
    code = ("import torch; from llmopt.runtime import vnni, build_linear; from tests.helpers.rtn import rtn; "
            "m = build_linear(rtn(torch.randn(64, 256), 4, 32, True), torch.device('cpu'), torch.float32); "
            "print(vnni.unavailable(), '|', sorted(m.kernels()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2], env={**os.environ,
                                                             "PYTHONPATH": f"{tmp_path}:{Path(__file__).parents[2]}"})
    assert out.stdout.strip() == "numba is not installed (pip install numba) | ['dequant', 'dequant-bf16', 'int4pack']"


def test_sibling_projections_run_as_one_call_with_equal_logits(tmp_path, monkeypatch):
    """q/k/v and gate/up share one kernel call; every row is computed as it would be alone, so logits match
    the unfused model bit for bit, and the layers' buffers are views of one storage (nothing held twice)."""
    from transformers import AutoConfig

    from llmopt.checkpoint.formats import write_checkpoint
    from llmopt.checkpoint.types import QuantArgs
    from llmopt.runtime import linear, load_quantized_model, weight_bytes
    from tests.checkpoint.formats.test_formats_roundtrip import tiny_qwen2
    from tests.helpers.rtn import quantize_model

    model = tiny_qwen2()
    out = tmp_path / "w4"
    out.mkdir()
    write_checkpoint("compressed-tensors", model, quantize_model(model, 4, 32, True), out,
                     QuantArgs(bits=4, group_size=32), "rtn")
    load = lambda: load_quantized_model(out, AutoConfig.from_pretrained(out), CPU, torch.float32)
    fused = load()
    groups = {id(m.siblings) for _, m in fused.named_modules() if getattr(m, "siblings", None) is not None}
    assert len(groups) == 2 * fused.config.num_hidden_layers
    monkeypatch.setattr(linear, "SIBLINGS", ())
    alone = load()
    assert weight_bytes(fused) == weight_bytes(alone)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, alone(ids).logits)
        layer = fused.model.layers[0].self_attn
        x = torch.randn(1, 3, fused.config.hidden_size)
        first = layer.k_proj(x)
        x.mul_(2)  # changed in place: the joint output of the old values must not be reused
        assert torch.equal(layer.k_proj(x), alone.model.layers[0].self_attn.k_proj(x))
        assert not torch.equal(layer.k_proj(x), first)


def test_joining_siblings_after_a_call_rebinds_them():
    """A layer that already ran (its path bound to its own kernel) runs the joint kernel once fused, with
    the same result: the joint rows are its rows."""
    from llmopt.runtime.linear import Siblings

    torch.manual_seed(6)
    members = [build_linear(rtn(torch.randn(n, 256) * 0.05, 4, 32, True), CPU, torch.float32) for n in (64, 32)]
    x = torch.randn(1, 256)
    alone = [m(x) for m in members]
    group = Siblings(members)
    calls = []
    run = group.kernel.__call__
    group.kernel = type("Counted", (), {"__call__": lambda self, a: calls.append(1) or run(a)})()
    assert all(torch.equal(m(x), y) for m, y in zip(members, alone))
    assert len(calls) == 1
