"""The import rules of docs/architecture.md: lower layers stand alone, no cycles, light config."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medtl"
LEAVES = {"errors", "vocabulary", "__init__"}
# Layer -> the other layers it may import (the leaf modules are always allowed).
ALLOWED = {
    "data": set(),
    "models": set(),
    "evaluation": set(),
    "tracking": set(),
    "engine": {"models"},
    "workflow": {"data", "models", "engine", "evaluation", "tracking"},
    "studies": {"workflow", "data", "models", "engine", "evaluation", "tracking"},
    "cli": {"workflow", "studies", "data", "tracking"},
    "errors": set(),
    "vocabulary": set(),
    "__init__": set(),
}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """medtl modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medtl":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if (PACKAGE.parent / node.module.replace(".", "/")
                                                                          / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "medtl")
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_layer_imports_only_what_docs_architecture_allows():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, layer = _module(path), _layer(_module(path))
        for target in _imports(path):
            other = _layer(target)
            if other != layer and other not in LEAVES and other not in ALLOWED[layer]:
                broken.append(f"{module} imports {target} ({layer} may not import {other})")
    assert broken == []


def test_the_leaf_modules_import_nothing_of_medtl():
    for leaf in ("errors.py", "vocabulary.py"):
        assert _imports(PACKAGE / leaf) == set(), leaf


def test_no_import_cycles_among_modules():
    # Module-level imports only: a function-level import breaks no import cycle at load time,
    # but a module-level one does. Type-checking-only imports are left out.
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medtl"):
                edges.add(node.module)
                edges.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("medtl"))
        graph[_module(path)] = edges
    modules = set(graph)
    graph = {m: {e for e in edges if e in modules and e != m} for m, edges in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend([*trail, node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*trail, node]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, []):
            break
    assert cycle == [], " -> ".join(cycle)


@pytest.mark.parametrize("module", ["medtl.workflow", "medtl.workflow.config", "medtl.vocabulary", "medtl.cli"])
def test_loading_the_config_and_the_cli_loads_no_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
