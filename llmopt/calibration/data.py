"""Text sources → token batches for calibration, distillation and evaluation.

A source is `builtin` (the corpus in corpus.py), a preset (`wikitext2`, `c4`, `pileval`),
a `datasets` hub id with an optional `:config`, or a local .txt/.jsonl/.json/.parquet/.csv
file or a folder of them (read with `datasets`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmopt.calibration import corpus
from llmopt.errors import LlmoptError


@dataclass(frozen=True, slots=True)
class Preset:
    path: str
    name: str | None
    text_field: str
    splits: dict[str, str]  # purpose → split name
    data_files: str | None = None


PRESETS: dict[str, Preset] = {
    "wikitext2": Preset("wikitext", "wikitext-2-raw-v1", "text", {"calib": "train", "test": "test", "train": "train"}),
    "c4": Preset("allenai/c4", None, "text", {"calib": "train", "test": "validation", "train": "train"},
                 data_files="en/c4-train.00000-of-01024.json.gz"),
    "pileval": Preset("mit-han-lab/pile-val-backup", None, "text",
                      {"calib": "validation", "test": "validation", "train": "validation"}),
}
_LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class DataSpec:
    """Where text comes from. `split=None` means the purpose's default (calib/test/train)."""

    source: str = "builtin"
    split: str | None = None
    text_field: str = "text"
    chat_template: bool = False  # wrap each text as a user turn with the tokenizer's chat template

    def __post_init__(self) -> None:
        if not self.source:
            raise LlmoptError("empty data source: use builtin, a preset (wikitext2, c4, pileval), a hub id or a path")


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """Packed token windows: input_ids [N, L], with what made them."""

    input_ids: torch.Tensor  # [N, L] int64
    source: str
    split: str
    seed: int
    sha256: str = field(default="")


def load_texts(spec: DataSpec, purpose: str = "calib") -> list[str]:
    """All non-empty texts of the source for a purpose ('calib', 'test' or 'train')."""
    src = spec.source
    if src == "builtin":
        texts = corpus.split_texts(spec.split or purpose)
    elif src in PRESETS:
        p = PRESETS[src]
        texts = _hub_texts(p.path, p.name, spec.split or p.splits[purpose], p.text_field, p.data_files)
    elif Path(src).exists():
        texts = _local_texts(Path(src), spec.split or "train", spec.text_field)
    elif src.startswith((".", "/", "~")) or Path(src).suffix in _LOCAL_BUILDERS:
        raise LlmoptError(f"data file {src} does not exist: give an existing .txt/.jsonl/.json/.parquet/.csv path")
    else:
        path, _, name = src.partition(":")
        texts = _hub_texts(path, name or None, spec.split or ("test" if purpose == "test" else "train"),
                           spec.text_field, None)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise LlmoptError(f"data source {src!r} has no non-empty text: check the path, split and --text-field")
    return texts


def _local_texts(path: Path, split: str, text_field: str) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise LlmoptError(f"folder {path} holds no .txt/.jsonl/.json/.parquet/.csv files")
    kinds = {_LOCAL_BUILDERS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise LlmoptError(f"{path}: data files must all be one of .txt/.jsonl/.json/.parquet/.csv")
    builder = kinds.pop()
    for f in files:
        _check_data_file(f)
    if builder == "text":  # one document per file keeps paragraphs together
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # pyarrow/datasets parse errors of many types: one line naming the data
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise LlmoptError(f"cannot read {path} as {builder} data ({type(e).__name__}: {first}): check the file's "
                          f"format matches its extension") from None
    return _column(ds, text_field, str(path))


def _check_data_file(f: Path) -> None:
    """Refuse an empty file, a binary one, and a .jsonl line that is not JSON, naming the file (and line)."""
    import json

    if f.stat().st_size == 0:
        raise LlmoptError(f"data file {f} is empty: give a file with text in it")
    with open(f, "rb") as fh:
        head = fh.read(8192)
    if b"\0" in head and f.suffix != ".parquet":
        raise LlmoptError(f"data file {f} is binary, not {f.suffix} text: give a .txt/.jsonl/.json/.csv text file "
                          f"(or .parquet)")
    if f.suffix == ".jsonl":
        with open(f, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LlmoptError(f"data file {f}, line {i}, is not valid JSON ({e.msg}): one JSON object per "
                                      f"line expected") from None
                if not isinstance(row, dict):
                    raise LlmoptError(f"data file {f}, line {i}, is not a JSON object: one object per line "
                                      f"expected, e.g. {{\"text\": \"...\"}}")


def _hub_texts(path: str, name: str | None, split: str, text_field: str, data_files: str | None) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split, data_files=data_files)
    except Exception as e:  # the datasets library raises many types (network, missing config, split)
        raise LlmoptError(
            f"cannot load dataset {path!r} (config {name!r}, split {split!r}): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} — check the id and your network, or use a local file"
        ) from e
    return _column(ds, text_field, path)


def _column(ds, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise LlmoptError(f"{where} has no text field {text_field!r} (columns: {', '.join(ds.column_names)}): "
                          f"pass --text-field")
    return [t for t in ds[text_field] if isinstance(t, str)]


def token_stream(texts: list[str], tokenizer, chat_template: bool = False) -> torch.Tensor:
    """Tokenize and join texts with EOS between them → [T] int64 (no BOS inside the stream)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        if chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise LlmoptError("--chat-template given but the tokenizer has no chat template")
            toks = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
            if isinstance(toks, dict) or hasattr(toks, "keys"):
                toks = toks["input_ids"]
        else:
            toks = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        ids.extend(toks)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack(stream: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Cut the stream into non-overlapping windows of seq_len, pick `samples` of them by seed.

    Returns [samples, seq_len]. Short texts are thereby packed into full-length samples.
    """
    if samples <= 0 or seq_len <= 0:
        raise LlmoptError(f"--samples and --seq-len must be positive (got {samples}, {seq_len})")
    n_windows = stream.numel() // seq_len
    if n_windows < samples:
        raise LlmoptError(
            f"data has {stream.numel()} tokens, fewer than the {samples}×{seq_len}={samples * seq_len} requested: "
            f"lower --samples or --seq-len, or give more data")
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)  # [W, L]
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=gen)[:samples].sort().values
    return windows[pick].clone()


def load_token_batch(spec: DataSpec, tokenizer, samples: int, seq_len: int, seed: int = 0,
                     purpose: str = "calib") -> TokenBatch:
    """The whole path: source → texts → token stream → [samples, seq_len] windows."""
    texts = load_texts(spec, purpose)
    stream = token_stream(texts, tokenizer, spec.chat_template)
    ids = pack(stream, samples, seq_len, seed)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return TokenBatch(ids, spec.source, spec.split or purpose, seed, digest)
