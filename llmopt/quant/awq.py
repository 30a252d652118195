"""AWQ (Lin et al., 2023): activation-aware weight quantization.

1. Scale search: for the Linears that read one input X, try s = mean|X|^α (normalised) for α on a grid,
   quantize W·s, and keep the α whose output X·(Q(W·s)/s)ᵀ is closest to X·Wᵀ. α = 0 (s = 1, plain RTN)
   is on the grid, so the chosen scales never do worse than RTN on the search tokens. The scales are folded
   into the preceding op (families.registry.fold_scales), leaving the float function unchanged.
2. Clip search: per output channel and group, shrink the weight range by a ratio r ≤ 1 and keep the r
   whose group output error dᵀ·(XᵍᵀXᵍ)·d is smallest; r = 1 (no clipping) is on the grid.

Pure tensor functions; the layer walk (walk.py, via methods.Awq) gathers the statistics (AwqStats) and applies
the results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmopt.checkpoint.types import QuantArgs, QuantizedWeight
from llmopt.quant.rtn import fake_quantize, params_from_range, rtn_quantize
from llmopt.utils import fast_bf16

SEARCH_ROWS = 1 << 14  # weight rows per loss evaluation in the scale search
SEARCH_TOKENS = 2048  # tokens kept for the scale search (the clip search uses every token through Gram blocks)
TRI_BLOCKS = 4  # row blocks of the triangular sample factor in the scale search
CLIP_MAX_SHRINK = 0.5  # smallest ratio tried is 1 - CLIP_MAX_SHRINK·(grid-1)/grid


class AwqStats:
    """Per-Linear-input statistics: Σ|x| per channel, Σ xᵍᵀxᵍ per group (block-diagonal Gram), a token sample."""

    __slots__ = ("abs_sum", "gram", "group_size", "n", "sample", "stride")

    def __init__(self, n_in: int, group_size: int, total_tokens: int, device: torch.device) -> None:
        gs = n_in if group_size == -1 else group_size
        self.group_size = gs
        self.abs_sum = torch.zeros(n_in, dtype=torch.float64, device=device)  # [in]
        self.gram = torch.zeros(n_in // gs, gs, gs, dtype=torch.float64, device=device)  # [G, gs, gs]
        self.sample: list[torch.Tensor] = []
        self.n = 0
        self.stride = max(1, -(-total_tokens // SEARCH_TOKENS))  # ceil: ~SEARCH_TOKENS evenly spread tokens

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [T, in]
        t = x.shape[0]
        self.abs_sum += x.abs().sum(0).double()
        xg = x.view(t, -1, self.group_size).transpose(0, 1)  # [G, T, gs]
        self.gram += (xg.transpose(1, 2) @ xg).double()
        first = (-self.n) % self.stride  # keep global token indices that are multiples of stride
        self.sample.append(x[first::self.stride].clone())
        self.n += t

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()  # [in]

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.sample)  # [S, in]

    def gram_blocks(self) -> torch.Tensor:
        return (self.gram / max(self.n, 1)).float()  # [G, gs, gs]


def _rtn_fake(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """RTN quantize-dequantize of w [out, in], in the grouped view (no per-column copies of scale/zero)."""
    out, n_in = w.shape
    wg = w.reshape(out, n_in // args.group_size if args.group_size != -1 else 1, -1)  # [out, G, gs]
    scale, zero = params_from_range(wg.amin(-1), wg.amax(-1), args.bits, args.sym)  # [out, G]
    return fake_quantize(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), args.bits).view(out, n_in)


def compress_sample(x: torch.Tensor) -> torch.Tensor:
    """x [S, in] → r [min(S, in), in] with rᵀr = xᵀx, so ‖x·Dᵀ‖² = ‖r·Dᵀ‖² for every D.

    The search loss is a squared norm of x·Dᵀ; when the sample has more tokens than channels, the R factor
    of x = QR gives exactly the same losses at in/S of the cost of every grid point."""
    if x.shape[0] <= x.shape[1]:
        return x
    return torch.linalg.qr(x.float(), mode="r").R  # [in, in]


def ranking_dtype(device: torch.device) -> torch.dtype:
    """The matmul dtype of the search losses: bfloat16 where it is fast (CUDA with bf16, CPUs with AVX512-BF16
    or AMX: 2.2× fp32 here), else float32. The losses only rank the grid: bf16 inputs with fp32 accumulation move
    a loss by <0.1% relative, so a pick can only change between grid points whose true losses are that close
    (tested against float64); AutoAWQ ranks its grid in fp16 on GPUs."""
    return torch.bfloat16 if fast_bf16(device) else torch.float32


def _row_blocks(r: torch.Tensor, triangular: bool) -> list[tuple[torch.Tensor, int]]:
    """r → [(rows of r from its first nonzero column c on, c)]. An upper-triangular R is zero left of the
    diagonal, so row block i needs only the columns from its first row on: ~0.6× the matmul work of r @ dᵀ
    with 4 blocks, the same loss."""
    if not triangular:
        return [(r, 0)]
    step = -(-r.shape[0] // TRI_BLOCKS)
    return [(r[i:i + step, i:].contiguous(), i) for i in range(0, r.shape[0], step)]


def search_scales(x: torch.Tensor, x_mean: torch.Tensor, weights: list[torch.Tensor], args: QuantArgs
                  ) -> tuple[torch.Tensor, float, float, float]:
    """x [S, in] sample, x_mean [in], weights [[out_i, in]] → (s [in], α, best loss, loss at α=0 i.e. RTN).

    loss(α) = mean over the sample of (x·Q(W·s)/sᵀ − x·Wᵀ)², computed as ‖r·(Q(W·s)/s − W)ᵀ‖² / (S·out).
    W is never concatenated: its rows are evaluated SEARCH_ROWS at a time (all experts of an MoE block share one
    search: DeepSeek-V3's 256 experts' gate/up rows would be a 30 GB float32 matrix)."""
    rows = [wi[i:i + SEARCH_ROWS] for wi in weights for i in range(0, wi.shape[0], SEARCH_ROWS)]  # [≤R, in] views
    denom = x.shape[0] * sum(wi.shape[0] for wi in weights)
    dt = ranking_dtype(x.device)
    r = compress_sample(x.float()).to(dt)  # [≤in, in]
    blocks = _row_blocks(r, triangular=x.shape[0] > x.shape[1])
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    rtn_loss = float("nan")
    for k in range(args.awq_grid):
        alpha = k / args.awq_grid
        s = x_mean.clamp(min=1e-4).pow(alpha)  # [in]
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 in log space
        loss = sum(_search_loss(w.float(), s, blocks, dt, args) for w in rows) / denom
        if k == 0:
            rtn_loss = loss
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], best[2], rtn_loss


def _search_loss(w: torch.Tensor, s: torch.Tensor, blocks: list[tuple[torch.Tensor, int]], dt: torch.dtype,
                 args: QuantArgs) -> float:
    """‖r·(Q(W·s)/s − W)ᵀ‖² for rows w [R, in]: one [R, b] product per row block of r."""
    d = (_rtn_fake(w * s, args) / s - w).to(dt)  # [R, in] weight error of this α
    return sum(F.linear(d[:, c:], rb).float().pow(2).sum().item() for rb, c in blocks)


def search_clip(w: torch.Tensor, gram: torch.Tensor, args: QuantArgs, chunk: int = 4096) -> torch.Tensor:
    """w [out, in] (already scaled), gram [G, gs, gs] of its inputs → clip ratio [out, G] per group."""
    out, n_in = w.shape
    g_count, gs, _ = gram.shape
    wg = w.float().view(out, g_count, gs).transpose(0, 1)  # [G, out, gs]: one batched matmul per grid point
    wmin, wmax = wg.amin(-1), wg.amax(-1)  # [G, out]
    best_ratio = torch.ones(g_count, out, device=w.device)
    best_err = torch.full((g_count, out), float("inf"), device=w.device)
    for k in range(args.awq_grid):
        r = 1 - CLIP_MAX_SHRINK * k / args.awq_grid
        scale, zero = params_from_range(wmin * r, wmax * r, args.bits, args.sym)  # [G, out]
        err = torch.empty(g_count, out, device=w.device)
        for o in range(0, out, chunk):  # d·Gram·d per (group, channel), chunked over channels to bound memory
            wc = wg[:, o:o + chunk]  # [G, c, gs]
            d = fake_quantize(wc, scale[:, o:o + chunk, None], zero[:, o:o + chunk, None], args.bits) - wc
            err[:, o:o + chunk] = (torch.bmm(d, gram) * d).sum(-1)  # [G, c]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return best_ratio.t().contiguous()  # [out, G]


def awq_quantize(w_scaled: torch.Tensor, gram_scaled: torch.Tensor | None, args: QuantArgs) -> QuantizedWeight:
    """Quantize an already-scaled weight [out, in] with the clip search (gram over the scaled inputs)."""
    clip = search_clip(w_scaled, gram_scaled, args) if args.awq_clip and gram_scaled is not None else None
    return rtn_quantize(w_scaled, args, clip=clip)
