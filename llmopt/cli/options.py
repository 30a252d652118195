"""Options shared by several commands, as Annotated aliases (one definition, same help everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Device = Annotated[str, typer.Option("--device", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run code shipped with a hub model.")]
Revision = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Samples = Annotated[int, typer.Option("--samples", help="Number of token windows.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per window.")]
Split = Annotated[str | None, typer.Option("--split", help="Dataset split (default: the purpose's own).")]
TextField = Annotated[str, typer.Option("--text-field", help="Column holding the text.")]
ChatTemplate = Annotated[bool, typer.Option("--chat-template", help="Wrap texts with the tokenizer's chat template.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
