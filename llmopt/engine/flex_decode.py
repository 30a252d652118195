"""Decode attention over the paged pool through FlexAttention: no gather of the history and no token-level mask.

The step's decode queries are a batch of Bd one-token queries [Bd, H, 1, Dk]; the keys are the whole pool seen as
one sequence of N·bs slots [1, Hkv, N·bs, Dk] (a view, shared by every row). A BlockMask lists, per row, the pool
blocks of its sequence (`kv_indices`, block granularity, like a block table), so the kernel visits only those;
inside a listed block `mask_mod` keeps the slots whose logical position p satisfies p ≤ the query's position (the
unwritten tail of the last block) and p > position − window (sliding layers). The logical position of a slot comes
from `logical` [Bd, N]: the index of each pool block in the row's block table (−1 when not the row's) — a per-block
map, bs times smaller than the [Bd, S] masks the gathered path builds. Prefix blocks shared by several sequences
sit at the same logical index in each, so one pool serves all rows.

On CUDA the function is compiled (Triton's flex-decoding kernel; `dynamic=True`: compiled with static shapes,
every new batch size recompiles, ~5 s each measured on the CPU backend; a new BlockMask and mask_mod closure each
step do not). Elsewhere it runs eagerly, torch's reference implementation that materialises the scores — correct,
for tests and for checking the CUDA path's tokens on a CPU, not fast (torch 2.13's CPU inductor fails to compile
the dynamic-shape flex template: a C++ compile error, measured here). `probe` checks the compiled kernel once on
the model's head dims against SDPA before the engine trusts it (model_runner falls back to the gathered path and
says why if it fails). 8-bit KV pools are not served here: their per-(token, head) V scales multiply the
probabilities, which a score_mod cannot do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

Window = int | None


@dataclass(slots=True)
class FlexRows:
    """What every layer's flex decode needs in one step: one BlockMask per window, shared by the layers."""

    masks: dict[Window, object]  # window → torch.nn.attention.flex_attention.BlockMask
    span: int  # pool slots the masks cover (blocks 0..span/bs − 1): the attended view of the pool


