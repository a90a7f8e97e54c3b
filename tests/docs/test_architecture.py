"""The layout docs/architecture.md promises: no import cycle, packages import only earlier steps, short files
and functions. Module-level imports only (a function-level import is how a later step is reached lazily)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
# capture → graph → rewrite / method → passes → top level (optimize, cli, ...) / deploy
ORDER = {"capture": 0, "graph": 1, "rewrite": 2, "method": 2, "passes": 3, "deploy": 4, "": 4}
LEAVES = {"idap_fx.errors", "idap_fx.options", "idap_fx.metrics"}  # imported from every step
LONG_FILES_ALLOWED = {"viewer_assets.py"}  # the viewer's page text


def _sources() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "idap_fx").rglob("*.py")) + sorted((ROOT / "passes").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[0] == "passes":
            parts = ["idap_fx", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _module_level_imports(path: Path, known: set[str]) -> set[str]:
    out = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in known}
    return out


def _step(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ORDER else ""


def _graph() -> nx.DiGraph:
    mods = _sources()
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for dep in _module_level_imports(path, set(mods)):
            if dep != name and not name.startswith(dep + "."):  # a package's own __init__ is not an edge
                g.add_edge(name, dep)
    return g


def test_no_import_cycle() -> None:
    g = _graph()
    # a package __init__ importing its own submodules is how packages work, not a cycle
    g.remove_edges_from([(a, b) for a, b in g.edges if b.startswith(a + ".")])
    assert list(nx.simple_cycles(g)) == []


def test_packages_import_only_earlier_steps() -> None:
    late = [
        f"{a} -> {b}"
        for a, b in _graph().edges
        if b not in LEAVES and b != "idap_fx" and ORDER[_step(b)] > ORDER[_step(a)]
    ]
    assert late == []


def test_files_and_functions_stay_short() -> None:
    long_files, long_functions = [], []
    for path in _sources().values():
        text = path.read_text()
        if len(text.splitlines()) > 450 and path.name not in LONG_FILES_ALLOWED:
            long_files.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.end_lineno - node.lineno + 1 > 80
            ):
                long_functions.append(f"{path.name}:{node.name}")
    assert long_files == [] and long_functions == []
