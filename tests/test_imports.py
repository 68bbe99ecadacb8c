"""No import cycles between glmkit's modules.

The graph is built statically from the source files (nothing is imported, so optional dependencies do not
matter). Every import counts: module level, inside functions, and under `if TYPE_CHECKING:`, since a cycle that
Python happens to survive (because one side imports late) is still two layers reaching into each other.

How an import becomes an edge:
* `import glmkit.a.b` -> glmkit.a.b; `from glmkit.a import b` (or `from .a import b`) -> glmkit.a.b when that
  is a module, else glmkit.a (a name from its `__init__`, which is a real dependency on that file).
* The parent packages a submodule import runs first are not edges: Python puts a package in sys.modules before
  running its `__init__`, so a submodule that refers back to its (partly built) parent cannot fail on that.
* A module that calls `importlib.import_module` depends on each glmkit submodule it names in a string literal
  (cli.py's table of subcommands): without this, a command importing cli.py back would go unseen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import glmkit


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> source file for every .py file under the package directory `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` statement reads from."""
    if not node.level:
        return node.module or ""
    # The package a relative import starts from: the module itself for an __init__, else its parent.
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _calls_import_module(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "import_module") or \
                    (isinstance(f, ast.Attribute) and f.attr == "import_module"):
                return True
    return False


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see the module docstring for the rules)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = _resolve_from(node, module, is_package)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else source)
        if _calls_import_module(tree):
            # Dotted names only: the bare package name is also a program name, a logger name...
            targets.update(node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                           and isinstance(node.value, str) and "." in node.value and node.value in modules)
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles as [a, b, ..., a]: the strongly connected components of more than one module (Tarjan), each shown
    as shortest cycles until every module of the component is on one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        # Recursion depth is bounded by the number of modules (about a hundred).
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in sorted(components):
        uncovered = set(component)
        while uncovered:
            cycle = _cycle_through(graph, set(component), min(uncovered))
            cycles.append(cycle)
            uncovered -= set(cycle)
    return cycles


def _cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest cycle from `start` back to it inside its component, as [start, ..., start] (breadth-first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its own component")


def format_cycles(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_glmkit_has_no_import_cycles():
    root = Path(glmkit.__file__).parent
    modules = module_files(root, "glmkit")
    assert "glmkit.cli" in modules and "glmkit.models.quant" in modules  # the walk found the sources
    cycles = find_cycles(import_graph(modules))
    assert not cycles, "import cycles between glmkit modules:\n" + format_cycles(cycles)


def test_checker_reports_a_known_cycle(tmp_path):
    """The checker itself: a tiny package whose cycles use each kind of import it must see."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import VALUE\n")
    (pkg / "sub" / "leaf.py").write_text("VALUE = 1\n")
    (pkg / "a.py").write_text("from .sub import leaf\n\ndef f():\n    from . import b\n")  # in a function
    (pkg / "b.py").write_text("import pkg.a\n")
    (pkg / "c.py").write_text("from .sub import VALUE\n")  # a name from sub/__init__: an edge to pkg.sub
    (pkg / "sub" / "deep.py").write_text("from ..x import X\n")  # two levels up, a name: an edge to pkg.x
    (pkg / "x.py").write_text("X = 0\n\ndef g():\n    import pkg.y\n")
    (pkg / "y.py").write_text("from pkg.sub import deep\n")
    (pkg / "cli.py").write_text("import importlib\nTABLE = {'x': 'pkg.e'}\n"
                                "def main():\n    importlib.import_module(TABLE['x'])\n")
    (pkg / "e.py").write_text("def helper():\n    from .cli import TABLE\n")
    modules = module_files(pkg, "pkg")
    graph = import_graph(modules)
    assert graph["pkg.a"] == {"pkg.sub.leaf", "pkg.b"}
    assert graph["pkg.c"] == {"pkg.sub"} and graph["pkg.sub"] == {"pkg.sub.leaf"}
    assert graph["pkg.sub.deep"] == {"pkg.x"} and graph["pkg.cli"] == {"pkg.e"}
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.cli", "pkg.e", "pkg.cli"],
                      ["pkg.sub.deep", "pkg.x", "pkg.y", "pkg.sub.deep"]]
    assert format_cycles(cycles).splitlines()[0] == "pkg.a -> pkg.b -> pkg.a"

    for name in ("b", "e", "y"):
        (pkg / f"{name}.py").write_text("")
    assert find_cycles(import_graph(module_files(pkg, "pkg"))) == []
