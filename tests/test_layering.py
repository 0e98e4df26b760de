"""The import graph is layered: read from the source with `ast`, nothing imported.

- No two packages at the same level import each other, directly or around a longer loop
  (vppo_jax's subpackages and top-level modules; inside a package, its subpackages and modules).
- No production entry point (vppo_jax/train.py, vppo_jax/plan.py, vppo_jax/eval/, scripts/)
  reaches vppo_jax.demo, directly or through another module.

Every import counts, also one inside a function (a lazy import is still a dependency), and
importing a.b.c also runs a/__init__.py and a/b/__init__.py.
"""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCTION_ROOTS = ("vppo_jax.train", "vppo_jax.plan", "vppo_jax.eval", "scripts")
DEMO = "vppo_jax.demo"


def module_files(root: str, top_packages: tuple[str, ...]) -> dict[str, str]:
    """Module name -> file, for every .py under `root`/<top package>; a package is its __init__."""
    files = {}
    for top in top_packages:
        for directory, _, names in os.walk(os.path.join(root, top)):
            for name in names:
                if not name.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(directory, name), root)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                files[".".join(parts)] = os.path.join(directory, name)
    return files


def imported_modules(name: str, path: str, known: set[str]) -> set[str]:
    """The modules of `known` that the file of module `name` imports, with their parent packages."""
    is_package = path.endswith("__init__.py")
    targets = set()
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, up level - 1 more
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            targets.add(base)
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    found = set()
    for target in targets:
        parts = target.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known)
    return found - {name}


def import_graph(root: str, top_packages: tuple[str, ...]) -> dict[str, set[str]]:
    files = module_files(root, top_packages)
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Loops between siblings: for each package, its children as nodes, an arrow wherever a
    module under one child imports a module under another; one loop per strongly connected group."""
    cycles = []
    packages = {".".join(name.split(".")[:i]) for name in graph for i in range(1, name.count(".") + 1)}
    for package in sorted(packages):
        depth = package.count(".") + 1

        def child(module, package=package, depth=depth):
            inside = module.startswith(package + ".")
            return ".".join(module.split(".")[: depth + 1]) if inside else None

        arrows: dict[str, set[str]] = {}
        for source, targets in graph.items():
            if child(source) is None:
                continue
            for target in targets:
                if child(target) is not None and child(target) != child(source):
                    arrows.setdefault(child(source), set()).add(child(target))
        cycles.extend(strongly_connected_loops(arrows))
    return cycles


def strongly_connected_loops(arrows: dict[str, set[str]]) -> list[list[str]]:
    """The groups of two or more nodes that reach each other (a node reaches what its arrows reach)."""

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in arrows.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {node: reach(node) for node in arrows}
    groups = []
    for node in sorted(arrows):
        group = sorted(other for other in reachable[node] if node in reachable.get(other, ()))
        if node in group and group not in groups and len(group) > 1:
            groups.append(group)
    return groups


def import_path(graph: dict[str, set[str]], start: str, forbidden_prefix: str) -> list[str] | None:
    """A chain of imports from `start` to a module under `forbidden_prefix`, or None (breadth first: the shortest)."""
    parents = {start: None}
    queue = [start]
    for module in queue:
        if module == forbidden_prefix or module.startswith(forbidden_prefix + "."):
            chain = [module]
            while parents[chain[-1]] is not None:
                chain.append(parents[chain[-1]])
            return chain[::-1]
        for target in sorted(graph.get(module, ())):
            if target not in parents:
                parents[target] = module
                queue.append(target)
    return None


def write_package(root, files: dict[str, str]):
    for relative, text in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def test_checker_finds_a_loop_and_a_path_to_the_demo(tmp_path):
    """The checks can fail: a made-up package with a loop a -> b -> c -> a (one arrow relative,
    one lazy, one through `from pkg import sub`) and an entry point that reaches the demo."""
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a/__init__.py": "",
            "pkg/a/x.py": "from pkg.b import y\n",
            "pkg/b/__init__.py": "",
            "pkg/b/y.py": "def f():\n    from ..c import z\n",
            "pkg/c/__init__.py": "",
            "pkg/c/z.py": "from pkg import a\n",
            "pkg/d.py": "import pkg.a.x\n",
            "pkg/entry.py": "from pkg.d import *\nfrom pkg.demo import tiny\n",
            "pkg/demo/__init__.py": "",
            "pkg/demo/tiny.py": "",
        },
    )
    graph = import_graph(str(tmp_path), ("pkg",))
    assert graph["pkg.c.z"] == {"pkg", "pkg.a"}
    assert graph["pkg.b.y"] == {"pkg", "pkg.c", "pkg.c.z"}
    assert package_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert import_path(graph, "pkg.entry", "pkg.demo") == ["pkg.entry", "pkg.demo"]
    assert import_path(graph, "pkg.d", "pkg.demo") is None


def test_no_package_imports_one_that_imports_it_back():
    graph = import_graph(REPO, ("vppo_jax", "scripts"))
    assert package_cycles(graph) == []


def test_production_entry_points_do_not_reach_the_demo():
    graph = import_graph(REPO, ("vppo_jax", "scripts"))
    entry_points = [name for name in graph if any(name == r or name.startswith(r + ".") for r in PRODUCTION_ROOTS)]
    assert len(entry_points) >= 8  # train, plan, eval's modules, the scripts: the walk found the files
    chains = {entry: import_path(graph, entry, DEMO) for entry in sorted(entry_points)}
    assert {entry: chain for entry, chain in chains.items() if chain} == {}
