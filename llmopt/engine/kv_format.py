"""How the paged KV cache stores K and V (`--kv-dtype`): a float dtype as is, or 8-bit codes with a scale per
(token, kv head) kept beside the pages.

Quantized formats are symmetric: for each cached token and kv head, scale = amax over the head dim / qmax rounded
UP to a power of two, and codes = x / scale (int8: rounded, clamped to ±127; fp8_e4m3: cast to float8_e4m3fn).
A scale per (token, head) needs no calibration and is exact for what each new token writes, so a step only writes
its own tokens' codes and never rescales what is cached.

int8 scales are stored in one byte, as a biased power-of-two exponent (E8M0, the scale format of the OCP
Microscaling formats: value 2^(e − 127)). At head_dim 32 (builtin:tiny) that is the MXINT8 layout, 32 int8 codes
+ 1 scale byte: int8 KV takes (D + 1) / 2D = 0.516× of bfloat16 KV and (D + 1) / 4D = 0.258× of float32 (a float16
scale took (D + 2) / 2D = 0.531×). The price: a power-of-two scale up to 2× the exact amax / 127, so the codes of a
head span ±64…±127 instead of ±127 (≤ 1 bit of resolution; KLD measured in the README's KV table).
fp8_e4m3 keeps a float16 scale (amax maps to exactly ±448): with a power-of-two scale its largest values land on
e4m3's coarse top binade, which flipped greedy tokens in tests/engine/test_kv_dtype.py.
Static (calibrated) scales are kept exact: codes are taken against the layer's scale, the stored scale is 1, and
the read multiplies by the layer's scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.errors import LlmoptError
from llmopt.utils import dtype_name

KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8_e4m3")
_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
E8M0 = torch.uint8  # int8 KV scales: the scale is 2^(byte − SCALE_BIAS)
SCALE_BIAS = 127
_EXP_MIN, _EXP_MAX = -127, 127  # 2^-127 (an all-zero head: its codes are 0 whatever the scale) … 2^127
_F16_MIN = torch.finfo(torch.float16).tiny * 2 ** -10  # float16's smallest subnormal: an all-zero head stays 0


def fp8_dtype() -> torch.dtype | None:
    """torch's float8_e4m3fn where this torch has it."""
    return getattr(torch, "float8_e4m3fn", None)


@dataclass(frozen=True, slots=True)
class KVFormat:
    """Resolved storage of the KV cache: the pool dtype, and for 8-bit codes the largest code magnitude."""

    name: str  # the --kv-dtype it came from ("auto" resolved to the model's dtype name)
    dtype: torch.dtype  # the pool's element type
    qmax: float | None = None  # 127 (int8) or 448 (fp8_e4m3); None = stored as is, no scales
    scale_dtype: torch.dtype | None = None  # E8M0 (int8) or float16 (fp8_e4m3); None = no scales

    @property
    def scaled(self) -> bool:
        return self.qmax is not None

    @property
    def code_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def scale_bytes(self) -> int:
        """Bytes of one (token, head) scale, 0 when unscaled."""
        return torch.empty((), dtype=self.scale_dtype).element_size() if self.scaled else 0

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
        return KVFormat(name, torch.int8, 127.0, E8M0)
    if name == "fp8_e4m3":
        return KVFormat(name, fp8_dtype(), float(torch.finfo(fp8_dtype()).max), torch.float16)
    return KVFormat(name, _FLOATS[name])


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """Stored scales [...] (E8M0 bytes or float16) → their float32 values."""
    return torch.exp2(scales.float() - SCALE_BIAS) if scales.dtype == E8M0 else scales.float()


def _encode(amax: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Per-(token, head) amax [...] → the stored scale [...]: E8M0 rounds amax / qmax up to a power of two (so
    every code fits), float16 rounds it to nearest (codes are clamped to ±qmax)."""
    if fmt.scale_dtype == E8M0:
        exp = torch.ceil(torch.log2(amax / fmt.qmax)).clamp(_EXP_MIN, _EXP_MAX)  # log2(0) = -inf → the minimum
        return (exp + SCALE_BIAS).to(E8M0)
    return (amax / fmt.qmax).to(torch.float16).clamp_min(_F16_MIN)


def quantize(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float → codes [..., D] in fmt.dtype and scales [...] in fmt.scale_dtype,
    x ≈ codes · scale_values(scales)[..., None]."""
    assert fmt.qmax is not None
    xf = x.float()
    scale = _encode(xf.abs().amax(-1), fmt)  # [...]
    y = (xf / scale_values(scale)[..., None]).clamp(-fmt.qmax, fmt.qmax)  # [..., D]
    codes = y.round().to(torch.int8) if fmt.dtype == torch.int8 else y.to(fmt.dtype)
    return codes, scale


def quantize_static(x: torch.Tensor, scale: float, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] → codes against one calibrated scale (a layer's checkpoint k_scale / v_scale, vLLM's static
    per-tensor semantics: values beyond the calibrated amax are clamped to ±qmax) and scale bytes [...] of 2^0,
    so the scale pools stay those of dynamic scales; the read multiplies by the exact layer scale (`factor`)."""
    assert fmt.qmax is not None
    y = (x.float() / scale).clamp(-fmt.qmax, fmt.qmax)
    codes = y.round().to(torch.int8) if fmt.dtype == torch.int8 else y.to(fmt.dtype)
    one = SCALE_BIAS if fmt.scale_dtype == E8M0 else 1.0  # the stored scale 1: the read applies the layer's
    return codes, torch.full(x.shape[:-1], one, dtype=fmt.scale_dtype, device=x.device)


def scale_factors(scale_bytes: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> torch.Tensor:
    """The multipliers [...] in dtype of stored scales, times a static layer scale when there is one."""
    values = scale_values(scale_bytes)
    return (values if factor == 1.0 else values * factor).to(dtype)


def codes_to(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached K/V codes (or float KV) [...] → the same values in dtype, unscaled. float8_e4m3fn on the CPU goes
    through its bits: e4m3's sign, exponent and mantissa moved into float16's places are the value · 2^-8 exactly
    (normals and subnormals; float16 has more of both), so the result is exact, and about 9× faster than torch's
    CPU cast of float8. NaN codes, which llmopt never writes (codes clamp to ±448), would read
    as ±480."""
    if codes.dtype != fp8_dtype() or codes.device.type != "cpu":
        return codes.to(dtype)
    v = codes.view(torch.int8).to(torch.int16)  # sign-extended: bits 15..7 all hold the sign
    v.bitwise_left_shift_(7).bitwise_and_(-16385)  # sign at bit 15, exponent + mantissa at bits 13..7, bit 14 clear
    return v.view(torch.float16).to(dtype).mul_(256.0)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> torch.Tensor:
    """codes [..., D], stored scales [...] → [..., D] in dtype: the reference the attention's fused
    gather-dequantize (attention._gather_dequant) must equal."""
    return codes.to(dtype) * scale_factors(scale, dtype, factor)[..., None]
