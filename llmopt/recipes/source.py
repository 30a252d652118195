"""Read a recipe's YAML into plain Python data while remembering the line of every key.

yaml.compose gives nodes with positions; we walk them ourselves so that every error later on can say
`recipes/x.yaml:12: steps.gptq4.bitz: ...`. `--set a.b.c=VALUE` edits the data afterwards and records
itself as the location of what it set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmopt.errors import LlmoptError

KeyPath = tuple[str | int, ...]


def dotted(path: KeyPath) -> str:
    return ".".join(str(p) for p in path)


@dataclass(slots=True)
class Source:
    """A recipe document: its data and where each key came from ("file:line" or "--set k=v")."""

    file: str
    data: dict[str, Any]
    where_map: dict[KeyPath, str] = field(default_factory=dict)

    def where(self, path: KeyPath) -> str:
        """Location of `path`, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p and p not in self.where_map:
            p = p[:-1]
        return self.where_map.get(p, f"{self.file}:1")

    def error(self, path: KeyPath, message: str) -> LlmoptError:
        """One-line error naming file, line and key."""
        key = dotted(path)
        return LlmoptError(f"{self.where(path)}: {key}: {message}" if key else f"{self.where(path)}: {message}")


def load_source(path: Path) -> Source:
    """Parse a recipe file; invalid YAML, duplicate keys or a non-mapping document are errors with a line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LlmoptError(f"recipe {path} does not exist: give the path of a .yaml recipe, e.g. recipes/quickstart.yaml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LlmoptError(f"cannot read recipe {path}: {e}") from None
    return parse_source(text, str(path))


def parse_source(text: str, file: str) -> Source:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise LlmoptError(f"{file}:1: the recipe is empty: it needs at least a `steps:` mapping")
        where: dict[KeyPath, str] = {}
        data = _walk(loader, node, (), where, file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise LlmoptError(f"{file}:{line}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise LlmoptError(f"{file}:1: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise LlmoptError(f"{file}:{node.start_mark.line + 1}: a recipe must be a mapping (name:, steps:, gates: ...)")
    return Source(file, data, where)


def _walk(loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath, where: dict[KeyPath, str], file: str) -> Any:
    where.setdefault(path, f"{file}:{node.start_mark.line + 1}")
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys, as yaml.safe_load would
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = f"{file}:{key_node.start_mark.line + 1}"
            if not isinstance(key, str):
                raise LlmoptError(f"{line}: {dotted(path) or 'recipe'}: key {key!r} must be a string")
            if key in out:
                raise LlmoptError(f"{line}: {dotted(path + (key,))}: duplicate key (each key may appear once)")
            where[path + (key,)] = line  # the key's line, which is where a reader looks
            out[key] = _walk(loader, value_node, path + (key,), where, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(loader, item, path + (i,), where, file) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def apply_set(source: Source, assignments: list[str]) -> None:
    """Apply `--set key.path=value` overrides (value parsed as YAML: 8, 0.5, true, [a, b], text)."""
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise LlmoptError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps.gptq4.bits=8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # not YAML: take it as text
        parts: list[str | int] = list(key.strip().split("."))
        target: Any = source.data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(target, list):
                if not str(part).isdigit() or int(part) >= len(target):
                    raise LlmoptError(f"--set {item}: {dotted(tuple(parts[:i]))} is a list of {len(target)}: "
                                      f"use an index 0..{len(target) - 1}")
                parts[i] = part = int(part)
            elif not isinstance(target, dict):
                raise LlmoptError(f"--set {item}: {dotted(tuple(parts[:i]))} is a value, not a mapping")
            elif not last and part not in target:
                raise LlmoptError(f"--set {item}: {dotted(tuple(parts[:i + 1]))} does not exist in {source.file}")
            if last:
                target[part] = value
            else:
                target = target[part]
        path = tuple(parts)
        for p in [p for p in source.where_map if p[:len(path)] == path]:
            del source.where_map[p]
        source.where_map[path] = f"--set {item}"
