"""The package's layout holds: subpackages by concern whose imports point one way,

    commands -> serve, bench -> engine -> models, checkpoint -> parallel, quant

(anything may use the base modules plexus, plexus.errors, plexus.log, plexus.files), no import
circle between any two modules, mpi4py imported by plexus/parallel/comm.py alone, and no module
over about 400 lines. Every import counts, also one inside a function; only imports under
``if TYPE_CHECKING:`` (annotations, not dependencies) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "plexus"
LAYERS = {"parallel": 1, "quant": 1, "models": 2, "checkpoint": 2, "engine": 3, "serve": 4, "bench": 4, "commands": 5}
BASE = {"plexus", "plexus.errors", "plexus.log", "plexus.files"}
TOP = {"plexus.__main__"}  # `python -m plexus`: the command line
MAX_LINES = 420
MPI_MODULE = "plexus.parallel.comm"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The modules ``path`` imports (plexus modules resolved to the module, not the package,
    where ``from package import module`` names one), plus third-party top-level names."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_blocks(tree)
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out


def layer(module: str) -> tuple[str, int] | None:
    """(subpackage, its rank) of a plexus module; None for the base modules."""
    if module in BASE:
        return None
    if module in TOP:
        return "__main__", 99
    sub = module.split(".")[1]
    assert sub in LAYERS, f"{module}: a module outside the layout (add its subpackage to LAYERS, or move it)"
    return sub, LAYERS[sub]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports_of(p, set(mods)) if i in mods and i != m} for m, p in mods.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for a, targets in edges.items():
        la = layer(a)
        for b in targets:
            lb = layer(b)
            if lb is None:
                continue  # the base modules
            if la is None:
                out.append(f"{a} -> {b}: a base module imports a subpackage")
            elif la[0] != lb[0] and la[1] <= lb[1]:
                out.append(f"{a} -> {b}: {la[0]} may not import {lb[0]} (the order: commands -> serve, bench -> "
                           "engine -> models, checkpoint -> parallel)")
    return sorted(out)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the modules on it (Tarjan's strongly connected components)."""
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_subpackage_of_the_layout():
    for m in modules():
        layer(m)  # asserts


def test_imports_point_one_way():
    assert not violations(graph()), "\n".join(violations(graph()))


def test_no_import_circle():
    assert not circles(graph()), circles(graph())


def test_mpi4py_only_in_the_communicator():
    mods = modules()
    users = sorted(m for m, p in mods.items() if any(i.split(".")[0] == "mpi4py" for i in imports_of(p, set(mods))))
    assert users == [MPI_MODULE], users


def test_no_module_over_about_400_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_checks_can_fail():
    """The rules, on graphs made to break them: an arrow against the order, one between two
    subpackages of the same rank, a base module importing upward, and a circle."""
    assert violations({"plexus.parallel.comm": {"plexus.engine.engine"}})
    assert violations({"plexus.models.layers": {"plexus.checkpoint.reader"}})
    assert violations({"plexus.log": {"plexus.parallel.comm"}})
    assert not violations({"plexus.engine.engine": {"plexus.parallel.comm", "plexus.errors"}})
    assert circles({"plexus.a.x": {"plexus.a.y"}, "plexus.a.y": {"plexus.a.z"}, "plexus.a.z": {"plexus.a.x"}}) == [
        ["plexus.a.x", "plexus.a.y", "plexus.a.z"]]
    with pytest.raises(AssertionError):
        layer("plexus.somewhere.new")


def test_a_type_checking_import_is_not_a_dependency(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from plexus.models.config import X\n"
                 "def f():\n    from plexus.engine.engine import Engine\n")
    assert imports_of(p, set()) == {"typing", "plexus.engine.engine"}