def available() -> str | None:
    """None when FlexAttention can be used in this torch, else why not."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no FlexAttention ({e})"
    return None


@cache
def _kernel(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)
    return flex_attention


def _kernel_options(q: torch.Tensor, block_mask) -> dict | None:
    """Triton's tile along the keys must divide the mask's KV block (one pool block): with a dynamic batch the
    compiled call takes the main flex kernel, whose default tile (64–128 keys) does not divide a 16-slot block
    and fails to lower (measured on an H200, torch 2.11). The eager reference takes no options."""
    if q.device.type != "cuda":
        return None
    return {"BLOCK_N": min(block_mask.BLOCK_SIZE[1], 64)}


def block_masks(tables: torch.Tensor, logical_first: torch.Tensor, positions: torch.Tensor, num_blocks: int,
                block_size: int, windows: list[Window]) -> FlexRows:
    """tables [Bd, nb] long: each row's live pool blocks, padded with −1; logical_first [Bd]: the logical block
    index of each row's first live block; positions [Bd]: each query's position; num_blocks: blocks in the pool."""
    from torch.nn.attention.flex_attention import BlockMask

    bd, nb = tables.shape
    real = tables >= 0  # [Bd, nb]
    # the keys seen as the pool's first `num_blocks` blocks, rounded up to a power of two (few shapes for the
    # compiled kernel) that covers every block the rows use: a large, mostly idle pool costs nothing per step
    used = int(tables.max()) + 1
    num_blocks = min(num_blocks, 1 << (used - 1).bit_length())
    index = logical_first[:, None] + torch.arange(nb, device=tables.device)[None]  # [Bd, nb] logical block index
    logical = torch.full((bd, num_blocks + 1), -1, dtype=torch.long, device=tables.device)  # +1: padding lands here
    logical.scatter_(1, torch.where(real, tables, num_blocks), torch.where(real, index, -1))
    logical = logical[:, :num_blocks]  # [Bd, N]
    kv_num = real.sum(1, dtype=torch.int32).view(bd, 1, 1)  # [Bd, 1, 1]
    kv_indices = torch.zeros(bd, 1, 1, num_blocks, dtype=torch.int32, device=tables.device)  # [Bd, 1, 1, N]
    kv_indices[:, 0, 0, :nb] = torch.where(real, tables, 0).to(torch.int32)

    def mask_for(window: Window):
        def mask_mod(b, h, q_idx, kv_idx):
            block = logical[b, kv_idx // block_size]
            pos = block * block_size + kv_idx % block_size
            keep = (block >= 0) & (pos <= positions[b])
            return keep if window is None else keep & (pos > positions[b] - window)
        return BlockMask.from_kv_blocks(kv_num, kv_indices, BLOCK_SIZE=(128, block_size), mask_mod=mask_mod,
                                        seq_lengths=(1, num_blocks * block_size))

    return FlexRows({w: mask_for(w) for w in windows}, num_blocks * block_size)


def attend(q: torch.Tensor, kflat: torch.Tensor, vflat: torch.Tensor, rows: FlexRows, window: Window, scale: float,
           softcap: float | None) -> torch.Tensor:
    """q [Bd, H, Dk], pools as flat slots kflat [N·bs, Hkv, Dk] / vflat [N·bs, Hkv, Dv] (the query's dtype)
    → [Bd, H, Dv]."""
    k = kflat[:rows.span].permute(1, 0, 2).unsqueeze(0)  # [1, Hkv, span, Dk], a view
    v = vflat[:rows.span].permute(1, 0, 2).unsqueeze(0)  # [1, Hkv, span, Dv]
    block_mask = rows.masks[window]

    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap
    with warnings.catch_warnings():  # eager flex_attention warns that it is not compiled: known, on purpose
        warnings.simplefilter("ignore", UserWarning)
        out = _kernel(q.device.type)(q.unsqueeze(2), k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                     enable_gqa=True, kernel_options=_kernel_options(q, block_mask))  # [Bd, H, 1, Dv]
    return out[:, :, 0]


@cache  # once per process for a device, dtype and head shape: every engine (and draft) on them asks the same
def probe(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, k_dim: int, v_dim: int,
          block_size: int) -> str | None:
    """Run the kernel once on random rows of these dims (batch 1 and 3: the compiled kernel specialises batch 1)
    and compare with SDPA over the same keys; None when it matches, else why the engine should not use it."""
    why = available()
    if why is not None:
        return why
    gen = torch.Generator(device="cpu").manual_seed(0)
    blocks = 6
    kflat = torch.randn(blocks * block_size, kv_heads, k_dim, generator=gen).to(device, dtype)
    vflat = torch.randn(blocks * block_size, kv_heads, v_dim, generator=gen).to(device, dtype)
    try:
        for bd in (1, 3):
            tables = torch.tensor([[4, 1, 5], [0, 2, -1], [3, -1, -1]][:bd], device=device)  # [Bd, 3]
            positions = torch.tensor([2 * block_size + 1, block_size, 0][:bd], device=device)
            rows = block_masks(tables, torch.zeros(bd, dtype=torch.long, device=device), positions, blocks,
                               block_size, [None])
            q = torch.randn(bd, heads, k_dim, generator=gen).to(device, dtype)
            got = attend(q, kflat, vflat, rows, None, k_dim ** -0.5, None)
            for i in range(bd):
                table = [b for b in tables[i].tolist() if b >= 0]
                slots = torch.cat([torch.arange(b * block_size, (b + 1) * block_size) for b in table])
                slots = slots[:int(positions[i]) + 1].to(device)
                ref = F.scaled_dot_product_attention(q[i, :, None][None], kflat[slots].transpose(0, 1)[None],
                                                     vflat[slots].transpose(0, 1)[None], enable_gqa=True)
                err = (got[i].float() - ref[0, :, 0].float()).abs().max().item()
                if not err <= (1e-4 if dtype == torch.float32 else 2e-2):
                    return f"FlexAttention decode differs from SDPA by {err:.3g} on {device.type}"
    except Exception as e:  # noqa: BLE001 — a kernel that does not compile or run here: the gathered path serves
        return f"FlexAttention decode failed on {device.type}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None
