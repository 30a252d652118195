"""`llmopt export CHECKPOINT --to gguf --out FILE.gguf`: a checkpoint as a file another engine runs."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from llmopt.cli import options as opt
from llmopt.errors import LlmoptError

TARGETS = ("gguf",)


def export(
    checkpoint: Annotated[str, typer.Argument(help="An llmopt checkpoint directory (quantized or float).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output file (written atomically).")],
    to: Annotated[str, typer.Option("--to", help="Target format: gguf (llama.cpp, Ollama, LM Studio).")] = "gguf",
    float_type: Annotated[str, typer.Option("--float-type", help="GGUF type of the float 2-D tensors (embeddings, "
                                            "an unquantized head): f16 or f32.")] = "f16",
    json_out: opt.Json = False,
) -> None:
    """Write CHECKPOINT as a GGUF file: 4-bit symmetric → Q4_0, 4-bit asymmetric → Q4_1, 8-bit → Q8_0, keeping
    llmopt's codes where the blocks line up (group size a multiple of 32, no act-order) and requantizing to the
    dequantized weights where they do not (listed)."""
    from pathlib import Path

    from llmopt.checkpoint.formats.gguf import export_gguf
    from llmopt.cli.console import err
    from llmopt.cli.progress import bars

    if to not in TARGETS:
        raise LlmoptError(f"unknown --to {to!r}: use one of {', '.join(TARGETS)}")
    with bars(not json_out) as progress:
        result = export_gguf(Path(checkpoint), Path(out), float_type=float_type, progress=progress)
    if json_out:
        typer.echo(json.dumps({"path": str(result.path), "bytes": result.n_bytes,
                               "tensors": [asdict(r) for r in result.records]}, indent=2))
        return
    err.print(f"wrote {result.path} ({result.n_bytes / 2**20:.1f} MiB): "
              + ", ".join(f"{n}× {k}" for k, n in result.kinds().items()))
    if result.requantized:
        names = result.requantized
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        err.print(f"requantized {len(names)} tensors into GGUF blocks (their groups do not line up with 32-column "
                  f"blocks; target: the checkpoint's dequantized weights): {shown}")
