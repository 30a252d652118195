"""GPTQ (Frantar et al., 2022): quantize a Linear column by column, correcting the columns still to come
with the inverse Hessian of the layer-output error, H = 2·XᵀX / n over the calibration inputs X.

Pure tensor core: `gptq_quantize(w, H, args)`. Work happens in float32 on w's device; the inverse
Hessian is factored once (Cholesky of H⁻¹, upper), updates inside a block are rank-1 and the rest of
the matrix is updated once per block (lazy batch updates), so the Python loop only touches
[out, block] tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmopt.checkpoint.types import QuantArgs, QuantizedWeight
from llmopt.errors import LlmoptError
from llmopt.quant.rtn import check_group_size, params_from_range, params_search

SYM_BLOCK = 256  # XᵀX is built block-row by block-row above the diagonal: ~0.6× the flops of the full product


class HessianAccumulator:
    """Running H = 2/n · Σ xᵀx over Linear inputs: products in float32, the sum in float64.

    Only the block rows on and above the diagonal are multiplied (H is symmetric); hessian() mirrors them.
    Each entry is the same float32 dot product as in the full xᵀx, so the result is unchanged."""

    __slots__ = ("h", "n")

    def __init__(self, n_in: int, device: torch.device) -> None:
        self.h = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)  # [in, in], upper block rows
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [T, in]
        n_in = x.shape[1]
        for i in range(0, n_in, SYM_BLOCK):
            rows = slice(i, min(i + SYM_BLOCK, n_in))
            self.h[rows, i:] += (x[:, rows].t() @ x[:, i:]).double()  # [b, in - i]
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H [in, in] float32. Consumes the accumulator: the upper blocks are mirrored in place, one block row at
        a time, so no full-size float64 temporary is made (down_proj's 5632² H is 254 MB in float64)."""
        if self.n == 0:
            raise LlmoptError("GPTQ saw no calibration inputs for a layer: check --samples and the model")
        h, n_in = self.h, self.h.shape[0]
        for i in range(0, n_in, SYM_BLOCK):
            j = min(i + SYM_BLOCK, n_in)
            block = h[i:j, i:j]  # diagonal block: its upper triangle mirrored onto its lower one
            block.copy_(torch.triu(block) + torch.triu(block, 1).t())
            h[j:, i:j] = h[i:j, j:].t()  # the block row right of it, mirrored below it
        h.mul_(2.0 / self.n)
        self.h = None  # consumed
        return h.float()


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H); retries with more damping if needed."""
    n = h.shape[0]
    diag = torch.arange(n, device=h.device)
    mean_diag = h.diagonal().mean()
    for factor in (1.0, 10.0, 100.0):
        hd = h.clone()
        hd[diag, diag] += max(damp, 1e-6) * factor * mean_diag
        chol, info = torch.linalg.cholesky_ex(hd)
        del hd  # [in, in] temporaries freed as soon as they are used: down_proj's are 127 MB each
        if info == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            chol_inv, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if info == 0:
                return chol_inv
    raise LlmoptError("GPTQ: the Hessian is not positive definite even with 100x --damp: raise --damp or "
                      "use more calibration samples")


@dataclass(slots=True)
class _GroupParams:
    """Per-group scales/zeros [out, G] (filled up front when static) and each permuted column's group."""

    scales: torch.Tensor
    zeros: torch.Tensor
    static: bool  # fixed before the column loop (per-channel or --static-groups)
    col_group: torch.Tensor  # [in] group of each (permuted) column
    hdiag: torch.Tensor | None  # [in] H's diagonal in the permuted order, the weights of --scale-search


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, consume_h: bool = False) -> QuantizedWeight:
    """GPTQ of w [out, in] given H [in, in]. Returns codes in the original column order; with act_order
    (and no static groups) g_idx maps each column to its group. consume_h: h (float32) may be overwritten,
    which saves a copy of it (127 MB for a 5632-wide input)."""
    check_group_size(w.shape[1], args.group_size)
    W = w.detach().float().clone()  # [out, in]
    H = h if consume_h and h.dtype == torch.float32 else h.float().clone()  # [in, in]
    del h
    dead = H.diagonal() == 0  # inputs that never fire: any value works, keep the Hessian invertible
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if args.act_order else None  # [in]
    params = _group_params(W, H.diagonal(), perm, args)
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    U = _inverse_hessian_cholesky(H, args.damp)  # [in, in] upper
    del H
    Q = _quantize_columns(W, U, params, args).t().to(torch.uint8)  # [out, in], permuted order
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if not params.static:
            g_idx = params.col_group[inv].to(torch.int32)  # [in] group of each original column
    return QuantizedWeight(qweight=Q.contiguous(), scales=params.scales, zeros=params.zeros.round().to(torch.int32),
                           g_idx=g_idx, bits=args.bits, group_size=args.group_size, sym=args.sym)


