"""GPTQ core against a float64 reference (OBQ updates with an explicit inverse, no Cholesky, no blocks)."""

import pytest
import torch

from llmopt.quant.gptq import HessianAccumulator, gptq_quantize
from llmopt.quant.rtn import params_from_range, params_search, rtn_quantize
from llmopt.checkpoint.types import QuantArgs


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scales = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]  # channels of very different magnitude
    return (torch.randn(n, d, generator=g) @ mix) * scales  # [n, d]


def _reference_gptq(w, h, bits, gs, sym, damp, search=False):
    """Float64, column by column: quantize, spread the error with H⁻¹, then drop the column from H⁻¹.
    search: each group's scale searched against the error weighted by H's (undamped) diagonal."""
    w = w.double().clone()
    h = h.double().clone()
    hdiag = h.diagonal().clone()
    d = h.shape[0]
    h += damp * h.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    out = torch.empty_like(w)
    for i in range(d):
        if i % gs == 0:
            g = w[:, i:i + gs]
            if search:
                s, z = (t[:, 0] for t in params_search(g.unsqueeze(1), bits, sym, hdiag[i:i + gs].view(1, -1)))
            else:
                s, z = params_from_range(g.amin(1), g.amax(1), bits, sym)
        q = torch.clamp(torch.round(w[:, i] / s) + z, 0, 2**bits - 1)
        out[:, i] = (q - z) * s
        err = (w[:, i] - out[:, i]) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return out


def _hessian(x):
    acc = HessianAccumulator(x.shape[1], x.device)
    for chunk in x.split(100):
        acc.add(chunk)
    return acc.hessian()


def test_hessian_blocks_match_float64():
    """The upper-block-row accumulation mirrored into a full H equals 2·XᵀX/n in float64 (uneven last block)."""
    torch.manual_seed(0)
    x = torch.randn(700, 600) * torch.linspace(0.1, 3, 600)  # 600 = 2 full 256-blocks + 88
    h = _hessian(x)
    ref = 2 * x.double().t() @ x.double() / x.shape[0]
    assert torch.equal(h, h.t())
    assert (h.double() - ref).abs().max() / ref.abs().max() < 1e-6


def _out_err(x, w, wq):
    return ((x.double() @ (w.double() - wq.double()).t()) ** 2).sum().item()


@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_matches_float64_reference(sym, search):
    x = _correlated_inputs(512, 64)
    w = torch.randn(32, 64)
    h = _hessian(x)
    args = QuantArgs(bits=4, group_size=16, sym=sym, damp=0.01, block_size=24,  # blocks straddle groups
                     scale_search=search)
    got = gptq_quantize(w, h, args).dequantize(torch.float64)
    ref = _reference_gptq(w, h, 4, 16, sym, 0.01, search)
    assert torch.allclose(h.double(), 2 * x.double().t() @ x.double() / x.shape[0], rtol=1e-4, atol=1e-4)
    # float32 vs float64 arithmetic may flip a few rounding ties; the output error must agree closely
    assert (got - ref).abs().gt(1e-4).float().mean() < 0.05
    assert _out_err(x, w, got) == pytest.approx(_out_err(x, w, ref), rel=0.05)


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("gs", [16, -1])
def test_gptq_beats_rtn_on_correlated_inputs(act_order, static, gs):
    x = _correlated_inputs(1024, 128, seed=1)
    w = torch.randn(48, 128)
    args = QuantArgs(bits=4, group_size=gs, sym=True, act_order=act_order, static_groups=static, block_size=32)
    qw = gptq_quantize(w, _hessian(x), args)
    rtn = rtn_quantize(w, args).dequantize()
    assert _out_err(x, w, qw.dequantize()) < 0.75 * _out_err(x, w, rtn)
    if act_order and not static and gs != -1:
        assert qw.g_idx is not None and torch.bincount(qw.g_idx.long()).eq(gs).all()
    else:
        assert qw.g_idx is None


def test_gptq_dead_inputs_and_codes():
    x = _correlated_inputs(256, 32)
    x[:, 5] = 0  # an input channel that never fires
    w = torch.randn(8, 32)
    qw = gptq_quantize(w, _hessian(x), QuantArgs(bits=4, group_size=8))
    assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) <= 15
    assert torch.isfinite(qw.dequantize()).all()


@pytest.mark.parametrize("sym", [True, False])
def test_params_search_never_worse_than_the_range(sym):
    """On its objective (squared error weighted per column) the searched grid is at most the range rule's, per
    group, and strictly better in total on Gaussian groups."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 6, 32, generator=g, dtype=torch.float64)  # [out, G, gs]
    weight = torch.rand(6, 32, generator=g, dtype=torch.float64) + 0.1  # [G, gs]

    def err(s, z):
        dq = (torch.clamp(torch.round(w / s[..., None]) + z[..., None], 0, 15) - z[..., None]) * s[..., None]
        return ((dq - w) ** 2 * weight).sum(-1)  # [out, G]

    searched = err(*params_search(w, 4, sym, weight))
    ranged = err(*params_from_range(w.amin(-1), w.amax(-1), 4, sym))
    assert bool((searched <= ranged * (1 + 1e-12)).all())
    assert searched.sum() < 0.95 * ranged.sum()


def test_params_search_finds_the_q4_0_grid():
    """A group lying on llama.cpp's Q4_0 grid (amax on code −8, step amax/8) is represented exactly; the range
    rule's step 2·amax/15 cannot."""
    d = 0.01
    w = (torch.arange(16, dtype=torch.float64) - 8).repeat(2).view(1, 1, 32) * d  # codes −8..7, twice
    s, z = params_search(w, 4, True)
    assert s.item() == pytest.approx(d, rel=1e-12) and int(z.item()) == 8
    s0, _ = params_from_range(w.amin(-1), w.amax(-1), 4, True)
    assert s0.item() == pytest.approx(16 * d / 15)
