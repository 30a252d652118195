"""RTN core against a float64 reference written from the definition."""

import pytest
import torch

from llmopt.errors import LlmoptError
from llmopt.quant.rtn import fake_quantize_activations, rtn_quantize
from llmopt.checkpoint.types import QuantArgs


def _reference(w: torch.Tensor, bits: int, gs: int, sym: bool) -> torch.Tensor:
    """Float64 RTN, one group at a time, from the textbook formulas."""
    w = w.double()
    out = torch.empty_like(w)
    maxq = 2**bits - 1
    gs = w.shape[1] if gs == -1 else gs
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], gs):
            g = w[r, c:c + gs]
            lo, hi = min(g.min().item(), 0.0), max(g.max().item(), 0.0)
            if sym:
                a = max(-lo, hi)
                s = 2 * a / maxq or 1.0
                z = 2 ** (bits - 1)
            else:
                s = (hi - lo) / maxq or 1.0
                z = min(max(round(-lo / s), 0), maxq)
            q = torch.clamp(torch.round(g / s) + z, 0, maxq)
            out[r, c:c + gs] = (q - z) * s
    return out


@pytest.mark.parametrize("bits,gs,sym", [(4, 32, True), (4, 32, False), (8, -1, True), (3, 16, False), (4, -1, False)])
def test_rtn_matches_float64_reference(bits, gs, sym):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * torch.rand(24, 1)
    qw = rtn_quantize(w, QuantArgs(bits=bits, group_size=gs, sym=sym))
    ref = _reference(w, bits, gs, sym)
    got = qw.dequantize(torch.float64)
    assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) < 2**bits
    assert qw.scales.shape == (24, 1 if gs == -1 else 64 // gs)
    # float32 vs float64 scale can flip a rounding tie: allow a handful of one-step differences
    step = qw.scales.double().repeat_interleave(64 if gs == -1 else gs, dim=1)
    assert ((got - ref).abs() > 1e-5 * step).float().mean() < 0.01
    assert ((got - ref).abs() <= step + 1e-6).all()
    if sym:
        assert (qw.zeros == 2 ** (bits - 1)).all()


def test_rtn_error_bounded_by_half_step():
    torch.manual_seed(1)
    w = torch.randn(8, 128)
    qw = rtn_quantize(w, QuantArgs(bits=4, group_size=32, sym=False))
    step = qw.scales.repeat_interleave(32, dim=1)
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_group_size_must_divide():
    with pytest.raises(LlmoptError, match="does not divide"):
        rtn_quantize(torch.randn(4, 96), QuantArgs(bits=4, group_size=64))


def test_activation_fake_quant_per_token():
    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 1.0, -3.0]])
    y = fake_quantize_activations(x, 8)
    assert torch.allclose(y, x, atol=(x.abs().amax(1, keepdim=True) / 127 / 2 + 1e-6).max().item())
    assert y[0, 0] == 1.0 and y[1, 0] == 100.0  # each token's max is exact


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_scale_search_lowers_every_groups_error(sym):
    """--scale-search on RTN: per group the squared error is at most the range rule's (the range rule is a
    candidate), lower in total; codes and zeros keep the format's conventions."""
    torch.manual_seed(2)
    w = torch.randn(16, 128)
    plain = rtn_quantize(w, QuantArgs(bits=4, group_size=32, sym=sym))
    searched = rtn_quantize(w, QuantArgs(bits=4, group_size=32, sym=sym, scale_search=True))

    def group_err(qw):
        return ((qw.dequantize() - w) ** 2).view(16, 4, 32).sum(-1)  # [out, G]

    assert bool((group_err(searched) <= group_err(plain) * (1 + 1e-5) + 1e-9).all())
    assert group_err(searched).sum() < 0.95 * group_err(plain).sum()
    assert int(searched.qweight.max()) <= 15 and (not sym or bool((searched.zeros == 8).all()))
