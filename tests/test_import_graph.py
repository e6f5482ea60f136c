"""The library's import graph: no circles, and the pure core imports no hook, trigger, strategy, task or engine.

Every module under ``include/atlas_migration`` is parsed with ``ast`` (nothing is imported). Every import
counts, wherever it is: at module level, inside a function (a lazy import is still a dependency: it only
moves the failure to run time) or under ``TYPE_CHECKING``; ``import x``, ``from x import y``, relative
imports, and ``from atlas_migration import tasks as steps`` where the imported name is a submodule (then the
edge goes to that submodule, not to the package). ``importlib.import_module("...")`` with a literal name
counts too.

The pure core (``CORE``) must not reach a ``FORBIDDEN`` module by any path, directly or through a helper it
imports: the core is what the strategies are built on, so it depending on one of them is either a circle
or one waiting to happen, and it would drag servers, hooks and engines into what should stay pure.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

PACKAGE = "atlas_migration"
INCLUDE = Path(__file__).resolve().parent.parent / "include"

# The pure core: decisions and data the strategies are built on.
CORE = frozenset(f"{PACKAGE}.{name}" for name in (
    "profile", "routing", "planning", "namespaces", "params", "validation", "errors", "redaction", "report_view",
))
# What the core must never import: the hooks (Mongo, Atlas Admin API, Cloud Manager, mongosync), the
# triggers, the strategy / task-group modules, every engine, the task bodies and the flow (with the trigger
# form above the strategies).
FORBIDDEN = frozenset(f"{PACKAGE}.{name}" for name in ("tasks", "flow", "dag_params", "source_dump"))
FORBIDDEN_PACKAGES = tuple(f"{PACKAGE}.{name}" for name in ("hooks", "triggers", "strategies", "engines"))
# The layers above the core, in order: a hook or an engine that imports a strategy, the task bodies or the
# flow has its dependency upside down (strategies wire hooks and engines together, not the other way round).
UPPER = frozenset(f"{PACKAGE}.{name}" for name in ("tasks", "flow", "dag_params"))
UPPER_PACKAGES = (f"{PACKAGE}.strategies",)

# A module -> {imported module: [line numbers]}.
Graph = dict[str, dict[str, list[int]]]


def discover(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (found under ``root``), by dotted name; a package by its own name."""
    modules: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _relative_base(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a ``from .x import y`` in ``module`` names."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, *([name] if name else [])])


def _import_module_target(node: ast.Call) -> str | None:
    """``importlib.import_module("a.b")`` / ``import_module("a.b")`` / ``__import__("a.b")``: the literal name."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called in ("import_module", "__import__") and node.args:
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def build_graph(modules: dict[str, Path], package: str) -> Graph:
    """Who imports whom within ``package``, counting imports at any depth of the syntax tree."""
    graph: Graph = {name: {} for name in modules}

    def known(name: str) -> str | None:
        """The module an imported dotted name loads: itself, or its closest enclosing known module."""
        parts = name.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in modules:
                return candidate
            parts.pop()
        return None

    for name, path in modules.items():
        is_package = path.name == "__init__.py"

        def add(target: str | None, line: int, source: str = name) -> None:
            if target and target != source and (target == package or target.startswith(package + ".")):
                graph[source].setdefault(target, []).append(line)

        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(known(alias.name), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = (_relative_base(name, is_package, node.level, node.module) if node.level
                        else node.module or "")
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    # ``from pkg import sub``: the dependency is the submodule; ``from mod import thing``: mod.
                    add(submodule if submodule in modules else known(base), node.lineno)
            elif isinstance(node, ast.Call) and (target := _import_module_target(node)):
                add(known(target), node.lineno)
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """The circles, as ``[a, b, ..., a]`` from their smallest module, sorted (the failure reads the same every
    run): the modules tangled together are found with Tarjan's strongly connected components, then for each
    module in such a knot the shortest circle through it (listing every elementary circle could explode)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(root: str) -> None:
        # Iterative, so a deep chain of imports cannot hit the recursion limit.
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: set[str] = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)

    for module in sorted(graph):
        if module not in index:
            strongconnect(module)

    cycles: set[tuple[str, ...]] = set()
    for component in components:
        for member in component:
            path = _shortest_path(graph, member, lambda m, member=member: m == member, within=component,
                                  skip_start=True)
            if path is None:
                continue  # a single module that does not import itself
            # The same circle found from another of its modules: keep one rotation, from its smallest module.
            ring = path[:-1]
            first = ring.index(min(ring))
            ring = ring[first:] + ring[:first]
            cycles.add((*ring, ring[0]))
    return sorted(list(c) for c in cycles)


def _shortest_path(graph: Graph, start: str, goal: Callable[[str], bool], within: Iterable[str] | None = None,
                   skip_start: bool = False) -> list[str] | None:
    """Breadth-first: the shortest import chain from ``start`` to a module ``goal`` accepts."""
    allowed = set(within) if within is not None else None
    parents: dict[str, str | None] = {} if skip_start else {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, {})):
            if allowed is not None and child not in allowed:
                continue
            if goal(child):
                path = [child, node]
                while (node := parents.get(node)) is not None:
                    path.append(node)
                return path[::-1]
            if child not in parents and child != start:
                parents[child] = node
                queue.append(child)
    return None


