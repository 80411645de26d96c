"""The layers hold: the core package's import graph has no cycle (function-level imports included),
and importing the core imports no plug-in folder."""

import ast
import subprocess
import sys
from pathlib import Path

import layerroute

CORE = Path(layerroute.__file__).parent
PLUGINS = ("envs", "routers", "search", "policies", "experiments", "tests")


def _module(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``import from`` names (relative imports resolved against ``mod``)."""
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_package else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``layerroute`` core modules it imports anywhere in its body (functions too)."""
    files = {_module(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", node)
                # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:  # `import a.b.c` of a core module a.b
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_core_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"layerroute.objective", "layerroute.scoring", "layerroute.executor", "layerroute.tasks.base"} <= set(graph)
    assert "layerroute.scoring" in graph["layerroute.objective"]  # function-level imports are seen too
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_imports_no_plugin():
    code = ("import sys, layerroute, layerroute.objective, layerroute.executor, layerroute.scoring, "
            "layerroute.prefix, layerroute.evaluation, layerroute.store\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[:2] in "
            f"[['layerroute', p] for p in {PLUGINS!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
