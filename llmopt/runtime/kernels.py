"""Low-bit matmul kernels over torch's ops, each `[M, K] activations → [M, N]` in float32 or the kernel's own
output dtype (the caller casts to the activations' dtype, so no kernel rounds through float32 just to come back:
on CUDA each extra cast is one more launch), plus the pure-torch dequant references they are tested against.
Every function here is stateless.

Conventions: codes q in [0, 2**bits), w = (q - zero) * scale, groups contiguous along K.
"""

from __future__ import annotations

import torch

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm accepts
INT4PACK_CPU_INNER_K_TILES = 1  # CPU kernel ignores the tiling argument but requires it


def on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


# ---- int4 (weight-only, group-wise) ----------------------------------------------------------------

def int4pack_group_size(n_in: int, group_size: int) -> int:
    """The kernel group size for these groups: a supported size dividing them (a group of 512 runs as two
    groups of 256 sharing one scale), or 0 when there is none."""
    gs = n_in if group_size == -1 else group_size
    return next((g for g in reversed(INT4PACK_GROUP_SIZES) if gs % g == 0), 0)


def int4pack_supported(n_out: int, n_in: int, group_size: int, device: torch.device) -> bool:
    """Whether _weight_int4pack_mm can run this shape (the dequant path always can)."""
    if not int4pack_group_size(n_in, group_size):
        return False
    if device.type == "cuda":
        return n_out % 8 == 0 and _cuda_inner_k_tiles(n_in) > 0
    return n_out % 16 == 0 and n_in % 2 == 0


def _cuda_inner_k_tiles(n_in: int) -> int:
    """Largest tiling the CUDA kernel accepts for K (K must divide into tiles·16 columns); 0 if none."""
    return next((t for t in (8, 4, 2) if n_in % (t * 16) == 0), 0)


def int4pack_weight(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes → the kernel's packed layout on q's device (pack once, at load time)."""
    if on_cuda(q):
        # CUDA takes [N, K/2] uint8 with the even column in the high nibble
        packed = ((q[:, 0::2].to(torch.uint8) << 4) | q[:, 1::2].to(torch.uint8)).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(packed, _cuda_inner_k_tiles(q.shape[1]))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(),
                                                             INT4PACK_CPU_INNER_K_TILES)


def int4pack_scales_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[N, G] scales and integer zeros → the kernel's [G, N, 2] bf16 (scale, zero) table.

    The kernel computes w = (q - 8) * scale + zero, so its zero is (8 - z) * scale.
    """
    s = scales.float()
    kz = (8 - zeros.float()) * s
    return torch.stack((s, kz), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, N, 2]


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """[M, K] → [M, N]; activations go in as bf16 (fp32 inputs make these kernels 2-80× slower)."""
    xb = x.to(torch.bfloat16).contiguous()
    sz = sz.to(torch.bfloat16)  # no-op unless model.to(dtype) cast the table
    if on_cuda(x):
        return torch.ops.aten._weight_int4pack_mm(xb, packed, group_size, sz)  # [M, N] bf16
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, sz)  # [M, N] bf16


