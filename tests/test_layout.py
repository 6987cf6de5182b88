"""The layout is the architecture (docs/architecture.md): packages by plane, imports one way,
no cycle between modules, every package saying what it owns, and no module grown past ~600
lines without its docstring saying why."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sources import compiled_source

PKG = Path(__file__).resolve().parents[1] / "fastgate"

# Rows of docs/architecture.md's import diagram, bottom first: a module may import from its
# own row's package and from lower rows only (keys and dataplane share a row, and do not
# import each other). The leaf modules import nothing of the package.
RANK = {
    "errors": 0, "httpfields": 0, "tasks": 0,
    "token": 1, "fastgate": 2,  # fastgate/__init__.py: the public API, over token only
    "config": 3, "auth": 4, "keys": 5, "dataplane": 5, "app": 6, "ops": 7, "tools": 8,
    "cli": 9, "__main__": 10,
}
PACKAGES = ("token", "config", "auth", "keys", "dataplane", "ops", "tools")
#: Over ~600 lines, with the reason its docstring gives.
LONG = {"dataplane/_client.pxi": "Cython allows no ``include`` inside a class body"}
LIMIT = 620

_PYX_IMPORT = re.compile(
    r"^(?:from\s+(fastgate[\w.]*)\s+c?import\s+(.+)|c?import\s+(fastgate[\w.]*))", re.M)


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def plane(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fastgate"


def imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(imported fastgate module, at import time?) for every import of ``path`` (a ``.pyx``
    read with its ``.pxi`` includes); imports under ``if TYPE_CHECKING:`` are left out,
    imports inside functions are not at import time."""
    if path.suffix == ".pyx":  # with its includes: one extension module
        for m in _PYX_IMPORT.finditer(compiled_source(path)):
            yield (m.group(1) or m.group(3)), True
        return
    text = path.read_text(encoding="utf-8")

    def walk(node: ast.AST, top: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module:
                if child.module == "fastgate":  # from fastgate import errors, ...
                    for alias in child.names:
                        yield f"fastgate.{alias.name}", top
                else:
                    yield child.module, top
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, top
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            yield from walk(child, inner)

    for name, top in walk(ast.parse(text), True):
        if name == "fastgate" or name.startswith("fastgate."):
            yield name, top


def sources(*, includes: bool = False) -> list[Path]:
    """Every module's file; with ``includes``, the ``.pxi`` files too (each is part of the
    ``.pyx`` that includes it, whose imports cover it)."""
    exts = ("*.py", "*.pyx", "*.pxi") if includes else ("*.py", "*.pyx")
    return sorted(p for ext in exts for p in PKG.rglob(ext))


def resolve(name: str, known: set[str]) -> str:
    """``fastgate.token.reasons.Reason``-style names are cut back to the module."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_every_import_points_down() -> None:
    known = {module_name(p) for p in sources()}
    upwards = []
    for path in sources():
        me = module_name(path)
        for name, _ in imports(path):
            target = resolve(name, known)
            a, b = plane(me), plane(target)
            if a == b:
                continue
            if RANK[b] > RANK[a] or (RANK[a] == RANK[b] and a != b):
                upwards.append(f"{me} -> {target}")
    assert upwards == []


def test_no_import_cycle_between_modules() -> None:
    known = {module_name(p) for p in sources()}
    graph: dict[str, set[str]] = {}
    for path in sources():
        me = module_name(path)
        deps = {resolve(n, known) for n, top in imports(path) if top}
        # importing fastgate.x.y first imports the package fastgate.x
        graph[me] = {d for d in deps if d != me and not me.startswith(d + ".")}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(node):], node]))
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*stack, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_says_what_it_owns_and_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PKG / package / "__init__.py").read_text("utf-8")))
    assert doc is not None and "Owns:" in doc and "May import:" in doc, package
    # every module of the package is named in its docstring
    for path in sorted((PKG / package).iterdir()):
        if path.suffix in (".py", ".pyx") and path.stem != "__init__":
            assert f"`{path.stem}" in doc, f"{package}/__init__.py does not name {path.name}"


def test_no_module_grows_past_the_limit_unless_it_says_why() -> None:
    lines = {str(p.relative_to(PKG)): len(p.read_text("utf-8").splitlines())
             for p in sources(includes=True)}
    long = {rel: n for rel, n in lines.items() if n > LIMIT}
    assert set(long) == set(LONG), long
    for rel, why in LONG.items():
        pyx = (PKG / rel).parent / "_http.pyx" if rel.endswith(".pxi") else PKG / rel
        assert why in " ".join(pyx.read_text("utf-8").split()), rel
