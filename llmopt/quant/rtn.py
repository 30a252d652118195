"""Round-to-nearest (RTN): the baseline every other quantizer is compared with.

Pure tensor functions. Code convention (see types.py): codes q in [0, 2**bits - 1], w = (q - zero) * scale,
symmetric means zero = 2**(bits-1) for every group. Symmetric scales follow the GPTQ convention
scale = 2·amax / (2**bits - 1), so the representable range [-2**(bits-1), 2**(bits-1) - 1]·scale spans
the weight range with half a step of clipping at the positive end.
"""

from __future__ import annotations

import torch

from llmopt.checkpoint.types import QuantArgs, QuantizedWeight
from llmopt.errors import LlmoptError


def n_groups(n_in: int, group_size: int) -> int:
    return 1 if group_size == -1 else n_in // group_size


def check_group_size(n_in: int, group_size: int, name: str = "layer") -> None:
    if group_size != -1 and n_in % group_size:
        raise LlmoptError(f"--group-size {group_size} does not divide {name}'s input dimension {n_in}: "
                          f"use a divisor of {n_in} or -1 (per channel)")


def params_from_range(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and integer zero points from per-group minima/maxima (any matching shapes).

    The range is widened to include 0 so that zero stays exactly representable.
    """
    maxq = 2 ** bits - 1
    wmin = wmin.clamp(max=0)
    wmax = wmax.clamp(min=0)
    if sym:
        amax = torch.maximum(-wmin, wmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (wmax - wmin) / maxq
        zero = None
    # an all-zero group: any positive scale represents it exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if zero is None:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def params_search(w: torch.Tensor, bits: int, sym: bool, weight: torch.Tensor | None = None,
                  steps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales and zeros [out, G] that minimise the (weighted) squared rounding error of w [out, G, gs],
    searched over a grid instead of read off the range; weight [G, gs] (≥ 0, e.g. the Hessian diagonal: how much
    each input column's error costs at the output) or None for plain MSE.

    Symmetric: scale = t·amax/(2**(bits-1) − 0.5) for `steps` values of t in [0.80, 1.07] — from clipping the
    range to putting amax exactly on the most positive code (amax/7 at 4 bits) — plus amax on the most negative
    code exactly (llama.cpp's Q4_0 rule, step amax/8). Asymmetric: the range [min, max] shrunk by t in [0.80, 1].
    t = 1 (params_from_range's choice) is always a candidate, so the result is never worse on the objective.
    """
    half = 2 ** (bits - 1)
    lo, hi = (0.80, (half - 0.5) / (half - 1)) if sym else (0.80, 1.0)
    ts = sorted({*torch.linspace(lo, hi, steps).tolist(), 1.0, *(((half - 0.5) / half,) if sym else ())})
    wmin, wmax = w.amin(-1), w.amax(-1)  # [out, G]
    per_chunk = max(1, (1 << 24) // max(1, w.numel()))  # candidates tried at once: ≤ 16M elements in flight
    best = torch.full_like(wmin, float("inf"))  # [out, G]
    best_s, best_z = torch.empty_like(wmin), torch.empty_like(wmin)
    for i in range(0, len(ts), per_chunk):
        t = torch.tensor(ts[i:i + per_chunk], dtype=w.dtype, device=w.device).view(-1, 1, 1)  # [T, 1, 1]
        s, z = params_from_range(wmin * t, wmax * t, bits, sym)  # [T, out, G]
        e = fake_quantize(w, s.unsqueeze(-1), z.unsqueeze(-1), bits).sub_(w).pow_(2)  # [T, out, G, gs]
        err, k = (e if weight is None else e.mul_(weight.to(w.dtype))).sum(-1).min(0)  # [out, G]: first best
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s.gather(0, k[None])[0], best_s)
        best_z = torch.where(better, z.gather(0, k[None])[0], best_z)
    return best_s, best_z


def group_range(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] → (min, max) each [out, n_groups]."""
    out, n_in = w.shape
    g = w.reshape(out, n_groups(n_in, group_size), -1)  # [out, G, gs]
    return g.amin(-1), g.amax(-1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize, codes clamp(round(w / scale) + zero, 0, 2**bits − 1), then dequantize; scale and zero broadcast
    against w. One buffer of the broadcast shape: the scale searches call it on [candidates, out, G, gs]."""
    return torch.div(w, scale).round_().add_(zero).clamp_(0, 2 ** bits - 1).sub_(zero).mul_(scale)


def expand_groups(t: torch.Tensor, group_size: int, n_in: int) -> torch.Tensor:
    """[out, G] per-group values → [out, in] per-column values for contiguous groups."""
    gs = n_in if group_size == -1 else group_size
    return t.repeat_interleave(gs, dim=1)


def rtn_quantize(w: torch.Tensor, args: QuantArgs, clip: torch.Tensor | None = None) -> QuantizedWeight:
    """RTN of w [out, in]; `clip` [out, G] optionally shrinks each group's range (AWQ's clip search), else
    args.scale_search picks each group's scale for the least squared error (data-free: unweighted)."""
    out, n_in = w.shape
    check_group_size(n_in, args.group_size)
    w = w.float()
    if args.scale_search and clip is None:
        scale, zero = params_search(w.view(out, n_groups(n_in, args.group_size), -1), args.bits, args.sym)
    else:
        wmin, wmax = group_range(w, args.group_size)  # [out, G]
        if clip is not None:
            wmin, wmax = wmin * clip, wmax * clip
        scale, zero = params_from_range(wmin, wmax, args.bits, args.sym)  # [out, G]
    # the codes on the [out, G, gs] view, scale/zero broadcast per group: no [out, in] copies
    q = w.reshape(out, scale.shape[1], -1) / scale.unsqueeze(-1)  # [out, G, gs]
    q = q.round_().add_(zero.unsqueeze(-1)).clamp_(0, 2 ** args.bits - 1).reshape(out, n_in)
    return QuantizedWeight(qweight=q.to(torch.uint8), scales=scale, zeros=zero.to(torch.int32), g_idx=None,
                           bits=args.bits, group_size=args.group_size, sym=args.sym)


def fake_quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic per-token symmetric quantization of activations x [..., in] (what W8A8 kernels do)."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax  # [..., 1]
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
