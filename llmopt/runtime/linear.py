"""Quantized Linear modules: each holds its weight in kernel layouts and picks a kernel per shape and
phase (decode's small M vs prefill's large M) by a fixed rule, `_RULES`, measured with bench/kernel_choice.py.

A rule rather than timing at the first forward: a timed choice and the first request's latency depend on
machine noise, so two runs of the same model could run different kernels. LLMOPT_KERNEL_TUNE=1 opts into
timing instead, once per machine and shape: the winner is stored in $LLMOPT_HOME/kernels.json (keyed by torch
version, device name, threads, kind, N, K, group size, bits and M bucket) and read back by later processes.
`force_kernel` (or LLMOPT_KERNEL) pins a kernel, which the tests use to check every path against float64.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmopt.checkpoint.formats.packing import pack_nibbles, unpack_nibbles
from llmopt.checkpoint.types import QuantizedWeight
from llmopt.errors import LlmoptError
from llmopt.runtime import kernels as K
from llmopt.runtime import vnni as V
from llmopt.utils import fast_bf16, llmopt_home, write_json

ANY_M = 1 << 62

# Per (kind, device class): (largest M bucket, kernel) rows tried in order; the first row whose bound holds and
# whose kernel the module has wins, else the module's first non-reference kernel. The device class is "cuda",
# "cpu" (fast bf16 matmuls: AVX512-BF16/AMX, utils.fast_bf16) or "cpu-slow-bf16".
# CPU rows: bench/kernel_choice.py, torch 2.13 on a 2-core Xeon with AMX, 1 and 2 threads, N×K 2048×2048 and
# 5632×2048, int4 g32/g128 and int8 per channel, medians of interleaved calls. The low-bit kernels cost ∝ M while
# dequant-bf16 is a fixed dequantize plus an AMX GEMM that barely grows, so the crossover is in M, not the
# shape. int4pack won every M ≤ 64 but one (2-5× at M = 32-64); at 128 it won half the cases by 1.7-2.3× and
# lost the others by ≤ 12%; at 256 dequant-bf16 won 9 of 14 (losing by ≤ 20%), at 512 all (2-3×). int8pack won
# 6 of 7 at M = 64, half at 128, none of 7 at 256 (dequant-bf16 1.05-4× faster there).
# With oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, which fast_bf16 reports as slow) dequant-bf16 grew
# 15 ms → 210 ms from M=1 to 256 and the low-bit kernels won at every M up to 256 (3-6×).
# CUDA rows are not measured (no GPU here): tinygemm int4pack is built for small batches and cuBLAS bf16 for
# large ones, so the same split; W8A8's cuBLASLt _int_mm is the only non-reference kernel.
# "vnni" (runtime/vnni.py, where the CPU has AVX512-VNNI; a module built with it keeps no torch kernel layout):
# bench/kernel_choice.py-style timings on a 2-core AMD EPYC (AVX-512, no AMX), torch 2.13, 2 threads, 5632×2048:
# 1.7-1.8× int4pack at M = 1 (g32 and g128), 1.6-2.8× at M = 4-64, 2.6× dequant-bf16 at M = 128 and 1.5× at
# 512; 2.6× int8pack at M = 1, 1.9-2.9× at M = 4-64. With AMX tiles (Intel Sapphire Rapids on) the bf16 GEMM of
# dequant-bf16 is several times faster than without, so there it keeps M > 128 (not measured against vnni).
# W8A8 runs vnni at every M although oneDNN's _int_mm is faster for long prefills (0.97B Llama at M = 128: 184 vs
# 228 tok/s), because a module keeps one layout and decode is where the time goes.
_VNNI_MAX_M = 128 if V.cpu_has_amx() else ANY_M
_RULES: dict[tuple[str, str], tuple[tuple[int, str], ...]] = {
    ("int4", "cpu"): ((_VNNI_MAX_M, "vnni"), (128, "int4pack"), (ANY_M, "dequant-bf16")),
    ("int4", "cpu-slow-bf16"): ((ANY_M, "vnni"), (ANY_M, "int4pack"), (ANY_M, "dequant-bf16")),
    ("int4", "cuda"): ((64, "int4pack"), (ANY_M, "dequant-bf16")),
    ("int8", "cpu"): ((_VNNI_MAX_M, "vnni"), (64, "int8pack"), (ANY_M, "dequant-bf16")),
    ("int8", "cpu-slow-bf16"): ((ANY_M, "vnni"), (ANY_M, "int8pack"), (ANY_M, "dequant-bf16")),
    ("int8", "cuda"): ((ANY_M, "dequant-bf16"),),
    ("w8a8", "cpu"): ((ANY_M, "vnni"), (ANY_M, "int_mm"),),
    ("w8a8", "cpu-slow-bf16"): ((ANY_M, "vnni"), (ANY_M, "int_mm"),),
    ("w8a8", "cuda"): ((ANY_M, "int_mm"),),
}
VNNI_ENV = "LLMOPT_VNNI"  # "0": build CPU modules with torch's kernels (bf16 activations) instead of vnni's
TUNE_ENV = "LLMOPT_KERNEL_TUNE"
_TIMING_REPEATS = 5
_PLANNED_M = 256  # inputs of up to this many rows keep their bound path (see QuantLinear._plan)
_TUNED: dict[str, str] | None = None  # kernels.json's timed choices, read on first use (tuning opted into)


def device_class(device: torch.device) -> str:
    """The rule's device class (see _RULES)."""
    if device.type == "cpu" and not fast_bf16(device):
        return "cpu-slow-bf16"
    return device.type