def _group_params(W: torch.Tensor, hdiag: torch.Tensor, perm: torch.Tensor | None, args: QuantArgs) -> _GroupParams:
    """Static groups: parameters fixed up front from the (original order) weight, so g_idx stays contiguous;
    else empty, filled by the column loop at each group's first column. hdiag [in]: H's diagonal."""
    out, n_in = W.shape
    gs = n_in if args.group_size == -1 else args.group_size
    scales = torch.empty(out, n_in // gs, device=W.device)
    zeros = torch.empty(out, n_in // gs, device=W.device)
    static = args.group_size == -1 or args.static_groups
    if static:
        static_scale, static_zero = _params(W.view(out, n_in // gs, gs), hdiag.view(-1, gs), args)  # [out, G]
        scales.copy_(static_scale)
        zeros.copy_(static_zero)
    # group of each permuted column: contiguous in the original order (static) or the permuted one (dynamic)
    order = torch.arange(n_in, device=W.device)
    col_group = (perm if perm is not None and static else order) // gs  # [in]
    weights = (hdiag if perm is None else hdiag[perm]).clone() if args.scale_search else None
    return _GroupParams(scales, zeros, static, col_group, weights)


def _params(w: torch.Tensor, hdiag: torch.Tensor | None, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [out, G] of the groups w [out, G, gs]: searched against the error weighted by H's
    diagonal [G, gs] (--scale-search), else from each group's range."""
    if args.scale_search:
        return params_search(w, args.bits, args.sym, hdiag)
    return params_from_range(w.amin(-1), w.amax(-1), args.bits, args.sym)


def _quantize_columns(W: torch.Tensor, U: torch.Tensor, params: _GroupParams, args: QuantArgs) -> torch.Tensor:
    """The GPTQ column loop over W [out, in] (modified) with U the upper Cholesky factor of H⁻¹; returns the
    codes as floats [in, out] (column-major). Dynamic groups get their parameters written into params."""
    out, n_in = W.shape
    gs = n_in if args.group_size == -1 else args.group_size
    maxq = 2 ** args.bits - 1
    scales, zeros, static = params.scales, params.zeros, params.static
    col_group_list = params.col_group.tolist()
    bs = args.block_size
    # two-level lazy updates: rank-1 updates only inside a sub-block of `sub` columns, the rest of the
    # block updated by one matmul per sub-block, the rest of the matrix by one matmul per block. Group
    # starts must fall on sub-block starts so group parameters see fully updated columns.
    sub = math.gcd(math.gcd(16, bs), 16 if static else gs)
    Qt = torch.empty(n_in, out, device=W.device)  # codes (as floats), permuted order, column-major
    d_inv = (1.0 / U.diagonal()).tolist()  # the per-column loop runs on Python floats and in-place ops
    for i1 in range(0, n_in, bs):
        i2 = min(i1 + bs, n_in)
        W1 = W[:, i1:i2].t().contiguous()  # [b, out]: a column is a contiguous row
        E1 = torch.empty_like(W1)  # [b, out] scaled errors
        U1 = U[i1:i2, i1:i2]  # [b, b]
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                g = col_group_list[col]
                if not static and col % gs == 0:
                    # group params from the fully updated columns of this group; columns past the block
                    # still owe this block's lazy update, applied here to the slice that is read
                    cols = W1[i:i + gs].t()  # [out, ≤gs]
                    if col + gs > i2:
                        rest = W[:, i2:col + gs] - E1[:i].t() @ U[i1:i1 + i, i2:col + gs]
                        cols = torch.cat([cols, rest], dim=1)  # [out, gs]
                    hd = None if params.hdiag is None else params.hdiag[col:col + gs].view(1, -1)  # [1, gs]
                    s, z = _params(cols.unsqueeze(1), hd, args)  # [out, 1]
                    scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                    s_g, z_g = scales[:, g].contiguous(), zeros[:, g].contiguous()
                elif i == 0 or col_group_list[col - 1] != g:
                    s_g, z_g = scales[:, g].contiguous(), zeros[:, g].contiguous()  # [out]
                wcol, q, err = W1[i], Qt[col], E1[i]
                torch.div(wcol, s_g, out=q).round_().add_(z_g).clamp_(0, maxq)  # code
                torch.sub(q, z_g, out=err).mul_(s_g)  # its dequantized value
                torch.sub(wcol, err, out=err).mul_(d_inv[col])  # (w - dq) / U[col, col]
                W1[i + 1:j2].addr_(U1[i, i + 1:j2], err, alpha=-1)  # rank-1 update inside the sub-block
            W1[j2:] -= U1[j1:j2, j2:].t() @ E1[j1:j2]  # [b - j2, out]
        W[:, i2:] -= E1.t() @ U[i1:i2, i2:]
    return Qt
