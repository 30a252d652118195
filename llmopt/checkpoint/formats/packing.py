"""Bit packing shared by the formats: pure tensor functions, no I/O.

All three formats store low-bit codes as a dense little-endian bit stream inside int32 words:
element i of a packed run starts at global bit i*bits (word i*bits // 32), and an element that
does not fit in the rest of a word continues in the low bits of the next one. For 2/4/8 bits this
is the familiar "element k of a word sits at bits [k*bits, (k+1)*bits)" layout; for 3 bits it is
GPTQ's 10-1-10-1-10 scheme (32 values in 3 words). compressed-tensors packs along the input
dimension of [out, in] (and zero points along the output dimension), GPTQ packs qweight along the
input dimension of [in, out] and qzeros along the output dimension, AWQ (GEMM) packs 4-bit values
along the output dimension after interleaving each run of 8 columns as [0, 2, 4, 6, 1, 3, 5, 7].
"""

from __future__ import annotations

import math

import torch

_WORD = 32
_MASK32 = (1 << 32) - 1
_ROWS_PER_CHUNK = 1 << 14  # bounds the int64 working copy when packing large matrices

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # packed nibble k of an AWQ word holds column AWQ_ORDER[k] of its run of 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # inverse permutation of AWQ_ORDER


def packed_len(n: int, bits: int) -> int:
    """Number of int32 words holding n values of `bits` bits."""
    return math.ceil(n * bits / _WORD)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns → int32 with the same bits (two's complement wrap)."""
    words = words & _MASK32
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] integer codes in [0, 2**bits) → [R, ceil(C*bits/32)] int32, packed along dim 1."""
    rows, cols = values.shape
    padded = math.ceil(cols / _WORD) * _WORD
    if _WORD % bits == 0:  # 2/4/8 bits: no value spans two words; OR the shifted values straight into int32
        per = _WORD // bits  # (the top value's shift wraps into the sign bit: the same 32-bit pattern)
        v = torch.nn.functional.pad(values.to(torch.int32), (0, padded - cols)).view(rows, padded // per, per)
        words = v[..., 0].clone()  # [R, C'/per]
        for k in range(1, per):
            words |= v[..., k] << (k * bits)
        return words[:, : packed_len(cols, bits)].contiguous()
    v = torch.nn.functional.pad(values.to(torch.int64), (0, padded - cols))  # [R, C']
    v = v.view(rows, padded // _WORD, _WORD)  # [R, runs, 32]: 32 values fill exactly `bits` words
    out = torch.zeros(rows, padded // _WORD, bits, dtype=torch.int64, device=values.device)  # [R, runs, bits]
    for i in range(_WORD):
        word, off = divmod(i * bits, _WORD)
        out[:, :, word] |= (v[:, :, i] << off) & _MASK32
        if off + bits > _WORD:  # spills into the next word
            out[:, :, word + 1] |= v[:, :, i] >> (_WORD - off)
    return _to_int32(out.view(rows, -1)[:, : packed_len(cols, bits)])


def _unpack_rows(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """[R, W] int32 → [R, cols] uint8 codes (inverse of _pack_rows)."""
    rows, n_words = words.shape
    runs = math.ceil(cols / _WORD)
    w = torch.nn.functional.pad(words.to(torch.int64) & _MASK32, (0, runs * bits - n_words))
    w = w.view(rows, runs, bits)  # [R, runs, bits]
    out = torch.empty(rows, runs, _WORD, dtype=torch.int64, device=words.device)  # [R, runs, 32]
    mask = (1 << bits) - 1
    for i in range(_WORD):
        word, off = divmod(i * bits, _WORD)
        val = w[:, :, word] >> off
        if off + bits > _WORD:
            val = val | (w[:, :, word + 1] << (_WORD - off))
        out[:, :, i] = val & mask
    return out.view(rows, -1)[:, :cols].to(torch.uint8)


def pack_bits(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack a 2-D tensor of unsigned codes in [0, 2**bits) into int32 words along `dim` (0 or 1)."""
    if values.dim() != 2 or dim not in (0, 1):
        raise ValueError(f"pack_bits expects a 2-D tensor and dim 0 or 1, got shape {tuple(values.shape)}, dim {dim}")
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits supports 1..8 bits, got {bits}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack at {bits} bits")
    v = values.t() if dim == 0 else values
    chunks = [_pack_rows(v[r:r + _ROWS_PER_CHUNK], bits) for r in range(0, v.shape[0], _ROWS_PER_CHUNK)]
    out = torch.cat(chunks) if chunks else torch.zeros(0, packed_len(v.shape[1], bits), dtype=torch.int32)
    return out.t().contiguous() if dim == 0 else out


def unpack_bits(words: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Inverse of pack_bits: int32 words → uint8 codes with n entries along `dim`."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"unpack_bits expects a 2-D int32 tensor, got {words.dtype} {tuple(words.shape)}")
    if words.shape[dim] != packed_len(n, bits):
        raise ValueError(f"{words.shape[dim]} packed words along dim {dim} cannot hold {n} values of {bits} bits")
    w = words.t() if dim == 0 else words
    chunks = [_unpack_rows(w[r:r + _ROWS_PER_CHUNK], bits, n) for r in range(0, w.shape[0], _ROWS_PER_CHUNK)]
    out = torch.cat(chunks) if chunks else torch.zeros(0, n, dtype=torch.uint8)
    return out.t().contiguous() if dim == 0 else out


def awq_interleave(values: torch.Tensor) -> torch.Tensor:
    """[R, C] → columns of every run of 8 reordered as AWQ_ORDER (C must be a multiple of 8)."""
    rows, cols = values.shape
    order = torch.tensor(AWQ_ORDER, device=values.device)
    return values.view(rows, cols // 8, 8).index_select(2, order).reshape(rows, cols)


def awq_deinterleave(values: torch.Tensor) -> torch.Tensor:
    """Inverse of awq_interleave."""
    rows, cols = values.shape
    order = torch.tensor(AWQ_REVERSE_ORDER, device=values.device)
    return values.view(rows, cols // 8, 8).index_select(2, order).reshape(rows, cols)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] 4-bit codes (K even) → [N, K/2] uint8, low nibble = even column (runtime's compact copy)."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: [N, K/2] uint8 → [N, K] uint8."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)