def rule_kernel(kind: str, device: str, bucket: int, table: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                reference: str) -> str:
    """The rule's kernel for a module of `kind` on device class `device` at M bucket `bucket`, among `table`'s."""
    for max_bucket, name in _RULES.get((kind, device), ()):
        if bucket <= max_bucket and name in table:
            return name
    return next((name for name in table if name != reference), reference)


def tuned_cache_path() -> Path:
    return llmopt_home() / "kernels.json"


def clear_kernel_cache() -> None:
    """Forget the timed choices read from kernels.json (the next tuned forward reads the file again)."""
    global _TUNED
    _TUNED = None


def _tuned_choices() -> dict[str, str]:
    global _TUNED
    if _TUNED is None:
        path = tuned_cache_path()
        try:
            _TUNED = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError):  # a damaged cache is only lost measurements: time again
            _TUNED = {}
    return _TUNED


@functools.cache
def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux: platform's name is all there is
        return platform.processor() or platform.machine()


def _machine(device: torch.device) -> str:
    """What a timing depends on besides the shape: torch, the device and (on CPU) the thread count."""
    if device.type == "cuda":
        return f"torch {torch.__version__} | {torch.cuda.get_device_name(device)}"
    return f"torch {torch.__version__} | {_cpu_name()} | {torch.get_num_threads()} threads"


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


