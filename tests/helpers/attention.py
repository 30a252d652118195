"""Independent references for the engine's paged attention tests."""

from __future__ import annotations

import torch


def slots_of(table: list[int], bs: int, first: int, last: int) -> list[int]:
    return [table[p // bs] * bs + p % bs for p in range(first, last + 1)]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        softcap: float | None) -> torch.Tensor:
    """q [H, Dk], k [S, Hkv, Dk], v [S, Hkv, Dv] (float64) → [H, Dv], query head h on kv head h // G."""
    h, hkv = q.shape[0], k.shape[1]
    kk = k.repeat_interleave(h // hkv, dim=1)  # [S, H, Dk]
    vv = v.repeat_interleave(h // hkv, dim=1)
    s = torch.einsum("hd,shd->hs", q, kk) * scale  # [H, S]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return torch.einsum("hs,shd->hd", s.softmax(-1), vv)