def forbidden_imports(graph: Graph, core: Iterable[str], forbidden: Callable[[str], bool]) -> dict[str, list[str]]:
    """Per core module, the shortest chain to each forbidden module it reaches (empty: none reached)."""
    offenders: dict[str, list[str]] = {}
    for module in sorted(core):
        reached = sorted(m for m in _reachable(graph, module) if forbidden(m))
        chains = [_shortest_path(graph, module, lambda m, target=target: m == target) for target in reached]
        if chains:
            offenders[module] = [" -> ".join(chain) for chain in chains if chain]
    return offenders


def _reachable(graph: Graph, start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for child in graph.get(todo.pop(), {}):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    seen.discard(start)
    return seen


def _in_packages(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def is_forbidden(module: str) -> bool:
    return module in FORBIDDEN or _in_packages(module, FORBIDDEN_PACKAGES)


def is_upper(module: str) -> bool:
    return module in UPPER or _in_packages(module, UPPER_PACKAGES)


def _describe(graph: Graph, chain: list[str]) -> str:
    """``a (line 3) -> b (line 12) -> a``: where each link of a circle is written."""
    links = [f"{a} (line {', '.join(map(str, graph[a][b]))})" for a, b in zip(chain, chain[1:], strict=False)]
    return " -> ".join([*links, chain[-1]])


# ---------------------------------------------------------------- the real package


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(discover(INCLUDE, PACKAGE), PACKAGE)


def test_the_checked_modules_exist(graph):
    # A rename must not make the checks below pass on nothing.
    assert CORE | FORBIDDEN | UPPER <= set(graph), sorted((CORE | FORBIDDEN | UPPER) - set(graph))
    for package in FORBIDDEN_PACKAGES:
        assert any(m.startswith(package + ".") for m in graph), f"{package} has no module"


def test_the_package_has_no_import_circles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import circles (module-level and lazy imports both count):\n" + "\n".join(
        _describe(graph, c) for c in cycles)


def test_the_pure_core_imports_no_hook_trigger_strategy_task_or_engine_module(graph):
    offenders = forbidden_imports(graph, CORE, is_forbidden)
    assert not offenders, "the pure core reaches modules it must not import:\n" + "\n".join(
        chain for chains in offenders.values() for chain in chains)


def test_hooks_triggers_and_engines_import_no_strategy_task_or_flow_module(graph):
    lower = [m for m in graph if _in_packages(m, (f"{PACKAGE}.hooks", f"{PACKAGE}.triggers", f"{PACKAGE}.engines"))]
    offenders = forbidden_imports(graph, lower, is_upper)
    assert not offenders, "a hook, trigger or engine reaches a strategy, the task bodies or the flow:\n" + "\n".join(
        chain for chains in offenders.values() for chain in chains)


# ---------------------------------------------------------------- the checker itself, on synthetic packages


def _package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return discover(root, "pkg")


def test_a_circle_of_lazy_relative_and_submodule_imports_is_found(tmp_path):
    modules = _package(tmp_path, {
        "pkg/__init__.py": "VERSION = 1\n",
        "pkg/a.py": "def f():\n    from pkg import b as bee\n    return bee\n",  # lazy, a submodule as a name
        "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n",  # relative
        "pkg/c.py": "import pkg.a\nfrom pkg import VERSION\n",  # VERSION is no submodule: an edge to pkg
        "pkg/d.py": "from pkg.c import x\n",  # reaches the circle, is not on it
    })
    graph = build_graph(modules, "pkg")
    assert graph["pkg.a"] == {"pkg.b": [2]}
    assert graph["pkg.c"] == {"pkg.a": [1], "pkg": [2]}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert _describe(graph, find_cycles(graph)[0]) == "pkg.a (line 2) -> pkg.b (line 3) -> pkg.c (line 1) -> pkg.a"


def test_two_circles_and_a_self_import_are_each_reported(tmp_path):
    modules = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/x.py": "import importlib\nmod = importlib.import_module('pkg.y')\n",
        "pkg/y.py": "from pkg.x import mod\n",
        "pkg/p.py": "from .q import thing\n",
        "pkg/q.py": "def g():\n    import pkg.p\n",
        "pkg/s.py": "import pkg.s.attr\n",  # resolves to pkg.s itself, which is no circle
    })
    assert find_cycles(build_graph(modules, "pkg")) == [["pkg.p", "pkg.q", "pkg.p"], ["pkg.x", "pkg.y", "pkg.x"]]


def test_an_acyclic_package_reports_no_circle(tmp_path):
    modules = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.c import x\n",
        "pkg/c.py": "import os\n",
    })
    graph = build_graph(modules, "pkg")
    assert graph["pkg.b"] == {"pkg.c": [2]}
    assert find_cycles(graph) == []


def test_a_core_module_reaching_a_forbidden_one_through_a_helper_is_named(tmp_path):
    modules = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/core.py": "from pkg.helper import x\n",
        "pkg/helper.py": "def g():\n    from pkg.engines.live import y\n",
        "pkg/engines/__init__.py": "",
        "pkg/engines/live.py": "",
        "pkg/pure.py": "from pkg import core\n",
    })
    graph = build_graph(modules, "pkg")

    def forbidden(m: str) -> bool:
        return m.startswith("pkg.engines")

    assert forbidden_imports(graph, ["pkg.core", "pkg.pure", "pkg.helper"], forbidden) == {
        "pkg.core": ["pkg.core -> pkg.helper -> pkg.engines.live"],
        "pkg.helper": ["pkg.helper -> pkg.engines.live"],
        "pkg.pure": ["pkg.pure -> pkg.core -> pkg.helper -> pkg.engines.live"],
    }
    assert forbidden_imports(graph, ["pkg.engines.live"], forbidden) == {}
