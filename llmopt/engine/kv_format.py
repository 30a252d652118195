"""How the paged KV cache stores K and V (`--kv-dtype`): a float dtype as is, or 8-bit codes with a scale per
(token, kv head) kept beside the pages.

Quantized formats are symmetric: for each cached token and kv head, scale = amax over the head dim / qmax and
codes = x / scale (int8: rounded, clamped to ±127; fp8_e4m3: cast to float8_e4m3fn after a clamp to ±448). A
scale per (token, head) needs no calibration and is exact for what each new token writes, so a step only writes
its own tokens' codes and never rescales what is cached.

Scales are stored as float16: 2 bytes per (token, head) next to head_dim code bytes keeps int8 KV at
(D + 2) / 4D of float32 KV (0.266× at head_dim 32, the builtin model's), where float32 scales would cost
(D + 4) / 4D (0.281×). float16's 11-bit mantissa rounds a scale by ≤ 2^-11 relative, below the int8 step
(1/254 of amax); codes are computed against the rounded scale, so that rounding adds no error of its own beyond
a clamp. A scale below float16's normal range loses relative precision but its absolute error (≤ 127 · 2^-24)
stays far below any value attention can tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.errors import LlmoptError
from llmopt.utils import dtype_name

KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8_e4m3")
_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCALE_DTYPE = torch.float16
_SCALE_MIN = torch.finfo(torch.float16).tiny * 2 ** -10  # float16's smallest subnormal: an all-zero head stays 0


def fp8_dtype() -> torch.dtype | None:
    """torch's float8_e4m3fn where this torch has it."""
    return getattr(torch, "float8_e4m3fn", None)


@dataclass(frozen=True, slots=True)
class KVFormat:
    """Resolved storage of the KV cache: the pool dtype, and for 8-bit codes the largest code magnitude."""

    name: str  # the --kv-dtype it came from ("auto" resolved to the model's dtype name)
    dtype: torch.dtype  # the pool's element type
    qmax: float | None = None  # 127 (int8) or 448 (fp8_e4m3); None = stored as is, no scales

    @property
    def scaled(self) -> bool:
        return self.qmax is not None

    @property
    def code_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def scale_bytes(self) -> int:
        """Bytes of one (token, head) scale, 0 when unscaled."""
        return torch.empty((), dtype=SCALE_DTYPE).element_size() if self.scaled else 0

    def lossy_for(self, model_dtype: torch.dtype) -> bool:
        """Whether storing the model's K/V in this format changes them (what KV-quality measurement is for)."""
        return self.scaled or self.dtype != model_dtype


def check_kv_dtype(name: str) -> None:
    """One-line LlmoptError for a --kv-dtype this build cannot store."""
    if name not in KV_DTYPES:
        raise LlmoptError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)} (got {name!r})")
    if name == "fp8_e4m3" and fp8_dtype() is None:
        raise LlmoptError(f"--kv-dtype fp8_e4m3 needs torch.float8_e4m3fn, which torch {torch.__version__} lacks: "
                          f"use --kv-dtype int8")


def resolve_kv_format(name: str, model_dtype: torch.dtype) -> KVFormat:
    """--kv-dtype → KVFormat for a model computing in model_dtype ("auto" = that dtype, today's cache)."""
    check_kv_dtype(name)
    if name == "auto":
        return KVFormat(dtype_name(model_dtype), model_dtype)
    if name == "int8":
        return KVFormat(name, torch.int8, 127.0)
    if name == "fp8_e4m3":
        return KVFormat(name, fp8_dtype(), float(torch.finfo(fp8_dtype()).max))
    return KVFormat(name, _FLOATS[name])


def quantize(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float → codes [..., D] in fmt.dtype and scales [...] float16, x ≈ codes · scales[..., None]."""
    assert fmt.qmax is not None
    xf = x.float()
    scale = (xf.abs().amax(-1) / fmt.qmax).to(SCALE_DTYPE).clamp_min(_SCALE_MIN)  # [...]
    y = (xf / scale.float()[..., None]).clamp(-fmt.qmax, fmt.qmax)  # [..., D]
    codes = y.round().to(torch.int8) if fmt.dtype == torch.int8 else y.to(fmt.dtype)
    return codes, scale


def quantize_static(x: torch.Tensor, scale: float, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] → codes against one calibrated scale (a layer's checkpoint k_scale / v_scale, vLLM's static
    per-tensor semantics: values beyond the calibrated amax are clamped to ±qmax) and that scale broadcast to
    [...] float16, so the scale pools and the dequantizing read stay the same as for dynamic scales."""
    assert fmt.qmax is not None
    s = torch.tensor(scale, dtype=SCALE_DTYPE, device=x.device).clamp_min(_SCALE_MIN)
    y = (x.float() / s.float()).clamp(-fmt.qmax, fmt.qmax)
    codes = y.round().to(torch.int8) if fmt.dtype == torch.int8 else y.to(fmt.dtype)
    return codes, s.expand(x.shape[:-1]).contiguous()


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D], scales [...] → [..., D] in dtype: the reference the attention's fused gather-dequantize
    (attention._gather_dequant) must equal."""
    return codes.to(dtype) * scale.to(dtype)[..., None]
