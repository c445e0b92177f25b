"""The import graph of the jaxcnn package follows the data flow: layers -> models, data -> train -> results.

Every module is parsed (not imported), and every import counts, also one inside a function. An edge goes to the
module named: `from jaxcnn.data.sources import idx` is an edge to `jaxcnn.data.sources.idx`, `from jaxcnn.data
import load_split` one to `jaxcnn.data` (the package's `__init__`). The parent packages Python runs first are not
edges (otherwise every package whose `__init__` re-exports its submodules would be a cycle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxcnn"

# (importing package, imported packages it must not reach, why)
FORBIDDEN = (
    ("jaxcnn.results", ("jaxcnn.train",), "results read what training wrote; the caller injects the train function"),
    ("jaxcnn.nn", ("jaxcnn.models", "jaxcnn.train", "jaxcnn.data"), "layers and blocks come below everything"),
    ("jaxcnn.data", ("jaxcnn.models", "jaxcnn.train", "jaxcnn.results"), "the input pipeline knows no model or loop"),
)
ACYCLIC = ("jaxcnn.data",)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # file:line
    statement: str

    def __str__(self) -> str:
        return f"{self.where}: {self.statement}  ({self.source} -> {self.target})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _edges(modules: dict[str, Path]) -> Iterator[Edge]:
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        text = path.read_text()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package holding this module
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            statement = ast.get_source_segment(text, node) or ast.unparse(node)
            for target in dict.fromkeys(targets):
                if _within(target, "jaxcnn") and target != name:
                    yield Edge(name, target, f"{path.relative_to(ROOT)}:{node.lineno}", " ".join(statement.split()))


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return list(_edges(_modules()))


def test_the_graph_sees_imports_inside_functions(edges):
    # A check of the checker: tests/ are not scanned, so use a known import of the package itself.
    assert any(e.source == "jaxcnn.cli" and _within(e.target, "jaxcnn.train") for e in edges), (
        "jaxcnn/cli.py imports jaxcnn.train.loop inside its command functions; the graph missed it"
    )


@pytest.mark.parametrize("source, forbidden, why", FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_layer_order_holds(edges, source, forbidden, why):
    bad = [e for e in edges if _within(e.source, source) and any(_within(e.target, f) for f in forbidden)]
    if bad:
        pytest.fail(f"{source} must not import {', '.join(forbidden)} ({why}); these imports do:\n"
                    + "\n".join(f"  {e}" for e in bad), pytrace=False)


def _cycles(edges: list[Edge], package: str) -> list[list[Edge]]:
    """The modules of `package` that import each other in a circle (strongly connected components of more than
    one module), each given as every import between its members."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        if _within(e.source, package) and _within(e.target, package):
            graph.setdefault(e.source, {}).setdefault(e.target, e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    return [[e for v in sorted(c) for w, e in sorted(graph[v].items()) if w in c] for c in components]


@pytest.mark.parametrize("package", ACYCLIC)
def test_no_import_cycles(edges, package):
    cycles = _cycles(edges, package)
    if cycles:
        pytest.fail(f"import cycles within {package} (imports should run one way); the imports in each circle:\n"
                    + "\n\n".join("\n".join(f"  {e}" for e in cycle) for cycle in cycles), pytrace=False)


def test_the_cycle_finder_finds_a_known_cycle():
    made = [Edge("jaxcnn.data.a", "jaxcnn.data.b", "a.py:1", "import b"),
            Edge("jaxcnn.data.b", "jaxcnn.data.c", "b.py:2", "import c"),
            Edge("jaxcnn.data.c", "jaxcnn.data.a", "c.py:3", "import a"),
            Edge("jaxcnn.data.c", "jaxcnn.data.d", "c.py:4", "import d")]
    (cycle,) = _cycles(made, "jaxcnn.data")
    assert [e.where for e in cycle] == ["a.py:1", "b.py:2", "c.py:3"]  # c -> d is no part of it
