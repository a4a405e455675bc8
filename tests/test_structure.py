"""Issue 21: the code keeps its shape. No import cycle between imgclf's modules at any depth, imports inside
functions included (they run later, but a cycle through them is still two modules that need each other), and
no function over 50 lines. Read from the source with `ast`: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "imgclf"
MAX_LINES = 50


def modules(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (its file, whether it is a package's __init__)."""
    found = {}
    for file in sorted(package.rglob("*.py")):
        parts = list(file.relative_to(package).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join([package.name, *(parts[:-1] if is_package else parts)])] = (file, is_package)
    return found


def imported(name: str, is_package: bool, node: ast.Import | ast.ImportFrom, known) -> set[str]:
    """The package's modules that `node`, in module `name`, imports (`from X import Y`: module X.Y when there
    is one, else X)."""
    def owner(dotted: str) -> str | None:  # the longest prefix that is a module of the package
        parts = dotted.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known), None)

    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = name.split(".") if is_package else name.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        return {m for alias in node.names if (m := owner(f"{base}.{alias.name}") or owner(base)) and m != name}
    return {m for m in map(owner, targets) if m is not None and m != name}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file. A package's edges to its own
    submodules (an __init__ re-exporting them) are left out: they are not a cycle of design."""
    known = modules(package)
    graph = {}
    for name, (file, is_package) in known.items():
        edges = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= imported(name, is_package, node, known)
        graph[name] = {m for m in edges if not (is_package and m.startswith(name + "."))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, colouring the nodes)."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        done.add(path.pop())
        return None

    return next((c for n in sorted(graph) if n not in done and (c := visit(n))), None)


def long_functions(package: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    """module.function (lines) of every function or method longer than `limit` lines, decorators excluded."""
    found = []
    for name, (file, _) in modules(package).items():
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{name}.{node.name} ({lines} lines)")
    return found


def test_no_import_cycle_at_any_depth():
    graph = import_graph()
    assert len(graph) > 40 and "imgclf.cli" in graph["imgclf.__main__"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_walk_finds_cycles_through_imports_inside_functions(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.a import f\n")  # re-exporting its own: no edge
    (package / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n    return b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from .. import c\n")
    (package / "c.py").write_text("x = 1\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"},
                     "pkg.c": set()}
    assert find_cycle(graph) is None
    (package / "c.py").write_text("def g():\n    import pkg.a\n")  # deep inside a function, three steps round
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_no_function_over_50_lines(tmp_path):
    assert long_functions() == []
    (tmp_path / "pkg").mkdir()
    lines = "".join(f"        x{i} = {i}\n" for i in range(MAX_LINES - 1))
    (tmp_path / "pkg" / "m.py").write_text(f"class C:\n    def fits(self):\n{lines}\n    def long(self):\n{lines}        y = 0\n")
    assert long_functions(tmp_path / "pkg") == ["pkg.m.long (51 lines)"]
