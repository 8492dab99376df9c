"""The import graph of megagpt/ and kernels/ (as megagpt_kernels): no cycles, one-way layering.

Built statically with ``ast`` from every ``.py`` file, counting imports anywhere in a file (inside
functions too: a lazy import still ties the modules together) and resolving relative imports.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"megagpt": REPO / "megagpt", "megagpt_kernels": REPO / "kernels"}  # import name -> folder
# one-way data flow (tools -> megagpt -> kernels): these never reach the training-side packages
LOW_LEVEL = ("megagpt.data", "megagpt.tokenizer", "megagpt.errors", "megagpt_kernels")
HIGH_LEVEL = ("megagpt.train", "megagpt.finetune", "megagpt.checkpoint", "megagpt.cluster")


def _in(name, packages):
    return any(name == p or name.startswith(p + ".") for p in packages)


def find_modules(roots=ROOTS):
    """{module name: (path, is_package)} for every .py file under the roots."""
    mods = {}
    for top, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _targets(node, name, is_pkg, mods):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: level 1 is this module's package
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module
    return [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]


def import_graph(mods):
    """{module: {imported internal module: first line number}}."""
    graph = {}
    for name, (path, is_pkg) in mods.items():
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(node, name, is_pkg, mods):
                    while t and t not in mods:  # `import a.b.Thing`-style: the longest module prefix
                        t = t.rpartition(".")[0]
                    if t and t != name:
                        edges[t] = min(edges.get(t, node.lineno), node.lineno)
    return graph


def find_cycles(graph):
    """For each strongly connected component of more than one module (Tarjan): (a shortest cycle
    through it, as module names starting and ending with the same one; all its modules)."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def strongconnect(v):  # recursive is fine: the graph has ~100 nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [(_cycle_in(graph, comp), sorted(comp)) for comp in sccs]


def _cycle_in(graph, comp):
    """A shortest cycle through the component's first module (BFS inside the component)."""
    start = min(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in comp and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle found in component {sorted(comp)}")


def describe_path(graph, mods, path):
    """``a (a.py:12) -> b (b.py:3) -> ...``: where each step's import is written."""
    steps = []
    for a, b in zip(path, path[1:]):
        rel = mods[a][0].relative_to(REPO) if mods[a][0].is_relative_to(REPO) else mods[a][0]
        steps.append(f"{a} ({rel}:{graph[a][b]} imports {b})")
    return " -> ".join(steps)


def reachable_paths(graph, src):
    """{module: import path from src} for every module src reaches."""
    paths, frontier = {src: [src]}, [src]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return paths


@pytest.fixture(scope="module")
def graph_and_mods():
    mods = find_modules()
    return import_graph(mods), mods


def test_graph_sees_the_package(graph_and_mods):
    """Guards the checks below against vacuous passes: the graph must see real edges."""
    graph, mods = graph_and_mods
    assert "megagpt.data.indexed" in mods and "megagpt_kernels.dispatch" in mods
    assert "megagpt.errors" in graph["megagpt.data.indexed"]
    assert any(t.startswith("megagpt_kernels") for v in graph for t in graph[v] if v.startswith("megagpt."))


def test_no_import_cycles(graph_and_mods):
    graph, mods = graph_and_mods
    cycles = find_cycles(graph)
    assert not cycles, "import cycle(s):\n" + "\n".join(
        f"  {' -> '.join(c)}\n    {describe_path(graph, mods, c)}\n    (modules on cycles together: {', '.join(m)})"
        for c, m in cycles)


def test_low_level_modules_never_reach_training_side(graph_and_mods):
    """megagpt/data, tokenizer.py, errors.py and kernels/ import nothing (even indirectly) from
    megagpt.train / finetune / checkpoint / cluster; kernels/ imports nothing from megagpt."""
    graph, mods = graph_and_mods
    bad = []
    for src in sorted(m for m in mods if _in(m, LOW_LEVEL)):
        for dst, path in reachable_paths(graph, src).items():
            forbidden = _in(dst, HIGH_LEVEL) or (_in(src, ("megagpt_kernels",)) and _in(dst, ("megagpt",)))
            if forbidden:
                bad.append(describe_path(graph, mods, path))
                break  # the first (shortest) offending path per module is enough
    assert not bad, "layering violation(s):\n  " + "\n  ".join(bad)


def test_checker_finds_a_planted_cycle_and_layering_violation(tmp_path):
    """The same functions on a scratch package: a relative-import cycle through a lazy import
    inside a function, and a low-level module reaching a high-level one."""
    pkg = tmp_path / "megagpt"
    for rel, text in {"__init__.py": "", "errors.py": "from .data import reader\n",
                      "data/__init__.py": "", "data/reader.py": "def f():\n    from ..train import loop\n",
                      "train/__init__.py": "", "train/loop.py": "from megagpt.errors import X\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    mods = find_modules({"megagpt": pkg})
    graph = import_graph(mods)
    assert graph["megagpt.data.reader"] == {"megagpt.train.loop": 2}
    [(cycle, members)] = find_cycles(graph)
    assert members == ["megagpt.data.reader", "megagpt.errors", "megagpt.train.loop"]
    assert cycle == ["megagpt.data.reader", "megagpt.train.loop", "megagpt.errors", "megagpt.data.reader"]
    assert "megagpt.train.loop" in reachable_paths(graph, "megagpt.errors")


# The documented layering (docs/architecture.md), bottom first: a package imports only from its
# own layer or below. megagpt_kernels imports nothing from megagpt (checked above).
LAYERS = [("errors",), ("schema",), ("atomic", "envsetup"), ("tokenizer",), ("data",), ("megagpt_kernels",),
          ("tp",), ("model",), ("parallel",), ("export",), ("checkpoint",), ("cluster",), ("config",),
          ("train", "finetune", "eval")]
# the one sanctioned upward edge: the finetune config validates the task name against the registry
ALLOWED_UP = {("megagpt.config", "megagpt.finetune.tasks")}


def _layer(module):
    parts = module.split(".")
    name = parts[0] if parts[0] == "megagpt_kernels" else (parts[1] if len(parts) > 1 else None)
    return next((i for i, names in enumerate(LAYERS) if name in names), None)


def test_packages_import_only_their_own_layer_or_below(graph_and_mods):
    graph, mods = graph_and_mods
    assert all(_layer(m) is not None for m in mods if m not in ("megagpt",)), \
        sorted(m for m in mods if m != "megagpt" and _layer(m) is None)
    up = [f"{a} ({mods[a][0].relative_to(REPO)}:{line}) imports {b}"
          for a, edges in sorted(graph.items()) for b, line in sorted(edges.items())
          if b != "megagpt" and _layer(b) > _layer(a) and (a, b) not in ALLOWED_UP]
    assert not up, "imports up the layering of docs/architecture.md:\n  " + "\n  ".join(up)
