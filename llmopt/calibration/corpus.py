"""The builtin corpus: text every Python install ships, split deterministically.

Documents are the `pydoc_data.topics` help pages and the docstrings of the standard
library's modules, classes and functions. Docstrings are read with `ast` from the
source files (never imported: importing `antigravity` opens a browser, `this` prints).
Each distinct text lands in exactly one split, chosen by a hash of the text itself, so
identical docstrings found in two places can never straddle train and test.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "calib", "test")
# Percent of distinct documents per split; test/calib are large enough for
# several thousand tokens of evaluation and calibration text.
_SPLIT_BOUNDS = {"train": (0, 88), "calib": (88, 94), "test": (94, 100)}
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "turtledemo"}
_MIN_CHARS = 40


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str  # where it came from: "topic:<name>" or "doc:<module path>:<qualname>"
    text: str


def _split_of(text: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % 100
    for name, (lo, hi) in _SPLIT_BOUNDS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)


def _docstrings(path: Path, rel: str) -> list[Document]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out: list[Document] = []

    def visit(node: ast.AST, qual: str) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append(Document(f"doc:{rel}:{qual}", doc))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qual}.{child.name}" if qual else child.name)

    visit(tree, "")
    return out


@functools.cache
def all_documents() -> tuple[Document, ...]:
    """Every distinct document (>= 40 chars), in a fixed order, deduplicated by text.

    Parsing the stdlib takes seconds, so the result is cached on disk per Python build and stdlib path.
    """
    from llmopt.utils import llmopt_home

    key = hashlib.sha256(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{_MIN_CHARS}".encode()).hexdigest()[:16]
    cache = llmopt_home() / "corpus" / f"{key}.json"
    try:
        return tuple(Document(i, t) for i, t in json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    docs = _scan_documents()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps([[d.doc_id, d.text] for d in docs]))
        tmp.replace(cache)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # a read-only home only costs the rescan
    return docs


def _scan_documents() -> tuple[Document, ...]:
    import pydoc_data.topics as topics

    docs = [Document(f"topic:{k}", v.strip()) for k, v in sorted(topics.topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        docs.extend(_docstrings(path, rel.as_posix()))
    seen: set[str] = set()
    unique = []
    for d in docs:
        if len(d.text) >= _MIN_CHARS and d.text not in seen:
            seen.add(d.text)
            unique.append(d)
    return tuple(unique)


@functools.cache
def split_documents(split: str) -> tuple[Document, ...]:
    """The documents of one split ('train', 'calib' or 'test')."""
    if split not in SPLITS:
        from llmopt.errors import LlmoptError

        raise LlmoptError(f"unknown builtin split {split!r}: use one of {', '.join(SPLITS)}")
    return tuple(d for d in all_documents() if _split_of(d.text) == split)


def split_texts(split: str) -> list[str]:
    return [d.text for d in split_documents(split)]


def corpus_fingerprint() -> str:
    """Identifies the corpus (it depends on the Python version that ships it)."""
    h = hashlib.sha256(sys.version.encode())
    for d in all_documents():
        h.update(d.text.encode())
    return h.hexdigest()[:16]
