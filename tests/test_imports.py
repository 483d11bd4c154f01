"""The livermsc modules import each other only at the top, and never in a circle.

Parsed with ``ast`` (nothing is imported): every module of workflow/livermsc, its imports of
sibling modules (``from livermsc.x import ...``, ``from livermsc import x``, ``import
livermsc.x``, relative imports), a cycle search over that graph, and a search for imports
inside functions or classes.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "livermsc"

#: (module, imported name) pairs allowed inside a function: heavy optional dependencies only
#: (torch, scvi-tools, jax via scib-metrics). No sibling module is imported lazily.
LAZY_SIBLINGS: set[tuple[str, str]] = set()


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))
            if p.stem != "__init__"}


def _siblings(node: ast.AST, names: set[str]) -> list[str]:
    """Sibling modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names
                if a.name.startswith("livermsc.") and a.name.split(".")[1] in names]
    if isinstance(node, ast.ImportFrom):
        if (node.level, node.module) in ((0, "livermsc"), (1, None)):
            return [a.name for a in node.names if a.name in names]
        if node.level == 0 and (node.module or "").startswith("livermsc."):
            return [node.module.split(".")[1]]
        if node.level == 1 and node.module:
            return [node.module.split(".")[0]]
    return []


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> siblings imported at the top, [(module, sibling, line)] imported elsewhere)."""
    modules = _modules()
    names = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    nested: list[tuple[str, str, int]] = []
    for name, tree in modules.items():
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            for sib in _siblings(node, names):
                graph[name].add(sib)
                if id(node) not in top:
                    nested.append((name, sib, node.lineno))
    return graph, nested


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module (or a
    module importing itself), found by depth-first search."""
    found, state = [], dict.fromkeys(graph, 0)   # 0 new, 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                found.append([*path[path.index(nxt):], nxt])
            elif state[nxt] == 0:
                visit(nxt, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [])
    return found


def test_the_checks_find_what_they_look_for():
    """The cycle search and the import parser on hand-made cases."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    names = {"score", "claims"}
    for src, want in [("from livermsc.score import ALL", ["score"]),
                      ("from livermsc import score, claims, x", ["score", "claims"]),
                      ("import livermsc.claims", ["claims"]), ("from .score import x", ["score"]),
                      ("from . import claims", ["claims"]), ("import numpy", [])]:
        assert _siblings(ast.parse(src).body[0], names) == want, src


def test_no_import_cycle_between_modules():
    graph, _ = _graph()
    assert len(graph) > 10 and graph["claims"], "the package was not parsed"
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_siblings_are_imported_at_the_top():
    _, nested = _graph()
    bad = [f"{m}.py:{line} imports livermsc.{sib} inside a function" for m, sib, line in nested
           if (m, sib) not in LAZY_SIBLINGS]
    assert not bad, "\n".join(bad)


def test_lazy_imports_say_why():
    """A third-party import inside a function (a heavy optional dependency) carries a comment
    on its line or the line above saying why it is deferred."""
    bad = []
    for path in sorted(PACKAGE.glob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    here = lines[node.lineno - 1]
                    block = lines[fn.lineno - 1:node.lineno - 1]
                    above = [s for s in block if s.strip().startswith("#")]
                    if "#" not in here and not above:
                        bad.append(f"{path.name}:{node.lineno}: {here.strip()}")
    assert not bad, "function-local imports without a comment saying why:\n" + "\n".join(bad)
