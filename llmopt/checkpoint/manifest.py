"""`llmopt.json`: what llmopt records beside every checkpoint it writes (quantized, distilled, built-in).

One writer and one reader, so every checkpoint carries the same header: `kind` (quantized | distilled |
builtin), `llmopt_version` and `torch`, then the fields of the command that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmopt.errors import LlmoptError

MANIFEST = "llmopt.json"
KINDS = ("quantized", "distilled", "builtin")


def write_manifest(directory: Path, kind: str, fields: dict) -> None:
    """Write directory/llmopt.json: the common header, then `fields` (JSON-serialisable; paths become strings)."""
    import torch

    from llmopt import __version__

    if kind not in KINDS:
        raise ValueError(f"manifest kind must be one of {KINDS}, got {kind!r}")
    body = {"kind": kind, "llmopt_version": __version__, "torch": torch.__version__, **fields}
    (Path(directory) / MANIFEST).write_text(json.dumps(body, indent=2, default=str) + "\n")


def read_manifest(directory: Path) -> dict:
    """directory/llmopt.json as a dict ({} when the checkpoint has none: e.g. a model from the hub)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LlmoptError(f"{path} is not valid JSON: re-run the command that wrote this checkpoint") from None


def dir_bytes(directory: Path) -> int:
    """Bytes of the weight files (*.safetensors) of a checkpoint directory."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


__all__ = ["KINDS", "MANIFEST", "dir_bytes", "read_manifest", "write_manifest"]
