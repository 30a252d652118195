"""--kv-budget: bytes ('512MiB', '2GB', '1e8') or a fraction of the device's free memory ('0.3')."""

from __future__ import annotations

import re

import torch

from llmopt.errors import LlmoptError

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20,
          "gib": 2 ** 30}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def free_memory(device: torch.device) -> int:
    """Bytes free on the device now (CUDA: the driver's count; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_kv_budget(text: str, device: torch.device) -> int:
    m = _BUDGET.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise LlmoptError(f"--kv-budget must be bytes (e.g. 512MiB, 2GB, 100000000) or a fraction of free memory "
                          f"in (0, 1] (got {text!r})")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not unit and 0 < value <= 1:
        return int(value * free_memory(device))
    if value <= 0:
        raise LlmoptError(f"--kv-budget must be positive (got {text!r})")
    return int(value * _UNITS[unit])
