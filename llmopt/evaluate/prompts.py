"""Prompt sets for `llmopt eval --prompts`: a JSONL or CSV file, or `builtin` (builtin_prompts.json).

Each record: `prompt` (required, non-empty text), `category` (optional, one of `CATEGORIES`; default `general`),
`answers` (optional accepted answers: a JSON list of strings; in CSV a JSON list or `|`-separated text); other
fields are ignored. Refusal rate is measured on `harmful` prompts, over-refusal on `benign` ones; `general`
prompts count for answer accuracy and baseline agreement only. Every problem is a one-line error naming the file
and line.

The built-in set (48 prompts, written for llmopt):
- 24 continuation prompts cut from one-line docstrings of the builtin corpus, 16 from the train split and 8 from
  the held-out test split: a seeded sample of 8-14 word docstrings, each cut at about 60% just before a word of
  4+ letters, that word the accepted answer;
- 8 short questions about the standard library ("Which Python module provides the OrderedDict class?");
- 8 harmful requests and 8 benign ones (some worded like harmful ones: "kill a stuck process"), in English,
  German, French and Spanish.
What builtin:tiny can show on it: it is a 3.5M-parameter docstring model with no instruction tuning, so it
refuses nothing (refusal and over-refusal are 0% for it and every compression of it) and, greedy with 32 new
tokens, it answered none of the 32 answerable prompts in the quickstart run: its answer accuracy is 0% and
so is its drift. What it does show is how far a compressed model's generations move from the float model's on the
same prompts (baseline agreement, token F1, ROUGE-L), which perplexity hides. On an instruction-tuned model
the questions and the refusal prompts become the signal.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from llmopt.errors import LlmoptError

CATEGORIES = ("harmful", "benign", "general")
BUILTIN = "builtin"
BUILTIN_FILE = Path(__file__).parent / "builtin_prompts.json"


@dataclass(frozen=True, slots=True)
class PromptItem:
    prompt: str
    category: str = "general"
    answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise LlmoptError(f"unknown category {self.category!r}: use one of {', '.join(CATEGORIES)}")


@dataclass(frozen=True, slots=True)
class PromptSet:
    source: str  # "builtin" or the file's path
    items: tuple[PromptItem, ...]

    def __post_init__(self) -> None:
        if not self.items:
            raise LlmoptError(f"--prompts {self.source}: no prompts in it (one record per line with a `prompt` field)")


def load_prompts(source: str) -> PromptSet:
    """`builtin`, a .jsonl/.json file (one JSON object per line) or a .csv file with a header row."""
    if source == BUILTIN:
        records = json.loads(BUILTIN_FILE.read_text(encoding="utf-8"))["prompts"]
        return PromptSet(BUILTIN, tuple(_item(r, f"{BUILTIN_FILE.name}[{i}]") for i, r in enumerate(records)))
    path = Path(source)
    if not path.is_file():
        raise LlmoptError(f"--prompts {source}: no such file (give a .jsonl or .csv file, or `builtin`)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmoptError(f"--prompts {source}: cannot read it as UTF-8 text ({type(e).__name__})") from None
    if path.suffix.lower() == ".csv":
        return PromptSet(source, tuple(_csv_items(text, source)))
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise LlmoptError(f"--prompts {source}: unknown file type {path.suffix or '(none)'!r}: use .jsonl or .csv")
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmoptError(f"{source}:{n}: not a JSON object ({e.msg}): one object per line") from None
        items.append(_item(record, f"{source}:{n}"))
    return PromptSet(source, tuple(items))


def _csv_items(text: str, source: str) -> list[PromptItem]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None:
        raise LlmoptError(f"--prompts {source}: no prompts in it (a header row with `prompt`, then one row each)")
    if "prompt" not in reader.fieldnames:
        raise LlmoptError(f"{source}:1: the header has no `prompt` column (columns: {', '.join(reader.fieldnames)})")
    items = []
    for n, row in enumerate(reader, 2):
        answers = (row.get("answers") or "").strip()
        if answers.startswith("["):
            try:
                parsed = json.loads(answers)
            except json.JSONDecodeError:
                raise LlmoptError(f"{source}:{n}: `answers` starts with [ but is not a JSON list") from None
        else:
            parsed = [a.strip() for a in answers.split("|") if a.strip()]
        items.append(_item({"prompt": row.get("prompt"), "category": row.get("category") or None,
                            "answers": parsed}, f"{source}:{n}"))
    return items


def _item(record: object, where: str) -> PromptItem:
    if not isinstance(record, dict):
        raise LlmoptError(f"{where}: expected an object with a `prompt` field, got {type(record).__name__}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LlmoptError(f"{where}: missing `prompt` field (non-empty text)")
    category = record.get("category") or "general"
    if category not in CATEGORIES:
        raise LlmoptError(f"{where}: unknown category {category!r}: use one of {', '.join(CATEGORIES)}")
    answers = record.get("answers") or []
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
        raise LlmoptError(f"{where}: `answers` must be a list of non-empty strings")
    return PromptItem(prompt, category, tuple(answers))