class _Rebinds:
    """A QuantLinear attribute a bound path depends on: setting it drops the module's bound paths."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else obj.__dict__[self.slot]

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value
        obj._plans.clear()


class QuantLinear(torch.nn.Module):
    """Shared plumbing: shape handling, act-order input permutation, bias, kernel selection."""

    kind = "quant"
    force_kernel = _Rebinds()  # pinning a kernel changes what a forward runs
    siblings = _Rebinds()  # so does joining a sibling group (fuse_siblings)

    def __init__(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size = qw.bits, qw.group_size
        self.device_type = device.type  # kernel layouts are device-specific (CPU and CUDA int4pack differ)
        self.device_class = device_class(device)
        self._plans: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}  # M → the bound path
        self.force_kernel: str | None = os.environ.get("LLMOPT_KERNEL") or None
        self.used: dict[int, str] = {}  # M bucket → kernel that ran
        self.vnni: V.Packed | None = None
        self._kernel: V.Kernel | None = None
        self.siblings: Siblings | None = None  # set by fuse_siblings
        self._table: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
        bias = None if qw.bias is None else qw.bias.detach().to(device=device, dtype=dtype)
        self.register_buffer("bias", bias)
        self.register_buffer("perm", None)

    def _apply(self, fn, recurse=True):
        self._plans.clear()  # .to()/.half() replace the bias and perm a bound path holds
        return super()._apply(fn, recurse)

    def _contiguous(self, qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
        """qw with act-order groups made contiguous; the column permutation is kept for the inputs."""
        qw, perm = _contiguous_groups(qw)
        if perm is not None:
            self.perm = perm.to(device)
        return qw

    def _vnni_ok(self, device: torch.device, group_size: int, zeros: torch.Tensor) -> bool:
        """Whether this module runs runtime/vnni.py's kernel (then it keeps only that layout)."""
        return (device.type == "cpu" and os.environ.get(VNNI_ENV, "1") != "0" and V.unavailable() is None
                and V.supported(self.out_features, self.in_features, group_size) and V.exact_in_half(zeros))

    def _pack_vnni(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, sym_zero: float,
                   group_size: int, per_token: bool = False) -> None:
        """Codes [N, K], scales and zeros [N, G] → the tile16 buffers; zeros are kept only when not all sym_zero."""
        asym = not bool((zeros == sym_zero).all())
        half = V.exact_in_half(scales)
        # scales and zeros kept as their bits in integer tensors, so model.to(dtype) leaves them alone
        self.register_buffer("vnni_tiles", V.pack_codes(q, self.bits))
        self.register_buffer("vnni_scales", V.as_bits(V.pack_groups(scales, half)))
        self.register_buffer("vnni_zeros", V.as_bits(V.pack_groups(zeros, True)) if asym else None)
        self.vnni = V.Packed(V.Variant(self.bits, asym, half), self.out_features, self.in_features, group_size,
                             per_token)

    def _vnni(self, x: torch.Tensor) -> torch.Tensor:
        return self._vnni_kernel()(x)

    def _vnni_kernel(self) -> V.Kernel:
        if self._kernel is None or self._kernel.tensors[0] is not self.vnni_tiles:  # bind once (again if replaced)
            self._kernel = V.Kernel(self.vnni, self.vnni_tiles, self.vnni_scales, self.vnni_zeros)
        return self._kernel

    def _vnni_s8(self) -> torch.Tensor:
        """[N, K] int8 weight codes − 128 from the vnni layout (8-bit modules' dequant paths)."""
        return (V.unpack_codes(self.vnni_tiles, 8).to(torch.int16) - 128).to(torch.int8)

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

    def _cache_key(self, bucket: int, device: torch.device) -> str:
        parts = (_machine(device), self.kind, self.out_features, self.in_features, self.group_size, self.bits, bucket)
        return " | ".join(map(str, parts))

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
                hint = f" (torch's kernels: {VNNI_ENV}=0)" if self.vnni is not None else ""
                raise LlmoptError(f"kernel {self.force_kernel!r} is not available for {self.kind} on "
                                  f"{x2d.device.type}: choose one of {', '.join(table)}{hint}")
            return self.force_kernel
        if len(table) == 1:
            return next(iter(table))
        bucket = _bucket(x2d.shape[0])
        if os.environ.get(TUNE_ENV) == "1":
            return self._tuned(bucket, x2d)
        return rule_kernel(self.kind, self.device_class, bucket, table, self.reference_kernel())

    def _tuned(self, bucket: int, x2d: torch.Tensor) -> str:
        """The timed choice for this shape on this machine: kernels.json's, else timed now and stored there."""
        table, choices = self.table(), _tuned_choices()
        key = self._cache_key(bucket, x2d.device)
        if choices.get(key) not in table:
            probe = torch.randn(bucket, self.in_features, device=x2d.device, dtype=x2d.dtype)  # [bucket, K]
            timed = {name: _time(lambda fn=fn: fn(probe), x2d.device) for name, fn in table.items()
                     if name != self.reference_kernel()}
            choices[key] = min(timed, key=timed.get)
            tuned_cache_path().parent.mkdir(parents=True, exist_ok=True)
            write_json(tuned_cache_path(), choices)
        return choices[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # nothing here trains: keep the float paths from recording a graph
            with torch.no_grad():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)  # [M, K]
        m = x2d.shape[0]
        if x.device.type != self.device_type:
            raise LlmoptError(f"a {self.kind} layer packed for {self.device_type} got {x.device.type} inputs: "
                              f"load the checkpoint with device={x.device.type}")
        run = self._plans.get(m)
        if run is None:
            if m == 0:
                return x.new_empty(*x.shape[:-1], self.out_features)
            run = self._plan(x2d)
            if m <= _PLANNED_M:  # decode and small batches repeat their M every step; prefill lengths vary
                self._plans[m] = run
        return run(x, x2d).view(*x.shape[:-1], self.out_features)

    def _plan(self, x2d: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The path for inputs of x2d's M, bound once: decode runs it every token, so the kernel choice, the
        sibling check and the bias test are made here rather than per call. Returns fn(x, x2d) → [M, N]."""
        name = self.select(x2d)
        self.used[_bucket(x2d.shape[0])] = name
        # the vnni kernel is bound now: .to() and fuse_siblings, which replace its buffers, drop the plans
        fn = self._vnni_kernel() if name == "vnni" else self.table()[name]
        perm, bias, siblings = self.perm, self.bias, self.siblings

        if name == "vnni" and siblings is not None and perm is None:
            def core(x: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
                return siblings.output(self, x, x2d)
        elif perm is not None:  # act-order: weights were permuted at load time, inputs follow
            def core(x: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
                return fn(x2d.index_select(1, perm))
        else:
            def core(x: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
                return fn(x2d)

        def run(x: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
            y = core(x, x2d)  # [M, N] float32 (or x's dtype)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            return y if bias is None else y + bias

        return run

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
        if self._vnni_ok(device, qw.group_size, zeros):
            self._pack_vnni(q, scales, zeros, 8.0, qw.group_size)
            self.has_int4pack = False
            return
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
        if self.vnni is not None:
            return V.unpack_codes(self.vnni_tiles, 4)
        if self.nibbles is not None:
            return unpack_nibbles(self.nibbles)
        return K.unpack_int4pack_cpu(self.packed, self.out_features, self.in_features)

    def _dequant(self, dtype: torch.dtype) -> torch.Tensor:
        return K.dequant_codes(self.codes(), self.scales, self.zero_scale, dtype)

    def kernels(self):
        table = self._dequant_kernels()
        if self.has_int4pack:
            table["int4pack"] = lambda x: K.int4pack_mm(x, self.packed, self.kernel_gs, self.scale_zeros)
        if self.vnni is not None:
            table["vnni"] = self._vnni
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
        scales = qw.scales.float().to(device)  # [N, G]
        zeros = qw.zeros.float().to(device)  # [N, G]
        self.register_buffer("scales", scales)
        self.register_buffer("zero_shift", (128 - zeros) * scales)  # [N, G]
        self.per_channel = self.n_groups == 1
        self.register_buffer("w_s8", None)
        if self._vnni_ok(device, qw.group_size, zeros):
            self._pack_vnni(qw.qweight.to(device), scales, zeros, 128.0, qw.group_size)
        else:
            self.w_s8 = (qw.qweight.to(device).to(torch.int16) - 128).to(torch.int8)  # [N, K]
        self.has_int8pack = self.per_channel and device.type == "cpu" and self.vnni is None
        self.asym = bool((qw.zeros.float() != 128).any())
        if self.has_int8pack:
            self.register_buffer("scales_bf16", scales[:, 0].to(torch.bfloat16))

    def _dequant(self, dtype: torch.dtype) -> torch.Tensor:
        w_s8 = self._vnni_s8() if self.vnni is not None else self.w_s8
        n, k = w_s8.shape
        w = w_s8.view(n, self.n_groups, k // self.n_groups).to(dtype)  # [N, G, gs]
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
        if self.vnni is not None:
            table["vnni"] = self._vnni
        return table


class W8A8Linear(QuantLinear):
    """INT8 per-channel symmetric weights × dynamic per-token INT8 activations via torch._int_mm."""

    kind = "w8a8"

    def __init__(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qw, device, dtype)
        if qw.group_size != -1 or not bool((qw.zeros.float() == 128).all()):
            raise LlmoptError("W8A8 layers need symmetric per-channel int8 weights")
        self.register_buffer("w_scales", qw.scales.float().to(device).view(1, -1))  # [1, N]
        self.register_buffer("w_s8", None)
        self.register_buffer("w_colsum", None)
        zeros = qw.zeros.float().to(device)
        if self._vnni_ok(device, -1, zeros):  # the same integer products as int_mm: per-token activations
            self._pack_vnni(qw.qweight.to(device), self.w_scales.view(-1, 1), zeros, 128.0, -1, per_token=True)
        else:
            w = (qw.qweight.to(device).to(torch.int16) - 128).to(torch.int8)  # [N, K]
            self.w_s8, self.w_colsum = w, w.to(torch.int32).sum(1)  # [N, K], [N] (removes the u8 offset)
        self.int_mm_ok = self.vnni is None and (device.type == "cpu" or (self.in_features % 8 == 0
                                                                          and self.out_features % 8 == 0))

    def kernels(self):
        w_s8 = self._vnni_s8 if self.vnni is not None else (lambda: self.w_s8)
        table = {"dequant": lambda x: K.w8a8_reference(x, w_s8().float() * self.w_scales.view(-1, 1))}
        if self.int_mm_ok:
            table["int_mm"] = lambda x: K.int_mm_w8a8(x, self.w_s8.t(), self.w_colsum, self.w_scales)
        if self.vnni is not None:
            table["vnni"] = self._vnni
        return table


# Sibling projections that read one input tensor in the standard decoder blocks (Llama, Qwen, Mistral, Gemma,
# their MoE experts): one vnni call computes all of them (one activation quantization, one thread launch).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Siblings:
    """Layers of one input run as one vnni kernel; each layer takes its own columns of the joint output.

    The joint output is reused only by the first call of each member on the very same input tensor (object
    identity, and its version counter where it has one), so a layer called twice, or on anything else,
    computes afresh.
    """

    def __init__(self, members: list[QuantLinear]):
        joint, views = V.concat([(m.vnni, m.vnni_tiles, m.vnni_scales, m.vnni_zeros) for m in members])
        self.kernel = V.Kernel(*joint)
        self.cols, start = {}, 0
        for m, (tiles, scales, zeros) in zip(members, views):
            m.vnni_tiles, m.vnni_scales = tiles, scales  # the layer's buffers become views of the joint storage
            if zeros is not None:
                m.vnni_zeros = zeros
            m.siblings = self
            self.cols[id(m)] = (start, start + m.out_features)
            start += m.out_features
        self._x: torch.Tensor | None = None  # the input the joint output is of, and its version
        self._version: int | None = None
        self._out: torch.Tensor | None = None
        self._unread: set[int] = set()

    def output(self, m: QuantLinear, x: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
        version = None if x.is_inference() else x._version
        if self._x is not x or self._version != version or id(m) not in self._unread:
            self._out, self._x, self._version, self._unread = self.kernel(x2d), x, version, set(self.cols)
        self._unread.discard(id(m))
        if not self._unread:
            self._x = None  # every member has read it: drop the reference to the input
        a, b = self.cols[id(m)]
        return self._out[:, a:b].contiguous()


def fuse_siblings(model: torch.nn.Module) -> int:
    """Join each parent's SIBLINGS that run vnni on the same variant and input size; the number of groups."""
    groups = 0
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, QuantLinear) and m.vnni is not None and m.perm is None for m in members):
                continue
            if len({(m.vnni.variant, m.vnni.per_token, m.in_features, m.vnni.group_size) for m in members}) == 1:
                Siblings(members)
                groups += 1
    return groups


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
