"""The import graph of aule_kp (issue 16, part 2): no import cycle, aule_kp/vulkan/ below the layers
that use it, and the AULE_KP_* environment read in one place.

Every module is parsed with ``ast``; every import counts, inside functions too (a lazy import is
still a dependency, only a later one). Relative imports are resolved. ``from P import x`` is an
import of ``P.x`` when that is a module of aule_kp, else of ``P`` itself (so a submodule doing
``from .. import __version__`` imports the package, whose ``__init__`` imports the submodules back).
Importing ``P.x`` also runs ``P/__init__``, but that edge is not drawn: every module would then
depend on ``aule_kp/__init__`` and the check would say nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent / "aule_kp"

#: What aule_kp/vulkan/ must not import: the layers that are built on it.
ABOVE_VULKAN = ("api", "bench", "dispatch", "cli", "info", "torch", "integrations", "plots", "tune")


def _modules() -> Dict[str, Path]:
    """Module name -> file, for every module of aule_kp (a package is its ``__init__.py``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[Tuple[str, int]]:
    """``(imported aule_kp module, line)`` for each import in ``path`` (module ``name``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in MODULES:  # `import aule_kp.a.b` -> the longest module
                    target = target.rpartition(".")[0]
                if target:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    yield sub, node.lineno
                elif target in MODULES:
                    yield target, node.lineno


def _graph() -> Dict[str, Dict[str, int]]:
    """Module -> {imported module: first line that imports it}."""
    graph: Dict[str, Dict[str, int]] = {}
    for name, path in MODULES.items():
        edges: Dict[str, int] = {}
        for target, line in _imports(name, path):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _cycles(graph: Dict[str, Dict[str, int]]) -> List[List[str]]:
    """Strongly connected components of more than one module, and modules that import themselves
    (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(graph: Dict[str, Dict[str, int]], component: List[str]) -> str:
    members = set(component)
    edges = [f"{a} -> {b} (line {line})" for a in component for b, line in graph[a].items() if b in members]
    return "; ".join(edges)


def _upward(module: str, target: str) -> bool:
    """Whether ``module`` (in aule_kp/vulkan/) importing ``target`` reaches a layer above vulkan/."""
    return module.startswith("aule_kp.vulkan") and any(
        target == f"aule_kp.{layer}" or target.startswith(f"aule_kp.{layer}.") for layer in ABOVE_VULKAN)


def test_graph_sees_the_imports() -> None:
    """The parser is not vacuous: it finds imports we know are there, lazy ones included."""
    graph = _graph()
    assert "aule_kp.api" in graph["aule_kp"]
    assert "aule_kp.dispatch" in graph["aule_kp.call"]
    assert "aule_kp.vulkan.device" in graph["aule_kp.info"]
    assert "aule_kp.cpu.backend" in graph["aule_kp.dispatch"]
    assert "aule_kp.cpu.pool" in graph["aule_kp.cpu.backward"]
    assert "aule_kp.call" in graph["aule_kp.cli"]  # inside a function
    assert _cycles({"a": {"b": 1}, "b": {"a": 2}, "c": {"c": 3}, "d": {"a": 4}}) == [["a", "b"], ["c"]]


def test_no_cycle_outside_vulkan() -> None:
    """No import cycle among the modules outside aule_kp/vulkan/ (the cycles through it are
    ``test_no_cycle``'s)."""
    graph = {a: {b: line for b, line in edges.items() if not b.startswith("aule_kp.vulkan")}
             for a, edges in _graph().items() if not a.startswith("aule_kp.vulkan")}
    cycles = _cycles(graph)
    assert not cycles, "\n".join(_describe(graph, c) for c in cycles)


def test_no_cycle() -> None:
    """No import cycle anywhere in aule_kp, lazy imports included."""
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "\n".join(_describe(graph, c) for c in cycles)


def test_vulkan_imports_no_layer_above() -> None:
    """aule_kp/vulkan/ imports none of the layers built on it, lazily or not."""
    bad = [f"{a} -> {b} (line {line})" for a, edges in _graph().items() for b, line in edges.items() if _upward(a, b)]
    assert not bad, "\n".join(bad)


def test_knobs_read_in_at_most_two_modules() -> None:
    """``AULE_KP_*`` names appear as string literals in at most two modules (the knob parser and,
    at most, one that documents them)."""
    readers = sorted(
        name for name, path in MODULES.items()
        if any(isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("AULE_KP_")
               for node in ast.walk(ast.parse(path.read_text()))))
    assert len(readers) <= 2, readers
