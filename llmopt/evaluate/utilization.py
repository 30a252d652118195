"""Accelerator / CPU utilisation sampled in a background thread while eval's timed runs execute.

Every `interval_s` (default 0.1 s) the sampler records this process's CPU utilisation over the last interval
(CPU time from `time.process_time()` over wall time, in percent of one core: 100 × cores at most) and, on CUDA, the
GPU's utilisation and memory in use (device-wide: every process on that GPU) from NVML (`pynvml` from nvidia-ml-py, imported only on CUDA). The report is
mean/p50/p95 of the samples (`perf.utilization` in the eval JSON); `flat()` gives the gate / CSV names
(`cpu_percent_p95`, `gpu_util_percent_mean`, `gpu_mem_used_bytes_p95`, ...).
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

import torch

STATS = ("mean", "p50", "p95")
FIELDS = ("cpu_percent", "cpu_percent_per_thread", "gpu_util_percent", "gpu_mem_used_bytes")
FLAT_METRICS: tuple[str, ...] = tuple(f"{f}_{s}" for f in FIELDS for s in STATS)


@dataclass(frozen=True, slots=True)
class Stats:
    mean: float
    p50: float
    p95: float

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        return cls(sum(samples) / len(samples), percentile(samples, 50), percentile(samples, 95))


def percentile(samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's and torch.quantile's default)."""
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(slots=True)
class Utilization:
    device: str  # "cpu" or "cuda:N"
    interval_s: float
    threads: int  # torch's intra-op threads: cpu_percent_per_thread = cpu_percent / threads
    cpu_percent: list[float] = field(default_factory=list)
    gpu_util_percent: list[float] = field(default_factory=list)
    gpu_mem_used_bytes: list[float] = field(default_factory=list)
    gpu_error: str | None = None  # why the GPU was not sampled on CUDA (nvidia-ml-py missing, NVML error)

    def to_dict(self) -> dict:
        d: dict = {"device": self.device, "samples": len(self.cpu_percent), "interval_s": self.interval_s,
                   "threads": self.threads}
        per_thread = [c / self.threads for c in self.cpu_percent]
        for name, xs in (("cpu_percent", self.cpu_percent), ("cpu_percent_per_thread", per_thread),
                         ("gpu_util_percent", self.gpu_util_percent), ("gpu_mem_used_bytes", self.gpu_mem_used_bytes)):
            if xs:
                s = Stats.of(xs)
                d[name] = {"mean": s.mean, "p50": s.p50, "p95": s.p95}
        if self.gpu_error:
            d["gpu_error"] = self.gpu_error
        return d


def flat(u: dict | None) -> dict[str, float | None]:
    """perf.utilization → {cpu_percent_mean: ..., gpu_util_percent_p95: ...} (None for what was not sampled)."""
    u = u or {}
    return {f"{f}_{s}": (u.get(f) or {}).get(s) for f in FIELDS for s in STATS}


def describe(u: dict | None) -> str:
    """A short table cell: "cpu 97/100" or "gpu 85/99" (mean/p95 %)."""
    if not u or "cpu_percent" not in u:
        return "—"
    key, label = ("gpu_util_percent", "gpu") if "gpu_util_percent" in u else ("cpu_percent", "cpu")
    return f"{label} {u[key]['mean']:.0f}/{u[key]['p95']:.0f}"


def line(u: dict) -> str:
    """Every sampled figure, mean / p50 / p95: the CLI's line under the table."""
    parts = [(f"CPU {_three(u['cpu_percent'], '%')} of one core ({u['threads']} torch threads: "
              f"{_three(u['cpu_percent_per_thread'], '%')} per thread)")]
    if "gpu_util_percent" in u:
        parts.append(f"GPU {_three(u['gpu_util_percent'], '%')}")
    if "gpu_mem_used_bytes" in u:
        mib = {k: v / 2 ** 20 for k, v in u["gpu_mem_used_bytes"].items()}
        parts.append(f"GPU memory used {_three(mib, ' MiB')}")
    if u.get("gpu_error"):
        parts.append(f"GPU not sampled: {u['gpu_error']}")
    return "; ".join(parts)


def _three(d: dict, unit: str) -> str:
    return " / ".join(f"{d[s]:.1f}{unit}" for s in STATS)


class _Nvml:
    def __init__(self, pynvml, index: int) -> None:
        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def sample(self) -> tuple[float, float]:
        n = self.nvml
        return (float(n.nvmlDeviceGetUtilizationRates(self.handle).gpu),
                float(n.nvmlDeviceGetMemoryInfo(self.handle).used))

    def close(self) -> None:
        self.nvml.nvmlShutdown()


class UtilizationSampler:
    """`with UtilizationSampler(device) as s: ...` then `s.result`. A last sample covers the time since the
    previous one when the block ends, so a block shorter than one interval still has one sample."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.1) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.result = Utilization(str(self.device), interval_s, torch.get_num_threads())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: _Nvml | None = None

    def __enter__(self) -> UtilizationSampler:  # noqa: PYI034 - not subclassed
        if self.device.type == "cuda":
            self._open_nvml()
        self._last = (time.perf_counter(), time.process_time())
        self._thread = threading.Thread(target=self._loop, name="llmopt-utilization", daemon=True)
        self._thread.start()
        return self

    def _open_nvml(self) -> None:
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            self.result.gpu_error = "nvidia-ml-py (pynvml) not installed"
            return
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")  # NVML numbers every GPU, CUDA the visible
        if index < len(visible) and visible[index].strip().isdigit():
            index = int(visible[index])
        try:
            self._nvml = _Nvml(pynvml, index)
        except pynvml.NVMLError as e:  # no NVML in the driver, no permission, ...
            self.result.gpu_error = f"NVML: {e}"

    def _sample(self, min_wall: float = 0.0) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        dwall = wall - self._last[0]
        if dwall <= min_wall:
            return
        self.result.cpu_percent.append(100.0 * (cpu - self._last[1]) / dwall)
        self._last = (wall, cpu)
        if self._nvml is not None:
            util, used = self._nvml.sample()
            self.result.gpu_util_percent.append(util)
            self.result.gpu_mem_used_bytes.append(used)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        # the tail since the last sample, unless it is a sliver (a noisy figure) and there are samples already
        self._sample(self.interval_s / 2 if self.result.cpu_percent else 0.0)
        if self._nvml is not None:
            self._nvml.close()
