"""kif_jax's modules import one another without a circle.

The graph is read from the source (ast), every import statement wherever it stands, function-level
ones included: a circle closed by an import inside a function is still a circle; so is one closed by
`importlib.import_module("kif_jax....")` with a literal name. `import kif_jax.a.b` and
`from kif_jax.a import b`, b a submodule, are edges to kif_jax.a.b; `from kif_jax.a import name` of
anything else is an edge to kif_jax.a (its __init__). A package's __init__ importing its own
submodules counts like any other import.
"""
from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "kif_jax"



def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
    """The kif_jax modules that module `name` (source at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets.add(node.args[0].value)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                targets.add(child if child in modules else base)
    found = set()
    for target in targets:
        while target and target not in modules:  # an attribute path: the module that holds it
            target = target.rpartition(".")[0]
        if target:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    modules = set(files)
    return {name: imported_modules(name, path, modules) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the modules along it (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "kif_jax" / "pkg"
    source.mkdir(parents=True)
    (source / "__init__.py").write_text("from kif_jax.pkg.a import f\n")
    (source / "a.py").write_text("def f():\n    from kif_jax.pkg import b\n    import kif_jax.c.d\n"
                                 "    from kif_jax.c import value\n    from . import b\n    from .b import g\n"
                                 "    importlib.import_module('kif_jax.pkg')\n")
    modules = {"kif_jax.pkg", "kif_jax.pkg.a", "kif_jax.pkg.b", "kif_jax.c", "kif_jax.c.d"}
    assert imported_modules("kif_jax.pkg", source / "__init__.py", modules) == {"kif_jax.pkg.a"}
    assert imported_modules("kif_jax.pkg.a", source / "a.py", modules) == {"kif_jax.pkg.b", "kif_jax.c.d", "kif_jax.c",
                                                                         "kif_jax.pkg"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_kif_jax_has_no_import_circle():
    graph = import_graph()
    assert {"kif_jax", "kif_jax.config", "kif_jax.methods", "kif_jax.methods.registry"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