def unpack_int4pack_cpu(packed: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """The CPU kernel's [N, K/2] layout back to [N, K] codes, so the dequant path needs no second copy.

    Rows come in blocks of 64, then one block of the remaining N % 64 rows, each stored column by column.
    In a 64-row block byte j of a column holds rows j (low nibble) and 32 + j (high); in the last block
    rows 2j and 2j + 1. This is torch's internal layout, so `int4pack_cpu_layout_ok` checks it once per process.
    """
    flat = packed.reshape(-1)
    head = n_out // 64 * 64
    parts = []
    if head:
        b = flat[: head * n_in // 2].view(head // 64, n_in, 32)  # [N/64, K, 32]
        q = torch.cat((b & 0xF, b >> 4), dim=-1)  # [N/64, K, 64]: rows j, then 32 + j
        parts.append(q.permute(0, 2, 1).reshape(head, n_in))
    tail = n_out - head
    if tail:
        b = flat[head * n_in // 2:].view(n_in, tail // 2)  # [K, T/2]
        q = torch.stack((b & 0xF, b >> 4), dim=-1).view(n_in, tail)  # rows 2j, 2j + 1
        parts.append(q.t())
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


_LAYOUT_OK: bool | None = None


def int4pack_cpu_layout_ok() -> bool:
    """Whether unpack_int4pack_cpu inverts this torch build's _convert_weight_to_int4pack_for_cpu."""
    global _LAYOUT_OK
    if _LAYOUT_OK is None:
        gen = torch.Generator().manual_seed(0)
        ok = True
        for n_out in (16, 32, 48, 64, 112):  # every row-block kind and mix
            q = torch.randint(0, 16, (n_out, 64), generator=gen, dtype=torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4PACK_CPU_INNER_K_TILES)
            ok = ok and tuple(packed.shape) == (n_out, 32) and torch.equal(unpack_int4pack_cpu(packed, n_out, 64).int(), q)
        _LAYOUT_OK = ok
    return _LAYOUT_OK


def dequant_codes(q: torch.Tensor, scales: torch.Tensor, zero_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] codes → [N, K] weight in `dtype`: q * s - z * s, group by group."""
    n_out, n_in = q.shape
    n_groups = scales.shape[1]
    w = q.view(n_out, n_groups, n_in // n_groups).to(dtype)  # [N, G, gs]
    return (w * scales.to(dtype)[..., None] - zero_scale.to(dtype)[..., None]).view(n_out, n_in)


# ---- int8 weight-only --------------------------------------------------------------------------------

def int8pack_mm(x: torch.Tensor, w_s8: torch.Tensor, scales_bf16: torch.Tensor) -> torch.Tensor:
    """[M, K] bf16-cast activations × [N, K] int8 per-channel weights (CPU kernel)."""
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), w_s8,
                                              scales_bf16.to(torch.bfloat16)).float()


# ---- W8A8: dynamic per-token int8 activations ------------------------------------------------------

def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float → (int8 codes [M, K], scales [M, 1] float32), symmetric.

    Same arithmetic as compressed-tensors' dynamic token quantization (scale = absmax / 127.5, clamp to
    [-128, 127], round half to even), so llmopt and transformers see identical activation codes.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.5  # [M, 1]
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    q = torch.round(torch.clamp(xf / scale, -128, 127)).to(torch.int8)
    return q, scale


def int_mm_w8a8(x: torch.Tensor, w_t: torch.Tensor, w_colsum: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """[M, K] activations × int8 weights given as the [K, N] view of [N, K] storage → [M, N] float32.

    CPU: u8 activations (x + 128) hit oneDNN's fast u8·s8 path; the +128 is removed with the weights'
    column sums. CUDA: s8·s8 through cuBLASLt, which needs M > 16 (rows padded with zeros). On CUDA this
    eager path is ~15 launches per Linear, which a launch-bound decode step pays for: 0.30× bf16's decode
    speed measured on an H200 (1B Llama, batch 1 and 16, bench/gpu_check.py).
    """
    q, s = quantize_per_token(x)
    if on_cuda(x):
        m = q.shape[0]
        if m <= 16:
            q = torch.nn.functional.pad(q, (0, 0, 0, 17 - m))
        acc = torch._int_mm(q, w_t)[:m]  # [M, N] int32
    else:
        xu = (q.to(torch.int16) + 128).to(torch.uint8)
        acc = torch._int_mm(xu, w_t) - 128 * w_colsum  # [M, N] int32
    return acc.float() * s * w_scales


def w8a8_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Fake-quantized activations × dequantized weight in float32 (what the int path must equal)."""
    q, s = quantize_per_token(x)
    return torch.nn.functional.linear(q.float() * s, w.float())
