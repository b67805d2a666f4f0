"""The package's shape: no import cycle between its modules (every import counts, inside functions
too, except under `if TYPE_CHECKING:`) and no private name (`from X import _name`) taken from another
module. Read from the source with ast: nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import quantatlas

ROOT = Path(quantatlas.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _owner(name: str, mods) -> str | None:
    """The module file an import of dotted `name` loads last (a package's __init__ for a package)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_nodes(tree) -> set:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> modules it imports, the private names imported across modules)."""
    mods = _modules()
    graph, private = {m: set() for m in mods}, []
    for me, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [(_owner(a.name, mods), None) for a in node.names if a.name.split(".")[0] == "quantatlas"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                if src.split(".")[0] != "quantatlas":
                    continue
                # a submodule imported by name is the submodule; any other name is a module's attribute
                targets = [(_owner(f"{src}.{a.name}", mods), None) if f"{src}.{a.name}" in mods
                           else (_owner(src, mods), a.name) for a in node.names]
            else:
                continue
            for target, name in targets:
                if target is None or target == me:
                    continue
                graph[me].add(target)
                reexport = path.name == "__init__.py" and target.startswith(me + ".")
                if name and name.startswith("_") and not name.startswith("__") and not reexport:
                    private.append(f"{me} imports {name} from {target}")
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge found by a depth-first search (empty: the graph is a DAG)."""
    state, path, found = {}, [], []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == "open":
                found.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w)
        path.pop()
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return found


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle_inside_the_package():
    graph, _ = import_graph()
    assert "quantatlas.quant.pipeline" in graph["quantatlas.measure"]   # the graph is really read
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_private_name_imported_across_modules():
    _, private = import_graph()
    assert not private, "\n".join(private)


@pytest.mark.parametrize("light", ["quantatlas.spec", "quantatlas.atlas.ids", "quantatlas.quant.steps"])
def test_spec_and_steps_do_not_reach_the_runner(light):
    """The spec and the step registry sit below everything that runs: nothing they import reaches
    the runner, the pipeline or the models."""
    graph, _ = import_graph()
    seen, todo = set(), [light]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    assert not seen & {"quantatlas.runner", "quantatlas.quant.pipeline", "quantatlas.measure",
                       "quantatlas.models.load"}
