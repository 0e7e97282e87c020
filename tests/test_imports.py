"""The import rules between the rooms, read from the source (static AST parsing, nothing imported):

* the shared core (``openmsk/``) imports no room — not at module level, not inside a function, not by a
  module name in a string (``import_module``, ``python -m``);
* no import cycle between the project's modules (module-level imports, as they run at import time);
* the web imports no torch: ``web.server`` and the app it builds leave ``torch`` out of ``sys.modules``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = "openmsk"
ROOMS = ("scp", "worker", "web", "destinations", "forwarder")
PACKAGES = tuple(p for p in (CORE, *ROOMS) if (REPO / p / "__init__.py").is_file())


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module it names (a submodule where ``from package import submodule``)
    line: int
    top_level: bool  # runs when the module is imported (not inside a function, not under TYPE_CHECKING)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, top_level: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node under *node*, with whether it runs at import time."""
    for child in ast.iter_child_nodes(node):
        inner = top_level
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or (
            isinstance(child, ast.If) and _is_type_checking(child)
        ):
            inner = False
        yield child, inner
        yield from _walk(child, inner)


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node, top_level in _walk(tree, True):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno, top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append(
                    Import(module, submodule if submodule in MODULES else base, node.lineno, top_level)
                )
        elif (  # a dotted module name in a string: imported by name (import_module, `python -m`) somewhere
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and "." in node.value
            and node.value in MODULES
        ):
            found.append(Import(module, node.value, node.lineno, False))
        elif (  # importlib.import_module("a.b") / __import__("a.b") with a literal name
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.append(Import(module, node.args[0].value, node.lineno, top_level))
    return found


ALL_IMPORTS = {module: imports_of(module, path) for module, path in MODULES.items()}


def _root(name: str) -> str:
    return name.split(".")[0]


def test_the_walk_sees_every_package_and_function_level_imports() -> None:
    assert {CORE, "scp", "worker", "web", "destinations"} <= set(PACKAGES)
    # a function-level import the walk must see: the worker process loads its actors when it starts
    assert any(i.target == "worker.actors" and not i.top_level for i in ALL_IMPORTS["worker.process"])


def test_the_shared_core_imports_no_room() -> None:
    offending = [
        f"{MODULES[i.module].relative_to(REPO)}:{i.line}: {i.module} imports {i.target}"
        for module, found in ALL_IMPORTS.items()
        if _root(module) == CORE
        for i in found
        if _root(i.target) in ROOMS
    ]
    assert not offending, "openmsk/ is the shared ground and imports no room:\n" + "\n".join(offending)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself): Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, for the message."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & members):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    return [start, "..."]


def test_no_import_cycles() -> None:
    graph = {
        module: {i.target for i in found if i.top_level and i.target in MODULES and i.target != module}
        for module, found in ALL_IMPORTS.items()
    }
    cycles = _cycles(graph)
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(
        " -> ".join(_one_cycle(graph, c)) for c in cycles
    )


def test_cycle_detection_reports_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    (component,) = _cycles(graph)
    assert component == ["a", "b", "c"]
    assert _one_cycle(graph, component) == ["a", "b", "c", "a"]


@pytest.mark.timeout(120)
def test_the_web_app_does_not_import_torch(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "import web.server, web.viewer\n"
        "from openmsk.config import load_settings\n"
        "from web import create_app\n"
        "create_app(load_settings())\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nnunetv2', 'worker'))\n"
        "print(','.join(heavy))\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPENMSK_")},
        "OPENMSK_DATA_DIR": str(tmp_path),
        "OPENMSK_REDIS_URL": "redis://127.0.0.1:9/0",  # never connected to: building the app is enough
    }
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the web imported {result.stdout.strip()}"
