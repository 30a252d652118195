"""The package layout the Development section of the README describes, checked on the source with `ast`:
no import cycle between llmopt's top-level packages, nothing outside llmopt/cli imports llmopt.cli, and no
function longer than 60 lines outside the CLI's option declarations. Lazy imports inside functions count."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "llmopt"
MAX_LINES = 60


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Absolute names of the llmopt modules a file imports (relative imports resolved)."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                out.append(".".join(base + ([node.module] if node.module else [])))
            else:
                out.append(node.module or "")
    return [n for n in out if n == "llmopt" or n.startswith("llmopt.")]


def _top(name: str) -> str:
    """llmopt.quant.api → quant; llmopt.utils → utils; llmopt → llmopt (the package's own __init__)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "llmopt"


def _files() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in _files():
        src = _top(_module(path))
        for name in _imports(path):
            dst = _top(name)
            if dst not in (src, "llmopt") and src != "llmopt":
                graph[src].add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, …, a], or None (iterative DFS with colours)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle between llmopt packages: " + " → ".join(cycle)


def test_only_the_cli_imports_the_cli():
    offenders = [f"{p.relative_to(ROOT.parent)} imports {n}" for p in _files()
                 if _top(_module(p)) not in ("cli", "__main__")
                 for n in _imports(p) if _top(n) == "cli"]
    assert not offenders, "; ".join(offenders)


def _length(node: ast.FunctionDef, in_cli: bool) -> int:
    """Lines of a function; in llmopt/cli/ the body's only: a command's signature is its option declarations
    (one typer.Option per parameter), which the rule exempts."""
    start = node.lineno
    if in_cli:
        first = node.body[0]
        has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(node.body) > 1
        start = (node.body[1] if has_doc else first).lineno
    return node.end_lineno - start + 1


def _long_functions() -> list[str]:
    out = []
    for path in _files():
        in_cli = _top(_module(path)) == "cli"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _length(node, in_cli) > MAX_LINES:
                out.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({_length(node, in_cli)} lines)")
    return out


def test_no_function_over_60_lines():
    assert not _long_functions(), "split these into named steps: " + "; ".join(_long_functions())


@pytest.mark.parametrize("name", ["llmopt.checkpoint", "llmopt.backends"])
def test_low_packages_stay_low(name):
    """checkpoint/ is read by quant, runtime, models and evaluate, so it depends on none of them; backends/ runs
    inside other venvs, so it imports nothing heavy of llmopt's."""
    allowed = {"llmopt.checkpoint": {"families", "errors", "utils", "progress"},
               "llmopt.backends": {"errors", "utils"}}[name]
    assert package_graph()[_top(name)] <= allowed
