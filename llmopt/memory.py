"""Memory the process has used and the machine has left, and sizes as users write them (8GB, 7.5GiB, 800MB)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llmopt.errors import LlmoptError

_UNITS = {"": 1, "B": 1, "K": 10 ** 3, "KB": 10 ** 3, "M": 10 ** 6, "MB": 10 ** 6, "G": 10 ** 9, "GB": 10 ** 9,
          "T": 10 ** 12, "TB": 10 ** 12, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str, option: str = "--max-memory") -> int:
    """'8GB' → 8·10⁹ bytes, '7.5GiB' → 7.5·2³⁰, '4096MiB', '123456' (bytes)."""
    m = _SIZE.match(text or "")
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise LlmoptError(f"{option} {text!r} is not a size: write e.g. 8GB, 7.5GiB or 800MB")
    return int(float(m.group(1)) * _UNITS[unit])


def available_bytes() -> int | None:
    """Memory the machine can give this process now without swapping (Linux MemAvailable; psutil elsewhere),
    None when unknown."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size so far (what the OS had to give it at the worst moment)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def peak_gpu_bytes(device: torch.device) -> int | None:
    """Peak memory torch allocated on a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def return_freed_memory() -> None:
    """Give the allocator's freed memory back to the OS (glibc malloc_trim; nothing elsewhere).

    A streamed walk frees a layer's tensors and allocates the next one's: glibc keeps the freed blocks in its
    heap, fragmented, and the resident set grew ~31 MB per layer on a 0.97B Llama (RTN); trimmed after each
    layer it stays flat."""
    global _trim
    if _trim is None:
        try:
            import ctypes

            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
            _trim = False
    if _trim:
        _trim(0)


_trim = None


def gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB"


__all__ = ["available_bytes", "gb", "parse_size", "peak_gpu_bytes", "peak_rss_bytes", "return_freed_memory"]
