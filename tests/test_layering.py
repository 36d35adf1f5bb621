"""The host's modules import each other in layers: no cycle in ``snakepool.pool``.

Every import counts: at the top, inside functions (lazy), and under
``if TYPE_CHECKING:`` (a cycle only type checkers see is still two modules
that cannot be read, tested or replaced apart).
"""

from __future__ import annotations

import ast
from pathlib import Path

import snakepool.pool

PACKAGE = "snakepool.pool"
ROOT = Path(snakepool.pool.__file__).parent


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = [part for part in relative.parts if part != "__init__"]
    return ".".join([PACKAGE, *parts])


def _imported(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module ``module`` imports (absolute names), wherever the import is."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            found.add(target)
            # (from . import _worker: a module, not a name in the package)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """``snakepool.pool`` module -> the ``snakepool.pool`` modules it imports."""
    sources = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in sources.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imported = _imported(tree, module, path.name == "__init__.py")
        graph[module] = {name for name in imported if name in sources and name != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for imported in sorted(graph[module]):
            if imported in on_path:
                return [*path[path.index(imported) :], imported]
            if imported not in done:
                cycle = visit(imported)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle is not None:
                return cycle
    return None


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert f"{PACKAGE}._pool" in graph[f"{PACKAGE}._supervisor"]  # (top level)
    assert f"{PACKAGE}._redis_store" in graph[f"{PACKAGE}._stores"]  # (inside a function)
    assert f"{PACKAGE}._pool" in graph[PACKAGE]  # (the package's own re-exports)


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_host_modules_import_each_other_without_a_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
