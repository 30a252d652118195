"""safetensors shards read and written one tensor at a time, for models that do not fit in memory.

`ShardReader` validates every shard a checkpoint names (index entries present, each header well formed, each file
exactly as long as its header says) before anything is read, then reads single tensors with plain file reads
into fresh buffers: no mmap, so nothing but the tensor asked for counts in the process's resident memory.
`ShardWriter` appends tensors to the current shard's data file as they come and writes its header when the shard
is full (safetensors puts the header first, so the data is copied once behind it); at `close` the shards get
save_pretrained's names (`model-00001-of-0000N.safetensors`, or `model.safetensors` when one suffices) and the
index `model.safetensors.index.json`. Memory stays one tensor, whatever the shard size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from llmopt.errors import LlmoptError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_BYTES = 4 << 30  # split weights into files of at most ~4 GiB, like save_pretrained does
MAX_HEADER = 100 * 2 ** 20  # the safetensors library's own cap on a header's size
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
DTYPE_BYTES = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}
_NAMES = {dt: name for name, dt in DTYPES.items()}
_HINT = ": re-download or re-export the checkpoint"


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype, shape and byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of its first byte
    nbytes: int


def read_header(f: Path) -> tuple[int, dict]:
    """(header length, header dict) of one safetensors file, checked against the file's size: a truncated, empty
    or garbled file becomes one clear error naming it instead of a library traceback halfway through a run."""
    size = f.stat().st_size
    bad = f"{f} is not a valid safetensors file"
    if size < 8:
        raise LlmoptError(f"{bad} ({'empty' if size == 0 else f'{size} bytes'}){_HINT}")
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise LlmoptError(f"{bad} (header of {n:,} bytes in a {size:,}-byte file: truncated or garbage){_HINT}")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise LlmoptError(f"{bad} (its header is not JSON){_HINT}")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(x) for x in t["data_offsets"])
            want = DTYPE_BYTES.get(t["dtype"], 0) * math.prod(int(d) for d in t["shape"])
        except (KeyError, TypeError, ValueError):
            raise LlmoptError(f"{bad} (entry {name!r} of its header is malformed){_HINT}") from None
        if lo < 0 or hi < lo or (t["dtype"] in DTYPE_BYTES and hi - lo != want):
            raise LlmoptError(f"{bad} (tensor {name!r}: offsets {lo}..{hi} do not fit its dtype and shape){_HINT}")
        end = max(end, hi)
    if 8 + n + end != size:
        raise LlmoptError(f"{bad} ({size:,} bytes, its header describes {8 + n + end:,}: "
                          f"{'truncated' if size < 8 + n + end else 'trailing bytes'}){_HINT}")
    return n, header


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its index names (each must exist), else all."""
    index = path / INDEX_NAME
    if not index.exists():
        return sorted(path.glob("*.safetensors"))
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise LlmoptError(f"{index} is not a valid weight index (JSON with a weight_map): re-export the "
                          f"checkpoint") from None
    missing = [s for s in shards if not (path / s).exists()]
    if missing:
        raise LlmoptError(f"{path} lacks the shard {missing[0]} that {index.name} names ({len(missing)} missing): "
                          f"the download or copy is incomplete")
    return [path / s for s in shards]


class ShardReader:
    """Every tensor of a checkpoint directory by name, read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        files = weight_files(self.path)
        if not files:
            raise LlmoptError(f"{self.path} holds no .safetensors weights")
        for f in files:
            n, header = read_header(f)
            for name, t in header.items():
                if name == "__metadata__":
                    continue
                if t["dtype"] not in DTYPES:
                    raise LlmoptError(f"{f}: tensor {name!r} has dtype {t['dtype']}, which torch cannot hold")
                lo, hi = (int(x) for x in t["data_offsets"])
                self.entries[name] = TensorEntry(f, DTYPES[t["dtype"]], tuple(int(d) for d in t["shape"]),
                                                 8 + n + lo, hi - lo)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in a fresh CPU buffer of its own dtype and shape."""
        e = self.entries[name]
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        with open(e.file, "rb") as fh:
            fh.seek(e.start)
            if fh.readinto(memoryview(buf.numpy())) != e.nbytes:
                raise LlmoptError(f"{e.file} ended inside tensor {name!r}: the file changed while being read{_HINT}")
        return buf.view(e.dtype).reshape(e.shape)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Write tensors into safetensors shards of at most `shard_bytes` as they come (see the module docstring)."""

    def __init__(self, out: Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.out = Path(out)
        self.shard_bytes = shard_bytes
        self.done: list[tuple[Path, list[str]]] = []  # finished shards (temporary names) and their tensors
        self.header: dict[str, dict] = {}
        self.size = 0
        self.data = None  # the open data file of the current shard
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.header or any(name in names for _, names in self.done):
            raise LlmoptError(f"tensor {name} written twice")  # a bug, not user input
        nbytes = t.numel() * t.element_size()
        if self.size and self.size + nbytes > self.shard_bytes:
            self._finish_shard()
        if self.data is None:
            self.data = open(self.out / f".shard-{len(self.done) + 1}.data", "wb")  # noqa: SIM115 (open across adds)
        self.data.write(_tensor_bytes(t))
        self.header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.size, self.size + nbytes]}
        self.size += nbytes
        self.total += nbytes

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.add(name, t)

    def _finish_shard(self) -> None:
        """Header (padded to 8 bytes, as the safetensors library does) then the data behind it."""
        data_path = Path(self.data.name)
        self.data.close()
        header = {"__metadata__": {"format": "pt"}, **self.header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        shard = self.out / f".shard-{len(self.done) + 1}.safetensors"
        with open(shard, "wb") as fh, open(data_path, "rb") as src:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            shutil.copyfileobj(src, fh, 16 << 20)
        data_path.unlink()
        self.done.append((shard, list(self.header)))
        self.header, self.size, self.data = {}, 0, None

    def close(self) -> list[Path]:
        """Finish the last shard, give every shard its final name, write the index when there are several."""
        if self.data is not None:
            self._finish_shard()
        if len(self.done) == 1:
            final = self.out / WEIGHTS_NAME
            os.replace(self.done[0][0], final)
            return [final]
        n = len(self.done)
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self.done, 1):
            final = self.out / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        (self.out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                       "weight_map": weight_map}, indent=2))
        return files


__all__ = ["DTYPES", "INDEX_NAME", "SHARD_BYTES", "WEIGHTS_NAME", "ShardReader", "ShardWriter", "TensorEntry",
           "read_header", "weight_files"]
