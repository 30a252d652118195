"""Small shared helpers: device/dtype resolution, atomic output dirs, hashing, cache home."""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from llmopt.errors import LlmoptError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _matmul_rate(threads: int, a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    """a @ b per second on `threads` torch threads, timed for about `seconds`."""
    torch.set_num_threads(threads)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n / (time.perf_counter() - t0)


@functools.cache
def default_threads() -> int:
    """torch threads when --threads is not given: the faster of 1 thread and every usable core, timed here (about
    0.6 s, once per process) on a matmul the size of an engine step's MLP ([128, 256] @ [256, 768]), medians of 3
    interleaved rounds. All cores win on a quiet machine; on one whose cores other work keeps busy, threads that wait
    for a descheduled sibling make every op slower and 1 thread wins (figures: README, Measured results, "Default
    threads"). Benchmarks pin --threads instead."""
    cores = usable_cores()
    if cores == 1:
        return 1
    before = torch.get_num_threads()
    a, b = torch.randn(128, 256), torch.randn(256, 768)
    try:
        rounds = [(_matmul_rate(1, a, b, 0.1), _matmul_rate(cores, a, b, 0.1)) for _ in range(3)]
    finally:
        torch.set_num_threads(before)
    one, every = (statistics.median(r) for r in zip(*rounds))
    return cores if every > one else 1


def text_config(config):
    """The language model's config: multimodal configs nest it (get_text_config), plain ones are it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def llmopt_home() -> Path:
    """Cache root: $LLMOPT_HOME, else ~/.cache/llmopt."""
    return Path(os.environ.get("LLMOPT_HOME") or Path.home() / ".cache" / "llmopt")


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU; anything else is checked for availability."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LlmoptError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LlmoptError(f"device {device!r} requested but no CUDA device is available: use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """'auto' → bf16 on CUDA, fp32 on CPU (CPU half matmuls are slow and inexact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise LlmoptError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless overwrite; check a file can be created beside it. Writes nothing lasting."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LlmoptError(f"output {out} already exists: choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LlmoptError(f"output {out} is a file: choose a directory path for --out")
    probe = out.resolve().parent
    while not probe.exists():  # the first existing ancestor must take new files
        probe = probe.parent
    try:  # os.access says yes to root on a read-only filesystem: only trying tells
        if not probe.is_dir():
            raise NotADirectoryError(probe)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError:
        raise LlmoptError(f"cannot write to {probe}: choose a writable --out") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete the temp folders `atomic_dir` left beside `out` in runs that were killed (their process is gone);
    a live run's folders stay. Returns what was removed."""
    removed = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _disk_full(e: BaseException) -> bool:
    """ENOSPC as an OSError, or as the text of a library error (safetensors raises its own type)."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e) \
        or "StorageFull" in str(e)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success rename it to `out`, on any error delete it.

    An interrupted run therefore never leaves a half-written `out`; the temp dir's name carries the pid, so the
    next run for the same `out` removes what a killed one left. A full disk becomes one clear error.
    """
    out = Path(out)
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(out)
    if stale:
        logging.getLogger("llmopt").warning(f"removed {len(stale)} temp folder(s) of an earlier interrupted run "
                                            f"beside {out}: {', '.join(p.name for p in stale)}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
    except BaseException as e:
        written = _tree_bytes(tmp) if _disk_full(e) else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            free = shutil.disk_usage(out.parent).free
            # the output needs more than the space that is free there once its partial files are gone
            raise LlmoptError(f"no space left on the device holding {out.parent} while writing {out}: it needs more "
                              f"than the {free / 2 ** 20:,.1f} MiB free there ({written / 2 ** 20:,.1f} MiB had been "
                              f"written, now removed): free space or choose another --out") from None
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def atomic_write(path: Path, data: str | bytes | Callable[[Path], None]) -> None:
    """Write a file through a temp file beside it and a rename: a kill never leaves a truncated file that looks
    finished (the one writer for single files; atomic_dir is the one for checkpoint directories). data: the text,
    the bytes, or a function that writes the file at the path it is given (e.g. a plot's savefig)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")  # the suffix: savefig picks the format
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here: CUDA with bf16, or a CPU with AVX512-BF16/AMX (oneDNN's check). A torch
    build without the private probe counts as no."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False

