"""Quantized Linear modules: each holds its weight in kernel layouts and picks a kernel per shape and
phase (decode's small M vs prefill's large M) by timing the candidates the first time a shape is seen.

The choice is cached per (module kind, device, N, K, group size, M bucket) and shared by all layers of
that shape, so a model pays for autotuning once per distinct shape and M bucket. `force_kernel`
(or LLMOPT_KERNEL) pins a kernel, which the tests use to check every path against float64.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from llmopt.errors import LlmoptError
from llmopt.checkpoint.formats.packing import pack_nibbles, unpack_nibbles
from llmopt.checkpoint.types import QuantizedWeight
from llmopt.runtime import kernels as K

_CHOICES: dict[tuple, str] = {}  # autotune cache shared by every layer
_TIMING_REPEATS = 3


def clear_kernel_cache() -> None:
    _CHOICES.clear()


def _bucket(m: int) -> int:
    """M rounded up to a power of two: decode (1), small batches, prefill chunks."""
    return 1 << max(0, (m - 1).bit_length())


def _time(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up: first calls pay allocation and one-time kernel setup
    times = []
    for _ in range(_TIMING_REPEATS):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class QuantLinear(torch.nn.Module):
    """Shared plumbing: shape handling, act-order input permutation, bias, kernel selection."""

    kind = "quant"

    def __init__(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size = qw.bits, qw.group_size
        self.device_type = device.type  # kernel layouts are device-specific (CPU and CUDA int4pack differ)
        self.force_kernel: str | None = os.environ.get("LLMOPT_KERNEL") or None
        self.used: dict[int, str] = {}  # M bucket → kernel that ran
        self._table: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
        bias = None if qw.bias is None else qw.bias.detach().to(device=device, dtype=dtype)
        self.register_buffer("bias", bias)
        self.register_buffer("perm", None)

    def _contiguous(self, qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
        """qw with act-order groups made contiguous; the column permutation is kept for the inputs."""
        qw, perm = _contiguous_groups(qw)
        if perm is not None:
            self.perm = perm.to(device)
        return qw

    def kernels(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Candidate kernels for this module on its device, name → fn([M, K]) → [M, N] float32."""
        raise NotImplementedError

    def _dequant(self, dtype: torch.dtype) -> torch.Tensor:
        """[N, K] weight in `dtype` (subclasses that keep codes implement it)."""
        raise NotImplementedError

    def _dequant_kernels(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The dequantize-then-matmul paths every code-keeping module has: fp32 (the reference) and bf16."""
        return {
            "dequant": lambda x: torch.nn.functional.linear(x.float(), self._dequant(torch.float32)),
            "dequant-bf16": lambda x: torch.nn.functional.linear(x.to(torch.bfloat16),
                                                                 self._dequant(torch.bfloat16)).float(),
        }

    def reference_kernel(self) -> str:
        """The pure-torch path every other kernel is tested against."""
        return "dequant"

    def _cache_key(self, bucket: int, device: torch.device) -> tuple:
        return (self.kind, device.type, self.out_features, self.in_features, self.group_size, self.bits, bucket)

    def table(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """kernels(), built once per module."""
        if self._table is None:
            self._table = self.kernels()
        return self._table

    def select(self, x2d: torch.Tensor) -> str:
        table = self.table()
        if x2d.device.type != self.device_type:
            raise LlmoptError(f"a {self.kind} layer packed for {self.device_type} got {x2d.device.type} inputs: "
                              f"load the checkpoint with device={x2d.device.type}")
        if self.force_kernel:
            if self.force_kernel not in table:
                raise LlmoptError(f"kernel {self.force_kernel!r} is not available for {self.kind} on "
                                  f"{x2d.device.type}: choose one of {', '.join(table)}")
            return self.force_kernel
        if len(table) == 1:
            return next(iter(table))
        bucket = _bucket(x2d.shape[0])
        key = self._cache_key(bucket, x2d.device)
        if key not in _CHOICES:
            probe = torch.randn(bucket, self.in_features, device=x2d.device, dtype=x2d.dtype)
            timed = {name: _time(lambda fn=fn: fn(probe), x2d.device) for name, fn in table.items()
                     if name != self.reference_kernel()}
            _CHOICES[key] = min(timed, key=timed.get)
        return _CHOICES[key]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # [M, K]
        if x2d.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        if self.perm is not None:  # act-order: weights were permuted at load time, inputs follow
            x2d = x2d.index_select(1, self.perm)
        name = self.select(x2d)
        self.used[_bucket(x2d.shape[0])] = name
        y = self.table()[name](x2d).to(x.dtype)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def _contiguous_groups(qw: QuantizedWeight) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """Turn an act-order g_idx into contiguous groups by permuting weight columns once.

    x[:, perm] @ W[:, perm].T == x @ W.T, so the module permutes its input instead of the kernel
    gathering scales per column. Returns the permuted weight and perm (None when already contiguous).
    """
    if qw.g_idx is None:
        return qw, None
    perm = torch.argsort(qw.g_idx.long(), stable=True)
    if torch.equal(perm, torch.arange(len(perm))):
        return QuantizedWeight(qw.qweight, qw.scales, qw.zeros, None, qw.bits, qw.group_size, qw.sym, qw.bias,
                               qw.act_bits), None
    return QuantizedWeight(qw.qweight[:, perm], qw.scales, qw.zeros, None, qw.bits, qw.group_size, qw.sym,
                           qw.bias, qw.act_bits), perm


class Int4Linear(QuantLinear):
    """4-bit group-wise weights: int4pack kernel (decode) or dequant-to-bf16 + bf16 GEMM (prefill).

    Memory: 0.5 byte/weight plus scales (~0.6 byte/weight at group size 128, against 4 for fp32). On CPU the
    dequant path reads the kernel's own packed layout; where that layout is unknown (CUDA, other torch builds)
    a second nibble copy is kept for it (1 byte/weight in all).
    """

    kind = "int4"

    def __init__(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qw, device, dtype)
        qw = self._contiguous(qw, device)
        self.gs = self.in_features if qw.group_size == -1 else qw.group_size
        q = qw.qweight.to(device)  # [N, K]
        scales = qw.scales.float().to(device)  # [N, G]
        zeros = qw.zeros.float().to(device)  # [N, G]
        self.register_buffer("scales", scales)
        self.register_buffer("zero_scale", zeros * scales)  # [N, G]
        self.register_buffer("nibbles", None)
        self.has_int4pack = K.int4pack_supported(self.out_features, self.in_features, qw.group_size, device)
        if self.has_int4pack:
            self.register_buffer("packed", K.int4pack_weight(q))
            self.kernel_gs = K.int4pack_group_size(self.in_features, qw.group_size)
            split = self.gs // self.kernel_gs  # kernel groups per quantization group, sharing its scale
            self.register_buffer("scale_zeros", K.int4pack_scales_zeros(
                scales.repeat_interleave(split, dim=1), zeros.repeat_interleave(split, dim=1)))  # [G', N, 2] bf16
        if not (self.has_int4pack and device.type == "cpu" and K.int4pack_cpu_layout_ok()):
            self.nibbles = pack_nibbles(q)  # [N, K/2]

    def codes(self) -> torch.Tensor:
        """[N, K] uint8 codes for the dequant paths, from whichever packed copy this module keeps."""
        if self.nibbles is not None:
            return unpack_nibbles(self.nibbles)
        return K.unpack_int4pack_cpu(self.packed, self.out_features, self.in_features)

    def _dequant(self, dtype: torch.dtype) -> torch.Tensor:
        return K.dequant_codes(self.codes(), self.scales, self.zero_scale, dtype)

    def kernels(self):
        table = self._dequant_kernels()
        if self.has_int4pack:
            table["int4pack"] = lambda x: K.int4pack_mm(x, self.packed, self.kernel_gs, self.scale_zeros)
        return table


class Int8Linear(QuantLinear):
    """8-bit weight-only: int8pack kernel with bf16 activations (CPU, per channel) or dequant paths.

    Asymmetric per-channel zeros fold into a rank-1 correction: x·((q-z)s)ᵀ = x·((q-128)s)ᵀ + Σx·(128-z)s.
    """

    kind = "int8"

    def __init__(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qw, device, dtype)
        qw = self._contiguous(qw, device)
        gs = self.in_features if qw.group_size == -1 else qw.group_size
        self.n_groups = self.in_features // gs
        self.register_buffer("w_s8", (qw.qweight.to(device).to(torch.int16) - 128).to(torch.int8))  # [N, K]
        scales = qw.scales.float().to(device)  # [N, G]
        self.register_buffer("scales", scales)
        self.register_buffer("zero_shift", (128 - qw.zeros.float().to(device)) * scales)  # [N, G]
        self.per_channel = self.n_groups == 1
        self.has_int8pack = self.per_channel and device.type == "cpu"
        self.asym = bool((qw.zeros.float() != 128).any())
        if self.has_int8pack:
            self.register_buffer("scales_bf16", scales[:, 0].to(torch.bfloat16))

    def _dequant(self, dtype: torch.dtype) -> torch.Tensor:
        n, k = self.w_s8.shape
        w = self.w_s8.view(n, self.n_groups, k // self.n_groups).to(dtype)  # [N, G, gs]
        return (w * self.scales.to(dtype)[..., None] + self.zero_shift.to(dtype)[..., None]).view(n, k)

    def _int8pack(self, x: torch.Tensor) -> torch.Tensor:
        y = K.int8pack_mm(x, self.w_s8, self.scales_bf16)
        if self.asym:
            y = y + x.float().sum(-1, keepdim=True) * self.zero_shift[:, 0]
        return y

    def kernels(self):
        table = self._dequant_kernels()
        if self.has_int8pack:
            table["int8pack"] = self._int8pack
        return table


class W8A8Linear(QuantLinear):
    """INT8 per-channel symmetric weights × dynamic per-token INT8 activations via torch._int_mm."""

    kind = "w8a8"

    def __init__(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qw, device, dtype)
        if qw.group_size != -1 or not bool((qw.zeros.float() == 128).all()):
            raise LlmoptError("W8A8 layers need symmetric per-channel int8 weights")
        w = (qw.qweight.to(device).to(torch.int16) - 128).to(torch.int8)  # [N, K]
        self.register_buffer("w_s8", w)
        self.register_buffer("w_colsum", w.to(torch.int32).sum(1))  # [N], removes the u8 offset
        self.register_buffer("w_scales", qw.scales.float().to(device).view(1, -1))  # [1, N]
        self.int_mm_ok = device.type == "cpu" or (self.in_features % 8 == 0 and self.out_features % 8 == 0)

    def kernels(self):
        table = {"dequant": lambda x: K.w8a8_reference(x, self.w_s8.float() * self.w_scales.view(-1, 1))}
        if self.int_mm_ok:
            table["int_mm"] = lambda x: K.int_mm_w8a8(x, self.w_s8.t(), self.w_colsum, self.w_scales)
        return table


def _uniform_groups(qw: QuantizedWeight) -> bool:
    """Whether every group holds group_size columns, so permuting columns makes groups contiguous."""
    if qw.g_idx is None:
        return True
    gs = qw.shape[1] if qw.group_size == -1 else qw.group_size
    return bool((torch.bincount(qw.g_idx.long(), minlength=qw.scales.shape[1]) == gs).all())


def build_linear(qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> QuantLinear:
    """The runtime module for one QuantizedWeight."""
    if qw.act_bits is not None:
        if qw.act_bits != 8 or qw.bits != 8:
            raise LlmoptError(f"W{qw.bits}A{qw.act_bits} is not supported: llmopt runs W8A8 (int8) only")
        return W8A8Linear(qw, device, dtype)
    if not _uniform_groups(qw):  # an unusual g_idx: the gather-based dequant path handles any grouping
        return DequantLinear(qw, device, dtype)
    if qw.bits == 4:
        return Int4Linear(qw, device, dtype)
    if qw.bits == 8:
        return Int8Linear(qw, device, dtype)
    return DequantLinear(qw, device, dtype)


class DequantLinear(QuantLinear):
    """2/3-bit (or any) weights with no low-bit kernel: dequantize on the fly, codes kept as uint8."""

    kind = "dequant"

    def __init__(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qw, device, dtype)
        self.register_buffer("q", qw.qweight.to(device=device, dtype=torch.uint8))
        self.register_buffer("scales", qw.scales.float().to(device))
        self.register_buffer("zeros", qw.zeros.float().to(device))
        self.register_buffer("g", qw.group_index().to(device))

    def kernels(self):
        def run(x: torch.Tensor) -> torch.Tensor:
            w = (self.q.float() - self.zeros[:, self.g]) * self.scales[:, self.g]  # [N, K]
            return torch.nn.functional.linear(x.float(), w)
        return {"dequant": run}
